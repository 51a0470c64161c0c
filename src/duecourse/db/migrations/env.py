from __future__ import annotations

from alembic import context


from duecourse.db.base import Money, UTCDateTime
from duecourse.db.migrate import _driver_url
from duecourse.db.models import metadata
from duecourse.db.session import make_engine


def render_item(type_, obj, autogen_context):  # type: ignore[no-untyped-def]
    # Migrations speak plain SQL types, so they never depend on Python classes that may change.
    if type_ == "type" and isinstance(obj, Money):
        return "sa.BigInteger()"
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


def run() -> None:
    url = _driver_url(context.config.get_main_option("sqlalchemy.url"))
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            render_item=render_item,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()

"""Money and UTC datetimes read back exactly as written, on both databases (the result processors
read PostgreSQL's integers and datetimes directly, SQLite's through the types' own conversion)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import Column, Integer, MetaData, Table, insert, select

from duecourse.db.base import Money, UTCDateTime


def test_money_and_utc_datetimes_read_back_exactly(db):  # type: ignore[no-untyped-def]
    table = Table("type_check", MetaData(), Column("id", Integer, primary_key=True), Column("amount", Money),
                  Column("at", UTCDateTime))
    amounts = [Decimal("0"), Decimal("12.3456"), Decimal("-7.5"), Decimal("922337203685477.5807"), None]
    instants = [datetime(2026, 3, 1, 9, 30, tzinfo=UTC), datetime(2026, 3, 1, 9, 30, 0, 123456, tzinfo=UTC),
                datetime(2026, 7, 1, 2, 0, tzinfo=timezone(timedelta(hours=-5))), datetime(1999, 12, 31, tzinfo=UTC), None]
    with db.engine.begin() as conn:
        table.create(conn)
        try:
            conn.execute(insert(table), [{"id": i, "amount": a, "at": t}
                                         for i, (a, t) in enumerate(zip(amounts, instants, strict=True))])
            rows = conn.execute(select(table.c.amount, table.c.at).order_by(table.c.id)).all()
        finally:
            table.drop(conn)
    assert [r.amount for r in rows] == amounts
    assert all(type(r.amount) is Decimal for r in rows if r.amount is not None)
    assert [r.at for r in rows] == instants
    assert all(r.at.tzinfo is UTC for r in rows if r.at is not None)

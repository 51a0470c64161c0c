"""Small helpers for the few places where SQLite and PostgreSQL spell things differently."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Date, Integer, String, any_, bindparam, cast, func, literal, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement


def dialect_name(session: Session) -> str:
    return session.get_bind().dialect.name


def id_in(session: Session, column: Any, ids: list[int]) -> ColumnElement[bool]:
    """``column IN (ids)``. On PostgreSQL ``column = ANY(:ids)`` with the ids as one array
    parameter: the same statement text whatever the number of ids, so nothing is re-rendered or
    re-parsed per call (a batch of hundreds of ids otherwise renders hundreds of placeholders)."""
    if dialect_name(session) == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(BigInteger)))
    return column.in_(ids)


def date_plus_days(session: Session, value: ColumnElement[Any], days: int | ColumnElement[Any]) -> ColumnElement[Any]:
    """``value + days`` for a DATE, as a DATE, on either dialect (``days`` a constant or an expression)."""
    if dialect_name(session) == "postgresql":
        n = literal(int(days), Integer) if isinstance(days, int) else cast(days, Integer)
        return cast(value + n, Date)
    if isinstance(days, int):
        return func.date(value, f"{int(days):+d} days", type_=Date)
    return func.date(value, func.printf("%+d days", cast(days, Integer), type_=String), type_=Date)


def insert_for(session: Session, table: Any) -> Any:
    """The dialect's INSERT construct, which knows ``ON CONFLICT``."""
    return (postgresql.insert if dialect_name(session) == "postgresql" else sqlite.insert)(table)


def roomy_joins(session: Session) -> None:
    """PostgreSQL: for the rest of the transaction, let joins over millions of rows hash in memory
    instead of spilling to disk (a spilled hash join also hands its rows on out of order, so the
    inserts it feeds touch index pages at random instead of appending)."""
    if dialect_name(session) == "postgresql":
        session.execute(text("SET LOCAL work_mem = '128MB'"))


def serialize_on(session: Session, table: Any, row_id: int) -> None:
    """Hold a write lock for the rest of the transaction so that passes over the same rows run one
    after the other: a row lock on PostgreSQL, the database write lock on SQLite (taken up front,
    so a reading transaction never has to upgrade its lock midway)."""
    pk = table.c.id
    session.execute(update(table).where(pk == row_id).values({pk.name: pk}))


def claim_update(
    session: Session, model: Any, candidates: Any, *, values: dict[str, Any], where: tuple[Any, ...] = (),
    returning: tuple[Any, ...] = (),
) -> list[Any]:
    """Claim the rows whose ids ``candidates`` selects (ordered, limited): one ``UPDATE`` that sets
    ``values`` and returns ``returning``.

    PostgreSQL: the candidates are locked with ``FOR UPDATE SKIP LOCKED`` in a materialized CTE, so
    they are chosen exactly once. (Written as ``WHERE id IN (subquery … LIMIT n)``, the planner may
    run the subquery again for each row, and each run skips the rows this same statement has just
    updated: a claim of 1 took 2.) SQLite has one writer; the plain subquery is enough there."""
    if dialect_name(session) == "postgresql":
        chosen = candidates.with_for_update(skip_locked=True).cte("claim_candidates").prefix_with("MATERIALIZED")
        stmt = update(model).where(model.id == chosen.c.id, *where)
    else:
        stmt = update(model).where(model.id.in_(candidates.scalar_subquery()), *where)
    return session.execute(
        stmt.values(**values).returning(*returning).execution_options(synchronize_session=False)
    ).all()

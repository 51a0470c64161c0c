"""The rows a dispatch batch adds, written with Core instead of ORM objects.

A batch of a hundred items adds a sandbox outbox row, an interaction and two or three execution-log
entries per item. As ORM objects they cost most of the batch: building them, then the unit of work
turning them into large multi-row ``INSERT … RETURNING`` statements whose ids nobody reads. Inside
:func:`collecting` the writers (:func:`duecourse.engine.cases.log_event`, the sandbox provider,
the dispatch's interaction) append plain dicts here instead, and :func:`write_pending` sends each
table's rows as one statement: on PostgreSQL one ``INSERT … SELECT FROM json_to_recordset(<the rows
as one JSON parameter>)`` (a short statement whatever the batch size, so psycopg parses it once, and
the server runs one statement instead of one per row); on SQLite an executemany of a single-row
``INSERT``. No ``RETURNING``: nobody reads these ids in the batch. The changes of the batch's queue
items and accounts (still ORM objects) are written the same way, one ``UPDATE … FROM`` per table and
set of changed columns, instead of by the unit of work at commit.

Ordering: the rows are written, table by table in the order they were collected, at the end of
the batch before its commit, and before anything in the batch reads those tables or writes them
another way (:func:`paused`: a delivery report applied to the item just recorded). Nothing is
ever written outside the batch's transaction: a batch that fails writes none of its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger, Boolean, Date, DateTime, Table, Text, bindparam, cast, column, func, insert, update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.state import InstanceState

from duecourse.channels.models import SandboxMessage
from duecourse.engine.models import ExecutionLogEntry, Interaction
from duecourse.ledger.models import Account

KEY = "dispatch_rows"

OUTBOX = SandboxMessage.__table__
INTERACTIONS = Interaction.__table__
LOG = ExecutionLogEntry.__table__
ACCOUNTS = Account.__table__


@dataclass
class BatchRows:
    """Rows waiting to be inserted, per table (each dict of a table has the same keys)."""

    outbox: list[dict[str, Any]] = field(default_factory=list)
    interactions: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    # ORM objects (the batch's queue items and accounts) whose changes are written here with Core
    # rather than by the unit of work; whatever the unit of work flushes before (autoflush) is
    # simply no longer changed when we get here.
    tracked: list[Any] = field(default_factory=list)
    statements: int = 0  # how many statements write() executed (for tests and the profile)

    def __bool__(self) -> bool:
        return bool(self.outbox or self.interactions or self.log or self.tracked)

    def write(self, session: Session, *, last: bool = False) -> None:
        """Write what has been collected. ``last``: the batch's final write, after which nothing in it
        changes an account any more, so the accounts' tabs can be set in the same ``UPDATE``."""
        postgres = session.get_bind().dialect.name == "postgresql"
        if self.tracked:
            self.statements += update_changed(session, self.tracked, postgres=postgres, with_tabs=last)
        # Within a table the rows go in the order they were collected, so ids increase in the order
        # things happened (execution-log readers order by id).
        for table, rows in ((OUTBOX, self.outbox), (INTERACTIONS, self.interactions), (LOG, self.log)):
            if rows:
                if postgres:
                    insert_json(session, table, rows)
                else:
                    session.connection().execute(insert(table), rows)
                self.statements += 1
                rows.clear()


def current(session: Session) -> BatchRows | None:
    """The collector of the batch this session is running, if any."""
    return session.info.get(KEY)


def write_pending(session: Session) -> None:
    """Insert what has been collected so far (before anything in the transaction reads those tables)."""
    rows = session.info.get(KEY)
    if rows:
        rows.write(session)


@contextmanager
def collecting(session: Session) -> Iterator[BatchRows]:
    """Collect the block's new outbox rows, interactions and log entries; insert them when the block
    ends without an error (a block that raises writes nothing: its transaction rolls back)."""
    if KEY in session.info:  # nested: the outer block writes
        yield session.info[KEY]
        return
    session.info[KEY] = rows = BatchRows()
    try:
        yield rows
        rows.write(session, last=True)
    finally:
        session.info.pop(KEY, None)


@contextmanager
def paused(session: Session) -> Iterator[None]:
    """Write what has been collected, then let the block write through the ORM as usual (code from
    other modules that mixes log entries with set-based statements keeps its order)."""
    rows = session.info.get(KEY)
    if rows is None:
        yield
        return
    rows.write(session)
    del session.info[KEY]
    try:
        yield
    finally:
        session.info[KEY] = rows


def log_row(
    *, organization_id: int, account_id: int, at: Any, event: str, case_number: int | None, stage_index: int | None,
    queue_item_id: int | None, reason: str | None, cause: str | None, details: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "organization_id": organization_id, "account_id": account_id, "at": at, "event": event,
        "case_number": case_number, "stage_index": stage_index, "queue_item_id": queue_item_id,
        "reason": reason, "cause": cause, "details": details,
    }


# --- PostgreSQL: INSERT … SELECT FROM json_to_recordset(one JSON document) ------------------------
# The batch's rows travel as one JSON array (serialized by orjson, six times faster than the
# standard library's encoder, which was a tenth of a worker's time; psycopg's text-array dumping
# escapes every element with a regular expression, which cost more than the insert). The
# values are converted here the way the columns' SQLAlchemy types would convert them: enums to their
# values, aware datetimes to naive UTC (``UTCDateTime``), JSON documents serialized and cast back, so
# ``None`` is the JSON ``null`` the ``JSON`` type writes.


def _plain(value: Any) -> Any:
    """Numbers, booleans and text as they are. Enumerations too: orjson writes an enumeration as its
    value (ours are all ``StrEnum``, whose value is the stored string)."""
    return value


@lru_cache(maxsize=256)  # a batch writes the same few instants (its "now") thousands of times
def _utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given where UTC is required")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat()


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _day(value: date | None) -> str | None:
    return None if value is None else value.isoformat()


def _money(value: Any) -> int | None:
    from duecourse.db.base import money_to_units

    return None if value is None else money_to_units(value)


def _record_type(column: Any) -> tuple[str, str, Callable[[Any], Any]]:
    """(type in the record definition, the SQL of the value with ``{}`` for the record's field, the
    Python conversion; ``_plain`` is none at all)."""
    from duecourse.db.base import Money, UTCDateTime

    if isinstance(column.type, UTCDateTime):
        return "timestamp", "{}", _utc
    if isinstance(column.type, Money):
        return "bigint", "{}", _money
    kind = type(column.type).__name__
    if kind == "Date":
        return "date", "{}", _day
    if kind == "JSON":
        return "text", "CAST({} AS json)", _json
    if kind in ("BigInteger", "Integer", "SmallInteger"):
        return "bigint", "{}", _plain
    if kind == "Boolean":
        return "boolean", "{}", _plain
    if kind in ("String", "Text", "Enum"):
        return "text", "{}", _plain
    raise TypeError(f"{column.table.name}.{column.name}: no record type for {kind}")


_SQL: dict[tuple[str, tuple[str, ...]], tuple[str, list[Callable[[Any], Any]]]] = {}


def insert_json(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys) in one statement, in their order."""
    names = tuple(rows[0])
    key = (table.name, names)
    if key not in _SQL:
        specs = [_record_type(table.c[n]) for n in names]
        cols = ", ".join(f'"{n}"' for n in names)
        record = ", ".join(f'"{n}" {t}' for n, (t, _, _) in zip(names, specs, strict=True))
        selected = ", ".join(e.format(f'v."{n}"') for n, (_, e, _) in zip(names, specs, strict=True))
        _SQL[key] = (
            f"INSERT INTO {table.name} ({cols}) SELECT {selected} "
            f"FROM ROWS FROM (json_to_recordset(%s::json) AS ({record})) WITH ORDINALITY AS v({cols}, _n) "
            "ORDER BY _n",
            [f for _, _, f in specs],
        )
    sql, convert = _SQL[key]
    session.connection().exec_driver_sql(sql, (_json_rows(rows, zip(names, convert, strict=True)),))


def _json_rows(rows: list[dict[str, Any]], conversions: Iterable[tuple[str, Callable[[Any], Any]]]) -> str:
    """The rows as one compact JSON array, each value converted for its column. The dicts are
    converted in place: they were made for this statement and are dropped after it."""
    conversions = list(conversions)
    converted = [(n, f) for n, f in conversions if f is not _plain]
    width = len(conversions)
    for row in rows:
        if len(row) != width:  # every row has exactly the columns of the statement
            raise KeyError(f"row with columns {sorted(row)} for a statement of {[n for n, _ in conversions]}")
        for n, f in converted:
            row[n] = f(row[n])
    return orjson.dumps(rows).decode()


_COLUMN_KEYS: dict[Any, frozenset[str]] = {}


def _changes(state: InstanceState[Any]) -> dict[str, Any] | None:
    """The column attributes set since the object was loaded or last written ({}: none), or None
    when the unit of work must write it (not persistent, or a relationship or expired attribute
    changed)."""
    if state.session_id is None or state.key is None:
        return None
    changed = state.committed_state
    if not state.modified or not changed:
        return {}
    columns = _COLUMN_KEYS.get(state.mapper)
    if columns is None:
        columns = _COLUMN_KEYS[state.mapper] = frozenset(state.mapper.local_table.c.keys())
    values = state.dict
    if not (changed.keys() <= columns and changed.keys() <= values.keys()):
        return None
    return {k: values[k] for k in changed}


def update_changed(session: Session, objects: list[Any], *, postgres: bool, with_tabs: bool = False) -> int:
    """Write the changed columns of ``objects`` (mapped to one table per class, primary key ``id``)
    as one statement per table and set of changed columns, then tell the session they are written.
    Returns the number of statements.

    ``with_tabs`` (PostgreSQL; the batch's last write): accounts waiting for the tab refresh of
    :func:`~duecourse.engine.cases.tabs_refreshed_at_end` get their new tab in the same ``UPDATE``
    (one row version instead of two) and leave that refresh."""
    from duecourse.engine.cases import pending_tab_refresh

    pending = pending_tab_refresh(session) if postgres and with_tabs else None
    groups: dict[tuple[Table, tuple[str, ...], int | None], list[tuple[Any, dict[str, Any]]]] = {}
    written: list[InstanceState[Any]] = []
    for obj in objects:
        state = instance_state(obj)
        changes = _changes(state)
        if changes is None:
            continue  # left to the unit of work
        if changes:
            written.append(state)
            table = obj.__table__
            tab_org = None
            if pending and table is ACCOUNTS and obj.id in pending.get(obj.organization_id, ()) and _tab_rides_along(changes):
                tab_org = obj.organization_id
            groups.setdefault((table, tuple(sorted(changes)), tab_org), []).append((obj, changes))
    for (table, names, tab_org), members in groups.items():
        rows = [{"id": obj.id, **changes} for obj, changes in members]
        if postgres:
            _update_json(session, table, names, rows, tab_org=tab_org)
            if tab_org is not None and pending is not None:
                pending[tab_org].difference_update(r["id"] for r in rows)
        else:
            stmt = update(table).where(table.c.id == bindparam("_id")).values({n: bindparam(n) for n in names})
            # On the connection: through the session, the statement would first flush the batch's
            # objects with the unit of work, writing every change twice.
            session.connection().execute(stmt, [{"_id": r["id"], **{n: r[n] for n in names}} for r in rows])
    # Written: the objects are as clean as after a flush (what the unit of work itself does after
    # writing them; without it the next flush would walk every object of the batch for changes).
    InstanceState._commit_all_states([(st, st.dict) for st in written], session.identity_map)
    return len(groups)


def _tab_rides_along(changes: dict[str, Any]) -> bool:
    """Whether the account's new tab can be computed in the UPDATE that writes ``changes``: its
    expression reads the stored columns, and only the new status is handed to it."""
    from duecourse.ledger.derived import TAB_INPUTS

    return not (TAB_INPUTS - {"status"} | {"collection_tab"}) & changes.keys()


_SA_TYPES = {"timestamp": DateTime(), "bigint": BigInteger(), "date": Date(), "text": Text(), "boolean": Boolean()}


def _update_json(
    session: Session, table: Table, names: tuple[str, ...], rows: list[dict[str, Any]], *, tab_org: int | None = None
) -> None:
    """``UPDATE table SET <names> FROM json_to_recordset(rows) AS v WHERE id = v.id``: one statement.
    With ``tab_org``, the accounts' ``collection_tab`` is recomputed in it, from their new status."""
    specs = [_record_type(table.c[n]) for n in names]
    v = (
        func.json_to_recordset(cast(bindparam("_doc", type_=Text), postgresql.JSON))
        .table_valued(column("id", BigInteger), *[column(n, _SA_TYPES[t]) for n, (t, _, _) in zip(names, specs, strict=True)])
        .render_derived(name="v", with_types=True)
    )
    values: dict[str, Any] = {
        n: cast(v.c[n], postgresql.JSON) if t == "text" and e != "{}" else v.c[n]
        for n, (t, e, _) in zip(names, specs, strict=True)
    }
    if tab_org is not None:
        from duecourse.ledger.derived import tab_expr
        from duecourse.tenancy.service import get_settings

        exclusions = get_settings(session, tab_org).exclusions
        values["collection_tab"] = tab_expr(exclusions, status=v.c.status if "status" in names else None)
    doc = _json_rows(rows, [("id", _plain), *((n, f) for n, (_, _, f) in zip(names, specs, strict=True))])
    session.connection().execute(update(table).values(values).where(table.c.id == v.c.id), {"_doc": doc})

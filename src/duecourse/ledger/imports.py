"""Imports of accounts, invoices and payments from CSV and JSON (SPEC §2, §10).

The shape of one import, all in the caller's transaction:

1. **Stream and validate.** The file is read record by record (:mod:`duecourse.ledger.import_rows`);
   each record is checked in Python and the typed row goes to a staging table in batches
   (PostgreSQL: ``COPY`` into a ``TEMP`` table; SQLite: ``executemany`` into a temp table). Money is
   staged as integer ten-thousandths. Nothing of the file is held in memory beyond one batch.
2. **Check set-based.** What needs the whole file or the database is checked in SQL over the
   staging table: duplicate ``external_id`` within the file, references to accounts and invoices
   (which must already exist in the organization), currencies against the account's, the
   currency's decimal places, and changes an import may not make.
3. **All or nothing.** If any row is bad, :class:`ImportRejected` is raised with the report (first
   errors plus the total count) and the caller's transaction rolls back: nothing changed.
4. **Apply set-based.** ``UPDATE … FROM staging`` only where a value differs (so re-importing the
   same file touches nothing, not even ``updated_at``), ``INSERT … SELECT`` the new rows, then the
   derived values (:func:`duecourse.ledger.derived.refresh_accounts`) and payment allocation for the
   affected accounts only, passed as a ``SELECT`` over a temp table of their ids.

On PostgreSQL a file of accounts or invoices that are all new is first tried on a pipelined path
that overlaps steps 1 and 4 (a writer thread inserts chunk by chunk while the file is still being
read); at the first row it cannot write as new, or any bad row, it rolls back to a savepoint and
the steps above run from the start of the file (see "The pipelined path" below).

Upsert rule: columns absent from the file (or, in JSON, keys absent from an object) keep their
stored value on update and take their default on insert. An empty cell clears an optional value,
except for the columns marked ``empty_is_absent`` in :mod:`import_rows` (currency, invoice number,
amount_paid, status), where it means "not given".
"""

from __future__ import annotations

import contextlib
import io
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import IO, Any

from babel.numbers import get_currency_precision
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    bindparam,
    select,
    text,
)
from sqlalchemy.orm import Session

from duecourse.db.base import MONEY_PLACES, MONEY_SCALE, UTCDateTime
from duecourse.db.dialect import roomy_joins
from duecourse.errors import DomainError, FieldError, NotFound
from duecourse.ledger.allocation import allocate_payments, release_allocations
from duecourse.ledger.derived import refresh_accounts, refresh_accounts_single_pass
from duecourse.ledger.import_rows import (
    COLUMNS,
    MAX_ERRORS,
    CountingReader,
    ErrorLog,
    FileAbort,
    FileFormat,
    ImportKind,
    RowError,
    RowValidator,
    column_bit,
    detect_format,
    read_records,
)
from duecourse.tenancy.models import Organization
from duecourse.tenancy.service import get_settings
from duecourse.validation import _currencies

try:  # psycopg's own COPY text formatter (C), used without a COPY in progress: see _Stager.encode
    from psycopg._copy_base import TextFormatter as _CopyFormatter
    from psycopg.adapt import Transformer as _CopyTransformer
except ImportError:  # pragma: no cover - a psycopg without it: the writer thread formats the rows
    _CopyFormatter = None
    _CopyTransformer = None

BATCH_ROWS = 5000
ANALYZE_AFTER_ROWS = 5000
READ_BUFFER = 1 << 20
STAGE = "import_stage"
STAGE_TAGS = "import_stage_tags"
AFFECTED = "import_affected"

__all__ = [
    "FileFormat",
    "ImportKind",
    "ImportRejected",
    "ImportReport",
    "RowError",
    "run_import",
]


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class ImportReport:
    kind: str
    format: str
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    error_count: int = 0
    errors: list[RowError] = field(default_factory=list)
    applied: bool = False

    @property
    def errors_truncated(self) -> bool:
        return self.error_count > len(self.errors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "format": self.format,
            "rows": self.rows,
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "applied": self.applied,
            "error_count": self.error_count,
            "errors_truncated": self.errors_truncated,
            "errors": [e.as_dict() for e in self.errors],
        }


class ImportRejected(DomainError):
    """The file has bad rows; nothing was imported. Carries the full (capped) report."""

    FIELDS_SHOWN = 100

    def __init__(self, report: ImportReport) -> None:
        n = report.error_count
        message = f"The file has {n} error{'s' if n != 1 else ''}; nothing was imported"
        fields = [
            FieldError(_field_name(e), e.message + (f" (value {e.value!r})" if e.value is not None else ""))
            for e in report.errors[: self.FIELDS_SHOWN]
        ]
        super().__init__(message, fields, 422, "import_rejected")
        self.report = report

    def as_dict(self) -> dict[str, object]:
        out = super().as_dict()
        out["report"] = self.report.as_dict()
        return out


def _field_name(e: RowError) -> str:
    parts = [f"row {e.row}" if e.row is not None else (f"line {e.line}" if e.line is not None else "file")]
    if e.column:
        parts.append(e.column)
    return ".".join(parts)


ProgressFn = Callable[[int, int], None]  # (bytes read, rows read)


# --------------------------------------------------------------------------------------------
# Staging tables (a private MetaData: they never appear in migrations)

_meta = MetaData()


def _stage_columns(kind: ImportKind) -> list[Column[Any]]:
    types: dict[str, Any] = {
        "external_id": String(100),
        "account_external_id": String(100),
        "invoice_external_id": String(100),
        "name": String(200),
        "email": String(320),
        "phone": String(20),
        "whatsapp": String(20),
        "timezone": String(64),
        "language": String(16),
        "currency": String(3),
        "score": SmallInteger(),
        "tags": Integer(),  # staged as the number of tags; the tags go to import_stage_tags
        "blocked_reason": String(500),
        "number": String(100),
        "total": BigInteger(),
        "amount_paid": BigInteger(),
        "amount": BigInteger(),
        "issue_date": Date(),
        "due_date": Date(),
        "paid_on": Date(),
        "status": String(8),
        "reference": String(200),
    }
    cols: list[Column[Any]] = [
        Column("row_no", Integer, nullable=False),
        Column("line_no", Integer),
        Column("present", Integer, nullable=False),
    ]
    for c in COLUMNS[kind]:
        cols.append(Column(c.name, types.get(c.name, Boolean())))
    extra: dict[ImportKind, list[Column[Any]]] = {
        # new_id (PostgreSQL): the id a new account will get, drawn from the accounts' sequence as
        # the row is copied in (a column default), so its tags need no join back by external_id.
        ImportKind.accounts: [Column("target_id", BigInteger), Column("changed", Boolean), Column("new_id", BigInteger)],
        ImportKind.invoices: [
            Column("account_id", BigInteger),
            Column("account_currency", String(3)),
            Column("target_id", BigInteger),
            Column("old_account_id", BigInteger),
            Column("allocated", BigInteger),
            Column("changed", Boolean),
        ],
        ImportKind.payments: [
            Column("account_id", BigInteger),
            Column("account_currency", String(3)),
            Column("invoice_id", BigInteger),
            Column("invoice_account_id", BigInteger),
            Column("target_id", BigInteger),
            Column("changed", Boolean),
        ],
    }
    return cols + extra[kind]


@lru_cache
def _tables(kind: ImportKind, dialect: str) -> tuple[Table, Table, Table]:
    meta = MetaData()
    kw: dict[str, Any] = {"prefixes": ["TEMPORARY"]}
    if dialect == "postgresql":
        kw["postgresql_on_commit"] = "DROP"
    stage = Table(f"{STAGE}", meta, *_stage_columns(kind), **kw)
    tags = Table(
        STAGE_TAGS, meta, Column("row_no", Integer, nullable=False), Column("tag", String(64), nullable=False), **kw
    )
    # The primary key matters: the refresh statements filter accounts by ``id IN (SELECT account_id
    # FROM import_affected)``, and when PostgreSQL underestimates the accounts side (statistics taken
    # before the balances changed) it picks a nested loop, which without this index scans the whole
    # temp table once per account.
    affected = Table(AFFECTED, meta, Column("account_id", BigInteger, primary_key=True, autoincrement=False), **kw)
    return stage, tags, affected


class _Stager:
    """Writes validated rows to the staging tables of one dialect."""

    def __init__(self, session: Session, kind: ImportKind) -> None:
        self.session = session
        self.kind = kind
        self.dialect = session.get_bind().dialect.name
        self.stage, self.tags, self.affected = _tables(kind, self.dialect)
        conn = session.connection()
        for t in (self.stage, self.tags, self.affected):
            if self.dialect == "sqlite":
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{t.name}")
            t.create(conn)
        if kind is ImportKind.accounts and self.dialect == "postgresql":
            seq = conn.exec_driver_sql("SELECT pg_get_serial_sequence('accounts', 'id')").scalar_one()
            conn.exec_driver_sql(f"ALTER TABLE {STAGE} ALTER COLUMN new_id SET DEFAULT nextval('{seq}'::regclass)")
        self.driver = conn.connection.driver_connection
        self.names = [c.name for c in COLUMNS[kind]]
        staged = ["row_no", "line_no", "present", *self.names]
        self.tag_pos = staged.index("tags") if kind is ImportKind.accounts else None
        self.copy_sql = f"COPY {STAGE} ({', '.join(staged)}) FROM STDIN"
        self.insert_sql = f"INSERT INTO {STAGE} ({', '.join(staged)}) VALUES ({', '.join('?' * len(staged))})"
        self.date_pos = [i for i, c in enumerate(staged) if c in ("issue_date", "due_date", "paid_on")]
        # For encode(): made here, in the connection's thread, with a dumper for every type a staged
        # row holds (the text dumper reads the connection's encoding when it is made), so that the
        # reading thread never touches the connection the writer thread is using.
        # (psycopg's formatter is not public API: if it ever changes shape, the writer formats.)
        self.copy_tx: Any = None
        if _CopyFormatter is not None and _CopyTransformer is not None and self.dialect == "postgresql":
            with contextlib.suppress(TypeError, AttributeError):
                tx = _CopyTransformer.from_context(self.driver)
                _CopyFormatter(tx).write_row(("", 0, True, date(2000, 1, 1), None))
                self.copy_tx = tx

    def _split_tags(self, batch: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
        """Accounts: the staged rows (the tags column holds their number) and the (row_no, tag) rows."""
        tag_rows: list[tuple[int, str]] = []
        if self.tag_pos is None:
            return batch, tag_rows
        p = self.tag_pos
        rows = []
        for r in batch:
            tags = r[p]
            if tags:
                tag_rows.extend((r[0], t) for t in tags)
            rows.append((*r[:p], len(tags), *r[p + 1 :]))
        return rows, tag_rows

    def encode(self, batch: list[tuple[Any, ...]]) -> tuple[bytes, bytes] | None:
        """PostgreSQL: the batch as the text of its two ``COPY``s (staging rows, tags), formatted by
        psycopg's own formatter; ``None`` if that formatter is not available.

        The pipelined path calls this in the reading thread, so that the writer thread only sends
        bytes: formatting row by row in the writer made it take turns with the reader for the GIL
        (each wait for the socket gives the GIL away, and getting it back from a busy thread costs
        up to the interpreter's switch interval), which kept the database waiting."""
        if self.copy_tx is None:
            return None
        rows, tag_rows = self._split_tags(batch)
        out = []
        for part in (rows, tag_rows):
            formatter = _CopyFormatter(self.copy_tx)
            chunks = [b for r in part if (b := formatter.write_row(r))]
            chunks.append(formatter.end())
            out.append(b"".join(chunks))
        return out[0], out[1]

    def write_encoded(self, data: bytes, tag_data: bytes) -> None:
        """Send a batch :meth:`encode` formatted (PostgreSQL)."""
        with self.driver.cursor() as cur:
            with cur.copy(self.copy_sql) as copy:
                copy.write(data)
            if tag_data:
                with cur.copy(f"COPY {STAGE_TAGS} (row_no, tag) FROM STDIN") as copy:
                    copy.write(tag_data)

    def write(self, batch: list[tuple[Any, ...]]) -> None:
        batch, tag_rows = self._split_tags(batch)
        if self.dialect == "postgresql":
            with self.driver.cursor() as cur:
                with cur.copy(self.copy_sql) as copy:
                    for r in batch:
                        copy.write_row(r)
                if tag_rows:
                    with cur.copy(f"COPY {STAGE_TAGS} (row_no, tag) FROM STDIN") as copy:
                        for r in tag_rows:
                            copy.write_row(r)
        else:
            if self.date_pos:
                pos = self.date_pos
                batch = [tuple(v.isoformat() if i in pos and v is not None else v for i, v in enumerate(r)) for r in batch]
            cur = self.driver.cursor()
            try:
                cur.executemany(self.insert_sql, batch)
                if tag_rows:
                    cur.executemany(f"INSERT INTO {STAGE_TAGS} (row_no, tag) VALUES (?, ?)", tag_rows)
            finally:
                cur.close()

    def finish_loading(self) -> None:
        conn = self.session.connection()
        if self.dialect == "postgresql":
            conn.exec_driver_sql(f"CREATE INDEX ON {STAGE_TAGS} (row_no)")
            conn.exec_driver_sql(f"ANALYZE {STAGE}")
            conn.exec_driver_sql(f"ANALYZE {STAGE_TAGS}")
        else:
            conn.exec_driver_sql(f"CREATE INDEX temp.ix_{STAGE}_row ON {STAGE} (row_no)")
            conn.exec_driver_sql(f"CREATE INDEX temp.ix_{STAGE}_ext ON {STAGE} (external_id)")
            conn.exec_driver_sql(f"CREATE INDEX temp.ix_{STAGE_TAGS}_row ON {STAGE_TAGS} (row_no)")
            if self.kind is not ImportKind.accounts:
                conn.exec_driver_sql(f"CREATE INDEX temp.ix_{STAGE}_acc ON {STAGE} (account_id)")

    def drop(self) -> None:
        if self.dialect == "sqlite":  # PostgreSQL drops them at commit or rollback (ON COMMIT DROP)
            conn = self.session.connection()
            for t in (self.stage, self.tags, self.affected):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{t.name}")


# --------------------------------------------------------------------------------------------
# SQL helpers


class _Sql:
    """Small dialect differences of the set-based statements, and the parameters they share."""

    def __init__(self, session: Session, kind: ImportKind, organization_id: int, now: datetime) -> None:
        self.session = session
        self.kind = kind
        self.pg = session.get_bind().dialect.name == "postgresql"
        self.params: dict[str, Any] = {"org": organization_id}
        self.now = now

    def ne(self, a: str, b: str) -> str:
        """Null-safe 'differs'."""
        return f"({a} IS DISTINCT FROM {b})" if self.pg else f"({a} IS NOT {b})"

    def has(self, column: str, alias: str = "s") -> str:
        return f"(({alias}.present & {column_bit(self.kind, column)}) <> 0)"

    def pick(self, column: str, stored: str | None = None) -> str:
        """The value after the upsert: the file's when the column was given, else the stored one
        (``t.column``, or the SQL ``stored``)."""
        return f"CASE WHEN {self.has(column)} THEN s.{column} ELSE {stored or 't.' + column} END"

    def analyze(self, table: str, changed_rows: int | None = None) -> None:
        """PostgreSQL plans the joins that follow from statistics, and rows this transaction just
        bulk-wrote are unknown to them until ANALYZE (which samples our own uncommitted rows)."""
        if self.pg and (changed_rows is None or changed_rows >= ANALYZE_AFTER_ROWS):
            self.session.execute(text(f"ANALYZE {table}"))

    def exec(self, sql: str, **params: Any) -> Any:
        stmt = text(sql)
        if ":now" in sql:
            stmt = stmt.bindparams(bindparam("now", type_=UTCDateTime()))
        return self.session.execute(stmt, {**self.params, "now": self.now, **params})

    def errors(self, sql: str, errors: ErrorLog, column: str | None, build: Callable[[Any], tuple[str, str | None]]) -> None:
        """Run a check ``SELECT s.row_no, detail…, COUNT(*) OVER () FROM stage s …`` and log the first
        rows (``build`` gets ``(row_no, detail…)``); the file line is added here."""
        head = "SELECT s.row_no, "
        assert sql.lstrip().startswith(head)
        sql = sql.lstrip().replace(head, head + "s.line_no, ", 1)
        rows = self.exec(sql + " ORDER BY s.row_no LIMIT :cap", cap=errors.cap).all()
        if not rows:
            return
        total = rows[0][-1]
        for r in rows:
            message, value = build((r[0], *r[2:]))
            errors.add(r[0], r[1], column, message, value)
        errors.total += total - len(rows)  # the ones beyond the cap still count


@lru_cache
def _divisor_case(expr: str) -> str:
    """SQL: units per smallest currency unit of the currency in ``expr`` (100 for EUR, 10000 for JPY)."""
    whens = []
    for code in sorted(_currencies()):
        places = min(get_currency_precision(code), MONEY_PLACES)
        if places != 2:
            whens.append(f"WHEN '{code}' THEN {10 ** (MONEY_PLACES - places)}")
    return f"(CASE {expr} {' '.join(whens)} ELSE {10 ** (MONEY_PLACES - 2)} END)"


def _places_case(expr: str) -> str:
    whens = []
    for code in sorted(_currencies()):
        places = min(get_currency_precision(code), MONEY_PLACES)
        if places != 2:
            whens.append(f"WHEN '{code}' THEN {places}")
    return f"(CASE {expr} {' '.join(whens)} ELSE 2 END)"


def _money(units: int) -> str:
    from decimal import Decimal

    return str((Decimal(units) / MONEY_SCALE).normalize())


# --------------------------------------------------------------------------------------------
# Per-kind checks and apply


def _check_duplicates(sql: _Sql, errors: ErrorLog) -> None:
    sql.errors(
        f"""SELECT s.row_no, s.external_id, d.first_row, COUNT(*) OVER ()
            FROM {STAGE} s JOIN (
                SELECT external_id, MIN(row_no) AS first_row FROM {STAGE}
                GROUP BY external_id HAVING COUNT(*) > 1
            ) d ON d.external_id = s.external_id
            WHERE s.row_no > d.first_row""",
        errors,
        "external_id",
        lambda r: (f"duplicate external_id in this file (first on row {r[2]})", r[1]),
    )


def _check_account_ref(sql: _Sql, errors: ErrorLog) -> None:
    sql.errors(
        f"SELECT s.row_no, s.account_external_id, COUNT(*) OVER () FROM {STAGE} s WHERE s.account_id IS NULL",
        errors,
        "account_external_id",
        lambda r: ("no account with this external_id in the organization (import the accounts first)", r[1]),
    )


def _check_currency(sql: _Sql, errors: ErrorLog) -> None:
    sql.errors(
        f"""SELECT s.row_no, s.currency, s.account_currency, COUNT(*) OVER () FROM {STAGE} s
            WHERE s.account_id IS NOT NULL AND s.currency IS NOT NULL AND s.currency <> s.account_currency""",
        errors,
        "currency",
        lambda r: (f"differs from the account's currency ({r[2]})", r[1]),
    )


def _check_places(sql: _Sql, errors: ErrorLog, column: str, only_if_present: bool = False) -> None:
    # Rows that name their currency were checked in Python (import_rows); here the ones taking the
    # account's currency (whatever they name, a different one is reported by _check_currency).
    cur = "s.account_currency"
    cond = f"s.currency IS NULL AND s.{column} % {_divisor_case(cur)} <> 0"
    if only_if_present:
        cond = f"{sql.has(column)} AND {cond}"
    sql.errors(
        f"""SELECT s.row_no, s.{column}, s.account_currency, {_places_case(cur)}, COUNT(*) OVER () FROM {STAGE} s
            WHERE s.account_id IS NOT NULL AND {cond}""",
        errors,
        column,
        lambda r: (f"has more than {r[3]} decimal places for {r[2]}", _money(r[1])),
    )


def _resolve_accounts_of_rows(sql: _Sql) -> None:
    sql.exec(
        f"""UPDATE {STAGE} AS s SET account_id = a.id, account_currency = a.currency
            FROM accounts AS a
            WHERE a.organization_id = :org AND a.external_id = s.account_external_id"""
    )


# accounts ------------------------------------------------------------------------------------

_ACCOUNT_FIELDS = (
    "name",
    "email",
    "phone",
    "whatsapp",
    "timezone",
    "language",
    "currency",
    "score",
    "opt_out_email",
    "opt_out_sms",
    "opt_out_whatsapp",
    "opt_out_voice",
    "blocked",
    "blocked_reason",
    "paused",
)


def _accounts_check(sql: _Sql, errors: ErrorLog) -> None:
    _check_duplicates(sql, errors)
    sql.exec(
        f"""UPDATE {STAGE} AS s SET target_id = t.id FROM accounts AS t
            WHERE t.organization_id = :org AND t.external_id = s.external_id"""
    )
    sql.errors(
        f"""SELECT s.row_no, s.currency, t.currency, COUNT(*) OVER () FROM {STAGE} s
            JOIN accounts t ON t.id = s.target_id
            WHERE s.currency IS NOT NULL AND s.currency <> t.currency
              AND (EXISTS (SELECT 1 FROM invoices i WHERE i.account_id = t.id)
                   OR EXISTS (SELECT 1 FROM payments p WHERE p.account_id = t.id))""",
        errors,
        "currency",
        lambda r: (f"cannot change from {r[2]}: the account already has invoices or payments in {r[2]}", r[1]),
    )
    # A blocked account has a reason, and only a blocked one (SPEC §2, as in the API), judged on the
    # account as the row leaves it: a column the row leaves out keeps the stored value.
    blocked = _after_row(sql, "blocked")
    reason = _after_row(sql, "blocked_reason", _stored_reason())
    sql.errors(
        f"""SELECT s.row_no, COUNT(*) OVER () FROM {STAGE} s LEFT JOIN accounts t ON t.id = s.target_id
            WHERE {blocked} AND {reason} IS NULL""",
        errors,
        "blocked_reason",
        lambda r: ("is required when the account is blocked", None),
    )
    sql.errors(
        f"""SELECT s.row_no, s.blocked_reason, COUNT(*) OVER () FROM {STAGE} s LEFT JOIN accounts t ON t.id = s.target_id
            WHERE s.blocked_reason IS NOT NULL AND NOT {blocked}""",
        errors,
        "blocked_reason",
        lambda r: ("only a blocked account has a reason", r[1]),
    )


def _stored_reason() -> str:
    """SQL: the stored account's reason, if it is blocked (as in the API, a new block needs its own
    reason, whatever an earlier block left behind)."""
    return "(CASE WHEN t.blocked THEN t.blocked_reason END)"


def _after_row(sql: _Sql, f: str, stored: str | None = None) -> str:
    """SQL: the account's ``f`` once the staged row ``s`` is applied to the stored account ``t``
    (``t`` is NULL for a new account: the row's value, or the column's default; ``stored``: what
    the stored account contributes, if not ``t.f``)."""
    return f"(CASE WHEN {sql.has(f)} OR t.id IS NULL THEN s.{f} ELSE {stored or 't.' + f} END)"


# Opt-outs only ever go one way in an import: a file can opt an account out of a channel, never
# back in. The debtor's own opt-out (a STOP reply, an unsubscribe link) is not in the
# organization's systems, and the next export from them would otherwise undo it (§4.7). Clearing
# an opt-out is a deliberate act on the account (API or account page).
_ONE_WAY = ("opt_out_email", "opt_out_sms", "opt_out_whatsapp", "opt_out_voice")
# A new address is a new chance: the flag a bounce or a failed number set on the old one goes.
_INVALID_FLAG = {"email": "email_invalid", "phone": "phone_invalid", "whatsapp": "whatsapp_invalid"}


def _account_differs(sql: _Sql, f: str) -> str:
    if f in _ONE_WAY:
        return f"({sql.has(f)} AND s.{f} AND NOT t.{f})"
    return f"({sql.has(f)} AND {sql.ne('t.' + f, 's.' + f)})"


def _account_set(sql: _Sql, f: str) -> str:
    if f in _ONE_WAY:
        return f"{f} = (t.{f} OR ({sql.has(f)} AND s.{f}))"
    if f == "blocked_reason":  # unblocking clears the reason
        return f"{f} = CASE WHEN {sql.pick('blocked')} THEN {sql.pick(f, _stored_reason())} END"
    return f"{f} = {sql.pick(f)}"


def _accounts_apply(sql: _Sql, report: ImportReport, base_currency: str) -> None:
    tags_differ = f"""(
        (SELECT COUNT(*) FROM account_tags g WHERE g.account_id = t.id) <> s.tags
        OR EXISTS (SELECT 1 FROM {STAGE_TAGS} st WHERE st.row_no = s.row_no AND NOT EXISTS (
            SELECT 1 FROM account_tags g WHERE g.account_id = t.id AND g.tag = st.tag)))"""
    differs = " OR ".join(
        [_account_differs(sql, f) for f in _ACCOUNT_FIELDS] + [f"({sql.has('tags')} AND {tags_differ})"]
    )
    sql.exec(f"UPDATE {STAGE} AS s SET changed = TRUE FROM accounts AS t WHERE t.id = s.target_id AND ({differs})")
    sets = ", ".join(
        [_account_set(sql, f) for f in _ACCOUNT_FIELDS]
        + [f"{flag} = CASE WHEN {sql.has(address)} AND {sql.ne('t.' + address, 's.' + address)} THEN FALSE "
           f"ELSE t.{flag} END" for address, flag in _INVALID_FLAG.items()]
    )
    report.updated = sql.exec(
        f"UPDATE accounts AS t SET {sets}, updated_at = :now FROM {STAGE} AS s WHERE s.changed AND t.id = s.target_id"
    ).rowcount
    # A new account has no invoices yet (they can only refer to it once it exists), so its derived
    # values are known: zero balance, no carrying invoice, no tab, and the status refresh_accounts
    # gives an 'unassigned' account with nothing owed: 'resolved' (silently: it never had a case).
    # Writing them directly saves three full-row UPDATEs per new account (a million accounts: about
    # a minute on PostgreSQL); tests/test_imports.py checks refresh_accounts finds nothing to change.
    # PostgreSQL: the ids were drawn when the rows were staged (new_id), see _stage_columns.
    ids = ("id, ", "s.new_id, ") if sql.pg else ("", "")
    report.inserted = sql.exec(
        f"""INSERT INTO accounts (
                {ids[0]}organization_id, external_id, {", ".join(_ACCOUNT_FIELDS)},
                on_stop, status, case_number, case_retry_count, case_sequence_finished,
                balance, gross_open, created_at, updated_at)
            SELECT {ids[1]}:org, s.external_id, {", ".join("COALESCE(s.currency, :base)" if f == "currency" else "s." + f for f in _ACCOUNT_FIELDS)},
                FALSE, 'resolved', 0, 0, FALSE, 0, 0, :now, :now
            FROM {STAGE} s WHERE s.target_id IS NULL ORDER BY s.row_no""",
        base=base_currency,
    ).rowcount
    sql.analyze("accounts", report.inserted + report.updated)
    # The accounts to refresh: changed ones (a flag or a tag may move them between tabs).
    sql.exec(f"INSERT INTO {AFFECTED} (account_id) SELECT s.target_id FROM {STAGE} s WHERE s.changed")
    sql.analyze(AFFECTED)
    # Tags of changed accounts whose file row gave tags: drop the ones not in the file, add the new.
    if report.updated:
        sql.exec(
            f"""DELETE FROM account_tags WHERE account_id IN (
                    SELECT s.target_id FROM {STAGE} s WHERE s.changed AND {sql.has('tags')})
                AND NOT EXISTS (
                    SELECT 1 FROM {STAGE} s JOIN {STAGE_TAGS} st ON st.row_no = s.row_no
                    WHERE s.target_id = account_tags.account_id AND st.tag = account_tags.tag)"""
        )
        sql.exec(
            f"""INSERT INTO account_tags (account_id, tag, organization_id)
                SELECT s.target_id, st.tag, :org FROM {STAGE_TAGS} st
                JOIN {STAGE} s ON s.row_no = st.row_no
                WHERE s.changed AND {sql.has('tags')}
                  AND NOT EXISTS (SELECT 1 FROM account_tags g WHERE g.account_id = s.target_id AND g.tag = st.tag)"""
        )
    # Tags of new accounts (a row's tags are distinct: parse_tags).
    if report.inserted:
        if sql.pg:
            new_tags = f"""SELECT s.new_id, st.tag, :org FROM {STAGE_TAGS} st
                JOIN {STAGE} s ON s.row_no = st.row_no WHERE s.target_id IS NULL"""
        else:
            new_tags = f"""SELECT t.id, st.tag, :org FROM {STAGE_TAGS} st
                JOIN {STAGE} s ON s.row_no = st.row_no
                JOIN accounts t ON t.organization_id = :org AND t.external_id = s.external_id
                WHERE s.target_id IS NULL"""
        sql.exec(f"INSERT INTO account_tags (account_id, tag, organization_id) {new_tags}")


# invoices ------------------------------------------------------------------------------------


def _invoices_check(sql: _Sql, errors: ErrorLog) -> None:
    _check_duplicates(sql, errors)
    _resolve_accounts_of_rows(sql)
    # Existing invoices, with what payments recorded in duecourse have allocated to them.
    sql.exec(
        f"""UPDATE {STAGE} AS s SET target_id = t.id, old_account_id = t.account_id,
                allocated = COALESCE(pa.amount, 0)
            FROM invoices AS t LEFT JOIN (
                SELECT invoice_id, SUM(amount) AS amount FROM payment_allocations
                WHERE organization_id = :org GROUP BY invoice_id
            ) pa ON pa.invoice_id = t.id
            WHERE t.organization_id = :org AND t.external_id = s.external_id"""
    )
    _check_account_ref(sql, errors)
    _check_currency(sql, errors)
    _check_places(sql, errors, "total")
    _check_places(sql, errors, "amount_paid", only_if_present=True)
    sql.errors(
        f"""SELECT s.row_no, s.total, {_paid(sql)}, s.allocated, COUNT(*) OVER () FROM {STAGE} s
            JOIN invoices t ON t.id = s.target_id
            WHERE {_paid(sql)} > s.total""",
        errors,
        "total",
        lambda r: (
            f"is less than the amount paid ({_money(r[2])}"
            + (f", of which {_money(r[3])} from payments recorded in duecourse)" if r[3] else ")"),
            _money(r[1]),
        ),
    )


def _paid(sql: _Sql) -> str:
    """amount_paid after the upsert of an existing invoice: the file's plus what duecourse payments
    allocated to it (they are not in the file's figure), or the stored one if the file has none."""
    return f"(CASE WHEN {sql.has('amount_paid')} THEN s.amount_paid + s.allocated ELSE t.amount_paid END)"


def _status(sql: _Sql, paid: str, stored: str | None) -> str:
    """An open invoice whose amount paid reaches its total is paid (as allocation makes it)."""
    given = f"(CASE WHEN s.status = 'open' AND {paid} >= s.total THEN 'paid' ELSE s.status END)"
    if stored is None:
        return given
    kept = f"(CASE WHEN {stored} = 'void' THEN {stored} WHEN {paid} >= s.total THEN 'paid' ELSE 'open' END)"
    return f"(CASE WHEN {sql.has('status')} THEN {given} ELSE {kept} END)"


def _release_voided_and_moved(sql: _Sql) -> None:
    """An invoice the file voids, or moves to another account, gives back what payments recorded in
    duecourse allocated to it: their payments get it back as credit, which the allocation after the
    import places on the debtor's other open invoices (§2), as voiding through the API does.
    Otherwise the payment stayed on an invoice nobody owes any more, and the debtor was dunned for
    money already paid."""
    gives_back = f"""s.allocated > 0 AND (({sql.has('status')} AND s.status = 'void' AND t.status <> 'void')
                                         OR s.account_id <> t.account_id)"""
    released = [r[0] for r in sql.exec(
        f"SELECT s.target_id FROM {STAGE} s JOIN invoices t ON t.id = s.target_id WHERE {gives_back}"
    )]
    if released:
        sql.exec(f"UPDATE {STAGE} AS s SET allocated = 0 FROM invoices AS t WHERE t.id = s.target_id AND {gives_back}")
        release_allocations(sql.session, organization_id=sql.params["org"], now=sql.now, invoice_ids=released)


def _invoices_apply(sql: _Sql, report: ImportReport) -> None:
    _release_voided_and_moved(sql)
    paid = _paid(sql)
    status = _status(sql, paid, "t.status")
    differs = " OR ".join(
        [
            sql.ne("t.account_id", "s.account_id"),
            sql.ne("t.currency", "s.account_currency"),
            "t.total <> s.total",
            "t.issue_date <> s.issue_date",
            "t.due_date <> s.due_date",
            f"t.amount_paid <> {paid}",
            f"t.status <> {status}",
            f"({sql.has('number')} AND t.number <> s.number)",
            # Like opt-outs, a dispute only goes one way in an import: one recorded in duecourse
            # (an agent's call, the API) is not in the organization's file, and dunning a
            # disputed invoice is what must never happen (§2). Clearing it is an act on the invoice.
            f"({sql.has('disputed')} AND s.disputed AND NOT t.disputed)",
        ]
    )
    sql.exec(f"UPDATE {STAGE} AS s SET changed = TRUE FROM invoices AS t WHERE t.id = s.target_id AND ({differs})")
    # SET expressions see the row before the update, so status is computed from the old values.
    report.updated = sql.exec(
        f"""UPDATE invoices AS t SET account_id = s.account_id, currency = s.account_currency, total = s.total,
                issue_date = s.issue_date, due_date = s.due_date, amount_paid = {paid}, status = {status},
                number = {sql.pick("number")}, disputed = (t.disputed OR ({sql.has("disputed")} AND s.disputed)),
                updated_at = :now
            FROM {STAGE} AS s WHERE s.changed AND t.id = s.target_id"""
    ).rowcount
    report.inserted = sql.exec(
        f"""INSERT INTO invoices (organization_id, account_id, external_id, number, currency, total, amount_paid,
                issue_date, due_date, status, disputed, created_at, updated_at)
            SELECT :org, s.account_id, s.external_id, COALESCE(s.number, s.external_id), s.account_currency,
                s.total, s.amount_paid, s.issue_date, s.due_date, {_status(sql, "s.amount_paid", None)},
                s.disputed, :now, :now
            FROM {STAGE} s WHERE s.target_id IS NULL ORDER BY s.row_no"""
    ).rowcount
    moved = (
        f"""UNION
            SELECT s.old_account_id FROM {STAGE} s WHERE s.changed AND s.old_account_id <> s.account_id"""
        if report.updated
        else ""
    )
    sql.exec(
        f"""INSERT INTO {AFFECTED} (account_id)
            SELECT DISTINCT s.account_id FROM {STAGE} s WHERE s.target_id IS NULL OR s.changed {moved}"""
    )
    sql.analyze("invoices", report.inserted + report.updated)
    sql.analyze(AFFECTED)


# payments ------------------------------------------------------------------------------------


def _payments_check(sql: _Sql, errors: ErrorLog) -> None:
    _check_duplicates(sql, errors)
    _resolve_accounts_of_rows(sql)
    sql.exec(
        f"""UPDATE {STAGE} AS s SET invoice_id = i.id, invoice_account_id = i.account_id FROM invoices AS i
            WHERE s.invoice_external_id IS NOT NULL
              AND i.organization_id = :org AND i.external_id = s.invoice_external_id"""
    )
    sql.exec(
        f"""UPDATE {STAGE} AS s SET target_id = p.id FROM payments AS p
            WHERE p.organization_id = :org AND p.external_id = s.external_id"""
    )
    _check_account_ref(sql, errors)
    sql.errors(
        f"""SELECT s.row_no, s.invoice_external_id, COUNT(*) OVER () FROM {STAGE} s
            WHERE s.invoice_external_id IS NOT NULL AND s.invoice_id IS NULL""",
        errors,
        "invoice_external_id",
        lambda r: ("no invoice with this external_id in the organization", r[1]),
    )
    sql.errors(
        f"""SELECT s.row_no, s.invoice_external_id, COUNT(*) OVER () FROM {STAGE} s
            WHERE s.invoice_id IS NOT NULL AND s.account_id IS NOT NULL AND s.invoice_account_id <> s.account_id""",
        errors,
        "invoice_external_id",
        lambda r: ("the invoice belongs to another account", r[1]),
    )
    _check_currency(sql, errors)
    _check_places(sql, errors, "amount")
    # A recorded payment may have been allocated already: the file may not rewrite its money.
    which = f"""CASE
        WHEN {sql.ne('p.account_id', 's.account_id')} THEN 'account_external_id'
        WHEN {sql.ne('p.invoice_id', 's.invoice_id')} THEN 'invoice_external_id'
        WHEN p.amount <> s.amount THEN 'amount'
        WHEN p.currency <> s.account_currency THEN 'currency'
        WHEN p.paid_on <> s.paid_on THEN 'paid_on' END"""
    rows = sql.exec(
        f"""SELECT s.row_no, s.line_no, {which} AS col, COUNT(*) OVER () FROM {STAGE} s
            JOIN payments p ON p.id = s.target_id
            WHERE s.account_id IS NOT NULL AND {which} IS NOT NULL ORDER BY s.row_no LIMIT :cap""",
        cap=errors.cap,
    ).all()
    for r in rows:
        errors.add(
            r[0], r[1], r[2], "differs from the payment already recorded with this external_id; "
            "a recorded payment's account, invoice, amount, currency and date cannot be changed by an import"
        )
    if rows:
        errors.total += rows[0][3] - len(rows)


def _payments_apply(sql: _Sql, report: ImportReport) -> None:
    sql.exec(
        f"""UPDATE {STAGE} AS s SET changed = TRUE FROM payments AS p
            WHERE p.id = s.target_id AND {sql.has('reference')} AND {sql.ne('p.reference', 's.reference')}"""
    )
    report.updated = sql.exec(
        f"UPDATE payments AS t SET reference = s.reference FROM {STAGE} AS s WHERE s.changed AND t.id = s.target_id"
    ).rowcount
    report.inserted = sql.exec(
        f"""INSERT INTO payments (organization_id, account_id, invoice_id, external_id, amount, currency, paid_on,
                source, reference, unallocated, created_at)
            SELECT :org, s.account_id, s.invoice_id, s.external_id, s.amount, s.account_currency, s.paid_on,
                'import', s.reference, s.amount, :now
            FROM {STAGE} s WHERE s.target_id IS NULL ORDER BY s.row_no"""
    ).rowcount
    sql.exec(f"INSERT INTO {AFFECTED} (account_id) SELECT DISTINCT s.account_id FROM {STAGE} s WHERE s.target_id IS NULL")
    sql.analyze("payments", report.inserted)
    sql.analyze(AFFECTED)


# (invoices: ANALYZEd by _invoices_apply already, and again here only if allocation changed them)
_ANALYZE_AFTER = {
    ImportKind.accounts: ("account_tags",),
    ImportKind.invoices: ("accounts",),
    ImportKind.payments: ("accounts", "invoices", "payments", "payment_allocations"),
}

_CHECKS = {ImportKind.accounts: _accounts_check, ImportKind.invoices: _invoices_check, ImportKind.payments: _payments_check}


def _has_credit(sql: _Sql, affected: Any) -> bool:
    """Whether any affected account has payment credit left to allocate (skips the work if not)."""
    return bool(
        sql.exec(
            f"""SELECT 1 FROM payments WHERE organization_id = :org AND unallocated > 0
                AND account_id IN (SELECT account_id FROM {AFFECTED}) LIMIT 1"""
        ).first()
    )


def _after_apply(session: Session, sql: _Sql, stager: _Stager, report: ImportReport) -> None:
    """What follows the writes of either path: allocation and derived values of the affected
    accounts, planner statistics."""
    kind, organization_id, now = sql.kind, sql.params["org"], sql.now
    report.unchanged = report.rows - report.inserted - report.updated
    if report.updated or (report.inserted and kind is not ImportKind.accounts):
        # (a SELECT, not a list: the set can hold a million ids)
        affected = select(stager.affected.c.account_id)
        if kind is not ImportKind.accounts and _has_credit(sql, affected):
            allocate_payments(session, organization_id=organization_id, account_ids=affected, now=now, refresh=False)
            if kind is ImportKind.invoices:
                sql.analyze("invoices", report.inserted + report.updated)
        # One UPDATE when no affected account has a case or pending items (new accounts);
        # otherwise the full refresh, which cancels and logs what resolving requires.
        refresh_args: dict[str, Any] = {
            "organization_id": organization_id,
            "exclusions": get_settings(session, organization_id).exclusions,
            "now": now,
            "account_ids": affected,
        }
        if not refresh_accounts_single_pass(session, **refresh_args):
            refresh_accounts(session, **refresh_args)
    # Leave the planner statistics true to the new data (pages of the account list use them at
    # once; autovacuum may be minutes away, or off).
    changed = report.inserted + report.updated
    for table in _ANALYZE_AFTER[kind]:
        sql.analyze(table, changed)
    report.applied = True


# --------------------------------------------------------------------------------------------
# The pipelined path (PostgreSQL): new rows only, written while the file is still being read
#
# The general path validates the whole file, then checks and writes it set-based; Python and
# PostgreSQL take turns, and on two cores one of them always waits. For the common bulk load --
# accounts or invoices that are all new, with no bad row -- this path overlaps them: the calling
# thread reads, validates and formats each batch as the text of its COPY (_Stager.encode), and a
# writer thread, on the same connection and transaction, sends that text to the staging tables and
# every PIPELINE_CHUNK_ROWS rows inserts the chunk into the live tables (libpq waits release the
# GIL; the writer does almost no Python work of its own, so the database is rarely kept waiting
# while the writer waits for the GIL). Each chunk's INSERT only writes rows the general path
# would accept as new: an existing row or a duplicate within the file fails it on the unique
# external id; for accounts a blocked row without a reason (or an unblocked one with one), and for
# invoices the account lookup and the currency and decimal-places rules, are left out by its
# WHERE. So if a chunk's INSERT fails or writes fewer rows than the chunk holds, or Python finds a
# bad row, the whole attempt is rolled back to a savepoint and the general path runs from the start
# of the file, producing exactly its own result or report. A successful run writes exactly what
# the general path writes for the same file.

PIPELINE_CHUNK_ROWS = 25_000
# Batches validated ahead of the writer (memory stays bounded): enough for the reader to keep
# going while the writer inserts a chunk. A batch is queued as its COPY text (~0.7 MB for 5,000
# accounts), or as its rows (several MB) if psycopg's formatter is not available.
PIPELINE_QUEUE_BATCHES = 10
_PIPELINED = (ImportKind.accounts, ImportKind.invoices)


def _start_position(stream: IO[bytes]) -> int | None:
    """Where the file starts, if the stream can go back there (for the pipelined path's fallback)."""
    try:
        return stream.tell() if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


class _NotNewOnly(Exception):
    """A chunk held rows the pipelined path does not write; the general path takes over."""


class _ChunkWriter(threading.Thread):
    """The writer thread of the pipelined path: staging COPY and chunk INSERTs, raw driver only."""

    def __init__(self, stager: _Stager, sql: _Sql, base_currency: str) -> None:
        super().__init__(name="import-writer", daemon=True)
        self.stager = stager
        self.kind = sql.kind
        # a batch: its rows, or (PostgreSQL with psycopg's formatter) the text of its COPYs and its size
        self.batches: queue.Queue[list[tuple[Any, ...]] | tuple[bytes, bytes, int] | None] = queue.Queue(
            PIPELINE_QUEUE_BATCHES
        )
        self.params = {"org": sql.params["org"], "now": sql.now.replace(tzinfo=None), "base": base_currency}
        self.insert_sql = _chunk_insert_sql(sql)
        self.failed: BaseException | None = None
        self.inserted = 0

    def run(self) -> None:
        pending = 0
        batch: list[tuple[Any, ...]] | tuple[bytes, bytes, int] | None = []
        try:
            while (batch := self.batches.get()) is not None:
                if isinstance(batch, tuple):
                    self.stager.write_encoded(batch[0], batch[1])
                    pending += batch[2]
                else:
                    self.stager.write(batch)
                    pending += len(batch)
                if pending >= PIPELINE_CHUNK_ROWS:
                    self._apply(pending)
                    pending = 0
            if pending:
                self._apply(pending)
        except BaseException as exc:  # reported to the reading thread, which falls back
            self.failed = exc
            while batch is not None:  # let the reader finish putting, up to its final None
                batch = self.batches.get()

    def _apply(self, rows: int) -> None:
        with self.stager.driver.cursor() as cur:
            if self.kind is ImportKind.accounts:
                cur.execute(self.insert_sql, self.params)
                written = cur.rowcount
                if written == rows:
                    cur.execute(
                        f"""INSERT INTO account_tags (account_id, tag, organization_id)
                            SELECT s.new_id, st.tag, %(org)s FROM {STAGE_TAGS} st
                            JOIN {STAGE} s ON s.row_no = st.row_no""",
                        self.params,
                    )
            else:
                cur.execute(self.insert_sql, self.params)
                row = cur.fetchone()
                written = row[0] if row else 0
            if written != rows:
                raise _NotNewOnly
            self.inserted += written
            cur.execute(f"TRUNCATE {STAGE}, {STAGE_TAGS}")


def _chunk_insert_sql(sql: _Sql) -> str:
    """The INSERT of one staged chunk (psycopg parameters); see the section comment."""
    fields = _ACCOUNT_FIELDS
    if sql.kind is ImportKind.accounts:
        values = ", ".join("COALESCE(s.currency, %(base)s)" if f == "currency" else "s." + f for f in fields)
        return f"""INSERT INTO accounts (
                id, organization_id, external_id, {", ".join(fields)},
                on_stop, status, case_number, case_retry_count, case_sequence_finished,
                balance, gross_open, created_at, updated_at)
            SELECT s.new_id, %(org)s, s.external_id, {values},
                FALSE, 'resolved', 0, 0, FALSE, 0, 0, %(now)s, %(now)s
            FROM {STAGE} s WHERE s.blocked = (s.blocked_reason IS NOT NULL) ORDER BY s.row_no"""
    # Invoices: the account by external id (an index probe per row: OFFSET 0 keeps the lateral
    # subquery from being flattened into a join that would read all of the organization's accounts
    # for every chunk); rows the general path would reject are left out, so the count tells.
    divisor = _divisor_case("a.currency")
    places_ok = f"""(s.currency IS NOT NULL OR (MOD(s.total, {divisor}) = 0
        AND NOT ({sql.has('amount_paid')} AND MOD(s.amount_paid, {divisor}) <> 0)))"""
    status = _status(sql, "s.amount_paid", None)
    return f"""WITH ins AS (
            INSERT INTO invoices (organization_id, account_id, external_id, number, currency, total, amount_paid,
                issue_date, due_date, status, disputed, created_at, updated_at)
            SELECT %(org)s, a.id, s.external_id, COALESCE(s.number, s.external_id), a.currency,
                s.total, s.amount_paid, s.issue_date, s.due_date, {status}, s.disputed, %(now)s, %(now)s
            FROM {STAGE} s
            JOIN LATERAL (
                SELECT a.id, a.currency FROM accounts a
                WHERE a.organization_id = %(org)s AND a.external_id = s.account_external_id OFFSET 0
            ) a ON TRUE
            WHERE (s.currency IS NULL OR s.currency = a.currency) AND {places_ok}
            ORDER BY s.row_no
            RETURNING account_id
        ), affected AS (
            INSERT INTO {AFFECTED} (account_id) SELECT DISTINCT account_id FROM ins ON CONFLICT DO NOTHING
        )
        SELECT COUNT(*) FROM ins"""


def _encoded(stager: _Stager, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]] | tuple[bytes, bytes, int]:
    """What the reading thread queues for the writer: the batch's COPY text if it can format it."""
    encoded = stager.encode(batch)
    return batch if encoded is None else (*encoded, len(batch))


# While the pipelined path runs, the reading thread hands the GIL over every half millisecond
# instead of Python's default 5 ms: the writer thread needs it only for a moment to send the next
# batch, and the database, the bottleneck, otherwise sat idle waiting for that moment (a million
# accounts and three million invoices: 60 s instead of 70 s on PostgreSQL, same CPU). The interval
# is process-wide; it is restored when the last pipelined import in the process ends.
PIPELINE_SWITCH_INTERVAL = 0.0005
_handoff_lock = threading.Lock()
_handoff_users = 0
_handoff_saved = 0.0


@contextlib.contextmanager
def _quick_gil_handoff() -> Iterator[None]:
    global _handoff_users, _handoff_saved
    with _handoff_lock:
        if _handoff_users == 0:
            _handoff_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_handoff_saved, PIPELINE_SWITCH_INTERVAL))
        _handoff_users += 1
    try:
        yield
    finally:
        with _handoff_lock:
            _handoff_users -= 1
            if _handoff_users == 0:
                sys.setswitchinterval(_handoff_saved)


def _run_pipelined(
    session: Session,
    kind: ImportKind,
    org: Organization,
    buffered: io.BufferedReader,
    counting: CountingReader,
    file_format: FileFormat,
    report: ImportReport,
    now: datetime,
    progress: ProgressFn | None,
    batch_rows: int,
) -> bool:
    """The pipelined import (see the section comment). True if it imported the file; False if it
    rolled back to where it started and the general path must run."""
    savepoint = session.begin_nested()
    try:
        stager = _Stager(session, kind)
        sql = _Sql(session, kind, org.id, now)
        errors = ErrorLog(1)  # any error sends the file to the general path, which reports them all
        validate = RowValidator(kind, errors)
        writer = _ChunkWriter(stager, sql, org.base_currency)
        row = 0
        with _quick_gil_handoff():
            writer.start()
            try:
                batch: list[tuple[Any, ...]] = []
                for row, line, record in read_records(buffered, kind, file_format, errors, validate.use_header):
                    staged = None if record is None else validate(row, line, record)
                    if staged is None:
                        break
                    batch.append(staged)
                    if len(batch) >= batch_rows:
                        writer.batches.put(_encoded(stager, batch))
                        batch = []
                        if writer.failed is not None:
                            break
                        if progress:
                            progress(counting.bytes_read, row)
                else:
                    if batch:
                        writer.batches.put(_encoded(stager, batch))
            except FileAbort:
                pass
            finally:
                writer.batches.put(None)
                writer.join()
        if errors or writer.failed is not None:
            if writer.failed is not None and not isinstance(writer.failed, Exception):
                raise writer.failed  # KeyboardInterrupt, SystemExit
            # (a database error in the writer -- a row that already exists, say -- falls back too:
            # the general path reports bad rows, or raises the error again if it is not about them)
            savepoint.rollback()
            return False
        report.rows = row
        report.inserted = writer.inserted
        if progress:
            progress(counting.bytes_read, row)
        sql.analyze(kind.value, report.inserted)
        sql.analyze(AFFECTED)
        savepoint.commit()
    except BaseException:
        if savepoint.is_active:
            savepoint.rollback()
        raise
    _after_apply(session, sql, stager, report)
    return True


# --------------------------------------------------------------------------------------------
# The operation


def _lock(session: Session, organization_id: int) -> None:
    """Imports into one organization run one at a time (SQLite serializes writers anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(7454, :org)"), {"org": organization_id})
    roomy_joins(session)  # joins over millions of staged rows


def run_import(
    session: Session,
    *,
    organization_id: int,
    kind: ImportKind | str,
    stream: IO[bytes],
    now: datetime,
    fmt: FileFormat | str | None = None,
    filename: str | None = None,
    progress: ProgressFn | None = None,
    max_errors: int = MAX_ERRORS,
    batch_rows: int = BATCH_ROWS,
) -> ImportReport:
    """Import one file of accounts, invoices or payments into the organization (SPEC §2).

    Upserts by ``external_id``; all or nothing: raises :class:`ImportRejected` (with the report) if
    any row is bad, leaving the caller to roll back. Never commits.
    """
    kind = ImportKind(kind)
    org = session.get(Organization, organization_id)
    if org is None:
        raise NotFound("Organization")
    start = _start_position(stream)
    counting = CountingReader(stream)
    buffered = io.BufferedReader(counting, READ_BUFFER)
    file_format = FileFormat(fmt) if fmt else detect_format(buffered.peek(64)[:64], filename)
    report = ImportReport(kind=kind.value, format=file_format.value)
    errors = ErrorLog(max_errors)
    now = now.astimezone(UTC)

    _lock(session, organization_id)
    session.flush()
    if start is not None and kind in _PIPELINED and session.get_bind().dialect.name == "postgresql":
        done = _run_pipelined(
            session, kind, org, buffered, counting, file_format, report, now, progress, batch_rows
        )
        if done:
            return report
        # Not a load of new rows only, or a bad row somewhere: the general path reads the file
        # again, checks it whole and reports every error.
        stream.seek(start)
        counting = CountingReader(stream)
        buffered = io.BufferedReader(counting, READ_BUFFER)
        report = ImportReport(kind=kind.value, format=file_format.value)
    stager = _Stager(session, kind)
    try:
        validate = RowValidator(kind, errors)
        batch: list[tuple[Any, ...]] = []
        row = 0
        try:
            for row, line, record in read_records(buffered, kind, file_format, errors, validate.use_header):
                if record is None:
                    continue
                staged = validate(row, line, record)
                if staged is not None:
                    batch.append(staged)
                    if len(batch) >= batch_rows:
                        stager.write(batch)
                        batch.clear()
                        if progress:
                            progress(counting.bytes_read, row)
        except FileAbort:
            pass
        if batch:
            stager.write(batch)
        report.rows = row
        if progress:
            progress(counting.bytes_read, row)
        stager.finish_loading()

        sql = _Sql(session, kind, organization_id, now)
        python_errors = list(errors.errors)
        python_total = errors.total
        sql_errors = ErrorLog(max_errors)
        _CHECKS[kind](sql, sql_errors)
        if python_total or sql_errors.total:
            merged = sorted(
                python_errors + sql_errors.errors,
                key=lambda e: (e.row is not None, e.row or 0, e.line or 0),
            )
            report.errors = merged[:max_errors]
            report.error_count = python_total + sql_errors.total
            raise ImportRejected(report)

        if kind is ImportKind.accounts:
            _accounts_apply(sql, report, org.base_currency)
        elif kind is ImportKind.invoices:
            _invoices_apply(sql, report)
        else:
            _payments_apply(sql, report)
        _after_apply(session, sql, stager, report)
        return report
    finally:
        if session.is_active:
            # A failed transaction takes the temp tables with its rollback.
            with contextlib.suppress(Exception):
                stager.drop()

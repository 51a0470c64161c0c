"""Reading and validating import files row by row, in constant memory (SPEC §2 imports).

This module knows the columns of each kind of import and turns one raw record (a mapping of
column name to text) into the typed tuple written to the staging table. It never touches the
database: checks that need the database or the whole file (references, duplicates, currencies
of existing accounts) are set-based SQL in :mod:`duecourse.ledger.imports`.

Validation is hand-written rather than a pydantic model per row: at a million rows the per-row
overhead matters (see docs/benchmarks.md), and the rules are the same ones
:mod:`duecourse.validation` applies to the API.

Row numbers: ``row`` is the 1-based number of the data record (the header is not counted, so the
first record under the header is row 1; in a JSON array the first element is row 1). ``line`` is
the physical line of the file where the record starts (the CSV header is line 1), when known.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from enum import StrEnum
from functools import cache, lru_cache
from typing import IO, Any, NamedTuple

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from duecourse.db.base import MONEY_PLACES, MONEY_SCALE
from duecourse.validation import _currencies, _timezones, currency_places, phone_e164

MAX_ERRORS = 1000
TAG_MAX = 64
MONEY_MAX_UNITS = 10**14 * MONEY_SCALE


class ImportKind(StrEnum):
    accounts = "accounts"
    invoices = "invoices"
    payments = "payments"


class FileFormat(StrEnum):
    csv = "csv"
    json = "json"  # a top-level array of objects, streamed
    jsonl = "jsonl"  # one object per line (JSON Lines / NDJSON)


# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class RowError:
    row: int | None  # 1-based data record; None for file-level errors (encoding, header)
    line: int | None  # physical line (header = line 1) when known
    column: str | None
    message: str
    value: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "line": self.line, "column": self.column, "message": self.message, "value": self.value}

    def describe(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column:
            where.append(f"column {self.column}")
        head = ", ".join(where) or "file"
        return f"{head}: {self.message}"


@dataclass
class ErrorLog:
    """Keeps the first ``cap`` errors and counts all of them, so a bad huge file stays small."""

    cap: int = MAX_ERRORS
    errors: list[RowError] = field(default_factory=list)
    total: int = 0

    def add(self, row: int | None, line: int | None, column: str | None, message: str, value: Any = None) -> None:
        self.total += 1
        if len(self.errors) < self.cap:
            shown = None if value is None else _clip(str(value))
            self.errors.append(RowError(row, line, column, message, shown))

    def __bool__(self) -> bool:
        return self.total > 0


def _clip(value: str, n: int = 100) -> str:
    return value if len(value) <= n else value[: n - 1] + "…"


class FileAbort(Exception):
    """The file cannot be read further (encoding, broken JSON, bad header); already logged."""


# --------------------------------------------------------------------------------------------
# Value parsers: each takes the stripped, non-empty text of a cell and returns the value or raises
# ValueError with a message meant for the person who made the file.

_MONEY_RE = re.compile(r"(-?)(\d*)(?:\.(\d*))?")


def parse_money(text: str) -> int:
    """A non-negative exact amount, as integer units of 1/MONEY_SCALE."""
    whole, _, frac = text.partition(".")
    # The usual shape, digits with an optional fraction, without the regular expression
    # (isdecimal() is exactly the regular expression's \d, and int() reads the same digits).
    if whole.isdecimal() and (not frac or frac.isdecimal()):
        frac_sig = frac.rstrip("0")
        if len(frac_sig) <= MONEY_PLACES:
            units = int(whole) * MONEY_SCALE + (int(frac_sig.ljust(MONEY_PLACES, "0")) if frac_sig else 0)
            if units < MONEY_MAX_UNITS:
                return units
    m = _MONEY_RE.fullmatch(text)
    if m is None or not (m.group(2) or m.group(3)):
        raise ValueError("not a number (use digits and a dot, e.g. 1234.50, no thousands separators)")
    if m.group(1):
        raise ValueError("must not be negative")
    frac = m.group(3) or ""
    frac_sig = frac.rstrip("0")
    if len(frac_sig) > MONEY_PLACES:
        raise ValueError(f"has more than {MONEY_PLACES} decimal places")
    units = int(m.group(2) or "0") * MONEY_SCALE + int(frac_sig.ljust(MONEY_PLACES, "0"))
    if units >= MONEY_MAX_UNITS:
        raise ValueError("is too large")
    return units


def parse_date(text: str) -> date:
    if len(text) != 10 or text[4] != "-" or text[7] != "-":
        raise ValueError("not a date (use YYYY-MM-DD)")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError("not a valid date (use YYYY-MM-DD)") from None


_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


_BOOL_TEXT = {**dict.fromkeys(_TRUE, True), **dict.fromkeys(_FALSE, False)}


def parse_bool(text: str) -> bool:
    value = _BOOL_TEXT.get(text)  # the usual spellings are already lower-case
    if value is None:
        value = _BOOL_TEXT.get(text.lower())
        if value is None:
            raise ValueError("not a yes/no value (use true or false)")
    return value


def parse_score(text: str) -> int:
    if not text.isdigit():
        raise ValueError("must be a whole number from 0 to 100")
    n = int(text)
    if n > 100:
        raise ValueError("must be a whole number from 0 to 100")
    return n


def parse_timezone(text: str) -> str:
    if text not in _timezones():
        raise ValueError("unknown time zone (use an IANA name such as Europe/Madrid)")
    return text


def parse_currency(text: str) -> str:
    up = text.upper()
    if up not in _currencies():
        raise ValueError("unknown currency (use an ISO 4217 code such as EUR)")
    return up


_LANG_RE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")


@lru_cache(maxsize=1024)  # a file holds a handful of distinct tags; bounded for hostile files
def parse_language(text: str) -> str:
    if len(text) > 16 or not _LANG_RE.fullmatch(text):
        raise ValueError("not a language tag (use e.g. en, es or pt-BR)")
    first, _, rest = text.replace("_", "-").partition("-")
    return first.lower() + ("-" + rest if rest else "")


_E164_RE = re.compile(r"\+[1-9]\d{6,14}")

_NUMBER_TYPES = (
    "premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager", "uan", "voicemail",
    "fixed_line", "mobile",
)  # fmt: skip


class _Desc(NamedTuple):
    lengths: frozenset[int]
    pattern: re.Pattern[str]

    def matches(self, nsn: str) -> bool:
        return (not self.lengths or len(nsn) in self.lengths) and self.pattern.fullmatch(nsn) is not None


class _Region(NamedTuple):
    leading_digits: re.Pattern[str] | None
    general: _Desc | None
    types: tuple[_Desc, ...]
    # Per number length: the general pattern and one alternation of the type patterns that allow
    # that length (None: no type does), built on first use; two matches instead of up to eleven.
    by_length: dict[int, tuple[re.Pattern[str], re.Pattern[str] | None] | None]

    def valid(self, nsn: str) -> bool:
        """phonenumbers' ``_number_type_helper(nsn, metadata) != UNKNOWN``."""
        n = len(nsn)
        try:
            pair = self.by_length[n]
        except KeyError:
            pair = self.by_length[n] = self._for_length(n)
        if pair is None:
            return False
        general, types = pair
        return general.fullmatch(nsn) is not None and types is not None and types.fullmatch(nsn) is not None

    def _for_length(self, n: int) -> tuple[re.Pattern[str], re.Pattern[str] | None] | None:
        if self.general is None or (self.general.lengths and n not in self.general.lengths):
            return None
        fits = [d.pattern.pattern for d in self.types if not d.lengths or n in d.lengths]
        return self.general.pattern, (re.compile("|".join(f"(?:{p})" for p in fits)) if fits else None)


def _desc(d: Any) -> _Desc | None:
    if d is None or not d.national_number_pattern:
        return None
    return _Desc(frozenset(d.possible_length or ()), re.compile(d.national_number_pattern))


@cache
def _region(code: str) -> _Region | None:
    meta = phonenumbers.PhoneMetadata.metadata_for_region(code, None)
    if meta is None:
        return None
    types = tuple(x for x in (_desc(getattr(meta, t)) for t in _NUMBER_TYPES) if x is not None)
    leading = re.compile(meta.leading_digits) if meta.leading_digits is not None else None
    return _Region(leading, _desc(meta.general_desc), types, {})


def _valid_e164(cc: int, nsn: str) -> bool | None:
    """``phonenumbers.is_valid_number`` for a geographic country code, with the metadata's regular
    expressions compiled once (the library recompiles them per call, which dominates a million-row
    import); ``None`` where this shortcut does not apply (non-geographic codes)."""
    regions = COUNTRY_CODE_TO_REGION_CODE.get(cc)
    if not regions or "001" in regions:
        return None
    if len(regions) == 1:
        region = _region(regions[0])
        return region is not None and region.valid(nsn)
    for code in regions:  # phonenumbers' _region_code_for_number_from_list
        region = _region(code)
        if region is None:
            continue
        if region.leading_digits is not None:
            if region.leading_digits.match(nsn):
                return region.valid(nsn)
        elif region.valid(nsn):
            return True
    return False


def parse_phone(text: str) -> str:
    """A valid phone number in E.164. Canonical E.164 input skips phonenumbers' slow parse()."""
    if _E164_RE.fullmatch(text):
        digits = text[1:]
        for n in (1, 2, 3):
            cc = int(digits[:n])
            if cc in COUNTRY_CODE_TO_REGION_CODE:
                if _valid_e164(cc, digits[n:]):
                    return text
                break
    # Anything else (spaces, dashes, 'whatsapp:' prefixes, invalid numbers) takes the full path.
    try:
        return phone_e164(text)
    except ValueError:
        raise ValueError("invalid phone number (use E.164 with the country code, e.g. +34600123456)") from None


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_EMAIL_FAST_RE = re.compile(
    _ATEXT + r"(?:\." + _ATEXT + r")*@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})"
)
_SPECIAL_DOMAINS = ("arpa", "invalid", "local", "localhost", "onion", "test")


def parse_email(text: str) -> str:
    """An email address, normalized as email-validator does (domain lower-cased).

    Plain ASCII addresses are accepted by a strict regular expression that only matches addresses
    email-validator also accepts (it is ~20x faster); everything else goes through email-validator.
    """
    m = _EMAIL_FAST_RE.fullmatch(text)
    if m is not None and len(text) <= 254 and m.start(1) <= 65:
        domain = m.group(1).lower()
        last = domain.rsplit(".", 1)[-1]
        if last not in _SPECIAL_DOMAINS:
            return text[: m.start(1)] + domain
    try:
        return validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"invalid email address: {exc}") from None


def text_parser(max_len: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if len(text) > max_len:
            raise ValueError(f"is longer than {max_len} characters")
        return text

    return parse


def _enum_parser(values: tuple[str, ...]) -> Callable[[str], str]:
    allowed = frozenset(values)

    def parse(text: str) -> str:
        low = text.lower()
        if low not in allowed:
            raise ValueError("must be one of " + ", ".join(values))
        return low

    return parse


_TAG_SPLIT = re.compile(r"[|;]")


def parse_tags(text: str) -> tuple[str, ...]:
    tags = sorted({t.strip() for t in _TAG_SPLIT.split(text) if t.strip()})
    for t in tags:
        if len(t) > TAG_MAX:
            raise ValueError(f"tag {_clip(t, 30)!r} is longer than {TAG_MAX} characters")
    return tuple(tags)


# --------------------------------------------------------------------------------------------
# Columns of each kind


class Col(NamedTuple):
    name: str
    parse: Callable[[str], Any]
    required: bool = False
    default: Any = None
    # An empty cell means "not given" (keep the stored value / use the default on insert) rather
    # than "clear it": for columns that cannot be empty in the database.
    empty_is_absent: bool = False


EXTERNAL_ID = text_parser(100)

ACCOUNT_COLUMNS: tuple[Col, ...] = (
    Col("external_id", EXTERNAL_ID, required=True),
    Col("name", text_parser(200), required=True),
    Col("email", parse_email),
    Col("phone", parse_phone),
    Col("whatsapp", parse_phone),
    Col("timezone", parse_timezone),
    Col("language", parse_language),
    Col("currency", parse_currency, empty_is_absent=True),
    Col("score", parse_score),
    Col("tags", parse_tags, default=()),
    Col("opt_out_email", parse_bool, default=False, empty_is_absent=True),
    Col("opt_out_sms", parse_bool, default=False, empty_is_absent=True),
    Col("opt_out_whatsapp", parse_bool, default=False, empty_is_absent=True),
    Col("opt_out_voice", parse_bool, default=False, empty_is_absent=True),
    Col("blocked", parse_bool, default=False, empty_is_absent=True),
    Col("blocked_reason", text_parser(500)),
    Col("paused", parse_bool, default=False, empty_is_absent=True),
)

INVOICE_COLUMNS: tuple[Col, ...] = (
    Col("external_id", EXTERNAL_ID, required=True),
    Col("account_external_id", EXTERNAL_ID, required=True),
    Col("number", text_parser(100), empty_is_absent=True),
    Col("currency", parse_currency, empty_is_absent=True),
    Col("total", parse_money, required=True),
    Col("amount_paid", parse_money, default=0, empty_is_absent=True),
    Col("issue_date", parse_date, required=True),
    Col("due_date", parse_date, required=True),
    Col("status", _enum_parser(("open", "paid", "void")), default="open", empty_is_absent=True),
    Col("disputed", parse_bool, default=False, empty_is_absent=True),
)

PAYMENT_COLUMNS: tuple[Col, ...] = (
    Col("external_id", EXTERNAL_ID, required=True),
    Col("account_external_id", EXTERNAL_ID, required=True),
    Col("invoice_external_id", EXTERNAL_ID),
    Col("amount", parse_money, required=True),
    Col("currency", parse_currency, empty_is_absent=True),
    Col("paid_on", parse_date, required=True),
    Col("reference", text_parser(200)),
)

COLUMNS: dict[ImportKind, tuple[Col, ...]] = {
    ImportKind.accounts: ACCOUNT_COLUMNS,
    ImportKind.invoices: INVOICE_COLUMNS,
    ImportKind.payments: PAYMENT_COLUMNS,
}


def column_bit(kind: ImportKind, name: str) -> int:
    """The bit of ``name`` in a staged row's ``present`` mask."""
    for i, col in enumerate(COLUMNS[kind]):
        if col.name == name:
            return 1 << i
    raise KeyError(name)


class RowValidator:
    """Turns a raw record into the staged tuple ``(row, line, present, *values)``, logging every problem."""

    def __init__(self, kind: ImportKind, errors: ErrorLog) -> None:
        self.kind = kind
        self.columns = COLUMNS[kind]
        self.errors = errors
        self.known = frozenset(c.name for c in self.columns)
        self.required = tuple(c.name for c in self.columns if c.required)
        self.index = {c.name: i for i, c in enumerate(self.columns)}
        self.plan: tuple[tuple[int, int, Callable[[str], Any], bool, Any, bool, str], ...] = ()

    def use_header(self, header: list[str]) -> None:
        """Records will come as lists of fields in the order of ``header`` (CSV, whose header was
        checked: no unknown or repeated column, every required one present)."""
        where = {name: i for i, name in enumerate(header)}
        self.plan = tuple(
            (1 << i, where.get(c.name, -1), c.parse, c.required, c.default, c.empty_is_absent, c.name)
            for i, c in enumerate(self.columns)
        )

    def __call__(self, row: int, line: int | None, record: dict[str, str] | list[str]) -> tuple[Any, ...] | None:
        if record.__class__ is list:
            return self._fields(row, line, record)  # type: ignore[arg-type]
        assert isinstance(record, dict)
        errors = self.errors
        before = errors.total
        present = 0
        values: list[Any] = []
        for i, col in enumerate(self.columns):
            raw = record.get(col.name)
            if raw is None:
                if col.required:
                    errors.add(row, line, col.name, "is required (the column is missing)")
                values.append(col.default)
                continue
            text = raw.strip()
            if not text:
                if col.required:
                    errors.add(row, line, col.name, "is required")
                    values.append(None)
                    continue
                if not col.empty_is_absent:
                    present |= 1 << i
                values.append(col.default)
                continue
            present |= 1 << i
            try:
                values.append(col.parse(text))
            except ValueError as exc:
                errors.add(row, line, col.name, str(exc), text)
                values.append(None)
        if len(record) > len(self.known) or not self.known.issuperset(record):
            for name in record:
                if name not in self.known:
                    errors.add(row, line, name, "unknown column (expected: " + ", ".join(self.index) + ")")
        if errors.total != before:
            return None
        return self._finish(row, line, present, values)

    def _fields(self, row: int, line: int | None, fields: list[str]) -> tuple[Any, ...] | None:
        """``__call__`` for a CSV record: the same rules, with the column positions worked out once."""
        present = 0
        values: list[Any] = []
        append = values.append
        failed = False
        for bit, pos, parse, required, default, empty_is_absent, name in self.plan:
            if pos < 0:  # not in the header (so not a required column)
                append(default)
                continue
            text = fields[pos].strip()
            if not text:
                if required:
                    self.errors.add(row, line, name, "is required")
                    failed = True
                    append(None)
                    continue
                if not empty_is_absent:
                    present |= bit
                append(default)
                continue
            present |= bit
            try:
                append(parse(text))
            except ValueError as exc:
                self.errors.add(row, line, name, str(exc), text)
                failed = True
                append(None)
        if failed:
            return None
        return self._finish(row, line, present, values)

    def _finish(self, row: int, line: int | None, present: int, values: list[Any]) -> tuple[Any, ...] | None:
        """The checks across columns of a row whose every value parsed."""
        errors = self.errors
        before = errors.total
        if self.kind is ImportKind.invoices:
            self._check_invoice(row, line, values, present)
            if values[3] is not None:
                self._check_places(row, line, values[3], ("total", values[4]), ("amount_paid", values[5]))
        elif self.kind is ImportKind.payments:
            if values[3] == 0:
                errors.add(row, line, "amount", "must be greater than zero", "0")
            elif values[4] is not None:
                self._check_places(row, line, values[4], ("amount", values[3]))
        if errors.total != before:
            return None
        return (row, line, present, *values)

    def _check_places(self, row: int, line: int | None, currency: str, *amounts: tuple[str, int]) -> None:
        places = _places(currency)
        unit = 10 ** (MONEY_PLACES - places)
        for column, units in amounts:
            if units % unit:
                self.errors.add(row, line, column, f"has more than {places} decimal places for {currency}", _units_text(units))

    def _check_invoice(self, row: int, line: int | None, v: list[Any], present: int) -> None:
        total, paid, issue, due = v[4], v[5], v[6], v[7]
        if due < issue:
            self.errors.add(row, line, "due_date", f"is before issue_date ({issue.isoformat()})", due.isoformat())
        if present & (1 << 5) and paid > total:
            self.errors.add(row, line, "amount_paid", "is greater than total", _units_text(paid))


@cache
def _places(currency: str) -> int:
    return currency_places(currency)


def _units_text(units: int) -> str:
    return str((Decimal(units) / MONEY_SCALE).normalize())


# --------------------------------------------------------------------------------------------
# Readers: yield (row, line, record) with record a dict of column name -> text.

# (row, line, record); record is None for a row already reported as unreadable.
Record = tuple[int, int | None, dict[str, str] | list[str] | None]


class CountingReader(io.RawIOBase):
    """Wraps a binary file and counts the bytes read, for progress reporting."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.bytes_read += n
        return n


def detect_format(head: bytes, filename: str | None = None) -> FileFormat:
    """From the file name's extension, else from the first non-blank byte."""
    name = (filename or "").lower()
    if name.endswith((".jsonl", ".ndjson")):
        return FileFormat.jsonl
    if name.endswith((".csv", ".tsv")):
        return FileFormat.csv
    stripped = head.removeprefix(codecs.BOM_UTF8).lstrip()
    if stripped.startswith(b"["):
        return FileFormat.json
    if stripped.startswith(b"{"):
        return FileFormat.jsonl
    return FileFormat.csv


def _decoded_lines(stream: IO[bytes], errors: ErrorLog) -> Iterator[str]:
    for lineno, raw in enumerate(stream, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start]
            errors.add(
                None,
                lineno,
                None,
                f"the file is not UTF-8 (byte 0x{bad:02x} at character {exc.start + 1} of the line); save it as UTF-8",
            )
            raise FileAbort from None


def _choose_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_csv(
    stream: IO[bytes], kind: ImportKind, errors: ErrorLog, on_header: Callable[[list[str]], None] | None = None
) -> Iterator[Record]:
    """CSV with a header row; comma, semicolon or tab separated (chosen from the header line).

    With ``on_header``, it is called with the checked header and records are the lists of fields
    in that order (no dict per row); otherwise records are dicts of column name to text."""
    lines = _decoded_lines(stream, errors)
    first = None
    skipped = 0
    for first in lines:
        if first.strip():
            break
        skipped += 1
        first = None
    if first is None:
        errors.add(None, None, None, "the file is empty (expected a header row with column names)")
        raise FileAbort
    reader = csv.reader(itertools.chain([first], lines), delimiter=_choose_delimiter(first), strict=True)
    try:
        header_fields = next(reader)
    except csv.Error as exc:
        errors.add(None, skipped + 1, None, f"unreadable header: {exc}")
        raise FileAbort from None
    header_line = skipped + 1
    header = _check_header([h.strip().lower() for h in header_fields], kind, errors, header_line)
    width = len(header)
    as_lists = on_header is not None
    if on_header is not None:
        on_header(header)
    row = 0
    end = reader.line_num
    try:
        for fields in reader:
            start = skipped + end + 1
            end = reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            row += 1
            if len(fields) != width:
                more = "too many" if len(fields) > width else "too few"
                errors.add(row, start, None, f"{more} fields: {len(fields)} fields where the header has {width}")
                yield row, start, None
                continue
            yield row, start, (fields if as_lists else dict(zip(header, fields, strict=True)))
    except csv.Error as exc:
        errors.add(row + 1, skipped + reader.line_num, None, f"malformed CSV: {exc}")
        raise FileAbort from None


def _check_header(names: list[str], kind: ImportKind, errors: ErrorLog, line: int) -> list[str]:
    known = [c.name for c in COLUMNS[kind]]
    before = errors.total
    seen: set[str] = set()
    for i, name in enumerate(names, 1):
        if not name:
            errors.add(None, line, f"#{i}", "column has no name in the header")
        elif name in seen:
            errors.add(None, line, name, "column appears twice in the header")
        elif name not in known:
            errors.add(None, line, name, f"unknown column (the {kind.value} columns are: " + ", ".join(known) + ")")
        seen.add(name)
    for col in COLUMNS[kind]:
        if col.required and col.name not in seen:
            errors.add(None, line, col.name, "required column is missing from the header")
    if errors.total != before:
        raise FileAbort
    return names


def _json_text(value: Any, column: str, list_ok: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):  # only from parsers that were not asked for Decimal
        return repr(value)
    if isinstance(value, list) and list_ok:
        return "|".join(_json_text(v, column, False) for v in value)
    raise ValueError("must be a single value, not a list or an object")


def _json_record(obj: Any, row: int, line: int | None, errors: ErrorLog) -> dict[str, str] | None:
    if not isinstance(obj, dict):
        errors.add(row, line, None, "each element must be a JSON object of column names to values")
        return None
    out: dict[str, str] = {}
    bad = False
    for key, value in obj.items():
        name = str(key).strip().lower()
        try:
            out[name] = _json_text(value, name, name == "tags")
        except ValueError as exc:
            errors.add(row, line, name, str(exc))
            bad = True
    return None if bad else out


def read_jsonl(stream: IO[bytes], kind: ImportKind, errors: ErrorLog) -> Iterator[Record]:
    row = 0
    any_content = False
    for lineno, line in enumerate(_decoded_lines(stream, errors), 1):
        text = line.strip()
        if not text:
            continue
        any_content = True
        row += 1
        try:
            obj = json.loads(text, parse_float=Decimal)
        except json.JSONDecodeError as exc:
            errors.add(row, lineno, None, f"invalid JSON: {exc.msg} at character {exc.colno}")
            yield row, lineno, None
            continue
        yield row, lineno, _json_record(obj, row, lineno, errors)
    if not any_content:
        errors.add(None, None, None, "the file is empty")
        raise FileAbort


def read_json_array(stream: io.BufferedReader, kind: ImportKind, errors: ErrorLog) -> Iterator[Record]:
    """A top-level JSON array of objects, parsed incrementally (ijson): constant memory."""
    import ijson

    if stream.peek(3)[:3] == codecs.BOM_UTF8:
        stream.read(3)
    row = 0
    try:
        for obj in ijson.items(stream, "item", use_float=False):
            row += 1
            yield row, None, _json_record(obj, row, None, errors)
    except ijson.JSONError as exc:
        msg = str(exc)
        if "utf" in msg.lower():
            errors.add(row + 1, None, None, "the file is not UTF-8; save it as UTF-8")
        elif row == 0 and "premature EOF" in msg:
            errors.add(None, None, None, "the file is empty or not a JSON array")
        else:
            errors.add(row + 1, None, None, f"invalid JSON after row {row}: {msg}")
        raise FileAbort from None


def read_records(
    stream: IO[bytes],
    kind: ImportKind,
    fmt: FileFormat,
    errors: ErrorLog,
    on_header: Callable[[list[str]], None] | None = None,
) -> Iterator[Record]:
    """Records of the file; see :func:`read_csv` for ``on_header`` (CSV only: JSON records are dicts)."""
    if fmt is FileFormat.csv:
        return read_csv(stream, kind, errors, on_header)
    if fmt is FileFormat.jsonl:
        return read_jsonl(stream, kind, errors)
    return read_json_array(stream, kind, errors)

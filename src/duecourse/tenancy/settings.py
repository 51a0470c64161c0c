"""Per-organization settings (SPEC §4.7, §4.8, §4.10, §6, §7) with their defaults.

Stored as one validated JSON document per organization; every change is audited field by field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from decimal import ROUND_CEILING, Decimal
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALL_DAYS: list[Weekday] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
MON_SAT: list[Weekday] = ["mon", "tue", "wed", "thu", "fri", "sat"]
_HHMM = re.compile(r"^(?:[01]\d|2[0-3]):[0-5]\d$|^24:00$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllowedHours(_Strict):
    start: str = "00:00"
    end: str = "24:00"
    days: list[Weekday] = Field(default_factory=lambda: list(ALL_DAYS), min_length=1)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError("must be a time as HH:MM (00:00 to 24:00)")
        return v

    @model_validator(mode="after")
    def _order(self) -> AllowedHours:
        if self.start >= self.end:
            raise ValueError("start must be before end")
        return self


class FrequencyLimit(_Strict):
    per_day: Annotated[int, Field(ge=0)] | None = None
    per_week: Annotated[int, Field(ge=0)] | None = None


def _default_frequency() -> dict[str, FrequencyLimit]:
    return {
        "overall": FrequencyLimit(per_day=1),
        "email": FrequencyLimit(),
        "sms": FrequencyLimit(),
        "whatsapp": FrequencyLimit(),
        "voice": FrequencyLimit(per_week=7),
    }


def _default_hours() -> dict[str, AllowedHours]:
    return {
        "email": AllowedHours(),
        "sms": AllowedHours(start="08:00", end="20:00", days=list(MON_SAT)),
        "whatsapp": AllowedHours(start="08:00", end="20:00", days=list(MON_SAT)),
        "voice": AllowedHours(start="08:00", end="21:00", days=list(MON_SAT)),
    }


FREQUENCY_KEYS = ("overall", "email", "sms", "whatsapp", "voice")
HOURS_KEYS = ("email", "sms", "whatsapp", "voice")


class AutomationSettings(_Strict):
    auto_enqueue: bool = False
    scheduler_interval_minutes: int = Field(default=5, ge=1, le=1440)
    engine_paused: bool = False


class DispatchSettings(_Strict):
    frequency_limits: dict[str, FrequencyLimit] = Field(default_factory=_default_frequency)
    allowed_hours: dict[str, AllowedHours] = Field(default_factory=_default_hours)
    max_attempts: int = Field(default=3, ge=1, le=10)
    retry_backoff_minutes: int = Field(default=15, ge=1, le=1440)
    lease_seconds: int = Field(default=300, ge=10, le=86400)

    @field_validator("frequency_limits")
    @classmethod
    def _freq_keys(cls, v: dict[str, FrequencyLimit]) -> dict[str, FrequencyLimit]:
        unknown = set(v) - set(FREQUENCY_KEYS)
        if unknown:
            raise ValueError(f"unknown channel(s) {sorted(unknown)}; use {list(FREQUENCY_KEYS)}")
        return {**_default_frequency(), **v}

    @field_validator("allowed_hours")
    @classmethod
    def _hours_keys(cls, v: dict[str, AllowedHours]) -> dict[str, AllowedHours]:
        unknown = set(v) - set(HOURS_KEYS)
        if unknown:
            raise ValueError(f"unknown channel(s) {sorted(unknown)}; use {list(HOURS_KEYS)}")
        return {**_default_hours(), **v}


class OutcomeSettings(_Strict):
    callback_expiry_hours: int = Field(default=24, ge=1, le=720)
    promise_grace_days: int = Field(default=1, ge=0, le=90)
    adaptive_positive_factor: Decimal = Field(default=Decimal("0.5"), gt=0, le=1)
    adaptive_negative_factor: Decimal = Field(default=Decimal("2"), ge=1, le=10)


class ExclusionSettings(_Strict):
    min_balance: Decimal = Field(default=Decimal("0"), ge=0)
    excluded_tags: list[str] = Field(default_factory=list)
    exclude_only_disputed: bool = True
    # min_balance in each currency the organization has an exchange rate for (see for_currencies).
    _per_currency: dict[str, Decimal] = PrivateAttr(default_factory=dict)

    def for_currencies(self, base_currency: str, rates: Mapping[str, Decimal]) -> ExclusionSettings:
        """``min_balance`` is an amount in the organization's base currency: with exchange rates, each
        account is compared in its own currency (25 EUR is about 4,032 JPY, not 25 JPY), the threshold
        converted as amount triggers convert theirs (rounded up). A currency without a rate is
        compared with the bare number. Returns ``self``."""
        self._per_currency = {} if not rates else {
            base_currency: self.min_balance,
            **{c: (self.min_balance / r).quantize(Decimal("0.0001"), rounding=ROUND_CEILING)
               for c, r in rates.items() if r > 0 and c != base_currency},
        }
        return self

    @property
    def min_balance_by_currency(self) -> dict[str, Decimal]:
        return self._per_currency


class SandboxSettings(_Strict):
    simulate_outcomes: bool = Field(
        default=False,
        description="Messages sent through the sandbox get realistic simulated outcomes (deliveries, bounces, "
        "call outcomes, promises, payments) a few minutes to days later, through the same outcome services "
        "a real provider's webhook uses. For demos; see docs/channels/sandbox.md.",
    )
    seed: int = Field(
        default=7, ge=0, le=2_147_483_647,
        description="Seed of the simulated outcomes: the same seed and the same messages give the same outcomes.",
    )


# --- messages: the payment link (SPEC §7) ------------------------------------------------------------

#: The placeholders a payment link may contain, with what each becomes (URL-encoded) for an account.
PAYMENT_LINK_PLACEHOLDERS: dict[str, str] = {
    "account_external_id": "the account's external id (your reference for the debtor)",
    "invoice_number": "the number of the account's carrying invoice (empty when it has none)",
    "balance": "the outstanding balance, e.g. 1250.00",
    "currency": "the account's currency code, e.g. EUR",
}
#: Values that stand in for an account when a payment link is checked or previewed with sample values.
PAYMENT_LINK_SAMPLE: dict[str, str] = {
    "account_external_id": "ACC-1001",
    "invoice_number": "INV-1001",
    "balance": "1250.00",
    "currency": "EUR",
}
PAYMENT_LINK_MAX = 2000
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER_LIST = ", ".join("{%s}" % k for k in PAYMENT_LINK_PLACEHOLDERS)


def payment_link_problem(link: str) -> str | None:
    """Why ``link`` cannot be an organization's payment link, or None when it can."""
    if len(link) > PAYMENT_LINK_MAX:
        return f"must be at most {PAYMENT_LINK_MAX} characters"
    if any(c.isspace() or not c.isprintable() for c in link):
        return "must not contain spaces or control characters (write a space as %20)"
    if "\\" in link:  # browsers read a backslash as a slash: the host they go to is not the one shown
        return "must not contain a backslash (write it as %5C)"
    for m in _PLACEHOLDER.finditer(link):
        if not m.group(1):
            return f"has an empty placeholder {{}}; the placeholders are {_PLACEHOLDER_LIST}"
        if m.group(1) not in PAYMENT_LINK_PLACEHOLDERS:
            return f"unknown placeholder {m.group(0)}; the placeholders are {_PLACEHOLDER_LIST}"
    rest = _PLACEHOLDER.sub("", link)
    if "{" in rest or "}" in rest:
        return f"has an unmatched {{ or }}; write a placeholder as {{name}}, one of {_PLACEHOLDER_LIST}"
    try:
        parts = urlsplit(link)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            return "must be an absolute http:// or https:// URL, e.g. https://pay.example.com/{account_external_id}"
        if "{" in parts.netloc:
            return "placeholders may be used in the path, query or fragment, not in the host"
        filled = urlsplit(fill_payment_link(link, PAYMENT_LINK_SAMPLE))
        if not filled.hostname:
            return "must be an absolute http:// or https:// URL with a host, e.g. https://pay.example.com/"
        filled.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    return None


def fill_payment_link(link: str, values: Mapping[str, str]) -> str:
    """The link with each placeholder replaced by its value, URL-encoded (``/``, ``?``, ``&``, ``#``,
    spaces and non-ASCII characters included), so a value can never change the link's shape."""
    parts = _link_parts(link)
    return "".join(p if i % 2 == 0 else quote(str(values.get(p) or ""), safe="") for i, p in enumerate(parts))


@lru_cache(maxsize=64)  # every dispatched message fills in its organization's link
def _link_parts(link: str) -> tuple[str, ...]:
    """The link split at its placeholders: text, name, text, name, …, text."""
    return tuple(_PLACEHOLDER.split(link))


class MessageSettings(_Strict):
    payment_link: str | None = Field(
        default=None,
        description="Where debtors pay: the URL that the template variable payment_link becomes, an absolute "
        "http(s) URL with optional placeholders, each filled in URL-encoded for the account: "
        + ", ".join("{%s} (%s)" % kv for kv in PAYMENT_LINK_PLACEHOLDERS.items())
        + ". Example: https://pay.example.com/{account_external_id}?invoice={invoice_number}. "
        "Unset (null): messages whose template uses payment_link fail with reason template_error.",
        examples=["https://pay.example.com/{account_external_id}?invoice={invoice_number}"],
    )

    @field_validator("payment_link")
    @classmethod
    def _payment_link(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # empty: not configured
        v = v.strip()
        problem = payment_link_problem(v)
        if problem:
            raise PydanticCustomError("payment_link", problem)
        return v


class OrgSettings(_Strict):
    automation: AutomationSettings = Field(default_factory=AutomationSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    outcomes: OutcomeSettings = Field(default_factory=OutcomeSettings)
    exclusions: ExclusionSettings = Field(default_factory=ExclusionSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    messages: MessageSettings = Field(default_factory=MessageSettings)
    exchange_rates: dict[str, Decimal] = Field(
        default_factory=dict,
        description="Rate to the organization's base currency per currency code, for amount-threshold triggers.",
    )

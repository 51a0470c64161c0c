"""API shapes of the ledger: accounts, invoices, payments, promises (SPEC §2).

Inputs refuse unknown fields (422). Amounts are exact decimals: JSON strings or numbers are accepted,
floats' binary noise never reaches the database (``validation.money`` works on the decimal text), and
every amount is written back as a string with the currency's minor units.

What the engine owns (status, strategy, campaign, case state) and what is derived (balance, carrying
invoice, days overdue, tab) appear only in the outputs.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from babel import Locale, UnknownLocaleError
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, EmailStr, Field

from duecourse.engine.schemas import ExecutionLogOut, InteractionOut  # shared with the engine API
from duecourse.ledger.models import (
    AccountStatus,
    CollectionTab,
    InvoiceStatus,
    PaymentSource,
    PromiseSource,
    PromiseStatus,
)
from duecourse.validation import currency_code, money, phone_e164, timezone_name

MAX_TAGS = 50



class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _money_in(value: Any) -> Decimal:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise ValueError("must be an amount such as \"120.50\"")
    return money(value)


def _positive(value: Decimal) -> Decimal:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _language(value: str) -> str:
    v = value.strip()
    try:
        Locale.parse(v.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        raise ValueError(f"unknown language {value!r} (use a code such as es, en or pt-BR)") from None
    return v


def _tags(value: list[str]) -> list[str]:
    out: list[str] = []
    for raw in value:
        tag = raw.strip()
        if not tag:
            raise ValueError("tags must not be empty")
        if len(tag) > 64:
            raise ValueError(f"tag {tag[:20]!r}… is longer than 64 characters")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    return out


# Non-negative amount with at most the stored precision; the currency's own places are checked by the service.
MoneyIn = Annotated[Decimal, BeforeValidator(_money_in)]
PositiveMoneyIn = Annotated[Decimal, BeforeValidator(_money_in), AfterValidator(_positive)]
Phone = Annotated[str, AfterValidator(phone_e164)]
TimeZone = Annotated[str, AfterValidator(timezone_name)]
Currency = Annotated[str, AfterValidator(currency_code)]
Language = Annotated[str, Field(max_length=16), AfterValidator(_language)]
Tags = Annotated[list[Annotated[str, Field(max_length=200)]], AfterValidator(_tags)]
ExternalId = Annotated[str, Field(min_length=1, max_length=100)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
Score = Annotated[int, Field(ge=0, le=100)]
Reason = Annotated[str, Field(min_length=1, max_length=500)]


# ---------------------------------------------------------------- accounts


class AccountIn(Strict):
    external_id: ExternalId
    name: Name
    email: EmailStr | None = None
    phone: Phone | None = None
    whatsapp: Phone | None = None
    timezone: TimeZone | None = Field(default=None, description="IANA name; omitted or null: the organization's")
    language: Language | None = None
    currency: Currency | None = Field(default=None, description="Omitted: the organization's base currency")
    score: Score | None = None
    tags: Tags = Field(default_factory=list)
    opt_out_email: bool = False
    opt_out_sms: bool = False
    opt_out_whatsapp: bool = False
    opt_out_voice: bool = False
    blocked: bool = False
    blocked_reason: Reason | None = None
    paused: bool = False
    on_stop: bool = False


class AccountPatch(Strict):
    """Partial update. ``null`` clears an optional field (``timezone: null`` returns to the organization's)."""

    external_id: ExternalId | None = None
    name: Name | None = None
    email: EmailStr | None = None
    phone: Phone | None = None
    whatsapp: Phone | None = None
    timezone: TimeZone | None = None
    language: Language | None = None
    currency: Currency | None = None
    score: Score | None = None
    tags: Tags | None = None
    opt_out_email: bool | None = None
    opt_out_sms: bool | None = None
    opt_out_whatsapp: bool | None = None
    opt_out_voice: bool | None = None
    blocked: bool | None = None
    blocked_reason: Reason | None = None
    paused: bool | None = None
    on_stop: bool | None = None


class BlockIn(Strict):
    reason: Reason


class AccountOut(BaseModel):
    id: int
    external_id: str
    name: str
    email: str | None
    phone: str | None
    whatsapp: str | None
    timezone: str = Field(description="The effective time zone (the organization's when not set on the account)")
    timezone_is_default: bool = Field(description="True when the account follows the organization's time zone")
    language: str | None
    currency: str
    score: int | None
    tags: list[str]
    opt_out_email: bool
    opt_out_sms: bool
    opt_out_whatsapp: bool
    opt_out_voice: bool
    email_invalid: bool = Field(description="A provider said the email address does not exist")
    phone_invalid: bool = Field(description="A provider said the phone number is invalid")
    whatsapp_invalid: bool = Field(description="A provider said the WhatsApp number is invalid")
    blocked: bool
    blocked_reason: str | None
    paused: bool
    on_stop: bool
    status: AccountStatus
    strategy_id: int | None
    campaign_id: int | None
    campaign_joined_at: datetime | None
    case_number: int
    case_opened_at: datetime | None
    case_anchor_date: date | None
    case_invoice_id: int | None
    case_next_stage: int | None
    case_prev_completed_at: datetime | None
    case_retry_count: int
    case_sequence_finished: bool
    callback_at: datetime | None
    balance: str = Field(description="Open, undisputed, unpaid amount")
    gross_open: str = Field(description="Open unpaid amount including disputed invoices")
    carrying_invoice_id: int | None
    carrying_due_date: date | None
    days_overdue: int | None = Field(description="Account's local today minus the carrying invoice's due date")
    collection_tab: CollectionTab | None
    last_interaction_at: datetime | None
    created_at: datetime
    updated_at: datetime


class AccountPage(BaseModel):
    items: list[AccountOut]
    next_cursor: str | None


class TabCounts(BaseModel):
    outstanding: int = 0
    scheduled: int = 0
    engaged: int = 0
    follow_up: int = 0
    blocked: int = 0


class ExecutionLogPage(BaseModel):
    items: list[ExecutionLogOut]
    next_cursor: str | None


class InteractionPage(BaseModel):
    items: list[InteractionOut]
    next_cursor: str | None


# ---------------------------------------------------------------- invoices


class _AccountRef(Strict):
    """The account, by id or by external id (exactly one; checked by the service to name the field)."""

    account_id: int | None = None
    account_external_id: ExternalId | None = None


class InvoiceIn(_AccountRef):
    external_id: ExternalId
    number: Annotated[str, Field(min_length=1, max_length=100)]
    currency: Currency | None = Field(default=None, description="Must be the account's currency (the default)")
    total: MoneyIn
    amount_paid: MoneyIn = Decimal(0)
    issue_date: date
    due_date: date
    status: Literal["open", "paid", "void"] = "open"
    disputed: bool = False


class InvoicePatch(Strict):
    external_id: ExternalId | None = None
    number: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    currency: Currency | None = None
    total: MoneyIn | None = None
    amount_paid: MoneyIn | None = Field(
        None, description="Everything paid on the invoice, including what payments recorded in duecourse settled "
        "(it cannot be set below that)")
    issue_date: date | None = None
    due_date: date | None = None
    status: Literal["open", "paid", "void"] | None = None
    disputed: bool | None = None


class InvoiceOut(BaseModel):
    id: int
    account_id: int
    external_id: str
    number: str
    currency: str
    total: str
    amount_paid: str
    unpaid: str
    issue_date: date
    due_date: date
    status: InvoiceStatus
    disputed: bool
    created_at: datetime
    updated_at: datetime


class InvoicePage(BaseModel):
    items: list[InvoiceOut]
    next_cursor: str | None


# ---------------------------------------------------------------- payments


class PaymentIn(_AccountRef):
    invoice_id: int | None = Field(default=None, description="Settle this invoice of the account first")
    invoice_external_id: ExternalId | None = None
    external_id: ExternalId | None = Field(default=None, description="Omitted: one is generated")
    amount: PositiveMoneyIn
    currency: Currency | None = Field(default=None, description="Must be the account's currency (the default)")
    paid_on: date | None = Field(default=None, description="Omitted: today in the account's time zone")
    reference: Annotated[str, Field(max_length=200)] | None = None
    source: Literal["api", "agent"] = "api"


class AllocationOut(BaseModel):
    invoice_id: int
    amount: str


class PaymentOut(BaseModel):
    id: int
    account_id: int
    invoice_id: int | None
    external_id: str
    amount: str
    currency: str
    paid_on: date
    source: PaymentSource
    reference: str | None
    unallocated: str = Field(description="Credit not yet applied to any invoice")
    allocations: list[AllocationOut]
    created_at: datetime


class PaymentPage(BaseModel):
    items: list[PaymentOut]
    next_cursor: str | None


# ---------------------------------------------------------------- promises


class PromiseIn(_AccountRef):
    amount: PositiveMoneyIn
    promised_date: date
    source: Literal["agent", "api", "portal", "voice_call"] = "api"
    note: Annotated[str, Field(max_length=2000)] | None = None


class PromiseOut(BaseModel):
    id: int
    account_id: int
    amount: str
    currency: str
    promised_date: date
    status: PromiseStatus
    source: PromiseSource
    note: str | None
    interaction_id: int | None
    created_by_user_id: int | None
    created_at: datetime
    settled_at: datetime | None


class PromisePage(BaseModel):
    items: list[PromiseOut]
    next_cursor: str | None

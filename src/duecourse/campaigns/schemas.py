"""API shapes of campaigns, their membership and KPIs (SPEC §5).

The status is never set directly: it changes only through the lifecycle actions
(``/activate``, ``/pause``, ``/complete``), so a body carrying ``status`` is refused.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_serializer, field_validator

from duecourse.campaigns.models import CampaignStatus
from duecourse.ledger.models import AccountStatus, CollectionTab
from duecourse.strategies.schemas import money_out
from duecourse.validation import money

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Objective = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)]
StrictId = Annotated[int, Field(strict=True)]
MAX_IDS = 10_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CampaignIn(Strict):
    """A whole campaign: the body of POST and PUT. New campaigns start as ``draft``."""

    name: Name
    objective: Objective = ""
    strategy_id: StrictId | None = None
    start_date: date | None = None
    end_date: date | None = None


class CampaignPatch(Strict):
    name: Name | None = None
    objective: Objective | None = None
    strategy_id: StrictId | None = None
    start_date: date | None = None
    end_date: date | None = None


class CampaignOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    objective: str
    strategy_id: int | None
    start_date: date | None
    end_date: date | None
    status: CampaignStatus
    created_at: datetime
    updated_at: datetime
    activated_at: datetime | None
    completed_at: datetime | None
    created_by: str


class CampaignPage(BaseModel):
    items: list[CampaignOut]
    next_cursor: str | None = None


def _amount(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ValueError("must be a decimal amount, as a string or a number")
    return money(value)


class AccountFilter(Strict):
    """Accounts of the organization matching every given criterion."""

    status: AccountStatus | None = None
    collection_tab: CollectionTab | None = None
    tag: str | None = Field(default=None, min_length=1, max_length=64)
    min_balance: Decimal | None = None
    max_balance: Decimal | None = None
    min_days_overdue: Annotated[int, Field(strict=True, ge=-3650, le=36500)] | None = Field(
        default=None, description="carrying invoice at least this many days past due (organization's today)"
    )

    _amounts = field_validator("min_balance", "max_balance", mode="before")(lambda v: _amount(v))


class MembershipAdd(Strict):
    """Exactly one of ``account_ids``, ``external_ids`` or ``filter``."""

    account_ids: list[StrictId] | None = Field(default=None, max_length=MAX_IDS)
    external_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] | None = Field(
        default=None, max_length=MAX_IDS
    )
    filter: AccountFilter | None = None
    move: bool = Field(default=False, description="Move accounts that are in another campaign into this one")


class MembershipRemove(Strict):
    account_ids: list[StrictId] = Field(min_length=1, max_length=MAX_IDS)


class MembershipResult(BaseModel):
    campaign_id: int
    added: int = 0
    moved: int = 0
    already_members: int = 0
    removed: int = 0
    total_accounts: int


class MemberOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    external_id: str
    name: str
    score: int | None
    status: AccountStatus
    balance: Decimal
    currency: str
    last_interaction_at: datetime | None
    campaign_joined_at: datetime | None

    @field_serializer("balance")
    def _ser_balance(self, v: Decimal) -> str | None:
        return money_out(v)


class MemberPage(BaseModel):
    items: list[MemberOut]
    next_cursor: str | None = None


class KpisOut(BaseModel):
    campaign_id: int
    total_accounts: int
    contacted: int
    promises: int
    recovered_amount: Decimal = Field(description="payments in the organization's base currency")
    currency: str
    recovered_by_currency: dict[str, Decimal]
    contact_rate: float = Field(description="contacted / total accounts, 0 when the campaign is empty")
    progress_percent: float

    @field_serializer("recovered_amount")
    def _ser_amount(self, v: Decimal) -> str | None:
        return money_out(v)

    @field_serializer("recovered_by_currency")
    def _ser_amounts(self, v: dict[str, Decimal]) -> dict[str, str | None]:
        return {k: money_out(x) for k, x in v.items()}

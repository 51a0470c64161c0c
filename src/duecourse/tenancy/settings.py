"""Per-organization settings (SPEC §4.7, §4.8, §4.10, §6) with their defaults.

Stored as one validated JSON document per organization; every change is audited field by field.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class OrgSettings(_Strict):
    automation: AutomationSettings = Field(default_factory=AutomationSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    outcomes: OutcomeSettings = Field(default_factory=OutcomeSettings)
    exclusions: ExclusionSettings = Field(default_factory=ExclusionSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    exchange_rates: dict[str, Decimal] = Field(
        default_factory=dict,
        description="Rate to the organization's base currency per currency code, for amount-threshold triggers.",
    )

"""Validators for values that must never be parsed by hand: phone numbers, time zones, currencies, money."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from functools import lru_cache
from zoneinfo import available_timezones

import phonenumbers
from babel.numbers import get_currency_precision, list_currencies

from duecourse.db.base import MONEY_PLACES


@lru_cache
def _timezones() -> frozenset[str]:
    return frozenset(available_timezones())


@lru_cache
def _currencies() -> frozenset[str]:
    return frozenset(c for c in list_currencies() if len(c) == 3 and c.isalpha() and c.isupper())


def timezone_name(value: str) -> str:
    """An IANA time zone name such as ``Europe/Madrid``."""
    v = value.strip()
    if v not in _timezones():
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Madrid)")
    return v


def phone_e164(value: str) -> str:
    """A valid phone number, normalized to E.164 (``+34600123456``)."""
    v = value.strip()
    if v.startswith("whatsapp:"):
        v = v[len("whatsapp:"):]
    try:
        parsed = phonenumbers.parse(v, None)
    except phonenumbers.NumberParseException:
        raise ValueError(f"invalid phone number {value!r} (use E.164, e.g. +34600123456)") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError(f"invalid phone number {value!r}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def currency_code(value: str) -> str:
    v = value.strip().upper()
    if v not in _currencies():
        raise ValueError(f"unknown currency {value!r} (use an ISO 4217 code such as EUR)")
    return v


@lru_cache(maxsize=256)  # asked for every dispatched message
def currency_places(currency: str) -> int:
    return min(get_currency_precision(currency), MONEY_PLACES)


def money(value: object, currency: str | None = None, *, allow_zero: bool = True, allow_negative: bool = False) -> Decimal:
    """An exact amount; refuses floats' noise, negatives and more decimals than the currency has."""
    try:
        d = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise ValueError(f"not a number: {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a number: {value!r}")
    if d < 0 and not allow_negative:
        raise ValueError("must not be negative")
    if d == 0 and not allow_zero:
        raise ValueError("must be greater than zero")
    places = currency_places(currency) if currency else MONEY_PLACES
    if d != d.quantize(Decimal(1).scaleb(-places)):
        raise ValueError(f"has more than {places} decimal places" + (f" for {currency}" if currency else ""))
    if abs(d) >= Decimal(10) ** 14:
        raise ValueError("is too large")
    return d

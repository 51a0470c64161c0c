"""Template rendering (SPEC §7): a Jinja2 sandbox that sees only the documented variables.

Template text comes from users, so it is rendered in :class:`SandboxedEnvironment` with
``StrictUndefined`` (a misspelt variable is an error, never an empty string). At save time a
template is parsed, its variables are checked against :data:`VARIABLES`, and it is rendered once
with sample values so that errors only visible at render time are reported then, not at dispatch.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError, meta
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from duecourse.errors import FieldError

VARIABLES: tuple[str, ...] = (
    "debtor_name",
    "balance",
    "currency",
    "carrying_invoice_number",
    "carrying_invoice_amount",
    "carrying_invoice_due_date",
    "days_overdue",
    "payment_link",
    "unsubscribe_link",
    "organization_name",
)

SAMPLE_CONTEXT: dict[str, Any] = {
    "debtor_name": "Jane Doe",
    "balance": "1250.00",
    "currency": "EUR",
    "carrying_invoice_number": "INV-1001",
    "carrying_invoice_amount": "800.00",
    "carrying_invoice_due_date": "2026-02-01",
    "days_overdue": 29,
    "payment_link": "https://pay.example.invalid/sample",
    "unsubscribe_link": "https://example.invalid/unsubscribe/sample",
    "organization_name": "Example Receivables",
}

# Bounds on what a template can make the renderer do; a collections message needs none of this.
MAX_RANGE = 1000
MAX_SEQUENCE = 100_000
MAX_EXPONENT = 100


class _Sandbox(SandboxedEnvironment):
    """The standard sandbox, plus limits on ``range``, ``*`` and ``**`` so a template cannot
    allocate gigabytes (``'x' * 10**10``) when it is previewed or dispatched."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True)
        self.globals["range"] = _small_range

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise SecurityError("exponent too large")
            return operator.pow(left, right)
        if operator_ == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                    raise SecurityError("repetition too large")
            return operator.mul(left, right)
        return super().call_binop(context, operator_, left, right)


def _small_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range is limited to {MAX_RANGE} items")
    return rng


_TEXT = _Sandbox(autoescape=False)
_HTML = _Sandbox(autoescape=True)


def _env(html: bool) -> _Sandbox:
    return _HTML if html else _TEXT


def check(source: str, field: str, *, html: bool = False) -> list[FieldError]:
    """Errors that make ``source`` unusable: syntax (with its line), unknown variables, render failures."""
    env = _env(html)
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as exc:
        return [FieldError(field, f"template syntax error on line {exc.lineno}: {exc.message}")]
    unknown = sorted(meta.find_undeclared_variables(ast) - set(VARIABLES))
    if unknown:
        names = ", ".join(unknown)
        return [
            FieldError(
                field,
                f"unknown variable{'s' if len(unknown) > 1 else ''} {names} (allowed: {', '.join(VARIABLES)})",
            )
        ]
    try:
        env.from_string(source).render(SAMPLE_CONTEXT)
    except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
        return [FieldError(field, f"cannot be rendered: {exc}")]
    return []


class RenderError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class VariableUnavailable(UndefinedError):
    """A documented variable that has no value for this organization (e.g. no payment link configured)."""


def unavailable(name: str, reason: str) -> Any:
    """A context value for a variable that cannot be filled in: a template that prints it (or tests
    it, or filters it) fails to render with ``reason``; one that does not use it renders as usual, and
    ``{{ name | default(...) }}`` / ``{% if name is defined %}`` let an author offer a fallback."""
    return StrictUndefined(hint=reason, name=name, exc=VariableUnavailable)


@lru_cache(maxsize=512)
def _compiled(source: str, html: bool) -> tuple[Any, dict[str, Any]]:
    # Compiling is most of the cost of a render; a dispatch renders the same few templates again and
    # again. With the template, its globals as a plain dict (see ``render``).
    template = _env(html).from_string(source)
    return template, dict(template.globals)


def render(source: str, context: dict[str, Any], *, field: str, html: bool = False) -> str:
    template, template_globals = _compiled(source, html)
    try:
        # What ``Template.render`` does, minus merging the environment's globals (a ChainMap) into a
        # new dict on every call: a dispatched message renders up to three texts, and this halves
        # the cost of each. The variables still shadow the globals, as in ``render``.
        variables = template.new_context({**template_globals, **context}, shared=True)
        return template.environment.concat(template.root_render_func(variables))  # type: ignore[no-any-return]
    except VariableUnavailable as exc:
        raise RenderError(field, str(exc)) from None
    except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
        raise RenderError(field, f"cannot be rendered: {exc}") from None


@lru_cache(maxsize=512)
def variables_used(source: str, html: bool = False) -> frozenset[str]:
    """The variables a (valid) template refers to; empty if it does not parse."""
    try:
        return frozenset(meta.find_undeclared_variables(_env(html).parse(source)))
    except TemplateSyntaxError:
        return frozenset()


def amount_text(value: Decimal | None, places: int = 2) -> str:
    if value is None:
        return ""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-places)))


def account_context(
    *,
    debtor_name: str,
    balance: Decimal,
    currency: str,
    currency_places: int,
    invoice_number: str | None,
    invoice_amount: Decimal | None,
    invoice_due_date: date | None,
    today: date,
    payment_link: Any,  # a URL, or rendering.unavailable(...) when none can be given
    unsubscribe_link: str,
    organization_name: str,
) -> dict[str, Any]:
    """The variables of one account (SPEC §7). Missing values (no carrying invoice) render empty."""
    return {
        "debtor_name": debtor_name,
        "balance": amount_text(balance, currency_places),
        "currency": currency,
        "carrying_invoice_number": invoice_number or "",
        "carrying_invoice_amount": amount_text(invoice_amount, currency_places),
        "carrying_invoice_due_date": invoice_due_date.isoformat() if invoice_due_date else "",
        "days_overdue": (today - invoice_due_date).days if invoice_due_date else "",
        "payment_link": payment_link,
        "unsubscribe_link": unsubscribe_link,
        "organization_name": organization_name,
    }


# GSM 03.38: the basic character set (one septet each) and the extension table (two septets each).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")


@dataclass(frozen=True)
class SmsSize:
    encoding: str  # "GSM-7" or "UCS-2"
    characters: int  # what the person typed
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2): what the network counts
    segments: int


def sms_size(text: str) -> SmsSize:
    """Segments of an SMS: GSM-7 fits 160 septets in one message, 153 per part when split;
    anything outside GSM-7 makes the whole message UCS-2: 70 units, 67 per part."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        units = sum(2 if c in GSM7_EXTENSION else 1 for c in text)
        single, part, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part, encoding = 70, 67, "UCS-2"
    if units == 0:
        segments = 0
    elif units <= single:
        segments = 1
    else:
        segments = math.ceil(units / part)
    return SmsSize(encoding=encoding, characters=len(text), units=units, segments=segments)

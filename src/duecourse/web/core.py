"""What every page route shares: templates, the logged-in user, CSRF, flash messages, HTML errors.

A page route is thin: it takes a :class:`Web` (the request's session, principal, user, clock and CSRF
token), calls the domain services, and answers ``web.render(...)`` or ``web.redirect(...)``.

* Not logged in: ``web: WebPage`` answers a 303 redirect to ``/login?next=<path>``.
* Role: ``Operator = Annotated[Web, page_requires(Permission.x)]`` then ``web: Operator`` refuses
  with the HTML 403 page; templates hide the buttons with ``can('x')`` (the server still checks).
* Forms: every POST route takes ``form: CsrfForm``; a missing or wrong ``csrf_token`` field (or an
  ``X-CSRF-Token`` header for fetch calls) is refused with 403. Templates put ``{{ csrf_field() }}``
  in every form.
* Domain errors raised anywhere in a page route (Forbidden, NotFound, Conflict...) become an HTML
  error page through :class:`PageRoute`; forms that want errors beside their fields catch
  :class:`~duecourse.errors.ValidationFailed` themselves (see :func:`field_errors`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from duecourse.clock import Clock
from duecourse.deps import SESSION_COOKIE, AppClock, DbSession, principal_from_cookie
from duecourse.errors import DomainError, FieldError, ValidationFailed
from duecourse.tenancy.models import Organization, User
from duecourse.tenancy.principal import Permission, Principal

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))

FLASH_COOKIE = "duecourse_flash"
NONCE_COOKIE = "duecourse_csrf_nonce"  # binds the login form's CSRF token before a session exists
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
CSRF_MAX_AGE = 12 * 3600

NAV = (
    ("execution", "Execution", "/execution"),
    ("campaigns", "Campaigns", "/campaigns"),
    ("strategies", "Strategies", "/strategies"),
    ("auto_collection", "Auto Collection", "/auto-collection"),
    ("accounts", "Accounts", "/accounts"),
    ("tasks", "Tasks", "/tasks"),
    ("templates", "Templates", "/templates"),
    ("import", "Import", "/import"),
    ("settings", "Settings", "/settings"),
    ("outbox", "Sandbox outbox", "/outbox"),
)


# --- CSRF --------------------------------------------------------------------------------------


def _csrf_serializer(request: Request) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(request.app.state.settings.secret_key, salt="duecourse-csrf")


def _binding(request: Request) -> str | None:
    """What a token is tied to: the session cookie, or before login the nonce cookie."""
    raw = request.cookies.get(SESSION_COOKIE) or request.cookies.get(NONCE_COOKIE)
    return hashlib.sha256(raw.encode()).hexdigest()[:32] if raw else None


def csrf_token(request: Request, binding: str | None = None) -> str:
    return _csrf_serializer(request).dumps(binding or _binding(request) or "")


def csrf_ok(request: Request, token: str | None) -> bool:
    binding = _binding(request)
    if not token or not binding:
        return False
    try:
        value = _csrf_serializer(request).loads(token, max_age=CSRF_MAX_AGE)
    except (BadSignature, SignatureExpired):
        return False
    return secrets.compare_digest(str(value), binding)


class CsrfRefused(DomainError):
    def __init__(self) -> None:
        super().__init__(
            "The form expired or did not come from this site. Go back, reload the page and try again.",
            [],
            403,
            "csrf",
        )


async def _checked_form(request: Request) -> FormData:
    form = await request.form()
    token = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not csrf_ok(request, token if isinstance(token, str) else None):
        raise CsrfRefused()
    return form


CsrfForm = Annotated[FormData, Depends(_checked_form)]


# --- the logged-in user --------------------------------------------------------------------------


class LoginRequired(HTTPException):
    def __init__(self, request: Request) -> None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        super().__init__(status_code=303, headers={"Location": "/login?next=" + quote(path, safe="")})


@dataclass
class Web:
    """The request as a page route sees it."""

    request: Request
    session: Session
    clock: Clock
    principal: Principal
    user: User
    organization: Organization
    flash: list[tuple[str, str]] = field(default_factory=list)

    def can(self, permission: str | Permission) -> bool:
        return self.principal.can(Permission(permission))

    def require(self, permission: Permission) -> None:
        self.principal.require(permission)

    def now(self) -> datetime:
        return self.clock.now()

    @property
    def csrf(self) -> str:
        return csrf_token(self.request)

    def render(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        ctx = base_context(self.request, web=self, **context)
        response = templates.TemplateResponse(self.request, template, ctx, status_code=status_code)
        if self.request.cookies.get(FLASH_COOKIE):
            response.delete_cookie(FLASH_COOKIE)
        return response

    def redirect(self, url: str, message: str | None = None, level: str = "success") -> RedirectResponse:
        """303 to ``url`` (POST-redirect-GET), with an optional message shown on the next page."""
        response = RedirectResponse(url, status_code=303)
        if message:
            set_flash(response, message, level)
        return response


def set_flash(response: Response, message: str, level: str = "success") -> None:
    response.set_cookie(FLASH_COOKIE, quote(f"{level}|{message}"[:400]), httponly=True, samesite="lax")


def _read_flash(request: Request) -> list[tuple[str, str]]:
    from urllib.parse import unquote

    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return []
    level, _, message = unquote(raw).partition("|")
    if level not in ("success", "error", "info") or not message:
        return []
    return [(level, message)]


def _web(request: Request, session: DbSession, clock: AppClock) -> Web:
    principal = principal_from_cookie(request, session)
    if principal is None:
        raise LoginRequired(request)
    user = session.get(User, principal.user_id)
    org = session.get(Organization, principal.organization_id)
    assert user is not None and org is not None
    return Web(request, session, clock, principal, user, org, _read_flash(request))


WebPage = Annotated[Web, Depends(_web)]


def page_requires(permission: Permission) -> Any:
    """Dependency: the page context after checking the role grants ``permission`` (HTML 403 otherwise)."""

    def _check(web: WebPage) -> Web:
        web.require(permission)
        return web

    return Depends(_check)


# --- HTML errors -------------------------------------------------------------------------------


class PageRoute(APIRoute):
    """Domain errors in page routes answer an HTML page (403, 404, 409...) instead of JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except DomainError as exc:
                return error_page(request, exc)

        return handler


def error_page(request: Request, exc: DomainError) -> HTMLResponse:
    titles = {403: "Not allowed", 404: "Not found", 409: "Cannot do that now", 422: "Invalid request"}
    # The page keeps its navigation and user menu: the session is read again on a short session of its own
    # (the request's may have been rolled back).
    with request.app.state.db.sessionmaker() as session:
        try:
            web: Web | None = _web(request, session, request.app.state.clock)
        except LoginRequired:
            web = None
        if web is not None:
            web.flash = []
        return templates.TemplateResponse(
            request,
            "error.html",
            base_context(request, web=web, error=exc, title=titles.get(exc.status_code, "Error")),
            status_code=exc.status_code,
        )


# --- forms -------------------------------------------------------------------------------------


def field_errors(exc: DomainError) -> dict[str, str]:
    """``{"stages[0].days": "must be ..."}``: one message per field path (a form's error map).

    Errors without a field are kept under ``""`` so the form can show them at the top."""
    out: dict[str, str] = {}
    for f in exc.fields:
        out.setdefault(f.field or "", f.message)
    if not exc.fields:
        out[""] = exc.message
    return out


_FRIENDLY = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "missing": "is required",
    "string_too_short": "is required",
    "enum": "choose one of the options",
    "literal_error": "choose one of the options",
}


def pydantic_errors(exc: ValidationError) -> ValidationFailed:
    """A pydantic error as the API's ValidationFailed, with the same field paths (``stages[1].days``)."""
    fields = []
    for e in exc.errors():
        path = ""
        for p in e.get("loc", ()):
            path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
        msg = _FRIENDLY.get(e.get("type", ""), e.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        fields.append(FieldError(path, msg))
    return ValidationFailed("Invalid input", fields)


def safe_path(value: Any, default: str = "/") -> str:
    """A local path to redirect to (never another site: no ``//host`` and no ``/\\host``)."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def query_url(path: str, **params: Any) -> str:
    clean = {k: v for k, v in params.items() if v not in (None, "")}
    return path + ("?" + urlencode(clean) if clean else "")


# --- template helpers --------------------------------------------------------------------------


def _tz(web: Web | None) -> ZoneInfo:
    return ZoneInfo(web.organization.timezone if web else "UTC")


def base_context(request: Request, *, web: Web | None, **context: Any) -> dict[str, Any]:
    def fmt_dt(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
        if value is None:
            return "—"
        return value.astimezone(_tz(web)).strftime(fmt)

    def can(permission: str) -> bool:
        return web is not None and web.can(permission)

    def csrf_field() -> Any:
        from markupsafe import Markup

        return Markup(f'<input type="hidden" name="{CSRF_FIELD}" value="{csrf_token(request)}">')

    return {
        "request": request,
        "web": web,
        "nav": NAV,
        "user": web.user if web else None,
        "principal": web.principal if web else None,
        "organization": web.organization if web else None,
        "flash": web.flash if web else [],
        "can": can,
        "csrf_field": csrf_field,
        "csrf_token": (lambda: csrf_token(request)),
        "fmt_dt": fmt_dt,
        "query_url": query_url,
        **context,
    }


def _money(value: Decimal | None, currency: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.2f}" + (f" {currency}" if currency else "")


def _label(value: Any) -> str:
    """``high_risk`` -> ``High risk``; enums by value."""
    text = str(getattr(value, "value", value) or "")
    return text.replace("_", " ").capitalize()


def _date(value: date | None) -> str:
    return value.isoformat() if value else "—"


templates.env.filters["money"] = _money
templates.env.filters["label"] = _label
templates.env.filters["isodate"] = _date
templates.env.globals["static_version"] = "1"
templates.env.globals["action_labels"] = {
    "email": "Email", "sms": "SMS", "whatsapp": "WhatsApp", "voice": "AI voice call", "phone_call": "Phone call task",
    "escalation": "Escalation", "place_on_stop": "Place on stop",
}

"""FastAPI dependencies shared by every router: the request's session, the clock, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from duecourse.clock import Clock
from duecourse.db.session import unit_of_work
from duecourse.errors import Forbidden, Unauthorized
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.principal import Permission, Principal
from duecourse.tenancy.security import load_session_token

SESSION_COOKIE = "duecourse_session"


def _session(request: Request) -> Iterator[Session]:
    """One session per request: commits when the route returns, rolls back when it raises."""
    with unit_of_work(request.app.state.db.sessionmaker()) as session:
        yield session


# scope="function": commit before the response is sent, so a failed commit is never reported as success.
DbSession = Annotated[Session, Depends(_session, scope="function")]


def _clock(request: Request) -> Clock:
    return request.app.state.clock


AppClock = Annotated[Clock, Depends(_clock)]


def _principal(request: Request, session: DbSession, clock: AppClock) -> Principal:
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Use 'Authorization: Bearer <api key>'")
        principal = tenancy.principal_for_api_key(session, token.strip(), clock.now())
        if principal is None:
            raise Unauthorized("Invalid or revoked API key")
        return principal
    principal = principal_from_cookie(request, session)
    if principal is None:
        raise Unauthorized()
    if request.method not in _SAFE_METHODS and not from_own_pages(request):
        raise Forbidden(
            "Cross-site request refused: with a browser session, changes are made from duecourse's own pages "
            "(programs use an API key: 'Authorization: Bearer <api key>')"
        )
    return principal


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _origin(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower()


def from_own_pages(request: Request) -> bool:
    """Whether a request carrying the session cookie comes from this app's own pages (or from no
    page at all: a program with a copied cookie), not from another site's page, which a browser would
    send the cookie along with (CSRF; the API's JSON and body-less calls carry no CSRF token).

    Current browsers say where a request comes from in ``Sec-Fetch-Site``, which is trusted when
    present (it also holds behind a proxy that rewrites the host). Older ones send ``Origin`` with
    every cross-origin POST: it must then be this app's address (``DUECOURSE_PUBLIC_URL``, or the
    address the request came in on). A request with neither comes from no browser page."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    own = {_origin(str(request.base_url)), _origin(request.app.state.settings.public_url)}
    return origin != "null" and _origin(origin) in own


def principal_from_cookie(request: Request, session: Session) -> Principal | None:
    """The logged-in user of the session cookie (the web pages and the API share it), or None."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    settings = request.app.state.settings
    data = load_session_token(settings.secret_key, cookie, settings.session_max_age_seconds)
    if data is None:
        return None
    return tenancy.principal_for_user(session, *data)


def end_cookie_session(request: Request, session: Session) -> None:
    """Logout: end every session of the session cookie's user (if the cookie is a valid one)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    settings = request.app.state.settings
    data = load_session_token(settings.secret_key, cookie, settings.session_max_age_seconds) if cookie else None
    if data is not None:
        tenancy.end_sessions(session, user_id=data[0], mark=data[1])


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def requires(permission: Permission):  # type: ignore[no-untyped-def]
    """Dependency: the caller, after checking their role grants ``permission`` (403 otherwise)."""

    def _check(principal: CurrentPrincipal) -> Principal:
        principal.require(permission)
        return principal

    return Depends(_check)


Reader = Annotated[Principal, requires(Permission.read)]

"""Log in and log out (SPEC §1): email and password, the signed session cookie, CSRF on both forms."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from duecourse.deps import SESSION_COOKIE, AppClock, DbSession, end_cookie_session, principal_from_cookie
from duecourse.errors import Unauthorized
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.security import new_session_token
from duecourse.web.core import (
    CSRF_FIELD,
    NONCE_COOKIE,
    CsrfForm,
    PageRoute,
    base_context,
    csrf_token,
    safe_path,
    templates,
)

router = APIRouter(route_class=PageRoute)
HOME = "/execution"


def _safe_next(value: Any) -> str:
    """Only local paths: never redirect a login to another site."""
    return safe_path(value, HOME)


def _login_page(request: Request, *, email: str = "", error: str | None = None, next_url: str = HOME,
                status_code: int = 200) -> HTMLResponse:
    nonce = request.cookies.get(NONCE_COOKIE) or secrets.token_urlsafe(24)
    import hashlib

    binding = hashlib.sha256(nonce.encode()).hexdigest()[:32]
    ctx = base_context(request, web=None, email=email, error=error, next_url=next_url,
                       login_csrf=csrf_token(request, binding), csrf_name=CSRF_FIELD)
    response = templates.TemplateResponse(request, "login.html", ctx, status_code=status_code)
    if not request.cookies.get(NONCE_COOKIE):
        response.set_cookie(NONCE_COOKIE, nonce, httponly=True, samesite="lax",
                            secure=request.app.state.settings.secure_cookies)
    return response


@router.get("/login")
def login_page(request: Request, session: DbSession, next: str = HOME) -> Response:
    if principal_from_cookie(request, session) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, next_url=_safe_next(next))


@router.post("/login")
def login(request: Request, form: CsrfForm, session: DbSession, clock: AppClock) -> Response:
    email = str(form.get("email") or "")
    password = str(form.get("password") or "")
    next_url = _safe_next(form.get("next"))
    try:
        user = tenancy.authenticate_password(session, email=email, password=password, now=clock.now())
    except Unauthorized as exc:
        return _login_page(request, email=email, error=exc.message, next_url=next_url, status_code=401)
    settings = request.app.state.settings
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        new_session_token(settings.secret_key, user_id=user.id, password_hash=user.password_hash,
                          generation=user.session_generation),
        httponly=True,
        samesite="lax",
        max_age=settings.session_max_age_seconds,
        secure=settings.secure_cookies,
    )
    response.delete_cookie(NONCE_COOKIE, secure=settings.secure_cookies, httponly=True, samesite="lax")
    return response


@router.post("/logout")
def logout(request: Request, form: CsrfForm, session: DbSession) -> Response:
    end_cookie_session(request, session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, secure=request.app.state.settings.secure_cookies, httponly=True,
                           samesite="lax")
    return response

"""REST routes for authentication, the organization, users, API keys and settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from sqlalchemy import select

from duecourse.deps import (
    SESSION_COOKIE,
    AppClock,
    CurrentPrincipal,
    DbSession,
    Reader,
    end_cookie_session,
    from_own_pages,
    requires,
)
from duecourse.errors import FieldError, Forbidden, ValidationFailed
from duecourse.tenancy import service
from duecourse.pagination import Page, PageParams, paginate
from duecourse.tenancy.models import AuditEntry, User
from duecourse.tenancy.principal import ROLE_PERMISSIONS, Permission, Principal
from duecourse.tenancy.schemas import (
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    AuditEntryOut,
    LoginIn,
    MeOut,
    OrganizationOut,
    OrganizationPatch,
    UserIn,
    UserOut,
    UserPatch,
)
from duecourse.tenancy.scope import get_owned, scoped
from duecourse.tenancy.security import new_session_token
from duecourse.tenancy.settings import OrgSettings

router = APIRouter(tags=["organization and access"])
Admin = requires(Permission.manage_users)
SettingsAdmin = requires(Permission.manage_settings)


@router.post("/auth/login", response_model=UserOut, summary="Log in with email and password (sets a session cookie)")
def login(body: LoginIn, request: Request, response: Response, session: DbSession, clock: AppClock) -> User:
    user = service.authenticate_password(session, email=body.email, password=body.password, now=clock.now())
    settings = request.app.state.settings
    token = new_session_token(settings.secret_key, user_id=user.id, password_hash=user.password_hash,
                              generation=user.session_generation)
    response.set_cookie(
        SESSION_COOKIE, token, httponly=True, samesite="lax", max_age=settings.session_max_age_seconds,
        secure=settings.secure_cookies,
    )
    return user


@router.post(
    "/auth/logout", status_code=204,
    summary="Log out: clears the session cookie and ends every session of the user, on every device",
)
def logout(request: Request, response: Response, session: DbSession) -> Response:
    if not from_own_pages(request):  # another site's page must not end the user's sessions
        raise Forbidden("Cross-site request refused: log out from duecourse's own pages")
    end_cookie_session(request, session)
    response.delete_cookie(SESSION_COOKIE)
    response.status_code = 204
    return response


@router.get("/me", response_model=MeOut, summary="The caller: organization, role and permissions")
def me(principal: CurrentPrincipal, session: DbSession) -> dict[str, Any]:
    org = service.get_organization(session, principal.organization_id)
    return {
        "organization": org,
        "role": principal.role,
        "actor": principal.actor,
        "user_id": principal.user_id,
        "permissions": sorted(p.value for p in ROLE_PERMISSIONS[principal.role]),
    }


@router.get("/organization", response_model=OrganizationOut)
def get_organization(principal: Reader, session: DbSession) -> Any:
    return service.get_organization(session, principal.organization_id)


@router.patch("/organization", response_model=OrganizationOut)
def patch_organization(body: OrganizationPatch, session: DbSession, clock: AppClock, principal: Principal = SettingsAdmin) -> Any:
    return service.update_organization(session, principal=principal, values=body.model_dump(exclude_unset=True),
                                       now=clock.now())


@router.get("/users", response_model=list[UserOut])
def list_users(session: DbSession, principal: Principal = Admin) -> Any:
    return service.list_users(session, organization_id=principal.organization_id)


@router.post("/users", response_model=UserOut, status_code=201)
def create_user(body: UserIn, session: DbSession, clock: AppClock, principal: Principal = Admin) -> Any:
    return service.create_user(
        session,
        organization_id=principal.organization_id,
        email=body.email,
        password=body.password,
        role=body.role,
        name=body.name,
        now=clock.now(),
    )


@router.get("/users/{user_id}", response_model=UserOut)
def get_user(user_id: int, session: DbSession, principal: Principal = Admin) -> Any:
    return get_owned(session, User, user_id, principal.organization_id, "User")


@router.patch("/users/{user_id}", response_model=UserOut)
def patch_user(user_id: int, body: UserPatch, session: DbSession, clock: AppClock, principal: Principal = Admin) -> Any:
    return service.update_user(
        session, principal=principal, user_id=user_id, changes=body.model_dump(exclude_unset=True), now=clock.now()
    )


@router.delete("/users/{user_id}", status_code=204)
def delete_user(user_id: int, session: DbSession, principal: Principal = Admin) -> Response:
    user = get_owned(session, User, user_id, principal.organization_id, "User")
    if user.id == principal.user_id:
        raise ValidationFailed.on("user_id", "you cannot delete yourself")
    admins = session.scalars(
        select(User.id).where(User.organization_id == principal.organization_id, User.role == "admin", User.active)
    ).all()
    # (an inactive admin can always go: deleting it leaves the active admins as they are)
    if user.role == "admin" and user.active and not [a for a in admins if a != user.id]:
        raise ValidationFailed("The last admin cannot be deleted", [FieldError("user_id", "last admin")])
    from duecourse.engine.references import forget

    forget(session, column="user_id", value=user.id)
    session.delete(user)
    return Response(status_code=204)


@router.get("/api-keys", response_model=list[ApiKeyOut])
def list_api_keys(session: DbSession, principal: Principal = Admin) -> Any:
    return service.list_api_keys(session, organization_id=principal.organization_id)


@router.post("/api-keys", response_model=ApiKeyCreated, status_code=201, summary="Create an API key (shown once)")
def create_api_key(body: ApiKeyIn, session: DbSession, clock: AppClock, principal: Principal = Admin) -> Any:
    created = service.create_api_key(
        session,
        organization_id=principal.organization_id,
        name=body.name,
        role=body.role,
        now=clock.now(),
        created_by_user_id=principal.user_id,
    )
    return {**ApiKeyOut.model_validate(created.api_key).model_dump(), "key": created.key}


@router.post("/api-keys/{key_id}/revoke", response_model=ApiKeyOut, summary="Revoke an API key")
def revoke_api_key(key_id: int, session: DbSession, clock: AppClock, principal: Principal = Admin) -> Any:
    return service.revoke_api_key(session, organization_id=principal.organization_id, key_id=key_id, now=clock.now())


@router.get("/settings", response_model=OrgSettings, summary="Organization settings: automation, dispatch rules, outcomes, exclusions, messages, sandbox")
def get_settings(principal: Reader, session: DbSession) -> Any:
    return service.get_settings(session, principal.organization_id)


@router.patch("/settings", response_model=OrgSettings, summary="Change settings (nested partial update, audited)")
def patch_settings(
    session: DbSession, clock: AppClock, body: dict[str, Any] = Body(...), principal: Principal = SettingsAdmin
) -> Any:
    return service.update_settings(session, principal=principal, patch=body, now=clock.now())


@router.get("/audit-log", response_model=Page[AuditEntryOut], summary="The audit log, newest first")
def list_audit_log(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    entity_type: str | None = Query(None, description="strategy, campaign or settings"),
    entity_id: int | None = None,
) -> Any:
    stmt = scoped(AuditEntry, principal.organization_id)
    if entity_type is not None:
        stmt = stmt.where(AuditEntry.entity_type == entity_type)
    if entity_id is not None:
        stmt = stmt.where(AuditEntry.entity_id == entity_id)
    return paginate(session, stmt, AuditEntry.id, page, AuditEntryOut.model_validate, descending=True)

"""Organizations, users, API keys and organization settings. Services never commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from duecourse.errors import Conflict, FieldError, NotFound, Unauthorized, ValidationFailed
from duecourse.tenancy import audit
from duecourse.tenancy.models import ApiKey, Organization, OrganizationSettings, Role, User
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.scope import get_owned, scoped
from duecourse.tenancy.security import hash_api_key, hash_password, new_api_key, session_mark, verify_password
from duecourse.tenancy.settings import OrgSettings


@dataclass
class CreatedKey:
    api_key: ApiKey
    key: str


def create_organization(
    session: Session, *, name: str, timezone: str, base_currency: str, now: datetime
) -> Organization:
    """Create an organization with default settings."""
    org = Organization(name=name, timezone=timezone, base_currency=base_currency, created_at=now)
    session.add(org)
    session.flush()
    session.add(OrganizationSettings(organization_id=org.id, data=OrgSettings().model_dump(mode="json"), updated_at=now))
    return org


def create_user(
    session: Session, *, organization_id: int, email: str, password: str, role: Role, name: str, now: datetime
) -> User:
    """Create a user; emails are unique across duecourse because they are the login."""
    email = email.strip().lower()
    if session.scalar(select(func.count()).select_from(User).where(User.email == email)):
        raise Conflict("A user with this email already exists", [FieldError("email", "already registered")])
    if len(password) < 8:
        raise ValidationFailed.on("password", "must be at least 8 characters")
    user = User(
        organization_id=organization_id,
        email=email,
        name=name,
        password_hash=hash_password(password),
        role=role,
        created_at=now,
    )
    session.add(user)
    session.flush()
    return user


def authenticate_password(session: Session, *, email: str, password: str, now: datetime) -> User:
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None or not user.active or not verify_password(user.password_hash, password):
        raise Unauthorized("Wrong email or password")
    user.last_login_at = now
    return user


def create_api_key(
    session: Session, *, organization_id: int, name: str, role: Role, now: datetime, created_by_user_id: int | None = None
) -> CreatedKey:
    """Create an API key. The returned plain key is never stored and cannot be shown again."""
    key = new_api_key()
    row = ApiKey(
        organization_id=organization_id,
        name=name,
        role=role,
        prefix=key[:10],
        key_hash=hash_api_key(key),
        created_by_user_id=created_by_user_id,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return CreatedKey(row, key)


def revoke_api_key(session: Session, *, organization_id: int, key_id: int, now: datetime) -> ApiKey:
    row = get_owned(session, ApiKey, key_id, organization_id, "API key")
    if row.revoked_at is None:
        row.revoked_at = now
    return row


def principal_for_api_key(session: Session, key: str, now: datetime) -> Principal | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    row.last_used_at = now
    return Principal(organization_id=row.organization_id, role=row.role, actor=f"api-key:{row.name}", api_key_id=row.id)


def principal_for_user(session: Session, user_id: int, mark: str) -> Principal | None:
    """The principal of a session cookie's user: active, with the password the session was opened
    with and not logged out since (``mark``, :func:`~duecourse.tenancy.security.session_mark`)."""
    user = session.get(User, user_id)
    if user is None or not user.active or session_mark(user.password_hash, user.session_generation) != mark:
        return None
    return Principal(organization_id=user.organization_id, role=user.role, actor=user.email, user_id=user.id)


def end_sessions(session: Session, *, user_id: int, mark: str) -> None:
    """Logout: every session cookie of the user stops working (this one, and any copy of it or other
    session opened before), if ``mark`` is still a valid session's."""
    user = session.get(User, user_id)
    if user is not None and session_mark(user.password_hash, user.session_generation) == mark:
        user.session_generation += 1


def update_user(session: Session, *, principal: Principal, user_id: int, changes: dict[str, Any], now: datetime) -> User:
    """Change a user's name, role, password or active flag. Nobody demotes or deactivates themselves
    (an organization must not lose its last way in by accident); role and access changes are audited."""
    user = get_owned(session, User, user_id, principal.organization_id, "User")
    if user.id == principal.user_id:
        if changes.get("role") not in (None, user.role, getattr(user.role, "value", user.role)):
            raise ValidationFailed.on("role", "you cannot change your own role")
        if changes.get("active") is False:
            raise ValidationFailed.on("active", "you cannot deactivate yourself")
    nulls = [k for k, v in changes.items() if v is None]
    if nulls:
        raise ValidationFailed("Invalid user", [FieldError(k, "must not be null") for k in nulls])
    audited: dict[str, tuple[Any, Any]] = {}
    for key, value in changes.items():
        if key == "password":
            user.password_hash = hash_password(value)
            audited["password"] = ("", "changed")
            continue
        old = getattr(user, key)
        if key == "role":
            value = Role(value)
        if old != value:
            setattr(user, key, value)
            if key in ("role", "active"):
                audited[key] = (getattr(old, "value", old), getattr(value, "value", value))
    if audited:
        audit.record_changes(session, principal=principal, at=now, entity_type="user", entity_id=user.id,
                             changes=audited, description_prefix=f"User {user.email}")
    return user


def list_users(session: Session, *, organization_id: int) -> list[User]:
    return list(session.scalars(scoped(User, organization_id).order_by(User.id)))


def list_api_keys(session: Session, *, organization_id: int) -> list[ApiKey]:
    return list(session.scalars(scoped(ApiKey, organization_id).order_by(ApiKey.id)))


def get_organization(session: Session, organization_id: int) -> Organization:
    org = session.get(Organization, organization_id)
    if org is None:
        raise NotFound("Organization")
    return org


def update_organization(session: Session, *, principal: Principal, values: dict[str, Any], now: datetime) -> Organization:
    """Change the organization's own fields (name, time zone, base currency); each change audited
    like a settings change (SPEC §3)."""
    org = get_organization(session, principal.organization_id)
    nulls = [k for k, v in values.items() if v is None]
    if nulls:
        raise ValidationFailed("Invalid organization", [FieldError(k, "must not be null") for k in nulls])
    changes = {k: (getattr(org, k), v) for k, v in values.items()}
    for k, v in values.items():
        setattr(org, k, v)
    audit.record_changes(session, principal=principal, at=now, entity_type="organization", entity_id=org.id,
                         changes=changes, description_prefix="Organization")
    if "base_currency" in changes and changes["base_currency"][0] != changes["base_currency"][1]:
        # The minimum balance of the exclusion rules is in the base currency (§6).
        session.info.get("org_settings", {}).pop(org.id, None)
        _refresh_tabs(session, org.id)
    return org


def get_settings(session: Session, organization_id: int) -> OrgSettings:
    """The organization's settings, validated once per session (the engine asks for them per item)."""
    memo = session.info.setdefault("org_settings", {})
    if organization_id not in memo:
        row = session.get(OrganizationSettings, organization_id)
        memo[organization_id] = _with_currencies(session, organization_id, OrgSettings.model_validate(row.data if row else {}))
    return memo[organization_id]


def _with_currencies(session: Session, organization_id: int, settings: OrgSettings) -> OrgSettings:
    """The exclusion rules with the minimum balance in every currency the organization has a rate for."""
    org = session.get(Organization, organization_id)
    if org is not None:
        settings.exclusions.for_currencies(org.base_currency, settings.exchange_rates)
    return settings


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def update_settings(
    session: Session, *, principal: Principal, patch: dict[str, Any], now: datetime
) -> OrgSettings:
    """Apply a partial update (nested keys), validate the whole, and audit each changed field."""
    row = session.get(OrganizationSettings, principal.organization_id)
    current = OrgSettings.model_validate(row.data if row else {}).model_dump(mode="json")
    try:
        updated = OrgSettings.model_validate(_merge(current, patch))
    except ValidationError as exc:
        raise ValidationFailed(
            "Invalid settings",
            [FieldError(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()],
        ) from None
    new_data = updated.model_dump(mode="json")
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _flatten("", current, before)
    _flatten("", new_data, after)
    changes = {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    audit.record_changes(
        session,
        principal=principal,
        at=now,
        entity_type="settings",
        entity_id=None,
        changes=changes,
        description_prefix="Settings",
    )
    if row is None:
        row = OrganizationSettings(organization_id=principal.organization_id, data=new_data, updated_at=now)
        session.add(row)
    else:
        row.data = new_data
        row.updated_at = now
    session.info.get("org_settings", {}).pop(principal.organization_id, None)
    if any(k.startswith(("exclusions.", "exchange_rates")) for k in changes):
        _refresh_tabs(session, principal.organization_id)
    return updated


def _refresh_tabs(session: Session, organization_id: int) -> None:
    """SPEC §6: exclusion rules decide the Blocked tab (the minimum balance, in the base currency,
    through the exchange rates), so after a change to any of them every account's tab is
    recomputed. Balances do not depend on them: the one set-based tab update is enough."""
    from duecourse.ledger.derived import refresh_tabs

    session.flush()
    refresh_tabs(session, organization_id=organization_id, exclusions=get_settings(session, organization_id).exclusions)

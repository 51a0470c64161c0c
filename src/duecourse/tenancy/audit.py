"""The append-only audit log (SPEC §3): strategies, campaign status changes, settings."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from sqlalchemy.orm import Session

from duecourse.tenancy.models import AuditEntry
from duecourse.tenancy.principal import Principal


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (str, int, Decimal, bool)):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return json.dumps(value, default=str, sort_keys=True)


def record(
    session: Session,
    *,
    principal: Principal,
    at: datetime,
    entity_type: str,
    entity_id: int | None,
    action: str,
    description: str,
    field: str | None = None,
    old: Any = None,
    new: Any = None,
) -> AuditEntry:
    """Append one audit entry in the caller's transaction."""
    entry = AuditEntry(
        organization_id=principal.organization_id,
        at=at,
        entity_type=entity_type,
        entity_id=entity_id,
        action=action,
        field=field,
        old_value=_text(old),
        new_value=_text(new),
        description=description,
        user_id=principal.user_id,
        api_key_id=principal.api_key_id,
        actor=principal.actor,
    )
    session.add(entry)
    return entry


def record_changes(
    session: Session,
    *,
    principal: Principal,
    at: datetime,
    entity_type: str,
    entity_id: int | None,
    changes: dict[str, tuple[Any, Any]],
    description_prefix: str,
) -> None:
    """One ``updated`` entry per field whose value really changed."""
    for name, (old, new) in changes.items():
        if _text(old) == _text(new):
            continue
        record(
            session,
            principal=principal,
            at=at,
            entity_type=entity_type,
            entity_id=entity_id,
            action="updated",
            field=name,
            old=old,
            new=new,
            description=f"{description_prefix}: {name} changed",
        )

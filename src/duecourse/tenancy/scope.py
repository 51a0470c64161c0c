"""The organization scope of every query: forgetting it should be hard.

Every read of business data goes through :func:`scoped` or :func:`get_owned`. Another
organization's object is indistinguishable from a missing one (404, SPEC §1).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from duecourse.errors import NotFound

T = TypeVar("T")


def scoped(model: type[T], organization_id: int, *columns: Any) -> Select[Any]:
    """``SELECT model (or columns) WHERE organization_id = :org``."""
    stmt = select(*columns) if columns else select(model)
    return stmt.where(model.organization_id == organization_id)  # type: ignore[attr-defined]


def get_owned(session: Session, model: type[T], object_id: int, organization_id: int, what: str | None = None) -> T:
    """Load one object of the organization or raise :class:`NotFound`."""
    obj = session.get(model, object_id)
    if obj is None or getattr(obj, "organization_id", None) != organization_id:
        raise NotFound(what or model.__name__)
    return obj

"""Cursor pagination for every list endpoint: stable under inserts, index-friendly at any depth."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import Session

from duecourse.errors import ValidationFailed

T = TypeVar("T")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": last_id}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)["after"]
        if not isinstance(value, int):
            raise ValueError
        return value
    except Exception:
        raise ValidationFailed.on("cursor", "is not a cursor returned by this API") from None


class PageParams:
    def __init__(
        self,
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Items per page (1-500)"),
        cursor: str | None = Query(None, description="next_cursor from the previous page"),
    ) -> None:
        self.limit = limit
        self.after = decode_cursor(cursor) if cursor else None


def paginate(
    session: Session,
    stmt: Select[Any],
    id_column: Any,
    params: PageParams,
    serialize: Callable[[Any], Any],
    *,
    descending: bool = False,
) -> dict[str, Any]:
    """Keyset pagination on ``id_column``: ``WHERE id > :after ORDER BY id LIMIT n+1`` (or newest first)."""
    if params.after is not None:
        stmt = stmt.where(id_column < params.after if descending else id_column > params.after)
    order = id_column.desc() if descending else id_column
    rows: Sequence[Any] = session.scalars(stmt.order_by(order).limit(params.limit + 1)).all()
    more = len(rows) > params.limit
    rows = rows[: params.limit]
    return {
        "items": [serialize(r) for r in rows],
        "next_cursor": encode_cursor(rows[-1].id) if more and rows else None,
    }

"""(being written)"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["inbound webhooks"])
# Mounted at the root, not under /api/v1: the unsubscribe page debtors open.
public_router = APIRouter(include_in_schema=False)

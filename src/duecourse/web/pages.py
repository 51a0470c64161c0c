"""The web UI (SPEC §8): server-rendered pages, one module per screen, all mounted here.

Add a screen: write ``web/<screen>.py`` with ``router = APIRouter(route_class=PageRoute)`` and its
templates under ``web/templates/<screen>/``, then add the module to ``SCREENS`` below.
Conventions: the docstring of ``web/core.py``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.staticfiles import StaticFiles

from duecourse.web import (
    accounts,
    auth,
    auto_collection,
    campaigns,
    execution,
    imports_page,
    outbox,
    settings_page,
    strategies,
    tasks,
    templates_page,
)
from duecourse.web.core import HERE

SCREENS = (
    auth, execution, strategies, campaigns, auto_collection, accounts, tasks, templates_page, imports_page,
    settings_page, outbox,
)

router = APIRouter(include_in_schema=False)
router.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
for _module in SCREENS:
    router.include_router(_module.router)

"""REST routes for strategies (SPEC §3): CRUD, activation, Run Now, audit log, performance."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from duecourse.deps import AppClock, DbSession, Reader, requires
from duecourse.pagination import Page, PageParams
from duecourse.strategies import service
from duecourse.strategies.models import StrategyType
from duecourse.strategies.schemas import (
    PerformanceOut,
    StrategyIn,
    StrategyOut,
    StrategyPage,
    StrategyPatch,
)
from duecourse.tenancy.principal import Permission, Principal
from duecourse.tenancy.schemas import AuditEntryOut

router = APIRouter(tags=["strategies"])
Manage = requires(Permission.manage_strategies)
# Run Now enqueues work: the managers who operate the engine may do it, not only admins (SPEC §1).
Operate = requires(Permission.operate_engine)


@router.get(
    "/strategies",
    response_model=StrategyPage,
    summary="List strategies with open cases and average days open",
)
def list_strategies(
    principal: Reader,
    session: DbSession,
    clock: AppClock,
    page: PageParams = Depends(),
    search: str | None = Query(None, max_length=200, description="Case-insensitive substring of the name"),
    type_: StrategyType | None = Query(None, alias="type"),
    active: bool | None = Query(None),
) -> Any:
    return service.list_strategies(
        session,
        organization_id=principal.organization_id,
        params=page,
        now=clock.now(),
        search=search,
        type=type_,
        active=active,
    )


@router.post(
    "/strategies", response_model=StrategyOut, status_code=201, summary="Create a strategy with its stages"
)
def create_strategy(
    body: StrategyIn, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.to_out(service.create_strategy(session, principal=principal, data=body, now=clock.now()))


@router.get("/strategies/{strategy_id}", response_model=StrategyOut)
def get_strategy(strategy_id: int, principal: Reader, session: DbSession) -> Any:
    return service.to_out(
        service.get_strategy(session, organization_id=principal.organization_id, strategy_id=strategy_id)
    )


@router.put(
    "/strategies/{strategy_id}",
    response_model=StrategyOut,
    summary="Replace a strategy: every field and the stage list, in its new order",
)
def replace_strategy(
    strategy_id: int, body: StrategyIn, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.to_out(
        service.replace_strategy(
            session, principal=principal, strategy_id=strategy_id, data=body, now=clock.now()
        )
    )


@router.patch("/strategies/{strategy_id}", response_model=StrategyOut, summary="Change top-level fields")
def patch_strategy(
    strategy_id: int, body: StrategyPatch, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.to_out(
        service.patch_strategy(
            session,
            principal=principal,
            strategy_id=strategy_id,
            patch=body.model_dump(exclude_unset=True),
            now=clock.now(),
        )
    )


@router.delete(
    "/strategies/{strategy_id}", status_code=204, summary="Delete (only inactive, with 0 open cases)"
)
def delete_strategy(
    strategy_id: int, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Response:
    service.delete_strategy(session, principal=principal, strategy_id=strategy_id, now=clock.now())
    return Response(status_code=204)


@router.post("/strategies/{strategy_id}/activate", response_model=StrategyOut)
def activate_strategy(
    strategy_id: int, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.to_out(
        service.set_active(
            session, principal=principal, strategy_id=strategy_id, active=True, now=clock.now()
        )
    )


@router.post("/strategies/{strategy_id}/deactivate", response_model=StrategyOut)
def deactivate_strategy(
    strategy_id: int, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.to_out(
        service.set_active(
            session, principal=principal, strategy_id=strategy_id, active=False, now=clock.now()
        )
    )


@router.post(
    "/strategies/{strategy_id}/run", summary="Run Now: evaluate and enqueue immediately (active only)"
)
def run_strategy(
    strategy_id: int, session: DbSession, clock: AppClock, principal: Principal = Operate
) -> Any:
    return service.run_now(session, principal=principal, strategy_id=strategy_id, now=clock.now())


@router.get(
    "/strategies/{strategy_id}/audit-log",
    response_model=Page[AuditEntryOut],
    summary="Audit log, newest first",
)
def strategy_audit_log(
    strategy_id: int, principal: Reader, session: DbSession, page: PageParams = Depends()
) -> Any:
    return service.strategy_audit_log(
        session, organization_id=principal.organization_id, strategy_id=strategy_id, params=page
    )


@router.get("/strategies/{strategy_id}/performance", response_model=PerformanceOut)
def strategy_performance(strategy_id: int, principal: Reader, session: DbSession, clock: AppClock) -> Any:
    return service.performance(
        session, organization_id=principal.organization_id, strategy_id=strategy_id, now=clock.now()
    )

"""REST routes for campaigns (SPEC §5): CRUD, lifecycle actions, membership, KPIs, audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from duecourse.campaigns import service
from duecourse.campaigns.models import CampaignStatus
from duecourse.campaigns.schemas import (
    CampaignIn,
    CampaignOut,
    CampaignPage,
    CampaignPatch,
    KpisOut,
    MemberPage,
    MembershipAdd,
    MembershipRemove,
    MembershipResult,
)
from duecourse.deps import AppClock, DbSession, Reader, requires
from duecourse.pagination import Page, PageParams
from duecourse.strategies.service import audit_log
from duecourse.tenancy.principal import Permission, Principal
from duecourse.tenancy.schemas import AuditEntryOut

router = APIRouter(tags=["campaigns"])
Manage = requires(Permission.manage_campaigns)


@router.get("/campaigns", response_model=CampaignPage)
def list_campaigns(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    status: CampaignStatus | None = Query(None),
    search: str | None = Query(None, max_length=200, description="Case-insensitive substring of the name"),
) -> Any:
    return service.list_campaigns(
        session, organization_id=principal.organization_id, params=page, status=status, search=search
    )


@router.post(
    "/campaigns", response_model=CampaignOut, status_code=201, summary="Create a campaign (as draft)"
)
def create_campaign(
    body: CampaignIn, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.create_campaign(session, principal=principal, data=body, now=clock.now())


@router.get("/campaigns/{campaign_id}", response_model=CampaignOut)
def get_campaign(campaign_id: int, principal: Reader, session: DbSession) -> Any:
    return service.get_campaign(session, organization_id=principal.organization_id, campaign_id=campaign_id)


@router.put("/campaigns/{campaign_id}", response_model=CampaignOut)
def replace_campaign(
    campaign_id: int, body: CampaignIn, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.update_campaign(
        session, principal=principal, campaign_id=campaign_id, values=body.model_dump(), now=clock.now()
    )


@router.patch("/campaigns/{campaign_id}", response_model=CampaignOut)
def patch_campaign(
    campaign_id: int, body: CampaignPatch, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.update_campaign(
        session,
        principal=principal,
        campaign_id=campaign_id,
        values=body.model_dump(exclude_unset=True),
        now=clock.now(),
    )


@router.delete(
    "/campaigns/{campaign_id}",
    status_code=204,
    summary="Delete: unassigns its accounts, cancels their pending items",
)
def delete_campaign(
    campaign_id: int, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Response:
    service.delete_campaign(session, principal=principal, campaign_id=campaign_id, now=clock.now())
    return Response(status_code=204)


@router.post(
    "/campaigns/{campaign_id}/activate", response_model=CampaignOut, summary="draft or paused -> active"
)
def activate_campaign(
    campaign_id: int, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.transition(
        session, principal=principal, campaign_id=campaign_id, action="activate", now=clock.now()
    )


@router.post(
    "/campaigns/{campaign_id}/pause",
    response_model=CampaignOut,
    summary="active -> paused (cancels pending items)",
)
def pause_campaign(
    campaign_id: int, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.transition(
        session, principal=principal, campaign_id=campaign_id, action="pause", now=clock.now()
    )


@router.post(
    "/campaigns/{campaign_id}/complete", response_model=CampaignOut, summary="active or paused -> completed"
)
def complete_campaign(
    campaign_id: int, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.transition(
        session, principal=principal, campaign_id=campaign_id, action="complete", now=clock.now()
    )


@router.get("/campaigns/{campaign_id}/accounts", response_model=MemberPage)
def list_campaign_accounts(
    campaign_id: int, principal: Reader, session: DbSession, page: PageParams = Depends()
) -> Any:
    return service.list_members(
        session, organization_id=principal.organization_id, campaign_id=campaign_id, params=page
    )


@router.post(
    "/campaigns/{campaign_id}/accounts",
    response_model=MembershipResult,
    summary="Add accounts by ids, external ids or a filter",
)
def add_campaign_accounts(
    campaign_id: int, body: MembershipAdd, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.add_accounts(
        session, principal=principal, campaign_id=campaign_id, body=body, now=clock.now()
    )


@router.delete(
    "/campaigns/{campaign_id}/accounts", response_model=MembershipResult, summary="Remove accounts"
)
def remove_campaign_accounts(
    campaign_id: int,
    body: MembershipRemove,
    session: DbSession,
    clock: AppClock,
    principal: Principal = Manage,
) -> Any:
    return service.remove_accounts(
        session, principal=principal, campaign_id=campaign_id, account_ids=body.account_ids, now=clock.now()
    )


@router.get("/campaigns/{campaign_id}/kpis", response_model=KpisOut)
def campaign_kpis(campaign_id: int, principal: Reader, session: DbSession) -> Any:
    return service.kpis(session, organization_id=principal.organization_id, campaign_id=campaign_id)


@router.get(
    "/campaigns/{campaign_id}/audit-log",
    response_model=Page[AuditEntryOut],
    summary="Status changes, newest first",
)
def campaign_audit_log(
    campaign_id: int, principal: Reader, session: DbSession, page: PageParams = Depends()
) -> Any:
    campaign = service.get_campaign(
        session, organization_id=principal.organization_id, campaign_id=campaign_id
    )
    return audit_log(
        session,
        organization_id=principal.organization_id,
        entity_type=service.ENTITY,
        entity_id=campaign.id,
        params=page,
    )

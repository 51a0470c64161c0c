"""REST routes for message templates (SPEC §7): CRUD, variables, preview."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from duecourse.deps import AppClock, DbSession, Reader, requires
from duecourse.messaging import rendering, service
from duecourse.messaging.models import Channel
from duecourse.messaging.schemas import (
    PreviewIn,
    PreviewOut,
    TemplateIn,
    TemplateOut,
    TemplatePage,
    TemplatePatch,
    VariablesOut,
)
from duecourse.pagination import PageParams
from duecourse.strategies.models import Tone
from duecourse.tenancy.principal import Permission, Principal

router = APIRouter(tags=["templates"])
Manage = requires(Permission.manage_templates)


@router.get("/templates", response_model=TemplatePage)
def list_templates(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    channel: Channel | None = Query(None),
    tone: Tone | None = Query(None),
    search: str | None = Query(None, max_length=200, description="Case-insensitive substring of the name"),
) -> Any:
    return service.list_templates(
        session,
        organization_id=principal.organization_id,
        params=page,
        channel=channel,
        tone=tone,
        search=search,
    )


@router.get("/templates/variables", response_model=VariablesOut, summary="The variables a template may use")
def template_variables(principal: Reader) -> Any:
    return {"variables": list(rendering.VARIABLES), "sample": rendering.SAMPLE_CONTEXT}


@router.post("/templates", response_model=TemplateOut, status_code=201)
def create_template(
    body: TemplateIn, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.create_template(
        session, organization_id=principal.organization_id, data=body, now=clock.now()
    )


@router.get("/templates/{template_id}", response_model=TemplateOut)
def get_template(template_id: int, principal: Reader, session: DbSession) -> Any:
    return service.get_template(session, organization_id=principal.organization_id, template_id=template_id)


@router.put("/templates/{template_id}", response_model=TemplateOut)
def replace_template(
    template_id: int, body: TemplateIn, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.update_template(
        session,
        organization_id=principal.organization_id,
        template_id=template_id,
        values=body.model_dump(),
        now=clock.now(),
    )


@router.patch("/templates/{template_id}", response_model=TemplateOut)
def patch_template(
    template_id: int, body: TemplatePatch, session: DbSession, clock: AppClock, principal: Principal = Manage
) -> Any:
    return service.update_template(
        session,
        organization_id=principal.organization_id,
        template_id=template_id,
        values=body.model_dump(exclude_unset=True),
        now=clock.now(),
    )


@router.delete(
    "/templates/{template_id}", status_code=204, summary="Delete (refused while a strategy stage uses it)"
)
def delete_template(template_id: int, session: DbSession, principal: Principal = Manage) -> Response:
    service.delete_template(session, organization_id=principal.organization_id, template_id=template_id)
    return Response(status_code=204)


@router.post(
    "/templates/{template_id}/preview",
    response_model=PreviewOut,
    summary="Render for an account or sample values",
)
def preview_template(
    template_id: int, principal: Reader, session: DbSession, clock: AppClock, body: PreviewIn | None = None
) -> Any:
    return service.preview(
        session,
        organization_id=principal.organization_id,
        template_id=template_id,
        account_id=body.account_id if body else None,
        now=clock.now(),
    )

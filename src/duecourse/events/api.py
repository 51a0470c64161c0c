"""REST routes for outbound events (SPEC §7, docs/events.md): subscriptions, the delivery log,
redelivery and a test ping. Administrators manage subscriptions; every role may read them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response

from duecourse.channels.secrets import key_from_settings
from duecourse.deps import AppClock, DbSession, Reader, requires
from duecourse.events import service
from duecourse.events.models import DeliveryStatus
from duecourse.events.schemas import (
    DeliveryOut,
    DeliveryPage,
    SubscriptionIn,
    SubscriptionOut,
    SubscriptionPage,
    SubscriptionPatch,
)
from duecourse.pagination import PageParams
from duecourse.tenancy import audit
from duecourse.tenancy.principal import Permission, Principal

router = APIRouter(tags=["outbound events"])
Admin = requires(Permission.manage_settings)
ENTITY = "event_subscription"


def _key(request: Request) -> str:
    return key_from_settings(request.app.state.settings)


@router.get("/event-subscriptions", response_model=SubscriptionPage, summary="List webhook subscriptions")
def list_subscriptions(principal: Reader, session: DbSession, page: PageParams = Depends()) -> Any:
    return service.list_subscriptions(session, organization_id=principal.organization_id, params=page)


@router.post(
    "/event-subscriptions", response_model=SubscriptionOut, status_code=201,
    summary="Subscribe a URL to event types (the signing secret is shown this once)",
)
def create_subscription(
    body: SubscriptionIn, request: Request, session: DbSession, clock: AppClock, principal: Principal = Admin
) -> Any:
    sub, secret = service.create_subscription(
        session, organization_id=principal.organization_id, url=body.url, event_types=body.event_types,
        description=body.description, active=body.active, key=_key(request), now=clock.now(),
    )
    audit.record(session, principal=principal, at=clock.now(), entity_type=ENTITY, entity_id=sub.id,
                 action="created", description=f"Event subscription {sub.id} created for {sub.url}")
    return service.subscription_view(sub, secret)


@router.get("/event-subscriptions/{subscription_id}", response_model=SubscriptionOut)
def get_subscription(subscription_id: int, principal: Reader, session: DbSession) -> Any:
    return service.subscription_view(service.get_subscription(
        session, organization_id=principal.organization_id, subscription_id=subscription_id
    ))


def _update(session: Any, principal: Principal, subscription_id: int, values: dict[str, Any], now: Any) -> Any:
    before = service.subscription_view(service.get_subscription(
        session, organization_id=principal.organization_id, subscription_id=subscription_id
    ))
    sub = service.update_subscription(
        session, organization_id=principal.organization_id, subscription_id=subscription_id, values=values, now=now
    )
    after = service.subscription_view(sub)
    audit.record_changes(
        session, principal=principal, at=now, entity_type=ENTITY, entity_id=sub.id,
        changes={f: (before[f], after[f]) for f in ("url", "event_types", "description", "active")},
        description_prefix=f"Event subscription {sub.id}",
    )
    return after


@router.put("/event-subscriptions/{subscription_id}", response_model=SubscriptionOut)
def replace_subscription(
    subscription_id: int, body: SubscriptionIn, session: DbSession, clock: AppClock, principal: Principal = Admin
) -> Any:
    return _update(session, principal, subscription_id, body.model_dump(), clock.now())


@router.patch("/event-subscriptions/{subscription_id}", response_model=SubscriptionOut)
def patch_subscription(
    subscription_id: int, body: SubscriptionPatch, session: DbSession, clock: AppClock, principal: Principal = Admin
) -> Any:
    return _update(session, principal, subscription_id, body.model_dump(exclude_unset=True), clock.now())


@router.delete(
    "/event-subscriptions/{subscription_id}", status_code=204, summary="Delete a subscription and its delivery log"
)
def delete_subscription(
    subscription_id: int, session: DbSession, clock: AppClock, principal: Principal = Admin
) -> Response:
    service.delete_subscription(session, organization_id=principal.organization_id, subscription_id=subscription_id)
    audit.record(session, principal=principal, at=clock.now(), entity_type=ENTITY, entity_id=subscription_id,
                 action="deleted", description=f"Event subscription {subscription_id} deleted")
    return Response(status_code=204)


@router.post(
    "/event-subscriptions/{subscription_id}/rotate-secret", response_model=SubscriptionOut,
    summary="New signing secret (shown this once); deliveries not yet made are signed with it",
)
def rotate_secret(
    subscription_id: int, request: Request, session: DbSession, clock: AppClock, principal: Principal = Admin
) -> Any:
    sub, secret = service.rotate_secret(
        session, organization_id=principal.organization_id, subscription_id=subscription_id,
        key=_key(request), now=clock.now(),
    )
    audit.record(session, principal=principal, at=clock.now(), entity_type=ENTITY, entity_id=sub.id,
                 action="rotate_secret", description=f"Event subscription {sub.id}: signing secret rotated")
    return service.subscription_view(sub, secret)


@router.post(
    "/event-subscriptions/{subscription_id}/test", response_model=DeliveryOut, status_code=201,
    summary="Queue a test.ping event for this subscription (sent on the next delivery pass)",
)
def test_subscription(
    subscription_id: int, session: DbSession, clock: AppClock, principal: Principal = Admin
) -> Any:
    return service.send_test(
        session, organization_id=principal.organization_id, subscription_id=subscription_id, now=clock.now()
    )


@router.get("/event-deliveries", response_model=DeliveryPage, summary="The delivery log, newest first")
def list_deliveries(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    subscription_id: int | None = Query(None),
    status: DeliveryStatus | None = Query(None),
    type: str | None = Query(None, max_length=64, description="Event type, e.g. promise.created"),  # noqa: A002
) -> Any:
    return service.list_deliveries(
        session, organization_id=principal.organization_id, params=page, subscription_id=subscription_id,
        status=status, type=type,
    )


@router.get("/event-deliveries/{delivery_id}", response_model=DeliveryOut)
def get_delivery(delivery_id: int, principal: Reader, session: DbSession) -> Any:
    return service.get_delivery(session, organization_id=principal.organization_id, delivery_id=delivery_id)


@router.post(
    "/event-deliveries/{delivery_id}/redeliver", response_model=DeliveryOut,
    summary="Send a delivery again on the next pass (a fresh retry schedule)",
)
def redeliver(delivery_id: int, session: DbSession, clock: AppClock, principal: Principal = Admin) -> Any:
    return service.redeliver(
        session, organization_id=principal.organization_id, delivery_id=delivery_id, now=clock.now()
    )

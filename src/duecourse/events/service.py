"""Outbound events (SPEC §7): subscriptions, the transactional outbox, and the delivery pass.

:func:`emit` runs in the caller's transaction and writes one ``event_deliveries`` row per active
subscription of the organization that wants the event type, so an event exists if and only if the
change that caused it committed. :func:`deliver_due` claims due rows as leases (like the engine's
queue: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), posts them with httpx outside any database
transaction, and records each result in a short transaction of its own: a 2xx answer delivers;
anything else (another status, a timeout, a refused connection) schedules a retry with exponential
back-off, and after :data:`MAX_ATTEMPTS` the delivery fails. A manual redelivery restarts the
schedule. Services never commit, except :func:`deliver_due`, which owns its transactions.

Each POST is signed like duecourse's inbound webhooks (:func:`duecourse.channels.webhooks.sign`)::

    X-Duecourse-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from duecourse import __version__
from duecourse.channels import secrets as secret_box
from duecourse.channels.webhooks import SIGNATURE_HEADER, sign
from duecourse.db.dialect import claim_update
from duecourse.errors import Conflict, FieldError, ValidationFailed
from duecourse.events.models import DeliveryStatus, EventDelivery, EventSubscription
from duecourse.pagination import PageParams, paginate
from duecourse.tenancy.scope import get_owned, scoped
from duecourse.validation import currency_places

if TYPE_CHECKING:
    from duecourse.config import Settings
    from duecourse.db import Database

# The event types an organization can subscribe to (docs/events.md describes their payloads).
EVENT_TYPES: tuple[str, ...] = (
    "account.escalated",
    "account.placed_on_stop",
    "account.resolved",
    "promise.created",
    "promise.kept",
    "promise.broken",
    "payment.received",
    "message.bounced",
)
TEST_EVENT = "test.ping"  # sent only by POST /event-subscriptions/{id}/test, to that subscription

EVENT_HEADER = "X-Duecourse-Event"
DELIVERY_HEADER = "X-Duecourse-Delivery"
SECRET_PREFIX = "whsec_"

MAX_ATTEMPTS = 8
FIRST_RETRY = timedelta(minutes=1)  # then 2, 4, 8, 16, 32, 64 minutes
DEFAULT_BATCH = 100
PASS_BUDGET_SECONDS = 30.0  # a pass starts no new POST after this long (the rest waits for the next pass)
RESPONSE_EXCERPT = 500
ERROR_MAX = 1000
LOG_MAX = 50  # attempt-log entries kept per delivery (the newest)


def retry_delay(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: 1 min × 2^(attempts-1)."""
    return FIRST_RETRY * (2 ** max(0, attempts - 1))


# ---------------------------------------------------------------- subscriptions


def new_secret() -> str:
    return SECRET_PREFIX + pysecrets.token_urlsafe(32)


def _validated(url: str | None, event_types: list[str] | None) -> tuple[list[FieldError], list[str] | None]:
    errors: list[FieldError] = []
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            errors.append(FieldError("url", "must be an http:// or https:// address"))
    types: list[str] | None = None
    if event_types is not None:
        types = list(dict.fromkeys(event_types))
        unknown = [t for t in types if t not in EVENT_TYPES]
        if unknown:
            errors.append(FieldError(
                "event_types", f"unknown event type(s): {', '.join(unknown)} (known: {', '.join(EVENT_TYPES)})"
            ))
        elif not types:
            errors.append(FieldError("event_types", "must name at least one event type"))
    return errors, types


def _raise(errors: list[FieldError]) -> None:
    if errors:
        raise ValidationFailed("; ".join(f"{e.field}: {e.message}" for e in errors), errors)


def _store_secret(sub: EventSubscription, secret: str, key: str) -> None:
    sub.secret_encrypted = secret_box.encrypt(key, {"secret": secret})
    sub.secret_masked = secret_box.mask(secret) or "••••"


def create_subscription(
    session: Session, *, organization_id: int, url: str, event_types: list[str], description: str = "",
    active: bool = True, key: str, now: datetime,
) -> tuple[EventSubscription, str]:
    """A new subscription with a generated secret; returns it with the secret (shown this once)."""
    errors, types = _validated(url, event_types)
    _raise(errors)
    secret = new_secret()
    sub = EventSubscription(
        organization_id=organization_id, url=url, description=description, event_types=types, active=active,
        created_at=now, updated_at=now,
    )
    _store_secret(sub, secret, key)
    session.add(sub)
    session.flush()
    return sub, secret


def get_subscription(session: Session, *, organization_id: int, subscription_id: int) -> EventSubscription:
    return get_owned(session, EventSubscription, subscription_id, organization_id, "Event subscription")


def list_subscriptions(session: Session, *, organization_id: int, params: PageParams) -> dict[str, Any]:
    return paginate(session, scoped(EventSubscription, organization_id), EventSubscription.id, params, subscription_view)


def update_subscription(
    session: Session, *, organization_id: int, subscription_id: int, values: dict[str, Any], now: datetime
) -> EventSubscription:
    """Change url, event_types, description or active (only the keys given)."""
    sub = get_subscription(session, organization_id=organization_id, subscription_id=subscription_id)
    errors, types = _validated(values.get("url"), values.get("event_types"))
    for name in ("url", "event_types", "active", "description"):
        if name in values and values[name] is None:
            errors.append(FieldError(name, "must not be null"))
    _raise(errors)
    if "url" in values:
        sub.url = values["url"]
    if types is not None:
        sub.event_types = types
    if "description" in values:
        sub.description = values["description"]
    if "active" in values:
        sub.active = bool(values["active"])
    sub.updated_at = now
    session.flush()
    return sub


def delete_subscription(session: Session, *, organization_id: int, subscription_id: int) -> None:
    """Delete a subscription and its delivery log (pending deliveries are dropped with it)."""
    sub = get_subscription(session, organization_id=organization_id, subscription_id=subscription_id)
    session.execute(delete(EventDelivery).where(EventDelivery.subscription_id == sub.id))
    session.delete(sub)
    session.flush()


def rotate_secret(
    session: Session, *, organization_id: int, subscription_id: int, key: str, now: datetime
) -> tuple[EventSubscription, str]:
    """A new signing secret (shown this once); deliveries not yet made are signed with it."""
    sub = get_subscription(session, organization_id=organization_id, subscription_id=subscription_id)
    secret = new_secret()
    _store_secret(sub, secret, key)
    sub.secret_rotated_at = now
    sub.updated_at = now
    session.flush()
    return sub, secret


def subscription_secret(sub: EventSubscription, key: str) -> str:
    """The subscription's signing secret in clear (raises SecretsUnreadable under another key)."""
    return secret_box.decrypt(key, sub.secret_encrypted).get("secret", "")


def subscription_view(sub: EventSubscription, secret: str | None = None) -> dict[str, Any]:
    return {
        "id": sub.id,
        "url": sub.url,
        "description": sub.description,
        "event_types": list(sub.event_types),
        "active": sub.active,
        "secret": secret if secret is not None else sub.secret_masked,
        "secret_rotated_at": sub.secret_rotated_at,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
    }


# ---------------------------------------------------------------- the outbox


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _queue(
    session: Session, *, organization_id: int, subscription_ids: list[int], type: str, data: dict[str, Any], now: datetime
) -> int:
    if not subscription_ids:
        return 0
    event_id = "evt_" + uuid.uuid4().hex
    payload = json.loads(json.dumps({
        "id": event_id,
        "type": type,
        "created_at": now,
        "organization_id": organization_id,
        "data": data,
    }, default=_json_default))
    session.execute(insert(EventDelivery), [
        {
            "organization_id": organization_id, "subscription_id": sid, "event_id": event_id, "event_type": type,
            "payload": payload, "status": DeliveryStatus.pending, "attempts": 0, "next_attempt_at": now,
            "attempt_log": [], "created_at": now, "updated_at": now,
        }
        for sid in subscription_ids
    ])
    return len(subscription_ids)


def _subscribers(session: Session, organization_id: int) -> list[tuple[int, list[str]]]:
    """(id, event types) of the organization's active subscriptions: one indexed query."""
    rows = session.execute(
        select(EventSubscription.id, EventSubscription.event_types).where(
            EventSubscription.organization_id == organization_id, EventSubscription.active.is_(True)
        )
    ).all()
    return [(sid, list(types or ())) for sid, types in rows]


def emit(session: Session, *, organization_id: int, type: str, data: dict, now: datetime) -> int:  # noqa: A002
    """Queue event ``type`` for every active subscription of the organization that wants it, in the
    caller's transaction. Returns the number of deliveries queued (0, after one indexed query, when
    the organization has no subscription). ``data`` may hold Decimals, dates and enums."""
    wanted = [sid for sid, types in _subscribers(session, organization_id) if type in types]
    return _queue(session, organization_id=organization_id, subscription_ids=wanted, type=type, data=data, now=now)


def send_test(session: Session, *, organization_id: int, subscription_id: int, now: datetime) -> EventDelivery:
    """Queue a ``test.ping`` event for one subscription (whatever its event types)."""
    sub = get_subscription(session, organization_id=organization_id, subscription_id=subscription_id)
    if not sub.active:
        raise Conflict("The subscription is disabled; activate it first", [FieldError("active", "is false")])
    _queue(session, organization_id=organization_id, subscription_ids=[sub.id], type=TEST_EVENT,
           data={"subscription_id": sub.id, "message": "Hello from duecourse"}, now=now)
    delivery = session.scalar(
        scoped(EventDelivery, organization_id).where(EventDelivery.subscription_id == sub.id)
        .order_by(EventDelivery.id.desc()).limit(1)
    )
    assert delivery is not None
    return delivery


# ---------------------------------------------------------------- the delivery log


def list_deliveries(
    session: Session, *, organization_id: int, params: PageParams, subscription_id: int | None = None,
    status: DeliveryStatus | None = None, type: str | None = None,  # noqa: A002
) -> dict[str, Any]:
    """The delivery log, newest first."""
    stmt = scoped(EventDelivery, organization_id)
    if subscription_id is not None:
        stmt = stmt.where(EventDelivery.subscription_id == subscription_id)
    if status is not None:
        stmt = stmt.where(EventDelivery.status == DeliveryStatus(status).value)
    if type is not None:
        stmt = stmt.where(EventDelivery.event_type == type)
    return paginate(session, stmt, EventDelivery.id, params, lambda d: d, descending=True)


def get_delivery(session: Session, *, organization_id: int, delivery_id: int) -> EventDelivery:
    return get_owned(session, EventDelivery, delivery_id, organization_id, "Event delivery")


def redeliver(session: Session, *, organization_id: int, delivery_id: int, now: datetime) -> EventDelivery:
    """Send a delivery again on the next pass, whatever its status, with a fresh retry schedule."""
    delivery = get_delivery(session, organization_id=organization_id, delivery_id=delivery_id)
    if delivery.status == DeliveryStatus.processing:
        raise Conflict("The delivery is being sent right now", [FieldError("status", "is processing")])
    sub = session.get(EventSubscription, delivery.subscription_id)
    if sub is None or not sub.active:
        raise Conflict("The subscription is disabled; activate it first", [FieldError("active", "is false")])
    delivery.status = DeliveryStatus.pending
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.claimed_by = None
    delivery.updated_at = now
    session.flush()
    return delivery


# ---------------------------------------------------------------- the delivery pass


@dataclass
class _Job:
    delivery_id: int
    attempt: int
    event_type: str
    url: str | None
    secret: str | None
    body: bytes
    error: str | None = None  # known before posting: the delivery is not attempted
    final: bool = False  # the error ends the delivery (a disabled subscription)


@dataclass
class _Result:
    status_code: int | None
    error: str | None
    duration_ms: int | None
    response: str | None


def worker_name() -> str:
    return f"events@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _due(now: datetime) -> tuple[Any, ...]:
    # Pending deliveries whose time has come, and processing ones whose lease ran out (a dead worker).
    return (
        EventDelivery.status.in_([DeliveryStatus.pending.value, DeliveryStatus.processing.value]),
        EventDelivery.next_attempt_at <= now,
    )


def anything_due(session: Session, *, now: datetime) -> bool:
    """One indexed read: is there a delivery to claim?"""
    return session.execute(select(EventDelivery.id).where(*_due(now)).limit(1)).first() is not None


def claim(session: Session, *, now: datetime, worker: str, limit: int, lease_seconds: int) -> list[int]:
    """Claim up to ``limit`` due deliveries as leases: pending ones whose time has come, and processing
    ones whose lease ran out (their worker died). Each claim counts as an attempt."""
    due = select(EventDelivery.id).where(*_due(now)).order_by(EventDelivery.next_attempt_at, EventDelivery.id).limit(limit)
    rows = claim_update(
        session, EventDelivery, due, where=_due(now),
        values=dict(
            status=DeliveryStatus.processing.value,
            claimed_by=worker,
            next_attempt_at=now + timedelta(seconds=lease_seconds),
            attempts=EventDelivery.attempts + 1,
            updated_at=now,
        ),
        returning=(EventDelivery.id,),
    )
    return sorted(r[0] for r in rows)


def _jobs(session: Session, ids: list[int], key: str) -> list[_Job]:
    jobs: list[_Job] = []
    rows = session.execute(
        select(EventDelivery, EventSubscription)
        .join(EventSubscription, EventSubscription.id == EventDelivery.subscription_id)
        .where(EventDelivery.id.in_(ids))
        .order_by(EventDelivery.id)
    ).all()
    for delivery, sub in rows:
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        job = _Job(delivery.id, delivery.attempts, delivery.event_type, sub.url, None, body)
        if not sub.active:
            job.error, job.final = "the subscription is disabled", True
        else:
            try:
                job.secret = subscription_secret(sub, key)
            except secret_box.SecretsUnreadable:
                job.error = "the signing secret cannot be decrypted with the current encryption key; rotate it"
        jobs.append(job)
    return jobs


def _post(client: httpx.Client, job: _Job, *, now: datetime, timeout: float) -> _Result:
    assert job.url is not None and job.secret is not None
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"duecourse/{__version__}",
        SIGNATURE_HEADER: sign(job.secret, job.body, int(now.timestamp())),
        EVENT_HEADER: job.event_type,
        DELIVERY_HEADER: str(job.delivery_id),
    }
    started = time.monotonic()
    try:
        response = client.post(job.url, content=job.body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return _Result(None, error[:ERROR_MAX], int((time.monotonic() - started) * 1000), None)
    duration = int((time.monotonic() - started) * 1000)
    excerpt = response.text[:RESPONSE_EXCERPT] if response.content else None
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return _Result(response.status_code, error, duration, excerpt)


def _record(session: Session, job: _Job, result: _Result, *, now: datetime, worker: str) -> str:
    """Write one attempt's result; returns the delivery's new state, or "lost" when the lease ran out
    and another worker claimed the delivery meanwhile (its result is then the one that counts)."""
    mine = (
        EventDelivery.id == job.delivery_id,
        EventDelivery.status == DeliveryStatus.processing.value,
        EventDelivery.claimed_by == worker,
    )
    row = session.execute(select(EventDelivery.attempts, EventDelivery.attempt_log).where(*mine)).first()
    if row is None:
        return "lost"
    attempts, log = row
    entry = {"at": _json_default(now), "attempt": job.attempt, "status_code": result.status_code,
             "error": result.error, "duration_ms": result.duration_ms, "response": result.response}
    values: dict[str, Any] = {
        "attempt_log": [*(log or []), entry][-LOG_MAX:], "last_attempt_at": now, "last_status_code": result.status_code,
        "last_error": result.error, "claimed_by": None, "updated_at": now,
    }
    if result.error is None:
        outcome = "delivered"
        values |= {"status": DeliveryStatus.delivered.value, "delivered_at": now, "next_attempt_at": None}
    elif job.final or attempts >= MAX_ATTEMPTS:
        outcome = "failed"
        values |= {"status": DeliveryStatus.failed.value, "next_attempt_at": None}
    else:
        outcome = "retrying"
        values |= {"status": DeliveryStatus.pending.value, "next_attempt_at": now + retry_delay(attempts)}
    # The lease is checked again in the write itself, so a delivery re-claimed meanwhile is left alone.
    done = session.execute(
        update(EventDelivery).where(*mine).values(values).execution_options(synchronize_session=False)
    )
    return outcome if done.rowcount else "lost"


def release(session: Session, *, ids: list[int], worker: str, now: datetime) -> int:
    """Give claimed deliveries back untried: pending again, due at once, the claim's attempt not counted."""
    result = session.execute(
        update(EventDelivery)
        .where(EventDelivery.id.in_(ids), EventDelivery.status == DeliveryStatus.processing.value,
               EventDelivery.claimed_by == worker)
        .values(status=DeliveryStatus.pending.value, claimed_by=None, next_attempt_at=now,
                attempts=EventDelivery.attempts - 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def deliver_due(
    db: Database, *, now: datetime, client: httpx.Client | None = None, limit: int = DEFAULT_BATCH,
    settings: Settings | None = None, timeout: float | None = None, worker: str | None = None,
    budget_seconds: float = PASS_BUDGET_SECONDS,
) -> dict[str, int]:
    """One delivery pass: claim up to ``limit`` due deliveries, post them, record the results.

    ``settings`` gives the encryption key of the secrets and the timeout (the process's settings by
    default); ``client`` an httpx client to post with (one is made and closed otherwise).

    The pass runs in the engine's worker loop, so it is bounded: deliveries not started within
    ``budget_seconds`` are released untried for the next pass, and once a URL fails to answer at all
    (a timeout, a refused connection) the pass's other deliveries to it fail with the same error
    without waiting again. Returns counts: claimed, delivered, retrying, failed, released (and lost,
    when a lease ran out meanwhile)."""
    if settings is None:
        from duecourse.config import get_settings

        settings = get_settings()
    timeout = timeout if timeout is not None else settings.provider_timeout_seconds
    key = secret_box.key_from_settings(settings)
    worker = worker or worker_name()
    lease_seconds = int(max(300.0, budget_seconds + timeout + 60))
    with db.transaction() as session:  # a read first, so an idle pass never takes SQLite's write lock
        if not anything_due(session, now=now):
            return {}
    with db.transaction() as session:
        ids = claim(session, now=now, worker=worker, limit=limit, lease_seconds=lease_seconds)
        jobs = _jobs(session, ids, key) if ids else []
    counts = {"claimed": len(ids), "delivered": 0, "retrying": 0, "failed": 0, "released": 0, "lost": 0}
    if not jobs:
        return {k: v for k, v in counts.items() if v}
    own_client = client is None
    http = client or httpx.Client(follow_redirects=False)
    started = time.monotonic()
    unreachable: dict[str, str] = {}  # url -> the error of this pass's attempt
    done: set[int] = set()
    try:
        for job in jobs:
            if time.monotonic() - started >= budget_seconds:
                break
            if job.error is not None:
                result = _Result(None, job.error, None, None)
            elif job.url in unreachable:
                result = _Result(None, f"not attempted: {unreachable[job.url]} (earlier in the same pass)"[:ERROR_MAX],
                                 None, None)
            else:
                result = _post(http, job, now=now, timeout=timeout)
                if result.status_code is None and job.url is not None:
                    unreachable[job.url] = result.error or "no answer"
            with db.transaction() as session:
                counts[_record(session, job, result, now=now, worker=worker)] += 1
            done.add(job.delivery_id)
    finally:
        if own_client:
            http.close()
        left = [j.delivery_id for j in jobs if j.delivery_id not in done]
        if left:
            with db.transaction() as session:
                counts["released"] += release(session, ids=left, worker=worker, now=now)
    return {k: v for k, v in counts.items() if v}


# ---------------------------------------------------------------- payloads shared by the emitters


def account_data(account: Any) -> dict[str, Any]:
    """What every account-related event says about its account."""
    return {"account_id": account.id, "account_external_id": account.external_id, "account_name": account.name}


def money(value: Decimal | int | None, currency: str) -> str | None:
    """An amount as the API shows it: a string with the currency's minor units ("120.50")."""
    if value is None:
        return None
    value = Decimal(value)
    q = value.quantize(Decimal(1).scaleb(-currency_places(currency)))
    return str(q if q == value else value)


def promise_data(promise: Any, account: Any, *, paid: Decimal | None = None) -> dict[str, Any]:
    data = {
        "promise_id": promise.id, **account_data(account), "amount": money(promise.amount, promise.currency),
        "currency": promise.currency, "promised_date": promise.promised_date, "source": promise.source,
        "status": promise.status,
    }
    if paid is not None:
        data["paid_since_promise"] = money(paid, promise.currency)
    return data


def payment_recorded(session: Session, *, payment: Any, account: Any, now: datetime) -> int:
    """``payment.received`` for a payment just recorded and allocated (``account.resolved``, when
    the payment settled an account in collection, comes from the balance refresh itself). Nothing is
    read beyond the subscription lookup unless someone listens."""
    subscribers = _subscribers(session, payment.organization_id)
    wanted = [sid for sid, types in subscribers if "payment.received" in types]
    if not wanted:
        return 0
    from duecourse.ledger.models import Account  # the ledger imports this module

    balance = session.scalar(select(Account.balance).where(Account.id == account.id))
    return _queue(
        session, organization_id=payment.organization_id, type="payment.received", now=now, subscription_ids=wanted,
        data={
            "payment_id": payment.id, "external_id": payment.external_id, **account_data(account),
            "amount": money(payment.amount, payment.currency), "currency": payment.currency,
            "paid_on": payment.paid_on, "source": payment.source, "reference": payment.reference,
            "invoice_id": payment.invoice_id, "account_balance": money(balance, account.currency),
        },
    )


def accounts_resolved(session: Session, *, organization_id: int, which: Any, now: datetime) -> int:
    """``account.resolved`` for every account that ``which`` (a condition on accounts) is about to
    resolve: its balance reached zero, by a payment, a credit or an invoice change, and its case ends.
    One query for the subscriptions; the accounts are read only when someone listens."""
    wanted = [sid for sid, types in _subscribers(session, organization_id) if "account.resolved" in types]
    if not wanted:
        return 0
    from duecourse.ledger.models import Account  # the ledger imports this module

    queued = 0
    rows = session.execute(  # columns, not ORM objects: the balances were just recomputed in SQL
        select(Account.id, Account.external_id, Account.name, Account.status, Account.balance, Account.currency)
        .where(which).order_by(Account.id)
    )
    for account_id, external_id, name, status, balance, currency in rows:
        queued += _queue(
            session, organization_id=organization_id, type="account.resolved", now=now, subscription_ids=wanted,
            data={"account_id": account_id, "account_external_id": external_id, "account_name": name,
                  "cause": "balance_zero", "previous_status": getattr(status, "value", status),
                  "account_balance": money(balance, currency)},
        )
    return queued

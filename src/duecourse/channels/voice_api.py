"""The voice agent's outcome webhook (SPEC §4.8, §7): how a call ended, signed with the voice
configuration's ``webhook_secret``.

``POST /api/v1/webhooks/{organization_id}/voice/outcome``. The signature is checked before the body
is parsed; a malformed body answers 400 and changes nothing; an event id already handled changes
nothing; a ``call_id`` that is no call of this organization answers 400. The outcome goes through
:func:`duecourse.engine.outcomes.record_call_outcome`, the same entry point the API and agents use.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session

from duecourse.channels import config as channel_config
from duecourse.channels import webhooks
from duecourse.channels.api import signed_event
from duecourse.channels.secrets import key_from_settings
from duecourse.deps import AppClock, DbSession
from duecourse.engine import outcomes
from duecourse.engine.models import Outcome, Sentiment
from duecourse.errors import Conflict, NotFound, Unauthorized, ValidationFailed
from duecourse.tenancy.models import Organization

router = APIRouter(tags=["inbound webhooks"])

SOURCE = "voice"
CallStatus = Literal["completed", "failed", "no_answer", "busy", "dropped"]
OutcomeName = Literal[
    "promise_to_pay", "callback_requested", "refused", "dispute", "wrong_party", "paid_claimed", "no_answer", "dropped"
]
SentimentName = Literal["positive", "neutral", "negative", "hostile", "crisis"]


class VoiceOutcomeEvent(BaseModel):
    """How one call ended, as the voice service reports it."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "id": "evt_01HV9Z3K2",
                    "call_id": "call_8f2c1",
                    "status": "completed",
                    "outcome": "promise_to_pay",
                    "promise_amount": "120.50",
                    "promise_date": "2026-03-10",
                    "sentiment": "neutral",
                    "willingness": 4,
                    "summary": "Debtor agreed to pay the full balance on the 10th.",
                    "transcript": "Agent: Good morning...",
                },
                {"id": "evt_01HV9Z3K3", "call_id": "call_8f2c2", "status": "no_answer"},
            ]
        },
    )

    id: str = Field(min_length=1, max_length=200, description=(
        "The event's unique id. An id already received changes nothing (the answer is `duplicate`), so the "
        "voice service may retry a delivery safely."))
    call_id: str = Field(min_length=1, max_length=255, description=(
        "The `call_id` the voice service answered when the call was requested (duecourse's provider reference)."))
    status: CallStatus = Field(description=(
        "How the call ended. `completed`: a conversation took place and `outcome` says how it went. "
        "`no_answer` / `busy`: nobody answered (retried after the stage's retry delay while retries remain). "
        "`dropped`: the line dropped before a result (retried like `no_answer`). "
        "`failed`: the call could not be placed at all (invalid or unreachable number): a delivery failure, "
        "the stage completes and the next stage is enqueued at once."))
    outcome: OutcomeName | None = Field(None, description=(
        "Required with `status: completed`. `promise_to_pay` needs `promise_amount` and `promise_date`; "
        "`callback_requested` needs `callback_at`; `dispute` marks the carrying invoice disputed."))
    promise_amount: Decimal | None = Field(None, gt=0, max_digits=18, decimal_places=4, description=(
        "Amount promised, in the account's currency (a JSON string such as \"120.50\" keeps it exact)."))
    promise_date: date | None = Field(None, description="The date the debtor promised to pay by (YYYY-MM-DD).")
    callback_at: datetime | None = Field(None, description=(
        "When the debtor asked to be called back, with a time zone (e.g. `2026-03-03T15:00:00Z`)."))
    sentiment: SentimentName | None = Field(None, description="The debtor's sentiment during the call.")
    willingness: int | None = Field(None, ge=1, le=5, description="Willingness to pay, 1 (none) to 5 (high).")
    summary: str | None = Field(None, max_length=10_000, description="A short summary of the conversation.")
    transcript: str | None = Field(None, max_length=200_000, description="The call's transcript.")

    @model_validator(mode="after")
    def _consistent(self) -> VoiceOutcomeEvent:
        if self.status == "completed":
            if self.outcome is None:
                raise ValueError("status completed needs an outcome")
            if self.outcome == "promise_to_pay" and (self.promise_amount is None or self.promise_date is None):
                raise ValueError("promise_to_pay needs promise_amount and promise_date")
            if self.outcome == "callback_requested" and self.callback_at is None:
                raise ValueError("callback_requested needs callback_at")
        if self.callback_at is not None and self.callback_at.tzinfo is None:
            raise ValueError("callback_at needs a time zone (e.g. 2026-03-03T15:00:00Z)")
        return self

    def report(self) -> outcomes.CallReport:
        """The engine's view: a call that never connected is a delivery failure (``failed=True``)."""
        if self.status == "failed":
            return outcomes.CallReport(failed=True, summary=self.summary)
        if self.status in ("no_answer", "busy"):
            outcome = Outcome.no_answer
        elif self.status == "dropped":
            outcome = Outcome.dropped
        else:
            assert self.outcome is not None
            outcome = Outcome(self.outcome)
        talked = outcome not in outcomes.NO_CONVERSATION
        return outcomes.CallReport(
            outcome=outcome,
            promise_amount=self.promise_amount if outcome == Outcome.promise_to_pay else None,
            promise_date=self.promise_date if outcome == Outcome.promise_to_pay else None,
            callback_at=self.callback_at if outcome == Outcome.callback_requested else None,
            sentiment=Sentiment(self.sentiment) if self.sentiment and talked else None,
            willingness=self.willingness if talked else None,
            summary=self.summary,
            transcript=self.transcript,
        )


class VoiceOutcomeResult(BaseModel):
    result: str = Field(description=(
        "`completed`, `retry`, `advanced`, `callback`, `delivery_failure`, `stale` (the case had already moved "
        "on; the outcome is recorded on the call but the case is unchanged) or `duplicate` (event id already handled)."))


def _secret(request: Request, session: Session, organization_id: int) -> str:
    if session.get(Organization, organization_id) is None:
        raise NotFound("Organization")
    config = channel_config.get_config(session, organization_id=organization_id, channel="voice")
    secret = channel_config.read_secrets(config, key_from_settings(request.app.state.settings)).get("webhook_secret")
    if not secret:
        raise Unauthorized("No voice webhook secret is configured for this organization (PUT /api/v1/channels/voice)")
    return secret


_DESCRIPTION = f"""
The voice service reports how a call ended. One event per call, sent to the `callback_url` given in
the call request.

**Signature.** Every request carries

    {webhooks.SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

keyed with the voice configuration's `webhook_secret` (generated by `PUT /api/v1/channels/voice`
and shown once in `generated_secrets`). The signature is checked on the raw body before anything
is parsed; a missing, invalid or stale signature (more than {webhooks.TOLERANCE_SECONDS // 60} minutes
from the server's time) answers **401**.

**Idempotency.** `id` identifies the event: an id already handled answers `{{"result": "duplicate"}}`
and changes nothing, so deliveries may be retried.

**Errors.** A body that is not a JSON object, or does not follow the schema, answers **400**
(`bad_webhook`) and changes nothing; so does a `call_id` that is not a call of this organization.

**Effect** (SPEC §4.8): the call's interaction gets the outcome, sentiment, willingness, summary and
transcript; `no_answer`/`busy`/`dropped` retry the stage while retries remain; `promise_to_pay`
creates the promise and the account becomes `promise_pending`; `callback_requested` schedules the
return call; `failed` is a delivery failure. Every effect is written to the account's execution log.
"""

_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "description": "The call's outcome. Signed: see the description.",
        "content": {"application/json": {"schema": VoiceOutcomeEvent.model_json_schema(ref_template="#/components/schemas/{model}")}},
    },
    "parameters": [
        {
            "name": webhooks.SIGNATURE_HEADER,
            "in": "header",
            "required": True,
            "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<raw body>\"> with the voice webhook_secret",
            "schema": {"type": "string"},
        }
    ],
}


@router.post(
    "/webhooks/{organization_id}/voice/outcome",
    summary="Voice call outcome (signed with the voice webhook secret; idempotent by event id)",
    description=_DESCRIPTION,
    response_model=VoiceOutcomeResult,
    openapi_extra=_OPENAPI_BODY,
    responses={
        400: {"description": "Malformed body, or unknown call_id: nothing changed"},
        401: {"description": "Missing, invalid or stale signature, or no voice webhook secret configured"},
        404: {"description": "No such organization"},
    },
)
async def voice_outcome_webhook(organization_id: int, request: Request, session: DbSession, clock: AppClock) -> dict[str, Any]:
    now = clock.now()
    event = await signed_event(request, VoiceOutcomeEvent, secret=_secret(request, session, organization_id), now=now)
    if not webhooks.receive_once(session, organization_id=organization_id, source=SOURCE, event_id=event.id, now=now):
        return {"result": "duplicate"}
    try:
        result = outcomes.record_call_outcome(
            session, organization_id=organization_id, now=now, report=event.report(), provider_ref=event.call_id,
        )
    except NotFound:
        raise webhooks.BadWebhook(f"unknown call_id {event.call_id!r}: no call of this organization has it") from None
    except (Conflict, ValidationFailed) as exc:
        raise webhooks.BadWebhook(f"call_id {event.call_id!r}: {exc}") from None
    return {"result": result}

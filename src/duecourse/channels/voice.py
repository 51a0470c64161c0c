"""The AI voice-agent adapter (SPEC §7): one HTTP request starts one call.

``POST <endpoint_url>`` with a JSON body describing the call (who to call, the rendered script, the
tone and language, what the agent may say about the debt, and where to report the outcome); the
voice service answers ``{"call_id": "..."}``, which becomes the queue item's provider reference.
The outcome arrives later on ``/api/v1/webhooks/{organization_id}/voice/outcome``
(:mod:`duecourse.channels.voice_api`). The contract is documented in ``docs/channels/voice.md``.

``Idempotency-Key`` is the queue-item attempt's stable key, so a voice service that honours it never
places the same call twice when a worker dies between sending and recording.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from duecourse.channels.base import OutboundMessage, ProviderError, SendResult

if TYPE_CHECKING:
    from duecourse.channels.registry import ProviderEnv

# Context keys copied into the call's "debtor" object when the dispatch provides them.
_DEBTOR_FIELDS = {
    "debtor_name": "name",
    "balance": "balance",
    "currency": "currency",
    "account_external_id": "account_external_id",
    "carrying_invoice_id": "carrying_invoice_id",
    "carrying_invoice_number": "carrying_invoice_number",
    "carrying_invoice_amount": "carrying_invoice_amount",
    "carrying_invoice_due_date": "carrying_invoice_due_date",
    "days_overdue": "days_overdue",
}


def call_request(message: OutboundMessage, settings: dict[str, Any], env: ProviderEnv) -> dict[str, Any]:
    """The JSON body of the call request (see ``docs/channels/voice.md``)."""
    ctx = message.context or {}
    debtor = {name: _json(ctx[key]) for key, name in _DEBTOR_FIELDS.items() if ctx.get(key) is not None}
    return {
        "idempotency_key": message.idempotency_key,
        "organization_id": message.organization_id,
        "account_id": message.account_id,
        "queue_item_id": ctx.get("queue_item_id"),
        "stage_index": ctx.get("stage_index"),
        "to": message.to,
        "caller_id": settings.get("caller_id"),
        "agent_id": settings.get("agent_id"),
        "script": message.body_text,
        "tone": message.tone or ctx.get("tone"),
        "language": ctx.get("language"),
        "timezone": ctx.get("timezone"),
        "debtor": debtor,
        "callback_url": env.callback_url("voice/outcome"),
    }


def _json(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) else str(value)


class VoiceProvider:
    """Starts calls on an HTTP voice-agent service (provider ``voice_http``)."""

    def __init__(self, settings: dict[str, Any], secrets: dict[str, str], env: ProviderEnv,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.secrets = secrets
        self.env = env
        self.transport = transport

    def _headers(self, message: OutboundMessage) -> dict[str, str]:
        headers = {"Idempotency-Key": message.idempotency_key, "Accept": "application/json",
                   "User-Agent": "duecourse-voice/1"}
        if self.secrets.get("api_key"):
            headers["Authorization"] = f"Bearer {self.secrets['api_key']}"
        return headers

    def send(self, message: OutboundMessage) -> SendResult:
        url = self.settings.get("endpoint_url")
        if not url:
            raise ProviderError("voice provider has no endpoint_url configured", retryable=False)
        body = call_request(message, self.settings, self.env)
        try:
            with httpx.Client(timeout=self.env.timeout_seconds, transport=self.transport) as client:
                response = client.post(url, json=body, headers=self._headers(message))
        except httpx.TimeoutException as exc:
            raise ProviderError(f"voice service timed out after {self.env.timeout_seconds:g}s: {exc}", retryable=True) from None
        except httpx.HTTPError as exc:
            raise ProviderError(f"voice service unreachable: {type(exc).__name__}: {exc}", retryable=True) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise ProviderError(f"voice service answered {status}: {_excerpt(response)}", retryable=True)
        if status >= 400:
            invalid = status == 422 and _mentions_invalid_number(response)
            raise ProviderError(f"voice service refused the call ({status}): {_excerpt(response)}",
                                retryable=False, invalid_address=invalid)
        try:
            data = response.json()
        except ValueError:
            raise ProviderError(f"voice service answered {status} without JSON: {_excerpt(response)}", retryable=True) from None
        call_id = data.get("call_id") if isinstance(data, dict) else None
        if not isinstance(call_id, str) or not call_id or len(call_id) > 255:
            raise ProviderError(f"voice service answered {status} without a call_id: {_excerpt(response)}", retryable=True)
        return SendResult(provider_ref=call_id, status="sent")


def _excerpt(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:300] or response.reason_phrase


def _mentions_invalid_number(response: httpx.Response) -> bool:
    """A 422 about the ``to`` number (``{"error": "invalid_number"}``, ``{"field": "to"}``, or the text)."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        code = str(data.get("error") or data.get("code") or "").lower()
        field = str(data.get("field") or "").lower()
        if code in ("invalid_number", "invalid_phone_number", "invalid_to") or field == "to":
            return True
    text = response.text.lower()
    return "invalid" in text and any(word in text for word in ("number", "phone"))

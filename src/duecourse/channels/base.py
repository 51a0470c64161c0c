"""The provider interface every channel implements (SPEC §7).

A provider sends one message and answers with its own reference, or raises :class:`ProviderError`.
``idempotency_key`` is stable across retries of the same queue-item attempt, so a provider that
supports it never sends the same message twice when a worker dies between sending and recording.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class OutboundMessage:
    organization_id: int
    account_id: int
    channel: str  # email | sms | whatsapp | voice
    to: str
    body_text: str
    idempotency_key: str
    subject: str | None = None
    body_html: str | None = None
    tone: str | None = None
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    provider_ref: str
    status: str = "sent"


class ProviderError(Exception):
    """A send that did not happen. ``retryable``: worth another attempt later (timeouts, 5xx)."""

    def __init__(self, message: str, *, retryable: bool = True, invalid_address: bool = False,
                 opted_out: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.invalid_address = invalid_address
        # The provider refuses because the recipient opted out with it (e.g. Twilio 21610): the
        # account is opted out of the channel here too.
        self.opted_out = opted_out


class Provider(Protocol):
    def send(self, message: OutboundMessage) -> SendResult: ...

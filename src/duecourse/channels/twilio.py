"""SMS and WhatsApp through a Twilio-compatible Messages API (SPEC §7).

:class:`TwilioProvider` sends one message with ``POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json``
(HTTP basic auth: account SID and auth token; form fields ``To``, ``From`` or ``MessagingServiceSid``,
``Body``, ``StatusCallback``). WhatsApp is the same API with ``whatsapp:`` before both numbers. The
answer's Message SID (``SM…``) is the provider reference that the status callbacks carry back.

Errors become :class:`ProviderError`:

* invalid or unreachable numbers (21211, 21217, 21401, 21614, 63024): not retryable,
  ``invalid_address=True`` (the engine flags the account's contact data);
* 21610, the recipient replied STOP to this sender: not retryable, not an invalid address;
* any other 4xx: not retryable (the request or the configuration is wrong; retrying sends the same);
* 429, 5xx, and a request that never reached Twilio (no connection, a connection or write
  timeout): retryable;
* a request Twilio may have received but did not answer (a read timeout, a connection dropped
  before the answer): not retryable. The Messages API has no idempotency key, so a retry could
  send the message twice; the error says it may have been sent.

Twilio signs every request it makes to us (status callbacks, inbound messages) with
``X-Twilio-Signature``: base64 of HMAC-SHA1, keyed with the auth token, over the full URL followed by
each POST parameter's name and value, sorted by name. :func:`twilio_signature` computes it and
:func:`verify_twilio_signature` checks it in constant time. This is the public algorithm; the
``twilio`` package is not needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from duecourse.channels.base import OutboundMessage, ProviderError, SendResult

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
SIGNATURE_HEADER = "X-Twilio-Signature"
WHATSAPP_PREFIX = "whatsapp:"

# Twilio error codes that mean "this number cannot receive messages": the address is wrong.
INVALID_ADDRESS_CODES = {
    21211: "invalid 'To' phone number",
    21217: "phone number does not appear to be valid",
    21401: "invalid phone number",
    21614: "'To' number is not a mobile number",
    63024: "invalid message recipient",
}
OPTED_OUT_CODE = 21610  # "Attempt to send to unsubscribed recipient": the debtor replied STOP


def _with_prefix(number: str, whatsapp: bool) -> str:
    number = number.strip()
    if whatsapp and not number.startswith(WHATSAPP_PREFIX):
        return WHATSAPP_PREFIX + number
    return number


# Failures after which Twilio cannot have received the request (a write cut short leaves an
# incomplete request, which the server discards).
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteError, httpx.WriteTimeout)


class TwilioProvider:
    """One organization's Twilio-compatible sender for one channel (``sms`` or ``whatsapp``)."""

    def __init__(self, settings: dict[str, Any], secrets: dict[str, str], env: Any) -> None:
        self.base_url = str(settings.get("base_url") or "https://api.twilio.com").rstrip("/")
        self.account_sid = str(settings.get("account_sid") or "")
        self.from_number = settings.get("from_number")
        self.messaging_service_sid = settings.get("messaging_service_sid")
        self.auth_token = secrets.get("auth_token") or ""
        self.env = env
        self.channel = env.channel
        self.timeout = float(env.timeout_seconds)

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/{API_VERSION}/Accounts/{self.account_sid}/Messages.json"

    def form(self, message: OutboundMessage) -> dict[str, str]:
        """The form fields of the Messages API request for ``message``."""
        whatsapp = self.channel == "whatsapp"
        if not message.to:
            raise ProviderError(f"no {self.channel} number for the account", retryable=False, invalid_address=True)
        data = {"To": _with_prefix(message.to, whatsapp), "Body": message.body_text or ""}
        if self.messaging_service_sid:
            data["MessagingServiceSid"] = str(self.messaging_service_sid)
        elif self.from_number:
            data["From"] = _with_prefix(str(self.from_number), whatsapp)
        else:
            raise ProviderError(
                f"Twilio {self.channel} is not configured with a from_number or a messaging_service_sid", retryable=False
            )
        data["StatusCallback"] = self.env.callback_url("twilio/status")
        return data

    def send(self, message: OutboundMessage) -> SendResult:
        if not self.account_sid or not self.auth_token:
            raise ProviderError("Twilio account_sid or auth_token missing", retryable=False)
        data = self.form(message)
        try:
            with httpx.Client(timeout=self.timeout) as client:
                response = client.post(
                    self.messages_url, data=data, auth=(self.account_sid, self.auth_token),
                    headers={"Accept": "application/json"},
                )
        except _NOT_SENT as exc:  # nothing reached Twilio: another attempt is safe
            raise ProviderError(f"Twilio unreachable: {type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise ProviderError(
                f"Twilio did not answer within {self.timeout:g} s ({type(exc).__name__}); the message may have "
                "been sent, so it is not sent again", retryable=False,
            ) from None
        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
            raise ProviderError(
                f"Twilio closed the connection without an answer ({type(exc).__name__}); the message may have "
                "been sent, so it is not sent again", retryable=False,
            ) from None
        except httpx.HTTPError as exc:  # DNS, TLS, proxy and other errors before the request went out
            raise ProviderError(f"Twilio unreachable: {type(exc).__name__}: {exc}") from None
        return self._answer(response)

    def _answer(self, response: httpx.Response) -> SendResult:
        body: Any
        try:
            body = response.json()
        except ValueError:
            body = None
        if 200 <= response.status_code < 300:
            sid = body.get("sid") if isinstance(body, dict) else None
            if not sid:
                # Accepted, but we cannot tell which message it is; another attempt could send it twice.
                raise ProviderError(f"Twilio answered {response.status_code} without a message SID", retryable=False)
            return SendResult(provider_ref=str(sid), status=str(body.get("status") or "queued"))
        raise error_from_response(response.status_code, body if isinstance(body, dict) else None, response.text)


def error_from_response(status: int, body: Mapping[str, Any] | None, text: str = "") -> ProviderError:
    """Map a Twilio error answer (``{code, message, more_info, status}``) to a :class:`ProviderError`."""
    code_raw = (body or {}).get("code")
    try:
        code = int(code_raw) if code_raw is not None else None
    except (TypeError, ValueError):
        code = None
    detail = str((body or {}).get("message") or text[:200] or "no detail").strip()
    label = f"Twilio error {code}" if code is not None else f"Twilio HTTP {status}"
    if code in INVALID_ADDRESS_CODES:
        return ProviderError(f"{label}: {INVALID_ADDRESS_CODES[code]} ({detail})", retryable=False, invalid_address=True)
    if code == OPTED_OUT_CODE:
        return ProviderError(
            f"{label}: the recipient opted out (replied STOP to this sender); Twilio refuses to send ({detail})",
            retryable=False, opted_out=True,
        )
    if status == 429 or status >= 500:
        return ProviderError(f"{label} (HTTP {status}, will retry): {detail}", retryable=True)
    if status in (401, 403):
        return ProviderError(f"{label}: Twilio refused the credentials (HTTP {status}): {detail}", retryable=False)
    return ProviderError(f"{label} (HTTP {status}): {detail}", retryable=False)


# --- request signatures ---------------------------------------------------------------------------


def _pairs(params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> list[tuple[str, str]]:
    if params is None:
        return []
    items = params.items() if isinstance(params, Mapping) else params
    out: list[tuple[str, str]] = []
    for key, value in items:
        if isinstance(value, (list, tuple)):
            out.extend((str(key), str(v)) for v in value)
        else:
            out.append((str(key), str(value)))
    return out


def twilio_signature(auth_token: str, url: str, params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> str:
    """The ``X-Twilio-Signature`` of a POST to ``url`` with form ``params``: base64(HMAC-SHA1(token,
    url + name1 + value1 + name2 + value2 …)) with the parameters sorted by name, then value (a name
    repeated with the same value counts once, as in Twilio's own libraries)."""
    payload = url + "".join(k + v for k, v in sorted(set(_pairs(params))))
    mac = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, plus with the default port added or removed: Twilio signs the URL exactly as
    configured, and proxies sometimes add or drop ``:443`` / ``:80``."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    variants = [url]
    if default is None or not parts.hostname:
        return variants
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    if parts.port is None:
        variants.append(urlunsplit(parts._replace(netloc=f"{userinfo}{host}:{default}")))
    elif parts.port == default:
        variants.append(urlunsplit(parts._replace(netloc=f"{userinfo}{host}")))
    return variants


def verify_twilio_signature(
    auth_token: str, url: str, params: Mapping[str, Any] | Iterable[tuple[str, Any]] | None, signature: str | None
) -> bool:
    """True when ``signature`` is Twilio's signature of this request under ``auth_token``."""
    if not auth_token or not signature:
        return False
    pairs = _pairs(params)
    return any(
        hmac.compare_digest(twilio_signature(auth_token, candidate, pairs).encode(), signature.strip().encode())
        for candidate in _url_variants(url)
    )

"""The email adapter: real SMTP, per organization (SPEC §7).

One connection per message, with the standard library's :mod:`smtplib` (the engine sends an
organization's emails one after another in one thread, outside any transaction; a pool would buy
little at collection volumes). Security is
``starttls`` (plain connection upgraded with STARTTLS, refused if the server does not offer it),
``tls`` (implicit TLS, usually port 465) or ``none``; AUTH happens when a username is configured.
Every socket operation waits at most ``env.timeout_seconds``.

The message is ``multipart/alternative`` (text, and HTML when the template has it), with
``From`` (the configured name and address), ``Reply-To``, ``List-Unsubscribe`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058) when the dispatch gives an
unsubscribe link.

**Provider reference.** The ``Message-ID`` is returned as ``provider_ref`` *without* its angle
brackets (``<id@domain>`` -> ``id@domain``); the bounce webhook accepts either form. It is derived
from the message's idempotency key, organization, account, recipient and content, so a retry of the
same queue-item attempt (a worker that died between sending and recording) sends the same
Message-ID: receiving systems that deduplicate by Message-ID drop the copy, and a bounce of either
copy matches the queue item.

**Errors** become :class:`ProviderError`: a refused recipient (5xx to RCPT) is
``retryable=False, invalid_address=True``; other 5xx answers, authentication failures, TLS and
configuration problems are ``retryable=False``; connection failures, timeouts and 4xx answers are
``retryable=True``, except a timeout or a dropped connection after the whole message was sent
(the server may deliver it: not retried, so it is not delivered twice). The password never appears
in an error or a log line.

**Trusted certificates.** The server's certificate is verified against the system's CA store, or
only against the PEM bundle named by ``DUECOURSE_SMTP_CA_FILE`` when that variable is set (a relay
with a private CA; the test suite uses it for its throwaway CA).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import smtplib
import socket
import ssl
from datetime import UTC, datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from pydantic import ValidationError

from duecourse.channels.base import OutboundMessage, ProviderError, SendResult
from duecourse.channels.config import SmtpSettings

log = logging.getLogger(__name__)

CA_FILE_ENV = "DUECOURSE_SMTP_CA_FILE"
# RCPT answers that mean "this address does not exist / is not accepted": the account's email is bad.
_INVALID_ADDRESS_CODES = {501, 550, 551, 553}


def ssl_context() -> ssl.SSLContext:
    """The TLS context of every connection: certificate and host name verified."""
    return ssl.create_default_context(cafile=os.environ.get(CA_FILE_ENV) or None)


class _Scrubber:
    """Removes the password (and its base64 forms, as AUTH sends it) from any text."""

    def __init__(self, password: str | None, username: str | None) -> None:
        self.needles: list[str] = []
        if password:
            self.needles.append(password)
            self.needles.append(base64.b64encode(password.encode()).decode())
            if username:
                self.needles.append(base64.b64encode(f"\0{username}\0{password}".encode()).decode())

    def __call__(self, text: str) -> str:
        for needle in self.needles:
            text = text.replace(needle, "[redacted]")
        return text


def _answer(code: int, raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return f"{code} {' '.join(text.split())}"[:500]


def _domain(address: str) -> str:
    domain = address.rsplit("@", 1)[-1].strip().lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _connect(cfg: SmtpSettings, password: str | None, timeout: float) -> smtplib.SMTP:
    """An open, greeted, secured and authenticated connection (raises smtplib/OS errors)."""
    local = _domain(cfg.from_address)  # the EHLO name; avoids a slow getfqdn() lookup per message
    if cfg.security == "tls":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(cfg.host, cfg.port, local_hostname=local, timeout=timeout,
                                              context=ssl_context())
    else:
        smtp = smtplib.SMTP(cfg.host, cfg.port, local_hostname=local, timeout=timeout)
    try:
        smtp.ehlo()
        if cfg.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError("the server does not offer STARTTLS")
            smtp.starttls(context=ssl_context())
            smtp.ehlo()
        if cfg.username:
            smtp.login(cfg.username, password or "")
    except BaseException:
        _close(smtp)
        raise
    return smtp


def _close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _error(exc: BaseException, cfg: SmtpSettings, scrub: _Scrubber) -> ProviderError:
    """One ProviderError per failure, worded for the person reading the queue item's error."""
    where = f"SMTP {cfg.host}:{cfg.port}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        answers = list(exc.recipients.values())
        code, raw = answers[0] if answers else (550, b"refused")
        msg = scrub(f"{where}: recipient refused: {_answer(code, raw)}")
        if code >= 500:
            return ProviderError(msg, retryable=False, invalid_address=code in _INVALID_ADDRESS_CODES)
        return ProviderError(msg, retryable=True)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return ProviderError(
            scrub(f"{where}: authentication failed for user {cfg.username!r} ({_answer(exc.smtp_code, exc.smtp_error)}); "
                  "check the username and password"), retryable=False)
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return ProviderError(
            scrub(f"{where}: sender {cfg.from_address} refused: {_answer(exc.smtp_code, exc.smtp_error)}"),
            retryable=exc.smtp_code < 500)
    if isinstance(exc, smtplib.SMTPResponseException):  # data, HELO, connect and other answers
        return ProviderError(scrub(f"{where}: server answered {_answer(exc.smtp_code, exc.smtp_error)}"),
                             retryable=exc.smtp_code < 500)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        text = str(exc) or "a required extension is not supported"
        if "auth" in text.lower():
            text += "; the server offers no AUTH on this connection (does it need STARTTLS or TLS?)"
        return ProviderError(scrub(f"{where}: {text}"), retryable=False)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ProviderError(f"{where}: TLS certificate not trusted ({exc.verify_message or exc.reason})", retryable=False)
    if isinstance(exc, ssl.SSLError):
        return ProviderError(
            f"{where}: TLS failed ({exc.reason or exc}); check that the port matches the security setting "
            "(465: tls, 587: starttls)", retryable=False)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return ProviderError(scrub(f"{where}: server closed the connection ({exc})"), retryable=True)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return ProviderError(f"{where}: timed out", retryable=True)
    if isinstance(exc, ConnectionRefusedError):
        return ProviderError(f"{where}: connection refused", retryable=True)
    if isinstance(exc, socket.gaierror):
        return ProviderError(f"{where}: host not found ({exc.strerror or exc})", retryable=True)
    if isinstance(exc, OSError):
        return ProviderError(f"{where}: connection failed ({exc.strerror or exc.__class__.__name__})", retryable=True)
    if isinstance(exc, smtplib.SMTPException):
        return ProviderError(scrub(f"{where}: {exc}"), retryable=True)
    return ProviderError(f"{where}: {exc.__class__.__name__}", retryable=True)


def _settings(settings: dict[str, Any]) -> SmtpSettings:
    try:
        return SmtpSettings.model_validate(settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ProviderError(
            f"invalid SMTP settings: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", retryable=False
        ) from None


def message_id(message: OutboundMessage, from_address: str) -> str:
    """The Message-ID (without angle brackets): stable for one queue-item attempt (see the module doc)."""
    digest = hashlib.sha256(
        "\0".join([
            str(message.organization_id), str(message.account_id), message.idempotency_key, message.to,
            message.subject or "", message.body_text, message.body_html or "",
        ]).encode()
    ).hexdigest()[:32]
    key = re.sub(r"[^A-Za-z0-9.\-_]", "", message.idempotency_key)[:40]
    return f"{key}.{digest}@{_domain(from_address)}"


def build_message(message: OutboundMessage, cfg: SmtpSettings, *, ref: str, now: datetime | None = None) -> EmailMessage:
    msg = EmailMessage()
    try:
        msg["From"] = Address(display_name=cfg.from_name or "", addr_spec=cfg.from_address)
        to = Address(addr_spec=message.to.strip())
    except (ValueError, IndexError, MessageError) as exc:
        raise ProviderError(f"invalid email address {message.to!r}: {exc}", retryable=False, invalid_address=True) from None
    msg["To"] = to
    if cfg.reply_to:
        msg["Reply-To"] = cfg.reply_to
    msg["Subject"] = " ".join((message.subject or "").split())  # one line: no header injection
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = f"<{ref}>"
    url = (message.context or {}).get("unsubscribe_url")
    if url:
        url = "".join(str(url).split())
        msg["List-Unsubscribe"] = f"<{url}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(message.body_text or "")
    if message.body_html:
        msg.add_alternative(message.body_html, subtype="html")
    return msg


class SmtpProvider:
    """Sends each message over one SMTP connection; see the module documentation."""

    def __init__(self, settings: dict[str, Any], secrets: dict[str, str], env: Any) -> None:
        self.cfg = _settings(settings)
        self._password = secrets.get("password") or None
        self.env = env
        self.timeout = float(getattr(env, "timeout_seconds", 10.0))

    def __repr__(self) -> str:  # never the password
        return f"SmtpProvider({self.cfg.host}:{self.cfg.port}, security={self.cfg.security}, user={self.cfg.username!r})"

    def send(self, message: OutboundMessage) -> SendResult:
        ref = message_id(message, self.cfg.from_address)
        msg = build_message(message, self.cfg, ref=ref)
        scrub = _Scrubber(self._password, self.cfg.username)
        try:
            smtp = _connect(self.cfg, self._password, self.timeout)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a ProviderError
            raise _error(exc, self.cfg, scrub) from None
        whole_message_sent = _watch_for_end_of_data(smtp)
        try:
            smtp.send_message(msg, from_addr=self.cfg.from_address, to_addrs=[msg["To"].addresses[0].addr_spec])
        except Exception as exc:  # noqa: BLE001
            err = _error(exc, self.cfg, scrub)
            if whole_message_sent() and not isinstance(exc, smtplib.SMTPResponseException):
                # The server has the whole message and did not answer (a timeout, a dropped
                # connection): it may deliver it, and a retry could deliver it twice.
                err = ProviderError(f"{err}, after the whole message was sent; it may have been delivered, "
                                    "so it is not sent again", retryable=False)
            _close(smtp)
            raise err from None
        _close(smtp)  # the message is accepted: a failing QUIT changes nothing
        log.info("smtp: sent %s to account %s via %s:%s", ref, message.account_id, self.cfg.host, self.cfg.port)
        return SendResult(provider_ref=ref)


def _watch_for_end_of_data(smtp: smtplib.SMTP) -> Any:
    """Wrap the connection's ``send`` to notice when the message body, with its terminating
    ``CRLF . CRLF`` (what ``smtplib.SMTP.data`` sends last), has gone out. Returns a function that
    tells whether it has."""
    sent = [False]
    send = smtp.send

    def watching_send(data: Any) -> None:
        send(data)
        if isinstance(data, bytes) and data.endswith(b"\r\n.\r\n"):
            sent[0] = True

    smtp.send = watching_send  # type: ignore[method-assign]
    return lambda: sent[0]


def check_connection(settings: dict[str, Any], secrets: dict[str, str], timeout: float) -> str | None:
    """Connect, EHLO, STARTTLS or TLS, log in, QUIT. None when all of it works, else a readable error."""
    try:
        cfg = _settings(settings)
    except ProviderError as exc:
        return str(exc)
    password = secrets.get("password") or None
    if cfg.username and not password:
        return "a username is set but no password is stored"
    try:
        smtp = _connect(cfg, password, timeout)
    except Exception as exc:  # noqa: BLE001
        return str(_error(exc, cfg, _Scrubber(password, cfg.username)))
    _close(smtp)
    return None

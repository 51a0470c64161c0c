"""A fake Twilio Messages API on a real loopback HTTP server, for the Twilio adapter's tests.

It answers ``POST /2010-04-01/Accounts/{sid}/Messages.json`` like Twilio does: HTTP basic auth
(account SID and auth token; 401 with error 20003 otherwise), ``To`` and ``From`` or
``MessagingServiceSid`` required, numbers checked (``+`` and 8–15 digits, after an optional
``whatsapp:``), then 201 with the message JSON and a fresh ``SM…`` SID. Special numbers:

* ``INVALID`` numbers answer error 21211 (invalid 'To' number), ``LANDLINE`` numbers 21614;
* numbers in ``unsubscribed`` answer 21610 (the recipient replied STOP);
* ``mode = "down"`` answers 500, ``"rate_limited"`` 429, ``"slow"`` waits ``slow_seconds`` first.

Every request is recorded (method, path, auth, form). :meth:`FakeTwilio.callback` builds a status
callback for a sent message exactly as Twilio would: the form fields, POSTed to the message's
``StatusCallback`` URL, signed with ``X-Twilio-Signature``.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from duecourse.channels.twilio import twilio_signature

E164 = re.compile(r"^\+[1-9]\d{7,14}$")
PATH = re.compile(r"^/2010-04-01/Accounts/(AC[0-9a-fA-F]{32})/Messages\.json$")
INVALID = "+15005550001"  # Twilio's own magic test number for "invalid To"
LANDLINE = "+15005550009"  # Twilio's magic test number for "not a mobile number"


@dataclass
class Recorded:
    method: str
    path: str
    auth: tuple[str, str] | None
    form: dict[str, str]
    headers: dict[str, str]


@dataclass
class Sent:
    sid: str
    account_sid: str
    form: dict[str, str]


@dataclass
class FakeTwilio:
    accounts: dict[str, str] = field(default_factory=dict)  # account SID -> auth token
    unsubscribed: set[str] = field(default_factory=set)
    mode: str = "ok"  # ok | down | rate_limited | slow
    slow_seconds: float = 2.0
    requests: list[Recorded] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:  # keep the test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                fake._handle(self, raw)

            def do_GET(self) -> None:  # noqa: N802
                fake._reply(self, 404, {"code": 20404, "message": "The requested resource was not found", "status": 404})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeTwilio:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_account(self, sid: str, token: str) -> None:
        self.accounts[sid] = token

    # --- the Messages API ----------------------------------------------------------------------

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    @staticmethod
    def _error(code: int, message: str, status: int) -> dict[str, Any]:
        return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}

    def _handle(self, handler: BaseHTTPRequestHandler, raw: str) -> None:
        auth = None
        header = handler.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            auth = (user, password)
        form = dict(parse_qsl(raw, keep_blank_values=True))
        with self._lock:
            self.requests.append(Recorded("POST", handler.path, auth, form, dict(handler.headers.items())))
        if self.mode == "slow":
            time.sleep(self.slow_seconds)
        if self.mode == "drop":  # read the request, then close the connection without an answer
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return None
        if self.mode == "down":
            return self._reply(handler, 500, self._error(20500, "Internal Server Error", 500))
        if self.mode == "rate_limited":
            return self._reply(handler, 429, self._error(20429, "Too Many Requests", 429))
        match = PATH.match(handler.path)
        if match is None:
            return self._reply(handler, 404, self._error(20404, "The requested resource was not found", 404))
        sid = match.group(1)
        if auth is None or auth[0] != sid or self.accounts.get(sid) != auth[1]:
            return self._reply(handler, 401, self._error(20003, "Authenticate", 401))
        to, sender, service = form.get("To", ""), form.get("From"), form.get("MessagingServiceSid")
        if not to:
            return self._reply(handler, 400, self._error(21604, "A 'To' phone number is required.", 400))
        if not sender and not service:
            return self._reply(handler, 400, self._error(21603, "A 'From' phone number is required.", 400))
        if not form.get("Body"):
            return self._reply(handler, 400, self._error(21602, "Message body is required.", 400))
        whatsapp = to.startswith("whatsapp:")
        if sender and sender.startswith("whatsapp:") != whatsapp:
            return self._reply(handler, 400, self._error(63007, "Twilio could not find a Channel with the specified From address", 400))
        number = to.removeprefix("whatsapp:")
        if not E164.match(number) or number == INVALID:
            return self._reply(handler, 400, self._error(21211, f"The 'To' number {to} is not a valid phone number.", 400))
        if number == LANDLINE:
            return self._reply(handler, 400, self._error(21614, f"'To' number {to} is not a valid mobile number", 400))
        if number in self.unsubscribed:
            return self._reply(handler, 400, self._error(21610, "Attempt to send to unsubscribed recipient", 400))
        message_sid = "SM" + uuid.uuid4().hex
        with self._lock:
            self.sent.append(Sent(message_sid, sid, form))
        return self._reply(handler, 201, {
            "sid": message_sid, "account_sid": sid, "to": to, "from": sender, "messaging_service_sid": service,
            "body": form.get("Body"), "status": "queued", "num_segments": "1", "direction": "outbound-api",
            "error_code": None, "error_message": None, "api_version": "2010-04-01",
            "uri": f"/2010-04-01/Accounts/{sid}/Messages/{message_sid}.json",
        })

    # --- callbacks back to the app -------------------------------------------------------------

    def callback(self, message_sid: str, status: str, *, error_code: str | None = None,
                 token: str | None = None) -> tuple[str, dict[str, str], dict[str, str]]:
        """(url, form, headers) of the status callback Twilio would POST for a sent message."""
        sent = next(s for s in self.sent if s.sid == message_sid)
        url = sent.form["StatusCallback"]
        form = {
            "AccountSid": sent.account_sid, "ApiVersion": "2010-04-01", "MessageSid": message_sid, "SmsSid": message_sid,
            "MessageStatus": status, "SmsStatus": status, "From": sent.form.get("From", ""), "To": sent.form["To"],
        }
        if error_code:
            form["ErrorCode"] = error_code
        signature = twilio_signature(token or self.accounts[sent.account_sid], url, form)
        return url, form, {"X-Twilio-Signature": signature}

    def post_callback(self, client: Any, message_sid: str, status: str, **kw: Any) -> Any:
        """Send the status callback through ``client`` (a TestClient: the path of the URL is posted;
        an httpx client: the absolute URL)."""
        url, form, headers = self.callback(message_sid, status, **kw)
        target = url if getattr(client, "base_url", None) is None or "testserver" not in str(client.base_url) else _path(url)
        return client.post(target, data=form, headers=headers)


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def inbound(token: str, url: str, *, sender: str, to: str, body: str, sid: str | None = None,
            account_sid: str = "AC" + "0" * 32, **extra: str) -> tuple[dict[str, str], dict[str, str]]:
    """(form, headers) of an incoming message Twilio would POST to ``url`` (``extra``: more fields,
    e.g. ``OptOutType``)."""
    form = {
        "MessageSid": sid or "SM" + uuid.uuid4().hex, "AccountSid": account_sid, "From": sender, "To": to,
        "Body": body, "NumMedia": "0", "ApiVersion": "2010-04-01", **extra,
    }
    return form, {"X-Twilio-Signature": twilio_signature(token, url, form)}

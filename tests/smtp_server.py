"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, a free port, plain, STARTTLS or implicit TLS,
optional AUTH, a recipient it refuses. Every accepted message is kept, parsed, in ``handler.messages``."""

from __future__ import annotations

import asyncio
import email
import socket
import ssl
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import Any, Iterator

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

REFUSED = "nobody@example.com"
USERNAME = "mailer"
PASSWORD = "s3cret-Pa55word-xyz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    login: str | None
    tls: bool


@dataclass
class Handler:
    refuse: set[str] = field(default_factory=lambda: {REFUSED})
    messages: list[Received] = field(default_factory=list)
    # Keep the message, then wait this long before answering the end of DATA (client timeouts).
    slow_data_seconds: float = 0.0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if address in self.refuse:
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self.messages.append(Received(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            message=email.message_from_bytes(envelope.original_content, policy=policy.default),  # type: ignore[arg-type]
            login=login, tls=server.transport.get_extra_info("ssl_object") is not None,
        ))
        if self.slow_data_seconds:
            await asyncio.sleep(self.slow_data_seconds)
        return "250 Message accepted for delivery"


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == USERNAME.encode() and auth_data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


@dataclass
class Server:
    host: str
    port: int
    handler: Handler
    security: str  # none | starttls | tls


@contextmanager
def smtp_server(*, security: str = "none", server_ctx: ssl.SSLContext | None = None, auth: bool = False,
                auth_require_tls: bool = True) -> Iterator[Server]:
    handler = Handler()
    port = free_port()
    kwargs: dict[str, Any] = {}
    if auth:
        # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; an implicit-TLS connection is TLS anyway.
        kwargs.update(authenticator=authenticator, auth_require_tls=auth_require_tls and security != "tls")
    if security == "starttls":
        assert server_ctx is not None
        kwargs.update(tls_context=server_ctx, require_starttls=True)
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, ssl_context=server_ctx if security == "tls" else None, **kwargs,
    )
    controller.start()
    try:
        yield Server("127.0.0.1", port, handler, security)
    finally:
        controller.stop()

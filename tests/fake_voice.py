"""A stand-in for an AI voice-agent service: a real HTTP server on 127.0.0.1 (random port).

It records every call request (path, headers, JSON body) and answers ``{"call_id": "call-N"}``;
``mode`` makes it answer 500, be slow, refuse an invalid number with 422, or refuse with 400.
A repeated ``Idempotency-Key`` gets the same call id back (no second call), like a careful service.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeVoice:
    mode: str = "ok"  # ok | error500 | slow | invalid_number | bad_request | rate_limited
    slow_seconds: float = 2.0
    requests: list[Recorded] = field(default_factory=list)
    calls: dict[str, str] = field(default_factory=dict)  # idempotency key -> call id
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1/calls"

    def start(self) -> FakeVoice:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                try:
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                fake.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                mode = fake.mode
                if mode == "slow":
                    time.sleep(fake.slow_seconds)
                    self._answer(200, {"call_id": "too-late"})
                    return
                if mode == "error500":
                    self._answer(500, {"error": "internal"})
                    return
                if mode == "rate_limited":
                    self._answer(429, {"error": "slow down"})
                    return
                if mode == "invalid_number":
                    self._answer(422, {"error": "invalid_number", "field": "to", "message": "not a callable number"})
                    return
                if mode == "bad_request":
                    self._answer(400, {"error": "unknown agent_id"})
                    return
                key = self.headers.get("Idempotency-Key") or f"anon-{len(fake.requests)}"
                call_id = fake.calls.setdefault(key, f"call-{len(fake.calls) + 1}")
                self._answer(201, {"call_id": call_id, "status": "queued"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

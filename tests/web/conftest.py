"""Browser tests of the web UI: the app served by uvicorn on loopback, driven by the system Chromium.

Fixtures (all parametrized over SQLite and PostgreSQL through the ``db`` fixture of tests/conftest.py):

* ``server``: the app on ``http://127.0.0.1:<free port>`` with a FixedClock at T0 (``server.clock``).
* ``web_org``: an organization with one user per role (``web_org.users["viewer"]`` -> WebUser);
  every password is ``web_org.password``.
* ``login_as(role)``: a new browser page already logged in as that role's user (session cookie set
  directly; ``test_login_form`` covers the real form). ``admin_page``/``viewer_page`` are shortcuts.
* ``browser``: one Chromium per test session (per xdist worker).
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn

from duecourse.app import create_app
from duecourse.clock import FixedClock
from duecourse.config import Settings
from duecourse.db import Database
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import Role, User
from duecourse.tenancy.security import hash_password, new_session_token

SECRET = "web-test-secret"
PASSWORD = "correct horse battery"
# The README's screenshots: refreshed with `DUECOURSE_SCREENSHOTS=1 ./scripts/test tests/web`; other
# runs take them too (the pages must render) but keep them out of the working tree.
SCREENSHOTS = (
    Path(__file__).resolve().parents[2] / "docs" / "screenshots"
    if os.environ.get("DUECOURSE_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="duecourse-screenshots-"))
)
CHROMIUM = "/usr/bin/chromium"


@dataclass
class LiveServer:
    url: str
    app: object
    db: Database
    clock: FixedClock

    def session_cookie(self, user_id: int) -> str:
        with self.db.transaction() as s:
            user = s.get(User, user_id)
            password_hash, generation = user.password_hash, user.session_generation
        return new_session_token(SECRET, user_id=user_id, password_hash=password_hash, generation=generation)


@dataclass
class WebUser:
    id: int
    email: str
    name: str
    role: str


@dataclass
class WebOrg:
    id: int
    users: dict[str, WebUser] = field(default_factory=dict)
    password: str = PASSWORD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(db: Database, clock: FixedClock) -> Iterator[LiveServer]:
    settings = Settings(database_url=db.url, secret_key=SECRET)
    app = create_app(settings, clock=clock, db=db)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    yield LiveServer(f"http://127.0.0.1:{port}", app, db, clock)
    srv.should_exit = True
    thread.join(timeout=10)


@functools.lru_cache
def _password_hash(password: str) -> str:
    # argon2 costs ~0.1 s by design: hash once per session, not per user.
    return hash_password(password)


def create_web_org(db: Database, clock: FixedClock, name: str = "Acme Receivables") -> WebOrg:
    """An organization with one user per role, written straight to the database."""
    with db.transaction() as session:
        org = tenancy.create_organization(
            session, name=name, timezone="Europe/Madrid", base_currency="EUR", now=clock.now()
        )
        out = WebOrg(id=org.id)
        people = {"admin": "Alice Admin", "manager": "Marco Manager", "agent": "Ana Agent", "viewer": "Victor Viewer"}
        for role in Role:
            user = User(
                organization_id=org.id,
                email=f"{role.value}-{org.id}@example.com",
                name=people[role.value],
                password_hash=_password_hash(PASSWORD),
                role=role,
                created_at=clock.now(),
            )
            session.add(user)
            session.flush()
            out.users[role.value] = WebUser(user.id, user.email, user.name, role.value)
    return out


@pytest.fixture
def web_org(db: Database, clock: FixedClock) -> WebOrg:
    return create_web_org(db, clock)


@pytest.fixture(scope="session")
def browser():  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=10_000)

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


@pytest.fixture
def new_page(browser, server: LiveServer) -> Iterator[Callable[..., object]]:  # type: ignore[no-untyped-def]
    """``new_page(user_id=None)``: a page in a fresh browser context, logged in when given a user id."""
    contexts = []

    def _new(user_id: int | None = None):  # type: ignore[no-untyped-def]
        context = browser.new_context(base_url=server.url, viewport={"width": 1400, "height": 900})
        # Generous: a loaded CI machine is slow; a passing test never waits for these.
        context.set_default_timeout(15000)
        context.set_default_navigation_timeout(20000)
        if user_id is not None:
            context.add_cookies(
                [{"name": "duecourse_session", "value": server.session_cookie(user_id), "url": server.url}]
            )
        contexts.append(context)
        return context.new_page()

    yield _new
    for c in contexts:
        c.close()


@pytest.fixture
def login_as(new_page, web_org: WebOrg):  # type: ignore[no-untyped-def]
    """``login_as("viewer")``: a page logged in as the organization's user with that role."""

    def _login(role: str):  # type: ignore[no-untyped-def]
        return new_page(web_org.users[role].id)

    return _login


@pytest.fixture
def admin_page(login_as):  # type: ignore[no-untyped-def]
    return login_as("admin")


@pytest.fixture
def viewer_page(login_as):  # type: ignore[no-untyped-def]
    return login_as("viewer")

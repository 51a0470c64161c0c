"""Test fixtures: every database test runs on SQLite and on PostgreSQL.

The ``db`` fixture is parametrized over both backends. PostgreSQL tests get a database of their
own per test session (so parallel sessions never collide) and are skipped only when no server
answers, unless ``DUECOURSE_REQUIRE_POSTGRES=1`` (CI), where that is an error.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from duecourse.app import create_app
from duecourse.clock import FixedClock
from duecourse.config import Settings, get_settings
from duecourse.db import Database
from duecourse.db.migrate import upgrade
from duecourse.db.models import metadata
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import Role, User
from duecourse.tenancy.security import hash_password

# The engine's default providers sign every message's unsubscribe link with the process's key and
# never with an empty one; the CLI and the app fill the key in (resolve_secret_key), tests do it here.
_PROCESS_SETTINGS = get_settings()
if not _PROCESS_SETTINGS.secret_key:
    _PROCESS_SETTINGS.secret_key = "tests-only-secret-key-0123456789abcdef"

PG_ADMIN_URL = os.environ.get("DUECOURSE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("DUECOURSE_REQUIRE_POSTGRES") == "1"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


def _pg_admin():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), autocommit=True, connect_timeout=3)


class _Backends:
    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path_factory
        self.dbs: dict[str, Database] = {}
        self.pg_name: str | None = None

    def get(self, kind: str) -> Database:
        if kind in self.dbs:
            return self.dbs[kind]
        if kind == "sqlite":
            url = f"sqlite:///{self.tmp.mktemp('sqlite') / 'test.db'}"
        else:
            try:
                with _pg_admin() as conn:
                    self.pg_name = f"duecourse_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
                    conn.execute(f'CREATE DATABASE "{self.pg_name}"')
            except Exception as exc:  # noqa: BLE001
                if REQUIRE_PG:
                    pytest.fail(f"PostgreSQL is required (DUECOURSE_REQUIRE_POSTGRES=1) but unreachable: {exc}")
                pytest.skip(f"PostgreSQL unreachable: {exc}")
            url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.pg_name}"
        upgrade(url)
        self.dbs[kind] = Database(url)
        return self.dbs[kind]

    def close(self) -> None:
        for db in self.dbs.values():
            db.dispose()
        if self.pg_name:
            with _pg_admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Backends]:
    backends = _Backends(tmp_path_factory)
    yield backends
    backends.close()


def _wipe(db: Database) -> None:
    tables = [t.name for t in reversed(metadata.sorted_tables)]
    with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            conn.execute(text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"))
        else:
            conn.execute(text("PRAGMA defer_foreign_keys=ON"))
            for t in tables:
                conn.execute(text(f'DELETE FROM "{t}"'))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, _backends: _Backends) -> Iterator[Database]:
    """A migrated, empty database of each kind."""
    database = _backends.get(request.param)
    yield database
    _wipe(database)


@pytest.fixture(autouse=True)
def _fresh_provider_breakers() -> Iterator[None]:
    """The dispatcher remembers failing providers per process; every test starts with none."""
    from duecourse.engine import dispatch

    dispatch._BREAKERS.clear()
    yield
    dispatch._BREAKERS.clear()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def app(db: Database, clock: FixedClock):  # type: ignore[no-untyped-def]
    settings = Settings(database_url=db.url, secret_key="test-secret")
    return create_app(settings, clock=clock, db=db)


@pytest.fixture
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app) as c:
        yield c


@dataclass
class OrgContext:
    """An organization with an admin user and one API key per role."""

    id: int
    client: TestClient
    keys: dict[str, str] = field(default_factory=dict)
    admin_email: str = ""
    admin_password: str = "correct horse battery"

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def request(self, method: str, url: str, role: str = "admin", **kw: Any):  # type: ignore[no-untyped-def]
        return self.client.request(method, url, headers=self.headers(role), **kw)

    def get(self, url: str, role: str = "admin", **kw: Any):  # type: ignore[no-untyped-def]
        return self.request("GET", url, role, **kw)

    def post(self, url: str, role: str = "admin", **kw: Any):  # type: ignore[no-untyped-def]
        return self.request("POST", url, role, **kw)

    def patch(self, url: str, role: str = "admin", **kw: Any):  # type: ignore[no-untyped-def]
        return self.request("PATCH", url, role, **kw)

    def put(self, url: str, role: str = "admin", **kw: Any):  # type: ignore[no-untyped-def]
        return self.request("PUT", url, role, **kw)

    def delete(self, url: str, role: str = "admin", **kw: Any):  # type: ignore[no-untyped-def]
        return self.request("DELETE", url, role, **kw)


@functools.lru_cache
def _admin_hash(password: str) -> str:
    return hash_password(password)


@pytest.fixture
def make_org(db: Database, client: TestClient, clock: FixedClock):  # type: ignore[no-untyped-def]
    counter = iter(range(1, 1000))

    def _make(name: str | None = None, timezone: str = "Europe/Madrid", currency: str = "EUR") -> OrgContext:
        n = next(counter)
        with db.transaction() as session:
            org = tenancy.create_organization(
                session, name=name or f"Org {n}", timezone=timezone, base_currency=currency, now=clock.now()
            )
            ctx = OrgContext(id=org.id, client=client, admin_email=f"admin{n}-{org.id}@example.com")
            # Hashing with argon2 costs ~0.1 s by design; hash once per test session, not per organization.
            session.add(
                User(
                    organization_id=org.id,
                    email=ctx.admin_email,
                    name="Admin",
                    password_hash=_admin_hash(ctx.admin_password),
                    role=Role.admin,
                    created_at=clock.now(),
                )
            )
            for role in Role:
                ctx.keys[role.value] = tenancy.create_api_key(
                    session, organization_id=org.id, name=f"{role.value} key", role=role, now=clock.now()
                ).key
        return ctx

    return _make


@pytest.fixture
def org(make_org) -> OrgContext:  # type: ignore[no-untyped-def]
    return make_org("Acme Receivables")


@pytest.fixture
def other_org(make_org) -> OrgContext:  # type: ignore[no-untyped-def]
    return make_org("Other Org")

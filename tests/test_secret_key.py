"""The secret key: generated and kept beside the embedded SQLite database, required elsewhere;
and the session cookie's Secure flag under an https public URL."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from duecourse.app import create_app
from duecourse.channels.links import read_unsubscribe_token, unsubscribe_token
from duecourse.cli import app as cli_app
from duecourse.config import (
    OLD_DEFAULT_SECRET_KEY,
    SecretKeyError,
    Settings,
    check_secret_key,
    get_settings,
    resolve_secret_key,
)
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import Role

GOOD_KEY = "k" * 32
PG_URL = "postgresql+psycopg://duecourse@db.internal/duecourse"
KEY_FILE = "duecourse.db.secret-key"


@pytest.fixture
def bare_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No DUECOURSE_* configuration at all, in an empty working directory (no .env, no database)."""
    for name in ("DUECOURSE_SECRET_KEY", "DUECOURSE_ENCRYPTION_KEY", "DUECOURSE_DATABASE_URL", "DUECOURSE_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What the command line started: uvicorn (the app it was given) or the engine loop ("loop");
    neither runs, so a command that should have refused fails the test instead of serving forever."""
    import uvicorn

    from duecourse.engine import runner

    calls: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    monkeypatch.setattr(runner, "run_loop", lambda *a, **kw: calls.append("loop"))
    monkeypatch.setattr(runner, "freeze_startup_heap", lambda: None)
    return calls


def _flat(text: str) -> str:
    return " ".join(text.split())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the embedded setup ---------------------------------------------------------------------------


def test_embedded_setup_generates_a_key_once_and_keeps_it_beside_the_database(bare_env: Path) -> None:
    first = resolve_secret_key(get_settings())  # what a process does when it starts
    assert get_settings().secret_key == first.secret_key  # filled in for everything reading the settings
    key_file = bare_env / KEY_FILE
    assert first.database_url == "sqlite:///duecourse.db"
    assert key_file.is_file() and _mode(key_file) == 0o600
    assert key_file.read_text().strip() == first.secret_key
    assert len(first.secret_key) >= 32 and first.secret_key != OLD_DEFAULT_SECRET_KEY
    check_secret_key(first)  # good enough to run

    # A restart (or another process on the same database) finds the same key...
    get_settings.cache_clear()
    assert resolve_secret_key(get_settings()).secret_key == first.secret_key
    assert resolve_secret_key(Settings()).secret_key == first.secret_key
    get_settings.cache_clear()
    app_one = create_app()
    get_settings.cache_clear()
    app_two = create_app()
    assert app_one.state.settings.secret_key == app_two.state.settings.secret_key == first.secret_key
    # ...so an unsubscribe link signed before it still works after it.
    token = unsubscribe_token(app_one.state.settings.secret_key, organization_id=1, account_id=2, channel="email")
    assert read_unsubscribe_token(app_two.state.settings.secret_key, token) is not None
    assert read_unsubscribe_token(OLD_DEFAULT_SECRET_KEY, token) is None
    app_one.state.db.dispose()
    app_two.state.db.dispose()

    # Another database has a key of its own.
    other = Settings(database_url=f"sqlite:///{bare_env / 'other' / 'x.db'}")
    (bare_env / "other").mkdir()
    assert resolve_secret_key(other).secret_key != first.secret_key
    assert _mode(bare_env / "other" / "x.db.secret-key") == 0o600


def test_embedded_setup_keeps_an_existing_key_file_and_refuses_a_damaged_one(bare_env: Path, started) -> None:  # type: ignore[no-untyped-def]
    key_file = bare_env / KEY_FILE
    key_file.write_text("an-existing-key-of-the-embedded-setup-0123456789\n")
    key_file.chmod(0o644)
    assert resolve_secret_key(Settings()).secret_key == "an-existing-key-of-the-embedded-setup-0123456789"
    assert _mode(key_file) == 0o600  # tightened: it is a secret
    key_file.write_text("short\n")
    with pytest.raises(SecretKeyError, match="secret key file"):
        resolve_secret_key(Settings())
    r = CliRunner().invoke(cli_app, ["serve", "--no-engine"])
    assert r.exit_code == 2 and "secret key file" in r.output
    assert started == []


def test_readme_demo_and_serve_run_with_zero_configuration(bare_env: Path, started) -> None:  # type: ignore[no-untyped-def]
    served = started
    cli = CliRunner()
    r = cli.invoke(cli_app, ["demo", "--no-serve"])
    assert r.exit_code == 0, r.output
    key_file = bare_env / KEY_FILE
    assert key_file.is_file() and _mode(key_file) == 0o600
    key = key_file.read_text().strip()

    get_settings.cache_clear()  # a new process
    r = cli.invoke(cli_app, ["serve", "--no-engine"])
    assert r.exit_code == 0, r.output
    assert len(served) == 1 and served[0].state.settings.secret_key == key
    served[0].state.db.dispose()


def _run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``duecourse ARGS`` in a process of its own (nothing imported or cached yet), without DUECOURSE_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DUECOURSE_")}
    return subprocess.run([sys.executable, "-c", "from duecourse.cli import main; main()", *args], cwd=cwd,
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_importing_duecourse_or_asking_for_help_writes_no_key_file(tmp_path: Path) -> None:
    assert _run_cli(tmp_path, "--help").returncode == 0
    assert not list(tmp_path.iterdir())


# --- any other database -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "DUECOURSE_SECRET_KEY is not set"),
        ("", "DUECOURSE_SECRET_KEY is not set"),
        (OLD_DEFAULT_SECRET_KEY, "old documented default"),
        ("k" * 31, "only 31 characters long"),
    ],
)
def test_check_secret_key_refuses_a_missing_or_guessable_key_on_postgresql(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch, key: str | None, reason: str
) -> None:
    monkeypatch.setenv("DUECOURSE_DATABASE_URL", PG_URL)
    if key is not None:
        monkeypatch.setenv("DUECOURSE_SECRET_KEY", key)
    settings = resolve_secret_key(get_settings())
    assert not list(bare_env.iterdir())  # nothing generated for PostgreSQL
    with pytest.raises(SecretKeyError) as exc:
        check_secret_key(settings)
    message = str(exc.value)
    assert reason in message
    assert "Set DUECOURSE_SECRET_KEY" in message and "at least 32 characters" in message
    assert "every process" in message
    with pytest.raises(SecretKeyError):
        create_app()  # the app factory of a process start refuses too


def test_check_secret_key_accepts_a_long_key_and_refuses_guessable_ones_everywhere() -> None:
    check_secret_key(Settings(database_url=PG_URL, secret_key=GOOD_KEY))
    # A key someone did set must be good on the embedded database as well.
    for bad in (OLD_DEFAULT_SECRET_KEY, "dev"):
        with pytest.raises(SecretKeyError):
            check_secret_key(Settings(database_url="sqlite:///x.db", secret_key=bad))


def test_check_secret_key_refuses_a_short_encryption_key() -> None:
    from cryptography.fernet import Fernet

    check_secret_key(Settings(database_url=PG_URL, secret_key=GOOD_KEY, encryption_key=Fernet.generate_key().decode()))
    check_secret_key(Settings(database_url=PG_URL, secret_key=GOOD_KEY, encryption_key="x" * 32))
    check_secret_key(Settings(database_url=PG_URL, secret_key=GOOD_KEY, encryption_key=""))  # empty: unset
    for bad in ("secret", "x" * 31, " " * 20 + "short"):
        with pytest.raises(SecretKeyError, match="DUECOURSE_ENCRYPTION_KEY is only"):
            check_secret_key(Settings(database_url="sqlite:///x.db", secret_key=GOOD_KEY, encryption_key=bad))


def test_create_app_never_signs_with_an_empty_key() -> None:
    with pytest.raises(SecretKeyError):
        create_app(Settings(database_url=PG_URL, secret_key=""))


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_cli_on_postgresql_refuses_to_start_without_a_proper_key(db, monkeypatch: pytest.MonkeyPatch, started) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DUECOURSE_DATABASE_URL", db.url)
    monkeypatch.delenv("DUECOURSE_SECRET_KEY", raising=False)
    cli = CliRunner()
    try:
        for key, reason in ((None, "is not set"), (OLD_DEFAULT_SECRET_KEY, "old documented default"),
                            ("too-short", "only 9 characters")):
            if key is not None:
                monkeypatch.setenv("DUECOURSE_SECRET_KEY", key)
            for command in (["tick"], ["worker"], ["scheduler"], ["serve", "--no-engine", "--no-migrate"]):
                get_settings.cache_clear()
                r = cli.invoke(cli_app, command)
                out = _flat(r.output)
                assert r.exit_code == 2, (command, r.output)
                assert out.startswith("error: DUECOURSE_SECRET_KEY ") and reason in out, out
                assert "Set DUECOURSE_SECRET_KEY" in out and "same for every process" in out
        assert started == []
        # Migrations sign nothing: they run either way.
        get_settings.cache_clear()
        assert cli.invoke(cli_app, ["migrate"]).exit_code == 0

        monkeypatch.setenv("DUECOURSE_SECRET_KEY", GOOD_KEY)
        get_settings.cache_clear()
        r = cli.invoke(cli_app, ["tick", "--at", "2030-01-07T09:30:00Z"])
        assert r.exit_code == 0, r.output
        get_settings.cache_clear()
        assert cli.invoke(cli_app, ["worker"]).exit_code == 0 and started == ["loop"]
    finally:
        get_settings.cache_clear()


def test_a_fresh_process_on_postgresql_refuses_to_serve_with_a_clear_message(tmp_path: Path) -> None:
    r = _run_cli(tmp_path, "serve", DUECOURSE_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/none")
    err = _flat(r.stderr)
    assert r.returncode == 2, r.stderr
    assert err.startswith("error: DUECOURSE_SECRET_KEY is not set.") and "Traceback" not in r.stderr
    assert "export DUECOURSE_SECRET_KEY=$(python -c" in err
    assert not list(tmp_path.iterdir())


# --- the session cookie -----------------------------------------------------------------------------


def _set_cookie(response, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The attributes of the Set-Cookie header for ``name``, lower-cased."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return [part.strip().lower() for part in header.split(";")]
    raise AssertionError(f"no Set-Cookie for {name}: {response.headers.get_list('set-cookie')}")


@pytest.fixture
def login_user(db, clock):  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        org = tenancy.create_organization(session, name="Cookie Org", timezone="UTC", base_currency="EUR", now=clock.now())
        tenancy.create_user(session, organization_id=org.id, email="cookie@example.com", password="correct horse battery",
                            role=Role.admin, name="C", now=clock.now())
    return "cookie@example.com", "correct horse battery"


@pytest.mark.parametrize(("public_url", "secure"), [("https://collections.example", True), ("http://127.0.0.1:8000", False)])
def test_api_login_session_cookie_is_secure_only_under_https(db, clock, login_user, public_url, secure) -> None:  # type: ignore[no-untyped-def]
    app = create_app(Settings(database_url=db.url, secret_key=GOOD_KEY, public_url=public_url), clock=clock, db=db)
    email, password = login_user
    with TestClient(app, base_url="https://testserver" if secure else "http://testserver") as client:
        r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        attrs = _set_cookie(r, "duecourse_session")
        assert ("secure" in attrs) is secure
        assert "httponly" in attrs
        assert client.get("/api/v1/me").status_code == 200  # the cookie works


@pytest.mark.parametrize(("public_url", "secure"), [("https://collections.example", True), ("http://127.0.0.1:8000", False)])
def test_web_login_session_cookie_is_secure_only_under_https(db, clock, login_user, public_url, secure) -> None:  # type: ignore[no-untyped-def]
    app = create_app(Settings(database_url=db.url, secret_key=GOOD_KEY, public_url=public_url), clock=clock, db=db)
    email, password = login_user
    with TestClient(app, base_url="https://testserver" if secure else "http://testserver") as client:
        page = client.get("/login")
        assert ("secure" in _set_cookie(page, "duecourse_csrf_nonce")) is secure
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = client.post("/login", data={"csrf_token": token, "email": email, "password": password, "next": "/execution"},
                        follow_redirects=False)
        assert r.status_code == 303, r.text
        attrs = _set_cookie(r, "duecourse_session")
        assert ("secure" in attrs) is secure
        assert "httponly" in attrs


def test_the_engine_never_signs_an_unsubscribe_link_with_an_empty_key() -> None:
    """Code that runs the engine without the CLI or the app (which fill in or require the key)
    must not send links anyone could forge."""
    from duecourse.channels.links import UnsubscribeTarget, read_unsubscribe_token
    from duecourse.channels.registry import Providers

    target = {"organization_id": 1, "account_id": 2, "channel": "email"}
    with pytest.raises(SecretKeyError, match="unsubscribe links"):
        Providers(Settings(database_url=PG_URL, secret_key=""), sandbox_only=True).unsubscribe_link(**target)
    link = Providers(Settings(database_url=PG_URL, secret_key=GOOD_KEY), sandbox_only=True).unsubscribe_link(**target)
    assert read_unsubscribe_token(GOOD_KEY, link.rsplit("/", 1)[1]) == UnsubscribeTarget(1, 2, "email")

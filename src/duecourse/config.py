"""Process-wide settings, read from ``DUECOURSE_*`` environment variables (or a ``.env`` file).

Per-organization settings (automation, dispatch rules, exclusions) live in the database:
see :mod:`duecourse.tenancy.settings`.

The secret key (``DUECOURSE_SECRET_KEY``) signs session cookies, CSRF tokens and unsubscribe links
and, unless ``DUECOURSE_ENCRYPTION_KEY`` is set, encrypts provider credentials. Every process of a
deployment must use the same one. When it is not set:

* on the embedded SQLite database, the first process to start (:func:`resolve_secret_key`)
  generates a random key and keeps it in a file beside the database (``<database file>.secret-key``, mode 0600), so every process using
  that database, and every restart, finds the same key;
* on any other database (PostgreSQL), the processes that sign or check anything (``serve``,
  ``demo``, ``worker``, ``scheduler``, ``tick``, the app factory) refuse to start:
  :func:`check_secret_key` says why.
"""

from __future__ import annotations

import os
import secrets
import stat
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRET_KEY_ENV = "DUECOURSE_SECRET_KEY"
# The default of earlier versions, published in their documentation: never accepted as a key.
OLD_DEFAULT_SECRET_KEY = "change-me-in-production"
MIN_SECRET_KEY_LENGTH = 32
SECRET_KEY_FILE_SUFFIX = ".secret-key"
_GENERATE_HINT = 'python -c "import secrets; print(secrets.token_urlsafe(48))"'


class SecretKeyError(RuntimeError):
    """The process cannot run with the configured (or missing) secret key; the message says what to do."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DUECOURSE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite:///duecourse.db",
        description="SQLAlchemy URL. SQLite file by default; postgresql+psycopg://user@host/db in production.",
    )
    secret_key: str = Field(
        default="",
        description="Signs session cookies, CSRF tokens and unsubscribe links; at least 32 characters, the same "
        "in every process. Unset on SQLite: generated once and kept beside the database file. Unset on any "
        "other database: the web server and the engine refuse to start.",
    )
    encryption_key: str | None = Field(
        default=None,
        description="Encrypts provider credentials at rest (a Fernet key, or any long random text). "
        "Defaults to a key derived from secret_key; set it separately to rotate one without the other.",
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="The address debtors and providers reach this app at: unsubscribe links and "
        "provider callbacks are built on it. When it starts with https://, cookies are marked Secure.",
    )
    provider_timeout_seconds: float = Field(
        default=10.0, description="Longest wait for a provider (SMTP, messaging API, voice service) per send."
    )
    dispatch_batch: int = Field(
        default=1000, ge=1, le=10_000,
        description="Queue items a worker claims and handles in one transaction. Larger batches cost "
        "fewer statements per message; at most 100 of a batch's messages go to network providers "
        "(sent one after another before the batch is recorded), the others wait for the next batch.",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    debug: bool = False
    sql_echo: bool = False
    session_max_age_seconds: int = 60 * 60 * 12
    page_size_max: int = 500

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None (another database, or an in-memory one)."""
        if not self.is_sqlite:
            return None
        from sqlalchemy.engine import make_url

        raw = make_url(self.database_url).database or ""
        if raw.startswith("file:"):  # a URI filename (?uri=true)
            if "mode=memory" in raw:
                return None
            raw = raw[len("file:"):].split("?", 1)[0]
        return None if raw in ("", ":memory:") else Path(raw)

    @property
    def secure_cookies(self) -> bool:
        """Cookies carry the Secure flag when the app is reached over HTTPS."""
        return self.public_url.strip().lower().startswith("https://")


def secret_key_problem(key: str | None) -> str | None:
    """Why ``key`` cannot sign anything (None when it can)."""
    if not key:
        return f"{SECRET_KEY_ENV} is not set"
    if key.strip() == OLD_DEFAULT_SECRET_KEY:
        return f"{SECRET_KEY_ENV} is the old documented default {OLD_DEFAULT_SECRET_KEY!r}, which anyone can read"
    if len(key) < MIN_SECRET_KEY_LENGTH:
        return f"{SECRET_KEY_ENV} is only {len(key)} characters long (at least {MIN_SECRET_KEY_LENGTH} are needed)"
    return None


def check_secret_key(settings: Settings) -> None:
    """Refuse to run with a missing or guessable secret key (raises :class:`SecretKeyError`).

    Call it with the settings of :func:`get_settings`, which has already filled in the embedded
    setup's generated key: what is left unset is a deployment on another database (PostgreSQL).
    A key that is set must be at least 32 characters and not the old default, on any database; so
    must ``DUECOURSE_ENCRYPTION_KEY`` when it is set."""
    encryption_key = (settings.encryption_key or "").strip()
    if encryption_key and len(encryption_key) < MIN_SECRET_KEY_LENGTH:  # (empty: unset, as everywhere)
        raise SecretKeyError(
            f"DUECOURSE_ENCRYPTION_KEY is only {len(encryption_key)} characters long (at least "
            f"{MIN_SECRET_KEY_LENGTH} are needed). It encrypts the provider credentials stored in the database, so a "
            f"guessable key gives them away with a copy of the database. Set it to a Fernet key or a random value "
            f"of at least {MIN_SECRET_KEY_LENGTH} characters, the same for every process, e.g. "
            f"export DUECOURSE_ENCRYPTION_KEY=$({_GENERATE_HINT}); or unset it to derive the key from "
            f"{SECRET_KEY_ENV}. Provider credentials saved under the old key cannot be read with a new one: "
            f"enter them again under Settings, Channels (or through the API) after the change"
        )
    problem = secret_key_problem(settings.secret_key)
    if problem is None:
        return
    raise SecretKeyError(
        f"{problem}. It signs session cookies, CSRF tokens and unsubscribe links (and, without "
        f"DUECOURSE_ENCRYPTION_KEY, encrypts provider credentials), so a guessable key lets anyone forge "
        f"them. Set {SECRET_KEY_ENV} to a random value of at least {MIN_SECRET_KEY_LENGTH} characters, the "
        f"same for every process of the deployment (web servers, workers, scheduler), e.g. "
        f"export {SECRET_KEY_ENV}=$({_GENERATE_HINT})"
    )


def secret_key_file(settings: Settings) -> Path | None:
    """Where the embedded setup keeps its generated key: beside the SQLite database file."""
    path = settings.sqlite_path
    return None if path is None else path.with_name(path.name + SECRET_KEY_FILE_SUFFIX)


def _read_key_file(path: Path) -> str:
    key = path.read_text(encoding="utf-8").strip()
    problem = secret_key_problem(key)
    if problem is not None:
        raise SecretKeyError(
            f"the secret key file {path} is unusable ({problem.replace(SECRET_KEY_ENV, 'its key')}). Remove it to "
            f"generate a new key (sessions, unsubscribe links already sent and stored provider credentials "
            f"stop working), or set {SECRET_KEY_ENV}"
        )
    try:  # it is a secret: owner only
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass
    return key


def load_or_create_key_file(path: Path) -> str:
    """The key kept in ``path``; on first use a new random key, written with mode 0600.

    Safe when several processes start at once: the key is written to a private temporary file
    and linked into place only if no other process got there first (then its key is used)."""
    if path.exists():
        return _read_key_file(path)
    key = secrets.token_urlsafe(48)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key_file(path)  # another process created it meanwhile
        except OSError:  # a file system without hard links: create the file exclusively instead
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return _read_key_file(path)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(key + "\n")
    except OSError as exc:
        raise SecretKeyError(
            f"cannot create the secret key file {path} ({exc.strerror or exc}); make its directory "
            f"writable or set {SECRET_KEY_ENV}"
        ) from exc
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    return key


def resolve_secret_key(settings: Settings) -> Settings:
    """Fill in the embedded setup's key when none is configured, in place, and return ``settings``.

    In place, so that everything already holding these settings (the process's :func:`get_settings`
    in particular, which modules read at import time) signs with the same key. SQLite file: the key
    kept beside it (generated on first use). In-memory SQLite: a random key for this process (its
    data does not outlive it either). Other databases: left unset, so that :func:`check_secret_key`
    refuses them.

    Called when a process starts (the command line, :func:`duecourse.app.create_app`), not by
    :func:`get_settings`: importing duecourse, or ``duecourse --help``, writes no file."""
    if settings.secret_key or not settings.is_sqlite:
        return settings
    path = secret_key_file(settings)
    settings.secret_key = load_or_create_key_file(path) if path is not None else secrets.token_urlsafe(48)
    return settings


@lru_cache
def get_settings() -> Settings:
    """The process's settings, as configured (the embedded key is filled in by :func:`resolve_secret_key`)."""
    return Settings()

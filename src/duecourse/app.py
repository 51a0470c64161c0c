"""The application factory: one process serves the REST API (and, later, the web pages)."""

from __future__ import annotations

from typing import Any

from alembic.runtime.migration import MigrationContext
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from duecourse import __version__
from duecourse.campaigns.api import router as campaigns_router
from duecourse.channels.api import hooks as webhooks_router
from duecourse.channels.api import router as channels_router
from duecourse.channels.email_api import public_router as unsubscribe_router
from duecourse.channels.email_api import router as email_router
from duecourse.channels.twilio_api import router as twilio_router
from duecourse.channels.voice_api import router as voice_router
from duecourse.events.api import router as events_router
from duecourse.clock import Clock, SystemClock
from duecourse.config import Settings, SecretKeyError, check_secret_key, get_settings, resolve_secret_key
from duecourse.db import Database
from duecourse.engine.api import router as engine_router
from duecourse.errors import Conflict, DomainError, FieldError, ValidationFailed
from duecourse.ledger.api import router as ledger_router
from duecourse.ledger.imports_api import router as imports_router
from duecourse.messaging.api import router as messaging_router
from duecourse.strategies.api import router as strategies_router
from duecourse.tenancy.api import router as tenancy_router

API_PREFIX = "/api/v1"


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(p) for p in loc)


def create_app(settings: Settings | None = None, *, clock: Clock | None = None, db: Database | None = None) -> FastAPI:
    if settings is None:
        # A process start (e.g. ``uvicorn --factory duecourse.app:create_app``): its settings come from
        # the environment, and a missing or guessable secret key stops it here.
        settings = resolve_secret_key(get_settings())
        check_secret_key(settings)
    else:
        # Settings given by the caller (tests, embedding): fill in the embedded setup's key; never sign
        # anything with an empty key.
        settings = resolve_secret_key(settings)
        if not settings.secret_key:
            raise SecretKeyError(
                "create_app: the settings have no secret key (DUECOURSE_SECRET_KEY) and the database is not "
                "an SQLite file beside which one could be kept"
            )
    app = FastAPI(
        title="duecourse",
        version=__version__,
        description="Automated debt collection and accounts-receivable dunning. "
        "Authenticate with `Authorization: Bearer <api key>` or a session cookie from `/api/v1/auth/login`.",
        docs_url="/api/docs",
        redoc_url="/api/redoc",
        openapi_url="/api/openapi.json",
    )
    app.state.settings = settings
    app.state.clock = clock or SystemClock()
    app.state.db = db or Database(settings.database_url, echo=settings.sql_echo)

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(exc.as_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [FieldError(_loc(tuple(e.get("loc", ()))), e.get("msg", "invalid")) for e in exc.errors()]
        err = ValidationFailed("Invalid request: " + "; ".join(f"{f.field}: {f.message}" for f in fields), fields)
        return JSONResponse(err.as_dict(), status_code=422)

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        # Services check what they can name precisely; this is the last line for races.
        err = Conflict("The change conflicts with existing data (a duplicate or a reference in use)")
        return JSONResponse(err.as_dict(), status_code=409)

    @app.get("/", include_in_schema=False)
    def home() -> Response:
        # The web UI's landing page; it sends visitors who are not logged in to /login.
        from fastapi.responses import RedirectResponse

        return RedirectResponse("/execution", status_code=303)

    @app.get("/health", tags=["operations"], summary="Liveness: the process answers")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics: queue depth, dispatch outcomes and latency")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from duecourse.engine.metrics import render

        return Response(render(app.state.db), media_type=CONTENT_TYPE_LATEST)

    @app.get("/ready", tags=["operations"], summary="Readiness: the database answers and is migrated")
    def ready() -> JSONResponse:
        try:
            with app.state.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                revision = MigrationContext.configure(conn).get_current_revision()
        except Exception as exc:  # noqa: BLE001 - readiness reports any failure
            return JSONResponse({"status": "unavailable", "detail": type(exc).__name__}, status_code=503)
        if revision is None:
            return JSONResponse({"status": "unavailable", "detail": "database not migrated"}, status_code=503)
        return JSONResponse({"status": "ready", "database": app.state.db.dialect, "revision": revision})

    routers = (
        tenancy_router, ledger_router, imports_router, strategies_router, campaigns_router, messaging_router,
        engine_router, channels_router, webhooks_router, email_router, twilio_router, voice_router, events_router,
    )
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(unsubscribe_router)
    from duecourse.web.pages import router as pages_router

    app.include_router(pages_router)
    return app

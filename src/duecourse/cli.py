"""The ``duecourse`` command line: serve, migrate, init, import, demo (and, with the engine: worker, scheduler, tick)."""

from __future__ import annotations

import typer
from sqlalchemy import select
from rich.console import Console
from rich.markup import escape

from duecourse.clock import SystemClock
from duecourse.config import SecretKeyError, Settings, check_secret_key, get_settings, resolve_secret_key
from duecourse.db import Database
from duecourse.db.migrate import upgrade
from duecourse.errors import DomainError
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import Role
from duecourse.validation import currency_code, timezone_name

app = typer.Typer(help="duecourse: automated debt collection and dunning.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    # soft_wrap: a long message (a command to copy) is wrapped by the terminal, not cut into lines.
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _settings(*, signs: bool) -> Settings:
    """The process's settings. ``signs``: the command signs or checks sessions, CSRF tokens or
    unsubscribe links, or uses provider credentials (serve, demo, worker, scheduler, tick), so it
    refuses a missing or guessable DUECOURSE_SECRET_KEY; commands that only read and write the
    database (migrate, init, import, simulate) run either way."""
    try:
        # On SQLite, fills in the key kept beside the database: in the process's settings, which
        # the engine and the providers read too.
        settings = resolve_secret_key(get_settings())
        if signs:
            check_secret_key(settings)
    except SecretKeyError as exc:
        _fail(str(exc))
    return settings


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (DUECOURSE_DATABASE_URL)."""
    settings = _settings(signs=False)
    upgrade(settings.database_url)
    console.print(f"database is up to date ({settings.database_url.split('@')[-1]})")


@app.command()
def init(
    organization: str = typer.Option(..., "--organization", "-o", help="Organization name"),
    email: str = typer.Option(..., help="The first admin's email (their login)"),
    password: str = typer.Option(..., prompt=True, hide_input=True, confirmation_prompt=True),
    timezone: str = typer.Option("UTC", help="IANA time zone of the organization"),
    currency: str = typer.Option("EUR", help="Base currency (ISO 4217)"),
    name: str = typer.Option("", help="The admin's display name"),
) -> None:
    """Create an organization and its first admin; prints a one-time admin API key."""
    try:
        tz = timezone_name(timezone)
        cur = currency_code(currency)
    except ValueError as exc:
        _fail(str(exc))
    settings = _settings(signs=False)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    now = SystemClock().now()
    try:
        with db.transaction() as session:
            org = tenancy.create_organization(session, name=organization, timezone=tz, base_currency=cur, now=now)
            tenancy.create_user(
                session, organization_id=org.id, email=email, password=password, role=Role.admin, name=name, now=now
            )
            key = tenancy.create_api_key(session, organization_id=org.id, name="initial admin key", role=Role.admin, now=now)
    except DomainError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    console.print(f"organization [bold]{organization}[/bold] created (id {org.id}); admin {email}")
    console.print("admin API key (shown once, store it now):")
    console.print(key.key, markup=False, highlight=False)


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default DUECOURSE_HOST or 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (default DUECOURSE_PORT or 8000)"),
    migrate_first: bool = typer.Option(True, "--migrate/--no-migrate", help="Apply migrations before starting"),
    engine: bool = typer.Option(
        True, "--engine/--no-engine", help="Also run the scheduler and a worker in this process (the embedded setup)"
    ),
) -> None:
    """Serve the web app and the REST API (and, unless --no-engine, the engine in the background)."""
    import uvicorn

    from duecourse.app import create_app

    settings = _settings(signs=True)
    if migrate_first:
        upgrade(settings.database_url)
    host = host or settings.host
    port = port or settings.port
    web = create_app(settings)
    if engine:
        from duecourse.engine.runner import start_background

        from duecourse.channels.registry import Providers

        start_background(web.state.db, web.state.clock, providers=Providers(settings))
    console.print(f"duecourse is running at [bold]http://{host}:{port}/[/bold]  (API docs: http://{host}:{port}/api/docs)")
    from duecourse.engine.runner import freeze_startup_heap

    freeze_startup_heap()
    uvicorn.run(web, host=host, port=port, log_level="info")


@app.command()
def demo(
    host: str = typer.Option(None, help="Bind address (default DUECOURSE_HOST or 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (default DUECOURSE_PORT or 8000)"),
    no_serve: bool = typer.Option(False, "--no-serve", help="Load the demo data and exit"),
) -> None:
    """Migrate, load the demo organization (once), and serve: the embedded setup of the README."""
    from duecourse.demo import DEMO_EMAIL, DEMO_PASSWORD, demo_loaded, load_demo
    from duecourse.engine.runs import run_strategy_now
    from duecourse.strategies.models import Strategy
    from duecourse.tenancy.principal import Principal

    settings = _settings(signs=not no_serve)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    try:
        with db.transaction() as session:
            if not demo_loaded(session):
                now = SystemClock().now()
                org = load_demo(session, now=now)
                session.flush()
                for strategy in session.scalars(
                    select(Strategy).where(Strategy.organization_id == org.id, Strategy.active.is_(True))
                ):
                    run_strategy_now(session, strategy=strategy, now=now, principal=Principal.system(org.id))
                console.print("demo data loaded")
    finally:
        db.dispose()
    console.print(f"log in as [bold]{DEMO_EMAIL}[/bold] with password [bold]{DEMO_PASSWORD}[/bold]")
    if not no_serve:
        serve(host=host, port=port, migrate_first=False, engine=True)


@app.command("import")
def import_(
    kind: str = typer.Argument(..., help="accounts, invoices or payments"),
    file: str = typer.Argument(..., help="A CSV, JSON (array) or JSON Lines file"),
    organization: int = typer.Option(..., "--organization", "-o", help="Organization id"),
    fmt: str = typer.Option(None, "--format", help="csv, json or jsonl (default: from the file name or content)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar"),
) -> None:
    """Import accounts, invoices or payments (upsert by external_id; all or nothing; exit 2 on bad rows)."""
    from pathlib import Path

    from duecourse.ledger.import_rows import FileFormat, ImportKind
    from duecourse.ledger.imports_cli import import_file

    try:
        kind_ = ImportKind(kind)
        fmt_ = FileFormat(fmt) if fmt else None
    except ValueError:
        _fail(f"unknown kind or format: {kind!r} / {fmt!r} (kinds: accounts, invoices, payments; formats: csv, json, jsonl)")
    path = Path(file)
    if not path.is_file():
        _fail(f"no such file: {file}")
    settings = _settings(signs=False)
    upgrade(settings.database_url)
    code = import_file(
        database_url=settings.database_url,
        organization_id=organization,
        kind=kind_,
        path=path,
        fmt=fmt_,
        console=console,
        err=err,
        show_progress=progress,
    )
    raise typer.Exit(code)


@app.command()
def tick(
    at: str = typer.Option(None, "--at", help="ISO time (e.g. 2026-03-02T09:00:00Z); default: now"),
) -> None:
    """Run one full engine cycle at a given time: scheduled runs, auto-enqueue, every due dispatch."""
    from datetime import UTC, datetime

    from duecourse.engine.cycle import tick as run_tick

    try:
        when = datetime.fromisoformat(at.replace("Z", "+00:00")) if at else SystemClock().now()
    except ValueError:
        _fail(f"--at: not an ISO time: {at!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    settings = _settings(signs=True)
    db = Database(settings.database_url)
    try:
        from duecourse.channels.registry import Providers

        totals = run_tick(db, now=when, providers=Providers(settings))
    finally:
        db.dispose()
    console.print(f"tick at {when.isoformat()}: {totals}")


@app.command()
def worker(poll: float = typer.Option(2.0, help="Seconds between passes")) -> None:
    """Run a queue worker: claim and dispatch due items, forever (any number of them may run)."""
    from duecourse.engine.runner import freeze_startup_heap, run_loop

    settings = _settings(signs=True)
    console.print("worker started")
    freeze_startup_heap()
    run_loop(Database(settings.database_url), SystemClock(), scheduler=False, worker=True, poll_seconds=poll)


@app.command()
def scheduler(poll: float = typer.Option(30.0, help="Seconds between passes")) -> None:
    """Run the scheduler: each organization's cycle every N minutes (any number of them may run)."""
    from duecourse.engine.runner import freeze_startup_heap, run_loop

    settings = _settings(signs=True)
    console.print("scheduler started")
    freeze_startup_heap()
    run_loop(Database(settings.database_url), SystemClock(), scheduler=True, worker=False, poll_seconds=poll)


@app.command()
def simulate(
    organization: int = typer.Option(..., "--organization", "-o", help="Organization id"),
    days: int = typer.Option(7, help="Days ahead (1-31)"),
    strategy: int = typer.Option(None, help="Only this strategy's accounts"),
    campaign: int = typer.Option(None, help="Only this campaign's accounts"),
) -> None:
    """Safe mode: print what the engine would do over the next days. Sends and changes nothing."""
    from rich.table import Table

    from duecourse.engine.simulate import MAX_DAYS
    from duecourse.engine.simulate import simulate as run_simulation

    if not 1 <= days <= MAX_DAYS:
        _fail(f"--days must be between 1 and {MAX_DAYS}")
    settings = _settings(signs=False)
    db = Database(settings.database_url)
    try:
        result = run_simulation(
            db, organization_id=organization, start=SystemClock().now(), days=days, strategy_id=strategy, campaign_id=campaign
        )
    finally:
        db.dispose()
    table = Table("when (UTC)", "account", "event", "stage", "channel", "reason")
    for e in result["events"]:
        table.add_row(e["at"].strftime("%Y-%m-%d %H:%M"), e["external_id"], e["event"], str(e["stage_index"] if e["stage_index"] is not None else ""),
                      e["channel"] or "", e["reason"] or "")
    console.print(table)
    console.print(f"summary: {result['summary']}")


def main() -> None:  # pragma: no cover
    app()



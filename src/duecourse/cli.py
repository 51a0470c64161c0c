"""The ``duecourse`` command line: serve, migrate, init, import, demo (and, with the engine: worker, scheduler, tick)."""

from __future__ import annotations

import typer
from sqlalchemy import select
from rich.console import Console

from duecourse.clock import SystemClock
from duecourse.config import get_settings
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
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (DUECOURSE_DATABASE_URL)."""
    settings = get_settings()
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
    settings = get_settings()
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
) -> None:
    """Serve the web app and the REST API."""
    import uvicorn

    from duecourse.app import create_app

    settings = get_settings()
    if migrate_first:
        upgrade(settings.database_url)
    host = host or settings.host
    port = port or settings.port
    console.print(f"duecourse is running at [bold]http://{host}:{port}/[/bold]  (API docs: http://{host}:{port}/api/docs)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


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

    settings = get_settings()
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
        serve(host=host, port=port, migrate_first=False)


def main() -> None:  # pragma: no cover
    app()



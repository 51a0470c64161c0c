"""``duecourse import KIND FILE --organization ID``: the import with a progress bar and a report."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from duecourse.clock import SystemClock
from duecourse.db import Database
from duecourse.errors import DomainError
from duecourse.ledger.import_rows import FileFormat, ImportKind
from duecourse.ledger.imports import ImportRejected, ImportReport, run_import

EXIT_OK = 0
EXIT_REJECTED = 2


def import_file(
    *,
    database_url: str,
    organization_id: int,
    kind: ImportKind,
    path: Path,
    fmt: FileFormat | None,
    console: Console,
    err: Console,
    show_progress: bool = True,
) -> int:
    """Run one import in one transaction; print the counts, or the row errors. Returns the exit code."""
    db = Database(database_url)
    size = os.path.getsize(path)
    try:
        with Progress(
            TextColumn(f"importing {kind.value}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[rows]:,} rows"),
            TimeElapsedColumn(),
            console=err,
            disable=not show_progress,
            transient=True,
        ) as progress:
            task = progress.add_task("import", total=size or None, rows=0)

            def on_progress(done: int, rows: int) -> None:
                progress.update(task, completed=done, rows=rows)

            with open(path, "rb") as stream, db.transaction() as session:
                report = run_import(
                    session,
                    organization_id=organization_id,
                    kind=kind,
                    stream=stream,
                    now=SystemClock().now(),
                    fmt=fmt,
                    filename=path.name,
                    progress=on_progress,
                )
    except ImportRejected as exc:
        print_errors(exc.report, err)
        return EXIT_REJECTED
    except DomainError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_REJECTED
    finally:
        db.dispose()
    print_counts(report, console)
    return EXIT_OK


def print_counts(report: ImportReport, console: Console) -> None:
    table = Table(title=f"{report.kind} imported ({report.format})", show_header=True)
    for col in ("rows", "inserted", "updated", "unchanged"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{getattr(report, c):,}" for c in ("rows", "inserted", "updated", "unchanged")))
    console.print(table)


def print_errors(report: ImportReport, err: Console) -> None:
    err.print(
        f"[red]{report.error_count:,} error{'s' if report.error_count != 1 else ''} in {report.rows:,} rows; "
        "nothing was imported.[/red] (row = data record, 1-based, header not counted; line = file line)"
    )
    for e in report.errors:
        value = f" (value {e.value!r})" if e.value is not None else ""
        err.print(f"  {e.describe()}{value}", markup=False, highlight=False)
    if report.errors_truncated:
        err.print(f"  … and {report.error_count - len(report.errors):,} more")

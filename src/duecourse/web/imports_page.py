"""The Import page (SPEC §2): upload a CSV or JSON file of accounts, invoices or payments and see the
report: the counts, or every bad row (row, line, column, reason) when the file was refused.

The import runs synchronously inside the request, all or nothing (duecourse.ledger.imports.run_import);
the page shows an "Importing…" state while the browser waits for the answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from duecourse.errors import ValidationFailed
from duecourse.ledger.import_rows import COLUMNS, FileFormat, ImportKind
from duecourse.ledger.imports import ImportRejected, run_import
from duecourse.tenancy.principal import Permission
from duecourse.web.core import CsrfForm, PageRoute, Web, WebPage, page_requires

router = APIRouter(route_class=PageRoute)

KIND_HELP = {
    "accounts": "Debtors. Upserted by external_id.",
    "invoices": "Invoices of existing accounts (import accounts first).",
    "payments": "Payments of existing accounts, allocated at once (import invoices first).",
}


def _columns() -> dict[str, list[tuple[str, bool]]]:
    return {kind.value: [(c.name, c.required) for c in cols] for kind, cols in COLUMNS.items()}


def _render(web: Web, *, kind: str, fmt: str = "", report: dict[str, Any] | None = None,
            rejected: dict[str, Any] | None = None, errors: dict[str, str] | None = None,
            filename: str | None = None, status_code: int = 200) -> Response:
    return web.render(
        "import/page.html", status_code=status_code, active="import",
        kinds=[k.value for k in ImportKind], kind=kind, kind_help=KIND_HELP, formats=[f.value for f in FileFormat],
        fmt=fmt, columns=_columns(), report=report, rejected=rejected, errors=errors or {}, filename=filename,
        can_import=web.can(Permission.import_data),
    )


@router.get("/import")
def import_page(web: WebPage, kind: str | None = Query(None)) -> Response:
    return _render(web, kind=kind if kind in {k.value for k in ImportKind} else ImportKind.accounts.value)


@router.post("/import")
def import_upload(form: CsrfForm, web: Web = page_requires(Permission.import_data)) -> Response:
    kind = str(form.get("kind") or "")
    fmt = str(form.get("format") or "")
    upload = form.get("file")
    errors: dict[str, str] = {}
    if kind not in {k.value for k in ImportKind}:
        errors["kind"] = "choose accounts, invoices or payments"
    if fmt and fmt not in {f.value for f in FileFormat}:
        errors["format"] = "choose csv, json or jsonl"
    if not isinstance(upload, UploadFile) or not upload.filename:
        errors["file"] = "choose a file to import"
    if errors:
        return _render(web, kind=kind or ImportKind.accounts.value, fmt=fmt, errors=errors, status_code=422)
    assert isinstance(upload, UploadFile)
    try:
        report = run_import(
            web.session, organization_id=web.principal.organization_id, kind=kind, stream=upload.file,
            now=web.now(), fmt=fmt or None, filename=upload.filename,
        )
    except ImportRejected as exc:
        web.session.rollback()  # all or nothing: the service leaves the rollback to its caller
        return _render(web, kind=kind, fmt=fmt, rejected=exc.report.as_dict(), filename=upload.filename,
                       status_code=422)
    except ValidationFailed as exc:
        web.session.rollback()
        return _render(web, kind=kind, fmt=fmt, errors={"file": exc.message}, filename=upload.filename,
                       status_code=422)
    return _render(web, kind=kind, fmt=fmt, report=report.as_dict(), filename=upload.filename)

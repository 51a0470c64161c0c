"""REST route for imports: upload a CSV or JSON file of accounts, invoices or payments (SPEC §2)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Query, UploadFile
from pydantic import BaseModel

from duecourse.deps import AppClock, DbSession, requires
from duecourse.ledger.import_rows import COLUMNS, FileFormat, ImportKind
from duecourse.ledger.imports import run_import
from duecourse.tenancy.principal import Permission, Principal

router = APIRouter(tags=["imports"])
Importer = requires(Permission.import_data)


class RowErrorOut(BaseModel):
    row: int | None
    line: int | None
    column: str | None
    message: str
    value: str | None = None


class ImportReportOut(BaseModel):
    kind: ImportKind
    format: FileFormat
    rows: int
    inserted: int
    updated: int
    unchanged: int
    applied: bool
    error_count: int
    errors_truncated: bool
    errors: list[RowErrorOut]


_COLUMNS_DOC = "; ".join(
    f"**{kind.value}**: " + ", ".join(f"`{c.name}`" + ("*" if c.required else "") for c in cols)
    for kind, cols in COLUMNS.items()
)


@router.post(
    "/imports/{kind}",
    response_model=ImportReportOut,
    summary="Import a CSV or JSON file of accounts, invoices or payments (all or nothing)",
    description=(
        "Multipart upload with the file in the `file` field. Rows are upserted by `external_id`. "
        "If any row is bad, nothing is imported and the answer is 422 with the error format plus "
        "`report` (first 1,000 errors with row, line, column and reason, and `error_count`). "
        "`row` is the 1-based data record (the header is not counted); `line` is the file line "
        "(the CSV header is line 1). Formats: CSV with a header row (comma, semicolon or tab), a JSON "
        "array of objects, or JSON Lines; chosen from `format`, else the file name, else the content. "
        "Columns (* = required): " + _COLUMNS_DOC
    ),
    responses={422: {"description": "The file has bad rows; nothing was imported (the body carries `report`)"}},
)
def import_file(
    kind: ImportKind,
    session: DbSession,
    clock: AppClock,
    file: Annotated[UploadFile, File(description="The CSV, JSON or JSON Lines file")],
    principal: Principal = Importer,
    format: Annotated[FileFormat | None, Query(description="csv, json (array) or jsonl; default: detected")] = None,
) -> Any:
    report = run_import(
        session,
        organization_id=principal.organization_id,
        kind=kind,
        stream=file.file,
        now=clock.now(),
        fmt=format,
        filename=file.filename,
    )
    return report.as_dict()

"""The Tasks page (SPEC §4.8, §8): the agents' ``phone_call`` and ``escalation`` tasks.

Open tasks come first (the default view); each has a "Log outcome" form. Logging an outcome goes
through :func:`duecourse.engine.outcomes.record_task_outcome`, exactly like the API's
``POST /tasks/{id}/outcome``: the task is done, the stage completes, a promise makes the account
``promise_pending``. Agents (``work_tasks``) may log outcomes; viewers see no form and are refused.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select

from duecourse.engine.models import Outcome, Sentiment, Task, TaskStatus
from duecourse.engine.outcomes import CallReport, record_task_outcome
from duecourse.engine.schemas import TaskOutcomeIn
from duecourse.errors import Conflict, ValidationFailed
from duecourse.ledger.models import Account
from duecourse.pagination import PageParams, paginate
from duecourse.strategies.models import ActionType
from duecourse.tenancy.principal import Permission
from duecourse.tenancy.scope import scoped
from duecourse.web.core import (
    CsrfForm,
    PageRoute,
    Web,
    WebPage,
    field_errors,
    page_requires,
    pydantic_errors,
    query_url,
)

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 25
KINDS = (ActionType.phone_call.value, ActionType.escalation.value)
STATUSES = (TaskStatus.open.value, TaskStatus.done.value)
# What an agent can log (``dropped`` is a voice provider's report, not an agent's).
OUTCOMES = tuple(o.value for o in Outcome if o != Outcome.dropped)
_ACCOUNT_COLUMNS = (Account.id, Account.name, Account.external_id, Account.status, Account.balance, Account.currency)
FORM_FIELDS = ("outcome", "promise_amount", "promise_date", "callback_at", "sentiment", "willingness", "note")


def _filters(status: str | None, kind: str | None) -> dict[str, str]:
    return {
        "status": status if status in STATUSES else TaskStatus.open.value,
        "kind": kind if kind in KINDS else "",
    }


def _context(web: Web, filters: dict[str, str], cursor: str | None) -> dict[str, Any]:
    org_id = web.principal.organization_id
    stmt = scoped(Task, org_id).where(Task.status == filters["status"])
    if filters["kind"]:
        stmt = stmt.where(Task.kind == filters["kind"])
    # Open: oldest first (the next to work on); done: the latest completed first.
    descending = filters["status"] != TaskStatus.open.value
    page = paginate(web.session, stmt, Task.id, PageParams(limit=PAGE_SIZE, cursor=cursor), lambda t: t,
                    descending=descending)
    tasks: list[Task] = page["items"]
    ids = {t.account_id for t in tasks}
    accounts = {}
    if ids:
        accounts = {
            r.id: r
            for r in web.session.execute(
                select(*_ACCOUNT_COLUMNS).where(Account.organization_id == org_id, Account.id.in_(ids))
            )
        }
    return {
        "tasks": tasks,
        "accounts": accounts,
        "filters": filters,
        "kinds": KINDS,
        "outcome_options": [(o, o.replace("_", " ").capitalize()) for o in OUTCOMES],
        "sentiment_options": [(s.value, s.value.capitalize()) for s in Sentiment],
        "return_to": query_url("/tasks", status=filters["status"], kind=filters["kind"], cursor=cursor),
        "next_url": query_url("/tasks", **filters, cursor=page["next_cursor"]) if page["next_cursor"] else None,
        "first_url": query_url("/tasks", **filters) if cursor else None,
        "form_task_id": None,
        "values": {},
        "errors": {},
    }


@router.get("/tasks")
def tasks_page(
    web: WebPage,
    status: str | None = Query(None),
    kind: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    return web.render("tasks/list.html", active="tasks", **_context(web, _filters(status, kind), cursor))


def _safe_return(url: str) -> str:
    return url if url.startswith("/tasks") and not url.startswith("//") else "/tasks"


@router.post("/tasks/{task_id}/outcome")
def log_outcome(task_id: int, form: CsrfForm, web: Web = page_requires(Permission.work_tasks)) -> Response:
    values = {k: (form.get(k) or "").strip() if isinstance(form.get(k), str) else "" for k in FORM_FIELDS}
    return_to = _safe_return(str(form.get("return_to") or "/tasks"))
    tz = ZoneInfo(web.organization.timezone)
    try:
        data: dict[str, Any] = {k: v for k, v in values.items() if v != ""}
        if "callback_at" in data:
            data["callback_at"] = _local_datetime(data["callback_at"], tz)
        try:
            body = TaskOutcomeIn(**data)  # the API's own input rules
        except ValidationError as exc:
            raise pydantic_errors(exc) from None
        report = CallReport(
            outcome=body.outcome, promise_amount=body.promise_amount, promise_date=body.promise_date,
            callback_at=body.callback_at, sentiment=body.sentiment, willingness=body.willingness,
            # The agent's note is the call's summary on the interaction (the service's own summary=note
            # is overwritten by the report's fields).
            summary=body.summary or body.note,
        )
        task = record_task_outcome(
            web.session, organization_id=web.principal.organization_id, task_id=task_id, now=web.now(),
            report=report, note=body.note, user_id=web.principal.user_id,
        )
    except Conflict as exc:  # already logged (a second tab, a double click)
        web.session.rollback()
        return web.redirect(return_to, exc.message, "error")
    except ValidationFailed as exc:
        # The service may have started the stage's changes before refusing: drop them all.
        web.session.rollback()
        errors = _errors_for_form(exc, values)
        filters = _filters(TaskStatus.open.value, None)
        ctx = _context(web, filters, None)
        ctx.update(form_task_id=task_id, values=values, errors=errors, return_to=return_to)
        ctx["tasks"] = _with_task(web, ctx["tasks"], ctx["accounts"], task_id)
        return web.render("tasks/list.html", status_code=422, active="tasks", **ctx)
    account = web.session.get(Account, task.account_id)
    name = account.name if account else f"account #{task.account_id}"
    return web.redirect(return_to, f"Outcome logged for {name}: {Outcome(task.outcome).value.replace('_', ' ')}.")


def _local_datetime(raw: str, tz: ZoneInfo) -> Any:
    """A ``datetime-local`` value (no offset) is in the organization's time zone; anything else is
    left for the input model to judge."""
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        return raw
    return value.replace(tzinfo=tz) if value.tzinfo is None else value


def _errors_for_form(exc: ValidationFailed, values: dict[str, str]) -> dict[str, str]:
    """Errors beside the form's fields. A cross-field message ("promise_to_pay needs promise_amount
    and promise_date") is shown beside the fields it names that the agent left empty; a "required"
    on a field the agent did fill is dropped (the service names both promise fields when either is
    missing); anything else goes to the banner."""
    errors = field_errors(exc)
    out = {k: v for k, v in errors.items() if k in FORM_FIELDS and not (v == "required" and values.get(k))}
    general = errors.get("")
    if general:
        named = [f for f in FORM_FIELDS if re.search(rf"\b{f}\b", general) and not values.get(f)]
        for f in named:
            out.setdefault(f, "is required for this outcome")
        if named:
            errors = {k: v for k, v in errors.items() if k}
    other = [f"{k}: {v}" if k else v for k, v in errors.items() if k not in FORM_FIELDS]
    if other:
        out[""] = "; ".join(other)
    if not out:
        out[""] = exc.message
    return out


def _with_task(web: Web, tasks: list[Task], accounts: dict[int, Any], task_id: int) -> list[Task]:
    """The refused task is shown with its form even when it is not on the first page."""
    if any(t.id == task_id for t in tasks):
        return tasks
    task = web.session.scalar(scoped(Task, web.principal.organization_id).where(Task.id == task_id))
    if task is None:
        return tasks
    row = web.session.execute(select(*_ACCOUNT_COLUMNS).where(Account.id == task.account_id)).first()
    if row is not None:
        accounts[row.id] = row
    return [task, *tasks]

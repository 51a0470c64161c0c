"""The Strategies screens (SPEC §3, seed 002): the list and the editor with its Settings,
Performance and Audit Log tabs.

The editor is one form. Adding, removing and moving stages without scripting are submit buttons
(``op=add``, ``op=remove:2``, ``op=up:2``, ``op=down:2``) that re-render the form from what was typed,
without saving; ``op=save`` saves through the strategies service, and its validation errors are shown
beside their fields (the inputs are named like the API's field paths: ``stages[0].days``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from duecourse.errors import Conflict, ValidationFailed
from duecourse.messaging.models import Template
from duecourse.pagination import PageParams
from duecourse.strategies import service
from duecourse.strategies.models import (
    MAX_STAGES,
    MESSAGING_ACTIONS,
    RETRYABLE_ACTIONS,
    WEEKDAYS,
    ActionType,
    FirstActionLogic,
    MultiStageHandling,
    StrategyType,
    TimingType,
    Tone,
    TriggerType,
)
from duecourse.strategies.schemas import StrategyIn, money_out
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
    safe_path,
    templates,
)

router = APIRouter(route_class=PageRoute)
StrategyAdmin = Annotated[Web, page_requires(Permission.manage_strategies)]
EngineOperator = Annotated[Web, page_requires(Permission.operate_engine)]
LIST_SIZE = 50
AUDIT_SIZE = 20
STAGE_FIELD = re.compile(r"^stages\[(\d+)\]\.(\w+)$")
STAGE_KEYS = ("action_type", "timing_type", "days", "template_id", "tone", "max_retries", "retry_delay_hours",
              "step_timeout_hours", "note")
TOP_KEYS = ("name", "description", "type", "multi_stage_handling", "first_action_logic", "trigger_type",
            "trigger_days", "trigger_amount", "priority", "automation_time")

TYPE_LABELS = {"standard": "Standard", "intensive": "Intensive", "vip": "VIP", "high_risk": "High Risk"}
ACTION_LABELS: dict[str, str] = templates.env.globals["action_labels"]  # type: ignore[assignment]
CHOICES = {
    "type": [(t.value, TYPE_LABELS[t.value]) for t in StrategyType],
    "multi_stage_handling": [
        (MultiStageHandling.run_all_in_order.value, "Run all in order"),
        (MultiStageHandling.skip_to_latest.value, "Skip to latest"),
        (MultiStageHandling.one_per_run.value, "One per run"),
    ],
    "first_action_logic": [
        (FirstActionLogic.standard.value, "Standard: start at the first stage"),
        (FirstActionLogic.contextualized.value, "Contextualized: enter by the carrying invoice's due date"),
    ],
    "trigger_type": [(TriggerType.days_overdue.value, "Days overdue"), (TriggerType.amount_threshold.value,
                                                                       "Amount threshold")],
    "action_type": [(a.value, ACTION_LABELS[a.value]) for a in ActionType],
    "timing_type": [(TimingType.days_from_trigger.value, "Days from trigger"),
                    (TimingType.days_from_previous.value, "Days from previous")],
    "tone": [(t.value, t.value.capitalize()) for t in Tone],
}
WEEKDAY_LABELS = [(d, d.capitalize()) for d in WEEKDAYS]


# --- list ----------------------------------------------------------------------------------------


def _bool_status(status: str | None) -> bool | None:
    return {"active": True, "inactive": False}.get(status or "")


@router.get("/strategies")
def strategy_list(
    web: WebPage,
    q: str | None = Query(None, max_length=200),
    type: str | None = Query(None),
    status: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    type_filter = type if type in TYPE_LABELS else None
    page = service.list_strategies(
        web.session,
        organization_id=web.principal.organization_id,
        params=PageParams(limit=LIST_SIZE, cursor=cursor),
        now=web.now(),
        search=q or None,
        type=type_filter,
        active=_bool_status(status),
    )
    filters = {"q": q or "", "type": type_filter or "", "status": status if status in ("active", "inactive") else ""}
    return web.render(
        "strategies/list.html",
        active="strategies",
        strategies=page["items"],
        filters=filters,
        type_labels=TYPE_LABELS,
        next_url=query_url("/strategies", **filters, cursor=page["next_cursor"]) if page["next_cursor"] else None,
        first_url=query_url("/strategies", **filters) if cursor else None,
        return_to=query_url("/strategies", **filters),
    )


def _back(form: FormData, default: str = "/strategies") -> str:
    return safe_path(form.get("return_to"), default)


@router.post("/strategies/{strategy_id}/toggle")
def toggle(strategy_id: int, form: CsrfForm, web: StrategyAdmin) -> Response:
    strategy = service.get_strategy(web.session, organization_id=web.principal.organization_id,
                                    strategy_id=strategy_id)
    return _set_active(web, strategy_id, not strategy.active, _back(form))


@router.post("/strategies/{strategy_id}/activate")
def activate(strategy_id: int, form: CsrfForm, web: StrategyAdmin) -> Response:
    return _set_active(web, strategy_id, True, _back(form))


@router.post("/strategies/{strategy_id}/deactivate")
def deactivate(strategy_id: int, form: CsrfForm, web: StrategyAdmin) -> Response:
    return _set_active(web, strategy_id, False, _back(form))


def _set_active(web: Web, strategy_id: int, active: bool, back: str) -> Response:
    try:
        strategy = service.set_active(web.session, principal=web.principal, strategy_id=strategy_id, active=active,
                                      now=web.now())
    except ValidationFailed as exc:
        details = "; ".join(_human_field(f.field) + " " + f.message for f in exc.fields) or exc.message
        return web.redirect(back, f"Cannot activate: {details}.", "error")
    return web.redirect(back, f"Strategy {strategy.name!r} {'activated' if active else 'deactivated'}.")


def _human_field(path: str) -> str:
    m = STAGE_FIELD.match(path)
    return f"stage {int(m.group(1)) + 1}" if m else path.replace("_", " ")


@router.post("/strategies/{strategy_id}/run")
def run_now(strategy_id: int, form: CsrfForm, web: EngineOperator) -> Response:
    try:
        result = service.run_now(web.session, principal=web.principal, strategy_id=strategy_id, now=web.now())
    except Conflict as exc:
        return web.redirect(_back(form), exc.message, "error")
    if result.get("paused"):
        return web.redirect(_back(form), "Automation is paused: nothing was enqueued.", "error")
    return web.redirect(
        _back(form),
        f"Run now: {result.get('assigned', 0)} account(s) assigned, {result.get('enqueued', 0)} action(s) enqueued.",
    )


@router.post("/strategies/{strategy_id}/delete")
def delete(strategy_id: int, form: CsrfForm, web: StrategyAdmin) -> Response:
    strategy = service.get_strategy(web.session, organization_id=web.principal.organization_id,
                                    strategy_id=strategy_id)
    name = strategy.name
    try:
        service.delete_strategy(web.session, principal=web.principal, strategy_id=strategy_id, now=web.now())
    except Conflict as exc:
        return web.redirect(_back(form), exc.message, "error")
    return web.redirect("/strategies", f"Strategy {name!r} deleted.")


# --- editor: values, parsing -------------------------------------------------------------------------


def _blank_stage(first: bool) -> dict[str, str]:
    return {
        "action_type": "email",
        "timing_type": "days_from_trigger" if first else "days_from_previous",
        "days": "0" if first else "7",
        "template_id": "",
        "tone": "standard",
        "max_retries": "",
        "retry_delay_hours": "",
        "step_timeout_hours": "",
        "note": "",
    }


def _new_values() -> dict[str, Any]:
    return {
        "name": "", "description": "", "type": "standard", "multi_stage_handling": "run_all_in_order",
        "first_action_logic": "standard", "trigger_type": "days_overdue", "trigger_days": "0", "trigger_amount": "",
        "priority": "100", "automation_time": "07:00", "automation_days": ["mon", "tue", "wed", "thu", "fri"],
        "active": False, "stages": [_blank_stage(True)],
    }


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def _values_of(strategy: Any) -> dict[str, Any]:
    out = service.to_out(strategy)
    values: dict[str, Any] = {k: _text(out[k]) for k in TOP_KEYS}
    values["trigger_amount"] = money_out(out["trigger_amount"]) or ""
    values["automation_days"] = list(out["automation_days"])
    values["active"] = out["active"]
    values["stages"] = [{k: _text(s[k]) for k in STAGE_KEYS} for s in out["stages"]]
    return values


def _values_from_form(form: FormData) -> dict[str, Any]:
    """Everything as typed (strings), to re-render the form."""
    values: dict[str, Any] = {k: str(form.get(k) or "").strip() if k != "description" else str(form.get(k) or "")
                              for k in TOP_KEYS}
    values["automation_days"] = [d for d in WEEKDAYS if d in form.getlist("automation_days")]
    values["active"] = form.get("active") == "on"
    stages: dict[int, dict[str, str]] = {}
    for key in form:
        m = STAGE_FIELD.match(key)
        if m and m.group(2) in STAGE_KEYS:
            stages.setdefault(int(m.group(1)), {k: "" for k in STAGE_KEYS})[m.group(2)] = str(form.get(key) or "").strip()
    values["stages"] = [stages[i] for i in sorted(stages)]
    return values


def _int(text: str) -> int | str | None:
    """A whole number, None when empty, or the text itself (the schema then reports it at its field)."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _payload(values: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """The API body (StrategyIn) from the typed values; fields the trigger or action does not use are left out."""
    days_trigger = values["trigger_type"] == TriggerType.days_overdue.value
    data: dict[str, Any] = {
        "name": values["name"],
        "description": values["description"],
        "type": values["type"],
        "multi_stage_handling": values["multi_stage_handling"],
        "first_action_logic": values["first_action_logic"],
        "trigger_type": values["trigger_type"],
        "trigger_days": _int(values["trigger_days"]) if days_trigger else None,
        "trigger_amount": (values["trigger_amount"] or None) if not days_trigger else None,
        "priority": _int(values["priority"]),
        "automation_time": values["automation_time"],
        "automation_days": values["automation_days"],
        "stages": [],
    }
    if creating:
        data["active"] = bool(values["active"])
    if days_trigger and data["trigger_days"] is None:
        data.pop("trigger_days")  # the service names the missing value ("is required when ...")
    for st in values["stages"]:
        action = st["action_type"]
        stage: dict[str, Any] = {
            "action_type": action,
            "timing_type": st["timing_type"],
            "days": _int(st["days"]),
            "tone": st["tone"] or "standard",
            "note": st["note"] or None,
        }
        takes_template = action in {a.value for a in MESSAGING_ACTIONS} | {ActionType.voice.value}
        stage["template_id"] = _int(st["template_id"]) if takes_template else None
        if action in {a.value for a in RETRYABLE_ACTIONS}:
            for k in ("max_retries", "retry_delay_hours", "step_timeout_hours"):
                stage[k] = _int(st[k])
        data["stages"].append(stage)
    if data["priority"] is None:
        data.pop("priority")
    return data


def _apply_op(values: dict[str, Any], op: str) -> None:
    """Stage list edits that only change the form (nothing is saved)."""
    stages: list[dict[str, str]] = values["stages"]
    name, _, index = op.partition(":")
    if name == "add":
        if len(stages) < MAX_STAGES:
            stages.append(_blank_stage(not stages))
        return
    try:
        i = int(index)
    except ValueError:
        return
    if not 0 <= i < len(stages):
        return
    if name == "remove":
        stages.pop(i)
    elif name == "up" and i > 0:
        stages[i - 1], stages[i] = stages[i], stages[i - 1]
    elif name == "down" and i < len(stages) - 1:
        stages[i + 1], stages[i] = stages[i], stages[i + 1]


def _editor(web: Web, *, strategy: Any | None, values: dict[str, Any], errors: dict[str, str] | None = None,
            status_code: int = 200) -> Response:
    templates = web.session.scalars(
        scoped(Template, web.principal.organization_id).order_by(Template.channel, Template.name)
    ).all()
    return web.render(
        "strategies/editor.html",
        status_code=status_code,
        active="strategies",
        tab="settings",
        strategy=strategy,
        values=values,
        errors=errors or {},
        choices=CHOICES,
        weekdays=WEEKDAY_LABELS,
        templates=templates,
        max_stages=MAX_STAGES,
        type_labels=TYPE_LABELS,
        messaging=[a.value for a in MESSAGING_ACTIONS] + [ActionType.voice.value],
        retryable=[a.value for a in RETRYABLE_ACTIONS],
        editable=web.can(Permission.manage_strategies),
    )


def _submit(web: Web, form: FormData, strategy: Any | None) -> Response:
    values = _values_from_form(form)
    op = str(form.get("op") or "save")
    if op != "save":
        _apply_op(values, op)
        return _editor(web, strategy=strategy, values=values)
    try:
        try:
            data = StrategyIn.model_validate(_payload(values, creating=strategy is None))
        except ValidationError as exc:
            raise pydantic_errors(exc) from None
        if strategy is None:
            saved = service.create_strategy(web.session, principal=web.principal, data=data, now=web.now())
        else:
            saved = service.replace_strategy(web.session, principal=web.principal, strategy_id=strategy.id, data=data,
                                             now=web.now())
    except (ValidationFailed, Conflict) as exc:
        web.session.rollback()
        errors = field_errors(exc)
        if not errors.get("") and exc.fields:
            errors[""] = "The strategy was not saved. Please correct the fields marked below."
        return _editor(web, strategy=strategy, values=values, errors=errors, status_code=422)
    verb = "created" if strategy is None else "saved"
    return web.redirect(f"/strategies/{saved.id}", f"Strategy {saved.name!r} {verb}.")


# --- editor routes -------------------------------------------------------------------------------------


@router.get("/strategies/new")
def new_strategy(web: StrategyAdmin) -> Response:
    return _editor(web, strategy=None, values=_new_values())


@router.post("/strategies/new")
def create_strategy(form: CsrfForm, web: StrategyAdmin) -> Response:
    return _submit(web, form, None)


def _get(web: Web, strategy_id: int) -> Any:
    return service.get_strategy(web.session, organization_id=web.principal.organization_id, strategy_id=strategy_id)


@router.get("/strategies/{strategy_id}")
def edit_strategy(strategy_id: int, web: WebPage) -> Response:
    strategy = _get(web, strategy_id)
    return _editor(web, strategy=strategy, values=_values_of(strategy))


@router.post("/strategies/{strategy_id}")
def save_strategy(strategy_id: int, form: CsrfForm,
                  web: StrategyAdmin) -> Response:
    return _submit(web, form, _get(web, strategy_id))


@router.get("/strategies/{strategy_id}/performance")
def performance(strategy_id: int, web: WebPage) -> Response:
    strategy = _get(web, strategy_id)
    perf = service.performance(web.session, organization_id=web.principal.organization_id, strategy_id=strategy_id,
                               now=web.now())
    return web.render(
        "strategies/performance.html",
        active="strategies",
        tab="performance",
        strategy=strategy,
        perf=perf,
        chart=_funnel_chart(perf),
        type_labels=TYPE_LABELS,
        action_labels=ACTION_LABELS,
    )


def _funnel_chart(perf: dict[str, Any]) -> dict[str, Any]:
    """Geometry of the stage funnel: one horizontal bar per stage plus the completed sequences."""
    rows = [(f"{f['position'] + 1}. {ACTION_LABELS.get(_text(f['action_type']), _text(f['action_type']))}",
             f["count"], "bar") for f in perf["funnel"]]
    rows.append(("Sequence completed", perf["sequence_completed"], "bar-done"))
    top = max([n for _, n, _ in rows] + [1])
    label_w, bar_w, row_h = 170, 460, 34
    bars = [
        {"label": label, "count": n, "cls": cls, "y": i * row_h, "width": round(bar_w * n / top, 1) if n else 0}
        for i, (label, n, cls) in enumerate(rows)
    ]
    return {"bars": bars, "label_w": label_w, "bar_w": bar_w, "row_h": row_h, "height": len(rows) * row_h,
            "width": label_w + bar_w + 60}


@router.get("/strategies/{strategy_id}/audit")
def audit(strategy_id: int, web: WebPage, cursor: str | None = Query(None)) -> Response:
    strategy = _get(web, strategy_id)
    page = service.strategy_audit_log(web.session, organization_id=web.principal.organization_id,
                                      strategy_id=strategy_id, params=PageParams(limit=AUDIT_SIZE, cursor=cursor))
    base = f"/strategies/{strategy_id}/audit"
    return web.render(
        "strategies/audit.html",
        active="strategies",
        tab="audit",
        strategy=strategy,
        entries=page["items"],
        type_labels=TYPE_LABELS,
        next_url=query_url(base, cursor=page["next_cursor"]) if page["next_cursor"] else None,
        first_url=base if cursor else None,
    )


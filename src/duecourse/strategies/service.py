"""Strategies and their stages (SPEC §3): validation, changes with their audit trail, Run Now, performance.

Every operation takes the request's session first and never commits. Rules that need the database
or several fields at once are checked here, on the merged state, so POST, PUT and PATCH obey the
same rules and a refused change changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.campaigns.models import Campaign
from duecourse.db.base import money_to_units, units_to_money
from duecourse.engine.models import Direction, Interaction
from duecourse.errors import Conflict, FieldError, NotFound, ValidationFailed
from duecourse.ledger.models import Account, AccountStatus
from duecourse.messaging.models import Template
from duecourse.pagination import PageParams, paginate
from duecourse.strategies.models import (
    MESSAGING_ACTIONS,
    RETRYABLE_ACTIONS,
    WEEKDAYS,
    ActionType,
    Stage,
    Strategy,
    TimingType,
    TriggerType,
)
from duecourse.strategies.schemas import StageIn, StrategyIn
from duecourse.tenancy import audit
from duecourse.tenancy.models import AuditEntry, Organization
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.scope import get_owned, scoped

ENTITY = "strategy"
TOP_FIELDS = (
    "name",
    "description",
    "type",
    "multi_stage_handling",
    "first_action_logic",
    "trigger_type",
    "trigger_days",
    "trigger_amount",
    "priority",
    "automation_time",
    "automation_days",
)
NULLABLE_FIELDS = ("trigger_days", "trigger_amount")
STAGE_FIELDS = (
    "action_type",
    "timing_type",
    "days",
    "template_id",
    "tone",
    "max_retries",
    "retry_delay_hours",
    "step_timeout_hours",
    "note",
)
RETRY_DEFAULTS = {"max_retries": 2, "retry_delay_hours": 24, "step_timeout_hours": 24}
EMAIL_WINDOW = timedelta(days=14)
ACTIVATION_SUFFIX = "before the strategy can be active"


# --- reading -----------------------------------------------------------------------------------


def get_strategy(session: Session, *, organization_id: int, strategy_id: int) -> Strategy:
    return get_owned(session, Strategy, strategy_id, organization_id, "Strategy")


def stage_offsets(stages: Sequence[Any]) -> list[int]:
    """SPEC §3 Offsets: a days_from_trigger stage sits at its days; a days_from_previous stage at the
    previous stage's offset plus its days."""
    out: list[int] = []
    for st in stages:
        if st.timing_type == TimingType.days_from_previous and out:
            out.append(out[-1] + st.days)
        else:
            out.append(st.days)
    return out


def to_out(strategy: Strategy) -> dict[str, Any]:
    stages = list(strategy.stages)
    offsets = stage_offsets(stages)
    return {
        **{f: getattr(strategy, f) for f in TOP_FIELDS if f != "automation_days"},
        "id": strategy.id,
        "active": strategy.active,
        "automation_days": _days_list(strategy.automation_days),
        "stages": [
            {"position": s.position, "offset": offsets[i], **{f: getattr(s, f) for f in STAGE_FIELDS}}
            for i, s in enumerate(stages)
        ],
        "created_at": strategy.created_at,
        "updated_at": strategy.updated_at,
        "created_by": strategy.created_by,
        "last_run_at": strategy.last_run_at,
    }


def _days_list(stored: str) -> list[str]:
    days = set(stored.split(",")) if stored else set()
    return [d for d in WEEKDAYS if d in days]


def _epoch_seconds(session: Session, column: Any) -> ColumnElement[Any]:
    """Seconds since 1970 of a (naive UTC) timestamp column, on either dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", column)
    return (func.julianday(column) - 2440587.5) * 86400.0


def _open_case() -> ColumnElement[bool]:
    """SPEC §3: an open case is an account assigned to the strategy and not resolved."""
    return Account.status != AccountStatus.resolved.value


def case_stats(
    session: Session, *, organization_id: int, strategy_ids: Iterable[int], now: datetime
) -> dict[int, tuple[int, float | None]]:
    """Open cases and their average age in days, per strategy, in one grouped query."""
    ids = list(strategy_ids)
    if not ids:
        return {}
    age = now.timestamp() - _epoch_seconds(session, Account.case_opened_at)
    rows = session.execute(
        select(Account.strategy_id, func.count(), func.avg(age))
        .where(Account.organization_id == organization_id, Account.strategy_id.in_(ids), _open_case())
        .group_by(Account.strategy_id)
    ).all()
    return {
        sid: (int(n), None if avg_seconds is None else round(float(avg_seconds) / 86400.0, 2))
        for sid, n, avg_seconds in rows
    }


def list_strategies(
    session: Session,
    *,
    organization_id: int,
    params: PageParams,
    now: datetime,
    search: str | None = None,
    type: str | None = None,
    active: bool | None = None,
) -> dict[str, Any]:
    """A page of strategies with their open cases and average days open."""
    stmt = scoped(Strategy, organization_id)
    if search:
        stmt = stmt.where(Strategy.name.ilike(f"%{_escape_like(search.strip())}%", escape="\\"))
    if type is not None:
        stmt = stmt.where(Strategy.type == type)
    if active is not None:
        stmt = stmt.where(Strategy.active == active)
    page = paginate(session, stmt, Strategy.id, params, lambda s: s)
    stats = case_stats(
        session, organization_id=organization_id, strategy_ids=[s.id for s in page["items"]], now=now
    )
    items = []
    for s in page["items"]:
        n, avg = stats.get(s.id, (0, None))
        items.append({**to_out(s), "open_cases": n, "avg_days_open": avg})
    return {"items": items, "next_cursor": page["next_cursor"]}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# --- validation ------------------------------------------------------------------------------


def _stage_dicts(stages: Sequence[StageIn]) -> list[dict[str, Any]]:
    return [{f: getattr(st, f) for f in STAGE_FIELDS} for st in stages]


def _validate(
    session: Session,
    *,
    organization_id: int,
    data: dict[str, Any],
    stages: list[dict[str, Any]],
    activating: bool,
) -> None:
    """Check the whole strategy (top-level fields already merged); fills stage defaults in place."""
    errors: list[FieldError] = []
    if data["trigger_type"] == TriggerType.days_overdue:
        if data["trigger_days"] is None:
            errors.append(
                FieldError(
                    "trigger_days", "is required when trigger_type is days_overdue (whole days, 0 or more)"
                )
            )
        if data["trigger_amount"] is not None:
            errors.append(
                FieldError(
                    "trigger_amount", "is only used when trigger_type is amount_threshold; leave it out"
                )
            )
    else:
        if data["trigger_amount"] is None:
            errors.append(
                FieldError(
                    "trigger_amount", "is required when trigger_type is amount_threshold (an amount > 0)"
                )
            )
        if data["trigger_days"] is not None:
            errors.append(
                FieldError("trigger_days", "is only used when trigger_type is days_overdue; leave it out")
            )

    template_ids = {st["template_id"] for st in stages if st["template_id"] is not None}
    templates: dict[int, Template] = {}
    if template_ids:
        templates = {
            t.id: t
            for t in session.scalars(scoped(Template, organization_id).where(Template.id.in_(template_ids)))
        }

    for i, st in enumerate(stages):
        p = f"stages[{i}]"
        action = ActionType(st["action_type"])
        if i == 0 and st["timing_type"] != TimingType.days_from_trigger:
            errors.append(FieldError(f"{p}.timing_type", "the first stage must use days_from_trigger"))
        if st["timing_type"] == TimingType.days_from_previous and st["days"] < 0:
            errors.append(
                FieldError(
                    f"{p}.days",
                    "must be 0 or more for a days_from_previous stage (only days_from_trigger may be negative)",
                )
            )
        for f, default in RETRY_DEFAULTS.items():
            if action in RETRYABLE_ACTIONS:
                if st[f] is None:
                    st[f] = default
            elif st[f] is not None:
                errors.append(
                    FieldError(
                        f"{p}.{f}", f"is only allowed on voice and whatsapp stages, not on {action.value}"
                    )
                )
        tid = st["template_id"]
        if tid is not None:
            tpl = templates.get(tid)
            if action not in MESSAGING_ACTIONS and action != ActionType.voice:
                errors.append(FieldError(f"{p}.template_id", f"{action.value} stages take no template"))
            elif tpl is None:
                errors.append(FieldError(f"{p}.template_id", f"template {tid} not found"))
            elif tpl.channel.value != action.value:
                errors.append(
                    FieldError(
                        f"{p}.template_id",
                        f"template {tid} is {_an(tpl.channel.value)} template; "
                        f"{_an(action.value)} stage needs {_an(action.value)} template",
                    )
                )
        elif activating and action in MESSAGING_ACTIONS:
            errors.append(
                FieldError(
                    f"{p}.template_id",
                    f"{_an(action.value)} stage needs a template {ACTIVATION_SUFFIX}",
                )
            )
    if errors:
        only_activation = activating and all(e.message.endswith(ACTIVATION_SUFFIX) for e in errors)
        message = "The strategy cannot be activated" if only_activation else "Invalid strategy"
        raise ValidationFailed(message + ": " + "; ".join(f"{e.field}: {e.message}" for e in errors), errors)


def _an(channel: str) -> str:
    return ("an " if channel in ("email", "sms") else "a ") + channel


def _check_name(session: Session, *, organization_id: int, name: str, strategy_id: int | None) -> None:
    """Names are unique per organization, ignoring case (the database enforces exact uniqueness)."""
    stmt = scoped(Strategy, organization_id, Strategy.id).where(func.lower(Strategy.name) == func.lower(name))
    if strategy_id is not None:
        stmt = stmt.where(Strategy.id != strategy_id)
    if session.scalar(stmt.limit(1)) is not None:
        raise Conflict(
            f"A strategy named {name!r} already exists",
            [FieldError("name", "is already used by another strategy")],
        )


def _exact(amount: Decimal | None) -> Decimal | None:
    """The amount as it will read back from the database, so audit comparisons are exact."""
    return None if amount is None else units_to_money(money_to_units(amount))


# --- writing ---------------------------------------------------------------------------------


def _top_values(strategy: Strategy) -> dict[str, Any]:
    out = {f: getattr(strategy, f) for f in TOP_FIELDS}
    out["automation_days"] = _days_list(strategy.automation_days)
    return out


def _stage_values(strategy: Strategy) -> list[dict[str, Any]]:
    return [{f: getattr(s, f) for f in STAGE_FIELDS} for s in strategy.stages]


def _apply(strategy: Strategy, data: dict[str, Any], stages: list[dict[str, Any]] | None) -> None:
    for f in TOP_FIELDS:
        value = data[f]
        if f == "automation_days":
            value = ",".join(value)
        setattr(strategy, f, value)
    if stages is None:
        return
    # Rows are kept by position (the engine refers to stages by index); extra rows are removed.
    current = list(strategy.stages)
    for i, values in enumerate(stages):
        if i < len(current):
            row = current[i]
        else:
            row = Stage(position=i)
            strategy.stages.append(row)
        for f in STAGE_FIELDS:
            setattr(row, f, values[f])
    for row in current[len(stages) :]:
        strategy.stages.remove(row)


def _snapshot(top: dict[str, Any], stages: list[dict[str, Any]], active: bool) -> dict[str, Any]:
    return {**top, "active": active, "stages": stages}


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.value if hasattr(v, "value") else (str(v) if isinstance(v, Decimal) else v))
        for k, v in values.items()
    }


def create_strategy(session: Session, *, principal: Principal, data: StrategyIn, now: datetime) -> Strategy:
    """Create a strategy with its stages (SPEC §3); audited as one ``created`` entry."""
    org_id = principal.organization_id
    top = {f: getattr(data, f) for f in TOP_FIELDS}
    top["trigger_amount"] = _exact(top["trigger_amount"])
    stages = _stage_dicts(data.stages)
    active = bool(data.active)
    _validate(session, organization_id=org_id, data=top, stages=stages, activating=active)
    _check_name(session, organization_id=org_id, name=data.name, strategy_id=None)
    strategy = Strategy(
        organization_id=org_id,
        active=active,
        created_at=now,
        updated_at=now,
        created_by=principal.actor,
        created_by_user_id=principal.user_id,
    )
    _apply(strategy, top, stages)
    session.add(strategy)
    session.flush()
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=strategy.id,
        action="created",
        description=f"Strategy {strategy.name!r} created" + (" (active)" if strategy.active else ""),
        new=_snapshot(_jsonable(top), [_jsonable(s) for s in stages], active),
    )
    return strategy


def _record_update(
    session: Session,
    *,
    principal: Principal,
    strategy: Strategy,
    now: datetime,
    old_top: dict[str, Any],
    new_top: dict[str, Any],
    old_stages: list[dict[str, Any]],
    new_stages: list[dict[str, Any]] | None,
    old_active: bool,
    new_active: bool,
) -> int:
    """One audit entry per changed field (stages as ``stages[i].field``; added and removed stages)."""
    before = len(session.new)
    label = f"Strategy {strategy.name!r}"
    audit.record_changes(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=strategy.id,
        changes={f: (old_top[f], new_top[f]) for f in TOP_FIELDS},
        description_prefix=label,
    )
    if new_stages is not None:
        stage_changes: dict[str, tuple[Any, Any]] = {}
        for i in range(min(len(old_stages), len(new_stages))):
            for f in STAGE_FIELDS:
                stage_changes[f"stages[{i}].{f}"] = (old_stages[i][f], new_stages[i][f])
        audit.record_changes(
            session,
            principal=principal,
            at=now,
            entity_type=ENTITY,
            entity_id=strategy.id,
            changes=stage_changes,
            description_prefix=label,
        )
        for i in range(len(old_stages), len(new_stages)):
            audit.record(
                session,
                principal=principal,
                at=now,
                entity_type=ENTITY,
                entity_id=strategy.id,
                action="stage_added",
                field=f"stages[{i}]",
                new=_jsonable(new_stages[i]),
                description=f"{label}: stage {i} ({new_stages[i]['action_type']}) added",
            )
        for i in range(len(new_stages), len(old_stages)):
            audit.record(
                session,
                principal=principal,
                at=now,
                entity_type=ENTITY,
                entity_id=strategy.id,
                action="stage_removed",
                field=f"stages[{i}]",
                old=_jsonable(old_stages[i]),
                description=f"{label}: stage {i} ({old_stages[i]['action_type']}) removed",
            )
    if old_active != new_active:
        _record_active(session, principal=principal, strategy=strategy, now=now, active=new_active)
    return len(session.new) - before


def _record_active(
    session: Session, *, principal: Principal, strategy: Strategy, now: datetime, active: bool
) -> None:
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=strategy.id,
        action="activated" if active else "deactivated",
        field="active",
        old=not active,
        new=active,
        description=f"Strategy {strategy.name!r} {'activated' if active else 'deactivated'}",
    )


def replace_strategy(
    session: Session, *, principal: Principal, strategy_id: int, data: StrategyIn, now: datetime
) -> Strategy:
    """Full update: every top-level field and the stage list (sent in its new order)."""
    org_id = principal.organization_id
    strategy = get_strategy(session, organization_id=org_id, strategy_id=strategy_id)
    top = {f: getattr(data, f) for f in TOP_FIELDS}
    top["trigger_amount"] = _exact(top["trigger_amount"])
    stages = _stage_dicts(data.stages)
    active = strategy.active if data.active is None else data.active
    _validate(session, organization_id=org_id, data=top, stages=stages, activating=active)
    _check_name(session, organization_id=org_id, name=data.name, strategy_id=strategy.id)
    old_top, old_stages, old_active = _top_values(strategy), _stage_values(strategy), strategy.active
    return _store(session, principal=principal, strategy=strategy, now=now, top=top, stages=stages, active=active,
                  old=(old_top, old_stages, old_active))


def _store(
    session: Session,
    *,
    principal: Principal,
    strategy: Strategy,
    now: datetime,
    top: dict[str, Any],
    stages: list[dict[str, Any]] | None,
    active: bool,
    old: tuple[dict[str, Any], list[dict[str, Any]], bool],
) -> Strategy:
    """Apply validated values (``stages`` None: keep them) and audit what changed."""
    old_top, old_stages, old_active = old
    _apply(strategy, top, stages)
    strategy.active = active
    if _record_update(
        session,
        principal=principal,
        strategy=strategy,
        now=now,
        old_top=old_top,
        new_top=top,
        old_stages=old_stages,
        new_stages=stages,
        old_active=old_active,
        new_active=active,
    ):
        strategy.updated_at = now
    return strategy


def patch_strategy(
    session: Session, *, principal: Principal, strategy_id: int, patch: dict[str, Any], now: datetime
) -> Strategy:
    """Partial update of top-level fields; changing trigger_type clears the other trigger's value."""
    org_id = principal.organization_id
    strategy = get_strategy(session, organization_id=org_id, strategy_id=strategy_id)
    nulls = [k for k, v in patch.items() if v is None and k not in NULLABLE_FIELDS]
    if nulls:
        raise ValidationFailed("Invalid strategy", [FieldError(k, "must not be null") for k in nulls])
    old_top, old_stages, old_active = _top_values(strategy), _stage_values(strategy), strategy.active
    top = dict(old_top)
    if "trigger_type" in patch and patch["trigger_type"] != old_top["trigger_type"]:
        other = "trigger_amount" if patch["trigger_type"] == TriggerType.days_overdue else "trigger_days"
        if other not in patch:
            top[other] = None
    top.update({k: v for k, v in patch.items() if k in TOP_FIELDS})
    top["trigger_amount"] = _exact(top["trigger_amount"])
    active = patch.get("active", old_active)
    stages = [dict(s) for s in old_stages]
    _validate(session, organization_id=org_id, data=top, stages=stages, activating=active)
    if "name" in patch:
        _check_name(session, organization_id=org_id, name=top["name"], strategy_id=strategy.id)
    return _store(session, principal=principal, strategy=strategy, now=now, top=top, stages=None, active=active,
                  old=(old_top, old_stages, old_active))


def set_active(
    session: Session, *, principal: Principal, strategy_id: int, active: bool, now: datetime
) -> Strategy:
    """Activate (refused while a messaging stage lacks a template) or deactivate; a no-op if unchanged."""
    return patch_strategy(
        session, principal=principal, strategy_id=strategy_id, patch={"active": active}, now=now
    )


def delete_strategy(session: Session, *, principal: Principal, strategy_id: int, now: datetime) -> None:
    """Delete an inactive strategy with no open cases and no campaign using it; the audit log stays."""
    org_id = principal.organization_id
    strategy = get_strategy(session, organization_id=org_id, strategy_id=strategy_id)
    if strategy.active:
        raise Conflict("An active strategy cannot be deleted; deactivate it first")
    open_cases = session.scalar(
        select(func.count())
        .select_from(Account)
        .where(Account.organization_id == org_id, Account.strategy_id == strategy.id, _open_case())
    )
    if open_cases:
        raise Conflict(
            f"The strategy has {open_cases} open case{'s' if open_cases != 1 else ''}; "
            "it can be deleted only when none remain"
        )
    campaigns = session.scalars(
        scoped(Campaign, org_id, Campaign.name)
        .where(Campaign.strategy_id == strategy.id)
        .order_by(Campaign.name)
    ).all()
    if campaigns:
        raise Conflict(
            "The strategy is used by campaign(s) "
            + ", ".join(repr(n) for n in campaigns)
            + "; change their strategy first"
        )
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=strategy.id,
        action="deleted",
        description=f"Strategy {strategy.name!r} deleted",
        old=_snapshot(
            _jsonable(_top_values(strategy)), [_jsonable(s) for s in _stage_values(strategy)], False
        ),
    )
    from duecourse.engine.references import forget

    forget(session, column="strategy_id", value=strategy.id)
    session.delete(strategy)
    session.flush()


def run_now(session: Session, *, principal: Principal, strategy_id: int, now: datetime) -> dict[str, Any]:
    """SPEC §3 Run Now: an active strategy is evaluated and enqueued immediately by the engine."""
    from duecourse.engine.runs import run_strategy_now

    strategy = get_strategy(session, organization_id=principal.organization_id, strategy_id=strategy_id)
    if not strategy.active:
        raise Conflict("Only an active strategy can be run; activate it first")
    result = run_strategy_now(session, strategy=strategy, now=now, principal=principal)
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=strategy.id,
        action="run",
        new=result,
        description=f"Strategy {strategy.name!r} run now",
    )
    return result


# --- audit log and performance -----------------------------------------------------------------


def audit_log(
    session: Session, *, organization_id: int, entity_type: str, entity_id: int, params: PageParams
) -> dict[str, Any]:
    """Audit entries of one object, newest first. Entries outlive the object they describe."""
    stmt = scoped(AuditEntry, organization_id).where(
        AuditEntry.entity_type == entity_type, AuditEntry.entity_id == entity_id
    )
    return paginate(session, stmt, AuditEntry.id, params, lambda e: e, descending=True)


def strategy_audit_log(
    session: Session, *, organization_id: int, strategy_id: int, params: PageParams
) -> dict[str, Any]:
    """A strategy's audit log; still readable after the strategy was deleted, 404 if it never existed here."""
    strategy = session.get(Strategy, strategy_id)
    if strategy is None or strategy.organization_id != organization_id:
        exists = session.scalar(
            scoped(AuditEntry, organization_id, AuditEntry.id)
            .where(AuditEntry.entity_type == ENTITY, AuditEntry.entity_id == strategy_id)
            .limit(1)
        )
        if exists is None:
            raise NotFound("Strategy")
    return audit_log(
        session, organization_id=organization_id, entity_type=ENTITY, entity_id=strategy_id, params=params
    )


def next_run_at(
    *, now: datetime, automation_time: str, automation_days: Iterable[str], timezone: str
) -> datetime | None:
    """The first automation slot after ``now``: an automation day at automation_time, organization time, as UTC."""
    days = set(automation_days)
    if not days:
        return None
    tz = ZoneInfo(timezone)
    hh, mm = (int(x) for x in automation_time.split(":"))
    local_today = now.astimezone(tz).date()
    for delta in range(8):
        day = local_today + timedelta(days=delta)
        if WEEKDAYS[day.weekday()] not in days:
            continue
        slot = datetime.combine(day, time(hh, mm), tzinfo=tz).astimezone(UTC)
        if slot > now:
            return slot
    return None


def performance(session: Session, *, organization_id: int, strategy_id: int, now: datetime) -> dict[str, Any]:
    """SPEC §3 Performance: open cases, their age, runs, emails in 14 days, the stage funnel, warnings."""
    strategy = get_strategy(session, organization_id=organization_id, strategy_id=strategy_id)
    open_cases, avg_days = case_stats(
        session, organization_id=organization_id, strategy_ids=[strategy.id], now=now
    ).get(strategy.id, (0, None))
    emails = (
        session.scalar(
            select(func.count())
            .select_from(Interaction)
            .where(
                Interaction.organization_id == organization_id,
                Interaction.strategy_id == strategy.id,
                Interaction.channel == ActionType.email.value,
                Interaction.direction == Direction.outbound.value,
                Interaction.occurred_at >= now - EMAIL_WINDOW,
            )
        )
        or 0
    )
    # Grouped by (status, next stage): a handful of rows whatever the number of cases.
    funnel_rows = session.execute(
        select(Account.status, Account.case_next_stage, func.count())
        .where(Account.organization_id == organization_id, Account.strategy_id == strategy.id, _open_case())
        .group_by(Account.status, Account.case_next_stage)
    ).all()
    at_stage: dict[int, int] = {}
    sequence_completed = 0
    for status, stage, n in funnel_rows:
        if status == AccountStatus.sequence_completed:
            sequence_completed += int(n)
        elif stage is not None:
            at_stage[int(stage)] = at_stage.get(int(stage), 0) + int(n)
    org = session.get(Organization, organization_id)
    assert org is not None
    warnings: list[str] = []
    if not strategy.active:
        warnings.append(
            "The strategy is inactive: no accounts are assigned to it and its open cases get no automated actions"
        )
    if open_cases > 0 and emails == 0:
        warnings.append(
            f"{open_cases} open case{'s' if open_cases != 1 else ''} but no emails sent in the last 14 days"
        )
    return {
        "strategy_id": strategy.id,
        "created_at": strategy.created_at,
        "created_by": strategy.created_by,
        "active": strategy.active,
        "open_cases": open_cases,
        "avg_days_open": avg_days,
        "last_run_at": strategy.last_run_at,
        "next_run_at": next_run_at(
            now=now,
            automation_time=strategy.automation_time,
            automation_days=_days_list(strategy.automation_days),
            timezone=org.timezone,
        )
        if strategy.active
        else None,
        "emails_sent_14d": int(emails),
        "funnel": [
            {"position": s.position, "action_type": s.action_type, "count": at_stage.get(s.position, 0)}
            for s in strategy.stages
        ],
        "sequence_completed": sequence_completed,
        "warnings": warnings,
    }

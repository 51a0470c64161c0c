"""Campaigns (SPEC §5): fields, lifecycle, membership and KPIs. Services never commit.

Everything that touches a campaign's accounts or queue items is a few set-based statements,
whatever the campaign's size.

Leaving a campaign (removal, moving to another campaign, deleting the campaign) is one rule,
:func:`_detach`: the account's pending queue items are cancelled with a reason, and if its
strategy came from the campaign (its strategy is the campaign's strategy) the case ends: the
account goes back to ``unassigned`` with no strategy (``resolved`` accounts stay resolved), so the
engine assigns it again from its new campaign or from strategy triggers on its next run.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, case, exists, func, insert, literal, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.campaigns.models import Campaign, CampaignStatus
from duecourse.campaigns.schemas import AccountFilter, CampaignIn, MembershipAdd
from duecourse.engine.log import cancel_pending
from duecourse.engine.models import Direction, ExecutionLogEntry, Interaction, QueueItem
from duecourse.errors import Conflict, FieldError, ValidationFailed
from duecourse.ledger.models import Account, AccountStatus, AccountTag, Payment, Promise
from duecourse.pagination import PageParams, paginate
from duecourse.strategies.models import Strategy
from duecourse.tenancy import audit
from duecourse.tenancy.models import Organization
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.scope import get_owned, scoped

ENTITY = "campaign"
FIELDS = ("name", "objective", "strategy_id", "start_date", "end_date")
NULLABLE = ("strategy_id", "start_date", "end_date")

# SPEC §5: action -> (statuses it is allowed from, status it leads to).
TRANSITIONS: dict[str, tuple[tuple[CampaignStatus, ...], CampaignStatus]] = {
    "activate": ((CampaignStatus.draft, CampaignStatus.paused), CampaignStatus.active),
    "pause": ((CampaignStatus.active,), CampaignStatus.paused),
    "complete": ((CampaignStatus.active, CampaignStatus.paused), CampaignStatus.completed),
}


def get_campaign(session: Session, *, organization_id: int, campaign_id: int) -> Campaign:
    return get_owned(session, Campaign, campaign_id, organization_id, "Campaign")


def list_campaigns(
    session: Session,
    *,
    organization_id: int,
    params: PageParams,
    status: str | None = None,
    search: str | None = None,
) -> dict[str, Any]:
    stmt = scoped(Campaign, organization_id)
    if status is not None:
        stmt = stmt.where(Campaign.status == status)
    if search:
        escaped = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(Campaign.name.ilike(f"%{escaped}%", escape="\\"))
    return paginate(session, stmt, Campaign.id, params, lambda c: c)


# --- fields ------------------------------------------------------------------------------------


def _validate(
    session: Session, *, organization_id: int, data: dict[str, Any], status: CampaignStatus
) -> None:
    errors: list[FieldError] = []
    strategy = None
    if data["strategy_id"] is not None:
        strategy = session.scalar(scoped(Strategy, organization_id).where(Strategy.id == data["strategy_id"]))
        if strategy is None:
            errors.append(FieldError("strategy_id", f"strategy {data['strategy_id']} not found"))
    if status == CampaignStatus.active:
        if data["strategy_id"] is None:
            errors.append(FieldError("strategy_id", "an active campaign needs a strategy"))
        elif strategy is not None and not strategy.active:
            errors.append(
                FieldError(
                    "strategy_id",
                    f"strategy {strategy.name!r} is inactive; an active campaign needs an active strategy",
                )
            )
    if data["start_date"] and data["end_date"] and data["end_date"] < data["start_date"]:
        errors.append(FieldError("end_date", "must be on or after start_date"))
    if errors:
        raise ValidationFailed(
            "Invalid campaign: " + "; ".join(f"{e.field}: {e.message}" for e in errors), errors
        )


def _check_name(session: Session, *, organization_id: int, name: str, campaign_id: int | None) -> None:
    stmt = scoped(Campaign, organization_id, Campaign.id).where(func.lower(Campaign.name) == func.lower(name))
    if campaign_id is not None:
        stmt = stmt.where(Campaign.id != campaign_id)
    if session.scalar(stmt.limit(1)) is not None:
        raise Conflict(
            f"A campaign named {name!r} already exists",
            [FieldError("name", "is already used by another campaign")],
        )


def create_campaign(session: Session, *, principal: Principal, data: CampaignIn, now: datetime) -> Campaign:
    """A new campaign, in ``draft``."""
    org_id = principal.organization_id
    values = data.model_dump()
    _validate(session, organization_id=org_id, data=values, status=CampaignStatus.draft)
    _check_name(session, organization_id=org_id, name=values["name"], campaign_id=None)
    campaign = Campaign(
        organization_id=org_id,
        status=CampaignStatus.draft,
        created_at=now,
        updated_at=now,
        created_by=principal.actor,
        **values,
    )
    session.add(campaign)
    session.flush()
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=campaign.id,
        action="created",
        field="status",
        new=CampaignStatus.draft,
        description=f"Campaign {campaign.name!r} created",
    )
    return campaign


def update_campaign(
    session: Session, *, principal: Principal, campaign_id: int, values: dict[str, Any], now: datetime
) -> Campaign:
    """Change fields (PUT: all of them, PATCH: those sent). The status changes only through actions."""
    org_id = principal.organization_id
    campaign = get_campaign(session, organization_id=org_id, campaign_id=campaign_id)
    nulls = [k for k, v in values.items() if v is None and k not in NULLABLE]
    if nulls:
        raise ValidationFailed("Invalid campaign", [FieldError(k, "must not be null") for k in nulls])
    merged = {f: getattr(campaign, f) for f in FIELDS}
    merged.update(values)
    _validate(session, organization_id=org_id, data=merged, status=campaign.status)
    if "name" in values:
        _check_name(session, organization_id=org_id, name=merged["name"], campaign_id=campaign.id)
    changed = False
    for f in FIELDS:
        if getattr(campaign, f) != merged[f]:
            setattr(campaign, f, merged[f])
            changed = True
    if changed:
        campaign.updated_at = now
    return campaign


# --- queue items and leaving a campaign ---------------------------------------------------------


def _cancel_pending(
    session: Session,
    *,
    organization_id: int,
    which: ColumnElement[bool],
    now: datetime,
    reason: str,
    campaign_id: int,
) -> int:
    """Cancel the campaign's pending queue items matching ``which``, each logged with its reason."""
    return cancel_pending(
        session,
        organization_id=organization_id,
        which=which,
        now=now,
        reason=reason,
        cause="campaign",
        details={"campaign_id": campaign_id},
    )


def _detach(
    session: Session,
    *,
    organization_id: int,
    accounts: ColumnElement[bool],
    now: datetime,
    reason: str,
    campaign_id: int,
) -> None:
    """The accounts matching ``accounts`` leave their current campaign (see the module docstring).

    Does not touch ``campaign_id`` itself: the caller clears or replaces it afterwards, so that
    ``accounts`` still selects the same rows in every statement here.
    """
    from duecourse.ledger.derived import refresh_tabs
    from duecourse.tenancy.service import get_settings

    in_scope = and_(Account.organization_id == organization_id, accounts)
    ids = select(Account.id).where(in_scope)
    _cancel_pending(
        session,
        organization_id=organization_id,
        which=QueueItem.account_id.in_(ids),
        now=now,
        reason=reason,
        campaign_id=campaign_id,
    )
    campaign_strategy = (
        select(Campaign.strategy_id).where(Campaign.id == Account.campaign_id).scalar_subquery()
    )
    from_campaign = and_(in_scope, Account.campaign_id.is_not(None), Account.strategy_id == campaign_strategy)
    session.execute(
        insert(ExecutionLogEntry).from_select(
            ["organization_id", "account_id", "at", "event", "case_number", "reason", "cause", "details"],
            select(
                Account.organization_id,
                Account.id,
                literal(now, type_=ExecutionLogEntry.at.type),
                literal("unassigned"),
                Account.case_number,
                literal(reason),
                literal("campaign"),
                literal({"campaign_id": campaign_id}, type_=ExecutionLogEntry.details.type),
            ).where(from_campaign, Account.status != AccountStatus.resolved.value),
        )
    )
    session.execute(
        update(Account)
        .where(from_campaign)
        .values(
            strategy_id=None,
            status=case(
                (Account.status == AccountStatus.resolved.value, AccountStatus.resolved.value),
                else_=AccountStatus.unassigned.value,
            ),
            case_next_stage=None,
            case_anchor_date=None,
            case_invoice_id=None,
            case_sequence_finished=False,
            callback_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    refresh_tabs(
        session,
        organization_id=organization_id,
        exclusions=get_settings(session, organization_id).exclusions,
        account_ids=ids,
    )


def _clear_membership(session: Session, *, organization_id: int, members: ColumnElement[bool], now: datetime) -> None:
    """The accounts matching ``members`` belong to no campaign any more (after :func:`_detach`)."""
    session.execute(
        update(Account)
        .where(Account.organization_id == organization_id, members)
        .values(campaign_id=None, campaign_joined_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )


def delete_campaign(session: Session, *, principal: Principal, campaign_id: int, now: datetime) -> None:
    """Delete: unassign its accounts and cancel their pending items (reason ``campaign_deleted``)."""
    org_id = principal.organization_id
    campaign = get_campaign(session, organization_id=org_id, campaign_id=campaign_id)
    members = Account.campaign_id == campaign.id
    _detach(
        session,
        organization_id=org_id,
        accounts=members,
        now=now,
        reason="campaign_deleted",
        campaign_id=campaign.id,
    )
    # Items of the campaign whose account has left it already.
    _cancel_pending(
        session,
        organization_id=org_id,
        which=QueueItem.campaign_id == campaign.id,
        now=now,
        reason="campaign_deleted",
        campaign_id=campaign.id,
    )
    _clear_membership(session, organization_id=org_id, members=members, now=now)
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=campaign.id,
        action="deleted",
        field="status",
        old=campaign.status,
        description=f"Campaign {campaign.name!r} deleted",
    )
    from duecourse.engine.references import forget

    forget(session, column="campaign_id", value=campaign.id)
    session.delete(campaign)
    session.flush()
    session.expire_all()


# --- lifecycle ---------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def transition(
    session: Session, *, principal: Principal, campaign_id: int, action: str, now: datetime
) -> Campaign:
    """SPEC §5 transitions; every other one is refused with the statuses it is allowed from."""
    org_id = principal.organization_id
    campaign = get_campaign(session, organization_id=org_id, campaign_id=campaign_id)
    allowed, target = TRANSITIONS[action]
    current = campaign.status
    if current not in allowed:
        raise Conflict(
            f"cannot {action} {_article(current.value)} {current.value} campaign "
            f"(allowed from: {', '.join(s.value for s in allowed)})",
            [FieldError("status", f"is {current.value}")],
        )
    if action == "activate":
        if campaign.strategy_id is None:
            raise Conflict(
                "cannot activate a campaign without a strategy; set strategy_id first",
                [FieldError("strategy_id", "required to activate")],
            )
        strategy = get_owned(session, Strategy, campaign.strategy_id, org_id, "Strategy")
        if not strategy.active:
            raise Conflict(
                f"cannot activate the campaign: its strategy {strategy.name!r} is inactive; activate the strategy first",
                [FieldError("strategy_id", "strategy is inactive")],
            )
        campaign.activated_at = now
    elif action == "pause":
        _cancel_pending(
            session,
            organization_id=org_id,
            which=QueueItem.campaign_id == campaign.id,
            now=now,
            reason="campaign_paused",
            campaign_id=campaign.id,
        )
    elif action == "complete":
        # A completed campaign enqueues nothing more; its waiting items are withdrawn, not left to be skipped.
        _cancel_pending(
            session,
            organization_id=org_id,
            which=QueueItem.campaign_id == campaign.id,
            now=now,
            reason="campaign_completed",
            campaign_id=campaign.id,
        )
        campaign.completed_at = now
    campaign.status = target
    campaign.updated_at = now
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=campaign.id,
        action="status_changed",
        field="status",
        old=current,
        new=target,
        description=f"Campaign {campaign.name!r}: {current.value} -> {target.value}",
    )
    return campaign


# --- membership --------------------------------------------------------------------------------


def _filter_condition(
    session: Session, *, organization_id: int, flt: AccountFilter, now: datetime
) -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = []
    if flt.status is not None:
        conds.append(Account.status == flt.status.value)
    if flt.collection_tab is not None:
        conds.append(Account.collection_tab == flt.collection_tab.value)
    if flt.tag is not None:
        conds.append(exists().where(AccountTag.account_id == Account.id, AccountTag.tag == flt.tag))
    if flt.min_balance is not None:
        conds.append(Account.balance >= flt.min_balance)
    if flt.max_balance is not None:
        conds.append(Account.balance <= flt.max_balance)
    if flt.min_days_overdue is not None:
        org = session.get(Organization, organization_id)
        assert org is not None
        today = now.astimezone(ZoneInfo(org.timezone)).date()
        conds.append(Account.carrying_due_date <= today - timedelta(days=flt.min_days_overdue))
    if not conds:
        raise ValidationFailed.on("filter", "give at least one criterion")
    if flt.min_balance is not None and flt.max_balance is not None and flt.min_balance > flt.max_balance:
        raise ValidationFailed.on("filter.max_balance", "must not be below filter.min_balance")
    return and_(*conds)


def _selection(
    session: Session, *, organization_id: int, body: MembershipAdd, now: datetime
) -> tuple[ColumnElement[bool], str]:
    """The accounts a membership request names, as a condition, and the request field that named them."""
    given = [f for f in ("account_ids", "external_ids", "filter") if getattr(body, f) is not None]
    if len(given) != 1:
        raise ValidationFailed(
            "Give exactly one of account_ids, external_ids or filter",
            [
                FieldError(f, "give exactly one of account_ids, external_ids or filter")
                for f in (given or ["account_ids"])
            ],
        )
    field = given[0]
    if field == "filter":
        assert body.filter is not None
        return _filter_condition(session, organization_id=organization_id, flt=body.filter, now=now), field
    values = list(dict.fromkeys(getattr(body, field)))
    if not values:
        raise ValidationFailed.on(field, "must not be empty")
    column = Account.id if field == "account_ids" else Account.external_id
    found = set(session.scalars(scoped(Account, organization_id, column).where(column.in_(values))))
    unknown = [v for v in values if v not in found]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:20]) + (
            f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        )
        what = "account ids" if field == "account_ids" else "external ids"
        raise ValidationFailed(
            f"Unknown {what}: {shown}; nothing was changed", [FieldError(field, f"unknown {what}: {shown}")]
        )
    return column.in_(values), field


def add_accounts(
    session: Session, *, principal: Principal, campaign_id: int, body: MembershipAdd, now: datetime
) -> dict[str, Any]:
    """Add accounts (by ids, external ids or a filter). An account is in at most one campaign:
    members of another campaign are refused unless ``move`` is true, which moves them here."""
    org_id = principal.organization_id
    campaign = get_campaign(session, organization_id=org_id, campaign_id=campaign_id)
    if campaign.status == CampaignStatus.completed:
        raise Conflict("cannot add accounts to a completed campaign")
    cond, field = _selection(session, organization_id=org_id, body=body, now=now)
    selected = and_(Account.organization_id == org_id, cond)
    elsewhere = and_(Account.campaign_id.is_not(None), Account.campaign_id != campaign.id)
    total, here, other = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Account.campaign_id == campaign.id, 1), else_=0)), 0),
            func.coalesce(func.sum(case((elsewhere, 1), else_=0)), 0),
        ).where(selected)
    ).one()
    if other and not body.move:
        examples = session.execute(
            select(Account.external_id, Campaign.name)
            .join(Campaign, Campaign.id == Account.campaign_id)
            .where(selected, elsewhere)
            .order_by(Account.id)
            .limit(5)
        ).all()
        shown = ", ".join(f"{ext} (in {name!r})" for ext, name in examples)
        raise Conflict(
            f"{other} account{'s are' if other != 1 else ' is'} already in another campaign: {shown}"
            f'{" …" if other > len(examples) else ""}; send "move": true to move them here',
            [
                FieldError(field, f"{other} already in another campaign"),
                FieldError("move", "must be true to move them"),
            ],
        )
    if other:
        _detach(
            session,
            organization_id=org_id,
            accounts=and_(cond, elsewhere),
            now=now,
            reason="campaign_moved",
            campaign_id=campaign.id,
        )
    member_ids = select(Account.id).where(
        selected, or_(Account.campaign_id.is_(None), Account.campaign_id != campaign.id)
    )
    session.execute(
        update(Account)
        .where(Account.id.in_(member_ids))
        .values(campaign_id=campaign.id, campaign_joined_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    added = int(total) - int(here)
    if added:
        audit.record(
            session,
            principal=principal,
            at=now,
            entity_type=ENTITY,
            entity_id=campaign.id,
            action="accounts_added",
            new={"added": added, "moved": int(other)},
            description=f"{added} account{'s' if added != 1 else ''} added to campaign {campaign.name!r}"
            + (f" ({int(other)} moved from another campaign)" if other else ""),
        )
    session.expire_all()
    return {
        "campaign_id": campaign.id,
        "added": added,
        "moved": int(other),
        "already_members": int(here),
        "total_accounts": _member_count(session, organization_id=org_id, campaign_id=campaign.id),
    }


def remove_accounts(
    session: Session, *, principal: Principal, campaign_id: int, account_ids: list[int], now: datetime
) -> dict[str, Any]:
    """Remove member accounts; ids that are not members of this campaign are refused and nothing changes."""
    org_id = principal.organization_id
    campaign = get_campaign(session, organization_id=org_id, campaign_id=campaign_id)
    ids = list(dict.fromkeys(account_ids))
    members = and_(Account.campaign_id == campaign.id, Account.id.in_(ids))
    found = set(session.scalars(scoped(Account, org_id, Account.id).where(members)))
    missing = [i for i in ids if i not in found]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20])
        raise ValidationFailed(
            f"Not members of this campaign: {shown}; nothing was changed",
            [FieldError("account_ids", f"not members of this campaign: {shown}")],
        )
    _detach(
        session,
        organization_id=org_id,
        accounts=members,
        now=now,
        reason="removed_from_campaign",
        campaign_id=campaign.id,
    )
    _clear_membership(session, organization_id=org_id, members=members, now=now)
    audit.record(
        session,
        principal=principal,
        at=now,
        entity_type=ENTITY,
        entity_id=campaign.id,
        action="accounts_removed",
        new={"removed": len(ids)},
        description=f"{len(ids)} account{'s' if len(ids) != 1 else ''} removed from campaign {campaign.name!r}",
    )
    session.expire_all()
    return {
        "campaign_id": campaign.id,
        "removed": len(ids),
        "total_accounts": _member_count(session, organization_id=org_id, campaign_id=campaign.id),
    }


def _member_count(session: Session, *, organization_id: int, campaign_id: int) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Account)
            .where(Account.organization_id == organization_id, Account.campaign_id == campaign_id)
        )
        or 0
    )


def list_members(
    session: Session, *, organization_id: int, campaign_id: int, params: PageParams
) -> dict[str, Any]:
    campaign = get_campaign(session, organization_id=organization_id, campaign_id=campaign_id)
    stmt = scoped(Account, organization_id).where(Account.campaign_id == campaign.id)
    return paginate(session, stmt, Account.id, params, lambda a: a)


# --- KPIs --------------------------------------------------------------------------------------


def kpis(session: Session, *, organization_id: int, campaign_id: int) -> dict[str, Any]:
    """SPEC §5 KPIs of one campaign."""
    campaign = get_campaign(session, organization_id=organization_id, campaign_id=campaign_id)
    return kpis_for(session, organization_id=organization_id, campaign_ids=[campaign.id])[campaign.id]


def kpis_for(session: Session, *, organization_id: int, campaign_ids: list[int]) -> dict[int, dict[str, Any]]:
    """SPEC §5 KPIs of several campaigns of the organization (a list page): each KPI is one SQL
    aggregate over the campaigns' current members, grouped by campaign."""
    if not campaign_ids:
        return {}
    member = and_(Account.organization_id == organization_id, Account.campaign_id.in_(campaign_ids))
    totals = dict(session.execute(select(Account.campaign_id, func.count()).where(member).group_by(Account.campaign_id)).all())
    contacted = dict(
        session.execute(
            select(Account.campaign_id, func.count(func.distinct(Interaction.account_id)))
            .join(Account, Account.id == Interaction.account_id)
            .where(
                member,
                Interaction.organization_id == organization_id,
                Interaction.campaign_id == Account.campaign_id,
                Interaction.direction == Direction.outbound.value,
                # A contact with the debtor: a message or call sent, or an agent's call logged; not a
                # task just opened (``queued``), an escalation or a stop flag.
                or_(
                    Interaction.channel.in_(("email", "sms", "whatsapp", "voice")),
                    and_(Interaction.channel == "phone_call", Interaction.status != "queued"),
                ),
            )
            .group_by(Account.campaign_id)
        ).all()
    )
    promises = dict(
        session.execute(
            select(Account.campaign_id, func.count(Promise.id))
            .join(Account, Account.id == Promise.account_id)
            .where(member, Promise.created_at >= Account.campaign_joined_at)
            .group_by(Account.campaign_id)
        ).all()
    )
    recovered: dict[int, dict[str, Decimal]] = {}
    for campaign_id, currency, amount in session.execute(
        select(Account.campaign_id, Payment.currency, func.sum(Payment.amount))
        .join(Account, Account.id == Payment.account_id)
        .where(member, Payment.paid_on >= func.date(Account.campaign_joined_at))
        .group_by(Account.campaign_id, Payment.currency)
    ):
        recovered.setdefault(campaign_id, {})[currency] = Decimal(amount)
    org = session.get(Organization, organization_id)
    assert org is not None
    out: dict[int, dict[str, Any]] = {}
    for campaign_id in campaign_ids:
        total, reached = int(totals.get(campaign_id, 0)), int(contacted.get(campaign_id, 0))
        by_currency = recovered.get(campaign_id, {})
        out[campaign_id] = {
            "campaign_id": campaign_id,
            "total_accounts": total,
            "contacted": reached,
            "promises": int(promises.get(campaign_id, 0)),
            "recovered_amount": by_currency.get(org.base_currency, Decimal(0)),
            "currency": org.base_currency,
            "recovered_by_currency": by_currency,
            "contact_rate": round(reached / total, 4) if total else 0.0,
            "progress_percent": round(100.0 * reached / total, 1) if total else 0.0,
        }
    return out

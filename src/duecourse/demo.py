"""The demo organization of the embedded setup: templates, strategies, a campaign, debtors and invoices.

Loaded once (idempotent) by ``duecourse demo``. Deterministic: the same data on every machine.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from duecourse.campaigns.models import Campaign, CampaignStatus
from duecourse.ledger.derived import refresh_accounts
from duecourse.ledger.models import Account, AccountTag, Invoice, InvoiceStatus
from duecourse.messaging.models import Channel, Template
from duecourse.strategies.models import (
    ActionType,
    FirstActionLogic,
    MultiStageHandling,
    Stage,
    Strategy,
    StrategyType,
    TimingType,
    Tone,
    TriggerType,
)
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import Organization, Role, User
from duecourse.tenancy.principal import Principal

DEMO_ORG = "Demo Collections"
DEMO_EMAIL = "admin@demo.duecourse.dev"
DEMO_PASSWORD = "duecourse-demo"
DEMO_PAYMENT_LINK = "https://pay.example.com/demo/{account_external_id}?invoice={invoice_number}"

_FIRST = ["Ana", "Luis", "Marta", "Jorge", "Lucía", "Pablo", "Elena", "Diego", "Sara", "Hugo", "Clara", "Iván"]
_LAST = ["García", "Martínez", "López", "Sánchez", "Pérez", "Gómez", "Fernández", "Ruiz", "Díaz", "Moreno"]
_COMPANY = ["Talleres", "Distribuciones", "Construcciones", "Panadería", "Transportes", "Clínica", "Hostal"]
_ZONES = ["Europe/Madrid", "Europe/Madrid", "Europe/Madrid", "Atlantic/Canary", "America/Mexico_City"]


def demo_loaded(session: Session) -> bool:
    return session.scalar(select(User.id).where(User.email == DEMO_EMAIL)) is not None


def load_demo(session: Session, *, now: datetime, accounts: int = 60, seed: int = 7) -> Organization:
    """Create the demo organization and its data (call only when :func:`demo_loaded` is false)."""
    rng = random.Random(seed)
    org = tenancy.create_organization(session, name=DEMO_ORG, timezone="Europe/Madrid", base_currency="EUR", now=now)
    tenancy.create_user(
        session, organization_id=org.id, email=DEMO_EMAIL, password=DEMO_PASSWORD, role=Role.admin, name="Demo Admin", now=now
    )
    tenancy.update_settings(
        session,
        principal=Principal.system(org.id),
        patch={"automation": {"auto_enqueue": True}, "sandbox": {"simulate_outcomes": True, "seed": seed},
               # The demo's templates use {{ payment_link }}; without a configured link they would not be sent.
               "messages": {"payment_link": DEMO_PAYMENT_LINK}},
        now=now,
    )

    def template(name: str, channel: Channel, tone: Tone, body: str, subject: str | None = None) -> Template:
        t = Template(
            organization_id=org.id,
            name=name,
            channel=channel,
            tone=tone,
            subject=subject,
            body_text=body,
            body_html=None if channel != Channel.email else "<p>" + body.replace("\n\n", "</p><p>") + "</p>",
            created_at=now,
            updated_at=now,
        )
        session.add(t)
        return t

    reminder = template(
        "Friendly reminder",
        Channel.email,
        Tone.standard,
        "Hello {{ debtor_name }},\n\nInvoice {{ carrying_invoice_number }} for {{ carrying_invoice_amount }} "
        "{{ currency }} was due on {{ carrying_invoice_due_date }}. You can pay here: {{ payment_link }}\n\n"
        "Unsubscribe: {{ unsubscribe_link }}",
        subject="Invoice {{ carrying_invoice_number }}: payment reminder",
    )
    firm = template(
        "Firm notice",
        Channel.email,
        Tone.firm,
        # The high-balance strategy reaches debtors whose invoice is not due yet: say so, never "-5 days overdue".
        "Dear {{ debtor_name }},\n\nYour balance of {{ balance }} {{ currency }} "
        "{% if days_overdue and days_overdue > 0 %}is {{ days_overdue }} days overdue"
        "{% else %}falls due on {{ carrying_invoice_due_date }}{% endif %}. "
        "Please pay today: {{ payment_link }}\n\nUnsubscribe: {{ unsubscribe_link }}",
        subject="Action required: {{ balance }} {{ currency }} outstanding",
    )
    sms = template(
        "SMS nudge",
        Channel.sms,
        Tone.standard,
        "{{ organization_name }}: {{ balance }} {{ currency }} is overdue. Pay: {{ payment_link }}",
    )
    voice = template(
        "Voice script",
        Channel.voice,
        Tone.empathetic,
        "Call {{ debtor_name }} about {{ balance }} {{ currency }}; offer a payment plan if needed.",
    )
    session.flush()

    standard = Strategy(
        organization_id=org.id,
        name="Standard dunning",
        type=StrategyType.standard,
        description="Email at the due date, an SMS nudge, a firm email, a voice call, then an agent call.",
        active=True,
        multi_stage_handling=MultiStageHandling.run_all_in_order,
        first_action_logic=FirstActionLogic.contextualized,
        trigger_type=TriggerType.days_overdue,
        trigger_days=0,
        priority=10,
        automation_time="07:00",
        automation_days="mon,tue,wed,thu,fri,sat,sun",  # the demo works on weekends too
        created_at=now,
        updated_at=now,
        created_by=DEMO_EMAIL,
    )
    standard.stages = [
        Stage(position=0, action_type=ActionType.email, timing_type=TimingType.days_from_trigger, days=0, template_id=reminder.id),
        Stage(position=1, action_type=ActionType.sms, timing_type=TimingType.days_from_previous, days=3, template_id=sms.id),
        Stage(position=2, action_type=ActionType.email, timing_type=TimingType.days_from_previous, days=5, template_id=firm.id, tone=Tone.firm),
        Stage(
            position=3,
            action_type=ActionType.voice,
            timing_type=TimingType.days_from_previous,
            days=7,
            template_id=voice.id,
            max_retries=2,
            retry_delay_hours=24,
            step_timeout_hours=24,
        ),
        Stage(position=4, action_type=ActionType.phone_call, timing_type=TimingType.days_from_previous, days=7),
    ]
    high = Strategy(
        organization_id=org.id,
        name="High balance escalation",
        type=StrategyType.high_risk,
        description="For balances above 5,000 EUR: firm email, agent call, escalation, stop.",
        active=True,
        multi_stage_handling=MultiStageHandling.skip_to_latest,
        first_action_logic=FirstActionLogic.standard,
        trigger_type=TriggerType.amount_threshold,
        trigger_amount=Decimal("5000"),
        priority=5,
        automation_time="08:00",
        automation_days="mon,tue,wed,thu,fri,sat,sun",  # the demo works on weekends too
        created_at=now,
        updated_at=now,
        created_by=DEMO_EMAIL,
    )
    high.stages = [
        Stage(position=0, action_type=ActionType.email, timing_type=TimingType.days_from_trigger, days=0, template_id=firm.id, tone=Tone.firm),
        Stage(position=1, action_type=ActionType.phone_call, timing_type=TimingType.days_from_previous, days=3),
        Stage(position=2, action_type=ActionType.escalation, timing_type=TimingType.days_from_previous, days=7),
        Stage(position=3, action_type=ActionType.place_on_stop, timing_type=TimingType.days_from_previous, days=7),
    ]
    session.add_all([standard, high])
    session.flush()

    today = now.astimezone(ZoneInfo(org.timezone)).date()
    campaign = Campaign(
        organization_id=org.id,
        name="Q4 overdue push",
        objective="Recover invoices more than 30 days overdue before year end.",
        strategy_id=standard.id,
        start_date=today - timedelta(days=7),
        end_date=today + timedelta(days=60),
        status=CampaignStatus.active,
        created_at=now,
        updated_at=now,
        activated_at=now,
        created_by=DEMO_EMAIL,
    )
    session.add(campaign)
    session.flush()

    for i in range(1, accounts + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        business = rng.random() < 0.4
        name = f"{rng.choice(_COMPANY)} {last} S.L." if business else f"{first} {last}"
        acct = Account(
            organization_id=org.id,
            external_id=f"DEMO-{i:04d}",
            name=name,
            email=f"debtor{i}@example.com",
            phone=f"+346{rng.randrange(10_000_000, 99_999_999)}",
            whatsapp=f"+346{rng.randrange(10_000_000, 99_999_999)}" if rng.random() < 0.6 else None,
            timezone=rng.choice(_ZONES),
            language="es",
            currency="EUR",
            score=rng.randrange(5, 95),
            opt_out_sms=rng.random() < 0.05,
            created_at=now,
            updated_at=now,
        )
        in_campaign = i % 3 == 0
        if in_campaign:
            acct.campaign_id = campaign.id
            acct.campaign_joined_at = now
        session.add(acct)
        session.flush()
        if rng.random() < 0.2:
            session.add(AccountTag(account_id=acct.id, tag=rng.choice(["vip", "wholesale", "retail"]), organization_id=org.id))
        for n in range(rng.randrange(1, 4)):
            issue = today - timedelta(days=rng.randrange(5, 150))
            due = issue + timedelta(days=30)
            total = Decimal(rng.randrange(8_000, 900_000)) / 100
            paid = Decimal(0) if rng.random() < 0.8 else (total / 2).quantize(Decimal("0.01"))
            session.add(
                Invoice(
                    organization_id=org.id,
                    account_id=acct.id,
                    external_id=f"DEMO-INV-{i:04d}-{n + 1}",
                    number=f"F{2026}-{i:04d}{n + 1}",
                    currency="EUR",
                    total=total,
                    amount_paid=paid,
                    issue_date=issue,
                    due_date=due,
                    status=InvoiceStatus.open,
                    disputed=rng.random() < 0.04,
                    created_at=now,
                    updated_at=now,
                )
            )
    session.flush()
    refresh_accounts(session, organization_id=org.id, exclusions=tenancy.get_settings(session, org.id).exclusions, now=now)
    return org


"""Derived account values (SPEC §2, §6, §4.11): balance, carrying invoice, days overdue, tabs, exclusions."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from ledger_helpers import account, make_account, make_invoice, make_payment
from sqlalchemy import select

from duecourse.ledger import derived
from duecourse.ledger.models import Account, AccountStatus
from duecourse.strategies.models import (
    FirstActionLogic,
    MultiStageHandling,
    Strategy,
    StrategyType,
    TriggerType,
)
from duecourse.tenancy.service import get_settings

API = "/api/v1"


def test_balance_counts_only_open_undisputed_unpaid_amounts(org):
    a = make_account(org)
    make_invoice(org, a["id"], "100.10", due="2026-01-10")  # open: 100.10
    make_invoice(org, a["id"], "50.00", due="2026-01-11", amount_paid="20.05")  # open, partly paid: 29.95
    make_invoice(org, a["id"], "999.99", due="2026-01-01", disputed=True)  # disputed: gross only
    make_invoice(org, a["id"], "70.00", due="2025-12-31", status="void")  # void: nothing
    make_invoice(org, a["id"], "80.00", due="2025-12-30", status="paid")  # paid: nothing
    make_invoice(org, a["id"], "0.01", due="2026-02-01")  # the smallest unit counts
    acc = account(org, a["id"])
    assert acc["balance"] == "130.06"
    assert acc["gross_open"] == "1130.05"
    assert acc["carrying_due_date"] == "2026-01-10"  # disputed, void and paid invoices never carry
    assert acc["status"] == "unassigned" and acc["collection_tab"] == "outstanding"


def test_carrying_invoice_is_oldest_by_due_date_then_lowest_number(org):
    a = make_account(org)
    make_invoice(org, a["id"], "10", due="2026-01-20", number="A-001")
    b = make_invoice(org, a["id"], "10", due="2026-01-15", number="INV-0200")
    c = make_invoice(org, a["id"], "10", due="2026-01-15", number="INV-0100")
    acc = account(org, a["id"])
    assert acc["carrying_invoice_id"] == c["id"] and acc["carrying_due_date"] == "2026-01-15"
    # when it is paid, the next one carries
    make_payment(org, a["id"], "10", invoice_id=c["id"])
    assert account(org, a["id"])["carrying_invoice_id"] == b["id"]
    # an older invoice arriving later takes over
    d = make_invoice(org, a["id"], "10", due="2026-01-05", number="Z-1")
    assert account(org, a["id"])["carrying_invoice_id"] == d["id"]
    org.post(f"{API}/invoices/{d['id']}/dispute")
    assert account(org, a["id"])["carrying_invoice_id"] == b["id"]


def test_days_overdue_counts_from_the_accounts_own_today(org, clock):
    clock.set(datetime(2026, 3, 2, 20, 30, tzinfo=UTC))  # Tokyo: 05:30 on 03-03; Madrid: 21:30 on 03-02
    tokyo = make_account(org, timezone="Asia/Tokyo")
    utc = make_account(org, timezone="UTC")
    madrid = make_account(org)  # the organization's zone
    honolulu = make_account(org, timezone="Pacific/Honolulu")  # 10:30 on 03-02
    for acc in (tokyo, utc, madrid, honolulu):
        make_invoice(org, acc["id"], "10", due="2026-03-02")
    future = make_account(org, timezone="Asia/Tokyo")
    make_invoice(org, future["id"], "10", due="2026-03-10")

    assert account(org, tokyo["id"])["days_overdue"] == 1
    assert account(org, utc["id"])["days_overdue"] == 0
    assert account(org, madrid["id"])["days_overdue"] == 0
    assert account(org, honolulu["id"])["days_overdue"] == 0
    assert account(org, future["id"])["days_overdue"] == -7  # negative before it is due
    assert make_account(org)["days_overdue"] is None  # no carrying invoice

    def ids(**params):
        return {x["id"] for x in org.get(f"{API}/accounts", params=params).json()["items"]}

    # the SQL filter agrees with the computed value, zone by zone
    assert ids(min_days_overdue=1) == {tokyo["id"]}
    assert ids(min_days_overdue=0, max_days_overdue=0) == {utc["id"], madrid["id"], honolulu["id"]}
    assert ids(max_days_overdue=-7) == {future["id"]}
    listed = {x["id"]: x["days_overdue"] for x in org.get(f"{API}/accounts").json()["items"]}
    assert listed[tokyo["id"]] == 1 and listed[future["id"]] == -7

    clock.set(datetime(2026, 3, 3, 0, 30, tzinfo=UTC))  # UTC and Madrid roll over; Honolulu still on 03-02
    assert account(org, utc["id"])["days_overdue"] == 1
    assert account(org, madrid["id"])["days_overdue"] == 1
    assert account(org, honolulu["id"])["days_overdue"] == 0
    assert ids(min_days_overdue=1) == {tokyo["id"], utc["id"], madrid["id"]}


def test_local_today_expression_matches_python_in_every_zone(org, db):
    zones = ["Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns", "UTC"]
    ids = {make_account(org, timezone=z)["id"]: z for z in zones}
    ids[make_account(org)["id"]] = "Europe/Madrid"  # no zone of its own: the organization's
    for now in (
        datetime(2026, 3, 2, 10, 50, tzinfo=UTC),  # three local dates at once somewhere on earth
        datetime(2026, 3, 2, 18, 15, tzinfo=UTC),  # Kathmandu (+05:45) just past midnight
        datetime(2026, 3, 2, 18, 14, tzinfo=UTC),  # ... and one minute before
        datetime(2026, 3, 2, 23, 59, tzinfo=UTC),
    ):
        with db.transaction() as s:
            expr = derived.local_today_expr(s, organization_id=org.id, org_timezone="Europe/Madrid", now=now)
            got = dict(s.execute(select(Account.id, expr).where(Account.organization_id == org.id)).all())
        for account_id, zone in ids.items():
            assert got[account_id] == now.astimezone(ZoneInfo(zone)).date(), (zone, now)


def _strategy(s, org_id: int) -> int:
    st = Strategy(
        organization_id=org_id,
        name="Standard",
        type=StrategyType.standard,
        description="d",
        active=True,
        multi_stage_handling=MultiStageHandling.run_all_in_order,
        first_action_logic=FirstActionLogic.standard,
        trigger_type=TriggerType.days_overdue,
        trigger_days=0,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        updated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    s.add(st)
    s.flush()
    return st.id


def _engine_sets(db, org, clock, states):
    """Put accounts in engine states directly (the engine owns them), then recompute as the engine does."""
    with db.transaction() as s:
        strategy_id = _strategy(s, org.id)
        for account_id, status in states.items():
            acc = s.get(Account, account_id)
            acc.status = status
            acc.strategy_id = strategy_id
        derived.refresh_accounts(
            s, organization_id=org.id, exclusions=get_settings(s, org.id).exclusions, now=clock.now(), account_ids=list(states)
        )


def test_each_account_with_money_owed_sits_in_exactly_one_tab(org, db, clock):
    def owing(**fields):
        a = make_account(org, **fields)
        make_invoice(org, a["id"], "100")
        return a["id"]

    outstanding = owing()
    scheduled = owing()
    engaged = {s: owing() for s in ("in_auto_management", "callback_pending", "promise_pending", "promise_overdue")}
    follow_up = owing()
    blocked_by_hand = owing(blocked=True, blocked_reason="lawyer")
    blocked_in_strategy = owing()
    paid_up = make_account(org)["id"]
    _engine_sets(
        db,
        org,
        clock,
        {
            scheduled: AccountStatus.pending_contact,
            **{i: AccountStatus(s) for s, i in engaged.items()},
            follow_up: AccountStatus.sequence_completed,
            blocked_in_strategy: AccountStatus.in_auto_management,
        },
    )
    org.post(f"{API}/accounts/{blocked_in_strategy}/block", json={"reason": "complaint"})

    tab = {i: account(org, i)["collection_tab"] for i in [outstanding, scheduled, *engaged.values(), follow_up]}
    assert tab[outstanding] == "outstanding" and tab[scheduled] == "scheduled" and tab[follow_up] == "follow_up"
    assert {tab[i] for i in engaged.values()} == {"engaged"}
    assert account(org, blocked_by_hand)["collection_tab"] == "blocked"
    assert account(org, blocked_in_strategy)["collection_tab"] == "blocked"
    assert account(org, paid_up)["collection_tab"] is None
    assert org.get(f"{API}/auto-collection/tabs").json() == {
        "outstanding": 1,
        "scheduled": 1,
        "engaged": 4,
        "follow_up": 1,
        "blocked": 2,
    }
    listed = {x["id"] for x in org.get(f"{API}/accounts", params={"collection_tab": "engaged"}).json()["items"]}
    assert listed == set(engaged.values())
    # unblocking returns the account to where the engine has it
    org.post(f"{API}/accounts/{blocked_in_strategy}/unblock")
    assert account(org, blocked_in_strategy)["collection_tab"] == "engaged"
    # paying off leaves every tab
    make_payment(org, follow_up, "100")
    assert account(org, follow_up)["collection_tab"] is None
    assert org.get(f"{API}/auto-collection/tabs").json()["follow_up"] == 0


def test_exclusion_rules_and_their_recompute(org, db, clock):
    small = make_account(org)
    make_invoice(org, small["id"], "20.00")
    big = make_account(org)
    make_invoice(org, big["id"], "500.00")
    tagged = make_account(org, tags=["legal"])
    make_invoice(org, tagged["id"], "500.00")
    only_disputed = make_account(org)
    make_invoice(org, only_disputed["id"], "300.00", disputed=True)
    mixed = make_account(org)
    make_invoice(org, mixed["id"], "300.00", disputed=True)
    make_invoice(org, mixed["id"], "30.00")
    _engine_sets(db, org, clock, {big["id"]: AccountStatus.in_auto_management})

    def tabs():
        return {
            name: account(org, x["id"])["collection_tab"]
            for name, x in (("small", small), ("big", big), ("tagged", tagged), ("only_disputed", only_disputed), ("mixed", mixed))
        }

    # defaults: only-disputed accounts are excluded (and resolved: nothing undisputed is owed)
    assert tabs() == {"small": "outstanding", "big": "engaged", "tagged": "outstanding", "only_disputed": "blocked", "mixed": "outstanding"}
    assert account(org, only_disputed["id"])["status"] == "resolved"

    r = org.patch(f"{API}/settings", json={"exclusions": {"min_balance": "50", "excluded_tags": ["legal"]}})
    assert r.status_code == 200, r.text
    assert tabs() == {"small": "blocked", "big": "engaged", "tagged": "blocked", "only_disputed": "blocked", "mixed": "blocked"}
    assert org.get(f"{API}/auto-collection/tabs").json() == {
        "outstanding": 0,
        "scheduled": 0,
        "engaged": 1,
        "follow_up": 0,
        "blocked": 4,
    }

    org.patch(f"{API}/settings", json={"exclusions": {"min_balance": "0", "excluded_tags": [], "exclude_only_disputed": False}})
    # nothing excludes any more; owing only disputed money still counts as money outstanding
    assert tabs() == {"small": "outstanding", "big": "engaged", "tagged": "outstanding", "only_disputed": "outstanding", "mixed": "outstanding"}

    # the rules follow the account's own changes too
    org.patch(f"{API}/settings", json={"exclusions": {"min_balance": "25", "excluded_tags": ["x"]}})
    assert account(org, small["id"])["collection_tab"] == "blocked"
    assert account(org, tagged["id"])["collection_tab"] == "outstanding"
    org.patch(f"{API}/accounts/{tagged['id']}", json={"tags": ["legal", "x"]})
    assert account(org, tagged["id"])["collection_tab"] == "blocked"
    make_invoice(org, small["id"], "10.00")  # balance 30 >= 25
    assert account(org, small["id"])["collection_tab"] == "outstanding"
    # a settings change outside the exclusions leaves tabs alone (and is still fine)
    assert org.patch(f"{API}/settings", json={"automation": {"auto_enqueue": True}}).status_code == 200
    assert account(org, tagged["id"])["collection_tab"] == "blocked"


def test_the_minimum_balance_is_in_the_base_currency_and_converted_with_the_rates(org):
    """min_balance 25 (the organization's EUR): a debtor owing 1,000 JPY (about 6 EUR) is below it,
    one owing 20 KWD (about 60 EUR) is not, whatever the bare numbers say (§6)."""
    yen = make_account(org, currency="JPY")
    make_invoice(org, yen["id"], "1000")
    dinar = make_account(org, currency="KWD")
    make_invoice(org, dinar["id"], "20.000")
    euro = make_account(org)
    make_invoice(org, euro["id"], "20.00")
    no_rate = make_account(org, currency="USD")
    make_invoice(org, no_rate["id"], "30.00")

    def tabs():
        return [account(org, a["id"])["collection_tab"] for a in (yen, dinar, euro, no_rate)]

    r = org.patch(f"{API}/settings", json={"exclusions": {"min_balance": "25"}})
    assert r.status_code == 200, r.text
    # Without exchange rates the bare number is all there is.
    assert tabs() == ["outstanding", "blocked", "blocked", "outstanding"]
    # With rates (base-currency value of one unit), each balance is compared in its own currency;
    # a currency without a rate keeps the bare number.
    r = org.patch(f"{API}/settings", json={"exchange_rates": {"JPY": "0.0062", "KWD": "3.00"}})
    assert r.status_code == 200, r.text
    assert tabs() == ["blocked", "outstanding", "blocked", "outstanding"]
    # The engine's own refreshes see the same rule: a new invoice moves the yen debtor over it.
    make_invoice(org, yen["id"], "4000")  # 5,000 JPY: about 31 EUR
    assert tabs()[0] == "outstanding"
    # A new base currency moves the minimum with it: 25 KWD now, and the dinar debtor's 20 KWD is
    # below it (the rates stay as entered: base-currency value of one unit).
    r = org.patch(f"{API}/organization", json={"base_currency": "KWD"})
    assert r.status_code == 200, r.text
    assert tabs() == ["outstanding", "blocked", "blocked", "outstanding"]

"""Pure time and stage rules of the engine (SPEC §4.4, §4.5, §4.7), including DST and property tests."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from duecourse.engine.stages import StageSpec, due_dates, first_stage, offsets, stages_to_enqueue
from duecourse.engine.timing import (
    earliest_within_limit,
    into_allowed_hours,
    is_allowed,
    next_automation_slot,
    weekday_set,
)

MON_FRI = weekday_set("mon,tue,wed,thu,fri")


def utc(*a):
    return datetime(*a, tzinfo=UTC)


def test_automation_slot_same_day_later_or_next_working_day():
    # 2026-03-06 is a Friday. Madrid is UTC+1 in March before the 29th.
    assert next_automation_slot(utc(2026, 3, 6, 5), tz="Europe/Madrid", at="07:00", days=MON_FRI) == utc(2026, 3, 6, 6)
    # Friday after the slot -> Monday 07:00 local
    assert next_automation_slot(utc(2026, 3, 6, 6, 1), tz="Europe/Madrid", at="07:00", days=MON_FRI) == utc(2026, 3, 9, 6)
    # Saturday due date with Mon-Fri automation -> Monday
    sat = utc(2026, 3, 7, 0)
    assert next_automation_slot(sat, tz="Europe/Madrid", at="07:00", days=MON_FRI) == utc(2026, 3, 9, 6)
    # exactly at the slot is the slot
    assert next_automation_slot(utc(2026, 3, 9, 6), tz="Europe/Madrid", at="07:00", days=MON_FRI) == utc(2026, 3, 9, 6)


def test_automation_slot_across_dst_change():
    # Madrid moves to UTC+2 on Sunday 2026-03-29: Monday 07:00 local is 05:00 UTC.
    assert next_automation_slot(utc(2026, 3, 27, 6, 30), tz="Europe/Madrid", at="07:00", days=MON_FRI) == utc(2026, 3, 30, 5)
    # A slot inside the spring-forward gap (02:30 does not exist) moves forward by the gap: 03:30.
    every_day = weekday_set("mon,tue,wed,thu,fri,sat,sun")
    got = next_automation_slot(utc(2026, 3, 28, 23), tz="Europe/Madrid", at="02:30", days=every_day)
    assert got == utc(2026, 3, 29, 1, 30)  # 03:30 local summer time


def test_allowed_hours_in_debtor_timezone():
    sms = dict(start="08:00", end="20:00", days=["mon", "tue", "wed", "thu", "fri", "sat"])
    # 07:00 UTC Monday is 02:00 in New York (UTC-5): wait until 08:00 local = 13:00 UTC.
    assert into_allowed_hours(utc(2026, 3, 2, 7), tz="America/New_York", **sms) == utc(2026, 3, 2, 13)
    # Inside the window: unchanged.
    assert into_allowed_hours(utc(2026, 3, 2, 15), tz="America/New_York", **sms) == utc(2026, 3, 2, 15)
    # Saturday 21:00 local -> Sunday is not allowed -> Monday 08:00 local.
    sat_evening = utc(2026, 3, 8, 2)  # Sat 21:00 in New York (still EST)
    assert into_allowed_hours(sat_evening, tz="America/New_York", **sms) == utc(2026, 3, 9, 12)  # EDT from Mar 8
    email = dict(start="00:00", end="24:00", days=list(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]))
    assert is_allowed(utc(2026, 3, 8, 3, 33), tz="Asia/Tokyo", **email)


@settings(max_examples=200, deadline=None)
@given(
    at=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2028, 1, 1), timezones=st.just(UTC)),
    tz=st.sampled_from(["UTC", "Europe/Madrid", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "Pacific/Apia"]),
    start_h=st.integers(0, 22),
    length=st.integers(1, 24),
    days=st.sets(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1),
)
def test_allowed_hours_result_is_allowed_and_earliest(at, tz, start_h, length, days):
    end_h = min(24, start_h + length)
    rule = dict(start=f"{start_h:02d}:00", end=f"{end_h:02d}:00", days=sorted(days))
    got = into_allowed_hours(at, tz=tz, **rule)
    assert got >= at
    assert is_allowed(got, tz=tz, **rule)
    # Nothing earlier (checked at a 15-minute grain) was allowed.
    probe = at
    while probe < got - timedelta(minutes=15):
        probe += timedelta(minutes=15)
        assert not is_allowed(probe, tz=tz, **rule) or probe >= got


@settings(max_examples=200, deadline=None)
@given(
    offsets_h=st.lists(st.integers(0, 24 * 7 * 2), max_size=20),
    per_day=st.one_of(st.none(), st.integers(1, 4)),
    per_week=st.one_of(st.none(), st.integers(1, 10)),
)
def test_frequency_limit_earliest_time_respects_both_windows(offsets_h, per_day, per_week):
    now = utc(2026, 3, 15, 12)
    contacts = [now - timedelta(hours=h) for h in offsets_h]
    t = earliest_within_limit(now, contacts, per_day=per_day, per_week=per_week)
    assert t >= now

    def ok(at):
        day = sum(1 for c in contacts if c > at - timedelta(days=1))
        week = sum(1 for c in contacts if c > at - timedelta(days=7))
        return (per_day is None or day < per_day) and (per_week is None or week < per_week)

    assert ok(t)
    if t > now:
        assert not ok(t - timedelta(seconds=1))


def test_frequency_limit_defaults_one_a_day():
    now = utc(2026, 3, 2, 12)
    sent = [utc(2026, 3, 2, 9)]
    assert earliest_within_limit(now, sent, per_day=1, per_week=None) == utc(2026, 3, 3, 9)
    assert earliest_within_limit(now, [], per_day=1, per_week=None) == now


S = lambda i, timing, days, action="email": StageSpec(i, action, timing, days)  # noqa: E731


def test_offsets_and_first_action_seed_004_example():
    stages = [S(0, "days_from_trigger", 0), S(1, "days_from_previous", 8), S(2, "days_from_previous", 7), S(3, "days_from_trigger", 30)]
    offs = offsets(stages)
    assert offs == [0, 8, 15, 30]
    # Invoice 18 days past anchor enters at the stage with offset 15.
    assert first_stage("contextualized", offs, 18) == 2
    assert first_stage("contextualized", offs, 7) == 0
    assert first_stage("contextualized", offs, 45) == 3
    assert first_stage("standard", offs, 18) == 0


def test_standard_logic_skips_pre_trigger_reminders_for_overdue_invoice():
    offs = [-3, 0, 7]
    assert first_stage("standard", offs, 0) == 0  # on the anchor date the reminder still applies
    assert first_stage("standard", offs, 5) == 1  # already past the anchor: skip the "almost due"
    assert first_stage("contextualized", offs, -10) == 0  # nothing past yet: the first stage


def test_due_dates_and_multi_stage_modes_after_downtime():
    stages = [S(0, "days_from_trigger", 0), S(1, "days_from_previous", 2), S(2, "days_from_previous", 3), S(3, "days_from_previous", 10)]
    anchor = date(2026, 3, 2)
    due = due_dates(stages, start=0, anchor=anchor, prev_completed=None)
    assert due == [date(2026, 3, 2), date(2026, 3, 4), date(2026, 3, 7), date(2026, 3, 17)]
    today = date(2026, 3, 9)  # a week of downtime: stages 0-2 are due
    assert stages_to_enqueue("run_all_in_order", due, 0, today) == ([0, 1, 2], [])
    assert stages_to_enqueue("skip_to_latest", due, 0, today) == ([2], [0, 1])
    assert stages_to_enqueue("one_per_run", due, 0, today) == ([0], [])
    # Nothing due: the next stage for its future date.
    assert stages_to_enqueue("run_all_in_order", due, 0, date(2026, 3, 1)) == ([0], [])
    # After stage 1 really completed on the 6th, stage 2 counts from then (days_from_previous).
    later = due_dates(stages, start=2, anchor=anchor, prev_completed=date(2026, 3, 6))
    assert later == [date(2026, 3, 9), date(2026, 3, 19)]
    # Adaptive timing halves the delay of the next stage (3 days -> 2, rounding half up).
    assert due_dates(stages, start=2, anchor=anchor, prev_completed=date(2026, 3, 6), delay_factor=0.5)[0] == date(2026, 3, 8)


def test_new_case_counts_the_next_delay_from_its_first_action_not_from_old_dates():
    stages = [S(0, "days_from_trigger", 2), S(1, "days_from_previous", 7), S(2, "days_from_trigger", 20)]
    anchor = date(2026, 2, 6)
    # Opened today (3 March): stage 1 chains from the opening day; stage 2 stays anchor + 20.
    assert due_dates(stages, start=0, anchor=anchor, prev_completed=None, opened=date(2026, 3, 3)) == [
        date(2026, 2, 8), date(2026, 3, 10), date(2026, 2, 26)]
    # Opened long ago (downtime): the chain is the nominal one.
    assert due_dates(stages, start=0, anchor=anchor, prev_completed=None, opened=date(2026, 2, 6))[1] == date(2026, 2, 15)


def test_allowed_hours_ending_in_the_spring_forward_gap_close_before_it():
    """New York, allowed 00:00-02:30 on Sunday 2024-03-10, when 02:00 jumps to 03:00: 02:30 never
    shows on the clock, and 03:10 (after it) is not allowed; 01:30 still is."""
    from duecourse.engine.timing import is_allowed

    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    ny = "America/New_York"
    assert is_allowed(datetime(2024, 3, 10, 6, 30, tzinfo=UTC), tz=ny, start="00:00", end="02:30", days=days)  # 01:30 EST
    assert is_allowed(datetime(2024, 3, 10, 6, 59, tzinfo=UTC), tz=ny, start="00:00", end="02:30", days=days)  # 01:59 EST
    assert not is_allowed(datetime(2024, 3, 10, 7, 0, tzinfo=UTC), tz=ny, start="00:00", end="02:30", days=days)  # 03:00 EDT
    assert not is_allowed(datetime(2024, 3, 10, 7, 10, tzinfo=UTC), tz=ny, start="00:00", end="02:30", days=days)  # 03:10 EDT
    # In the autumn 01:30 shows twice: the window closes the first time.
    assert not is_allowed(datetime(2024, 11, 3, 5, 40, tzinfo=UTC), tz=ny, start="00:00", end="01:30", days=days)  # 01:40 EDT
    assert is_allowed(datetime(2024, 11, 3, 5, 20, tzinfo=UTC), tz=ny, start="00:00", end="01:30", days=days)  # 01:20 EDT

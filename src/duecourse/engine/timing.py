"""Time rules of the engine, as pure functions (SPEC §4.5, §4.7, §4.11).

Every function takes and returns timezone-aware UTC datetimes; local calendars (the organization's
for automation slots, the debtor's for allowed hours) are applied inside. Nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def parse_hhmm(value: str) -> time | None:
    """``HH:MM`` as a time; ``24:00`` (end of day) as None."""
    if value == "24:00":
        return None
    h, m = value.split(":")
    return time(int(h), int(m))


def weekday_set(days: Iterable[str] | str) -> frozenset[int]:
    """``"mon,tue"`` or ``["mon", "tue"]`` as Python weekday numbers (Monday = 0)."""
    items = days.split(",") if isinstance(days, str) else list(days)
    return frozenset(WEEKDAYS.index(d.strip()) for d in items if d.strip())


@lru_cache(maxsize=1024)  # the same few instants and zones, item after item of a dispatch batch
def local_date(at: datetime, tz: str) -> date:
    """The calendar date of ``at`` in ``tz`` ("today" for that organization or debtor)."""
    return at.astimezone(zone(tz)).date()


def at_local(day: date, t: time | None, tz: str) -> datetime:
    """The UTC instant of local ``day`` at ``t`` (None = the end of that day) in ``tz``.

    Local times that do not exist (the spring-forward gap) move forward by the length of the gap
    (02:30 becomes 03:30); ambiguous ones (the autumn fold) take their first occurrence.
    """
    if t is None:
        return at_local(day + timedelta(days=1), time(0, 0), tz)
    return datetime.combine(day, t).replace(tzinfo=zone(tz), fold=0).astimezone(UTC)


def close_local(day: date, t: time | None, tz: str) -> datetime:
    """The UTC instant at which a window ending at local ``day`` ``t`` closes: as :func:`at_local`,
    except that an end the clock skips (the spring-forward gap: 02:30 when 02:00 jumps to 03:00)
    closes at the jump, and one it shows twice (the autumn fold) at its first showing, so a window
    never stays open past the time it says."""
    if t is None:
        return close_local(day + timedelta(days=1), time(0, 0), tz)
    local = datetime.combine(day, t).replace(tzinfo=zone(tz))
    first, second = local.replace(fold=0).astimezone(UTC), local.replace(fold=1).astimezone(UTC)
    if first == second or first.astimezone(zone(tz)).replace(tzinfo=None) == local.replace(tzinfo=None):
        return min(first, second)  # an ordinary time, or the fold
    # The gap: the jump lies between the two readings; find it to the minute.
    lo, hi = min(first, second), max(first, second)
    after = hi.astimezone(zone(tz)).utcoffset()
    while hi - lo > timedelta(minutes=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone(tz)).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return hi.replace(second=0, microsecond=0)


def next_automation_slot(after: datetime, *, tz: str, at: str, days: frozenset[int]) -> datetime:
    """The first instant ≥ ``after`` that is on an automation day at the automation time, in ``tz``
    (SPEC §4.5: a queue item's scheduled time starts from the strategy's automation slots)."""
    if not days:
        raise ValueError("a strategy needs at least one automation day")
    t = parse_hhmm(at) or time(0, 0)
    start = local_date(after, tz)
    for i in range(8):
        day = start + timedelta(days=i)
        if day.weekday() in days:
            slot = at_local(day, t, tz)
            if slot >= after:
                return slot
    raise AssertionError("unreachable: a week always contains an automation day")


def into_allowed_hours(at: datetime, *, tz: str, start: str, end: str, days: Sequence[str] | frozenset[int]) -> datetime:
    """The first instant ≥ ``at`` inside the channel's allowed hours and days in the debtor's
    time zone ``tz`` (SPEC §4.7). ``at`` itself when it is already allowed."""
    allowed = days if isinstance(days, frozenset) else weekday_set(days)
    if not allowed:
        raise ValueError("allowed hours need at least one day")
    t_start = parse_hhmm(start) or time(0, 0)
    t_end = parse_hhmm(end)
    first = local_date(at, tz)
    for i in range(9):
        day = first + timedelta(days=i)
        if day.weekday() not in allowed:
            continue
        open_at = at_local(day, t_start, tz)
        close_at = close_local(day, t_end, tz)
        if at < open_at:
            return open_at
        if at < close_at:
            return at
    raise AssertionError("unreachable: a week always contains an allowed day")


def is_allowed(at: datetime, *, tz: str, start: str, end: str, days: Sequence[str] | frozenset[int]) -> bool:
    return into_allowed_hours(at, tz=tz, start=start, end=end, days=days) == at


# What ``earliest_within_limit`` answers for a limit of 0: no time ever allows a contact.
NEVER = datetime.max.replace(tzinfo=UTC)


def earliest_within_limit(
    now: datetime, contacts: Sequence[datetime], *, per_day: int | None, per_week: int | None
) -> datetime:
    """The earliest instant ≥ ``now`` at which one more contact keeps both rolling windows
    (the last 24 hours and the last 7 days) within their limits (SPEC §4.7). ``now`` if allowed.

    ``contacts`` are the instants of earlier contacts that count toward this limit.
    """
    if not contacts and (per_day is None or per_day > 0) and (per_week is None or per_week > 0):
        return now  # nothing to count (most accounts on most days)
    earliest = now
    for limit, window in ((per_day, timedelta(days=1)), (per_week, timedelta(days=7))):
        if limit is None:
            continue
        if limit <= 0:
            return NEVER
        recent = sorted(c for c in contacts if c > now - window)
        excess = len(recent) - limit + 1
        if excess > 0:
            # Once the `excess` oldest contacts leave the window, one more is allowed.
            earliest = max(earliest, recent[excess - 1] + window)
    return earliest


def last_automation_slot(now: datetime, *, tz: str, at: str, days: frozenset[int]) -> datetime | None:
    """The latest automation slot at or before ``now`` within the past week (None if there is none)."""
    t = parse_hhmm(at) or time(0, 0)
    today = local_date(now, tz)
    for i in range(8):
        day = today - timedelta(days=i)
        if day.weekday() in days:
            slot = at_local(day, t, tz)
            if slot <= now:
                return slot
    return None

"""Stage arithmetic of a strategy, as pure functions (SPEC §3 offsets, §4.4 first action, §4.5).

A stage's *offset* is its distance in days from the case's anchor date: a ``days_from_trigger``
stage's offset is its days; a ``days_from_previous`` stage's offset is the previous stage's offset
plus its days.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta


@dataclass(frozen=True)
class StageSpec:
    """What the engine needs to know about one stage."""

    index: int
    action: str
    timing: str  # days_from_trigger | days_from_previous
    days: int


def offsets(stages: Sequence[StageSpec]) -> list[int]:
    out: list[int] = []
    for s in stages:
        if s.timing == "days_from_trigger" or not out:
            out.append(s.days)
        else:
            out.append(out[-1] + s.days)
    return out


def first_stage(logic: str, stage_offsets: Sequence[int], days_since_anchor: int) -> int:
    """The index of the first stage of a new case (SPEC §4.4).

    ``standard``: stage 0, but when the invoice is already past the anchor date (``days_since_anchor``
    > 0) the first stage with offset ≥ 0, so a pre-trigger reminder is not sent for an overdue invoice.
    ``contextualized``: the stage with the largest offset ≤ ``days_since_anchor`` (the closest past
    action; the first of several with that offset); stage 0 if none.
    """
    if not stage_offsets:
        raise ValueError("a strategy has at least one stage")
    if logic == "contextualized":
        best: int | None = None
        for i, off in enumerate(stage_offsets):
            if off <= days_since_anchor and (best is None or off > stage_offsets[best]):
                best = i
        return 0 if best is None else best
    if days_since_anchor > 0:
        for i, off in enumerate(stage_offsets):
            if off >= 0:
                return i
    return 0


def scaled_days(days: int, factor: float | None) -> int:
    """A ``days_from_previous`` delay after adaptive timing (§4.8), in whole days, half rounding up."""
    if factor is None:
        return days
    return max(0, int(days * factor + 0.5))


def due_dates(
    stages: Sequence[StageSpec],
    *,
    start: int,
    anchor: date,
    prev_completed: date | None,
    opened: date | None = None,
    delay_factor: float | None = None,
) -> list[date]:
    """Due dates of stages ``start``, ``start+1``, … as the case would meet them if each completed on
    its due date. The first counts from the previous stage's real completion when there is one
    (``days_from_previous``); the rest chain from their predecessor's due date, but never from a day
    before the case opened (``opened``): a new case waits for its first action before counting the
    delay to the next, while a catch-up after downtime sees every stage that fell due meanwhile
    (§4.4, §4.10). ``days_from_trigger`` stages are always the anchor plus their days."""
    offs = offsets(stages)
    out: list[date] = []
    for k in range(start, len(stages)):
        s = stages[k]
        if s.timing == "days_from_trigger" or k == 0:
            due = anchor + timedelta(days=s.days)
        elif k == start:
            base = prev_completed if prev_completed is not None else anchor + timedelta(days=offs[k - 1])
            due = base + timedelta(days=scaled_days(s.days, delay_factor))
        else:
            base = out[-1] if opened is None else max(out[-1], opened)
            due = base + timedelta(days=s.days)
        out.append(due)
    return out


def stages_to_enqueue(handling: str, due: Sequence[date], start: int, today: date) -> tuple[list[int], list[int]]:
    """Which stages to enqueue now and which to record as skipped (SPEC §4.5).

    ``due[i]`` is the due date of stage ``start + i``. Stages due by ``today`` are "due". With none due
    the next stage is enqueued for its (future) due date.
    """
    if not due:
        return [], []
    n_due = 0
    for d in due:
        if d <= today:
            n_due += 1
        else:
            break
    if n_due <= 1:
        return [start], []
    indices = list(range(start, start + n_due))
    if handling == "skip_to_latest":
        return [indices[-1]], indices[:-1]
    if handling == "one_per_run":
        return [indices[0]], []
    return indices, []


def waits_for_reply(action: str, max_retries: int | None) -> bool:
    """A WhatsApp stage with retries is a conversation attempt (§3: retries and a step timeout for
    ``voice`` and ``whatsapp``): it completes when the debtor replies or an outcome is reported, and
    after ``step_timeout_hours`` without either it counts as unanswered and is retried (§4.8). A
    WhatsApp stage without retries has nothing to wait for: it completes when the provider accepts
    the message, like SMS (§4.8)."""
    return action == "whatsapp" and (max_retries or 0) > 0

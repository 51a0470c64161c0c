"""Long-running engine processes (SPEC §4.10, §9): the scheduler loop, the worker loop, and both
together in a background thread for the embedded ``serve``/``demo``."""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from datetime import datetime

from sqlalchemy import select

from duecourse.channels.registry import Providers
from duecourse.clock import Clock
from duecourse.config import get_settings as app_settings
from duecourse.db import Database
from duecourse.engine.cycle import run_scheduled
from duecourse.engine.dispatch import ProviderFactory, run_due
from duecourse.events.service import deliver_due
from duecourse.tenancy.models import Organization
from duecourse.tenancy.service import get_settings

log = logging.getLogger("duecourse.engine")


# Young-generation threshold of an engine process (Python's default: 700). A dispatch batch allocates
# tens of thousands of short-lived objects (ORM rows, dicts, rendered texts); at 700 the collector
# ran about 57 times per thousand items and took a twentieth of a worker's CPU, mostly walking the
# batch's objects that were still alive. At 50,000 it runs about once per twenty thousand items.
# Cyclic garbage waits a little longer for collection: a few MB (the peak RSS of a dispatch worker
# went from 119 to 123 MB).
GC_THRESHOLD = (50_000, 20, 20)


def freeze_startup_heap() -> None:
    """Take what start-up allocated (modules, settings, the app) out of the garbage collector's
    sight, and let it run less often (``GC_THRESHOLD``). An engine process allocates and drops
    thousands of objects per dispatch batch; without this, every full collection walks the whole
    start-up heap again: about a sixth of a dispatch worker's CPU (docs/benchmarks.md). Call once,
    when start-up is done."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def worker_name(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"


def scheduler_pass(db: Database, *, now: datetime, worker: str, last_run: dict[int, datetime]) -> int:
    """One pass: each organization whose interval has elapsed gets its scheduled work. Returns how many."""
    with db.transaction() as session:
        org_ids = session.scalars(select(Organization.id)).all()
    ran = 0
    for org_id in org_ids:
        with db.transaction() as session:
            interval = get_settings(session, org_id).automation.scheduler_interval_minutes
            previous = last_run.get(org_id)
            if previous is not None and (now - previous).total_seconds() < interval * 60:
                continue
            org = session.get(Organization, org_id)
            assert org is not None
            counts = run_scheduled(session, org=org, now=now, worker=worker)
        last_run[org_id] = now
        ran += 1
        if any(counts.values()):
            log.info("scheduler org=%s %s", org_id, counts)
    return ran


def run_loop(
    db: Database,
    clock: Clock,
    *,
    scheduler: bool,
    worker: bool,
    poll_seconds: float = 5.0,
    stop: threading.Event | None = None,
    providers: ProviderFactory | None = None,
) -> None:
    """Run the scheduler and/or the worker until ``stop`` is set (or forever). Messages go through
    each organization's configured providers (the sandbox where none is configured)."""
    stop = stop or threading.Event()
    providers = providers or Providers()
    settings = getattr(providers, "settings", None) or app_settings()
    name = worker_name("engine")
    last_run: dict[int, datetime] = {}
    while not stop.is_set():
        started = time.monotonic()
        try:
            if scheduler:
                scheduler_pass(db, now=clock.now(), worker=name, last_run=last_run)
            if worker:
                counts = run_due(db, clock=clock, worker=name, providers=providers, batch=settings.dispatch_batch)
                if counts:
                    log.info("worker %s", counts)
                try:  # outbound events (SPEC §7): their own pass, so a slow receiver never stops the engine
                    sent = deliver_due(db, now=clock.now(), settings=getattr(providers, "settings", None))
                    if sent:
                        log.info("events %s", sent)
                except Exception:  # noqa: BLE001 - retried on the next pass
                    log.exception("event delivery pass failed")
        except Exception:  # noqa: BLE001 - a failed pass is logged and retried on the next one
            log.exception("engine pass failed")
        stop.wait(max(0.0, poll_seconds - (time.monotonic() - started)))


def start_background(
    db: Database, clock: Clock, *, poll_seconds: float = 5.0, providers: ProviderFactory | None = None
) -> threading.Event:
    """The embedded engine: scheduler and worker in a daemon thread. Set the returned event to stop."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_loop, args=(db, clock), kwargs={"scheduler": True, "worker": True, "poll_seconds": poll_seconds, "stop": stop, "providers": providers},
        name="duecourse-engine", daemon=True,
    )
    thread.start()
    return stop

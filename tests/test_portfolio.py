"""The synthetic portfolio generator (bench/portfolio.py): reproducible, and its files import cleanly."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from duecourse.ledger.imports import run_import

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def portfolio():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("portfolio", BENCH / "portfolio.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["portfolio"] = module
    spec.loader.exec_module(module)
    return module


def _files(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in ("accounts.csv", "invoices.csv", "payments.csv")}


def test_same_seed_gives_identical_files(portfolio, tmp_path):
    a = portfolio.generate(tmp_path / "a", accounts=150, seed=7)
    b = portfolio.generate(tmp_path / "b", accounts=150, seed=7)
    c = portfolio.generate(tmp_path / "c", accounts=150, seed=8)
    assert a == b and c["accounts"] == 150
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
    assert a["accounts"] == 150 and 150 <= a["invoices"] <= 750 and a["payments"] > 0


def test_portfolio_is_realistic(portfolio, tmp_path):
    portfolio.generate(tmp_path, accounts=400, seed=3)
    with open(tmp_path / "accounts.csv", newline="") as f:
        accounts = list(csv.DictReader(f))
    with open(tmp_path / "invoices.csv", newline="") as f:
        invoices = list(csv.DictReader(f))
    currency_of = {a["external_id"]: a["currency"] for a in accounts}
    assert len({a["currency"] for a in accounts}) >= 4 and len({a["timezone"] for a in accounts}) >= 8
    assert all(a["phone"] == "" or a["phone"].startswith("+") for a in accounts)
    assert all(i["currency"] == currency_of[i["account_external_id"]] for i in invoices)
    statuses = {i["status"] for i in invoices}
    assert {"open", "paid"} <= statuses
    assert any(i["disputed"] == "true" for i in invoices)
    assert any(i["status"] == "open" and i["amount_paid"] not in ("0", "0.00") for i in invoices)  # partly paid
    dues = sorted(i["due_date"] for i in invoices)
    assert dues[0] < "2024-12-01" and dues[-1] > "2026-03-02"  # past 18 months to the next 2 months


def test_generated_files_import_cleanly(portfolio, tmp_path, org, db, clock):
    counts = portfolio.generate(tmp_path, accounts=120, seed=11)
    for kind in ("accounts", "invoices", "payments"):
        with db.transaction() as s, open(tmp_path / f"{kind}.csv", "rb") as f:
            report = run_import(s, organization_id=org.id, kind=kind, stream=f, now=clock.now())
        assert (report.rows, report.inserted, report.error_count) == (counts[kind], counts[kind], 0), kind
    for kind in ("accounts", "invoices", "payments"):
        with db.transaction() as s, open(tmp_path / f"{kind}.csv", "rb") as f:
            report = run_import(s, organization_id=org.id, kind=kind, stream=f, now=clock.now())
        assert report.unchanged == counts[kind], kind

"""Small builders for the ledger tests: accounts, invoices and payments through the public API."""

from __future__ import annotations

from itertools import count
from typing import Any

_seq = count(1)


def make_account(org: Any, **fields: Any) -> dict[str, Any]:
    n = next(_seq)
    body = {"external_id": f"ACC-{n}", "name": f"Debtor {n}", **fields}
    r = org.post("/api/v1/accounts", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def make_invoice(org: Any, account_id: int, total: str = "100.00", due: str = "2026-02-01", **fields: Any) -> dict[str, Any]:
    n = next(_seq)
    body = {
        "account_id": account_id,
        "external_id": f"INV-{n}",
        "number": f"N{n:05d}",
        "total": total,
        "issue_date": "2025-11-01",
        "due_date": due,
        **fields,
    }
    r = org.post("/api/v1/invoices", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def make_payment(org: Any, account_id: int, amount: str, **fields: Any) -> dict[str, Any]:
    r = org.post("/api/v1/payments", json={"account_id": account_id, "amount": amount, "paid_on": "2026-03-01", **fields})
    assert r.status_code == 201, r.text
    return r.json()


def account(org: Any, account_id: int) -> dict[str, Any]:
    r = org.get(f"/api/v1/accounts/{account_id}")
    assert r.status_code == 200, r.text
    return r.json()


def invoice(org: Any, invoice_id: int) -> dict[str, Any]:
    r = org.get(f"/api/v1/invoices/{invoice_id}")
    assert r.status_code == 200, r.text
    return r.json()


def error_fields(response: Any) -> set[str]:
    return {f["field"] for f in response.json()["error"]["fields"]}


def all_pages(org: Any, url: str, limit: int = 2, **params: Any) -> list[dict[str, Any]]:
    """Walk a list endpoint page by page; fails on a repeated item."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = org.get(url, params=query)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= limit
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    ids = [i["id"] for i in items]
    assert len(ids) == len(set(ids)), "duplicates across pages"
    return items

"""Synthetic debtor portfolio: accounts.csv, invoices.csv and payments.csv in duecourse's import format.

    python bench/portfolio.py --accounts 1000000 --seed 42 --out /tmp/portfolio

Realistic enough to exercise the import and the engine at scale: names, emails, valid E.164 phone
numbers for each account's country, IANA time zones, languages and currencies matching the country
(including JPY, which has no minor unit), scores, tags, opt-outs, blocked and paused accounts; one to
five invoices per account (three on average) issued over the past 18 months and due up to two months
ahead, log-normal amounts, a few percent disputed or void, older invoices mostly paid, some partly;
and payments recorded after the invoices' amount_paid figures (recent receipts, some naming an
invoice, the rest to be settled oldest-first).

Deterministic: the same ``--seed``, ``--accounts`` and ``--today`` give byte-identical files (stdlib
``random.Random``; no wall clock). Streaming: one account and its invoices are in memory at a time,
so any size runs in constant memory.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import phonenumbers

ACCOUNT_HEADER = [
    "external_id", "name", "email", "phone", "whatsapp", "timezone", "language", "currency", "score", "tags",
    "opt_out_email", "opt_out_sms", "opt_out_whatsapp", "opt_out_voice", "blocked", "blocked_reason", "paused",
]  # fmt: skip
INVOICE_HEADER = [
    "external_id", "account_external_id", "number", "currency", "total", "amount_paid", "issue_date", "due_date",
    "status", "disputed",
]  # fmt: skip
PAYMENT_HEADER = ["external_id", "account_external_id", "invoice_external_id", "amount", "currency", "paid_on", "reference"]

DEFAULT_TODAY = date(2026, 3, 2)


@dataclass(frozen=True)
class Country:
    region: str
    weight: int
    currency: str
    places: int  # the currency's decimal places
    languages: tuple[str, ...]
    zones: tuple[str, ...]
    first: tuple[str, ...]
    last: tuple[str, ...]
    domains: tuple[str, ...]


_ES_FIRST = ("Ana", "Lucía", "María", "Carmen", "Javier", "Pablo", "Sergio", "Marta", "Jorge", "Elena", "Raúl", "Nuria")
_ES_LAST = ("García", "Martínez", "López", "Sánchez", "Pérez", "Gómez", "Ruiz", "Díaz", "Moreno", "Muñoz", "Álvarez")
_EN_FIRST = ("James", "Olivia", "Emma", "Liam", "Noah", "Ava", "Sophia", "Jack", "Mia", "Harry", "Grace", "Ethan")
_EN_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Taylor", "Wilson", "Davies", "Evans", "Clark", "Lewis")

COUNTRIES: tuple[Country, ...] = (
    Country("ES", 18, "EUR", 2, ("es",), ("Europe/Madrid", "Atlantic/Canary"), _ES_FIRST, _ES_LAST, ("correo.es", "mail.es")),
    Country(
        "DE", 12, "EUR", 2, ("de",), ("Europe/Berlin",),
        ("Lukas", "Anna", "Leon", "Mia", "Jonas", "Lena", "Felix", "Julia", "Paul", "Laura"),
        ("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Hoffmann"),
        ("web.de", "posteo.de"),
    ),
    Country(
        "FR", 10, "EUR", 2, ("fr",), ("Europe/Paris",),
        ("Louis", "Emma", "Gabriel", "Jade", "Léo", "Chloé", "Hugo", "Inès", "Jules", "Manon"),
        ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy"),
        ("orange.fr", "laposte.net"),
    ),
    Country(
        "IT", 6, "EUR", 2, ("it",), ("Europe/Rome",),
        ("Giulia", "Marco", "Sofia", "Luca", "Chiara", "Matteo", "Sara", "Andrea"),
        ("Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci"),
        ("libero.it", "tiscali.it"),
    ),
    Country(
        "PT", 3, "EUR", 2, ("pt",), ("Europe/Lisbon", "Atlantic/Azores"),
        ("João", "Maria", "Tiago", "Beatriz", "Rui", "Inês", "Diogo", "Marta"),
        ("Silva", "Santos", "Ferreira", "Pereira", "Oliveira", "Costa", "Rodrigues"),
        ("sapo.pt",),
    ),
    Country("GB", 12, "GBP", 2, ("en",), ("Europe/London",), _EN_FIRST, _EN_LAST, ("btinternet.com", "mail.co.uk")),
    Country(
        "US", 20, "USD", 2, ("en", "es"),
        ("America/New_York", "America/Chicago", "America/Denver", "America/Los_Angeles", "America/Phoenix"),
        _EN_FIRST, _EN_LAST, ("example.com", "mail.com", "inbox.us"),
    ),
    Country("MX", 6, "MXN", 2, ("es",), ("America/Mexico_City", "America/Monterrey", "America/Tijuana"), _ES_FIRST, _ES_LAST, ("correo.mx",)),
    Country(
        "BR", 6, "BRL", 2, ("pt-BR",), ("America/Sao_Paulo", "America/Manaus", "America/Recife"),
        ("Miguel", "Alice", "Arthur", "Helena", "Heitor", "Laura", "Davi", "Valentina"),
        ("Silva", "Souza", "Oliveira", "Lima", "Pereira", "Carvalho", "Almeida"),
        ("uol.com.br", "bol.com.br"),
    ),
    Country("CA", 4, "CAD", 2, ("en", "fr"), ("America/Toronto", "America/Vancouver", "America/Edmonton"), _EN_FIRST, _EN_LAST, ("mail.ca",)),
    Country("AU", 2, "AUD", 2, ("en",), ("Australia/Sydney", "Australia/Perth", "Australia/Brisbane"), _EN_FIRST, _EN_LAST, ("mail.com.au",)),
    Country(
        "JP", 1, "JPY", 0, ("ja",), ("Asia/Tokyo",),
        ("Haruto", "Yui", "Sota", "Hina", "Yuto", "Aoi", "Ren", "Mei"),
        ("Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto"),
        ("mail.jp",),
    ),
)  # fmt: skip

TAGS = ("vip", "retail", "wholesale", "b2b", "b2c", "legacy", "new", "priority", "payment-plan", "sme", "public-sector")
BLOCK_REASONS = ("legal hold", "deceased", "bankruptcy", "customer request", "fraud investigation")
TERMS = (14, 30, 30, 30, 45, 60)


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


class _Phones:
    """Valid numbers per region: an example number's prefix plus random digits, each checked with
    phonenumbers (a few regions have gaps; a failed draw is simply drawn again)."""

    def __init__(self) -> None:
        self.prefix: dict[tuple[str, str], tuple[int, str, int]] = {}
        for c in COUNTRIES:
            for kind, numtype in (("mobile", phonenumbers.PhoneNumberType.MOBILE), ("fixed", phonenumbers.PhoneNumberType.FIXED_LINE)):
                ex = phonenumbers.example_number_for_type(c.region, numtype)
                national = phonenumbers.national_significant_number(ex)  # keeps Italy's leading zero
                keep = max(len(national) - 6, 1)
                self.prefix[(c.region, kind)] = (ex.country_code, national[:keep], len(national) - keep)

    def draw(self, rng: random.Random, region: str, kind: str) -> str:
        cc, head, n = self.prefix[(region, kind)]
        for _ in range(50):
            national = head + "".join(rng.choice("0123456789") for _ in range(n))
            num = phonenumbers.PhoneNumber(country_code=cc, national_number=int(national))
            zeros = len(national) - len(national.lstrip("0"))
            if zeros:
                num.italian_leading_zero = True
                num.number_of_leading_zeros = zeros
            if phonenumbers.is_valid_number(num):
                return f"+{cc}{national}"
        raise RuntimeError(f"cannot draw a valid {kind} number for {region}")  # pragma: no cover


def _money_text(amount_minor: int, places: int) -> str:
    if places == 0:
        return str(amount_minor)
    s = f"{amount_minor:0{places + 1}d}"
    return f"{s[:-places]}.{s[-places:]}"


def _b(v: bool) -> str:
    return "true" if v else "false"


def generate(
    out: Path,
    *,
    accounts: int,
    seed: int = 42,
    today: date = DEFAULT_TODAY,
    progress: bool = False,
) -> dict[str, int]:
    """Write the three files into ``out``; returns the number of rows of each."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    phones = _Phones()
    weights = [c.weight for c in COUNTRIES]
    cum = list(_cumulative(weights))
    counts = {"accounts": 0, "invoices": 0, "payments": 0}
    started = time.monotonic()
    with (
        open(out / "accounts.csv", "w", newline="", encoding="utf-8") as fa,
        open(out / "invoices.csv", "w", newline="", encoding="utf-8") as fi,
        open(out / "payments.csv", "w", newline="", encoding="utf-8") as fp,
    ):
        wa, wi, wp = (csv.writer(f, lineterminator="\n") for f in (fa, fi, fp))
        wa.writerow(ACCOUNT_HEADER)
        wi.writerow(INVOICE_HEADER)
        wp.writerow(PAYMENT_HEADER)
        for n in range(1, accounts + 1):
            country = rng.choices(COUNTRIES, cum_weights=cum)[0]
            acc_id = f"ACC{n:08d}"
            a_row, open_invoices = _account(rng, phones, country, acc_id, n)
            wa.writerow(a_row)
            counts["accounts"] += 1
            for inv in _invoices(rng, country, acc_id, n, today):
                wi.writerow(inv[0])
                counts["invoices"] += 1
                if inv[1] > 0:
                    open_invoices.append(inv)
            for p in _payments(rng, country, acc_id, n, open_invoices, today):
                wp.writerow(p)
                counts["payments"] += 1
            if progress and n % 100_000 == 0:
                rate = n / (time.monotonic() - started)
                print(f"  {n:,} accounts ({rate:,.0f}/s)", file=sys.stderr, flush=True)
    return counts


def _cumulative(weights: list[int]) -> Iterator[int]:
    total = 0
    for w in weights:
        total += w
        yield total


def _account(rng: random.Random, phones: _Phones, c: Country, acc_id: str, n: int) -> tuple[list[str], list]:
    first, last = rng.choice(c.first), rng.choice(c.last)
    company = rng.random() < 0.25
    name = f"{last} {rng.choice(('Ltd', 'SL', 'GmbH', 'SARL', 'Inc', 'SA'))}" if company else f"{first} {last}"
    email = "" if rng.random() < 0.05 else f"{_ascii(first)}.{_ascii(last)}{n}@{rng.choice(c.domains)}"
    phone = "" if rng.random() < 0.04 else phones.draw(rng, c.region, "mobile" if rng.random() < 0.8 else "fixed")
    whatsapp = phones.draw(rng, c.region, "mobile") if rng.random() < 0.35 else ""
    score = "" if rng.random() < 0.1 else str(min(100, max(0, int(rng.gauss(55, 20)))))
    tags = "|".join(rng.sample(TAGS, rng.choice((0, 0, 1, 1, 1, 2, 3))))
    blocked = rng.random() < 0.01
    row = [
        acc_id,
        name,
        email,
        phone,
        whatsapp,
        rng.choice(c.zones),
        rng.choice(c.languages),
        c.currency,
        score,
        tags,
        _b(rng.random() < 0.03),
        _b(rng.random() < 0.04),
        _b(rng.random() < 0.02),
        _b(rng.random() < 0.03),
        _b(blocked),
        rng.choice(BLOCK_REASONS) if blocked else "",
        _b(rng.random() < 0.005),
    ]
    return row, []


def _invoices(rng: random.Random, c: Country, acc_id: str, n: int, today: date) -> Iterator[tuple[list[str], int, str, date]]:
    """Yields (row, unpaid minor units if open and undisputed else 0, external id, due date)."""
    scale = 10**c.places
    for k in range(rng.randint(1, 5)):
        issue = today - timedelta(days=rng.randint(0, 540))
        due = issue + timedelta(days=rng.choice(TERMS))
        # Log-normal amounts (median ≈ 240 in the currency unit; JPY amounts are ×100 in yen).
        amount = rng.lognormvariate(5.5, 1.0) * (100 if c.places == 0 else 1)
        total = max(1, round(amount * scale))
        overdue_days = (today - due).days
        r = rng.random()
        status, paid = "open", 0
        if r < 0.01:
            status = "void"
        elif overdue_days > 90 and r < 0.70 or overdue_days <= 90 and r < 0.20:
            status, paid = "paid", total
        elif r < (0.80 if overdue_days > 90 else 0.35):
            paid = int(total * rng.uniform(0.1, 0.9))
        disputed = status == "open" and rng.random() < 0.03
        ext = f"INV{n:08d}-{k + 1}"
        row = [
            ext,
            acc_id,
            f"{issue.year}-{n:08d}-{k + 1}",
            c.currency,
            _money_text(total, c.places),
            _money_text(paid, c.places),
            issue.isoformat(),
            due.isoformat(),
            status,
            _b(disputed),
        ]
        unpaid = total - paid if status == "open" and not disputed else 0
        yield row, unpaid, ext, due


def _payments(rng: random.Random, c: Country, acc_id: str, n: int, open_invoices: list, today: date) -> Iterator[list[str]]:
    """Recent receipts recorded in duecourse (not in the invoices' amount_paid): ~15% of debtors."""
    if not open_invoices or rng.random() >= 0.15:
        return
    open_invoices.sort(key=lambda inv: inv[3])
    for k, inv in enumerate(open_invoices[: rng.randint(1, 2)]):
        unpaid = inv[1]
        amount = unpaid if rng.random() < 0.5 else max(1, int(unpaid * rng.uniform(0.2, 0.8)))
        names_invoice = rng.random() < 0.6
        yield [
            f"PAY{n:08d}-{k + 1}",
            acc_id,
            inv[2] if names_invoice else "",
            _money_text(amount, c.places),
            c.currency,
            (today - timedelta(days=rng.randint(0, 30))).isoformat(),
            f"bank transfer {rng.randint(100000, 999999)}" if rng.random() < 0.7 else "",
        ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--today", type=date.fromisoformat, default=DEFAULT_TODAY, help="reference date (default 2026-03-02)")
    args = p.parse_args(argv)
    t = time.monotonic()
    counts = generate(args.out, accounts=args.accounts, seed=args.seed, today=args.today, progress=True)
    took = time.monotonic() - t
    print(
        f"wrote {counts['accounts']:,} accounts, {counts['invoices']:,} invoices, {counts['payments']:,} payments "
        f"to {args.out} in {took:.1f}s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

"""Server-drawn SVG charts (SPEC §8: a picture where it says more than a table; no client build)."""

from __future__ import annotations

from typing import Any

SERIES_LABELS = {
    "sent": "Sent", "delivered": "Delivered", "failed": "Failed", "promises": "Promises", "payments": "Payments",
}


def daily_lines(days: list[dict[str, Any]], *, width: int = 900, height: int = 220) -> dict[str, Any]:
    """Geometry of the daily-outcomes chart: one polyline per series over the days, a y scale from 0
    to a round maximum, and a date label every few days."""
    left, right, top, bottom = 40, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([1] + [d[k] for d in days for k in SERIES_LABELS])
    top_value = next(m * 10**e for e in range(12) for m in (1, 2, 5) if m * 10**e >= peak)  # a round maximum
    n = max(1, len(days) - 1)

    def x(i: int) -> float:
        return round(left + plot_w * i / n, 1)

    def y(v: int) -> float:
        return round(top + plot_h * (1 - v / top_value), 1)

    lines = [
        {
            "key": key, "label": label, "total": sum(d[key] for d in days),
            "points": " ".join(f"{x(i)},{y(d[key])}" for i, d in enumerate(days)),
        }
        for key, label in SERIES_LABELS.items()
    ]
    ticks = [{"value": v, "y": y(v)} for v in sorted({0, top_value // 2, top_value})]
    every = max(1, len(days) // 6)
    labels = [{"x": x(i), "text": d["date"].strftime("%d %b")} for i, d in enumerate(days) if i % every == 0]
    return {"width": width, "height": height, "left": left, "right": width - right, "top": top,
            "bottom": height - bottom, "lines": lines, "ticks": ticks, "labels": labels}

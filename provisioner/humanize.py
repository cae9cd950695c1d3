"""Figures as people read them in reports: ages, sizes and columns."""
from __future__ import annotations


def age(seconds: float) -> str:
    """'45 s', '12 min', '5 h', '3 days': whole units, rounded down."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def size(n: float) -> str:
    """'512 B', '4.2 MiB', '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def columns(rows) -> list[str]:
    """Rows of cells as text lines, each column as wide as its widest cell, two spaces apart."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

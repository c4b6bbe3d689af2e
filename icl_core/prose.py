"""Formatting for the sentences and tables the chapters display (generated from the numbers).

Token counts as ``3.2M``, optional numbers as ``—`` when missing, and lists joined as English.
"""
from __future__ import annotations

import numpy as np


def fmt_tokens(x) -> str:
    """A token count to 3 significant digits with a k/M/B suffix (``—`` when not finite)."""
    if not np.isfinite(x):
        return "—"
    for unit, f in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g}{unit}"
    return f"{x:.0f}"


def fmt(x, spec: str = "+.2f") -> str:
    """``format(x, spec)``, or ``—`` for None or a non-finite float."""
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def join(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def span_tokens(values) -> str:
    """The range of token counts ``values`` ('3.2M' when all equal, else '1.6M–3.2M')."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return fmt_tokens(lo) if lo == hi else f"{fmt_tokens(lo)}–{fmt_tokens(hi)}"


def say(text: str | None) -> None:
    """Display ``text`` as Markdown in a notebook; nothing when there is nothing to say (None or "")."""
    if text:
        from IPython.display import Markdown, display

        display(Markdown(text))

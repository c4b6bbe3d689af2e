"""What every figure module shares: the shaded phase-change window and the finishing of a
training-tokens axis."""
from __future__ import annotations

import matplotlib.pyplot as plt


def shade_window(ax, window, colour: str = "gold", alpha: float = 0.25, label: str | None = None) -> None:
    """Shade a phase-change window (an object with found/start/end; None: nothing) on a tokens axis."""
    if window is not None and getattr(window, "found", False):
        ax.axvspan(window.start, window.end, color=colour, alpha=alpha, lw=0, label=label)


def finish(fig: plt.Figure, ax, xlabel: str, ylabel: str, title: str, legend_ncol: int = 1,
           xlog: bool = True) -> plt.Figure:
    """Log x axis (``xlog``), axis labels, a small legend and title, tight layout; returns ``fig``."""
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=legend_ncol)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


#: how whitespace tokens are drawn in tick labels (a space would be an invisible label)
WHITESPACE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible_token(s: str) -> str:
    """A token string as a tick label: whitespace drawn as ␣ ⏎ ⇥ ␍, other unprintable characters escaped."""
    return "".join(WHITESPACE.get(ch) or (ch if ch.isprintable() else repr(ch)[1:-1]) for ch in s)

"""Figures of the introduction (chapters/00_intro; data from :mod:`icl_core.intro`), also importable
from :mod:`icl_core.plots` directly: training curves, attention patterns, head scores.

Functions take plain data (arrays, DataFrames from :meth:`icl_core.runs.Run.metrics`) and return a
matplotlib Figure; they compute nothing about models.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

# --- shared style ----------------------------------------------------------------------------

HEAD_CMAP = "viridis"
ATTN_CMAP = "Blues"


def _head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# --- introduction (chapters/00_intro) ---------------------------------------------------------

def plot_attention_pattern(pattern, seq_len: int | None = None, title: str = "",
                           size: float = 3.6) -> plt.Figure:
    """One head's attention pattern (T, T) on BOS + a repeated random sequence.

    Dashed lines mark where each repeat starts (``seq_len`` tokens per repeat, after the BOS);
    induction heads show a stripe one token right of the diagonal-offset-by-``seq_len``.
    Made in bulk for widgets, so the Figure is not registered with pyplot (nothing to close, and
    the notebook does not show it by itself).
    """
    p = np.asarray(pattern, dtype=float)
    fig = Figure(figsize=(size, size * 0.92), dpi=80)
    ax = fig.subplots()
    im = ax.imshow(p, cmap=ATTN_CMAP, vmin=0, vmax=1, interpolation="nearest")
    if seq_len:
        for b in range(1, p.shape[0], seq_len):
            ax.axhline(b - 0.5, color="0.6", lw=0.6, ls="--")
            ax.axvline(b - 0.5, color="0.6", lw=0.6, ls="--")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention")
    fig.tight_layout()
    return fig


def plot_training_curves(metrics, title: str = "") -> plt.Figure:
    """Loss and ICL score (L(late) - L(early), nats) on the fixed eval set against training tokens.

    ``metrics`` is :meth:`Run.metrics` (columns tokens, loss, icl) or a dict {run name: such a frame}.
    """
    runs = metrics if isinstance(metrics, dict) else {"": metrics}
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    for name, df in runs.items():
        d = df[df["tokens"] > 0]
        axes[0].plot(d["tokens"], d["loss"], marker=".", label=name or None)
        axes[1].plot(d["tokens"], d["icl"], marker=".", label=name or None)
    axes[0].set_ylabel("eval loss (nats)")
    axes[1].set_ylabel("ICL score (nats)")
    axes[1].axhline(0, color="0.6", lw=0.8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
    if len(runs) > 1:
        axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_head_scores(prefix, prev_token, title: str = "") -> plt.Figure:
    """Prefix-matching and previous-token scores, each (n_layers, n_heads), side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.4), dpi=90)
    for ax, data, name in zip(axes, (prefix, prev_token), ("prefix-matching score", "previous-token score")):
        a = np.asarray(data, dtype=float)
        im = ax.imshow(a, cmap=HEAD_CMAP, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=10)
        for (i, j), v in np.ndenumerate(a):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_head_scores_over_training(metrics, column: str = "prefix", title: str = "") -> plt.Figure:
    """One line per head: a per-head score column of :meth:`Run.metrics` (lists L x H) vs tokens."""
    d = metrics[metrics["tokens"] > 0]
    scores = np.asarray(d[column].tolist(), dtype=float)  # (snapshots, L, H)
    fig, ax = plt.subplots(figsize=(5.5, 3), dpi=90)
    for layer in range(scores.shape[1]):
        for head in range(scores.shape[2]):
            ax.plot(d["tokens"], scores[:, layer, head], marker=".", label=_head_label(layer, head))
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel({"prefix": "prefix-matching score", "prev_token": "previous-token score"}.get(column, column))
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig

"""Figures of chapter 2 (Argument 2, co-perturbation: smeared keys vs vanilla twins).

Inputs are :class:`icl_core.coperturbation.Curves` pairs ({depth label: [(vanilla, smeared), ...]}).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..coperturbation import seed_band
from ..heads import INDUCTION_THRESHOLD

VANILLA_COLOR = "tab:blue"
SMEARED_COLOR = "tab:orange"


def plot_icl_and_prefix(pairs, prefix_threshold: float | None = INDUCTION_THRESHOLD, title: str = "") -> plt.Figure:
    """ICL score (top row) and max prefix-matching score (bottom row) vs tokens, one column per depth;
    vanilla vs smeared, line = mean over seeds, band = min-max over seeds; a dotted line at
    ``prefix_threshold`` (None: no line)."""
    labels = list(pairs)
    fig, axes = plt.subplots(2, len(labels), figsize=(4.2 * len(labels), 5.6), dpi=90, squeeze=False)
    for j, label in enumerate(labels):
        n_seeds = len(pairs[label])
        for k, (kind, color) in enumerate((("vanilla", VANILLA_COLOR), ("smeared", SMEARED_COLOR))):
            curves = [p[k] for p in pairs[label]]
            for i, attr in enumerate(("icl", "prefix_max")):
                t, mean, lo, hi = seed_band(curves, attr)
                ax = axes[i, j]
                ax.plot(t, mean, color=color, marker=".", ms=3,
                        label=f"{kind} (mean of {n_seeds} seed{'s' if n_seeds > 1 else ''})")
                if n_seeds > 1:
                    ax.fill_between(t, lo, hi, color=color, alpha=0.2, lw=0, label=f"{kind} seed range")
        axes[0, j].set_title(f"{label}", fontsize=10)
        axes[0, j].axhline(0, color="0.6", lw=0.8)
        axes[1, j].set_ylim(0, 1)
        if prefix_threshold is not None:
            axes[1, j].axhline(prefix_threshold, color="0.4", lw=0.8, ls="--", label=f"threshold {prefix_threshold:g}")
    for ax in axes.ravel():
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
    axes[0, 0].set_ylabel("ICL score (nats)")
    axes[1, 0].set_ylabel("top prefix-matching score")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    axes[1, 0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_smear_over_training(pairs, title: str = "") -> plt.Figure:
    """Learned sigma(alpha_h) per head over training, one panel per smeared run.

    sigma = 1: the key is the token's own; sigma = 0.5: half of it comes from the previous token."""
    runs = [b for plist in pairs.values() for _, b in plist if b.smear is not None]
    if not runs:
        fig, ax = plt.subplots(figsize=(5, 1.5), dpi=90)
        ax.text(0.5, 0.5, "no smeared run logged sigma(alpha)", ha="center", va="center")
        ax.set_axis_off()
        return fig
    n = len(runs)
    cols = min(n, 2)  # two panels a row: readable at the page's width
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 2.9 * rows), dpi=90, squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, c in zip(axes.ravel(), runs):
        keep = c.tokens > 0
        _, n_layers, n_heads = c.smear.shape
        for layer in range(n_layers):
            for head in range(n_heads):
                ax.plot(c.tokens[keep], c.smear[keep, layer, head], color=cmap(head % 10),
                        ls=("-", "--", ":", "-.")[layer % 4], label=f"L{layer}H{head}")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(f"{c.name} ({c.n_layers}L, seed {c.seed})", fontsize=9)
        ax.legend(fontsize=6, ncol=2, loc="lower left")
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("σ(α): weight on own key")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_pair_losses(pairs, title: str = "") -> plt.Figure:
    """Eval loss vs tokens for each vanilla/smeared pair, with each twin's phase-change window shaded."""
    labels = list(pairs)
    rows, cols = len(labels), max(len(pairs[k]) for k in labels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=90, squeeze=False)
    plist, used = [], []
    for i, label in enumerate(labels):
        for j, p in enumerate(pairs[label]):
            plist.append((label, p))
            used.append(axes[i, j])
    for ax in axes.ravel():
        if not any(ax is u for u in used):
            ax.set_axis_off()
    for ax, (label, (a, b)) in zip(used, plist):
        for c, kind, color in ((a, "vanilla", VANILLA_COLOR), (b, "smeared", SMEARED_COLOR)):
            keep = c.tokens > 0
            ax.plot(c.tokens[keep], c.loss[keep], color=color, marker=".", ms=3, label=f"{kind} ({c.name})")
            if c.window is not None and c.window.found:
                ax.axvspan(c.window.start, c.window.end, color=color, alpha=0.15, label=f"{kind} window")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("eval loss (nats)")
        ax.set_title(f"{label}, seed {a.seed}", fontsize=9)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig

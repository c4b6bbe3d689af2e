"""Figures for Argument 6, continuity across scale (chapters/06_continuity); data from
:mod:`icl_core.continuity` (:func:`~icl_core.continuity.family_table`, :func:`~icl_core.continuity.index_pair_table`).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from ..heads import INDUCTION_THRESHOLD
from .common import finish, shade_window
from .cooccurrence import model_colours


def plot_icl_groups(curves: dict, windows: dict, groups: dict, indices: tuple[int, int], title: str = "") -> plt.Figure:
    """ICL score vs tokens, one panel per group of the family (depth, width, MLPs, corpus); mean over
    seeds with a min–max band, the window of the first seed shaded.

    curves: {run: (tokens, icl (n_seeds, S))}; windows: {run: [Window]}; groups: {group: [run]}."""
    n = len(groups)
    cols = min(n, 2)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), dpi=90, squeeze=False, sharey=True)
    late, early = indices
    for ax, (g, names) in zip(axes.flat, groups.items()):
        col = model_colours(names)
        for k in names:
            t, y = curves[k]
            m = t > 0
            ax.plot(t[m], y.mean(0)[m], color=col[k], marker=".", ms=3, label=f"{k} ({len(y)} seed{'s' if len(y) > 1 else ''})")
            if len(y) > 1:
                ax.fill_between(t[m], y.min(0)[m], y.max(0)[m], color=col[k], alpha=0.2, lw=0)
            ws = windows.get(k) or [None]
            shade_window(ax, ws[0], col[k], alpha=0.08)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"ICL L({late}) − L({early}) (nats)")
        ax.set_title(g, fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title or "ICL score over training by group (band: range over seeds; shaded: ICL window)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_final_icl(family, title: str = "") -> plt.Figure:
    """Final ICL vs non-embedding parameters (left) and vs depth (right); error bars: range over
    seeds; marker shape: attention-only (o) or with MLPs (s)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    col = model_colours(family["model"])
    for r in family.itertuples():
        err = np.array([[r.final_icl - r.final_icl_min], [r.final_icl_max - r.final_icl]])
        for ax, x in zip(axes, (r.non_embedding_params, r.layers)):
            ax.errorbar(x, r.final_icl, yerr=err, fmt="s" if r.MLPs else "o", color=col[r.model], capsize=3,
                        label=f"{r.model} ({r.n_seeds} seed{'s' if r.n_seeds > 1 else ''})")
    axes[0].set_xscale("log")
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xlabel("non-embedding parameters")
    axes[1].set_xlabel("layers")
    axes[1].set_xticks(sorted(set(family["layers"])))
    for ax in axes:
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylabel("final ICL score (nats)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title or "Final ICL across the family (error bars: range over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_window_timing(family, title: str = "") -> plt.Figure:
    """Each model's ICL window (bar from start to end, dot at the steepest point) against its
    non-embedding parameter count; models without a window are listed in the legend."""
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    col = model_colours(family["model"])
    for r in family.itertuples():
        if r.window_found:
            ax.plot([r.non_embedding_params] * 2, [r.window_start, r.window_end], color=col[r.model], lw=5, alpha=0.5)
            ax.plot(r.non_embedding_params, r.window_peak, "o", color=col[r.model], label=r.model)
        else:
            ax.plot([], [], "x", color=col[r.model], label=f"{r.model}: no window")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    return finish(fig, ax, "non-embedding parameters", "training tokens",
                  title or "ICL window (bar) and its steepest point (dot) vs model size", xlog=False)


def plot_layer_prefix(family, threshold: float = INDUCTION_THRESHOLD, title: str = "") -> plt.Figure:
    """Top prefix-matching score per layer (max over heads) for every model at the end of training;
    layers counted from the first (left); cells outside a model's depth are blank."""
    n_layers = int(family["layers"].max())
    M = np.full((len(family), n_layers), np.nan)
    for i, lp in enumerate(family["layer_prefix"]):
        M[i, :len(lp)] = lp
    fig, ax = plt.subplots(figsize=(1.2 * n_layers + 3, 0.45 * len(family) + 1.5), dpi=90)
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(M):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}" + ("*" if v >= threshold else ""), ha="center", va="center", fontsize=8,
                    color="white" if v < 0.6 else "black")
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_yticks(range(len(family)))
    ax.set_yticklabels(family["model"])
    fig.colorbar(im, ax=ax, label="top prefix-matching score")
    ax.set_title(title or f"Where the induction heads sit (* = score ≥ {threshold})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_index_pairs(pairs, title: str = "") -> plt.Figure:
    """Final ICL per model for each early index (grouped bars), and ICL over training for each pair
    (one panel per early index); two panels a row."""
    fin = pairs.loc[pairs.groupby(["run", "early"])["tokens"].idxmax()]
    runs = list(dict.fromkeys(pairs["run"]))
    early = sorted(set(pairs["early"]))
    late = int(pairs["late"].iloc[0])
    n = len(early)
    cols = min(n + 1, 2)  # two panels a row: readable at the page's width
    rows = int(np.ceil((n + 1) / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), dpi=90, squeeze=False)
    for ax in grid.flat[n + 1:]:
        ax.set_visible(False)
    axes = grid.flat[:n + 1]
    col = model_colours(runs)
    w = 0.8 / len(runs)
    for i, r in enumerate(runs):
        v = [float(fin[(fin.run == r) & (fin.early == e)]["icl"].iloc[0]) for e in early]
        axes[0].bar(np.arange(n) + i * w - 0.4 + w / 2, v, width=w, color=col[r], label=r)
    axes[0].set_xticks(range(n))
    axes[0].set_xticklabels([f"L({late})−L({e})" for e in early], fontsize=8)
    axes[0].set_ylabel("final ICL (nats)")
    axes[0].axhline(0, color="0.6", lw=0.8)
    axes[0].set_title("final ICL by index pair", fontsize=10)
    axes[0].legend(fontsize=6)
    for ax, e in zip(axes[1:], early):
        for r in runs:
            d = pairs[(pairs.run == r) & (pairs.early == e) & (pairs.tokens > 0)]
            ax.plot(d["tokens"], d["icl"], color=col[r], marker=".", ms=3, label=r)
        ax.set_xscale("log")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"L({late}) − L({e}) (nats)")
        ax.set_title(f"early index {e}", fontsize=10)
    fig.suptitle(title or "ICL with other index pairs", fontsize=10)
    fig.tight_layout()
    return fig

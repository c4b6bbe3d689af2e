"""Figures for Argument 1, co-occurrence (chapters/01_cooccurrence); data from :mod:`icl_core.cooccurrence`,
:mod:`icl_core.loss_by_index` and :mod:`icl_core.loss_pca`.

Each function takes plain arrays/dicts and returns a matplotlib Figure; nothing here touches a model.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import NullFormatter

from .common import finish, shade_window

LAYER_CMAP = "viridis"


def model_colours(labels) -> dict:
    cyc = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {k: cyc[i % len(cyc)] for i, k in enumerate(labels)}


def plot_loss_curves(curves: dict, windows: dict, gaps: dict | None = None, title: str = "") -> plt.Figure:
    """Training loss vs tokens per model (log and linear x), each model's ICL window shaded in its
    colour; with ``gaps`` a third panel shows the loss above its convex envelope in log tokens.

    curves: {label: (tokens, loss)}; windows: {label: Window}; gaps: {label: (tokens, gap)}."""
    n = 3 if gaps else 2
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.3), dpi=90)
    col = model_colours(curves)
    for k, (t, y) in curves.items():
        for ax in axes[:2]:
            ax.plot(t, y, color=col[k], label=k, lw=1.4)
            shade_window(ax, windows.get(k), col[k], alpha=0.12)
    axes[0].set_xscale("log")
    axes[0].set_title("log tokens", fontsize=10)
    axes[1].set_title("linear tokens", fontsize=10)
    for ax in axes[:2]:
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss, smoothed (nats)")
    lo = min(np.min(y) for _, y in curves.values())
    hi = max(np.percentile(y, 60) for _, y in curves.values())
    axes[1].set_ylim(lo - 0.1, hi + 0.3)
    axes[0].legend(fontsize=7)
    if gaps:
        for k, (t, g) in gaps.items():
            axes[2].plot(t, g, color=col[k], label=k, lw=1.4)
            shade_window(axes[2], windows.get(k), col[k], alpha=0.12)
        axes[2].set_xscale("log")
        axes[2].xaxis.set_minor_formatter(NullFormatter())
        axes[2].set_xlabel("training tokens")
        axes[2].set_ylabel("loss above convex envelope (nats)")
        axes[2].set_title("the bump: non-convex stretch", fontsize=10)
        axes[2].legend(fontsize=7)
    fig.suptitle(title or "Loss over training; shaded: each model's ICL window", fontsize=10)
    fig.tight_layout()
    return fig


def plot_icl_curves(curves: dict, windows: dict, indices: tuple[int, int], title: str = "") -> plt.Figure:
    """ICL score vs tokens per model: mean over seeds with a min–max band; windows shaded.

    curves: {label: (tokens (S,), icl (n_seeds, S))}; windows: {label: [Window per seed]}."""
    late, early = indices
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=90)
    col = model_colours(curves)
    for k, (t, y) in curves.items():
        y = np.atleast_2d(y)
        m = t > 0
        ax.plot(t[m], y.mean(0)[m], color=col[k], marker=".", label=f"{k} ({len(y)} seed{'s' if len(y) > 1 else ''})")
        if len(y) > 1:
            ax.fill_between(t[m], y.min(0)[m], y.max(0)[m], color=col[k], alpha=0.2, lw=0)
        for w in windows.get(k, []):
            shade_window(ax, w, col[k], alpha=0.08)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"ICL score L({late}) − L({early}) (nats)")
    ax.legend(fontsize=7)
    ax.set_title(title or "ICL score (negative = in-context learning); band: range over seeds", fontsize=10)
    fig.tight_layout()
    return fig


def plot_head_score_curves(data: dict, windows: dict, title: str = "") -> plt.Figure:
    """Per-head prefix-matching (top row) and previous-token (bottom row) scores vs tokens, one column
    per model, heads coloured by layer; the ICL window shaded.

    data: {label: (tokens (S,), prefix (S, L, H), prev_token (S, L, H))}."""
    n = len(data)
    ncol = min(n, 4)  # at most 4 models side by side: more wrap into further row pairs
    nblk = -(-n // ncol)
    fig, axes = plt.subplots(2 * nblk, ncol, figsize=(3.4 * ncol, 5.2 * nblk), dpi=90, squeeze=False, sharey="row")
    for j in range(n, nblk * ncol):  # empty slots of the last row pair
        axes[2 * (nblk - 1), j % ncol].set_visible(False)
        axes[2 * (nblk - 1) + 1, j % ncol].set_visible(False)
    cmap = plt.get_cmap(LAYER_CMAP)
    for jj, (k, (t, pre, prev)) in enumerate(data.items()):
        b, j = divmod(jj, ncol)
        m = t > 0
        n_layers, n_heads = pre.shape[1:]
        for i, (arr, name) in enumerate(((pre, "prefix-matching score"), (prev, "previous-token score"))):
            ax = axes[2 * b + i, j]
            for layer in range(n_layers):
                c = cmap(layer / max(n_layers - 1, 1) * 0.85)
                for h in range(n_heads):
                    ax.plot(t[m], arr[m, layer, h], color=c, lw=1, label=f"layer {layer}" if h == 0 else None)
            shade_window(ax, windows.get(k), "tab:red", alpha=0.12, label="ICL window")
            ax.set_xscale("log")
            ax.set_ylim(0, 1)
            ax.set_xlabel("training tokens")
            if j == 0:
                ax.set_ylabel(name)
            if i == 0:
                ax.set_title(k, fontsize=10)
            if i == 0:
                ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(title or "Head scores over training, coloured by layer; shaded: ICL window", fontsize=10)
    fig.tight_layout()
    return fig


def plot_loss_index_heatmaps(heats: dict, windows: dict, title: str = "") -> plt.Figure:
    """For each model: loss(tokens, index) (left) and ∂loss/∂ln(index) (right), both log axes, with
    the ICL window marked by dashed lines.

    heats: {label: {tokens, index, loss (S, T-1), centres, dloss (S, n)}}."""
    n = len(heats)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.7 * n), dpi=90, squeeze=False)
    for i, (k, h) in enumerate(heats.items()):
        t = h["tokens"]
        m = t > 0
        ax = axes[i, 0]
        body = h["loss"][m][:, 1:]  # index 1 (no context) would dominate the colour scale
        im = ax.pcolormesh(h["index"], t[m], h["loss"][m], shading="nearest", cmap="magma_r",
                           vmin=float(np.percentile(body, 1)), vmax=float(np.percentile(body, 99)))
        fig.colorbar(im, ax=ax, label="loss (nats)")
        ax2 = axes[i, 1]
        d = h["dloss"][m]
        lim = float(np.nanpercentile(np.abs(d[:, h["centres"] >= 2]), 95)) or 1.0
        im2 = ax2.pcolormesh(h["centres"], t[m], d, shading="nearest", cmap="RdBu_r",
                             norm=TwoSlopeNorm(0, -lim, lim))
        fig.colorbar(im2, ax=ax2, label="∂loss/∂ln(index)")
        for a in (ax, ax2):
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel("context index (token position)")
            a.set_ylabel("training tokens")
            w = windows.get(k)
            if w is not None and w.found:
                for v in (w.start, w.end):
                    a.axhline(v, color="k", ls="--", lw=0.8)
        ax.set_title(f"{k}: loss", fontsize=10)
        ax2.set_title(f"{k}: ∂loss/∂ln(index) (blue = still improving)", fontsize=10)
    fig.suptitle(title or "Loss by context index over training; dashed: ICL window", fontsize=10)
    fig.tight_layout()
    return fig


def plot_pca_paths(coords: dict, tokens: dict, windows: dict, explained, groups: dict | None = None,
                   title: str = "") -> plt.Figure:
    """Each run's path through PC1–PC2 of the joint per-token-loss PCA; the snapshots inside the
    run's ICL window drawn thick, start marked with a circle and end with a square.

    coords: {run: (S, 2)}; tokens: {run: (S,)}; windows: {run: Window}; groups: {run: label} colours
    runs by model."""
    groups = groups or {k: k for k in coords}
    col = model_colours(dict.fromkeys(groups.values()))
    fig, ax = plt.subplots(figsize=(6, 4.6), dpi=90)
    seen = set()
    for k, P in coords.items():
        g = groups.get(k, k)
        c = col[g]
        ax.plot(P[:, 0], P[:, 1], color=c, lw=1, marker=".", ms=3, label=g if g not in seen else None)
        seen.add(g)
        ax.plot(*P[0], "o", color=c, ms=6, mfc="white")
        ax.plot(*P[-1], "s", color=c, ms=6)
        w = windows.get(k)
        t = tokens[k]
        if w is not None and w.found:
            m = (t >= w.start) & (t <= w.end)
            ax.plot(P[m, 0], P[m, 1], color=c, lw=4, alpha=0.5)
    ev = np.asarray(explained)
    ax.set_xlabel(f"PC1 ({ev[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%} of variance)")
    ax.legend(fontsize=7)
    ax.set_title(title or "Per-token-loss PCA, one fit for all runs (○ start, ■ end, thick: ICL window)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_passage_change(change: dict, title: str = "") -> plt.Figure:
    """Per-token loss change across the window on a passage that repeats (first copy, then second),
    with the two rule-chosen tokens marked."""
    d = change["delta"]
    half = change["half"]
    x = np.arange(1, len(d) + 1)
    fig, ax = plt.subplots(figsize=(8, 3), dpi=90)
    ax.bar(x[:half], d[:half], color="0.55", width=1.0, label="first copy")
    ax.bar(x[half:], d[half:], color="tab:blue", width=1.0, label="second copy (repeat)")
    ax.axvline(half + 0.5, color="k", ls="--", lw=0.8)
    ax.axhline(0, color="k", lw=0.6)
    for key, c in (("helped", "tab:green"), ("hurt", "tab:red")):
        i = change[key]
        ax.plot(i + 1, d[i], "v" if key == "helped" else "^", color=c, ms=8,
                label=f"{key}: {change[key + '_token']!r}")
    ax.set_xlabel("token index in the passage")
    ax.set_ylabel("loss after − loss before (nats)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "Per-token loss change across the ICL window on a repeated passage", fontsize=10)
    fig.tight_layout()
    return fig


def plot_token_loss_curves(change: dict, window=None, title: str = "") -> plt.Figure:
    """Loss on the two rule-chosen tokens of the repeated passage over all snapshots."""
    t = change["tokens"]
    m = t > 0
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    for key, c in (("helped", "tab:green"), ("hurt", "tab:red")):
        i = change[key]
        ax.plot(t[m], change["losses"][m, i], color=c, marker=".",
                label=f"{key}: {change[key + '_token']!r} (index {i + 1})")
    shade_window(ax, window, "0.5", alpha=0.2, label="ICL window")
    return finish(fig, ax, "training tokens", "loss on this token (nats)",
                  title or "Two tokens of the repeated passage over training")

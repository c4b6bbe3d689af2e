"""Figures of chapter 3 (Argument 3, direct ablation).

Inputs are the dicts of :mod:`icl_core.ablation` (``ablation_over_training``, ``final_ablation_table``)
and head labels (L, H) of 'induction' / 'previous-token' / 'other'.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

CLASS_COLORS = {"induction": "tab:red", "previous-token": "tab:blue", "other": "0.55"}
MODES = (("full", "full ablation"), ("pp", "pattern-preserving ablation"))


def _per_head_over_training(res: dict, labels, key: str, ylabel: str, title: str, size=(9.5, 3.3)) -> Figure:
    fig = Figure(figsize=size, dpi=80)
    axes = fig.subplots(1, 2, sharey=True)
    labels = np.asarray(labels)
    s0, s1 = res["ba_steps"]
    for ax, (mode, name) in zip(axes, MODES):
        t = np.asarray(res[f"tokens_{mode}"], dtype=float)
        keep = t > 0
        steps = np.asarray(res[f"steps_{mode}"])
        y = np.asarray(res[f"{key}_{mode}"])  # (S, L, H)
        for (l, h), lab in np.ndenumerate(labels):
            ax.plot(t[keep], y[keep, l, h], marker=".", ms=3, color=CLASS_COLORS[lab],
                    lw=2 if lab == "induction" else 1, label=f"L{l}H{h} ({lab})")
        ax.axhline(0, color="0.3", lw=0.7)
        for s in (s0, s1):
            ts = t[steps == s]
            if len(ts) and ts[0] > 0:
                ax.axvline(ts[0], color="0.4", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=6, ncol=1 + labels.size // 9, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_delta_icl_over_training(res: dict, labels, title: str = "") -> Figure:
    """Per-head change in ICL score when that head alone is ablated, over training, full and
    pattern-preserving; heads coloured by their final class. Dotted lines: the before/after snapshots.
    Not registered with pyplot (made in bulk for widgets)."""
    return _per_head_over_training(res, labels, "delta_icl", "ΔICL = ablated − clean (nats)\n(> 0: ICL removed)",
                                   title)


def plot_projection_over_training(res: dict, labels, title: str = "") -> Figure:
    """Per-head projection of the per-token loss change onto the before-and-after vector,
    u · (L_ablated − L_clean), over training; negative = the ablation undoes the phase change."""
    return _per_head_over_training(res, labels, "projection", "u · (L_ablated − L_clean)\n(< 0: undoes the change)",
                                   title)


def plot_final_delta_vs_prefix(points: dict, title: str = "") -> plt.Figure:
    """Scatter over all heads of all runs at the final snapshot: prefix-matching score (x) vs ΔICL
    under pattern-preserving ablation (y). ``points`` = {run: (prefix (L,H), delta (L,H), labels (L,H))}."""
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=90)
    markers = "osD^vP*Xh"
    seen = set()
    for i, (name, (pm, d, lab)) in enumerate(points.items()):
        pm, d, lab = np.asarray(pm, float), np.asarray(d, float), np.asarray(lab)
        for cls, color in CLASS_COLORS.items():
            m = lab == cls
            if not m.any():
                continue
            ax.scatter(pm[m], d[m], color=color, marker=markers[i % len(markers)], s=36, alpha=0.8,
                       edgecolor="k", lw=0.4)
            seen.add(cls)
        ax.scatter([], [], color="white", edgecolor="k", marker=markers[i % len(markers)], label=f"run {name}")
    for cls in CLASS_COLORS:
        if cls in seen:
            ax.scatter([], [], color=CLASS_COLORS[cls], marker="s", label=cls)
    ax.axhline(0, color="0.3", lw=0.7)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("prefix-matching score (final snapshot)")
    ax.set_ylabel("ΔICL when ablated (nats, > 0: ICL removed)")
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_ablation_table(tables: dict, mode: str = "pp", title: str = "") -> plt.Figure:
    """Final-snapshot ICL score per run under each condition: clean, induction heads ablated,
    random non-induction heads ablated (mean, bar = the draws' interval), previous-token heads ablated."""
    names = list(tables)
    conds = (("clean", "clean", "0.3"), ("induction", "induction heads", CLASS_COLORS["induction"]),
             ("random", "random non-induction heads", "0.7"),
             ("previous_token", "previous-token heads", CLASS_COLORS["previous-token"]))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 3.6), dpi=90)
    w = 0.8 / len(conds)
    x = np.arange(len(names))
    for j, (key, label, color) in enumerate(conds):
        vals, err = [], [[], []]
        for n in names:
            d = tables[n][mode]
            if key == "random":
                v = d["random_mean"]
                lo, hi = d["random_interval"]
                err[0].append(v - lo if np.isfinite(v) else 0)
                err[1].append(hi - v if np.isfinite(v) else 0)
            else:
                v = d[key]
                err[0].append(0)
                err[1].append(0)
            vals.append(v)
        vals = np.asarray(vals, dtype=float)
        ax.bar(x + (j - 1.5) * w, np.nan_to_num(vals), w, color=color, label=label,
               yerr=np.asarray(err) if key == "random" else None, capsize=3)
        for xi, v in zip(x + (j - 1.5) * w, vals):
            if not np.isfinite(v):
                ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.axhline(0, color="0.3", lw=0.7)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel("ICL score (nats; more negative = more ICL)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"ICL at the final snapshot, {'pattern-preserving' if mode == 'pp' else 'full'} ablation",
                 fontsize=10)
    fig.tight_layout()
    return fig

"""Figures of chapter 5 (Argument 5, mechanism). Data come from :mod:`icl_core.mechanism`."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from ..heads import INDUCTION_THRESHOLD
from .common import finish, shade_window, visible_token

SCORE_LABELS = {"prefix": "prefix-matching score", "prev_token": "previous-token score",
                "ov_eigen": "OV eigenvalue copying score\nΣλ / Σ|λ|", "k_comp": "K-composition trace\n(normalised, Σλ / Σ|λ|)",
                "copying": "empirical copying score"}


def plot_scores_over_training(scores: dict[str, dict], keys=("prefix", "ov_eigen", "k_comp"),
                              title: str = "") -> plt.Figure:
    """Rows: models; columns: per-head scores over training (``mechanism.scores_over_training``).
    Induction heads (the kind the scores carry, :mod:`icl_core.heads`) are drawn thick and red-toned, other
    heads thin and
    grey; the phase-change window is shaded."""
    names = list(scores)
    fig, axes = plt.subplots(len(names), len(keys), figsize=(4.1 * len(keys), 2.5 * len(names)), dpi=90,
                             squeeze=False)
    reds = plt.get_cmap("autumn")
    for i, name in enumerate(names):
        s = scores[name]
        t = np.asarray(s["tokens"], dtype=float)
        keep = t > 0
        kind = s["kind"]
        for j, key in enumerate(keys):
            ax = axes[i, j]
            v = np.asarray(s[key], dtype=float)
            if not np.isfinite(v).any():
                ax.text(0.5, 0.5, "not defined:\nno heads in layers ≥ 1", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, color="0.4")
                ax.set_title(f"{name}: {SCORE_LABELS.get(key, key).splitlines()[0]}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            shade_window(ax, s["window"])
            n_ind = 0
            for l in range(v.shape[1]):
                for h in range(v.shape[2]):
                    y = v[keep, l, h]
                    if not np.isfinite(y).any():
                        continue
                    if kind[l, h] == "induction":
                        ax.plot(t[keep], y, lw=2, color=reds(0.15 * n_ind), label=f"L{l}H{h} (induction)")
                        n_ind += 1
                    elif kind[l, h] == "previous-token":
                        ax.plot(t[keep], y, lw=1.2, color="tab:blue", alpha=0.8, label=f"L{l}H{h} (prev-token)")
                    else:
                        ax.plot(t[keep], y, lw=0.7, color="0.65")
            ax.plot([], [], lw=0.7, color="0.65", label="other heads")
            ax.set_xscale("log")
            if key in ("ov_eigen", "k_comp"):
                ax.axhline(0, color="0.3", lw=0.6)
                ax.set_ylim(-1.05, 1.05)
            else:
                ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(SCORE_LABELS.get(key, key), fontsize=8)
            ax.set_xlabel("training tokens")
            ax.set_title(f"{name}: {SCORE_LABELS.get(key, key).splitlines()[0]}", fontsize=9)
            if j == len(keys) - 1:
                ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_composition_heatmaps(comp: dict, layers=(0, 1), snapshot: int = -1, title: str = "") -> plt.Figure:
    """Q, K and V composition scores between the heads of two layers at one snapshot (rows:
    earlier head, columns: later head). The colour scale is centred on the random-matrix baseline,
    so blue = below and red = above it."""
    l1, l2 = layers
    base = comp["baseline"]
    mats = {k: np.asarray(comp[k][snapshot, l1, :, l2, :], dtype=float) for k in "QKV"}
    vmax = max(float(np.nanmax(list(mats.values()))), 2 * base)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=90)
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vmin=0, vcenter=base, vmax=vmax)
    for ax, (k, m) in zip(axes, mats.items()):
        im = ax.imshow(m, cmap="RdBu_r", norm=norm)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_xlabel(f"layer {l2} head (reads)")
        ax.set_ylabel(f"layer {l1} head (writes)")
        ax.set_title(f"{k}-composition", fontsize=10)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.02, label=f"score (baseline {base:.3f} = white)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_composition_over_training(comp: dict, pair: tuple[tuple[int, int], tuple[int, int]], window=None,
                                   title: str = "") -> plt.Figure:
    """Q/K/V composition between one earlier head and one later head over training, with the
    random-matrix baseline and the largest score of any pair of heads for comparison."""
    (l1, h1), (l2, h2) = pair
    t = np.asarray(comp["tokens"], dtype=float)
    keep = t > 0
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=90)
    shade_window(ax, window)
    for k, col in zip("QKV", ("tab:green", "tab:red", "tab:purple")):
        v = np.asarray(comp[k], dtype=float)
        ax.plot(t[keep], v[keep, l1, h1, l2, h2], color=col, lw=2, label=f"{k}: L{l1}H{h1} → L{l2}H{h2}")
        ax.plot(t[keep], np.nanmax(v[keep].reshape(keep.sum(), -1), 1), color=col, lw=0.8, ls=":",
                label=f"{k}: max over all pairs")
    ax.axhline(comp["baseline"], color="0.3", ls="--", lw=0.9, label="random-matrix baseline")
    return finish(fig, ax, "training tokens", "composition score", title or "composition over training", legend_ncol=2)


def plot_token_circuit(m, labels: list[str], title: str = "", xlabel: str = "key: previous token b",
                       ylabel: str = "query: current token a") -> plt.Figure:
    """A token x token circuit (e.g. W_E W_Q (W_E W_OV^prev W_K)^T) on frequent tokens; an
    induction circuit is a bright diagonal."""
    m = np.asarray(m, dtype=float)
    v = float(np.abs(m).max()) or 1.0
    fig, ax = plt.subplots(figsize=(6.6, 5.8), dpi=90)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([visible_token(s) for s in labels], rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([visible_token(s) for s in labels], fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention score (logits)")
    fig.tight_layout()
    return fig


def plot_positional_attention(curves: dict[str, dict], title: str = "") -> plt.Figure:
    """Attention by relative offset (0 = own token, 1 = previous token) for some heads: from the
    positional QK weights alone (solid, where the model has positional vectors) and measured on
    text (dashed)."""
    fig, ax = plt.subplots(figsize=(6.2, 3.4), dpi=90)
    for i, (name, c) in enumerate(curves.items()):
        col = plt.get_cmap("tab10")(i)
        if c.get("weights") is not None:
            ax.plot(c["offsets"], c["weights"], marker="o", color=col, label=f"{name}: positional QK weights")
        if c.get("empirical") is not None:
            ax.plot(c["offsets"], c["empirical"], marker="s", ls="--", color=col, label=f"{name}: measured on text")
    ax.set_xlabel("relative offset (query position − key position)")
    ax.set_ylabel("mean attention")
    ax.set_ylim(0, 1)
    ax.set_xticks(list(next(iter(curves.values()))["offsets"]))
    ax.set_title(title or "attention by relative offset", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_smear(sm: dict, window=None, kind=None, title: str = "") -> plt.Figure:
    """σ(α) per head over training: the weight of a key's own token (1 = vanilla; smaller = the key
    mixes in the previous token, what an induction head in one layer needs)."""
    t = np.asarray(sm["tokens"], dtype=float)
    keep = t > 0
    s = sm["sigma"]
    fig, ax = plt.subplots(figsize=(6.2, 3.4), dpi=90)
    shade_window(ax, window)
    for l in range(s.shape[1]):
        for h in range(s.shape[2]):
            ind = kind is not None and kind[l, h] == "induction"
            ax.plot(t[keep], s[keep, l, h], lw=2 if ind else 1, label=f"L{l}H{h}" + (" (induction)" if ind else ""))
    ax.set_ylim(0, 1.02)
    return finish(fig, ax, "training tokens", "σ(α): weight of the key's own token",
                  title or "smeared keys over training", legend_ncol=2)


def plot_agreement(scores: dict[str, dict], title: str = "") -> plt.Figure:
    """Every head of every model at the last snapshot: the prefix-matching score against the OV
    copying score (left, all heads) and the K-composition trace (right, layers >= 1)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for i, (name, s) in enumerate(scores.items()):
        pm = np.asarray(s["prefix"][-1], dtype=float)
        for ax, key in zip(axes, ("ov_eigen", "k_comp")):
            v = np.asarray(s[key][-1], dtype=float)
            ok = np.isfinite(v)
            ax.scatter(pm[ok], v[ok], marker="osD^vP"[i % 6], s=30, edgecolors="k", linewidths=0.4, label=name)
    for ax, key in zip(axes, ("ov_eigen", "k_comp")):
        ax.axvline(INDUCTION_THRESHOLD, color="tab:red", ls=":", lw=0.8, label=f"induction threshold ({INDUCTION_THRESHOLD})")
        ax.axhline(0, color="0.4", lw=0.6)
        ax.set_xlabel("prefix-matching score")
        ax.set_ylabel(SCORE_LABELS[key])
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=7)
    axes[0].set_title("OV copying vs prefix matching (all heads)", fontsize=10)
    axes[1].set_title("K-composition vs prefix matching (layers ≥ 1)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_circuit_timing(scores: dict[str, dict], circuits: dict[str, dict], title: str = "") -> plt.Figure | None:
    """One panel per model: the top induction head's prefix score, its eigenvalue scores (dashed:
    OV Σλ/Σ|λ|, K-composition trace) and the token-level circuit readouts (solid: fraction of
    frequent tokens copied by the OV circuit, fraction of K-composition-circuit rows peaking on the
    diagonal) over training, with the phase-change window shaded (``mechanism.circuits_over_training``).
    Panels wrap into rows of two so that the figure stays readable at the page's width; the legend
    sits below them. None when there is no circuit to time."""
    names = list(circuits)
    if not names:
        return None
    ncols = min(2, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.3 * nrows + 0.9), dpi=90, squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        s, c = scores[name], circuits[name]
        (l, h), prev = c["induction_head"], c["prev_head"]
        shade_window(ax, s["window"])
        t = np.asarray(s["tokens"], dtype=float)
        keep = t > 0
        ax.plot(t[keep], np.asarray(s["prefix"], dtype=float)[keep, l, h], color="k", lw=2.2, label="prefix-matching score")
        ax.plot(t[keep], np.asarray(s["ov_eigen"], dtype=float)[keep, l, h], color="tab:blue", ls="--", lw=1.1,
                label="OV eigenvalue score Σλ/Σ|λ|")
        if prev is not None:
            ax.plot(t[keep], np.asarray(s["k_comp"], dtype=float)[keep, l, h], color="tab:red", ls="--", lw=1.1,
                    label="K-composition trace Σλ/Σ|λ|")
        tc = np.asarray(c["tokens"], dtype=float)
        kc = tc > 0
        ax.plot(tc[kc], np.asarray(c["ov_copy"], dtype=float)[kc], color="tab:blue", lw=2,
                label="tokens the OV circuit copies (fraction)")
        if prev is not None:
            ax.plot(tc[kc], np.asarray(c["k_diag"], dtype=float)[kc], color="tab:red", lw=2,
                    label=f"K-comp. circuit rows on the diagonal\n(through L{prev[0]}H{prev[1]})")
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_xscale("log")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("training tokens")
        ax.set_title(f"`{name}`: induction head L{l}H{h}", fontsize=10)
    # one legend for every panel (the first panel with a previous-token head has every line)
    ax0 = max(axes.flat[:len(names)], key=lambda a: len(a.get_lines()))
    handles, labels = ax0.get_legend_handles_labels()
    fig.legend(handles, [lb.replace("\n", " ") for lb in labels], fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(title or "when the circuit forms", fontsize=11)
    fig.tight_layout(rect=(0, 0.9 / (3.3 * nrows + 0.9) + 0.02, 1, 1))
    return fig


# --- the chapter's figures, from icl_core.mechanism's results (None where there is nothing to draw) ---

def plot_focus_composition(c) -> plt.Figure | None:
    """:func:`plot_composition_heatmaps` of the followed model (a ``circuits.Composition``), last snapshot."""
    if c.focus is None:
        return None
    (li, _), prev = c.induction, c.prev
    return plot_composition_heatmaps(c.comp[c.focus], layers=(prev[0], li),
                                     title=f"`{c.focus}`, last snapshot: composition of layer {prev[0]} into layer {li}")


def plot_focus_composition_over_training(m, c) -> plt.Figure | None:
    """:func:`plot_composition_over_training` of the followed pair, with its model's window."""
    if c.focus is None or c.prev is None:
        return None
    return plot_composition_over_training(c.comp[c.focus], (c.prev, c.induction), window=m.scores[c.focus]["window"],
                                          title=f"`{c.focus}`: previous-token head → induction head, over training")


def plot_same_token_circuit(d: dict | None) -> plt.Figure | None:
    """:func:`plot_token_circuit` of ``mechanism.same_token_circuit``."""
    return None if d is None else plot_token_circuit(d["circuit"].numpy(), d["labels"], title=d["title"])


def plot_focus_positional(d: dict | None) -> plt.Figure | None:
    """:func:`plot_positional_attention` of ``mechanism.positional``."""
    return None if d is None else plot_positional_attention(d["curves"], title=d["title"])


def plot_smeared_head(d: dict | None) -> tuple[plt.Figure, plt.Figure] | None:
    """σ(α) over training and the top head's token QK circuit (``mechanism.smeared_head``)."""
    if d is None:
        return None
    s1, (l1, h1) = d["scores"], d["head"]
    return (plot_smear(d["smear"], window=s1["window"], kind=s1["kind"], title=f"`{d['name']}`: σ(α) per head"),
            plot_token_circuit(d["circuit"].numpy(), d["labels"], xlabel="key token b",
                               title=f"`{d['name']}` L{l1}H{h1}: token QK circuit W_E W_Q (W_E W_K)^T"))

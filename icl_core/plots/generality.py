"""Figures of chapter 4 (Argument 4, generality). Data come from :mod:`icl_core.generality`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..heads import INDUCTION_THRESHOLD
from .common import visible_token
from .intro import ATTN_CMAP

KIND_COLOURS = {"induction": "tab:red", "previous-token": "tab:blue", "other": "0.6"}
MARKERS = "osD^vP*X"


def plot_copying_vs_prefix(heads: pd.DataFrame, prefix_threshold: float = INDUCTION_THRESHOLD, title: str = "") -> plt.Figure:
    """Empirical copying score vs prefix-matching score, one point per head of every model
    (``generality.head_table``); colour = head class, marker = model."""
    fig, ax = plt.subplots(figsize=(6.2, 4.2), dpi=90)
    models = list(dict.fromkeys(heads["model"]))
    for i, m in enumerate(models):
        for kind, col in KIND_COLOURS.items():
            d = heads[(heads.model == m) & (heads.kind == kind)]
            if len(d):
                ax.scatter(d["prefix"], d["copying"], c=col, marker=MARKERS[i % len(MARKERS)], s=38,
                           edgecolors="k", linewidths=0.4, label=f"{m}: {kind}")
    for _, r in heads[heads.kind == "induction"].iterrows():
        ax.annotate(f"{r.model} L{r.layer}H{r['head']}", (r.prefix, r.copying), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axvline(prefix_threshold, color="tab:red", ls=":", lw=0.8)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("prefix-matching score (0 to 1)")
    ax.set_ylabel("copying score (−1 to 1)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(title or "every head at the last snapshot: copying vs prefix matching", fontsize=10)
    ax.legend(fontsize=6.5, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def plot_repeated_passage(rp: dict, dla: pd.DataFrame, title: str = "", max_tokens: int = 160) -> plt.Figure:
    """Left: the top induction head's attention on a repeated real passage. Middle: its direct
    logit attribution to each actual next token along the sequence (the second copy starts at the
    dashed line). Right: every head's mean attribution on the first vs the second copy, with 95%
    bootstrap intervals over passages (``generality.dla_by_copy``)."""
    l, h = rp["head"]
    pat = rp["pattern"][:max_tokens, :max_tokens]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=90, gridspec_kw={"width_ratios": [1, 1.3, 1.3]})
    im = axes[0].imshow(pat, cmap=ATTN_CMAP, vmin=0, vmax=1, interpolation="nearest")
    b = rp["b_start"]
    for ax_line in (axes[0].axhline, axes[0].axvline):
        ax_line(b - 0.5, color="0.5", ls="--", lw=0.7)
    axes[0].set_xlabel("key position")
    axes[0].set_ylabel("query position")
    axes[0].set_title(f"L{l}H{h} attention", fontsize=10)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04, label="attention")
    y = rp["dla"][l, h]
    axes[1].plot(np.arange(1, len(y) + 1), y, lw=0.9, color="tab:red")
    axes[1].axvline(b, color="0.5", ls="--", lw=0.7, label="second copy starts")
    axes[1].axhline(0, color="0.6", lw=0.6)
    axes[1].set_xlabel("position of the predicted token")
    axes[1].set_ylabel("direct logit attribution (logits)")
    axes[1].set_title(f"L{l}H{h}: direct effect on the correct next token", fontsize=10)
    axes[1].legend(fontsize=8)
    d = dla[dla["copy"] != "difference"]
    labels = [f"L{r.layer}H{r.head}" for r in d[d["copy"] == "first copy"].itertuples()]
    x = np.arange(len(labels))
    for k, (copy, col) in enumerate((("first copy", "0.6"), ("second copy", "tab:red"))):
        e = d[d["copy"] == copy]
        axes[2].bar(x + (k - 0.5) * 0.38, e["dla"], width=0.38, color=col, label=copy,
                    yerr=[e["dla"] - e["lo"], e["hi"] - e["dla"]], capsize=2, error_kw={"lw": 0.8})
    axes[2].set_xticks(x)
    axes[2].set_xticklabels(labels, rotation=90, fontsize=8)
    axes[2].axhline(0, color="0.6", lw=0.6)
    axes[2].set_ylabel("mean direct logit attribution")
    axes[2].set_title("every head, first vs second copy (95% CI)", fontsize=10)
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_translation_attention(cross: dict | None) -> plt.Figure | None:
    """:func:`plot_cross_attention` of :func:`icl_core.generality.cross_attention` (None: nothing to draw)."""
    if cross is None:
        return None
    return plot_cross_attention(cross["pattern"], cross["example"], cross["tokens"], title=cross["title"])


def plot_cross_attention(pattern: np.ndarray, example, tokens: list[str], n_words: int = 28,
                         title: str = "") -> plt.Figure:
    """The head's attention from the start of version B (rows) onto the start of version A
    (columns); circles mark each query's aligned target (the word of A that B continues with)."""
    b0 = example.b_start
    na = min(n_words, b0 - 1)
    nb = min(n_words, len(tokens) - b0)
    sub = pattern[b0:b0 + nb, 1:1 + na]
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=90)
    im = ax.imshow(sub, cmap=ATTN_CMAP, vmin=0, vmax=max(0.05, float(sub.max())), interpolation="nearest")
    ax.set_xticks(range(na))
    ax.set_xticklabels([visible_token(t) for t in tokens[1:1 + na]], rotation=90, fontsize=7)
    ax.set_yticks(range(nb))
    ax.set_yticklabels([visible_token(t) for t in tokens[b0:b0 + nb]], fontsize=7)
    for q, t in zip(example.queries, example.targets):
        if b0 <= q < b0 + nb and 1 <= t < 1 + na:
            ax.scatter(t - 1, q - b0, s=40, facecolors="none", edgecolors="tab:red", linewidths=1.0)
    ax.scatter([], [], s=40, facecolors="none", edgecolors="tab:red", label="aligned target")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_xlabel("key: token of version A")
    ax.set_ylabel("query: token of version B")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention")
    fig.tight_layout()
    return fig


def plot_paired_tasks(rows: dict[str, pd.DataFrame], title: str = "") -> plt.Figure:
    """Per task and model: the top induction head's attention on the aligned word (points, 95%
    CI) against its chance level (grey bars: uniform attention), and the loss benefit on B of
    having A in context (nats, 95% CI; chance = 0)."""
    models = list(rows)
    tasks = list(dict.fromkeys(t for r in rows.values() for t in r["task"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), dpi=90)
    w = 0.8 / max(1, len(models))
    x = np.arange(len(tasks))
    for i, m in enumerate(models):
        r = rows[m].set_index("task").reindex(tasks)
        xs = x - 0.4 + w * (i + 0.5)
        axes[0].bar(xs, r["attention_chance"], width=w * 0.9, color="0.85", edgecolor="0.6",
                    label="chance (uniform)" if i == 0 else None)
        axes[0].errorbar(xs, r["attention"], yerr=[r["attention"] - r["attention_lo"], r["attention_hi"] - r["attention"]],
                         fmt=MARKERS[i % len(MARKERS)], ms=5, capsize=2, label=m)
        axes[1].errorbar(xs, r["loss_benefit"],
                         yerr=[r["loss_benefit"] - r["loss_benefit_lo"], r["loss_benefit_hi"] - r["loss_benefit"]],
                         fmt=MARKERS[i % len(MARKERS)], ms=5, capsize=2, label=m)
    axes[0].set_ylabel("attention on the aligned word of A")
    axes[0].set_yscale("log")
    axes[0].set_title("top induction head: where it looks in A", fontsize=10)
    axes[1].axhline(0, color="0.4", lw=0.8, label="chance (no benefit)")
    axes[1].set_ylabel("loss(B | unrelated A) − loss(B | A) (nats)")
    axes[1].set_title("does A in context help predict B?", fontsize=10)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(tasks, rotation=20, fontsize=8)
        ax.set_xlabel("what B is")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_pattern_accuracy(acc: dict[str, pd.DataFrame], title: str = "") -> plt.Figure:
    """Label accuracy (argmax over the four label tokens) against the item's index in the
    sequence, with 95% bootstrap intervals over sequences; chance = 1/4."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=90)
    for i, (m, d) in enumerate(acc.items()):
        ax.plot(d["item"], d["accuracy"], marker=MARKERS[i % len(MARKERS)], ms=3, label=m)
        ax.fill_between(d["item"], d["lo"], d["hi"], alpha=0.15)
    ax.axhline(0.25, color="0.3", ls="--", lw=0.8, label="chance (1/4)")
    ax.set_xlabel("item index in the sequence (examples seen before it = index − 1)")
    ax.set_ylabel("label accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title or "pattern task: accuracy vs number of in-context examples", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_pattern_attention(summaries: dict[str, dict], title: str = "") -> plt.Figure:
    """Per model, the top induction head's attention share from the ':' position onto earlier
    items with the same label (and onto their label tokens only), against chance, 95% CI."""
    models = list(summaries)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    x = np.arange(len(models))
    for k, (key, name, col) in enumerate((("share", "whole items", "tab:purple"),
                                          ("label_share", "label tokens only", "tab:orange"))):
        v = np.array([summaries[m][key] for m in models])
        lo = np.array([summaries[m][f"{key}_lo"] for m in models])
        hi = np.array([summaries[m][f"{key}_hi"] for m in models])
        ch = np.array([summaries[m][f"{key}_chance"] for m in models])
        xs = x + (k - 0.5) * 0.36
        ax.bar(xs, ch, width=0.34, color="0.88", edgecolor="0.6", label="chance" if k == 0 else None)
        ax.errorbar(xs, v, yerr=[v - lo, hi - v], fmt="o", color=col, capsize=3, label=f"share on {name}")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{m}\nL{summaries[m]['head'][0]}H{summaries[m]['head'][1]}" for m in models], fontsize=8)
    ax.set_xlabel("model and its top induction head")
    ax.set_ylabel("share of attention on same-label items")
    ax.set_ylim(0, 1)
    ax.set_title(title or "pattern task: does the head look at examples of the same category?", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

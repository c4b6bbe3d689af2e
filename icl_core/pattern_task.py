"""The paper's abstract pattern-matching task (Argument 4), built from words of the book's corpus.

Each item is two words and a label; the label depends only on the words' categories
(:data:`PATTERN_AXES`: 2 categories x 2 categories -> labels 0-3). :func:`pattern_task` builds
sequences of items, :func:`pattern_matching` measures how much the top induction head attends to
earlier items with the same label, and :func:`accuracy_by_item` how well the model predicts labels.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from . import data as D
from . import hooks as Hk
from .heads import top_induction_head
from . import verdicts as V
from .stats import bootstrap_ci
from .runs import Run


# [book choice] hand-written categories of words that occur in the Bible text of the corpus; the
# paper used (month | colour) x (animal | fruit). Words that are single tokens come first.
CATEGORIES = {
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twenty", "hundred"],
    "kin": ["father", "mother", "son", "daughter", "brother", "sister", "wife", "husband", "king", "servant"],
    "animal": ["sheep", "ox", "ass", "goat", "lamb", "camel", "horse", "lion", "dog", "cattle"],
    "material": ["gold", "silver", "brass", "iron", "wood", "stone", "water", "bread", "wine", "oil"],
}
PATTERN_AXES = (("number", "kin"), ("animal", "material"))  # label = 2 * first axis + second axis


def category_words(corpus, k: int = 6) -> dict[str, list[str]]:
    """The ``k`` words of each category with the fewest tokens (ties: list order)."""
    out = {}
    for cat, ws in CATEGORIES.items():
        out[cat] = sorted(ws, key=lambda w: len(corpus.encode(" " + w)))[:k]
    return out


def pattern_task(corpus, n_seqs: int, n_items: int, seed: int = 0, k_words: int = 6) -> dict:
    """Sequences of items ``"<x> <y>:<label>\\n"``: x from category number|kin, y from
    animal|material, label = 2*[x is kin] + [y is material] written as one digit token 0-3.

    Returns tokens (N, T), colon (N, K) positions of ':' (where the label is predicted), labels
    (N, K), label_pos (N, K) positions of the label tokens, item_span (N, K, 2) [start, end) of each
    item, label_ids (4,) token ids of '0'..'3', and the words used.
    """
    cw = category_words(corpus, k_words)
    label_ids = []
    for d in "0123":
        ids = corpus.encode(d)
        if len(ids) != 1:
            raise ValueError(f"label {d!r} is not a single token in this vocabulary")
        label_ids.append(ids[0])
    colon, nl = corpus.encode(":"), corpus.encode("\n")
    g = np.random.default_rng(seed)
    rows, col, lab, lpos, span = [], [], [], [], []
    for _ in range(n_seqs):
        seq = [D.EOS_ID]
        c_, l_, p_, s_ = [], [], [], []
        for _ in range(n_items):
            a, b = int(g.integers(2)), int(g.integers(2))
            x = cw[PATTERN_AXES[0][a]][int(g.integers(len(cw[PATTERN_AXES[0][a]])))]
            y = cw[PATTERN_AXES[1][b]][int(g.integers(len(cw[PATTERN_AXES[1][b]])))]
            start = len(seq)
            seq += corpus.encode(x) + corpus.encode(" " + y) + colon
            c_.append(len(seq) - 1)
            p_.append(len(seq))
            seq += [label_ids[2 * a + b]] + nl
            l_.append(2 * a + b)
            s_.append((start, len(seq)))
        rows.append(seq)
        col.append(c_)
        lab.append(l_)
        lpos.append(p_)
        span.append(s_)
    T = max(len(r) for r in rows)
    if any(len(r) != T for r in rows):  # pad (never read: all positions used are inside each row)
        rows = [r + nl * (T - len(r)) for r in rows]
    return {"tokens": torch.tensor(rows), "colon": np.array(col), "labels": np.array(lab),
            "label_pos": np.array(lpos), "item_span": np.array(span), "label_ids": np.array(label_ids),
            "words": cw}


def items_that_fit(corpus, n_ctx: int, k_words: int = 6, max_items: int = 40) -> int:
    """The number of items whose longest possible sequence fits the context."""
    cw = category_words(corpus, k_words)
    lx = max(len(corpus.encode(w)) for c in PATTERN_AXES[0] for w in cw[c])
    ly = max(len(corpus.encode(" " + w)) for c in PATTERN_AXES[1] for w in cw[c])
    per = lx + ly + len(corpus.encode(":")) + 1 + len(corpus.encode("\n"))
    return int(min(max_items, (n_ctx - 1) // per))


def same_label_shares(pattern: np.ndarray, task_row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For one sequence and one head's pattern (T, T): for each item k >= 1, the share of the
    attention from its ':' position that lands on tokens of earlier items with the same label
    (among attention on all earlier items' tokens), and its chance level (the same share under
    uniform attention: the fraction of earlier item tokens that belong to same-label items).
    Also the same two numbers counting only the earlier label tokens."""
    col, lab, span, lpos = task_row["colon"], task_row["labels"], task_row["item_span"], task_row["label_pos"]
    sh, ch, lsh, lch = [], [], [], []
    for k in range(1, len(col)):
        q = col[k]
        same = np.zeros(pattern.shape[1], dtype=bool)
        anyi = np.zeros_like(same)
        for j in range(k):
            a, b = span[j]
            anyi[a:b] = True
            if lab[j] == lab[k]:
                same[a:b] = True
        tot = pattern[q, anyi].sum()
        sh.append(pattern[q, same].sum() / tot if tot > 0 else np.nan)
        ch.append(same.sum() / anyi.sum())
        lp = lpos[:k]
        ls = lab[:k] == lab[k]
        ltot = pattern[q, lp].sum()
        lsh.append(pattern[q, lp[ls]].sum() / ltot if ltot > 0 else np.nan)
        lch.append(ls.mean())
    return np.array(sh), np.array(ch), np.array(lsh), np.array(lch)


@torch.no_grad()
def pattern_matching(run: Run, n_seqs: int = 64, n_items: int | None = None, step: int | None = None,
                     seed: int = 0) -> dict:
    """The pattern task on one model: accuracy (argmax over the four label tokens at each ':') by
    item index, and the top induction head's same-label attention share vs chance.

    Returns accuracy (N, K), share/chance (N, K-1) per item for the whole items and for the label
    tokens, per-head mean share minus chance (L, H), a summary row and ``seconds``."""
    t0 = time.time()
    corpus = run.corpus
    K = n_items or items_that_fit(corpus, run.config.model.n_ctx)
    task = pattern_task(corpus, n_seqs, K, seed)
    model = run.load(step)
    l, h, _ = top_induction_head(run, step)
    x = task["tokens"]
    acc = np.zeros((n_seqs, K))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    share, chance, lshare, lchance = (np.zeros((n_seqs, K - 1)) for _ in range(4))
    heads_gain = np.zeros((n_seqs, n_layers, n_heads))
    for i in range(0, n_seqs, 16):
        xb = x[i:i + 16]
        with Hk.cache_patterns(model) as c:
            logits = model(xb)
        pats = Hk.stack_patterns(model, c).float().numpy()  # (B, L, H, T, T)
        for b in range(len(xb)):
            n = i + b
            row = {k: task[k][n] for k in ("colon", "labels", "item_span", "label_pos")}
            lg = logits[b, row["colon"]][:, task["label_ids"]]  # (K, 4)
            acc[n] = (lg.argmax(-1).numpy() == row["labels"])
            for ll in range(n_layers):
                for hh in range(n_heads):
                    s, cc, ls, lc = same_label_shares(pats[b, ll, hh], row)
                    heads_gain[n, ll, hh] = np.nanmean(s - cc)
                    if (ll, hh) == (l, h):
                        share[n], chance[n], lshare[n], lchance[n] = s, cc, ls, lc
    late = slice(K // 2, K)
    a, alo, ahi = bootstrap_ci(acc[:, late].mean(1), seed=seed)
    s, slo, shi = bootstrap_ci(np.nanmean(share - chance, 1), seed=seed)
    ch = float(np.nanmean(chance))
    ls_, lslo, lshi = bootstrap_ci(np.nanmean(lshare - lchance, 1), seed=seed)
    lch = float(np.nanmean(lchance))
    summary = {"n_seqs": n_seqs, "n_items": K, "head": (l, h),
               "accuracy": a, "accuracy_lo": alo, "accuracy_hi": ahi, "accuracy_chance": 0.25,
               "accuracy_verdict": V.measurement(a, alo, ahi, 0.25, V.SHARE_MARGIN),
               "share": s + ch, "share_lo": slo + ch, "share_hi": shi + ch, "share_chance": ch,
               "share_verdict": V.measurement(s + ch, slo + ch, shi + ch, ch, V.SHARE_MARGIN),
               "label_share": ls_ + lch, "label_share_lo": lslo + lch, "label_share_hi": lshi + lch,
               "label_share_chance": lch,
               "label_share_verdict": V.measurement(ls_ + lch, lslo + lch, lshi + lch, lch, V.SHARE_MARGIN)}
    return {"accuracy": acc, "share": share, "chance": chance, "label_share": lshare, "label_chance": lchance,
            "heads_gain": heads_gain.mean(0), "summary": summary, "task": task, "seconds": time.time() - t0}


def accuracy_by_item(acc: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """Accuracy at each item index (1 = no earlier example), with bootstrap intervals over sequences."""
    rows = []
    for k in range(acc.shape[1]):
        m, lo, hi = bootstrap_ci(acc[:, k], seed=seed)
        rows.append({"item": k + 1, "accuracy": m, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)



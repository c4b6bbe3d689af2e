"""Chapter 4 (Argument 4, generality): do the same heads do more than literal copying?

The paper shows, in a 13B model, heads with high prefix-matching scores that also copy literally,
"translate" and complete abstract patterns. This module builds the small-model analogues from the
book's own corpus and measures them, each against a chance baseline with an interval over examples:

* :func:`head_table`: copying vs prefix-matching score of every head (the paper's two properties).
* :func:`paired_passages`: a passage A followed by a variant B of it (an exact repeat, a case
  variant, the same verses in another Bible version). Where does the top induction head attend
  when it predicts the next word of B (the corresponding word of A, vs uniform attention), and does
  the loss on B fall because A is in context (vs an unrelated passage of the same length)?
* :func:`direct_logit_attribution`: each head's direct contribution to the correct next token.
* :func:`pattern_task` / :func:`pattern_matching`: the paper's abstract pattern task
  (two categories x two categories -> labels 0-3), from words of the corpus.
* :func:`summary_table` / :func:`behaviour_sentences`: what reproduces at this scale.

[book choice]s are listed in the chapter; the word-alignment rule is :func:`align_words`.
"""
from __future__ import annotations

import difflib
import functools
import re
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import analysis as A
from . import data as D
from . import hooks as Hk
from .heads import INDUCTION_THRESHOLD, PREV_TOKEN_THRESHOLD, classify_heads, top_induction_head
from .model import Transformer, loss_fn
from .runs import Run

# --- statistics ---------------------------------------------------------------------------------


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap interval of the mean over examples."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def verdict(lo: float, hi: float, chance: float, higher_is_better: bool = True) -> str:
    """'above chance' when the whole interval clears the chance level, 'at chance' when it contains
    it, 'below chance' otherwise (NaN interval: 'undetermined')."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "undetermined"
    if not higher_is_better:
        lo, hi, chance = -hi, -lo, -chance
    if lo > chance:
        return "above chance"
    if hi < chance:
        return "below chance"
    return "at chance"


# --- heads ---------------------------------------------------------------------------------------


def head_table(runs: dict[str, Run], prefix_threshold: float = INDUCTION_THRESHOLD,
               prev_threshold: float = PREV_TOKEN_THRESHOLD) -> pd.DataFrame:
    """One row per head of every run at its last snapshot: prefix-matching, previous-token,
    empirical copying and OV-eigenvalue copying scores, and the head's class
    (:func:`icl_core.heads.classify_heads`)."""
    rows = []
    for name, run in runs.items():
        s = A.head_scores(run, [run.steps[-1]])
        lab = classify_heads(s["prefix"][0], s["prev_token"][0], prefix_threshold, prev_threshold)
        n_layers, n_heads = lab.shape
        for l in range(n_layers):
            for h in range(n_heads):
                rows.append({"model": name, "layer": l, "head": h,
                             "prefix": float(s["prefix"][0, l, h]), "prev_token": float(s["prev_token"][0, l, h]),
                             "copying": float(s["copying"][0, l, h]), "ov_eigen": float(s["ov_eigen"][0, l, h]),
                             "kind": lab[l, h], "seconds": float(s["seconds"])})
    return pd.DataFrame(rows)


# --- text: parallel verses, passages, word alignment --------------------------------------------


WORD = re.compile(r"[A-Za-z0-9]+")


def words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, normalised word) for every maximal run of ASCII letters/digits, lower-cased."""
    return [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text)]


def align_words(words_a: list[str], words_b: list[str], rule: str = "match") -> list[tuple[int, int]]:
    """Word alignment between two versions, as (index in A, index in B) pairs, monotone.

    ``rule='match'`` [book choice]: case-insensitive exact matches found by
    ``difflib.SequenceMatcher`` (longest matching blocks, no junk heuristic): a word of B is aligned
    only if the same word sits in the same place of the common subsequence of A. ``rule='position'``:
    word i of A with word i of B (for texts made by changing each word's case or spelling).
    """
    if rule == "position":
        return [(i, i) for i in range(min(len(words_a), len(words_b)))]
    if rule != "match":
        raise ValueError(f"unknown alignment rule {rule!r}")
    sm = difflib.SequenceMatcher(None, words_a, words_b, autojunk=False)
    return [(blk.a + k, blk.b + k) for blk in sm.get_matching_blocks() for k in range(blk.size)]


def token_spans(corpus_or_tok, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and, for each character, the index of the token that holds it."""
    tok = getattr(corpus_or_tok, "tokenizer", corpus_or_tok)
    enc = tok.encode(text)
    owner = np.full(len(text), -1, dtype=np.int64)
    for i, (a, b) in enumerate(enc.offsets):
        owner[a:b] = i
    # characters without a token of their own (never with byte-level BPE) take the next token's
    for c in range(len(text) - 1, -1, -1):
        if owner[c] < 0:
            owner[c] = owner[c + 1] if c + 1 < len(text) else len(enc.ids) - 1
    return list(enc.ids), owner


def is_held_out(chapter: int, cfg) -> bool:
    """A Bible chapter is held out when its split key is in the validation split."""
    return D.is_validation("bible/%05d" % chapter, cfg)


def parallel_passages(version_a: str, version_b: str, corpus: D.Corpus, data_cfg, n: int,
                      max_tokens: int, seed: int = 0) -> list[dict]:
    """Up to ``n`` passages of consecutive verses (from verse 1 of a chapter) present in both
    versions, each at most ``max_tokens`` tokens in version A. Held-out (validation) chapters come
    first; training chapters only fill up if there are too few. One passage per chapter, so the
    examples are independent."""
    va, vb = D.bible_verses_cached(version_a), D.bible_verses_cached(version_b)
    common = sorted(set(va) & set(vb))
    chapters: dict[int, list[int]] = {}
    for vid in common:
        chapters.setdefault(vid // 1000, []).append(vid)
    order = list(chapters)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda ch: not is_held_out(ch, data_cfg))  # stable: held-out first
    out = []
    for ch in order:
        ta, tb, nt = [], [], 0
        for vid in chapters[ch]:
            k = len(corpus.encode(" " + va[vid]))
            if nt + k > max_tokens:
                break
            ta.append(va[vid])
            tb.append(vb[vid])
            nt += k
        if len(ta) >= 1 and nt >= max_tokens // 3:
            out.append({"chapter": ch, "held_out": is_held_out(ch, data_cfg), "a": " ".join(ta),
                        "b": " ".join(tb), "n_verses": len(ta)})
        if len(out) >= n:
            break
    return out


@functools.lru_cache(maxsize=32)
def version_agreement(version_a: str, version_b: str) -> float:
    """Median similarity of 300 random verses with the same id in two versions
    (:func:`icl_core.data.verse_similarities`): near 0 when their verse ids do not line up."""
    return float(np.median(D.verse_similarities(version_a, version_b, n=300, seed=0)[1]))


MIN_AGREEMENT = 0.3  # [book choice] below this a version's verse ids are not treated as parallel


def title_case(text: str) -> str:
    """Capitalise the first letter of every word (a case variant with different tokens)."""
    return WORD.sub(lambda m: m.group()[0].upper() + m.group()[1:], text)


def upper_case(text: str) -> str:
    return text.upper()


@dataclass
class PairedExample:
    tokens: torch.Tensor  # (T,) BOS + A + B
    control: torch.Tensor  # (T,) BOS + unrelated A' of the same length + B
    b_start: int  # position of B's first token
    queries: np.ndarray  # positions predicting the first token of an aligned B word
    targets: np.ndarray  # the first token of the aligned A word (one per query)


def paired_example(corpus, text_a: str, text_b: str, control_tokens: list[int], n_ctx: int,
                   rule: str) -> PairedExample | None:
    """BOS + tokens(A) + tokens(" " + B), truncated to ``n_ctx``. For every word j+1 of B aligned
    to a word i' of A, the query is the position just before B word j+1's first token (where the
    model predicts it) and the target is A word i''s first token: the key an induction head
    would attend to if it matched the versions word by word. ``control_tokens`` replaces A (same
    length) for the loss comparison."""
    ids_a, own_a = token_spans(corpus, text_a)
    tb = " " + text_b
    ids_b, own_b = token_spans(corpus, tb)
    if len(control_tokens) < len(ids_a):
        return None
    T = min(n_ctx, 1 + len(ids_a) + len(ids_b))
    b0 = 1 + len(ids_a)
    if T - b0 < 4:
        return None
    wa, wb = words(text_a), words(tb)
    pairs = align_words([w for *_, w in wa], [w for *_, w in wb], rule)
    q, t = [], []
    for i, j in pairs:
        if j == 0:
            continue
        pos_b = b0 + int(own_b[wb[j][0]])
        pos_a = 1 + int(own_a[wa[i][0]])
        if pos_b - 1 >= b0 and pos_b < T:  # query inside B (not the boundary with A) and in context
            q.append(pos_b - 1)
            t.append(pos_a)
    seq = torch.tensor([D.EOS_ID] + ids_a + ids_b)[:T]
    ctl = torch.tensor([D.EOS_ID] + list(control_tokens[:len(ids_a)]) + ids_b)[:T]
    return PairedExample(seq, ctl, b0, np.asarray(q, dtype=np.int64), np.asarray(t, dtype=np.int64))


TASKS = {  # name: (how B is made from the passage, alignment rule, behaviour in the paper)
    "exact repeat": ("same", "position", "literal copying"),
    "Title Case": ("title", "position", "fuzzy copying"),
    "UPPER CASE": ("upper", "position", "fuzzy copying"),
}


@torch.no_grad()
def _paired_measures(model: Transformer, exs: list[PairedExample], head: tuple[int, int]) -> dict:
    """Per example: attention of ``head`` on the aligned targets, its chance level (uniform
    attention over the query's keys), the loss on B with A and with the control, and the mean of
    the same attention over all heads (L, H)."""
    l, h = head
    att, chance, loss_m, loss_c, allh = [], [], [], [], []
    for ex in exs:
        x = torch.stack([ex.tokens, ex.control])
        with Hk.cache_patterns(model) as c:
            logits = model(x)
        pat = Hk.stack_patterns(model, c)[0].float()  # (L, H, T, T) of the matched sequence
        lo = loss_fn(logits, x, reduction="none")  # (2, T-1); column i predicts token i+1
        sl = slice(ex.b_start, x.shape[1] - 1)  # predictions of B's tokens 2.. (B's first follows A)
        loss_m.append(float(lo[0, sl].mean()))
        loss_c.append(float(lo[1, sl].mean()))
        if len(ex.queries):
            a = pat[:, :, ex.queries, ex.targets]  # (L, H, Q)
            allh.append(a.mean(-1).numpy())
            att.append(float(a[l, h].mean()))
            chance.append(float(np.mean(1.0 / (ex.queries + 1))))
        else:
            att.append(np.nan)
            chance.append(np.nan)
    return {"attention": np.array(att), "chance": np.array(chance), "loss_with_a": np.array(loss_m),
            "loss_control": np.array(loss_c), "all_heads": np.mean(allh, 0) if allh else None}


def paired_passages(run: Run, version_a: str = "kjv", versions_b=("asv", "web", "bbe"),
                    n_examples: int = 32, step: int | None = None, seed: int = 0) -> dict:
    """Literal copying, case variants and parallel versions, measured on the top induction head.

    Returns {"rows": DataFrame (one row per task with value, interval and chance for the head's
    aligned attention and for the loss benefit), "per_head": {task: (L, H) mean aligned attention},
    "examples": {task: [PairedExample]}, "passages", "head", "seconds"}.
    """
    t0 = time.time()
    cfg = run.config
    corpus = run.corpus
    model = run.load(step)
    head = top_induction_head(run, step)
    budget = (cfg.model.n_ctx - 1) // 2 - 4
    ps = parallel_passages(version_a, version_a, corpus, cfg.data, n_examples + 1, budget, seed)
    if len(ps) < 2:
        raise ValueError(f"fewer than 2 parallel passages of {version_a} fit a context of {cfg.model.n_ctx}")
    enc = {p["chapter"]: corpus.encode(" " + p["a"]) for p in ps}
    chapters = [p["chapter"] for p in ps]

    def control_for(ch):  # unrelated text of the same version: the following passages, never chapter ch
        i = chapters.index(ch) if ch in chapters else -1
        others = [c for c in chapters[i + 1:] + chapters[:max(i, 0)] if c != ch]
        toks = [t for c in others for t in enc[c]]
        return toks[: budget + 8]

    tasks = dict(TASKS)
    agreement, excluded = {}, []
    for v in versions_b:
        agreement[v] = version_agreement(version_a, v)
        if agreement[v] < MIN_AGREEMENT:
            excluded.append(v)
            continue
        tasks[f"{version_a} → {v}"] = (v, "match", "translation analogue")
    rows, per_head, examples, passages = [], {}, {}, {}
    for name, (make, rule, behaviour) in tasks.items():
        exs = []
        if make in ("same", "title", "upper"):
            src = ps[:n_examples]
            fn = {"same": lambda s: s, "title": title_case, "upper": upper_case}[make]
            pairs = [(p["chapter"], p["a"], fn(p["a"])) for p in src]
        else:
            src = parallel_passages(version_a, make, corpus, cfg.data, n_examples, budget, seed)
            pairs = [(p["chapter"], p["a"], p["b"]) for p in src]
        for ch, ta, tb in pairs:
            ex = paired_example(corpus, ta, tb, control_for(ch), cfg.model.n_ctx, rule)
            if ex is not None:
                exs.append(ex)
        m = _paired_measures(model, exs, head[:2])
        a, alo, ahi = bootstrap_ci(m["attention"] - m["chance"], seed=seed)
        ch = float(np.nanmean(m["chance"]))
        benefit = m["loss_control"] - m["loss_with_a"]
        b, blo, bhi = bootstrap_ci(benefit, seed=seed)
        rows.append({"task": name, "behaviour": behaviour, "alignment": rule, "n": len(exs),
                     "held_out": float(np.mean([p["held_out"] for p in src])) if src else np.nan,
                     "attention": a + ch, "attention_lo": alo + ch, "attention_hi": ahi + ch, "attention_chance": ch,
                     "attention_verdict": verdict(alo + ch, ahi + ch, ch),
                     "loss_benefit": b, "loss_benefit_lo": blo, "loss_benefit_hi": bhi,
                     "loss_benefit_verdict": verdict(blo, bhi, 0.0),
                     "n_aligned": float(np.mean([len(e.queries) for e in exs])) if exs else 0.0})
        per_head[name] = m["all_heads"]
        examples[name] = exs
        passages[name] = pairs
    return {"rows": pd.DataFrame(rows), "per_head": per_head, "examples": examples, "passages": passages,
            "head": head, "agreement": agreement, "excluded": excluded, "seconds": time.time() - t0}


# --- direct logit attribution -------------------------------------------------------------------


@torch.no_grad()
def direct_logit_attribution(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, H, T-1): each head's direct-path contribution to the logit of the actual next token,
    minus its mean contribution over the vocabulary. The final LayerNorm is linearised at the
    clean run's scale (its centring and 1/std applied to each head's output, then its weight)."""
    names = Hk.result_names(model) + ["hook_resid_final"]
    with Hk.cache(model, names) as c:
        model(tokens)
    res = torch.stack([c[f"blocks.{l}.attn.hook_result"] for l in range(model.cfg.n_layers)], 1).float()
    # res (B, L, T, H, D)
    if model.cfg.layer_norm:
        r = c["hook_resid_final"].float()  # (B, T, D)
        std = (r.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # (B, T, 1)
        res = (res - res.mean(-1, keepdim=True)) / std[:, None, :, None, :]
        res = res * model.ln_final.w.float()
    W_U = model.W_U.float()
    W_c = W_U - W_U.mean(1, keepdim=True)  # centred over the vocabulary
    nxt = tokens[:, 1:]  # (B, T-1)
    cols = W_c[:, nxt]  # (D, B, T-1)
    out = torch.einsum("bltkd,dbt->blkt", res[:, :, :-1], cols)  # (B, L, H, T-1)
    return out


def repeated_passage(run: Run, example: PairedExample, step: int | None = None) -> dict:
    """Attention of the top induction head and each head's direct logit attribution on an exactly
    repeated real passage (an example of the 'exact repeat' task)."""
    model = run.load(step)
    l, h, _ = top_induction_head(run, step)
    x = example.tokens[None]
    with Hk.cache_patterns(model) as c:
        model(x)
    pat = Hk.stack_patterns(model, c)[0, l, h].float().numpy()
    dla = direct_logit_attribution(model, x)[0].numpy()  # (L, H, T-1)
    return {"pattern": pat, "dla": dla, "head": (l, h), "b_start": example.b_start,
            "tokens": [run.corpus.token_str(int(t)) for t in example.tokens]}


def dla_by_copy(run: Run, examples: list[PairedExample], step: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Mean direct logit attribution per head on the first vs the second copy of repeated passages,
    with intervals over passages: the second copy is where an induction head can help."""
    model = run.load(step)
    per = []
    for ex in examples:
        d = direct_logit_attribution(model, ex.tokens[None])[0]  # (L, H, T-1)
        b = ex.b_start
        n = len(ex.tokens) - b - 1
        first = d[:, :, 1:1 + n].mean(-1)  # predictions of A's tokens 2..: (L, H)
        second = d[:, :, b:b + n].mean(-1)  # predictions of B's tokens 2..
        per.append(torch.stack([first, second]).numpy())
    per = np.stack(per)  # (N, 2, L, H)
    rows = []
    for l in range(per.shape[2]):
        for h in range(per.shape[3]):
            for k, copy in enumerate(("first copy", "second copy")):
                m, lo, hi = bootstrap_ci(per[:, k, l, h], seed=seed)
                rows.append({"layer": l, "head": h, "copy": copy, "dla": m, "lo": lo, "hi": hi})
            m, lo, hi = bootstrap_ci(per[:, 1, l, h] - per[:, 0, l, h], seed=seed)
            rows.append({"layer": l, "head": h, "copy": "difference", "dla": m, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


# --- abstract pattern matching ------------------------------------------------------------------

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
               "accuracy_verdict": verdict(alo, ahi, 0.25),
               "share": s + ch, "share_lo": slo + ch, "share_hi": shi + ch, "share_chance": ch,
               "share_verdict": verdict(slo + ch, shi + ch, ch),
               "label_share": ls_ + lch, "label_share_lo": lslo + lch, "label_share_hi": lshi + lch,
               "label_share_chance": lch, "label_share_verdict": verdict(lslo + lch, lshi + lch, lch)}
    return {"accuracy": acc, "share": share, "chance": chance, "label_share": lshare, "label_chance": lchance,
            "heads_gain": heads_gain.mean(0), "summary": summary, "task": task, "seconds": time.time() - t0}


def accuracy_by_item(acc: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """Accuracy at each item index (1 = no earlier example), with bootstrap intervals over sequences."""
    rows = []
    for k in range(acc.shape[1]):
        m, lo, hi = bootstrap_ci(acc[:, k], seed=seed)
        rows.append({"item": k + 1, "accuracy": m, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


# --- what reproduces ------------------------------------------------------------------------------


def summary_table(paired: dict[str, dict], patterns: dict[str, dict], heads: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, measurement): value, 95% interval, chance and verdict, grouped by the
    paper's three behaviours."""
    rows = []
    for name, res in paired.items():
        l, h, pm = res["head"]
        for _, r in res["rows"].iterrows():
            rows.append({"model": name, "behaviour": r["behaviour"], "task": r["task"],
                         "measure": f"L{l}H{h} attention on the aligned word", "value": r["attention"],
                         "lo": r["attention_lo"], "hi": r["attention_hi"], "chance": r["attention_chance"],
                         "verdict": r["attention_verdict"], "n": r["n"]})
            rows.append({"model": name, "behaviour": r["behaviour"], "task": r["task"],
                         "measure": "loss benefit of A in context (nats)", "value": r["loss_benefit"],
                         "lo": r["loss_benefit_lo"], "hi": r["loss_benefit_hi"], "chance": 0.0,
                         "verdict": r["loss_benefit_verdict"], "n": r["n"]})
    for name, res in patterns.items():
        s = res["summary"]
        l, h = s["head"]
        for key, label in (("share", f"L{l}H{h} attention share on same-label items"),
                           ("label_share", f"L{l}H{h} attention share on same-label labels"),
                           ("accuracy", "label accuracy, second half of the items")):
            rows.append({"model": name, "behaviour": "abstract pattern matching", "task": "category → label",
                         "measure": label, "value": s[key], "lo": s[f"{key}_lo"], "hi": s[f"{key}_hi"],
                         "chance": s[f"{key}_chance"], "verdict": s[f"{key}_verdict"], "n": s["n_seqs"]})
    return pd.DataFrame(rows)


BEHAVIOURS = ("literal copying", "fuzzy copying", "translation analogue", "abstract pattern matching")


def behaviour_status(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and behaviour: 'reproduced' when every measurement of it is above chance,
    'partly' when some are, 'not reproduced' when none is."""
    rows = []
    for (model, beh), g in table.groupby(["model", "behaviour"], sort=False):
        k = int((g["verdict"] == "above chance").sum())
        status = "reproduced" if k == len(g) else ("partly" if k else "not reproduced")
        rows.append({"model": model, "behaviour": beh, "above chance": f"{k}/{len(g)}", "status": status})
    return pd.DataFrame(rows)


def behaviour_sentences(status: pd.DataFrame) -> str:
    """Markdown: for each of the paper's behaviours, in which models it reproduces at this scale."""
    paper = {"literal copying": "literal copying of a repeated passage",
             "fuzzy copying": "fuzzy copying (the same words in a different case)",
             "translation analogue": "the translation analogue (the same verses in another English version)",
             "abstract pattern matching": "abstract pattern matching (category → label)"}
    out = []
    n_models = status["model"].nunique()
    for beh in BEHAVIOURS:
        g = status[status.behaviour == beh]
        if g.empty:
            continue
        full = g[g.status == "reproduced"]["model"].tolist()
        part = g[g.status == "partly"]["model"].tolist()
        if len(full) == n_models:
            s = f"**reproduces** in all {n_models} models"
        elif full:
            s = f"**reproduces** in {len(full)} of {n_models} models ({', '.join(full)})"
        elif part:
            s = "**reproduces only in part** (some of its measurements are above chance)"
        else:
            s = f"**does not reproduce** at this scale: no measurement is above chance in any of the {n_models} models"
        if part and full:
            s += f"; in part in {', '.join(part)}"
        elif part:
            s += f", in {', '.join(part)}"
        out.append(f"- {paper[beh][0].upper() + paper[beh][1:]} {s}.")
    return "\n".join(out)


def fuzzy_task_lines(rows) -> str:
    """Markdown bullet list, one line per fuzzy-copying task: attention and loss benefit with their
    95% intervals, chance baselines and verdicts (``rows``: the ``rows`` table of the fuzzy tasks)."""
    r = rows.set_index("task")
    lines = []
    for task, x in r.iterrows():
        lines.append(
            f"- {task}: attention {x.attention:.3f} (95% CI {x.attention_lo:.3f}–{x.attention_hi:.3f}) vs chance "
            f"{x.attention_chance:.3f}, *{x.attention_verdict}*; loss benefit {x.loss_benefit:+.3f} nats "
            f"({x.loss_benefit_lo:+.3f} to {x.loss_benefit_hi:+.3f}), *{x.loss_benefit_verdict}*")
    return "\n".join(lines)

"""Chapter 4 (Argument 4, generality): do the same heads do more than literal copying?

The paper shows, in a 13B model, heads with high prefix-matching scores that also copy literally,
"translate" and complete abstract patterns. This module builds the small-model analogues from the
book's own corpus and measures them, each against a chance baseline with an interval over examples:

* :func:`head_table`: copying vs prefix-matching score of every head (the paper's two properties).
* :func:`paired_passages`: a passage A followed by a variant B of it (an exact repeat, a case
  variant, the same verses in another Bible version). Where does the top induction head attend
  when it predicts the next word of B (the corresponding word of A, vs uniform attention), and does
  the loss on B fall because A is in context (vs an unrelated passage of the same length)?
* :func:`icl_core.logit_attribution.direct_logit_attribution`: each head's direct contribution to
  the correct next token, on the first and the second copy of a repeated passage.
* :func:`summary` (:func:`icl_core.stats.summary_table`, :func:`icl_core.stats.behaviour_sentences`):
  what reproduces at this scale.

Its parts live next to it: :mod:`icl_core.parallel_text` (verses, passages, word alignment),
:mod:`icl_core.pattern_task` (the paper's abstract pattern task, two categories x two categories
-> labels 0-3, from words of the corpus), :mod:`icl_core.stats` (bootstrap intervals, the summary table and each behaviour's verdict through
:mod:`icl_core.verdicts`: margins against chance and run counts). The chapter loads with :func:`compute`, :func:`passages` and :func:`patterns`
and says what they show with the ``*_summary`` functions; figures: :mod:`icl_core.plots.generality`.

[book choice]s are listed in the chapter; the word-alignment rule is
:func:`icl_core.parallel_text.align_words`.
"""
from __future__ import annotations

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
from .parallel_text import (MIN_AGREEMENT, align_words, parallel_passages, title_case, token_spans, upper_case,
                            version_agreement, words)
from .logit_attribution import dla_by_copy, repeated_passage
from .pattern_task import accuracy_by_item, pattern_matching
from . import verdicts as V
from .runs import Run
from .stats import BEHAVIOURS, behaviour_sentences, behaviour_status, bootstrap_ci, summary_table

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
                     "attention_verdict": V.measurement(a + ch, alo + ch, ahi + ch, ch, V.SHARE_MARGIN),
                     "loss_benefit": b, "loss_benefit_lo": blo, "loss_benefit_hi": bhi,
                     "loss_benefit_verdict": V.measurement(b, blo, bhi, 0.0, V.LOSS_MARGIN),
                     "n_aligned": float(np.mean([len(e.queries) for e in exs])) if exs else 0.0})
        per_head[name] = m["all_heads"]
        examples[name] = exs
        passages[name] = pairs
    return {"rows": pd.DataFrame(rows), "per_head": per_head, "examples": examples, "passages": passages,
            "head": head, "agreement": agreement, "excluded": excluded, "seconds": time.time() - t0}


# --- what reproduces ------------------------------------------------------------------------------


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


# --- the chapter: load -> plot -> say ---------------------------------------------------------------

@dataclass
class Generality:
    """The chapter's models at their last snapshot and every head's scores (:func:`compute`)."""
    profile: object
    models: dict  # {name: Run}
    heads: pd.DataFrame  # head_table(models)


def compute(prof, runs: list[str]) -> Generality:
    """Load the runs and :func:`head_table` (cached head scores at the last snapshot)."""
    models = {name: prof.run(name) for name in runs}
    return Generality(prof, models, head_table(models))


def models_summary(g: Generality) -> str:
    """The models and how many induction heads each has."""
    n_ind = g.heads.groupby("model")["kind"].apply(lambda k: int((k == "induction").sum()))
    return (f"The models are the runs {', '.join(f'`{m}`' for m in g.models)} of the **{g.profile.name}** profile, at their "
            f"last snapshot. *[Book choice]* A head is called an induction head when its prefix-matching score is at "
            f"least {INDUCTION_THRESHOLD} and a previous-token head when its previous-token score is at least {PREV_TOKEN_THRESHOLD} "
            f"(`icl_core.heads.classify_heads`). Induction heads per model: "
            + ", ".join(f"`{m}` {n_ind[m]}" for m in g.models) + ".")


def copying_summary(g: Generality) -> str:
    """Do the induction heads copy more than the other heads?"""
    heads = g.heads
    ind, rest = heads[heads.kind == "induction"], heads[heads.kind != "induction"]
    if not len(ind):
        return (f"No head of these models reaches a prefix-matching score of {INDUCTION_THRESHOLD} (the highest is "
                f"{heads.prefix.max():.2f}), so the two properties cannot be compared on induction heads here.")
    msg = (f"Across the {len(g.models)} models there are {len(ind)} induction heads. Their copying scores have "
           f"mean {ind.copying.mean():+.2f} (range {ind.copying.min():+.2f} to {ind.copying.max():+.2f}); "
           f"the other {len(rest)} heads average {rest.copying.mean():+.2f}. ")
    return msg + ("As in the paper, the heads that prefix-match also copy."
                  if ind.copying.mean() > rest.copying.mean() and ind.copying.min() > 0 else
                  "Unlike the paper's heads, these do not all copy more than the other heads.")


@dataclass
class Passages:
    """Paired passages on every model, and the repeated passage of the best one (:func:`passages`)."""
    paired: dict[str, dict]  # {model: paired_passages(...)}
    best: str  # the model whose top induction head has the highest prefix score
    version_a: str
    repeated: dict  # repeated_passage(...) of the best model's first exact repeat
    dla: pd.DataFrame  # dla_by_copy(...) of the best model
    seconds: float

    @property
    def result(self) -> dict:
        return self.paired[self.best]

    @property
    def head(self) -> tuple[int, int, float]:
        return self.result["head"]

    @property
    def rows(self) -> dict[str, pd.DataFrame]:
        """{model: one row per task} for :func:`icl_core.plots.generality.plot_paired_tasks`."""
        return {m: r["rows"] for m, r in self.paired.items()}


def passages(g: Generality, version_a: str, versions_b: list[str], n_examples: int = 48) -> Passages:
    """:func:`paired_passages` of every model; for the best one, its repeated passage and the
    direct logit attribution of each head on both copies."""
    t0 = time.time()
    paired = {m: paired_passages(run, version_a, versions_b, n_examples=n_examples) for m, run in g.models.items()}
    best = max(g.models, key=lambda m: paired[m]["head"][2])
    ex = paired[best]["examples"]["exact repeat"]
    rp = repeated_passage(g.models[best], ex[0])
    return Passages(paired, best, version_a, rp, dla_by_copy(g.models[best], ex), time.time() - t0)


def repeated_passage_title(p: Passages) -> str:
    l, h, pm = p.head
    return f"`{p.best}`: a held-out passage, repeated (top induction head L{l}H{h}, prefix score {pm:.2f})"


def dla_summary(p: Passages) -> str:
    """How much more the top head adds to the correct token on the second copy."""
    l, h, _ = p.head
    dla, res, ex = p.dla, p.result, p.result["examples"]["exact repeat"]
    d = dla[(dla.layer == l) & (dla["head"] == h)].set_index("copy")
    diff = d.loc["difference"]
    top_other = dla[(dla["copy"] == "difference") & ~((dla.layer == l) & (dla["head"] == h))].sort_values("dla").iloc[-1:]
    return (
        f"On {len(ex)} held-out passages ({res['rows'].set_index('task').loc['exact repeat', 'held_out']:.0%} from "
        f"validation chapters), `{p.best}`'s head L{l}H{h} adds on average {d.loc['first copy', 'dla']:+.2f} logits to the "
        f"correct next token on the first copy and {d.loc['second copy', 'dla']:+.2f} on the second: a difference of "
        f"{diff.dla:+.2f} (95% CI {diff.lo:+.2f} to {diff.hi:+.2f}; chance = 0, no difference). "
        + (f"The largest difference among the other heads is {top_other.dla.iloc[0]:+.2f} "
           f"(L{int(top_other.layer.iloc[0])}H{int(top_other['head'].iloc[0])})." if len(top_other) else "")
    )


def agreement_summary(p: Passages) -> str:
    """Which versions line up verse by verse with ``version_a`` (:func:`version_agreement`)."""
    res = p.result
    lines = [f"`{p.version_a}` vs `{v}`: median word similarity of the same verse {a:.2f}" for v, a in res["agreement"].items()]
    excl = res["excluded"]
    return ("Before using two versions as parallel text we check that their verse numbers point at the same text "
            f"(median `difflib` similarity over 300 random verses; *[book choice]* below {MIN_AGREEMENT} the pair is "
            "not used): " + "; ".join(lines) + ". "
            + (f"Excluded: {', '.join(f'`{v}`' for v in excl)} — its verse index in the installed package does not line up "
               f"with `{p.version_a}` (verses start mid-sentence), so its verses are not parallel." if excl else "All pairs are used."))


def cross_attention(g: Generality, p: Passages) -> dict | None:
    """The top head's attention on the last parallel-version task's first example (None without one):
    pattern, example, token labels and title for :func:`icl_core.plots.generality.plot_cross_attention`."""
    from .metrics import attention_patterns

    par = [t for t in p.result["examples"] if "→" in t]
    if not par:
        return None
    task, (l, h, _) = par[-1], p.head
    e = p.result["examples"][task][0]
    run = g.models[p.best]
    pat = next(attention_patterns(run.load(), e.tokens[None]))[1][0, l, h].numpy()
    return {"pattern": pat, "example": e, "tokens": [run.corpus.token_str(int(t)) for t in e.tokens],
            "title": f"`{p.best}` L{l}H{h}: attention from {task.split(' → ')[1]} (rows) onto {p.version_a} (columns)"}


def fuzzy_summary(p: Passages) -> str:
    """:func:`fuzzy_task_lines` of the best model."""
    l, h, _ = p.head
    r = p.result["rows"]
    n_min, n_max = int(r["n"].min()), int(r["n"].max())
    return (f"For `{p.best}` (L{l}H{h}), with " + (f"{n_min}" if n_min == n_max else f"{n_min}–{n_max}")
            + " passages per task:\n\n" + fuzzy_task_lines(r))


@dataclass
class Patterns:
    """The abstract pattern task on every model (:func:`patterns`)."""
    results: dict[str, dict]  # {model: pattern_matching(...)}
    n_seqs: int
    seconds: float


def patterns(g: Generality, n_seqs: int = 64) -> Patterns:
    """:func:`icl_core.pattern_task.pattern_matching` of every model."""
    t0 = time.time()
    return Patterns({m: pattern_matching(run, n_seqs=n_seqs) for m, run in g.models.items()}, n_seqs, time.time() - t0)


def words_summary(g: Generality, p: Passages, pat: Patterns) -> str:
    """The words of each category and the first lines of a sequence (best model's tokenizer)."""
    task = pat.results[p.best]["task"]
    return ("Words used (the six of each category with the fewest tokens in this vocabulary): "
            + "; ".join(f"{c}: {', '.join(w)}" for c, w in task["words"].items())
            + f". Each model sees {pat.n_seqs} sequences of {task['labels'].shape[1]} items "
            f"(as many as fit the context). The first lines of a sequence:\n\n```\n"
            + "\n".join(g.models[p.best].corpus.decode(task["tokens"][0][1:]).split("\n")[:4]) + "\n```")


def accuracies(pat: Patterns) -> dict[str, pd.DataFrame]:
    """{model: accuracy by item index}."""
    return {m: accuracy_by_item(r["accuracy"]) for m, r in pat.results.items()}


def attention_rows(pat: Patterns) -> dict[str, dict]:
    """{model: the top head's same-label attention summary}."""
    return {m: r["summary"] for m, r in pat.results.items()}


@dataclass
class Summary:
    table: pd.DataFrame  # summary_table(...)
    status: pd.DataFrame  # behaviour_status(table)


def summary(g: Generality, p: Passages, pat: Patterns) -> Summary:
    """What reproduces: one row per model and measurement, and one status per behaviour."""
    table = summary_table(p.paired, pat.results, g.heads)
    return Summary(table, behaviour_status(table))


def summary_display(s: Summary):
    """The summary table as the chapter shows it (interval as text)."""
    table = s.table
    show = table.assign(**{"95% CI": [f"{a:.3f} – {b:.3f}" for a, b in zip(table.lo, table.hi)]})
    return (show[["model", "behaviour", "task", "measure", "value", "95% CI", "chance", "verdict", "n"]]
            .style.format({"value": "{:.3f}", "chance": "{:.3f}"}).hide(axis="index"))


def status_display(s: Summary) -> pd.DataFrame:
    """One row per model, one column per behaviour of the paper."""
    status = s.status
    return status.pivot(index="model", columns="behaviour", values="status")[[b for b in BEHAVIOURS if b in set(status.behaviour)]]


def closing_summary(g: Generality, p: Passages, pat: Patterns, s: Summary) -> str:
    """:func:`behaviour_sentences`, the paper's scale, and what the analyses cost."""
    return ("At this scale, of the paper's behaviours:\n\n" + behaviour_sentences(s.status)
            + f"\n\nThe paper's literal and fuzzy copying and its translation heads were found in models up to 13B "
            f"parameters trained on far more data; its pattern-matching head put about 65% of its attention on the "
            f"correct category. Analyses on this page took {p.seconds:.0f} s (passages) and {pat.seconds:.0f} s "
            f"(pattern task); the head scores were cached ({g.heads.seconds.max():.0f} s for the slowest model).")

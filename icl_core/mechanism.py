"""Chapter 5 (Argument 5, mechanism): open the weights of the two-head induction circuit.

A previous-token head writes "the previous token was b" into each position; an induction head
K-composes with it (its keys read that message, its queries read the current token a, and the
QK circuit matches a = b), and its OV circuit copies the attended token. This module computes:

* :func:`scores_over_training`: prefix-matching, previous-token, OV-eigenvalue copying and
  K-composition trace per head over training (via :func:`icl_core.analysis.head_scores`).
* :func:`icl_core.circuits.composition` (with its table and verdict): Q/K/V composition scores
  between heads of different layers, with the random-matrix baseline (:func:`icl_core.metrics.composition_baseline`).
* :func:`same_token_circuit` / :func:`circuit_timing`: the same-token circuit and token-level
  readouts of the circuits over training (:mod:`icl_core.circuits`), timed against the window.
* :func:`positional_attention`: the previous-token head's attention by relative offset, from its
  positional QK weights and measured on text.
* :func:`smear_over_training` / :func:`smeared_head`: how one smeared-key head does both jobs.
* :func:`agreement` and :func:`rise_timing`: the computed checks (rank correlation of the scores
  across heads; when each score rises relative to the phase-change window).

Its parts live next to it: :mod:`icl_core.circuits` (token-level circuits) and
:mod:`icl_core.head_explorer` (the chapter's static widget). The chapter loads with
:func:`compute`, :func:`icl_core.circuits.composition` and :func:`circuit_timing`, draws with
:mod:`icl_core.plots.mechanism` and says what it shows with the ``*_text`` functions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import analysis as A
from . import circuits as Ci
from . import metrics as M
from .circuits import Composition
from .heads import INDUCTION_THRESHOLD, classify_heads, phase_change_window, top_heads
from .verdicts import ONE_HEAD_MIN_BORROWED, ONE_HEAD_MIN_DIAG_Z, Verdict, count_verdict
from .model import Transformer
from .runs import Run


# --- scores over training -----------------------------------------------------------------------


def scores_over_training(run: Run, n_steps: int | None = None) -> dict:
    """Per-head scores (S, L, H) at ``n_steps`` snapshots spread in log(step) (cached), plus the
    run's phase-change window and the heads' classes at the last snapshot."""
    steps = A.select_steps(run, n_steps)
    s = dict(A.head_scores(run, steps))
    s["window"] = phase_change_window(run)
    s["kind"] = classify_heads(s["prefix"][-1], s["prev_token"][-1])
    return s


@torch.no_grad()
def positional_attention(model: Transformer, layer: int, head: int, text: torch.Tensor | None = None,
                         max_offset: int = 8) -> dict:
    """Attention by relative offset (0 = the query's own token, 1 = the previous token, ...).

    ``weights``: for models whose positions enter queries and keys as vectors (``shortformer``:
    the paper's setting, added to the query/key inputs only; ``learned``: added to the residual),
    the positional QK circuit P = W_pos W_Q (W_pos W_K)^T / sqrt(d_head), softmaxed over each
    query's keys and averaged over queries, by offset. Token content and LayerNorm are left out, so
    this is the head's positional preference alone. None for rope / no positions (no such matrix).
    ``empirical``: the head's mean attention at each offset, measured on ``text``."""
    out = {"offsets": np.arange(max_offset + 1), "weights": None, "empirical": None}
    a = model.blocks[layer].attn
    if model.cfg.positional in ("shortformer", "learned"):
        P = model.W_pos.double()
        s = (P @ a.W_Q[head].double()) @ (P @ a.W_K[head].double()).T / math.sqrt(model.cfg.d_head)
        T = s.shape[0]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        q = torch.arange(max_offset, T)
        out["weights"] = np.array([float(s[q, q - o].mean()) for o in range(max_offset + 1)])
    if text is not None:
        tot, n = np.zeros(max_offset + 1), 0
        for _, pat in M.attention_patterns(model, text):
            p = pat[:, layer, head]  # (B, T, T)
            for o in range(max_offset + 1):
                tot[o] += float(torch.diagonal(p, offset=-o, dim1=-2, dim2=-1)[:, max_offset - o:].mean()) * len(p)
            n += len(p)
        out["empirical"] = tot / n
    return out


def smear_over_training(run: Run) -> dict:
    """σ(α) per snapshot and head (S, L, H) from the training log, with tokens."""
    df = run.metrics()
    if "smear" not in df or df["smear"].isna().all():
        raise ValueError(f"run {run.name} has no smeared keys")
    return {"tokens": df["tokens"].to_numpy(), "sigma": np.asarray(df["smear"].tolist(), dtype=float)}


# --- computed checks ---------------------------------------------------------------------------------


def agreement(scores: dict[str, dict], prefix_threshold: float = INDUCTION_THRESHOLD) -> pd.DataFrame:
    """Per model (and pooled over models): Spearman rank correlation across heads, at the last
    snapshot, between the prefix-matching score and (a) the OV-eigenvalue copying score (all heads),
    (b) the K-composition trace (heads in layers >= 1); and how many heads named by the prefix
    score (>= ``prefix_threshold``) have positive OV and K-composition scores."""
    from scipy.stats import spearmanr

    rows, pool = [], {"ov": ([], []), "k": ([], [])}
    for name, s in scores.items():
        pm, ov, kc = (np.asarray(s[k][-1], dtype=float) for k in ("prefix", "ov_eigen", "k_comp"))
        row = {"model": name, "heads": pm.size}
        for key, other, mask in (("ov", ov, np.ones_like(pm, bool)), ("k", kc, np.isfinite(kc))):
            x, y = pm[mask], other[mask]
            pool[key][0].extend(x)
            pool[key][1].extend(y)
            rho, p = spearmanr(x, y) if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0 else (np.nan, np.nan)
            row[f"rho_prefix_{key}"], row[f"p_{key}"], row[f"n_{key}"] = float(rho), float(p), int(len(x))
        ind = pm >= prefix_threshold
        row["induction heads"] = int(ind.sum())
        row["with OV > 0"] = int((ov[ind] > 0).sum())
        ind_k = ind & np.isfinite(kc)
        row["with K-comp > 0"] = int((kc[ind_k] > 0).sum())
        row["in layers >= 1"] = int(ind_k.sum())
        rows.append(row)
    row = {"model": "all models (pooled)", "heads": sum(r["heads"] for r in rows)}
    for key in ("ov", "k"):
        x, y = np.asarray(pool[key][0]), np.asarray(pool[key][1])
        rho, p = spearmanr(x, y) if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0 else (np.nan, np.nan)
        row[f"rho_prefix_{key}"], row[f"p_{key}"], row[f"n_{key}"] = float(rho), float(p), int(len(x))
    for k in ("induction heads", "with OV > 0", "with K-comp > 0", "in layers >= 1"):
        row[k] = sum(r[k] for r in rows)
    rows.append(row)
    return pd.DataFrame(rows)


def ov_copying_verdict(agr: pd.DataFrame) -> Verdict:
    """The paper's "the induction head's OV circuit copies", from :func:`agreement`:
    :func:`icl_core.verdicts.count_verdict` of the models with induction heads in which every induction
    head has a positive OV-eigenvalue copying score."""
    per = agr[agr["model"] != "all models (pooled)"]
    per = per[per["induction heads"] > 0]
    return count_verdict(int((per["with OV > 0"] == per["induction heads"]).sum()), len(per),
                         unit="models with an induction head")


def rise_token(tokens, values, frac: float = 0.5) -> float:
    """The first number of tokens at which ``values`` (from its first snapshot to its maximum) has
    covered ``frac`` of its rise, interpolated in log(tokens) between snapshots; NaN without a rise."""
    t = np.asarray(tokens, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = t > 0
    t, v = t[keep], v[keep]
    if len(v) < 2 or not np.isfinite(v).all():
        return float("nan")
    top = int(np.argmax(v))
    if v[top] - v[0] <= 0:
        return float("nan")
    level = v[0] + frac * (v[top] - v[0])
    i = int(np.nonzero(v[: top + 1] >= level)[0][0])
    if i == 0:
        return float(t[0])
    f = (level - v[i - 1]) / (v[i] - v[i - 1])
    return float(np.exp(np.log(t[i - 1]) + f * (np.log(t[i]) - np.log(t[i - 1]))))


#: [book choice] a score that rises by less than this (first snapshot to maximum) counts as no rise.
MIN_RISE = 0.1


def rise_timing(scores: dict, min_rise: float = MIN_RISE, circuits: dict | None = None) -> dict:
    """When the top induction head's prefix, OV and K-composition scores (and the top previous-token
    head's previous-token score) cover half their rise, against the phase-change window. With
    ``circuits`` (:func:`circuits_over_training` of the same heads) also the token-level readouts
    ``ov_circuit`` and ``k_circuit``, at their own (usually finer) snapshots.
    A score whose rise is smaller than ``min_rise`` is reported as not rising."""
    def arr(x):
        return x.numpy() if hasattr(x, "numpy") else np.asarray(x)

    t = arr(scores["tokens"])
    ind, prev = top_heads(scores["prefix"][-1], scores["prev_token"][-1])
    w = scores["window"]
    series = {"prefix": (t, scores["prefix"][:, ind[0], ind[1]]), "ov_eigen": (t, scores["ov_eigen"][:, ind[0], ind[1]])}
    if prev is not None:
        series["k_comp"] = (t, scores["k_comp"][:, ind[0], ind[1]])
        series["prev_token"] = (t, scores["prev_token"][:, prev[0], prev[1]])
    if circuits is not None:
        if tuple(circuits["induction_head"]) != tuple(ind):
            raise ValueError(f"circuits are for head {circuits['induction_head']}, the top induction head is {ind}")
        tc = arr(circuits["tokens"])
        series["ov_circuit"] = (tc, arr(circuits["ov_copy"]))
        if prev is not None and circuits["prev_head"] is not None:
            series["k_circuit"] = (tc, arr(circuits["k_diag"]))
    out = {"induction_head": ind, "prev_head": prev, "window": w}
    for k, (tk, v) in series.items():
        v = np.asarray(v, dtype=float)
        tk = np.asarray(tk, dtype=float)
        rise = float(np.nanmax(v[tk > 0]) - v[tk > 0][0]) if (tk > 0).any() else float("nan")
        r = rise_token(tk, v) if rise >= min_rise else float("nan")
        where = "no rise"
        if np.isfinite(r):
            if not w.found:
                where = "no window"
            elif r < w.start:
                where = "before the window"
            elif r > w.end:
                where = "after the window"
            else:
                where = "inside the window"
        out[k] = {"rise": rise, "half_rise_tokens": r, "where": where}
    return out


def timing_table(timings: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, tm in timings.items():
        w = tm["window"]
        for k in ("prev_token", "prefix", "ov_eigen", "k_comp", "ov_circuit", "k_circuit"):
            if k in tm:
                rows.append({"model": name, "score": k, "rise": tm[k]["rise"],
                             "half-rise (tokens)": tm[k]["half_rise_tokens"], "where": tm[k]["where"],
                             "window": f"{w.start:,.0f} – {w.end:,.0f}" if w.found else "none"})
    return pd.DataFrame(rows)


def agreement_sentence(agr: pd.DataFrame, tab: pd.DataFrame) -> str:
    """Markdown: the computed agreement between the prefix score and the weight scores, and timing."""
    pooled = agr.iloc[-1]
    parts = []
    if pooled["induction heads"] == 0:
        parts.append(f"No head reaches a prefix-matching score of {INDUCTION_THRESHOLD} in these models, so there are no induction "
                     "heads whose weights could be checked; the correlations below are over non-induction heads only.")
    else:
        parts.append(f"Of the {int(pooled['induction heads'])} heads named by the prefix-matching score "
                     f"(≥ {INDUCTION_THRESHOLD}), {int(pooled['with OV > 0'])} have a positive OV-eigenvalue copying score, and "
                     f"{int(pooled['with K-comp > 0'])} of the {int(pooled['in layers >= 1'])} in layers ≥ 1 have a "
                     f"positive K-composition trace.")
    # the acceptance test is about models that have induction heads: report those one by one
    for r in agr.iloc[:-1][agr.iloc[:-1]["induction heads"] > 0].itertuples():
        bits = [f"ρ = {getattr(r, f'rho_prefix_{key}'):+.2f} with {what} over its {getattr(r, f'n_{key}')} heads"
                + (" in layers ≥ 1" if key == "k" else "")
                for key, what in (("ov", "the OV copying score"), ("k", "the K-composition trace"))
                if np.isfinite(getattr(r, f"rho_prefix_{key}"))]
        if bits:
            parts.append(f"In `{r.model}`, which has induction heads, the prefix score's Spearman rank correlation is "
                         + " and ".join(bits) + ".")
    for key, what in (("ov", "the OV copying score"), ("k", "the K-composition trace")):
        rho, p, n = pooled[f"rho_prefix_{key}"], pooled[f"p_{key}"], pooled[f"n_{key}"]
        if np.isfinite(rho):
            parts.append(f"Pooled over all {n} heads of all these models, including those without induction heads, "
                         f"the correlation between the prefix score and {what} is ρ = {rho:+.2f} (p = {p:.2g}).")
    if len(tab):
        timed = ["inside the window", "before the window", "after the window"]
        for keys, what in ((["ov_eigen", "k_comp"], "eigenvalue scores (OV copying, K-composition trace)"),
                           (["ov_circuit", "k_circuit"], "token-level circuit readouts (OV copying, K-composition diagonal)")):
            k = tab[tab.score.isin(keys)]
            if not len(k):
                continue
            rising = k[k["where"].isin(timed)]
            counts = {wh: int((rising["where"] == wh).sum()) for wh in timed}
            parts.append(f"Of the {len(rising)} {what} of top induction heads that rise during training (and have a "
                         f"window to compare with), {counts['inside the window']} cover half their rise inside the "
                         f"phase-change window, {counts['before the window']} before it and {counts['after the window']} after it.")
    return " ".join(parts)


# --- the chapter: load -> plot -> say ---------------------------------------------------------------


@dataclass
class Mechanism:
    """The chapter's models and their per-head scores over training (:func:`compute`)."""
    models: dict  # {name: Run}
    scores: dict[str, dict]  # {name: scores_over_training(...)}
    n_steps: int | None
    seconds: float

    def timing(self) -> pd.DataFrame:
        """:func:`timing_table` of the scores (when each one rises, against the window)."""
        return timing_table({m: rise_timing(s) for m, s in self.scores.items()})


def warm(run, part: str = "scores", n_steps: int | None = 12) -> float:
    """Compute and cache what :func:`compute` (same ``n_steps``) reads for ``run``: its per-head
    scores over training (the one part, "scores"), e.g. in a separate process while other runs train
    (``benchmarks/gpu/run_profile.py``). Returns the seconds this call took."""
    if part != "scores":
        raise ValueError(f"unknown part {part!r}: expected 'scores'")
    t0 = time.time()
    scores_over_training(run, n_steps)
    return time.time() - t0


def compute(prof, runs: list[str], n_steps: int | None = 12) -> Mechanism:
    """Load the runs and their per-head scores at ``n_steps`` snapshots (cached in the run folders)."""
    models = {name: prof.run(name) for name in runs}
    t0 = time.time()
    scores = {m: scores_over_training(run, n_steps) for m, run in models.items()}
    return Mechanism(models, scores, n_steps, time.time() - t0)


def timing_display(tab: pd.DataFrame):
    """A timing table as the chapter shows it."""
    return tab.style.format({"rise": "{:+.2f}", "half-rise (tokens)": "{:,.0f}"}, na_rep="—").hide(axis="index")


def timing_text(m: Mechanism) -> str:
    return ("For each model's top induction head (highest final prefix score) and its top previous-token head "
            "(highest previous-token score in an earlier layer): how far each score rose from the first snapshot to its "
            "maximum, and when it had covered half of that rise, against the window found from the ICL curve "
            f"(`icl_core.heads.phase_change_window`). *[Book choice]* a rise smaller than {MIN_RISE} counts as no rise. The times are only as "
            f"fine as the {m.n_steps} snapshots analysed.")


def same_token_circuit(m: Mechanism, c: Composition, n_tokens: int = 30) -> dict | None:
    """The K-composition circuit of the followed pair on frequent tokens, at the end and at the
    first snapshot, with :func:`icl_core.circuits.diagonal_stats` of both."""
    if c.focus is None or c.prev is None:
        return None
    run, (li, hi_), prev = m.models[c.focus], c.induction, c.prev
    toks = Ci.frequent_tokens(run.corpus.counts, n_tokens)
    circ = Ci.kcomp_circuit(run.load(), li, hi_, prev, toks)
    first = Ci.kcomp_circuit(run.load(run.steps[0]), li, hi_, prev, toks)
    return {"circuit": circ, "tokens": toks, "labels": [run.corpus.token_str(int(t)) for t in toks],
            "stats": Ci.diagonal_stats(circ), "stats_first": Ci.diagonal_stats(first),
            "title": f"`{c.focus}`: W_E W_Q (W_E W_OV W_K)^T through L{prev[0]}H{prev[1]} into L{li}H{hi_}"}


def same_token_text(d: dict | None) -> str | None:
    if d is None:
        return None
    st, st0 = d["stats"], d["stats_first"]
    return (f"In {st['row_argmax_on_diagonal']:.0%} of the {len(d['tokens'])} rows the largest entry is on the diagonal "
            f"(chance {st['chance']:.0%}; at initialisation {st0['row_argmax_on_diagonal']:.0%}); the diagonal stands "
            f"{st['diag_z']:+.1f} off-diagonal standard deviations above the rest (at initialisation {st0['diag_z']:+.1f}).")


@dataclass
class CircuitTiming:
    """Token-level circuit readouts over training (:func:`circuit_timing`)."""
    circuits: dict[str, dict]  # {model: circuits_over_training(...)} for models with an induction head
    table: pd.DataFrame | None  # timing_table with the readouts (models with circuits)
    n_tokens: int
    seconds: float


def circuit_timing(m: Mechanism, n_tokens: int = 200) -> CircuitTiming:
    """:func:`icl_core.circuits.circuits_for_models` and the timing table that includes them."""
    t0 = time.time()
    circuits = Ci.circuits_for_models(m.models, m.scores, n_tokens)
    seconds = time.time() - t0
    tab = timing_table({name: rise_timing(s, circuits=circuits.get(name)) for name, s in m.scores.items()}) if circuits else None
    return CircuitTiming(circuits, tab, n_tokens, seconds)


def circuit_timing_display(ct: CircuitTiming):
    return None if ct.table is None else timing_display(ct.table[ct.table.model.isin(list(ct.circuits))])


def circuit_timing_text(m: Mechanism, ct: CircuitTiming) -> str:
    if not ct.circuits:
        return f"No model here has an induction head (prefix score ≥ {INDUCTION_THRESHOLD}), so there is no circuit to time."
    n_snap = {name: len(c["steps"]) for name, c in ct.circuits.items()}
    c0 = next(iter(ct.circuits.values()))
    return (f"The token-level readouts (`ov_circuit`, `k_circuit`) are timed at every kept snapshot "
            f"({', '.join(f'{v} for `{name}`' for name, v in n_snap.items())}), the other scores at the {m.n_steps} analysed above; "
            f"on the {ct.n_tokens} most frequent tokens (chance: {c0['chance_k']:.1%} for `k_circuit`, "
            f"{c0['chance_ov']:.2%} for `ov_circuit`).")


def positional(m: Mechanism, c: Composition) -> dict | None:
    """:func:`positional_attention` of the followed pair's two heads on 16 evaluation windows."""
    if c.focus is None or c.prev is None:
        return None
    run, (li, hi_), prev = m.models[c.focus], c.induction, c.prev
    model, text = run.load(), run.eval_data.tokens[:16]
    curves = {f"L{prev[0]}H{prev[1]} (previous-token head)": positional_attention(model, prev[0], prev[1], text),
              f"L{li}H{hi_} (induction head)": positional_attention(model, li, hi_, text)}
    return {"curves": curves, "prev": prev, "positional": run.config.model.positional,
            "title": f"`{c.focus}` ({run.config.model.positional} positions): attention by offset"}


def positional_text(d: dict | None) -> str | None:
    if d is None:
        return None
    prev = d["prev"]
    c0 = d["curves"][f"L{prev[0]}H{prev[1]} (previous-token head)"]
    src = c0["weights"] if c0["weights"] is not None else c0["empirical"]
    what = "positional QK weights alone" if c0["weights"] is not None else "measured attention (rotary positions: no positional matrix)"
    return (f"Positions are `{d['positional']}`. From its {what}, head L{prev[0]}H{prev[1]} puts the most attention at "
            f"offset {int(np.argmax(src))} ({src.max():.2f}); on text its attention at offset 1 is {c0['empirical'][1]:.2f}.")


def smeared_head(m: Mechanism, n_tokens: int = 30) -> dict | None:
    """The first one-layer smeared-key model: σ(α) over training, and its top head's token QK circuit."""
    names = [name for name, run in m.models.items() if run.config.model.smeared_keys and run.config.model.n_layers == 1]
    if not names:
        return None
    name = names[0]
    run, s1 = m.models[name], m.scores[name]
    (l1, h1), _ = top_heads(s1["prefix"][-1], s1["prev_token"][-1])
    toks = Ci.frequent_tokens(run.corpus.counts, n_tokens)
    qk = Ci.token_qk_circuit(run.load(), l1, h1, toks)
    return {"name": name, "scores": s1, "smear": smear_over_training(run), "head": (l1, h1), "circuit": qk,
            "labels": [run.corpus.token_str(int(t)) for t in toks], "stats": Ci.diagonal_stats(qk)}


def smeared_text(d: dict | None) -> str:
    if d is None:
        return "This profile has no one-layer smeared-key model."
    (l1, h1), s1, stq = d["head"], d["scores"], d["stats"]
    sig = d["smear"]["sigma"][-1, l1, h1]
    return (f"The top head of `{d['name']}` (L{l1}H{h1}) ends training with prefix score {float(s1['prefix'][-1, l1, h1]):.2f}, "
            f"σ(α) = {sig:.2f} (so {1 - sig:.0%} of each key comes from the previous token), an OV copying score of "
            f"{float(s1['ov_eigen'][-1, l1, h1]):+.2f}, and a token QK circuit whose largest entry is on the diagonal in "
            f"{stq['row_argmax_on_diagonal']:.0%} of rows (chance {stq['chance']:.0%}; diagonal "
            f"{stq['diag_z']:+.1f} standard deviations above the rest). "
            + ("Together: a key mixes in the previous token, the QK circuit matches it to the current token, and the OV "
               "circuit copies — one head doing the work of two." if (1 - sig) > ONE_HEAD_MIN_BORROWED
               and stq['diag_z'] > ONE_HEAD_MIN_DIAG_Z
               and s1['ov_eigen'][-1, l1, h1] > 0 else
               "Not every part of the one-head mechanism is in place in this model."))


def agreement_display(agr: pd.DataFrame):
    return agr.style.format({c: "{:+.2f}" for c in ["rho_prefix_ov", "rho_prefix_k"]} | {c: "{:.2g}" for c in ["p_ov", "p_k"]},
                            na_rep="—").hide(axis="index")


def agreement_text(m: Mechanism, agr: pd.DataFrame, ct: CircuitTiming) -> str:
    """:func:`agreement_sentence` with the fullest timing table (with circuit readouts when there are)."""
    return agreement_sentence(agr, ct.table if ct.table is not None else m.timing())


def compute_text(m: Mechanism, c: Composition, ct: CircuitTiming, e) -> str:
    """What the page's analyses cost (``e``: the :class:`icl_core.head_explorer.Explorer`)."""
    return (f"The widget holds {e.n_images} images ({e.n_snapshots} snapshots per model, spread in log(step), for "
            f"{', '.join(f'`{name}`' for name in e.models)}). "
            f"Compute for this page: per-head scores {sum(float(s['seconds']) for s in m.scores.values()):.0f} s when first "
            f"computed (cached in the run folders; {m.seconds:.0f} s on this build), composition scores "
            f"{sum(float(x['seconds']) for x in c.comp.values()):.0f} s when first computed, circuit readouts "
            f"{sum(float(x['seconds']) for x in ct.circuits.values()):.0f} s when first computed, widget images {e.seconds:.0f} s.")

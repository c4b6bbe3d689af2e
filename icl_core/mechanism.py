"""Chapter 5 (Argument 5, mechanism): open the weights of the two-head induction circuit.

A previous-token head writes "the previous token was b" into each position; an induction head
K-composes with it (its keys read that message, its queries read the current token a, and the
QK circuit matches a = b), and its OV circuit copies the attended token. This module computes:

* :func:`scores_over_training`: prefix-matching, previous-token, OV-eigenvalue copying and
  K-composition trace per head over training (via :func:`icl_core.analysis.head_scores`).
* :func:`composition_over_training`: Q/K/V composition scores between heads of different layers,
  with the random-matrix baseline (:func:`icl_core.metrics.composition_baseline`).
* :func:`kcomp_circuit`: the same-token circuit W_E W_Q (W_E W_OV^prev W_K)^T on frequent tokens.
* :func:`circuits_over_training`: token-level readouts of the two circuits at every snapshot (how
  many frequent tokens' rows of the K-composition circuit peak on the diagonal; how many tokens
  the OV circuit copies), to time them against the window at full snapshot resolution.
* :func:`positional_attention`: the previous-token head's attention by relative offset, from its
  positional QK weights and measured on text.
* :func:`smear_over_training` / :func:`token_qk_circuit`: how one smeared-key head does both jobs.
* :func:`agreement` and :func:`rise_timing`: the computed checks (rank correlation of the scores
  across heads; when each score rises relative to the phase-change window).
* :func:`head_explorer_images`: precomputed images for the chapter's static widget.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from . import analysis as A
from . import metrics as M
from .heads import INDUCTION_THRESHOLD, classify_heads, phase_change_window, top_heads
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


def composition_over_training(run: Run, steps: list[int]) -> dict:
    """Q/K/V composition scores (S, L, H, L, H) at ``steps`` (cached in the run folder), and the
    random-matrix baseline for this d_model and d_head."""
    def compute():
        acc = {k: [] for k in "QKV"}
        for st in steps:
            c = M.composition_scores(run.load(st))
            for k in "QKV":
                acc[k].append(c[k])
        return {**{k: torch.stack(v) for k, v in acc.items()}, "steps": torch.tensor(steps)}

    res = dict(A.cached(run, "composition", {"steps": steps}, compute))
    mc = run.config.model
    res["baseline"] = M.composition_baseline(mc.d_model, mc.d_head)
    res["tokens"] = res["steps"] * run.config.tokens_per_step
    return res


# --- circuits -------------------------------------------------------------------------------------


def frequent_tokens(counts: np.ndarray, n: int, skip: tuple[int, ...] = (0,)) -> np.ndarray:
    """The ``n`` most frequent token ids in training (EOS skipped)."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    order = order[~np.isin(order, skip)]
    return order[:n]


@torch.no_grad()
def kcomp_circuit(model: Transformer, layer: int, head: int, prev: tuple[int, int], tokens) -> torch.Tensor:
    """(N, N) same-token K-composition circuit W_E W_Q^h (W_E W_OV^prev W_K^h)^T on ``tokens``
    (LayerNorms ignored, as in the paper): entry (a, b) is the score a query on token a gives a key
    whose previous token is b, through the previous-token head. Induction: a diagonal."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    WE = model.W_E.double()[t]  # (N, D)
    a = model.blocks[layer].attn
    p = model.blocks[prev[0]].attn
    q = WE @ a.W_Q[head].double()  # (N, dh)
    k = WE @ p.W_V[prev[1]].double() @ p.W_O[prev[1]].double() @ a.W_K[head].double()  # (N, dh)
    return (q @ k.T) / math.sqrt(model.cfg.d_head)


@torch.no_grad()
def ov_circuit(model: Transformer, layer: int, head: int, tokens) -> torch.Tensor:
    """(N, V) OV circuit W_E W_V^h W_O^h W_U on the rows of ``tokens`` (LayerNorms ignored, as in the
    paper): row a is the change in every logit when the head attends to token a. Copying: row a is
    largest at column a."""
    return M.ov_circuits(model, layer, tokens)[head]


def circuit_readouts(model: Transformer, induction: tuple[int, int], prev: tuple[int, int] | None,
                     tokens) -> dict:
    """Token-level readouts of the induction circuit on ``tokens`` (chance: 1/N and 1/V):

    * ``k_diag``: the fraction of rows of :func:`kcomp_circuit` (induction head keyed through the
      previous-token head) whose largest entry is on the diagonal (NaN without a previous-token head);
    * ``ov_copy``: the fraction of tokens whose :func:`ov_circuit` row, over the whole vocabulary,
      is largest at the token itself.

    *[book choice]* The paper's eigenvalue scores (Σλ/Σ|λ|) are spectrum-wide and scale-free: they
    turn positive once the matrix's largest directions copy, which can be long before the circuit
    does the job for most tokens. These readouts count the tokens for which it does."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    ov = ov_circuit(model, induction[0], induction[1], t)
    out = {"ov_copy": float((ov.argmax(1) == t).double().mean()), "k_diag": float("nan")}
    if prev is not None:
        out["k_diag"] = diagonal_stats(kcomp_circuit(model, induction[0], induction[1], prev, t))["row_argmax_on_diagonal"]
    return out


def circuits_over_training(run: Run, induction: tuple[int, int], prev: tuple[int, int] | None,
                           n_tokens: int = 200, steps: list[int] | None = None) -> dict:
    """:func:`circuit_readouts` of one head pair on the ``n_tokens`` most frequent training tokens at
    every snapshot (or ``steps``), cached in the run folder: ``k_diag``, ``ov_copy`` (S,), ``steps``,
    ``tokens``, ``chance_k`` (1/N) and ``chance_ov`` (1/V)."""
    steps = steps or run.steps
    toks = frequent_tokens(run.corpus.counts, n_tokens)

    def compute():
        rows = [circuit_readouts(run.load(st), induction, prev, toks) for st in steps]
        return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in ("k_diag", "ov_copy")} | {
            "steps": torch.tensor(steps)}

    key = {"steps": steps, "induction": list(induction), "prev": list(prev) if prev else None, "n": int(n_tokens)}
    res = dict(A.cached(run, "circuits", key, compute))
    res["tokens"] = res["steps"] * run.config.tokens_per_step
    res["chance_k"], res["chance_ov"] = 1.0 / len(toks), 1.0 / run.config.model.d_vocab
    res["induction_head"], res["prev_head"] = induction, prev
    return res


def circuits_for_models(models: dict[str, Run], scores: dict[str, dict], n_tokens: int = 200) -> dict[str, dict]:
    """:func:`circuits_over_training` of the top induction head (and its top previous-token head)
    of every model that has an induction head at the last snapshot (``scores[m]["kind"]``)."""
    out = {}
    for m, s in scores.items():
        if (np.asarray(s["kind"]) == "induction").any():
            ind, prev = top_heads(s["prefix"][-1], s["prev_token"][-1])
            out[m] = circuits_over_training(models[m], ind, prev, n_tokens)
    return out


@torch.no_grad()
def token_qk_circuit(model: Transformer, layer: int, head: int, tokens) -> torch.Tensor:
    """(N, N) direct token QK circuit W_E W_Q^h (W_E W_K^h)^T / sqrt(d_head): the score a query on
    token a gives a key on token b. In a smeared-key head the key at j is s k_j + (1 - s) k_{j-1},
    so a diagonal here makes it attend to the token *after* an earlier copy, weighted by 1 - s."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    WE = model.W_E.double()[t]
    a = model.blocks[layer].attn
    return (WE @ a.W_Q[head].double()) @ (WE @ a.W_K[head].double()).T / math.sqrt(model.cfg.d_head)


def diagonal_stats(m: torch.Tensor) -> dict:
    """How diagonal a square matrix is: the fraction of rows whose largest entry is on the diagonal
    (chance 1/N), and the diagonal's mean minus the off-diagonal mean in off-diagonal standard
    deviations."""
    m = torch.as_tensor(m, dtype=torch.float64)
    n = m.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    off = m[~eye]
    return {"row_argmax_on_diagonal": float((m.argmax(1) == torch.arange(n)).double().mean()),
            "chance": 1.0 / n, "diag_z": float((m.diagonal().mean() - off.mean()) / (off.std() + 1e-12))}


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


def rise_timing(scores: dict, min_rise: float = 0.1, circuits: dict | None = None) -> dict:
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


# --- the widget -------------------------------------------------------------------------------------


@torch.no_grad()
def head_explorer_data(run: Run, n_snapshots: int = 4, seq_index: int = 0) -> dict:
    """For ``n_snapshots`` snapshots: attention patterns on one repeated random sequence
    (L, H, T, T) and per-head prefix, previous-token (logged in training), OV-eigenvalue and
    K-composition scores. Computed from weights and one forward pass per snapshot."""
    steps = A.select_steps(run, n_snapshots)
    df = run.metrics().set_index("step")
    rep = run.eval_data.rep[seq_index:seq_index + 1]
    out = {}
    for s in steps:
        m = run.load(s)
        pat = next(M.attention_patterns(m, rep))[1][0].numpy()
        prev = torch.tensor(df.loc[s, "prev_token"], dtype=torch.float32)
        out[s] = {"pattern": pat, "prefix": np.asarray(df.loc[s, "prefix"]), "prev_token": prev.numpy(),
                  "ov_eigen": M.ov_eigen_copying_scores(m).numpy(), "k_comp": M.k_composition_traces(m, prev).numpy(),
                  "tokens": run.tokens(s)}
    return {"steps": steps, "snapshots": out, "seq_len": run.config.data.prefix_seq_len}


def head_explorer_images(runs: dict[str, Run], n_snapshots: int = 4, size: float = 3.0,
                         dpi: int = 64) -> tuple[dict, dict]:
    """Images {(model, snapshot number, layer, head): Figure} for
    :func:`icl_core.widgets.image_grid_selector`, and the labels of the snapshot numbers."""
    from .plots.intro import plot_attention_pattern

    images = {}
    for name, run in runs.items():
        d = head_explorer_data(run, n_snapshots)
        for i, s in enumerate(d["steps"]):
            e = d["snapshots"][s]
            L, H = e["pattern"].shape[:2]
            for l in range(L):
                for h in range(H):
                    kc = e["k_comp"][l, h]
                    title = (f"{name} L{l}H{h}, step {s} ({e['tokens']:,} tok)\n"
                             f"prefix {e['prefix'][l, h]:.2f} · prev {e['prev_token'][l, h]:.2f} · "
                             f"OV {e['ov_eigen'][l, h]:+.2f} · K-comp " + ("—" if not np.isfinite(kc) else f"{kc:+.2f}"))
                    fig = plot_attention_pattern(e["pattern"][l, h], d["seq_len"], title=title, size=size)
                    fig.axes[0].title.set_fontsize(7.5)
                    fig.set_dpi(dpi)  # small PNGs: the page embeds every image
                    images[(name, i, l, h)] = fig
    n = max(i for (_, i, _, _) in images) + 1
    labels = {i: f"#{i + 1} of {n}" + (" (first)" if i == 0 else " (last)" if i == n - 1 else "") for i in range(n)}
    return images, labels

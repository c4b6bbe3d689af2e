"""The induction circuit in the weights (Argument 5): token-level circuits of the top heads.

* :func:`kcomp_circuit`: the same-token circuit W_E W_Q (W_E W_OV^prev W_K)^T on frequent tokens
  (:func:`frequent_tokens`): the induction head's queries matched against keys that read the
  previous-token head's output; :func:`token_qk_circuit` is the one-head version (smeared keys).
* :func:`ov_circuit`: which tokens the induction head's OV circuit copies.
* :func:`circuits_over_training` / :func:`circuits_for_models`: token-level readouts of both at
  every snapshot (cached), to time them against the phase-change window.
* :func:`diagonal_stats`: how strongly a token x token circuit peaks on its diagonal.
* :func:`composition` / :func:`composition_table` / :func:`composition_text`: Q/K/V composition of
  each model's followed pair over training, and whether it is the paper's K-composition
  (:func:`icl_core.verdicts.composition_ok`).
* :func:`rotation_caveat`: what these weight-based QK analyses mean under rotary positions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import analysis as A
from . import metrics as M
from . import verdicts as V
from .heads import INDUCTION_THRESHOLD, circuit_heads, top_heads
from .model import Transformer
from .runs import Run


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




def rotation_caveat(runs) -> str:
    """What the weight-based QK analyses (K-composition trace, composition scores, token QK circuits)
    mean under the models' positional setting (``runs``: {name: Run}): they all use W_Q W_Kᵀ without
    any rotation, which under rotary embeddings is the QK circuit at relative offset 0 only."""
    settings = sorted({r.config.model.positional for r in runs.values()})
    rope = [n for n, r in runs.items() if r.config.model.positional == "rope"]
    if not rope:
        return (f"Positional setting of these models: {', '.join(f'`{s}`' for s in settings)}. Positions do not rotate "
                "queries or keys here, so the weight-based QK analyses below (K-composition trace, composition scores, "
                "token QK circuits) read the content part of the QK circuit as the model uses it.")
    return (f"**A caveat (a deviation): rotary positions.** {', '.join(f'`{n}`' for n in rope)} "
            f"{'use' if len(rope) > 1 else 'uses'} rotary position embeddings (`positional: rope`), where the "
            "attention score between a query and a key is W_Q, the rotation by their relative offset, then W_Kᵀ. "
            "Every weight-based QK analysis on this page (the K-composition trace, the Q/K/V composition scores and "
            "the token QK circuits) uses W_Q W_Kᵀ **without the rotation**, i.e. the circuit at relative offset 0. A "
            "previous-token head works at offset 1 and an induction head at the offsets of earlier copies, where "
            "the rotated circuit can differ; the paper's models (shortformer positions) have no such rotation. "
            "Read these analyses as evidence about the offset-0 circuit, not a full account of the heads.")


# --- composition scores (chapter 5) -------------------------------------------------------------------

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




@dataclass
class Composition:
    """Composition scores of the multi-layer models and the pair the chapter follows (:func:`composition`)."""
    comp: dict[str, dict]  # {model: composition_over_training(...)}
    pairs: dict[str, tuple]  # {model: circuit_heads(...) at the last snapshot}
    focus: str | None  # the multi-layer model whose best layer->=1 head has the highest prefix score
    seconds: float
    prefix: dict[str, float] = field(default_factory=dict)  # {model: final prefix score of the pair's later head}

    @property
    def induction(self) -> tuple[int, int]:
        return self.pairs[self.focus][0]

    @property
    def prev(self) -> tuple[int, int] | None:
        return self.pairs[self.focus][1] if self.focus is not None else None


def composition(m: Mechanism) -> Composition:
    """Q/K/V composition over training for every model with more than one layer."""
    multi = {name: s for name, s in m.scores.items() if m.models[name].config.model.n_layers > 1}
    t0 = time.time()
    comp = {name: composition_over_training(m.models[name], [int(x) for x in s["steps"]]) for name, s in multi.items()}
    pairs = {name: circuit_heads(s["prefix"][-1], s["prev_token"][-1]) for name, s in multi.items()}
    focus = max(multi, key=lambda name: float(multi[name]["prefix"][-1][1:].max())) if multi else None
    prefix = {name: float(multi[name]["prefix"][-1][pairs[name][0]]) for name in multi}
    return Composition(comp, pairs, focus, time.time() - t0, prefix)


def focus_text(m: Mechanism, c: Composition) -> str:
    """The pair the chapter follows, and models whose top induction head is in layer 0."""
    if c.focus is None:
        return "No model of this profile has more than one layer, so no composition can be measured."
    (li, hi_), prev = c.pairs[c.focus]
    s = m.scores[c.focus]
    return (f"We follow `{c.focus}`: its layer-≥1 head with the highest prefix-matching score is L{li}H{hi_} "
            f"({float(s['prefix'][-1, li, hi_]):.2f}), and the earlier head with the highest previous-token "
            f"score is L{prev[0]}H{prev[1]} ({float(s['prev_token'][-1, prev[0], prev[1]]):.2f})."
            + "".join(f" In `{name}` the top induction head is in layer 0 (prefix score {float(sc['prefix'][-1].max()):.2f}): "
                      "with smeared keys a single head can do the job (see below)."
                      for name, sc in m.scores.items() if name in c.pairs
                      and top_heads(sc['prefix'][-1], sc['prev_token'][-1])[1] is None
                      and float(sc['prefix'][-1].max()) >= INDUCTION_THRESHOLD))


def composition_table(c: Composition) -> pd.DataFrame | None:
    """Per model: Q, K and V composition of its pair at the last snapshot, the baseline, the later
    head's prefix score and whether the pair passes :func:`icl_core.verdicts.composition_ok`."""
    if c.focus is None or c.prev is None:
        return None
    rows = []
    for name, ((l2, h2), p) in c.pairs.items():
        r = {"model": name, "pair": f"L{p[0]}H{p[1]} → L{l2}H{h2}", "baseline": c.comp[name]["baseline"]}
        for k in "QKV":
            r[k] = float(c.comp[name][k][-1, p[0], p[1], l2, h2])
        r["prefix"] = c.prefix[name]
        r["K-circuit"] = V.composition_ok(r["Q"], r["K"], r["V"], r["baseline"], r["prefix"] >= INDUCTION_THRESHOLD)
        rows.append(r)
    return pd.DataFrame(rows)


def composition_display(ct: pd.DataFrame | None):
    return None if ct is None else ct.style.format({k: "{:.3f}" for k in ["baseline", "Q", "K", "V"]} | {"prefix": "{:.2f}"}).hide(axis="index")


def composition_verdict(ct: pd.DataFrame | None) -> V.Verdict:
    """:func:`icl_core.verdicts.count_verdict` of the models whose pair K-composes
    (:func:`composition_table`'s ``K-circuit``); not testable without a multi-layer pair."""
    if ct is None:
        return V.Verdict(V.NOT_TESTABLE, 0, 0, "models")
    return V.count_verdict(int(ct["K-circuit"].sum()), len(ct), unit="models")


def composition_text(ct: pd.DataFrame | None) -> str | None:
    """In how many models the pair K-composes (:func:`icl_core.verdicts.composition_ok`), as a
    verdict over the models (:func:`icl_core.verdicts.count_verdict`)."""
    if ct is None:
        return None
    k_top = ct[ct["K-circuit"]]["model"].tolist()
    no_ih = ct[ct["prefix"] < INDUCTION_THRESHOLD]["model"].tolist()
    v = composition_verdict(ct)
    return (f"At the last snapshot, for each model's pair (top previous-token head → top layer-≥1 prefix-matching head), "
            f"the paper's K-composition counts when the later head is an induction head (prefix score ≥ {INDUCTION_THRESHOLD}), "
            f"K is the largest of the three and at least {V.COMPOSITION_MIN_RATIO}× the random baseline *[book choice]*: "
            f"{len(k_top)} of {len(ct)} models" + (f" ({', '.join(f'`{name}`' for name in k_top)})" if k_top else "")
            + (f"; {', '.join(f'`{name}`' for name in no_ih)} {'have' if len(no_ih) > 1 else 'has'} no induction head, so "
               "whatever their K score, their pairs are not the paper's circuit" if no_ih else "")
            + f". The paper's circuit (the induction head reads the previous-token head through its keys) is {v.bold} here.")

"""Argument 3's table (chapters/03_ablation): whole sets of heads ablated at the final snapshot.

Conditions per run: clean; all induction heads; ``k`` = (number of induction heads) random
non-induction heads over ``n_draws`` draws (all sets when there are fewer); all previous-token
heads; pattern-preserving (the paper's table) and full. :func:`final_ablation_table` computes and
caches them in the run folder, :func:`ablation_verdict` applies the chapter's causal test to one
run, :func:`seed_spread` gives the share of ICL removed over seeds with a t-interval, and
:func:`table_frame` is the table the chapter shows. The ablation over training, the chapter's
result object and its prose are in :mod:`icl_core.ablation` (which re-exports these names).

Sign conventions as in :mod:`icl_core.ablation`: ``fraction removed`` = 1 - ICL_ablated /
ICL_clean (1 = all ICL gone, 0 = untouched, < 0 = ICL increased).
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pandas as pd
import torch

from . import analysis as A
from . import metrics as M
from .verdicts import REMOVAL_THRESHOLD


# --- final-snapshot table --------------------------------------------------------------------------

def random_head_sets(candidates: list[tuple[int, int]], k: int, n_draws: int,
                     seed: int = 0) -> tuple[list[tuple[tuple[int, int], ...]], bool]:
    """Sets of ``k`` distinct heads from ``candidates``: all of them if there are at most ``n_draws``
    (returns exhaustive=True), else ``n_draws`` distinct random sets (a seeded numpy Generator)."""
    if k <= 0 or k > len(candidates):
        return [], False
    total = math.comb(len(candidates), k)
    if total <= n_draws:
        return [tuple(c) for c in itertools.combinations(candidates, k)], True
    rng = np.random.default_rng(seed)
    seen: list = []
    while len(seen) < n_draws:
        idx = tuple(sorted(rng.choice(len(candidates), size=k, replace=False).tolist()))
        s = tuple(candidates[i] for i in idx)
        if s not in seen:
            seen.append(s)
    return seen, False


def heads_mask(heads, n_layers: int, n_heads: int) -> torch.Tensor:
    m = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for l, h in heads:
        m[l, h] = True
    return m


def fraction_removed(icl_clean: float, icl_ablated):
    """1 - ICL_ablated / ICL_clean: share of the (negative) ICL score an ablation removes; NaN if the
    clean model has no ICL (score >= 0)."""
    a = np.asarray(icl_ablated, dtype=float)
    if not icl_clean < 0:
        return np.full_like(a, np.nan)
    return 1.0 - a / icl_clean


def set_ablation_icl(model, tokens: torch.Tensor, masks: torch.Tensor, pattern_preserving: bool,
                     precision: str = "fp32") -> np.ndarray:
    """ICL score (the book's banded estimate, :func:`icl_core.metrics.icl_band_score`) of ``model`` on
    ``tokens`` with each head set of ``masks`` (A, L, H) ablated, in one batched pass per chunk of
    examples (about :data:`icl_core.metrics.ABLATION_SEQS_PER_PASS` sequences per forward pass)."""
    bs = max(1, M.ABLATION_SEQS_PER_PASS // max(1, len(masks)))
    losses = M.ablation_losses(model, tokens, masks=masks, pattern_preserving=pattern_preserving, batch_size=bs,
                               precision=precision)
    return np.array([M.icl_score_from_losses(l, model.cfg.n_ctx, band=True) for l in losses])


def final_ablation_table(run, labels: np.ndarray, n_examples: int = 256, n_draws: int = 20,
                         seed: int = 0, interval: float = 0.95) -> dict:
    """The chapter's table at the final snapshot, for pattern-preserving ('pp') and full ablation.

    Conditions: clean; all induction heads; ``k`` = (number of induction heads) random
    non-induction heads, over ``n_draws`` draws (all sets when there are fewer); all previous-token
    heads. Random draws are ablated pattern-preserving only (the paper's table); full ablation covers
    the other three conditions. Cached in the run folder. Returns per mode the ICL of each condition,
    the random draws' ICLs (empty for 'full'), and the sets used."""
    run_steps = run.steps
    n_layers, n_heads = labels.shape
    ind = [(l, h) for l, h in np.ndindex(n_layers, n_heads) if labels[l, h] == "induction"]
    prev = [(l, h) for l, h in np.ndindex(n_layers, n_heads) if labels[l, h] == "previous-token"]
    cand = [(l, h) for l, h in np.ndindex(n_layers, n_heads) if labels[l, h] != "induction"]
    rsets, exhaustive = random_head_sets(cand, len(ind), n_draws, seed)
    ev = run.eval_data.tokens[:n_examples]
    sets = [[], ind, prev] + [list(s) for s in rsets]
    masks = torch.stack([heads_mask(s, n_layers, n_heads) for s in sets])
    prec = run.metrics_precision  # the precision of the run's logged metrics
    params = {"step": run_steps[-1], "n": len(ev), "sets": [[list(h) for h in s] for s in sets], "icl": "band",
              "precision": prec}

    def compute():
        model = run.load(run_steps[-1])
        # the paper's table is pattern-preserving: random draws only there; full ablation for the
        # clean / induction / previous-token sets (the first three)
        return {"icl_pp": torch.tensor(set_ablation_icl(model, ev, masks, True, prec), dtype=torch.float64),
                "icl_full": torch.tensor(set_ablation_icl(model, ev, masks[:3], False, prec), dtype=torch.float64)}

    t0 = time.time()
    r = A.cached(run, "ablation_sets", params, compute)
    out = {"induction": ind, "previous_token": prev, "random_sets": rsets, "exhaustive": exhaustive,
           "n_examples": len(ev), "seconds": float(r["seconds"]), "wall_seconds": time.time() - t0,
           "interval": interval}
    q = ((1 - interval) / 2, 1 - (1 - interval) / 2)
    for mode in ("pp", "full"):
        icl = r[f"icl_{mode}"].numpy()
        clean = float(icl[0])
        rnd = icl[3:]
        out[mode] = {"clean": clean,
                     "induction": float(icl[1]) if ind else float("nan"),
                     "previous_token": float(icl[2]) if prev else float("nan"),
                     "random": rnd,
                     "random_mean": float(rnd.mean()) if len(rnd) else float("nan"),
                     "random_interval": tuple(np.quantile(rnd, q).tolist()) if len(rnd) else (float("nan"),) * 2}
    return out


def table_rows(run_name: str, t: dict) -> list[dict]:
    """Rows of the displayed table (one per condition) for one run."""
    k = len(t["induction"])
    fmt_heads = lambda hs: ", ".join(f"L{l}H{h}" for l, h in hs) or "none"  # noqa: E731
    n_r = len(t["random_sets"])
    rows = []
    for cond, heads in (("clean", "—"), ("induction heads", fmt_heads(t["induction"])),
                        ("random non-induction heads", f"{k} per draw, {n_r} {'sets (all)' if t['exhaustive'] else 'draws'}"),
                        ("previous-token heads", fmt_heads(t["previous_token"]))):
        row = {"run": run_name, "ablated": cond, "heads": heads}
        for mode, name in (("pp", "pattern-preserving"), ("full", "full")):
            d = t[mode]
            if cond == "clean":
                v, txt = d["clean"], f"{d['clean']:+.3f}"
            elif cond == "induction heads":
                v, txt = d["induction"], f"{d['induction']:+.3f}" if k else "no induction head"
            elif cond == "previous-token heads":
                v, txt = d["previous_token"], (f"{d['previous_token']:+.3f}" if t["previous_token"] else "no such head")
            else:
                v = d["random_mean"]
                lo, hi = d["random_interval"]
                txt = f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" if len(d["random"]) else ("no draws" if not n_r else "not computed")
            fr = fraction_removed(d["clean"], v)
            if cond == "random non-induction heads" and len(d["random"]):
                flo, fhi = sorted(fraction_removed(d["clean"], list(d["random_interval"])).tolist())
                ftxt = f"{float(fr):.0%} [{flo:.0%}, {fhi:.0%}]" if np.isfinite(fr) else "—"
            else:
                ftxt = f"{float(fr):.0%}" if np.isfinite(fr) and cond != "clean" else "—"
            row[f"ICL ({name})"] = txt
            row[f"ICL removed ({name})"] = ftxt
        rows.append(row)
    return rows


def table_frame(tables: dict[str, dict]) -> pd.DataFrame:
    rows = [r for name, t in tables.items() for r in table_rows(name, t)]
    return pd.DataFrame(rows).set_index(["run", "ablated"])


def ablation_verdict(run_name: str, t: dict, threshold: float = REMOVAL_THRESHOLD, mode: str = "pp") -> tuple[bool | None, str]:
    """(passed, sentence): ablating the induction heads removes >= ``threshold`` of ICL while random
    non-induction head sets remove "far less": the upper end of their interval is below half of the
    induction heads' removal. ``passed`` is None when the test cannot be run."""
    d = t[mode]
    k = len(t["induction"])
    if not k:
        return None, f"`{run_name}` has no induction head, so the test does not apply."
    if not d["clean"] < 0:
        return None, f"`{run_name}` has no in-context learning to remove (clean ICL {d['clean']:+.3f} nats)."
    f_ind = float(fraction_removed(d["clean"], d["induction"]))
    if len(t["random_sets"]):
        f_r = np.sort(fraction_removed(d["clean"], list(d["random_interval"])))
        f_mean = float(fraction_removed(d["clean"], d["random_mean"]))
        rtxt = (f"the same number of random non-induction heads removes {f_mean:.0%} on average "
                f"({t['interval']:.0%} of {len(t['random_sets'])} {'sets' if t['exhaustive'] else 'draws'} in "
                f"[{f_r[0]:.0%}, {f_r[1]:.0%}])")
        far_less = f_r[1] < f_ind / 2
    else:
        rtxt, far_less = "there are no other heads to draw at random", False
    ok = bool(f_ind >= threshold and far_less)
    head = "The test passes" if ok else "The test fails"  # one run; the chapter's verdict counts runs (chapter_summary)
    crit = (f"(criterion: induction-head ablation removes ≥ {threshold:.0%} of the ICL score and the "
            f"random interval's upper end is below half of that)")
    amount = (f"removes all of its ICL score and more: later tokens become harder to predict than early "
              f"ones ({d['clean']:+.3f} → {d['induction']:+.3f} nats, {f_ind:.0%})" if f_ind > 1 else
              f"removes {f_ind:.0%} of its ICL score ({d['clean']:+.3f} → {d['induction']:+.3f} nats)")
    return ok, (f"**{head} for `{run_name}`.** Ablating its {k} induction head{'s' if k > 1 else ''} "
                f"({'pattern-preserving' if mode == 'pp' else 'full'}) {amount}; {rtxt}. {crit}")


def seed_spread(overview: pd.DataFrame, tables: dict[str, dict], mode: str = "pp", level: float = 0.95) -> pd.DataFrame:
    """One row per model (kind and depth) with two or more seeds: the share of ICL that ablating the
    induction heads removes in each seed, its mean and a t-interval over the seeds (``level``), and in
    how many seeds the run's test (:func:`ablation_verdict`) passes. A seed without an induction head
    or without ICL counts as a seed where the test does not apply."""
    from scipy import stats as st

    rows = []
    for (kind, layers), g in overview.groupby(["kind", "layers"], sort=False):
        names = [n for n in g.index if n in tables]
        if len(names) < 2:
            continue
        fr, passed = {}, 0
        for n in names:
            ok, _ = ablation_verdict(n, tables[n], mode=mode)
            d = tables[n][mode]
            if ok is not None:
                fr[n] = float(fraction_removed(d["clean"], d["induction"]))
            passed += bool(ok)
        v = np.asarray(list(fr.values()))
        mean = float(v.mean()) if len(v) else float("nan")
        half = float(st.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        rows.append({"model": f"{layers}L {kind}", "seeds": len(names), "tested": len(v),
                     "removed per seed": ", ".join(f"`{n}` {fr[n]:.0%}" if n in fr else f"`{n}` n/a" for n in names),
                     "mean removed": mean, "interval low": mean - half, "interval high": mean + half,
                     "test passes": passed})
    out = pd.DataFrame(rows)
    out.attrs.update(level=level, mode=mode)
    return out

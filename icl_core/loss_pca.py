"""The paper's per-token-loss PCA (Arguments 1 and 6): how a run's per-token losses move over training.

One random (example, position) per evaluation window, the same for every run; one PCA fitted on
all snapshots of all runs (:func:`loss_pca_paths`). A path that pivots at the phase change turns
across its window (:func:`icl_core.curves.turn_angle`); :func:`pca_turns` measures each run's turn
at its own window and at a reference window shared by all runs. Figure:
:func:`icl_core.plots.cooccurrence.plot_pca_paths`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import analysis as A
from . import metrics as M
from . import verdicts as V
from .curves import Window, turn_angle
from .runs import Run


def loss_pca_paths(runs: dict[str, Run], steps_n: int | None = None, n_examples: int | None = None,
                   seed: int = 0) -> dict:
    """The paper's per-token-loss PCA: one random (example, position) per eval example, the same for
    every run; one PCA fitted on all snapshots of all runs (which must share the eval set).

    Returns coords {name: (S, 2)}, tokens {name: (S,)}, explained (2,), seconds (per-token losses)."""
    vecs, toks, secs = {}, {}, 0.0
    shape = None
    for name, run in runs.items():
        res = A.snapshot_losses(run, n_examples, A.select_steps(run, steps_n))
        L = res["losses"]
        if shape is None:
            shape = L.shape[1:]
            pos = M.sample_token_positions(shape[0], shape[1], seed)
        elif L.shape[1:] != shape:
            raise ValueError(f"run {name} has eval losses of shape {tuple(L.shape[1:])}, not {tuple(shape)}: "
                             "a joint PCA needs one eval set")
        vecs[name] = np.stack([M.loss_vectors(L[s], pos) for s in range(len(L))])
        toks[name] = res["tokens"].numpy().astype(np.float64)
        secs += float(res["seconds"])
    pca, coords = M.loss_pca(vecs, 2)
    return {"coords": coords, "tokens": toks, "explained": pca.explained_variance_ratio_, "seconds": secs}


def reference_window(rows: pd.DataFrame) -> Window:
    """The median ICL window of the ≥2-layer runs that have one: the span used for runs without
    their own window (e.g. the 1-layer control) when comparing PCA turns."""
    g = rows[(rows["layers"] >= 2) & rows["window_found"]]
    if not len(g):
        return Window(float("nan"), float("nan"), float("nan"), False, "no ≥2-layer run has a window")
    return Window(float(np.exp(np.log(g["window_start"]).median())),
                    float(np.exp(np.log(g["window_end"]).median())),
                    float(np.exp(np.log(g["window_peak"]).median())), True)


def pca_turns(pca: dict, rows: pd.DataFrame) -> pd.DataFrame:
    """Turn angle of each run's PCA path at its own window, and at the reference window
    (:func:`reference_window`) so that runs with and without a window compare over the same span."""
    ref = reference_window(rows)
    out = []
    for r in rows.to_dict("records"):
        name = r["run"]
        if name not in pca["coords"]:
            continue
        c, t = pca["coords"][name], pca["tokens"][name]
        out.append({"model": r["model"], "run": name, "layers": r["layers"],
                    "turn_own_window": turn_angle(c, t, r["window_start"], r["window_end"]) if r["window_found"] else np.nan,
                    "turn_reference_window": turn_angle(c, t, ref.start, ref.end)})
    return pd.DataFrame(out)


def pivot_verdict(turns: pd.DataFrame) -> V.Verdict:
    """The PCA claim's verdict (:func:`icl_core.verdicts.pivot_counts`) from the turns across the
    reference window: computed once per PCA (:attr:`LossPCA.verdict`) and quoted by every page."""
    if not len(turns):
        return V.Verdict(V.NOT_TESTABLE, 0, 0)
    return V.pivot_counts(turns[turns["layers"] >= 2]["turn_reference_window"],
                          turns[turns["layers"] == 1]["turn_reference_window"])


def pca_sentence(p: "LossPCA") -> str:
    """The turns of the ≥2-layer and 1-layer paths, and :attr:`LossPCA.verdict` (:func:`pivot_verdict`)."""
    turns = p.turns
    if not len(turns):
        return "No PCA paths to compare."
    multi = turns[turns["layers"] >= 2]["turn_reference_window"].dropna()
    single = turns[turns["layers"] == 1]["turn_reference_window"].dropna()
    if not len(multi):
        return ("No run with two or more layers has a path long enough around the reference window to measure a turn. "
                + V.pivot_sentence(p.verdict, False))
    s = (f"Across the reference window, the paths of the ≥2-layer runs turn by {multi.mean():.0f}° on "
         f"average (range {multi.min():.0f}–{multi.max():.0f}°)")
    if len(single):
        verb = ("less than" if single.mean() < multi.min() else
                ("more than" if single.mean() > multi.max() else "within the range of"))
        s += f"; the 1-layer runs turn by {single.mean():.0f}°, {verb} the ≥2-layer runs"
    elif (turns["layers"] == 1).any():
        s += "; no 1-layer path is long enough around the reference window to measure a turn"
    return s + ". " + V.pivot_sentence(p.verdict, bool(len(single)))


@dataclass
class LossPCA:
    """One joint per-token-loss PCA of a set of runs, and how much each path turns (:func:`compute`)."""
    paths: dict  # loss_pca_paths(...): coords, tokens, explained, seconds
    turns: pd.DataFrame  # pca_turns(...)
    seconds: float  # wall time of compute()
    verdict: V.Verdict  # pivot_verdict(turns), the one verdict of the PCA claim


def compute(runs: dict[str, Run], rows: pd.DataFrame, n_steps: int | None = None, n_examples: int | None = None,
            seed: int = 0) -> LossPCA:
    """:func:`loss_pca_paths` of ``runs`` and the :func:`pca_turns` of their paths at the windows of
    ``rows`` (their :func:`icl_core.cooccurrence.cooccurrence_table`)."""
    t0 = time.time()
    paths = loss_pca_paths(runs, n_steps, n_examples, seed)
    turns = pca_turns(paths, rows)
    return LossPCA(paths, turns, time.time() - t0, pivot_verdict(turns))


def turns_table(p: LossPCA) -> pd.DataFrame:
    """The turn angles, one row per run."""
    return p.turns.set_index(["model", "run"]).round(1)


def summary(p: LossPCA) -> str:
    """:func:`pca_sentence`, with the number of runs and the time the fit took."""
    return pca_sentence(p) + f" (PCA over {len(p.paths['coords'])} runs, {p.seconds:.0f} s.)"

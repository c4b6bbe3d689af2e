"""Per-snapshot analyses of a run, computed once and cached in the run folder (chapters only load).

    run/analysis/<name>-<key>.safetensors  + .json (sha256, parameters)

Each function returns plain tensors/arrays indexed by snapshot (``steps``), per head as
(S, n_layers, n_heads). Results are keyed by the analysis name, its parameters and the snapshot
list; a corrupt cache file is recomputed, never used. :func:`cached` is the cache itself, for the
argument modules' own analyses (ablation sets, composition, circuits, passages). Which heads are
induction heads, and a run's phase-change window: :mod:`icl_core.heads`.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from . import metrics as M
from .io import CorruptFileError, atomic_write_json, load_tensors, read_json_checked, save_tensors
from .runs import Run

ANALYSIS_VERSION = 1


def select_steps(run: Run, n: int | None = None) -> list[int]:
    """All snapshot steps, or ``n`` of them spread evenly in log(step) (always with first and last)."""
    steps = run.steps
    if n is None or n >= len(steps):
        return steps
    pos = np.unique(np.round(np.geomspace(1, len(steps), n)).astype(int) - 1)
    return [steps[i] for i in sorted(set(pos.tolist()) | {0, len(steps) - 1})]


def story_steps(run: Run, n: int) -> list[int]:
    """``n``-ish checkpoints that tell a run's story: :func:`select_steps`'s first, last and log-spaced
    ones, plus the snapshots nearest the start, steepest point and end of its phase-change window
    (:func:`icl_core.heads.phase_change_window`) when one is found, so a head that forms late in a
    long run is seen forming rather than only before and after."""
    from .heads import phase_change_window

    w = phase_change_window(run)
    if not w.found:
        return select_steps(run, n)
    tps = run.config.tokens_per_step
    near = {min(run.steps, key=lambda s: abs(s * tps - t)) for t in (w.start, w.peak, w.end)}
    return sorted(set(select_steps(run, max(2, n - len(near)))) | near)


def cached(run: Run, name: str, params: dict, compute) -> dict[str, torch.Tensor]:
    """``compute()`` (a dict of tensors), stored once in ``run/analysis/`` under ``name`` and a key of
    ``params``; later calls with the same ``params`` load it (a corrupt file is recomputed, never used).
    The seconds ``compute`` took are kept as ``"seconds"``."""
    key = hashlib.sha256(json.dumps({"v": ANALYSIS_VERSION, **params}, sort_keys=True).encode()).hexdigest()[:12]
    d = run.path / "analysis"
    meta_p, data_p = d / f"{name}-{key}.json", d / f"{name}-{key}.safetensors"
    if meta_p.exists():
        try:
            meta = read_json_checked(meta_p)
            return load_tensors(data_p, meta["sha256"])
        except (CorruptFileError, KeyError) as e:
            print(f"warning: {e}; recomputing {name}")
    t0 = time.time()
    out = compute()
    out["seconds"] = torch.tensor(time.time() - t0)
    sha = save_tensors(data_p, out)
    atomic_write_json(meta_p, {"name": name, "params": params, "sha256": sha})
    return out


def logged_seconds(run: Run) -> dict[str, float]:
    """Seconds each cached analysis of ``run`` took when it was computed, summed per analysis name
    (e.g. {"ablations": 61.2, "heads": 7.9}); corrupt cache files are skipped with a warning."""
    out: dict[str, float] = {}
    for meta_p in sorted((run.path / "analysis").glob("*.json")):
        try:
            meta = read_json_checked(meta_p)
            sec = float(load_tensors(meta_p.with_suffix(".safetensors"), meta["sha256"])["seconds"])
        except (CorruptFileError, KeyError, FileNotFoundError) as e:
            print(f"warning: {meta_p.name}: {e}; not counted")
            continue
        out[meta["name"]] = out.get(meta["name"], 0.0) + sec
    return out


def snapshot_losses(run: Run, n_examples: int | None = None, steps: list[int] | None = None) -> dict:
    """Per-token losses on the fixed eval set at every snapshot: losses (S, N, T-1), steps, tokens.

    Read from the losses the trainer kept at each snapshot where the run has them (the same
    computation: :func:`metrics.per_token_losses` on the same windows, in the run's
    ``train.eval_precision``); otherwise computed the same way once and cached. A corrupt kept
    file is reported and recomputed, never used."""
    steps = steps or run.steps
    ev = run.eval_data.tokens[: n_examples or len(run.eval_data.tokens)]
    t0 = time.time()
    try:
        kept = [run.eval_losses(s) for s in steps]
    except CorruptFileError as e:
        print(f"warning: {e}; recomputing the losses")
        kept = [None]
    if all(k is not None for k in kept):
        return {"losses": torch.stack([k[: len(ev)] for k in kept]).float(), "steps": torch.tensor(steps),
                "tokens": torch.tensor(steps) * run.config.tokens_per_step, "seconds": torch.tensor(time.time() - t0)}

    def compute():
        out = torch.stack([M.per_token_losses(run.load(s), ev, precision=run.metrics_precision) for s in steps])
        return {"losses": out.half() if out.numel() > 2e7 else out, "steps": torch.tensor(steps)}

    res = cached(run, "losses", {"n": len(ev), "steps": steps}, compute)
    res["losses"] = res["losses"].float()
    res["tokens"] = res["steps"] * run.config.tokens_per_step
    return res


def head_scores(run: Run, steps: list[int] | None = None, n_text: int = M.PREV_TOKEN_WINDOWS) -> dict:
    """Per snapshot and head: prefix-matching, previous-token, empirical copying, OV eigenvalue
    copying and K-composition trace scores, each (S, L, H)."""
    steps = steps or run.steps
    ev = run.eval_data

    def compute():
        keys = ("prefix", "prev_token", "copying", "ov_eigen", "k_comp")
        acc = {k: [] for k in keys}
        logged = run.manifest["snapshots"]
        n = len(ev.tokens)
        reuse = min(n_text, n) == min(M.PREV_TOKEN_WINDOWS, n)  # the windows the trainer logged scores on
        for s in steps:
            m = run.load(s)
            got = logged[str(s)].get("metrics", {}) if reuse else {}
            if "prefix" in got and "prev_token" in got:  # same computation, already done in training
                pm, pt = torch.tensor(got["prefix"]), torch.tensor(got["prev_token"])
            else:
                pm = M.prefix_matching_scores(m, ev.rep, run.config.data.prefix_seq_len,
                                              precision=run.metrics_precision)
                pt = M.previous_token_scores(m, ev.tokens[:n_text], precision=run.metrics_precision)
            acc["prefix"].append(pm)
            acc["prev_token"].append(pt)
            acc["copying"].append(M.copying_scores(m, ev.rep))
            acc["ov_eigen"].append(M.ov_eigen_copying_scores(m))
            acc["k_comp"].append(M.k_composition_traces(m, pt))
        out = {k: torch.stack(v) for k, v in acc.items()}
        out["steps"] = torch.tensor(steps)
        return out

    res = cached(run, "heads", {"steps": steps, "n_text": n_text}, compute)
    res["tokens"] = res["steps"] * run.config.tokens_per_step
    return res


def ablations(run: Run, steps: list[int] | None = None, n_examples: int = 64,
              pattern_preserving: bool = True, pca_seed: int = 0) -> dict:
    """Single-head ablations at each snapshot on the first ``n_examples`` eval windows.

    Returns delta_icl and delta_loss (S, L, H), clean_icl (S,), and the per-token loss vectors used
    for the before-and-after projection: clean_vec (S, N) and ablated_vec (S, n_layers * n_heads, N), one random
    (example, position) per example (:func:`icl_core.metrics.sample_token_positions`, ``pca_seed``).
    """
    steps = steps or run.steps
    ev = run.eval_data.tokens[:n_examples]
    n_layers, n_heads = run.config.model.n_layers, run.config.model.n_heads
    pos = M.sample_token_positions(len(ev), ev.shape[1] - 1, pca_seed)

    def compute():
        d_icl, d_loss, c_icl, cvec, avec = [], [], [], [], []
        for s in steps:
            m = run.load(s)
            # all n_layers * n_heads ablations (and the clean run) of a batch run in one pass of about
            # M.ABLATION_SEQS_PER_PASS sequences
            r = M.ablation_effects(m, ev, pattern_preserving=pattern_preserving,
                                   batch_size=max(1, M.ABLATION_SEQS_PER_PASS // (n_layers * n_heads + 1)),
                                   precision=run.metrics_precision)
            clean = r.clean
            d_icl.append(r.delta_icl)
            d_loss.append(r.delta_loss)
            c_icl.append(r.clean_icl)
            cvec.append(torch.as_tensor(M.loss_vectors(clean, pos)))
            avec.append(torch.stack([torch.as_tensor(M.loss_vectors(a, pos)) for a in r.losses]))
        return {"delta_icl": torch.stack(d_icl), "delta_loss": torch.stack(d_loss),
                "clean_icl": torch.tensor(c_icl), "clean_vec": torch.stack(cvec),
                "ablated_vec": torch.stack(avec), "steps": torch.tensor(steps)}

    res = cached(run, "ablations", {"steps": steps, "n": len(ev), "pp": pattern_preserving,
                                     "seed": pca_seed, "L": n_layers, "H": n_heads, "precision": run.metrics_precision}, compute)
    res["tokens"] = res["steps"] * run.config.tokens_per_step
    return res

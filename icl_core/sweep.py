"""Sweep harness for the laptop recipe (issue: a vanilla phase change on 2 CPU cores).

    python -m icl_core.sweep configs/sweeps/recipe.yaml [--jobs 2] [--only NAME ...]

The YAML has ``base`` (a RunConfig dict) and ``variants`` ({name: overrides}). Every variant trains
through the run cache (so reruns reuse finished runs) with one thread per job, ``--jobs`` at once,
and only cheap metrics. A summary table is written next to the YAML as ``<stem>.summary.csv`` / ``.md``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ConfigError, RunConfig, load_yaml, merge
from .heads import INDUCTION_THRESHOLD, phase_change_window


def summarise(run) -> dict:
    """One row of a sweep's summary table: the run's speed, losses, ICL and head scores, and its
    phase-change window (:func:`icl_core.heads.phase_change_window`)."""
    m = run.metrics()
    t = m["tokens"].to_numpy()
    icl = m["icl"].to_numpy()  # the banded estimate where it was logged (Run.metrics)
    pm = m["prefix_max"].to_numpy()
    w = phase_change_window(run)
    cfg = run.config
    row = {
        "variant": cfg.name, "hash": cfg.hash(),
        "layers": cfg.model.n_layers, "tokens_M": t[-1] / 1e6,
        "minutes": run.train_seconds / 60, "ktok_s": t[-1] / max(run.train_seconds, 1e-9) / 1e3,
        "loss_final": m["loss"].iloc[-1],
        "icl_first": icl[1] if len(icl) > 1 else icl[0], "icl_min": icl.min(), "icl_final": icl[-1],
        "prefix_first": pm[1] if len(pm) > 1 else pm[0], "prefix_final": pm[-1], "prefix_maxall": pm.max(),
        "prev_final": m["prev_token_max"].iloc[-1],
        # where the previous-token heads sit: the best previous-token score in each layer (final
        # snapshot); an induction circuit needs one in an earlier layer than the induction head
        "prev_by_layer": "/".join(f"{max(v):.2f}" for v in m["prev_token"].iloc[-1]),
        # (the column's name is kept: committed summaries use it)
        "tokens_prefix_0.3_M": (t[np.argmax(pm > INDUCTION_THRESHOLD)] / 1e6) if (pm > INDUCTION_THRESHOLD).any() else np.nan,
        "window_M": f"{w.start / 1e6:.2f}-{w.end / 1e6:.2f}" if w.found else "none",
    }
    if w.found:
        inside = (t >= w.start) & (t <= w.end)
        row["icl_change_in_window"] = icl[inside][-1] - icl[inside][0]
        row["prefix_in_window"] = f"{pm[inside][0]:.2f}->{pm[inside][-1]:.2f}"
    return row


def _run_one(args):
    name, cfg_dict, root = args
    import torch
    torch.set_num_threads(1)
    from .runs import get_or_train
    cfg = RunConfig.from_dict(cfg_dict)
    run = get_or_train(cfg, root=root, progress=False)
    return summarise(run)


def variant_configs(spec: dict) -> dict[str, dict]:
    base = spec.get("base", {})
    out = {}
    for name, over in (spec.get("variants") or {}).items():
        d = merge(base, over or {})
        d["name"] = name
        d.setdefault("train", {})["threads"] = 1
        RunConfig.from_dict(d)  # validate everything before training anything
        out[name] = d
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--root", default=None, help="runs folder (default $ICL_RUNS_DIR or runs/)")
    ap.add_argument("--summary-only", action="store_true",
                    help="train nothing; summarise the variants that have a run folder (finished or stopped)")
    a = ap.parse_args(argv)
    try:
        cfgs = variant_configs(load_yaml(a.spec))
    except ConfigError as e:  # a bad field or value, or no such file: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.only:
        cfgs = {k: v for k, v in cfgs.items() if k in a.only}
    if a.summary_only:
        from .runs import Run, run_path
        rows = []
        for k, v in cfgs.items():
            p = run_path(RunConfig.from_dict(v), a.root)
            if (p / "manifest.json").exists():
                run = Run(p)
                rows.append({**summarise(run), "finished": run.done})
        df = pd.DataFrame(rows)
        out = Path(a.spec).with_suffix("")
        df.to_csv(f"{out}.summary.csv", index=False)
        Path(f"{out}.summary.md").write_text(df.to_markdown(index=False, floatfmt=".3g"))
        print(df.to_string(index=False))
        return 0
    jobs = [(k, v, a.root) for k, v in cfgs.items()]
    rows = []
    ctx = mp.get_context("spawn")  # fresh interpreters: one torch thread each
    out = Path(a.spec).with_suffix("")
    with ctx.Pool(a.jobs) as pool:
        for row in pool.imap_unordered(_run_one, jobs):
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False), flush=True)
            df = pd.DataFrame(rows)
            df.to_csv(f"{out}.summary.csv", index=False)
            Path(f"{out}.summary.md").write_text(df.to_markdown(index=False, floatfmt=".3g"))
    return 0


SWEEPS_DIR = Path(__file__).resolve().parent.parent / "configs" / "sweeps"


def sweep_notes(spec_path: Path) -> str:
    """The comment block at the top of a sweep YAML (what the round tested and why)."""
    lines = []
    for line in Path(spec_path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def sweep_tables(sweeps_dir: Path = SWEEPS_DIR) -> list[tuple[str, str, pd.DataFrame]]:
    """(round name, notes, summary table) for every sweep round with a committed summary."""
    out = []
    def natural(p: Path):  # recipe2 before recipe10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)]

    for spec in sorted(Path(sweeps_dir).glob("*.yaml"), key=natural):
        csv = spec.with_suffix(".summary.csv")
        if csv.exists():
            df = pd.read_csv(csv)
            cfgs = variant_configs(load_yaml(spec))
            df.insert(1, "changes from base", [_describe((load_yaml(spec).get("variants") or {}).get(v) or {})
                                               if v in cfgs else "" for v in df["variant"]])
            out.append((spec.stem, sweep_notes(spec), df))
    return out


def _describe(over: dict, prefix: str = "") -> str:
    parts = []
    for k, v in over.items():
        if isinstance(v, dict):
            parts.append(_describe(v, f"{prefix}{k}."))
        else:
            parts.append(f"{prefix}{k}={v}")
    return ", ".join(p for p in parts if p) or "(base)"


if __name__ == "__main__":
    sys.exit(main())

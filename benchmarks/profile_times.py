"""Per-run training times of a profile, from the runs' own manifests (issue 24: the book's cost).

    python benchmarks/profile_times.py --profile laptop [--out benchmarks/laptop_profile.md] \
        [--note "machine, wall times of the build ..."]

One row per run of the profile: layers, tokens, training seconds (optimisation steps), snapshot
metrics seconds (evaluation at every snapshot, logged separately by the trainer), tokens per second
of training, whether the loss was compiled, peak resident memory; then the totals in core-minutes
(every run is one thread). Nothing is timed here: it reads what the trainer wrote, so the table is
the build's own record. A run that is not trained yet is listed as missing.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from icl_core.profiles import load_profile  # noqa: E402
from icl_core.runs import Run, run_path  # noqa: E402


def profile_times(prof, root=None) -> pd.DataFrame:
    """One row per run of ``prof`` (see the module docstring); ``root``: the runs folder."""
    rows = []
    for name, cfg in prof.runs.items():
        path = run_path(cfg, root)
        row = {"run": name, "layers": cfg.model.n_layers, "d_model": cfg.model.d_model,
               "tokens (M)": cfg.train.total_tokens / 1e6}
        run = Run(path) if (path / "manifest.json").exists() else None
        if run is None or not run.done:
            rows.append({**row, "status": "missing"})
            continue
        train_s, metrics_s = run.train_seconds, run.metrics_seconds()
        rows.append({**row, "status": "trained", "train s": round(train_s, 1), "snapshot metrics s": round(metrics_s, 1),
                     "snapshots": len(run.steps),
                     "train ktok/s": round(cfg.total_steps * cfg.tokens_per_step / train_s / 1e3, 1),
                     "compiled": bool(run.manifest.get("compiled")),
                     "peak RSS MB": round(float(run.manifest.get("peak_rss_mb", math.nan)))})
    return pd.DataFrame(rows).set_index("run")


def totals(t: pd.DataFrame) -> dict:
    done = t[t["status"] == "trained"]
    train = float(done["train s"].sum())
    metrics = float(done["snapshot metrics s"].sum())
    return {"runs": len(t), "trained": len(done), "train core-min": train / 60, "metrics core-min": metrics / 60,
            "core-min": (train + metrics) / 60}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="laptop")
    ap.add_argument("--out", help="write a markdown file (default: print)")
    ap.add_argument("--note", default="", help="a line on the machine and the build's wall times")
    a = ap.parse_args(argv)
    try:
        prof = load_profile(a.profile)
    except Exception as e:  # one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = profile_times(prof)
    s = totals(t)
    md = (f"# Training times of the `{a.profile}` profile\n\n"
          f"Read from the runs' manifests by `python benchmarks/profile_times.py --profile {a.profile}` "
          f"(one thread per run). {a.note}\n\n" + t.to_markdown() + "\n\n"
          f"{s['trained']} of {s['runs']} runs trained: {s['train core-min']:.1f} core-minutes of training and "
          f"{s['metrics core-min']:.1f} of snapshot metrics, {s['core-min']:.1f} in all "
          f"(≈ {s['core-min'] / 2:.0f} min of wall time on 2 cores if the two workers stay busy).\n")
    if a.out:
        Path(a.out).write_text(md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

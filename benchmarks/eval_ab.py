"""The evaluation of an older commit and of this checkout side by side, on trained runs.

    python benchmarks/eval_ab.py --baseline REF [--runs attn2 attn3] [--rounds 3] [--profile-name laptop]

For each run and each measurement of benchmarks/eval_worker.py (one snapshot's in-training
metrics; chapter 3's single-head ablations, pattern-preserving and full), REF's code and this
checkout's alternate in fresh one-thread processes for ``--rounds`` rounds. Prints a Markdown table:
median seconds of each, their ratio, peak resident memory, and whether both computed the same bits.
The runs must be trained (``python -m icl_core.book train --profile laptop``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench import unpack_commit  # noqa: E402

WHAT = ("metrics", "ablation_pp", "ablation_full")


def measure(tree: Path, run: str, what: str, profile_name: str) -> dict:
    # both trees read this checkout's trained runs (an unpacked commit has no runs folder)
    env = {**os.environ, "ICL_RUNS_DIR": os.environ.get("ICL_RUNS_DIR", str(ROOT / "runs"))}
    out = subprocess.run([sys.executable, str(HERE / "eval_worker.py"), "--tree", str(tree), "--run", run,
                          "--what", what, "--profile-name", profile_name],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(baseline: Path, runs, rounds: int, profile_name: str) -> list[dict]:
    rows = []
    for run in runs:
        for what in WHAT:
            got = {"baseline": [], "current": []}
            rss, sha = {}, {}
            for _ in range(rounds):
                for side, tree in (("baseline", baseline), ("current", ROOT)):
                    r = measure(tree, run, what, profile_name)
                    got[side].append(r["seconds"])
                    rss[side] = max(rss.get(side, 0), r["peak_rss_mb"] or 0)
                    sha.setdefault(side, set()).add(r["sha256"])
            b, c = statistics.median(got["baseline"]), statistics.median(got["current"])
            rows.append({"run": run, "what": what, "baseline_s": b, "current_s": c, "speedup": b / c,
                         "rss": rss, "same_bits": sha["baseline"] == sha["current"] and len(sha["current"]) == 1})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], ref: str) -> str:
    lines = [f"| run | measurement | `{ref}` s | this checkout s | speedup | peak RSS MB (before → after) | same bits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['what']} | {r['baseline_s']:.2f} | {r['current_s']:.2f} | x{r['speedup']:.2f} "
                     f"| {r['rss']['baseline']:.0f} → {r['rss']['current']:.0f} | {'yes' if r['same_bits'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, metavar="REF")
    ap.add_argument("--runs", nargs="+", default=["attn2", "attn3"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-name", default="laptop")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        base = unpack_commit(a.baseline, Path(d) / "baseline")
        rows = side_by_side(base, a.runs, a.rounds, a.profile_name)
    print(table(rows, a.baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

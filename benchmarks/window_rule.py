"""How much the evaluation-window rule moves the ICL score (results/gpu/README.md).

The book's evaluation windows tile each validation document from its start (issue 22), so in a
document's first window the early index (50 of 512, 25 of 256) sits in the document's opening lines.
For each run this prints its logged metrics, then at the middle and the last snapshot the ICL score
split by the windows' kind and place (``icl_core.corpus_mix.icl_by_window``) and the score on windows
drawn as training draws them, at random offsets (``icl_core.corpus_mix.icl_on_random_windows``).

    ICL_CACHE_DIR=... python benchmarks/window_rule.py --profile laptop attn2 --tokens 16e6
    ICL_CACHE_DIR=... python benchmarks/window_rule.py --profile positive_icl_diag \\
        --profiles-dir benchmarks/gpu std1 std002 rope

Runs are trained if missing (one torch thread; ``--tokens`` shortens them, ``--root`` is where).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_core import corpus_mix as CM  # noqa: E402
from icl_core.profiles import load_profile  # noqa: E402
from icl_core.runs import get_or_train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--profiles-dir", default=None)
    ap.add_argument("--tokens", type=float, default=None, help="train this many tokens instead (10 snapshots)")
    ap.add_argument("--root", default="runs/window_rule", help="where the runs are trained (cached)")
    ap.add_argument("--random-windows", type=int, default=1024)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    prof = load_profile(a.profile, a.profiles_dir)
    for name in a.runs:
        cfg = prof.run_config(name)
        if a.tokens:
            cfg = replace(cfg, train=replace(cfg.train, total_tokens=int(a.tokens), n_snapshots=10))
        t = time.time()
        run = get_or_train(cfg, root=a.root, progress=False)
        print(f"== {name} ({time.time() - t:.0f} s)")
        print(run.metrics()[["tokens", "loss", "icl", "icl_single", "prefix_max", "prev_token_max"]].round(3).to_string(index=False))
        for step in (run.steps[len(run.steps) // 2], run.steps[-1]):
            print(f"-- at {run.tokens(step):,} tokens: the evaluation windows, banded ICL by kind and place")
            print(CM.icl_by_window(run, step, band=True).round(3).T.to_string())
            r = CM.icl_on_random_windows(run, step, a.random_windows)
            print(f"   {r['n']} windows at random offsets: banded {r['icl_band']:+.3f} (single index {r['icl']:+.3f}); "
                  f"the {r['n_inside']} inside one document: banded {r['icl_band_inside']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

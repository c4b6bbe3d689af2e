"""CPU check of the gpu build's positive ICL scores (results/gpu/README.md): train 1-layer models
with the gpu recipe's data and 512-token windows (diag.yaml beside this file: Shortformer positions
with initial std 1.0 as in gpu.yaml, std 0.02, and RoPE), then print each run's logged ICL scores
the score split by the evaluation windows' kind and place (icl_core.corpus_mix.icl_by_window), and
the score on windows drawn as training draws them (random offsets, across documents).

    ICL_CACHE_DIR=... python benchmarks/gpu/positive_icl/check.py [RUN ...] [--root DIR]

Each run is about 3 minutes on one thread of the project's 2-core Xeon (12.6M tokens).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from icl_core import corpus_mix as CM  # noqa: E402
from icl_core import metrics as M  # noqa: E402
from icl_core.profiles import load_profile  # noqa: E402
from icl_core.runs import get_or_train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", default=["std1", "std002", "rope"])
    ap.add_argument("--root", default="runs/positive_icl", help="where the runs are trained (cached)")
    ap.add_argument("--random-windows", type=int, default=256, help="windows at random offsets (default 256)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    prof = load_profile("diag", HERE)
    for name in a.runs:
        t = time.time()
        run = get_or_train(prof.run_config(name), root=a.root, progress=False)
        m = run.metrics()
        print(f"== {name} ({time.time() - t:.0f} s)")
        print(m[["tokens", "loss", "icl", "icl_single", "prefix_max", "prev_token_max"]].round(3).to_string(index=False))
        for band in (False, True):
            print(f"-- ICL by window at the last snapshot ({'banded' if band else 'single index'})")
            print(CM.icl_by_window(run, band=band).round(3).T.to_string())
        # windows drawn as training draws them: random offsets in the validation stream, across documents
        val = np.asarray(run.corpus.val)
        starts = np.random.default_rng(0).integers(0, len(val) - 512, a.random_windows)
        toks = torch.from_numpy(np.stack([val[s:s + 512] for s in starts]).astype(np.int64))
        losses = M.per_token_losses(run.load(), toks, precision=run.metrics_precision)
        inside = (toks[:, 1:] != 0).all(1)  # no EOS after the first token: one document throughout
        print(f"-- {a.random_windows} windows at random offsets: ICL {M.icl_score_from_losses(losses, 512):+.3f} "
              f"(banded {M.icl_band_score(losses, 512):+.3f}); the {int(inside.sum())} inside one document: "
              f"{M.icl_score_from_losses(losses[inside], 512):+.3f} (banded {M.icl_band_score(losses[inside], 512):+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

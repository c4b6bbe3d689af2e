"""One evaluation measurement in a fresh process, on the code of any checkout (benchmarks/eval_ab.py).

    python benchmarks/eval_worker.py --tree DIR --run attn2 --what metrics|ablation_pp|ablation_full
                                     [--profile-name laptop] [--examples 32] [--repeats 3]

Imports ``icl_core`` from ``DIR`` and times, on the trained run ``--run`` of the profile (its last
snapshot, one thread, the run's metrics precision):

- ``metrics``: one snapshot's in-training metrics (``train.cheap_metrics``: per-token losses of
  the run's evaluation windows, previous-token and prefix-matching scores);
- ``ablation_pp`` / ``ablation_full``: every single-head ablation (and the clean pass) on the first
  ``--examples`` evaluation windows, pattern-preserving or full, batched as chapter 3 batches them.

Prints one JSON line: median seconds over ``--repeats``, the process's peak resident memory, and a
SHA-256 of the computed tensors, so two checkouts can be shown to compute the same bits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time

from step_worker import peak_rss_mb  # benchmarks/: the reader older checkouts lack


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", required=True)
    ap.add_argument("--run", default="attn2")
    ap.add_argument("--profile-name", default="laptop")
    ap.add_argument("--what", choices=["metrics", "ablation_pp", "ablation_full"], default="metrics")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    sys.path.insert(0, a.tree)
    import torch

    from icl_core import metrics as M
    from icl_core import train as T
    from icl_core.profiles import load_profile
    from icl_core.runs import Run, run_path

    torch.set_num_threads(1)
    cfg = load_profile(a.profile_name).run_config(a.run)
    run = Run(run_path(cfg))
    model = run.load(run.steps[-1])
    ev = run.eval_data
    precision = cfg.train.metrics_precision
    n_masks = cfg.model.n_layers * cfg.model.n_heads + 1

    def once():
        if a.what == "metrics":
            metrics, losses = T.cheap_metrics(model, cfg, ev, precision=precision)
            return [losses, torch.tensor(metrics["prefix"]), torch.tensor(metrics["prev_token"])]
        res = M.ablation_effects(model, ev.tokens[:a.examples], pattern_preserving=a.what == "ablation_pp",
                                 batch_size=max(1, M.ABLATION_SEQS_PER_PASS // n_masks), precision=precision)
        return [res.clean, res.losses]

    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t)
    digest = hashlib.sha256(b"".join(x.float().contiguous().numpy().tobytes() for x in out)).hexdigest()[:16]
    print(json.dumps({"tree": a.tree, "run": a.run, "what": a.what, "seconds": statistics.median(times),
                      "peak_rss_mb": peak_rss_mb(), "sha256": digest}))


if __name__ == "__main__":
    main()

"""Two variants of this checkout's trainer in one process, alternating steps: paired speed ratios.

    python benchmarks/flag_ab.py icl_core.fused_attention.SOME_FLAG [--a False] [--b True]
                                 [--run attn2] [--rounds 200] [--profile-name laptop]

For a change that keeps every bit and can live beside the old code (a module attribute the code
reads when the loss is traced, e.g. which of two operators to call): side A sets the attribute to
``--a``, side B to ``--b`` (Python literals), each builds the run's trainer (same seed, same weights,
its loss compiled as on the CPU: the attribute is set while it compiles and before each of its steps,
so dynamo keeps one graph per value), and their steps then alternate, the order swapped every round.
Prints the median step of each and the median and quartiles of the per-pair ratios A / B (> 1: B is
faster). Fresh processes minutes apart differ by several percent on a shared machine; pairs of steps
a few milliseconds apart resolve ~1% (an A/A run: x1.003, quartiles 0.990-1.016;
benchmarks/cpu_trainer.md, "Fourteenth pass"). ``benchmarks/interleaved_ab.py`` compares checkouts
instead, but cannot compare two builds of the fused kernels (their operators share one name).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def ratio_summary(a_times: list[float], b_times: list[float]) -> dict:
    """Medians of each side's step times and of the per-pair ratios A / B, with the ratios' quartiles."""
    ratios = [a / b for a, b in zip(a_times, b_times)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"a_ms": statistics.median(a_times) * 1e3, "b_ms": statistics.median(b_times) * 1e3,
            "ratio": statistics.median(ratios), "q1": q1, "q3": q3, "pairs": len(ratios)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("attribute", help="module.attribute, e.g. icl_core.fused_attention.SOME_FLAG")
    ap.add_argument("--a", default="False", help="side A's value (a Python literal)")
    ap.add_argument("--b", default="True", help="side B's value (a Python literal)")
    ap.add_argument("--run", default="attn2")
    ap.add_argument("--profile-name", default="laptop")
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args(argv)
    module_name, _, attr = a.attribute.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise SystemExit(f"flag_ab: no module {module_name!r} (the attribute is module.attribute)") from None
    if not hasattr(module, attr):
        raise SystemExit(f"flag_ab: {module_name} has no attribute {attr!r}")
    values = {"A": ast.literal_eval(a.a), "B": ast.literal_eval(a.b)}

    import torch

    from icl_core import data as D
    from icl_core import train as T
    from icl_core.profiles import load_profile
    from icl_core.runs import cache_dir
    from step_worker import trainer_step

    torch.set_num_threads(1)
    T.reuse_freed_memory()
    cfg = load_profile(a.profile_name).run_config(a.run)
    corpus = D.Corpus(cfg.data, cache_dir())
    steps, batches = {}, None
    for side in ("A", "B"):
        setattr(module, attr, values[side])
        steps[side], batches = trainer_step(D, T, cfg, corpus, True, 10)
        for i in range(3):  # compiles with this side's value
            steps[side](batches[i])
    times = {"A": [], "B": []}
    for r in range(a.rounds):
        for side in (("A", "B") if r % 2 == 0 else ("B", "A")):
            setattr(module, attr, values[side])
            t = time.perf_counter()
            steps[side](batches[r % len(batches)])
            times[side].append(time.perf_counter() - t)
    res = ratio_summary(times["A"], times["B"])
    print(f"{a.run}: A ({a.attribute} = {values['A']!r}) {res['a_ms']:.2f} ms, B ({values['B']!r}) {res['b_ms']:.2f} ms; "
          f"A / B median x{res['ratio']:.4f} (quartiles {res['q1']:.4f}-{res['q3']:.4f}, {res['pairs']} pairs)")
    return res


if __name__ == "__main__":
    main()

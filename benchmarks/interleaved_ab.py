"""Training steps of several trainers interleaved in one process: paired speed ratios.

    python benchmarks/interleaved_ab.py [--run attn3] [--steps 100] [--profile-name laptop] REF_OR_DIR ...

Each argument is a commit (unpacked with ``git archive``) or a directory holding an ``icl_core``
package. Every tree's ``icl_core`` is imported under its own name (``icl_core_0``, ``icl_core_1``,
...; the package imports itself relatively), each builds the profile's run as its trainer would
(``init_model``, ``make_optimizer``, ``make_loss`` compiled as on the CPU, its allocator policy),
and their training steps then alternate one by one, the order reversed every round. A machine
that speeds up or slows down (other work, frequency, a neighbour on the host) moves both sides of
every pair alike, so the median of the per-round ratios resolves differences of a few percent that
fresh processes minutes apart do not (benchmarks/cpu_trainer.md, "Sixth pass"). The first tree is
the reference: each ratio is its step time over the other tree's (> 1: the other is faster).
Prints one line per tree and, with ``--out``, writes the step times as JSON (with the seconds of
each tree's three warm-up steps, the first of which compiles where the trainer compiles).

The trees share one process, one allocator and one core's caches; the steps of one evict the
other's data, so absolute step times run a little slower than alone. Compare ratios, and of nearby
commits: a tree without ``train.reuse_freed_memory`` runs here under another tree's allocator
setting, without the page faults of its own runs, and a trainer with large buffers slows a
cache-bound one (6d65b6a against the trainer of 2026-12-03: x1.55 interleaved at ``attn3``, x2.22
in fresh processes; benchmarks/cpu_trainer.md, "Seventh pass").
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_worker import compiles_on_cpu, trainer_step  # noqa: E402


def paired_ratios(ref_times: list[float], times: list[float]) -> dict:
    """Median and quartiles of ref_time / time over rounds (> 1: ``times`` are shorter)."""
    if len(ref_times) != len(times) or len(times) < 2:
        raise ValueError("paired_ratios: need two equally long lists of at least two step times")
    r = [a / b for a, b in zip(ref_times, times)]
    q = statistics.quantiles(r, n=4)
    return {"median": statistics.median(r), "q25": q[0], "q75": q[2], "n": len(r)}


def tree_of(spec: str, scratch: Path) -> Path:
    """A directory with an icl_core package: ``spec`` itself, or commit ``spec`` unpacked."""
    p = Path(spec)
    if (p / "icl_core" / "__init__.py").is_file():
        return p.resolve()
    if p.exists():
        raise SystemExit(f"interleaved_ab: {spec} holds no icl_core package")
    dest = scratch / f"tree_{spec.replace('/', '_')}"
    archive = subprocess.run(["git", "archive", "--format=tar", spec], cwd=ROOT, capture_output=True)
    if archive.returncode:
        raise SystemExit(f"interleaved_ab: {spec!r} is neither a directory with icl_core nor a commit of this repository")
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def load_trainer(tree: Path, name: str, scratch: Path, run: str, profile_name: str):
    """(step function, batches, compiled) of ``tree``'s trainer for the profile's ``run``, its
    icl_core imported as ``name`` (the step as benchmarks/step_worker.py takes it)."""
    shutil.copytree(tree / "icl_core", scratch / name)
    D, T = (importlib.import_module(f"{name}.{m}") for m in ("data", "train"))
    P, R = (importlib.import_module(f"{name}.{m}") for m in ("profiles", "runs"))
    if hasattr(T, "reuse_freed_memory"):
        T.reuse_freed_memory()
    cfg = P.load_profile(profile_name).run_config(run)
    compile = compiles_on_cpu(T, cfg)
    step, batches = trainer_step(D, T, cfg, D.Corpus(cfg.data, R.cache_dir()), compile, 20)
    return step, batches, compile


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="commits or directories with icl_core; the first is the reference")
    ap.add_argument("--run", default="attn3")
    ap.add_argument("--profile-name", default="laptop")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per tree (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if len(a.trees) < 2 or a.steps < 2:
        raise SystemExit("interleaved_ab: give at least two trees and --steps >= 2")
    import torch

    torch.set_num_threads(a.threads)
    scratch = Path(tempfile.mkdtemp(prefix="interleaved_ab_"))
    try:
        trees = [tree_of(s, scratch) for s in a.trees]
        # every copy's icl_core finds the profiles at <package>/../configs: this checkout's
        (scratch / "configs").symlink_to(ROOT / "configs")
        sys.path.insert(0, str(scratch))
        sides, warmup = [], []
        for i, tree in enumerate(trees):
            step, batches, compiled = load_trainer(tree, f"icl_core_{i}", scratch, a.run, a.profile_name)
            t = time.perf_counter()
            for j in range(3):  # the first step compiles, where the trainer compiles
                step(batches[j])
            warmup.append(time.perf_counter() - t)
            sides.append((step, batches, compiled))
        times = [[] for _ in trees]
        for r in range(a.steps):
            order = range(len(trees)) if r % 2 == 0 else reversed(range(len(trees)))
            for i in order:
                step, batches, _ = sides[i]
                t = time.perf_counter()
                step(batches[r % len(batches)])
                times[i].append(time.perf_counter() - t)
    finally:
        if str(scratch) in sys.path:
            sys.path.remove(str(scratch))
        for m in [m for m in sys.modules if m.startswith("icl_core_")]:
            del sys.modules[m]
        shutil.rmtree(scratch, ignore_errors=True)
    n_tok = sides[0][1][0].numel()
    res = {"run": a.run, "profile": a.profile_name, "threads": a.threads, "steps": a.steps, "trees": []}
    for spec, t, (_, _, compiled), w in zip(a.trees, times, sides, warmup):
        row = {"tree": spec, "compiled": compiled, "warmup_s": w, "median_step_ms": 1e3 * statistics.median(t),
               "tok_s": n_tok / statistics.median(t), "speed_vs_first": paired_ratios(times[0], t), "step_s": t}
        res["trees"].append(row)
        s = row["speed_vs_first"]
        print(f"{spec}: {row['median_step_ms']:.2f} ms per step ({row['tok_s']:.0f} tok/s); "
              f"speed vs {a.trees[0]} x{s['median']:.3f} (quartiles {s['q25']:.3f}-{s['q75']:.3f}, {s['n']} pairs); "
              f"3 warm-up steps {w:.1f} s")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

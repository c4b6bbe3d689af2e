"""A whole profile's training time under two trainers, projected from measured step times.

    python benchmarks/profile_ab.py [--profile laptop] [--method fresh|interleaved] [--steps 30]
                                    [--rounds 2] [--out FILE.json] BASELINE [CURRENT]

Training the laptop profile once per trainer takes hours of a 2-core machine (356M tokens in 19
runs), so a side-by-side build does not fit in one sitting; what its total is made of does. The
profile's runs are grouped by their training step (model, batch, precision, whether the trainer
compiles it: seeds and corpus variants share a step) and each group's step is timed under both
trainers. A run's projected training seconds under a trainer are its steps times that trainer's
median step, plus the seconds its three warm-up steps took beyond three median steps (the compile,
where the trainer compiles: from scratch for a group's first run, from inductor's cache for the
others, as in a build; ``--method fresh`` measures both, the first process with whatever inductor's
cache holds, ``--method interleaved`` only the first, charged to every run). Snapshot metrics are
left out, as the trainer logs them apart from training (profile_times.py reads both from a build's
manifests).

``--method fresh`` (default) times each trainer in fresh processes, alternating for ``--rounds``,
as ``make bench`` does (benchmarks/step_worker.py): each process has its own trainer's allocator
policy. ``--method interleaved`` alternates the two trainers' steps in one process
(benchmarks/interleaved_ab.py): paired and less noisy, but the process has one allocator, so an
old trainer without ``train.reuse_freed_memory`` is timed with the new one's setting and without
the page faults it pays in its own runs (cpu_trainer.md, "Seventh pass"). BASELINE and CURRENT
are commits or directories holding ``icl_core`` (CURRENT: this checkout); both train this
checkout's profile.

A projection, not a build: a step timed alone is not a step of a run trained beside another one.
On the Zen 5 of benchmarks/cpu_trainer.md ("Seventh pass") whole runs two at a time moved by up to
x1.8 from these step times, depending on the neighbour and the hour; whole runs are the measure
(benchmarks/book_ab.py trains a profile under both trainers in alternating blocks), this the
decomposition.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icl_core.profiles import load_profile  # noqa: E402
from icl_core.train import CPU_COMPILE_MIN_STEPS  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import interleaved_ab  # noqa: E402


def step_key(cfg) -> str:
    """What a run's training step depends on: model, batch, precision, threads and whether the
    trainer compiles it (seeds, corpora and token budgets past the compile threshold do not)."""
    return json.dumps([dataclasses.asdict(cfg.model), cfg.train.batch_size, cfg.train.precision,
                       cfg.train.threads, cfg.total_steps >= CPU_COMPILE_MIN_STEPS], sort_keys=True)


def step_groups(prof) -> dict[str, list[str]]:
    """Runs of ``prof`` that take the same training step, in profile order: {key: [run, ...]}; the
    first run of each group stands for it."""
    groups: dict[str, list[str]] = {}
    for name, cfg in prof.runs.items():
        groups.setdefault(step_key(cfg), []).append(name)
    return groups


def projected_seconds(steps: int, median_step_s: float, warmup_s: float, warmup_steps: int = 3) -> float:
    """A run's training seconds: its steps at the median step time, plus the warm-up's excess
    over that many median steps (never negative)."""
    if steps < 0 or median_step_s <= 0:
        raise ValueError("projected_seconds: steps must be >= 0 and the median step time > 0")
    return steps * median_step_s + max(0.0, warmup_s - warmup_steps * median_step_s)


def project(prof, timed: dict[str, dict]) -> dict:
    """Per-run and total projected training seconds. ``timed``: for each group's first run, the
    timings of both trainers (``trees``, baseline first: median_step_ms, warmup_s and, where
    measured, warmup_cached_s)."""
    rows = []
    for runs in step_groups(prof).values():
        trees = timed[runs[0]]["trees"]
        for j, name in enumerate(runs):
            steps = prof.runs[name].total_steps
            # the group's first run compiles from scratch; the others find its kernels cached
            secs = [projected_seconds(steps, t["median_step_ms"] / 1e3,
                                      t["warmup_s"] if j == 0 else t.get("warmup_cached_s", t["warmup_s"]))
                    for t in trees]
            rows.append({"run": name, "timed_as": runs[0], "tokens_M": prof.runs[name].train.total_tokens / 1e6,
                         "steps": steps, "seconds": secs, "speedup": secs[0] / secs[1]})
    totals = [sum(r["seconds"][i] for r in rows) for i in range(2)]
    return {"rows": rows, "total_s": totals, "speedup": totals[0] / totals[1]}


def prepare_trees(specs: list[str], tmp: Path) -> list[Path]:
    """For each commit or directory, a folder in ``tmp`` with its ``icl_core`` and this checkout's
    ``configs``, so every trainer trains this checkout's profile."""
    out = []
    for i, spec in enumerate(specs):
        src = interleaved_ab.tree_of(spec, tmp)  # SystemExit with one line if it is neither
        dest = tmp / f"side_{i}"
        shutil.copytree(src / "icl_core", dest / "icl_core", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "configs", dest / "configs")
        out.append(dest)
    return out


def time_fresh(run: str, trees: list[Path], profile: str, steps: int, rounds: int) -> dict:
    """Each trainer's step for ``run`` in fresh processes (bench.worker), alternating for ``rounds``:
    the median over rounds of each process's median step, and the first round's warm-up seconds."""
    cfg = load_profile(profile).run_config(run)
    got = [[] for _ in trees]
    for _ in range(rounds):
        for i, tree in enumerate(trees):
            got[i].append(bench.worker(tree, run, cfg.train.precision, steps=steps, profile_name=profile))
    res = {"method": "fresh", "rounds": rounds, "trees": [
        {"tree": str(tree), "compiled": g[0]["compiled"], "warmup_s": g[0]["warmup_s"],
         # later processes find the first one's compiled kernels in inductor's cache, as the
         # book's later runs of a shape do
         "warmup_cached_s": statistics.median(x["warmup_s"] for x in g[1:]) if len(g) > 1 else g[0]["warmup_s"],
         "median_step_ms": 1e3 * cfg.tokens_per_step / statistics.median(x["tok_s"]["median"] for x in g),
         "minor_faults_per_step": statistics.median(x.get("minor_faults_per_step") or 0 for x in g),
         "peak_rss_mb": max(x["peak_rss_mb"] or 0 for x in g)} for tree, g in zip(trees, got)]}
    ms = [t["median_step_ms"] for t in res["trees"]]
    print(f"  median step {ms[0]:.1f} -> {ms[1]:.1f} ms (x{ms[0] / ms[1]:.2f}); warm-up "
          + " -> ".join(f"{t['warmup_s']:.1f} s (cached {t['warmup_cached_s']:.1f})" for t in res["trees"]), flush=True)
    return res


def time_interleaved(run: str, trees: list[Path], profile: str, steps: int, tmp: Path) -> dict:
    """Both trainers' steps for ``run`` alternating in one fresh process (interleaved_ab.py)."""
    out = tmp / f"{run}.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "interleaved_ab.py"), "--run", run,
                        "--profile-name", profile, "--steps", str(steps), "--out", str(out), *map(str, trees)],
                       cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"interleaved_ab.py exited with {p.returncode} for {run}")
    res = json.loads(out.read_text())
    for t in res["trees"]:
        t.pop("step_s", None)  # long; the summaries stay
    return {"method": "interleaved", **res}


def markdown(res: dict, names: list[str]) -> str:
    lines = [f"| run | timed as | tokens (M) | {names[0]} s | {names[1]} s | speedup |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['run']} | {r['timed_as']} | {r['tokens_M']:g} | {r['seconds'][0]:.0f} | "
                     f"{r['seconds'][1]:.0f} | x{r['speedup']:.2f} |")
    t = res["total_s"]
    lines.append(f"| **total** | | {sum(r['tokens_M'] for r in res['rows']):g} | **{t[0]:.0f}** "
                 f"({t[0] / 60:.1f} core-min) | **{t[1]:.0f}** ({t[1] / 60:.1f} core-min) | **x{res['speedup']:.2f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="BASELINE [CURRENT]: commits or directories with icl_core")
    ap.add_argument("--profile", default="laptop")
    ap.add_argument("--method", choices=["fresh", "interleaved"], default="fresh")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per trainer, group (and round)")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per trainer and group (--method fresh)")
    ap.add_argument("--out", type=Path, help="write the per-group timings and the projection as JSON")
    a = ap.parse_args(argv)
    trees = a.trees + [str(ROOT)] * (2 - len(a.trees))
    if len(trees) != 2:
        print("profile_ab: give BASELINE and at most one CURRENT", file=sys.stderr)
        return 2
    try:
        prof = load_profile(a.profile)
    except Exception as e:  # one line, exit 2
        print(f"profile_ab: {e}", file=sys.stderr)
        return 2
    groups = step_groups(prof)
    timed = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sides = prepare_trees(trees, Path(tmp))
            for runs in groups.values():
                print(f"[profile_ab] {runs[0]} (step of {', '.join(runs)})", flush=True)
                if a.method == "interleaved":
                    timed[runs[0]] = time_interleaved(runs[0], sides, a.profile, a.steps, Path(tmp))
                else:
                    timed[runs[0]] = time_fresh(runs[0], sides, a.profile, a.steps, a.rounds)
        except (RuntimeError, SystemExit) as e:
            print(f"profile_ab: {str(e).splitlines()[0] if str(e) else 'failed'}", file=sys.stderr)
            return 2
    res = project(prof, timed)
    print(markdown(res, trees))
    if a.out:
        a.out.write_text(json.dumps({"profile": a.profile, "method": a.method, "trees": trees, "timed": timed, **res},
                                    indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

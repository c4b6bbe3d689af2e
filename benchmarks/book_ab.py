"""The book's training under two trainers, in alternating blocks: measured, not projected.

    python benchmarks/book_ab.py [--profile benchmarks/book_ab.yaml] [--order ABBA] [--jobs 2]
                                 [--weigh laptop] [--keep DIR] [--out FILE.json] BASELINE [CURRENT]

Each block trains the whole profile from an empty runs folder with one trainer's own
``icl_core.book.train`` (its pool of one-thread workers, longest run first, snapshot metrics
included, as ``make book`` trains), in a fresh process from a folder holding that trainer's
``icl_core`` and this checkout's configs. A is BASELINE, B is CURRENT (this checkout by default);
``--order`` gives the blocks, e.g. ABBA (the default: a drift of the machine that is linear in time
falls on both trainers alike) or ABAB. The corpora and inductor's cache are shared: a block finds
the corpora built (``ICL_CACHE_DIR``), and a compiling trainer's later blocks find its kernels.

What is compared is what the trainer logs as a run's training seconds (``train_seconds`` in the
run's manifest: optimisation steps, compile included, snapshot metrics and checkpoints apart), per
run and summed over the profile, for each block; the speedup is the mean of BASELINE's block totals
over the mean of CURRENT's, and each adjacent A/B pair's ratio shows the spread. Snapshot-metric
seconds and peak memory are reported beside it. Why blocks and not a projection from steps
(profile_ab.py) or one side-by-side pair: on a virtual machine an old trainer's page faults cost
whatever the host makes them cost at that hour, and its whole runs moved by 45-48% between
sittings while the new trainer's moved by 3% (benchmarks/cpu_trainer.md, "Seventh pass" and
"Eighth pass"). BASELINE and CURRENT are commits or directories holding ``icl_core``.

``--weigh PROFILE`` (default ``laptop``; ``none`` skips it) also gives that profile's training
seconds per block, each of its runs charged the block's seconds for the run with its training step
(model, batch, precision, threads, compiled: profile_ab.step_key) times the ratio of their steps,
so a profile of 19 runs, most of them 48M-token runs of three configurations, is weighed as it
would train; its runs whose step no block trained are named, and their share of tokens left out.

``--profile`` is a profile name of this checkout (configs/profiles) or a .yaml file; the default,
benchmarks/book_ab.yaml, holds five laptop runs (36M tokens; one block on the 2-core Zen 5 of
cpu_trainer.md: 596-625 s of wall time with the 2026-12-03 trainer, 759-1,108 s with 6d65b6a's).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_ab  # noqa: E402

sys.path.insert(0, str(ROOT))
from icl_core.profiles import load_profile  # noqa: E402
from icl_core.runs import cache_dir  # noqa: E402

DEFAULT_PROFILE = ROOT / "benchmarks" / "book_ab.yaml"


def parse_order(order: str) -> list[int]:
    """Block order as tree indices (A = 0, the baseline; B = 1): both trainers at least once."""
    letters = order.strip().upper()
    if set(letters) != {"A", "B"}:
        raise ValueError(f"--order {order!r}: give blocks as letters A (baseline) and B (current), each at least once, e.g. ABBA")
    return [0 if c == "A" else 1 for c in letters]


def profile_file(spec: str) -> Path:
    """The profile's .yaml: a file, or a profile name of this checkout's configs/profiles."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ValueError(f"--profile {spec}: no such file")
        return p.resolve()
    named = ROOT / "configs" / "profiles" / f"{spec}.yaml"
    if not named.is_file():
        known = sorted(q.stem for q in (ROOT / "configs" / "profiles").glob("*.yaml"))
        raise ValueError(f"--profile {spec!r}: neither a .yaml file nor a profile of this checkout (known: {', '.join(known)})")
    return named


def prepare_sides(trees: list[str], prof: Path, tmp: Path) -> list[Path]:
    """For each commit or directory, a folder with its ``icl_core`` and this checkout's configs
    (profile_ab.prepare_trees), the profile among them, so each trainer trains the same runs."""
    sides = profile_ab.prepare_trees(trees, tmp)  # SystemExit with one line for a bad tree
    for side in sides:
        shutil.copy(prof, side / "configs" / "profiles" / prof.name)
    return sides


def read_block(runs_dir: Path) -> dict[str, dict]:
    """{run: {train_seconds, metrics_seconds, peak_rss_mb}} from a block's runs folder (run folders
    are ``<name>-<hash>``); ValueError naming the first run that did not finish. The manifests are
    read as JSON, not through icl_core.runs.Run: Run checks a folder's config hash with this
    checkout's RunConfig, and an older trainer's folders carry its own hash."""
    out = {}
    for man in sorted(runs_dir.glob("*/manifest.json")):
        name = man.parent.name.rsplit("-", 1)[0]
        m = json.loads(man.read_text())
        if not m.get("done"):
            raise ValueError(f"run {name} in {runs_dir} did not finish (manifest without done)")
        out[name] = {"train_seconds": float(m["train_seconds"]),
                     "metrics_seconds": sum(float(s.get("metrics_seconds", 0.0)) for s in m.get("snapshots", {}).values()),
                     "peak_rss_mb": m.get("peak_rss_mb")}
    if not out:
        raise ValueError(f"no trained runs in {runs_dir}")
    return out


def summarize(blocks: list[dict]) -> dict:
    """Per-run and total training seconds of each trainer over its blocks; speedup = mean of the
    baseline's block totals over the current's; the ratio of every adjacent baseline/current pair.
    ``blocks``: [{"tree": 0 or 1, "runs": read_block(...)}, ...] in the order they ran."""
    names = sorted(set.intersection(*(set(b["runs"]) for b in blocks)))
    if not names or any(set(b["runs"]) != set(names) for b in blocks):
        raise ValueError("the blocks trained different runs; compare blocks of one profile")
    totals = [sum(b["runs"][n]["train_seconds"] for n in names) for b in blocks]
    per_run = {}
    for n in names:
        secs = [[b["runs"][n]["train_seconds"] for b in blocks if b["tree"] == i] for i in (0, 1)]
        per_run[n] = {"seconds": secs, "speedup": statistics.mean(secs[0]) / statistics.mean(secs[1])}
    return {"runs": names, "block_totals": totals, "per_run": per_run, **_ratios(totals, blocks),
            "metrics_totals": [sum(b["runs"][n]["metrics_seconds"] for n in names) for b in blocks]}


def _ratios(totals: list[float], blocks: list[dict]) -> dict:
    """speedup (mean of the baseline's block totals over the current's) and the ratio of every
    adjacent baseline/current pair of blocks."""
    by_tree = [[t for t, b in zip(totals, blocks) if b["tree"] == i] for i in (0, 1)]
    pairs = [totals[i] / totals[i + 1] if blocks[i]["tree"] == 0 else totals[i + 1] / totals[i]
             for i in range(len(blocks) - 1) if blocks[i]["tree"] != blocks[i + 1]["tree"]]
    return {"speedup": statistics.mean(by_tree[0]) / statistics.mean(by_tree[1]), "pair_speedups": pairs}


def weigh(blocks: list[dict], prof, target) -> dict:
    """The training seconds of a whole profile (``target``, e.g. the laptop's 19 runs) in each
    block, from the runs the block trained (of profile ``prof``): each target run is charged the
    block's seconds for the run with the same training step (profile_ab.step_key: model, batch,
    precision, threads, compiled; seeds and corpus variants share it), times the ratio of their
    step counts. A whole run's seconds include its compile, so scaling a shortened run up charges
    its compile several times, to both trainers alike (which lowers the ratio, never raises it).
    Target runs with no such run are listed in ``not_covered``, their tokens outside ``covered``."""
    names = set.intersection(*(set(b["runs"]) for b in blocks))
    by_step = {profile_ab.step_key(prof.runs[n]): n for n in sorted(names) if n in prof.runs}
    charged, missing = {}, []
    for name, cfg in target.runs.items():
        src = by_step.get(profile_ab.step_key(cfg))
        if src is None:
            missing.append(name)
        else:
            charged[name] = (src, cfg.total_steps / prof.runs[src].total_steps)
    if not charged:
        raise ValueError("no run of the weighed profile takes the training step of a run trained here")
    totals = [sum(b["runs"][src]["train_seconds"] * k for src, k in charged.values()) for b in blocks]
    tokens = {n: cfg.train.total_tokens for n, cfg in target.runs.items()}
    return {"profile": target.name, "block_totals": totals, **_ratios(totals, blocks),
            "charged_as": {n: [src, k] for n, (src, k) in charged.items()}, "not_covered": missing,
            "covered": sum(tokens[n] for n in charged) / sum(tokens.values())}


def markdown(res: dict, blocks: list[dict], labels: list[str]) -> str:
    heads = [f"{i + 1}: {labels[b['tree']]}" for i, b in enumerate(blocks)]
    lines = ["| run | " + " | ".join(heads) + " | speedup |", "|---" * (len(heads) + 2) + "|"]
    for n in res["runs"]:
        cells = [f"{b['runs'][n]['train_seconds']:.1f}" for b in blocks]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | x{res['per_run'][n]['speedup']:.2f} |")
    lines.append("| **training s** | " + " | ".join(f"**{t:.1f}**" for t in res["block_totals"])
                 + f" | **x{res['speedup']:.2f}** |")
    lines.append("| snapshot metrics s | " + " | ".join(f"{t:.1f}" for t in res["metrics_totals"]) + " | |")
    lines.append("| block wall s | " + " | ".join(f"{b.get('wall_s', 0):.0f}" for b in blocks) + " | |")
    pairs = ", ".join(f"x{p:.2f}" for p in res["pair_speedups"])
    out = "\n".join(lines) + f"\n\nadjacent pairs: {pairs}"
    w = res.get("weighed")
    if w:
        out += (f"\n\n{w['profile']} profile's training s, each run charged as the run above with its step "
                f"({100 * w['covered']:.0f}% of its tokens; not covered: {', '.join(w['not_covered']) or 'none'}): "
                + " | ".join(f"{t:.0f}" for t in w["block_totals"])
                + f" → **x{w['speedup']:.2f}** (pairs " + ", ".join(f"x{p:.2f}" for p in w["pair_speedups"]) + ")")
    return out


def run_block(side: Path, profile_name: str, jobs: int, runs_dir: Path) -> float:
    """Train the profile with ``side``'s own book.train into an empty ``runs_dir``; wall seconds."""
    runs_dir.mkdir(parents=True)
    # the corpora of this checkout's cache (built once, not in every block's runs folder)
    env = dict(os.environ, ICL_RUNS_DIR=str(runs_dir), ICL_CACHE_DIR=str(cache_dir()), PYTHONPATH=str(side))
    code = ("from icl_core import book; from icl_core.profiles import load_profile; "
            f"book.train(load_profile({profile_name!r}), jobs={jobs})")
    t0 = time.time()
    with open(runs_dir / "book_ab.log", "w") as log:
        rc = subprocess.run([sys.executable, "-c", code], cwd=side, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"training failed (exit {rc}); its log: {runs_dir / 'book_ab.log'}")
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="BASELINE [CURRENT]: commits or directories with icl_core")
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE), help="a .yaml file or a profile name")
    ap.add_argument("--order", default="ABBA", help="blocks: A = BASELINE, B = CURRENT")
    ap.add_argument("--jobs", type=int, default=2, help="training workers per block (the book's: one per core)")
    ap.add_argument("--keep", type=Path, help="keep each block's runs folder under this directory")
    ap.add_argument("--out", type=Path, help="write the blocks and the summary as JSON")
    ap.add_argument("--weigh", default="laptop",
                    help="also give this profile's training seconds, charged run by run from the runs trained "
                         "(weigh); 'none' to skip")
    a = ap.parse_args(argv)
    trees = a.trees + [str(ROOT)] * (2 - len(a.trees))
    try:
        if len(trees) != 2:
            raise ValueError("give BASELINE and at most one CURRENT")
        order = parse_order(a.order)
        prof = profile_file(a.profile)
        target = None if a.weigh == "none" else profile_file(a.weigh)
        if a.keep is not None and a.keep.exists() and any(a.keep.iterdir()):
            raise ValueError(f"--keep {a.keep} is not empty")
    except ValueError as e:
        print(f"book_ab: {e}", file=sys.stderr)
        return 2
    blocks = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = a.keep or Path(tmp) / "blocks"
        try:
            sides = prepare_sides(trees, prof, Path(tmp))
            for i, t in enumerate(order):
                runs_dir = scratch / f"block_{i + 1}_{'AB'[t]}"
                print(f"[book_ab] block {i + 1}/{len(order)}: {'AB'[t]} ({trees[t]})", flush=True)
                wall = run_block(sides[t], prof.stem, a.jobs, runs_dir)
                blocks.append({"tree": t, "wall_s": wall, "runs": read_block(runs_dir)})
                print(f"[book_ab]   {wall:.0f} s wall, {sum(r['train_seconds'] for r in blocks[-1]['runs'].values()):.1f} s of training", flush=True)
            res = summarize(blocks)
            if target is not None:
                res["weighed"] = weigh(blocks, load_profile(prof.stem, prof.parent),
                                       load_profile(target.stem, target.parent))
        except (RuntimeError, ValueError, SystemExit) as e:
            print(f"book_ab: {str(e).splitlines()[0] if str(e) else 'failed'}", file=sys.stderr)
            return 2
    print(markdown(res, blocks, ["A", "B"]))
    if a.out:
        a.out.write_text(json.dumps({"profile": str(prof), "trees": trees, "order": a.order, "blocks": blocks, **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

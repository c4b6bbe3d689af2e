"""How close each trainer's training gradient is to the exact one, at the same weights and batches.

    python benchmarks/grad_fidelity.py --baseline REF --snapshot RUN_DIR:STEP [RUN_DIR:STEP ...]
                                       [--batches 3] [--run attn3] [--out grad_fidelity.json]

Two trainers that differ only in rounding cannot be paired step by step over a whole run (their
weights decorrelate within ~1M tokens, benchmarks/cpu_trainer.md), so whether one of them biases
training shows in the gradient of a single step instead. For each snapshot (weights of a trained run)
and each of ``--batches`` training batches that follow it, this computes the loss gradient

* in float64 with this checkout's model (the reference: no rounding worth the name),
* with this checkout's trainer loss in the run's precision, eager and ``torch.compile``-d,
* with REF's trainer loss in the same precision (REF's code, unpacked by ``git archive``),

each in a fresh one-thread process (``--worker``), and reports every gradient's relative error
``|g - g64| / |g64|``, its cosine with ``g64`` and its norm ratio, over all parameters and per
attention weight. The batches are this checkout's ``train_batch`` at the steps after the snapshot,
passed to every worker as tokens, so all trees see the same inputs. REF's model must load the
snapshot's tensors (same parameter names and shapes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PATHS = ("fp64", "eager", "compiled")


def worker(a) -> int:
    """Gradients of one tree's loss path at one set of weights, one per batch, to a safetensors file."""
    sys.path.insert(0, a.tree)
    import dataclasses

    import torch
    from safetensors.torch import load_file, save_file

    from icl_core import train as T
    from icl_core.model import Transformer
    from icl_core.profiles import load_profile

    torch.set_num_threads(1)
    cfg = load_profile(a.profile_name).run_config(a.run)
    model = Transformer(cfg.model)
    model.load_state_dict(load_file(a.weights))
    model.train()
    if a.path == "fp64":
        model = model.double()
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    loss_of = T.make_loss(model, cfg, "cpu", compile=a.path == "compiled")
    batches = load_file(a.batch_file)
    out = {}
    for name in sorted(batches):
        model.zero_grad(set_to_none=True)
        loss = loss_of(batches[name])
        loss.backward()
        out[f"{name}/loss"] = loss.detach().double().reshape(1)
        for n, p in model.named_parameters():
            out[f"{name}/{n}"] = p.grad.detach().double().contiguous()
    save_file(out, a.out)
    return 0


def _layout(grads: dict) -> tuple[list[str], list[str]]:
    """The batch names and parameter names of a worker's file (keys ``batch/param`` and ``batch/loss``)."""
    batches = sorted({k.split("/")[0] for k in grads})
    params = [k.split("/", 1)[1] for k in grads if k.startswith(batches[0] + "/") and not k.endswith("/loss")]
    return batches, params


def compare(ref: dict, got: dict) -> dict:
    """Relative error, cosine and norm ratio of ``got``'s gradients against ``ref``'s, per batch,
    over all parameters, and per attention weight (names containing 'attn.W_')."""
    import torch

    batches, params = _layout(ref)
    rows = {}
    for b in batches:
        g = torch.cat([got[f"{b}/{n}"].flatten() for n in params])
        r = torch.cat([ref[f"{b}/{n}"].flatten() for n in params])
        rows[b] = {"loss_diff": float(got[f"{b}/loss"] - ref[f"{b}/loss"]),
                   "rel_err": float((g - r).norm() / r.norm()),
                   "cos": float(g @ r / (g.norm() * r.norm())),
                   "norm_ratio": float(g.norm() / r.norm()),
                   "attn_rel_err": {n: float((got[f"{b}/{n}"] - ref[f"{b}/{n}"]).norm() / ref[f"{b}/{n}"].norm())
                                    for n in params if "attn.W_" in n}}
    return rows


def systematic(ref: dict, got: dict) -> dict:
    """The error of the gradient averaged over the batches: random rounding errors shrink in the
    average, a bias does not. ``rel_err`` = |mean(g - g64)| / |mean(g64)|; ``along`` = the mean
    error's component along the mean gradient, as a fraction of it (negative: smaller steps)."""
    import torch

    batches, params = _layout(ref)

    def mean(d):
        return torch.stack([torch.cat([d[f"{b}/{n}"].flatten() for n in params]) for b in batches]).mean(0)

    r, e = mean(ref), mean(got) - mean(ref)
    return {"batches": len(batches), "rel_err": float(e.norm() / r.norm()), "along": float(e @ r / (r @ r))}


def _run_worker(tree: Path, path: str, weights: Path, batches: Path, out: Path, a) -> dict:
    from safetensors.torch import load_file

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree), "--path", path,
           "--weights", str(weights), "--batch-file", str(batches), "--out", str(out),
           "--run", a.run, "--profile-name", a.profile_name]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"grad_fidelity: the {path} worker on {tree} failed:\n{p.stderr[-2000:]}")
    return load_file(str(out))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="an older commit whose trainer loss is compared too")
    ap.add_argument("--snapshot", nargs="+", default=[], help="RUN_DIR:STEP, a trained run's snapshot")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--run", default="attn3", help="the profile's run whose model and recipe the snapshot has")
    ap.add_argument("--profile-name", default="laptop")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if not a.snapshot:
        raise SystemExit("grad_fidelity: give at least one --snapshot RUN_DIR:STEP")
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import save_file

    from icl_core import data as D
    from icl_core.profiles import load_profile
    from icl_core.runs import Run, cache_dir

    results = {"baseline": a.baseline, "snapshots": []}
    want = load_profile(a.profile_name).run_config(a.run).model  # the model every worker builds
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [("current eager", ROOT, "eager"), ("current compiled", ROOT, "compiled")]
        if a.baseline:
            from bench import unpack_commit
            paths.append(("baseline", unpack_commit(a.baseline, tmp / "baseline"), "eager"))
        for spec in a.snapshot:
            run_dir, _, step = spec.rpartition(":")
            if not run_dir or not step.isdigit():
                raise SystemExit(f"grad_fidelity: --snapshot wants RUN_DIR:STEP, got {spec!r}")
            if not (Path(run_dir) / "manifest.json").is_file():
                raise SystemExit(f"grad_fidelity: {run_dir} is not a trained run (no manifest.json)")
            run, step = Run(run_dir), int(step)
            if str(step) not in run.manifest["snapshots"]:
                raise SystemExit(f"grad_fidelity: run {run.name} has no snapshot at step {step}; steps: {run.steps}")
            if run.config.model != want:
                raise SystemExit(f"grad_fidelity: run {run.name}'s model is not the {a.profile_name} profile's "
                                 f"{a.run} model the workers build; pass its --run and --profile-name")
            weights = tmp / "weights.safetensors"
            save_file(run.load(step).state_dict(), str(weights))
            cfg = run.config
            corpus = D.Corpus(cfg.data, cache_dir())
            batches = tmp / "batches.safetensors"
            save_file({f"step{s:08d}": D.train_batch(corpus, cfg.train.batch_size, cfg.model.n_ctx, cfg.train.seed, s,
                                                     cfg.data.repeat_fraction, cfg.data.repeat_span_max)
                       for s in range(step, step + a.batches)}, str(batches))
            ref = _run_worker(ROOT, "fp64", weights, batches, tmp / "fp64.safetensors", a)
            entry = {"run": f"{run.path.parent.name}/{run.name}", "step": step, "tokens": run.tokens(step), "paths": {},
                     "systematic": {}}
            for label, tree, path in paths:
                got = _run_worker(tree, path, weights, batches, tmp / f"{label}.safetensors", a)
                entry["paths"][label] = compare(ref, got)
                entry["systematic"][label] = systematic(ref, got)
            results["snapshots"].append(entry)
    for line in table(results):
        print(line)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> list[str]:
    """Markdown: per snapshot and loss path, the median over batches of relative error and cosine."""
    import statistics
    lines = ["| run | tokens | loss path | relative error (median over batches) | cosine | norm ratio | worst attention weight "
             "| error of the mean gradient | its part along the mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in results["snapshots"]:
        for label, rows in e["paths"].items():
            med = {k: statistics.median(r[k] for r in rows.values()) for k in ("rel_err", "cos", "norm_ratio")}
            worst = max(max(r["attn_rel_err"].values(), default=0.0) for r in rows.values())
            lines.append(f"| {e['run']} | {e['tokens'] / 1e6:.2f}M | {label} | {med['rel_err']:.4f} | "
                         f"{med['cos']:.6f} | {med['norm_ratio']:.4f} | {worst:.4f} | "
                         f"{e['systematic'][label]['rel_err']:.4f} | {e['systematic'][label]['along']:+.5f} |")
    return lines


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)

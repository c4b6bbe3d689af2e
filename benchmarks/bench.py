"""Benchmarks (issue 11), all in one run on one machine; medians over repeats with min-max.

    python benchmarks/bench.py [--threads 2] [--repeats 5] [--quick] [--skip-book] [--skip-tl]

1. the machine's matmul peak (fp32 and bf16, the same thread count);
2. the trainer's tokens/s on the laptop profile's model shapes, and the achieved GFLOP/s as a
   fraction of that peak. FLOPs per trained token are counted as
       6 * P_matmul + 6 * n_layers * n_ctx * d_model
   where P_matmul counts the weights used in matrix products (W_Q, W_K, W_V, W_O, MLP, W_U; not
   the embedding lookup), 6 = 2 (multiply-add) x 3 (forward + two backward products), and the
   second term is QK^T and AV (2 x 2 x T x d per token and layer forward) halved for the causal
   mask, times 3 for the backward pass;
3. the same model and batch trained with TransformerLens' HookedTransformer (optional extra), as
   a throughput ratio, with TransformerLens' own fraction of the peak and the ceiling it puts on
   that ratio (:func:`speedup_ceiling`);
4. the cost of the metrics: at every snapshot in training and in the chapters' analyses, for one
   run, as a ratio to its training time (:func:`metrics_cost`);
5. the whole smoke book build, split into train / execute / render;
6. with ``--baseline REF``: the trainer of an older commit and of this checkout side by side, each
   measurement in a fresh process (benchmarks/step_worker.py) and the two alternating, so a noisy
   machine slows both alike: tokens/s, their ratio, the share of the step in matrix products
   (``torch.profiler``), peak resident memory, page faults per step; and this checkout at 1 and 2 threads (is one
   2-thread run faster than two 1-thread runs side by side?);
7. the peak resident memory the trainer logged for each run of a trained profile.

Threads default to 1, as the book trains (two 1-thread runs at a time on 2 cores), and the matmul
peak is measured at the same thread count, so "% of peak" compares like with like.

Results: benchmarks/results.json and benchmarks/results.md (tables).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icl_core import data as D  # noqa: E402
from icl_core.config import RunConfig  # noqa: E402
from icl_core.profiles import load_profile  # noqa: E402
from icl_core.runs import cache_dir  # noqa: E402
from icl_core.train import init_model, make_loss, make_optimizer  # noqa: E402


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def sync_device(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype, n=1024, repeats=5, iters=20, device="cpu"):
    """Measured GFLOP/s of an n x n matmul (the machine's practical peak for this dtype), under
    autocast to ``dtype`` as the trainer computes it: on a CPU without bf16 matrix kernels the bf16
    product is the fp32 product of bf16-rounded values (icl_core.precision), 100x faster there than
    PyTorch's generic bf16 kernel, so that is the peak the bf16 trainer is measured against."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    dev_type = device.split(":")[0]
    autocast = torch.autocast(dev_type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))
    with autocast:
        for _ in range(3):
            a @ b
    sync_device(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        with autocast:
            for _ in range(iters):
                a @ b
        sync_device(device)
        dt = time.perf_counter() - t
        out.append(2 * n ** 3 * iters / dt / 1e9)
    return stats(out)


def training_step(params, loss_of, opt):
    """One training step as the trainer takes it (forward and loss in ``loss_of``, which applies
    its precision; backward, clipping, AdamW), as a function of the batch."""
    params = list(params)

    def step(x):
        loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def _throughput(params, loss_of, cfg: RunConfig, corpus, steps, repeats, warmup, device="cpu", opt=None):
    """Tokens/s of full training steps (forward, backward, clip, AdamW) on the same batches."""
    step = training_step(params, loss_of, opt or torch.optim.AdamW(params, lr=cfg.train.lr))
    x_all = [D.train_batch(corpus, cfg.train.batch_size, cfg.model.n_ctx, 0, s).to(device) for s in range(steps)]

    for i in range(warmup):
        step(x_all[i % steps])
    sync_device(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in x_all:
            step(x)
        sync_device(device)
        out.append(steps * x_all[0].numel() / (time.perf_counter() - t))
    return stats(out)


def trainer_loss(model, cfg: RunConfig, device: str, mode: str = "eager"):
    """The trainer's loss (train.make_loss) for ``mode``: "eager", "default" (plain torch.compile)
    or another torch.compile mode ("reduce-overhead", ...)."""
    return make_loss(model, cfg, device, compile=mode != "eager", mode=None if mode in ("eager", "default") else mode)


def train_throughput(cfg: RunConfig, corpus, steps=20, repeats=5, warmup=3, device="cpu", mode="eager"):
    """The trainer's own step: its optimizer (fused AdamW on CUDA) and loss (:func:`trainer_loss`)."""
    model = init_model(cfg, device)
    return _throughput(list(model.parameters()), trainer_loss(model, cfg, device, mode), cfg,
                       corpus, steps, repeats, warmup, device, opt=make_optimizer(model, cfg))


def tl_throughput(cfg: RunConfig, corpus, steps=20, repeats=5, warmup=3):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    m = cfg.model
    tl = HookedTransformer(HookedTransformerConfig(
        n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, d_head=m.d_head, n_ctx=m.n_ctx,
        d_vocab=m.d_vocab, attn_only=m.attn_only, d_mlp=None if m.attn_only else m.d_mlp,
        act_fn=None if m.attn_only else "gelu", normalization_type="LN" if m.layer_norm else None,
        positional_embedding_type={"shortformer": "shortformer", "rope": "rotary"}.get(m.positional, "standard"),
        rotary_adjacent_pairs=True, seed=0, device="cpu"))
    def loss_of(x):  # under the run's precision, as the trainer's forward (train.make_loss)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            return tl(x, return_type="loss")
    return _throughput(list(tl.parameters()), loss_of, cfg, corpus, steps, repeats, warmup)


def speedup_ceiling(tl_tok_s: float, flops_per_token: float, peak_gflops: float) -> tuple[float, float]:
    """(TransformerLens' fraction of the matmul peak, the largest speedup over it any trainer could
    reach): a trainer running at 100% of the peak is 1 / fraction times faster than TransformerLens,
    so where TransformerLens already reaches a third of the peak, no trainer is 3x faster."""
    frac = frac_of_peak(tl_tok_s, flops_per_token, peak_gflops)
    return frac, 1 / frac


def frac_of_peak(tok_s: float, flops_per_token: float, peak_gflops: float) -> float:
    """Achieved model FLOP/s (tokens/s x FLOPs per token) as a fraction of the matmul peak."""
    return tok_s * flops_per_token / 1e9 / peak_gflops


def metrics_cost(run, prof, repeats=3):
    """Seconds of evaluation for one run, as a ratio to its training time:

    - the cheap metrics the trainer computes at every snapshot (loss, ICL, prefix-matching and
      previous-token scores from one pass; :func:`icl_core.train.cheap_metrics`), times the
      number of snapshots (or the time the run logged, where it did);
    - the chapters' per-snapshot analyses at the snapshot counts the profile's chapters use:
      pattern-preserving and full single-head ablations (Argument 3), the head scores the training
      log does not hold (copying, OV eigenvalues, K-composition) and composition scores (Argument 5).
      Per-token loss analyses (Arguments 1 and 6) read the losses kept in training and cost ~0.
    """
    from icl_core import metrics as M
    from icl_core.train import cheap_metrics

    ev = run.eval_data
    m = run.load(run.steps[-1])
    ch3, ch5 = prof.chapter_params("03_ablation"), prof.chapter_params("05_mechanism")
    n_abl = ev.tokens[: ch3.get("n_examples", 48)]

    def timed(f):
        xs = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            xs.append(time.perf_counter() - t)
        return stats(xs)

    L, H = run.config.model.n_layers, run.config.model.n_heads
    abl_bs = max(1, M.ABLATION_SEQS_PER_PASS // (L * H + 1))
    parts = {
        "cheap_metrics": timed(lambda: cheap_metrics(m, run.config, ev, precision=run.metrics_precision)),
        # as the chapters run them (analysis.ablations): the run's eval precision, ~16 sequences per pass
        "ablation_pp": timed(lambda: M.ablation_effects(m, n_abl, pattern_preserving=True, batch_size=abl_bs,
                                                        precision=run.metrics_precision)),
        "ablation_full": timed(lambda: M.ablation_effects(m, n_abl, pattern_preserving=False, batch_size=abl_bs,
                                                          precision=run.metrics_precision)),
        "head_scores_extra": timed(lambda: (M.copying_scores(m, ev.rep), M.ov_eigen_copying_scores(m),
                                            M.k_composition_traces(m, torch.rand(L, H)))),
        "composition": timed(lambda: M.composition_scores(m)),
    }
    med = {k: v["median"] for k, v in parts.items()}
    logged = run.metrics_seconds()
    has_log = math.isfinite(logged)
    cheap_run = logged if has_log else med["cheap_metrics"] * len(run.steps)
    n3, n3f, n5 = ch3.get("n_steps", 8), ch3.get("n_steps_full", ch3.get("n_steps", 8)), ch5.get("n_steps", 8)
    chapters = med["ablation_pp"] * n3 + med["ablation_full"] * n3f + (med["head_scores_extra"] + med["composition"]) * n5
    train = run.train_seconds
    from icl_core.analysis import logged_seconds
    logged_analyses = logged_seconds(run)  # what the chapters' analyses of this run actually took
    return {"run": run.name, "per_snapshot_s": parts, "snapshots": len(run.steps), "cheap_metrics_run_s": cheap_run,
            "chapter_analyses_logged_s": logged_analyses,
            "ratio_logged": (cheap_run + sum(logged_analyses.values())) / train if logged_analyses else None,
            "cheap_metrics_logged": has_log, "chapter_analyses_run_s": chapters, "train_s": train,
            "ratio_cheap": cheap_run / train, "ratio_chapters": chapters / train,
            "ratio_to_training": (cheap_run + chapters) / train,
            "snapshot_metrics_floor": snapshot_metrics_floor(run.config, len(run.steps))}


def snapshot_metrics_floor(cfg, n_snapshots: int) -> float:
    """The snapshot metrics' cost as a fraction of training if evaluating a token cost what training
    does per forward pass: tokens evaluated (n_eval x n_ctx at each snapshot) over 3 x tokens
    trained (a training step is about three forward passes: forward and two backward products).
    With the laptop's 1,024 evaluation windows and 40 snapshots, an 8M-token run cannot get below
    ~44% without fewer windows or snapshots (~11% with the 256 windows used before issue 22)."""
    return cfg.data.n_eval * cfg.model.n_ctx * n_snapshots / (3 * cfg.train.total_tokens)


def unpack_commit(ref: str, dest: Path) -> Path:
    """The files of commit ``ref`` (git archive) in ``dest``: an older trainer to compare with."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def worker(tree: Path, run: str, precision: str, threads: int = 1, steps: int = 20, profile_steps: int = 0,
           compile: str = "auto", profile_name: str = "laptop", clocked_steps: int = 0) -> dict:
    """One measurement by benchmarks/step_worker.py in a fresh process on ``tree``'s code."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_worker.py"), "--tree", str(tree), "--run", run,
           "--profile-name", profile_name,
           "--precision", precision, "--threads", str(threads), "--steps", str(steps),
           "--profile-steps", str(profile_steps), "--compile", compile, "--clocked-steps", str(clocked_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode:
        raise RuntimeError(f"step_worker failed on {tree} {run} {precision}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# steps per process whose matrix calls are clocked without the profiler (step_worker.clocked_matrix)
CLOCKED_STEPS = 10


def side_by_side(baseline: Path, runs, precisions, rounds: int, steps: int, profile_steps: int = 5,
                 profile_name: str = "laptop") -> list[dict]:
    """The baseline commit's trainer and this checkout's, alternating in fresh processes for
    ``rounds`` rounds per (run, precision): median tokens/s of each and their ratio, both profiled
    once (share of the step in matrix products), the matrix share clocked without the profiler in
    every round (step_worker.clocked_matrix: compiled steps only), and their peak resident memory."""
    rows = []
    for run in runs:
        for precision in precisions:
            got = {"baseline": [], "current": []}
            prof, rss, faults = {}, {}, {"baseline": [], "current": []}
            clocked = {"baseline": [], "current": []}
            for r in range(rounds):
                for side, tree in (("baseline", baseline), ("current", ROOT)):
                    res = worker(tree, run, precision, steps=steps, profile_steps=profile_steps if r == 0 else 0,
                                 profile_name=profile_name, clocked_steps=CLOCKED_STEPS)
                    got[side].append(res["tok_s"]["median"])
                    if res.get("clocked"):
                        clocked[side].append(res["clocked"])
                    rss[side] = max(rss.get(side, 0), res["peak_rss_mb"] or 0)
                    if res.get("minor_faults_per_step") is not None:
                        faults[side].append(res["minor_faults_per_step"])
                    if "profile" in res:
                        prof[side] = res["profile"]
                        prof[side]["compiled"] = res["compiled"]
            row = {"run": run, "precision": precision, "rounds": rounds,
                   "baseline_tok_s": stats(got["baseline"]), "current_tok_s": stats(got["current"]),
                   "speedup": statistics.median(got["current"]) / statistics.median(got["baseline"]),
                   "profile": prof, "peak_rss_mb": rss, "flops_per_token": res["flops_per_token"],
                   # page faults per timed step (the allocator's cost; cpu_trainer.md "Fourth pass")
                   "faults_per_step": {k: statistics.median(v) for k, v in faults.items() if v},
                   # per side: the rounds' clocked matrix shares (median, min-max) and components
                   "clocked": {k: {"matrix_share": stats([c["matrix_share"] for c in v]),
                                   "step_ms": statistics.median(c["step_ms"] for c in v),
                                   "aten_matrix_ms": statistics.median(c["aten_matrix_ms"] for c in v),
                                   "attention_products_ms": statistics.median(c["attention_products_ms"] for c in v)}
                               for k, v in clocked.items() if v}}
            rows.append(row)
            print("side by side", run, precision, f"x{row['speedup']:.2f}",
                  {k: f"{v['matrix_share']:.0%} matrix" for k, v in prof.items()}, flush=True)
    return rows


def thread_scaling(run: str = "attn2", steps: int = 20, rounds: int = 3) -> dict:
    """This checkout's tokens/s at 1 and 2 threads: the profile's two 1-thread runs side by side
    reach about twice the 1-thread rate, so one 2-thread run pays only if it is > 2x faster."""
    got = {1: [], 2: []}
    for _ in range(rounds):
        for t in (1, 2):
            got[t].append(worker(ROOT, run, "bf16", threads=t, steps=steps)["tok_s"]["median"])
    one, two = statistics.median(got[1]), statistics.median(got[2])
    return {"run": run, "tok_s_1_thread": one, "tok_s_2_threads": two, "ratio": two / one}


def logged_peak_rss(profile_name: str = "laptop") -> dict:
    """Peak resident memory (MB) each trained run of the profile logged in its manifest."""
    prof = load_profile(profile_name)
    out = {}
    for name in prof.runs:
        try:
            man = prof.run(name).manifest
        except FileNotFoundError:
            continue
        if man.get("peak_rss_mb"):
            out[name] = man["peak_rss_mb"]
    return out


def smoke_book():
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, ICL_RUNS_DIR=f"{d}/runs")
        t = time.time()
        out = subprocess.run([sys.executable, "-m", "icl_core.book", "build", "--profile", "smoke",
                              "--out", d, "--force"], cwd=ROOT, env=env, capture_output=True, text=True)
        total = time.time() - t
        line = [l for l in out.stdout.splitlines() if l.startswith("[build]")]
        res = {"total_s": total, "returncode": out.returncode, "split": line[-1] if line else out.stderr[-500:]}
        return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer steps and shapes")
    ap.add_argument("--skip-tl", action="store_true")
    ap.add_argument("--skip-book", action="store_true")
    ap.add_argument("--skip-metrics", action="store_true")
    ap.add_argument("--metrics-run", default="attn3", help="the laptop run whose metric cost is measured")
    ap.add_argument("--baseline", metavar="REF", help="an older commit whose trainer to measure side by side")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the side-by-side comparison")
    ap.add_argument("--precisions", default="bf16,fp32", help="precisions of the side-by-side comparison")
    ap.add_argument("--only-side-by-side", action="store_true",
                    help="only the matmul peak and the --baseline comparison (with thread scaling and logged memory)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from icl_core import precision
    cpu, flags = cpu_info()
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                       "torch": torch.__version__, "cpu": cpu, "cpu_flags": flags,
                       "bf16_matmul": precision.bf16_matmul_kernel()}}
    res["peak_gflops"] = {"fp32": matmul_peak(torch.float32, repeats=a.repeats),
                          "bf16": matmul_peak(torch.bfloat16, repeats=a.repeats)}
    print("peak", json.dumps(res["peak_gflops"]), flush=True)
    if a.baseline:
        with tempfile.TemporaryDirectory() as d:
            base = unpack_commit(a.baseline, Path(d) / "baseline")
            runs = ["attn2", "attn2_wide"] if a.quick else ["attn2", "attn3", "attn2_wide"]
            res["side_by_side"] = {"baseline": a.baseline, "current": _git_head(), "rows": side_by_side(
                base, runs, a.precisions.split(","), a.rounds, steps=8 if a.quick else 20)}
        res["threads_scaling"] = thread_scaling(rounds=a.rounds)
        res["logged_peak_rss_mb"] = logged_peak_rss()
    if a.only_side_by_side:
        return write_results(res, [], a)
    prof = load_profile("laptop")
    shapes = {"attn1": prof.run_config("attn1"), "attn2": prof.run_config("attn2"),
              "attn3": prof.run_config("attn3"), "mlp2": prof.run_config("mlp2"),
              "attn2_wide": prof.run_config("attn2_wide")}
    if a.quick:
        shapes = {k: shapes[k] for k in ("attn2", "attn2_wide")}
    corpus = D.Corpus(shapes["attn2"].data, cache_dir())
    rows = []
    steps = 8 if a.quick else 20
    for name, cfg in shapes.items():
        for precision in ("bf16", "fp32"):
            import dataclasses
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
            ours = train_throughput(c, corpus, steps=steps, repeats=a.repeats)
            fl = c.flops_per_token()  # formula: RunConfig.flops_per_token
            peak = res["peak_gflops"][precision]["median"]
            row = {"model": name, "precision": precision, "d_model": c.model.d_model, "layers": c.model.n_layers,
                   "attn_only": c.model.attn_only, "tok_s": ours, "flops_per_token": fl,
                   "gflops": ours["median"] * fl / 1e9, "frac_peak": frac_of_peak(ours["median"], fl, peak)}
            if not a.skip_tl and c.model.positional in ("shortformer", "learned", "rope"):
                try:
                    tl = tl_throughput(c, corpus, steps=steps, repeats=a.repeats)
                    row["tl_tok_s"] = tl
                    row["speedup_vs_tl"] = ours["median"] / tl["median"]
                    row["tl_frac_peak"], row["speedup_ceiling"] = speedup_ceiling(tl["median"], fl, peak)
                except ImportError:
                    row["tl_tok_s"] = None
            rows.append(row)
            print(name, precision, f"{ours['median']:.0f} tok/s", f"{row['frac_peak']:.1%} of peak",
                  f"x{row.get('speedup_vs_tl', float('nan')):.2f} vs TL", flush=True)
    res["training"] = rows
    if not a.skip_metrics:
        try:
            run = prof.run(a.metrics_run)
            res["metrics_cost"] = metrics_cost(run, prof, repeats=a.repeats)
            print("metrics", json.dumps(res["metrics_cost"]), flush=True)
        except FileNotFoundError as e:
            res["metrics_cost"] = {"skipped": str(e)}
    if not a.skip_book:
        res["smoke_book"] = smoke_book()
        print("smoke book", json.dumps(res["smoke_book"]), flush=True)
    return write_results(res, rows, a)


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and the flags that decide its matrix kernels (AVX2 / AVX-512 / AVX-512
    bf16 / AMX), from Linux's /proc/cpuinfo; elsewhere the platform's processor string and no flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown", []
    field = lambda key: next((l.split(":", 1)[1].strip() for l in lines if l.startswith(key)), "")  # noqa: E731
    have = set(field("flags").split())
    flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    return field("model name") or platform.processor() or "unknown", flags


def _git_head() -> str:
    """The checkout's commit, with ``-dirty`` where tracked files differ from it (what was measured)."""
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True,
                         text=True)
    return out.stdout.strip() or "unknown"


def share_text(profile: dict) -> str:
    """The matrix share of a step profile, with the fused CPU kernels' share beside it where the
    trainer has them. The attention's products and softmax are one call each way: where the
    attention kernel's own clock split them (checkouts since the thirteenth pass), its products are
    added to ATen's matrix calls; before, neither column held them. Results of checkouts before the
    other kernels name the fused share ``fused_attention_share``."""
    text = f"{profile['matrix_share']:.0%}"
    fused = profile.get("fused_share", profile.get("fused_attention_share")) or 0.0
    if profile.get("attention_products_share"):
        text = (f"{text} + {profile['attention_products_share']:.0%} attention products = "
                f"{profile['matrix_share_with_attention']:.0%} (fused kernels {fused:.0%} in all)")
    else:
        text += f" (+{fused:.0%} fused kernels)" if fused > 0 else ""
    return text


def clocked_text(clocked: dict | None) -> str:
    """The matrix share clocked in unprofiled steps (step_worker.clocked_matrix), median over rounds
    (min-max), or "-" (an eager step, or results before the sixteenth pass)."""
    if not clocked:
        return "-"
    s = clocked["matrix_share"]
    return (f"{s['median']:.1%} ({s['min']:.1%}-{s['max']:.1%}): {clocked['aten_matrix_ms']:.1f} + "
            f"{clocked['attention_products_ms']:.1f} of {clocked['step_ms']:.1f} ms")


def side_by_side_lines(res: dict) -> list[str]:
    """Markdown for the --baseline comparison, thread scaling and logged memory (empty without)."""
    sb = res.get("side_by_side")
    if not sb:
        return []
    pk = res["peak_gflops"]
    lines = ["", f"Trainer of `{sb['baseline']}` (baseline) and of `{sb['current']}` (current) side by side, "
             "alternating fresh processes; tokens/s medians over rounds (min-max); matrix share = "
             "aten mm/bmm/baddbmm self time over the step's (torch.profiler, 5 steps), plus, where the attention "
             "kernel's own clock splits its calls (fused_attention.attention_cycles), the attention's products, "
             "with the share of all fused CPU kernels in brackets; clocked share = the same matrix work timed in "
             f"{CLOCKED_STEPS} steps without the profiler (each compiled matrix call's wall time and the attention's "
             "products by its clock, over each step's wall time; median over the rounds' processes, min-max: ATen "
             "ms + attention products ms of the step's ms; benchmarks/step_worker.py clocked_matrix), the measure "
             "of the step as it trains: the profiler lengthens the matrix calls it records (cpu_trainer.md, "
             "\"Sixteenth pass\"); % of peak against this machine's matmul peak in the same precision and thread "
             "count.", "",
             "| model | precision | baseline tok/s | current tok/s | speedup | matrix share, profiled (baseline → current) "
             "| matrix share, clocked (current) | % of peak (baseline → current) | compiled "
             "| peak RSS MB (baseline → current) | page faults per step (baseline → current) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sb["rows"]:
        b, c = r["baseline_tok_s"], r["current_tok_s"]
        peak = pk[r["precision"]]["median"]
        fb, fc = (frac_of_peak(x["median"], r["flops_per_token"], peak) for x in (b, c))
        pr, faults = r["profile"], r.get("faults_per_step", {})
        share = " → ".join(share_text(pr[k]) if k in pr else "-" for k in ("baseline", "current"))
        lines.append(f"| {r['run']} | {r['precision']} | {b['median']:.0f} ({b['min']:.0f}-{b['max']:.0f}) | "
                     f"{c['median']:.0f} ({c['min']:.0f}-{c['max']:.0f}) | x{r['speedup']:.2f} | {share} | "
                     f"{clocked_text(r.get('clocked', {}).get('current'))} | "
                     f"{fb:.1%} → {fc:.1%} | {pr.get('current', {}).get('compiled', '-')} | "
                     f"{r['peak_rss_mb'].get('baseline', 0):.0f} → {r['peak_rss_mb'].get('current', 0):.0f} | "
                     + " → ".join(f"{faults[k]:.0f}" if k in faults else "-" for k in ("baseline", "current")) + " |")
    for r in sb["rows"]:
        for side in ("baseline", "current"):
            p = r["profile"].get(side)
            if p:
                lines.append("")
                lines.append(f"Where the {side} `{r['run']}` {r['precision']} step goes ({p['step_ms']:.1f} ms "
                             f"under the profiler): " + "; ".join(f"{t['op']} {t['share']:.0%}" for t in p["top"]))
    ts = res.get("threads_scaling")
    if ts:
        lines += ["", f"Threads (`{ts['run']}` bf16, current): {ts['tok_s_1_thread']:.0f} tok/s on 1 thread, "
                  f"{ts['tok_s_2_threads']:.0f} on 2 (x{ts['ratio']:.2f}); two 1-thread runs side by side "
                  f"{'train more tokens per second than one 2-thread run' if ts['ratio'] < 2 else 'do not beat one 2-thread run'}."]
    rss = res.get("logged_peak_rss_mb")
    if rss:
        lines += ["", "Peak resident memory logged by the trainer (laptop runs, MB): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())) + f"; largest {max(rss.values()):.0f}."]
    return lines


def write_results(res: dict, rows: list, a) -> dict:
    out = ROOT / "benchmarks"
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = ["| model | precision | tok/s median (min-max) | GFLOP/s | % of peak | TL tok/s | TL % of peak "
             "| speedup vs TL | ceiling (100% of peak) |", "|---|---|---|---|---|---|---|---|---|"] if rows else []
    for r in rows:
        t = r["tok_s"]
        tl = r.get("tl_tok_s")
        lines.append(f"| {r['model']} | {r['precision']} | {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | "
                     f"{r['gflops']:.1f} | {r['frac_peak']:.1%} | {tl['median']:.0f} | {r['tl_frac_peak']:.1%} | "
                     f"{r['speedup_vs_tl']:.2f} | {r['speedup_ceiling']:.2f} |"
                     if tl else f"| {r['model']} | {r['precision']} | {t['median']:.0f} | {r['gflops']:.1f} | "
                     f"{r['frac_peak']:.1%} | - | - | - | - |")
    pk = res["peak_gflops"]
    head = [f"Machine: {res['machine']}", "",
            f"Matmul peak ({a.threads} threads): fp32 {pk['fp32']['median']:.0f} GFLOP/s "
            f"({pk['fp32']['min']:.0f}-{pk['fp32']['max']:.0f}), bf16 {pk['bf16']['median']:.0f} "
            f"({pk['bf16']['min']:.0f}-{pk['bf16']['max']:.0f})", ""]
    mc = res.get("metrics_cost") or {}
    if "ratio_to_training" in mc:
        lines += ["", f"Metrics for one laptop run (`{mc['run']}`, {mc['snapshots']} snapshots, trained in {mc['train_s']:.0f} s): "
                  f"snapshot metrics {mc['cheap_metrics_run_s']:.0f} s ({mc['ratio_cheap']:.0%} of training; "
                  f"{'logged by the trainer' if mc['cheap_metrics_logged'] else 'per-snapshot median x snapshots'}), "
                  f"chapter analyses {mc['chapter_analyses_run_s']:.0f} s ({mc['ratio_chapters']:.0%}); "
                  f"total {mc['ratio_to_training']:.0%} of training time (target <= 10%). At training's "
                  f"cost per forward token, evaluating the evaluation set at {mc['snapshots']} snapshots would alone be "
                  f"{mc['snapshot_metrics_floor']:.0%} of training (`snapshot_metrics_floor`)."
                  + (f" Measured instead of estimated, from the seconds the chapters' cached analyses of this run logged "
                     f"({', '.join(f'{k} {v:.0f} s' for k, v in mc['chapter_analyses_logged_s'].items())}): "
                     f"{mc['ratio_logged']:.0%} of training time with the snapshot metrics." if mc.get("ratio_logged") else ""), "",
                  "| per snapshot | median s (min-max) |", "|---|---|"]
        lines += [f"| {k} | {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}) |" for k, v in mc["per_snapshot_s"].items()]
    lines += side_by_side_lines(res)
    (out / "results.md").write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))
    return res


if __name__ == "__main__":
    main()

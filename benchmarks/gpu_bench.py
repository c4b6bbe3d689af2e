"""GPU benchmark mode (issue 11): model FLOP utilisation (MFU) of the trainer on one CUDA device.

    python benchmarks/gpu_bench.py [--profile gpu] [--runs attn2_wide attn4] [--steps 30] [--repeats 3]
                                   [--batch 64 256] [--compile | --compile-only | --modes eager default ...]
                                   [--sdpa auto cudnn flash ...] [--profile-batch 256] [--eval-timing]
                                   [--trainer-steps 2000] [--peak-tflops 989] [--corpus .gpucache/corpus-<key>]

For each model of the profile and each batch size: tokens/s of full training steps with bf16
autocast (forward, backward, clipping, AdamW; the same step as ``bench.py``, timed with CUDA
synchronisation), achieved TFLOP/s by :meth:`icl_core.config.RunConfig.flops_per_token`, and MFU
against (a) the card's nominal dense bf16 peak (looked up from the device name, or --peak-tflops)
and (b) the bf16 matmul peak measured in the same run. Medians over repeats, with min-max.

Before timing, a correctness check: the first model's loss on one batch, from the same initial
weights, in fp32 on the CPU, bf16 on the device, and bf16 compiled on the device (they must agree
to bf16 rounding). ``--trainer-steps N`` also trains the first model with the real
:class:`icl_core.train.Trainer` for N steps (snapshots, resume files and all) and reports its
tokens/s from the run's own clock. ``--profile-batch`` splits one step's kernel time by kind
(matmul, attention, Triton-fused, ...); ``--eval-timing`` times a snapshot's evaluation pass by
windows per pass. The H100 runs and what they showed: ``benchmarks/gpu/README.md``. Results are rewritten after every row (a run cut short keeps
what it measured): ``<out>/gpu_results.json`` and ``<out>/gpu_results.md``.

``--device cpu --dry-run`` runs two steps of the smoke profile's models on the CPU: a check that
the script works (the test suite does this), not a result.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import frac_of_peak, matmul_peak, sync_device, train_throughput, trainer_loss, training_step  # noqa: E402

from icl_core import data as D  # noqa: E402
from icl_core.profiles import load_profile  # noqa: E402
from icl_core.runs import cache_dir  # noqa: E402
from icl_core.train import init_model, make_loss, make_optimizer, snapshot_steps  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity)
NOMINAL_BF16_TFLOPS = (("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
                       ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))


def nominal_peak_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak for a device name (first match in NOMINAL_BF16_TFLOPS)."""
    for key, tf in NOMINAL_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tf
    return None


def mfu(tok_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the peak (bench.frac_of_peak, in TFLOP/s)."""
    return frac_of_peak(tok_s, flops_per_token, peak_tflops * 1e3)



SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def sdpa_backend(name: str):
    """A context allowing only one fused-attention backend ("auto": PyTorch's own choice). Set
    while a compiled step is first traced, it fixes the backend in the compiled graph."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def loss_check(cfg, corpus, device: str) -> dict:
    """One batch's loss from the same initial weights: fp32 on the CPU, the run's bf16 step on
    ``device``, eager and compiled. Differences beyond bf16 rounding (~1e-2 nats) mean a bug."""
    x = D.train_batch(corpus, 4, cfg.model.n_ctx, 0, 0)
    fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    m = init_model(cfg, "cpu")
    out = {"cpu_fp32": make_loss(m, fp32, "cpu")(x).item()}
    m = m.to(device)
    xd = x.to(device)
    out["device_bf16"] = make_loss(m, cfg, device)(xd).item()
    out["device_bf16_compiled"] = make_loss(m, cfg, device, compile=True)(xd).item()
    out["max_abs_diff"] = max(abs(v - out["cpu_fp32"]) for v in out.values())
    out["model"] = cfg.name
    return out


def trainer_throughput(cfg, corpus, steps: int, device: str) -> dict:
    """Tokens/s of the real Trainer (compiled on CUDA, snapshots and resume files included in the
    wall time, excluded from train_seconds) over ``steps`` steps in a temporary folder."""
    import tempfile
    import time

    from icl_core.train import Trainer

    c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_tokens=steps * cfg.tokens_per_step,
                                                           n_snapshots=4, warmup_steps=min(cfg.train.warmup_steps,
                                                                                           steps // 2)))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        man = Trainer(c, Path(d) / "run", corpus=corpus, device=device).run(progress=False)
        wall = time.perf_counter() - t
    tokens = steps * c.tokens_per_step
    log = man["train_log"]
    snap_s = [e["metrics_seconds"] for e in man["snapshots"].values() if "metrics_seconds" in e]
    return {"steps": steps, "tokens": tokens, "wall_s": wall, "train_s": man["train_seconds"],
            "tok_s_train": tokens / man["train_seconds"], "tok_s_wall": tokens / wall,
            "loss_first": log[0][1], "loss_last": log[-1][1], "n_snapshots": len(man["snapshots"]),
            "metrics_s_per_snapshot": statistics.median(snap_s) if snap_s else None,
            "metrics_share_at_profile": metrics_share(cfg, tokens / man["train_seconds"], snap_s)}


def metrics_share(cfg, tok_s: float, snap_s: list[float]) -> float | None:
    """The snapshot metrics' cost as a fraction of training time for the profile's own run:
    n_snapshots x the measured seconds per snapshot over total_tokens / tokens per second."""
    if not snap_s:
        return None
    return len(snapshot_steps(cfg.total_steps, cfg.train.n_snapshots)) * statistics.median(snap_s) / (
        cfg.train.total_tokens / tok_s)


def eval_batch_timing(cfg, corpus, device: str, batches=(8, 64)) -> dict:
    """Seconds for one snapshot's loss + previous-token pass over the profile's eval set, by
    windows per pass (median of 3 after a warm-up), in the run's eval precision."""
    import time

    from icl_core import metrics as M
    from icl_core.data import EvalData

    model = init_model(cfg, device)
    toks = EvalData(cfg, corpus).tokens.to(device)
    out = {}
    for b in batches:
        M.losses_and_previous_token_scores(model, toks[:2 * b], batch_size=b, precision=cfg.train.metrics_precision)
        xs = []
        for _ in range(3):
            sync_device(device)
            t = time.perf_counter()
            M.losses_and_previous_token_scores(model, toks, batch_size=b, precision=cfg.train.metrics_precision)
            sync_device(device)
            xs.append(time.perf_counter() - t)
        out[str(b)] = statistics.median(xs)
    return {"n_eval": len(toks), "seconds_by_windows_per_pass": out}


# checked in order: attention first, as flash kernels name cutlass types
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
                ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
                ("optimizer", ("adam", "multi_tensor", "foreach")), ("embedding", ("embedding", "index", "scatter")),
                ("fused (Triton)", ("triton",)))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_step(cfg, corpus, device: str, mode: str | None, steps: int = 5) -> dict:
    """Where one compiled training step's GPU time goes: torch.profiler over ``steps`` steps;
    kernel time per step by kind and the top kernels, and the GPU's busy fraction of the wall time
    (well under 1 means the host, not the GPU, sets the pace)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    model = init_model(cfg, device)
    step = training_step(model.parameters(), trainer_loss(model, cfg, device, mode), make_optimizer(model, cfg))
    xs = [D.train_batch(corpus, cfg.train.batch_size, cfg.model.n_ctx, 0, s).to(device) for s in range(steps)]

    cuda = device.startswith("cuda")
    for i in range(5):
        step(xs[i % steps])
    sync_device(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for x in xs:
            step(x)
        sync_device(device)
        wall = (time.perf_counter() - t) / steps
    # the device's kernels (on a CPU dry run: the top-level operators, so the code path is exercised)
    events = [e for e in prof.events() if (e.device_type == torch.autograd.DeviceType.CUDA if cuda
                                            else e.cpu_parent is None)]
    kern: dict[str, float] = {}
    for e in events:
        kern[e.name] = kern.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / steps  # ms per step
    kinds: dict[str, float] = {}
    for name, ms in kern.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    busy = sum(kern.values())
    top = sorted(kern.items(), key=lambda kv: -kv[1])[:12]
    return {"batch": cfg.train.batch_size, "mode": mode, "wall_ms_per_step": wall * 1e3, "kernel_ms_per_step": busy,
            "busy_fraction": busy / (wall * 1e3), "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": [[n[:90], ms] for n, ms in top], "n_kernels_per_step": len(events) / steps}


def write(res: dict, out: Path, dry_run: bool):
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(res, indent=1))
    nominal = res["nominal_bf16_tflops"]
    lines = [f"Device: {res['device']}; nominal dense bf16 peak {nominal or 'unknown'} TFLOP/s; measured bf16 "
             f"matmul ({res['matmul_n']} x {res['matmul_n']}) {res['measured_bf16_tflops']['median']:.1f} TFLOP/s; "
             f"torch {res['torch']}" + (" — DRY RUN on CPU: not a result" if dry_run else ""), ""]
    if res.get("loss_check"):
        lc = res["loss_check"]
        lines += [f"Loss check ({lc['model']} initial weights, one batch): CPU fp32 "
                  f"{lc['cpu_fp32']:.4f}, device bf16 {lc['device_bf16']:.4f}, compiled {lc['device_bf16_compiled']:.4f} "
                  f"(max difference {lc['max_abs_diff']:.4f} nats)", ""]
    lines += ["| model | batch x ctx | torch.compile mode | attention backend | tok/s median (min-max) | TFLOP/s | "
              "MFU (nominal) | MFU (measured peak) |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t = r["tok_s"]
        lines.append(f"| {r['model']} | {r['batch']} x {r['n_ctx']} | {r['mode']} | {r['sdpa']} | {t['median']:.0f} "
                     f"({t['min']:.0f}-{t['max']:.0f}) | {r['tflops']:.2f} | "
                     + (f"{r['mfu_nominal']:.1%}" if r["mfu_nominal"] is not None else "-")
                     + f" | {r['mfu_measured']:.1%} |")
    lines += [f"- failed: {f['model']} batch {f['batch']} {f['mode']} attention={f['sdpa']}: {f['error']}"
              for f in res.get("failed", [])]
    if res.get("eval_timing"):
        et = res["eval_timing"]
        lines += ["", f"One snapshot's loss + previous-token pass over {et['n_eval']} eval windows: "
                  + ", ".join(f"{s:.2f} s at {b} windows per pass" for b, s in et["seconds_by_windows_per_pass"].items())]
    if res.get("trainer"):
        tr = res["trainer"]
        lines += ["", f"Real trainer ({tr['model']}, batch {tr['batch']}, compiled={tr['compiled']}, attention "
                  f"{tr.get('sdpa', 'auto')}): {tr['steps']} "
                  f"steps, {tr['tok_s_train']:.0f} tok/s by its training clock ({tr['mfu_nominal_train'] or 0:.1%} "
                  f"MFU nominal), {tr['tok_s_wall']:.0f} tok/s wall with {tr['n_snapshots']} snapshots and compilation; "
                  f"loss {tr['loss_first']:.3f} -> {tr['loss_last']:.3f}; snapshot metrics "
                  f"{tr['metrics_s_per_snapshot'] or 0:.2f} s each, so {tr['metrics_share_at_profile'] or 0:.1%} of "
                  "training time for the profile's own run (its snapshot count and token budget)"]
    for pr in res.get("profiles", []):
        lines += ["", f"Profile of one step ({res['rows'][0]['model'] if res['rows'] else ''}, batch {pr['batch']}, "
                  f"{pr['mode']}, attention {pr.get('sdpa', 'auto')}): {pr['wall_ms_per_step']:.2f} ms wall, kernels {pr['kernel_ms_per_step']:.2f} ms "
                  f"(GPU busy {pr['busy_fraction']:.0%}, {pr['n_kernels_per_step']:.0f} kernels); by kind: "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in pr["by_kind_ms"].items()), "",
                  "| kernel | ms per step |", "|---|---|"]
        lines += [f"| `{n}` | {ms:.3f} |" for n, ms in pr["top_kernels_ms"]]
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--runs", nargs="*", default=None, help="default: the profile's largest model and attn2")
    ap.add_argument("--batch", nargs="*", type=int, default=None, help="batch sizes (default: the profile's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also time the compiled step")
    ap.add_argument("--compile-only", action="store_true", help="time only the compiled step")
    ap.add_argument("--modes", nargs="*", default=None,
                    help="eager and/or torch.compile modes (default, reduce-overhead, max-autotune-no-cudagraphs)")
    ap.add_argument("--sdpa", nargs="*", default=["auto"], choices=["auto", *SDPA_BACKENDS],
                    help="fused-attention backends to time (auto: PyTorch's choice)")
    ap.add_argument("--profile-batch", nargs="*", type=int, default=[], help="profile one step at these batch sizes")
    ap.add_argument("--eval-timing", action="store_true", help="time a snapshot's eval pass by windows per pass")
    ap.add_argument("--trainer-steps", type=int, default=0, help="also time the real Trainer for this many steps")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--corpus", default=None, help="a prebuilt corpus-<key> folder (Corpus.from_folder): for a "
                    "machine without the corpus's source packages")
    ap.add_argument("--dry-run", action="store_true", help="smoke profile, 2 steps: checks the script only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    a = ap.parse_args(argv)
    if a.dry_run:
        a.profile, a.steps, a.repeats = "smoke", 2, 1
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: CUDA is not available here (use --device cpu --dry-run to check the script)")
    out = Path(a.out)
    prof = load_profile(a.profile)
    cfgs = {n: prof.run_config(n) for n in prof.runs}
    names = a.runs or list(dict.fromkeys([max(cfgs, key=lambda n: cfgs[n].flops_per_token()), "attn2"]))
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    nominal = a.peak_tflops or nominal_peak_tflops(name)
    n = 8192 if a.device.startswith("cuda") else 256
    measured = matmul_peak(torch.bfloat16, n=n, repeats=a.repeats, iters=5 if a.dry_run else 20, device=a.device)
    res = {"device": name, "profile": a.profile, "nominal_bf16_tflops": nominal, "matmul_n": n,
           "measured_bf16_tflops": {k: (v / 1e3 if k != "n" else v) for k, v in measured.items()},
           "torch": torch.__version__, "rows": []}
    print(json.dumps(res), flush=True)

    def bf16(rn):
        return dataclasses.replace(cfgs[rn], train=dataclasses.replace(cfgs[rn].train, precision="bf16"))

    def corpus_of(c):
        return D.Corpus.from_folder(a.corpus, c.data) if a.corpus else D.Corpus(c.data, cache_dir())

    corpus = corpus_of(bf16(names[0]))
    res["loss_check"] = loss_check(bf16(names[0]), corpus, a.device)
    print(json.dumps(res["loss_check"]), flush=True)
    write(res, out, a.dry_run)
    modes = a.modes or (["default"] if a.compile_only else ["eager", "default"] if a.compile else ["eager"])
    for rn in names:
        base = bf16(rn)
        if base.data != bf16(names[0]).data:
            corpus = corpus_of(base)
        for bs in a.batch or [base.train.batch_size]:
            c = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=bs))
            for mode, sdpa in itertools.product(modes, a.sdpa):
                torch._dynamo.reset()  # a fresh compilation per row (and no recompile limit reached)
                try:
                    with sdpa_backend(sdpa):
                        tp = train_throughput(c, corpus, steps=a.steps, repeats=a.repeats,
                                              warmup=2 if a.dry_run else 5, device=a.device,
                                              mode=mode)
                except RuntimeError as e:  # e.g. a backend that cannot run this shape on this card
                    res.setdefault("failed", []).append({"model": rn, "batch": bs, "mode": mode, "sdpa": sdpa,
                                                         "error": str(e)[:300]})
                    print(f"failed: {rn} batch {bs} {mode} sdpa={sdpa}: {str(e)[:300]}", flush=True)
                    continue
                fpt = c.flops_per_token()
                row = {"model": rn, "batch": bs, "n_ctx": c.model.n_ctx, "d_model": c.model.d_model,
                       "layers": c.model.n_layers, "compiled": mode != "eager", "mode": mode, "sdpa": sdpa,
                       "tok_s": tp,
                       "flops_per_token": fpt,
                       "tflops": tp["median"] * fpt / 1e12,
                       "mfu_nominal": mfu(tp["median"], fpt, nominal) if nominal else None,
                       "mfu_measured": mfu(tp["median"], fpt, res["measured_bf16_tflops"]["median"])}
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                write(res, out, a.dry_run)
    if a.profile_batch:
        res["profiles"] = []
        for bs in a.profile_batch:
            c = bf16(names[0])
            c = dataclasses.replace(c, train=dataclasses.replace(c.train, batch_size=bs))
            torch._dynamo.reset()
            with sdpa_backend(a.sdpa[-1]):
                res["profiles"].append(profile_step(c, corpus_of(c), a.device, modes[-1]))
            res["profiles"][-1]["sdpa"] = a.sdpa[-1]
            print(json.dumps(res["profiles"][-1]), flush=True)
            write(res, out, a.dry_run)
    if a.eval_timing:
        c = bf16(names[0])
        res["eval_timing"] = eval_batch_timing(c, corpus_of(c), a.device)
        print(json.dumps(res["eval_timing"]), flush=True)
        write(res, out, a.dry_run)
    if a.trainer_steps:
        c = bf16(names[0])
        corpus = corpus_of(c)
        with sdpa_backend(a.sdpa[-1]):
            tr = trainer_throughput(c, corpus, a.trainer_steps, a.device)
        tr["sdpa"] = a.sdpa[-1]
        fpt = c.flops_per_token()
        tr.update(model=names[0], batch=c.train.batch_size, compiled=a.device.startswith("cuda"),
                  mfu_nominal_train=mfu(tr["tok_s_train"], fpt, nominal) if nominal else None,
                  mfu_measured_train=mfu(tr["tok_s_train"], fpt, res["measured_bf16_tflops"]["median"]))
        res["trainer"] = tr
        print(json.dumps(tr), flush=True)
    print("\n".join(write(res, out, a.dry_run)))
    return res


if __name__ == "__main__":
    main()

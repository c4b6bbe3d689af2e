"""GPU benchmark mode (issue 11): model FLOP utilisation (MFU) of the trainer on one CUDA device.

    python benchmarks/gpu_bench.py [--profile gpu] [--runs attn2_wide attn4] [--steps 30] [--repeats 3]
                                   [--batch 64 128] [--compile] [--peak-tflops 989]

For each model of the profile and each batch size: tokens/s of full training steps with bf16
autocast (forward, backward, clipping, AdamW; the same step as ``bench.py``, timed with CUDA
synchronisation), achieved TFLOP/s by :meth:`icl_core.config.RunConfig.flops_per_token`, and MFU
against (a) the card's nominal dense bf16 peak (looked up from the device name, or --peak-tflops)
and (b) the bf16 matmul peak measured in the same run. Medians over repeats, with min-max.
Results: ``<out>/gpu_results.json`` and ``<out>/gpu_results.md``.

``--device cpu --dry-run`` runs two steps of the smoke profile's models on the CPU: a check that
the script works (the test suite does this), not a result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import matmul_peak, train_throughput  # noqa: E402

from icl_core import data as D  # noqa: E402
from icl_core.profiles import load_profile  # noqa: E402
from icl_core.runs import cache_dir  # noqa: E402

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
    """Model FLOP utilisation: achieved model FLOP/s over the peak."""
    return tok_s * flops_per_token / (peak_tflops * 1e12)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--runs", nargs="*", default=None, help="default: the profile's largest model and attn2")
    ap.add_argument("--batch", nargs="*", type=int, default=None, help="batch sizes (default: the profile's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true", help="smoke profile, 2 steps: checks the script only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    a = ap.parse_args(argv)
    if a.dry_run:
        a.profile, a.steps, a.repeats = "smoke", 2, 1
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: CUDA is not available here (use --device cpu --dry-run to check the script)")
    prof = load_profile(a.profile)
    cfgs = {n: prof.run_config(n) for n in prof.runs}
    names = a.runs or list(dict.fromkeys([max(cfgs, key=lambda n: cfgs[n].flops_per_token()), "attn2"]))
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    nominal = a.peak_tflops or nominal_peak_tflops(name)
    n = 8192 if a.device.startswith("cuda") else 256
    measured = matmul_peak(torch.bfloat16, n=n, repeats=a.repeats, iters=5 if a.dry_run else 20, device=a.device)
    res = {"device": name, "profile": a.profile, "nominal_bf16_tflops": nominal,
           "measured_bf16_tflops": {k: (v / 1e3 if k != "n" else v) for k, v in measured.items()},
           "torch": torch.__version__, "rows": []}
    corpus = None
    for rn in names:
        base = dataclasses.replace(cfgs[rn], train=dataclasses.replace(cfgs[rn].train, precision="bf16"))
        corpus = corpus or D.Corpus(base.data, cache_dir())
        for bs in a.batch or [base.train.batch_size]:
            c = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=bs))
            for compiled in ([False, True] if a.compile else [False]):
                tp = train_throughput(c, corpus, steps=a.steps, repeats=a.repeats, warmup=2 if a.dry_run else 5,
                                      device=a.device, compile_model=compiled)
                fpt = c.flops_per_token()
                row = {"model": rn, "batch": bs, "n_ctx": c.model.n_ctx, "d_model": c.model.d_model,
                       "layers": c.model.n_layers, "compiled": compiled, "tok_s": tp, "flops_per_token": fpt,
                       "tflops": tp["median"] * fpt / 1e12,
                       "mfu_nominal": mfu(tp["median"], fpt, nominal) if nominal else None,
                       "mfu_measured": mfu(tp["median"], fpt, res["measured_bf16_tflops"]["median"])}
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(res, indent=1))
    lines = [f"Device: {name}; nominal dense bf16 peak {nominal or 'unknown'} TFLOP/s; measured bf16 matmul "
             f"({n} x {n}) {res['measured_bf16_tflops']['median']:.1f} TFLOP/s; torch {torch.__version__}"
             + (" — DRY RUN on CPU: not a result" if a.dry_run else ""), "",
             "| model | batch x ctx | compiled | tok/s median (min-max) | TFLOP/s | MFU (nominal) | MFU (measured peak) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t = r["tok_s"]
        lines.append(f"| {r['model']} | {r['batch']} x {r['n_ctx']} | {r['compiled']} | {t['median']:.0f} "
                     f"({t['min']:.0f}-{t['max']:.0f}) | {r['tflops']:.2f} | "
                     + (f"{r['mfu_nominal']:.1%}" if r["mfu_nominal"] is not None else "-")
                     + f" | {r['mfu_measured']:.1%} |")
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()

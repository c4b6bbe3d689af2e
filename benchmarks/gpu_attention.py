"""Causal attention alone, forward + backward, by kernel: the part of the `gpu` profile's training step
that runs furthest from the chip's peak (head size 32; benchmarks/gpu/README.md).

    python benchmarks/gpu_attention.py [--batch 256] [--heads 16] [--ctx 512] [--head-dim 32]

Times each fused-attention backend of ``scaled_dot_product_attention`` and, where available,
``flex_attention`` (compiled; a Triton kernel that skips fully masked blocks), on the same bf16
inputs after checking each against the math backend in fp32. Reports ms per forward + backward and
TFLOP/s at the causal count 2 x 2 x B x H x T^2 x d / 2 (forward) x 3 (with the backward), the
convention of ``RunConfig.flops_per_token``. ``--device cpu --dry-run`` checks the script only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import sync_device  # noqa: E402


def causal_flops(b, h, t, d) -> float:
    """Forward + backward FLOPs of causal attention: QK^T and PV, half the square, x3 for the backward."""
    return 3 * 2 * 2 * b * h * t * t * d / 2


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.batch, a.heads, a.ctx, a.iters = 2, 2, 64, 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (a.batch, a.heads, a.ctx, a.head_dim)
    g = torch.Generator(device=a.device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=a.device, dtype=torch.bfloat16, generator=g, requires_grad=True)
               for _ in range(3))
    do = torch.randn(shape, device=a.device, dtype=torch.bfloat16, generator=g)
    with sdpa_kernel([SDPBackend.MATH]):
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
        ref.backward(do.float())
        ref_grads = [t.grad for t in (qf, kf, vf)]

    kernels = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name)

        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        kernels[name.lower()] = run
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, a.ctx, a.ctx, device=a.device)
        flex = torch.compile(flex_attention, dynamic=False)
        kernels["flex_attention (compiled)"] = lambda: flex(q, k, v, block_mask=mask)
    except Exception as e:  # noqa: BLE001 - an older torch, or no compiler for this device
        print(f"flex_attention unavailable: {e}")

    res = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "shape_bhtd": list(shape), "rows": []}
    fl = causal_flops(*shape)
    for name, f in kernels.items():
        try:
            for t in (q, k, v):
                t.grad = None
            out = f()
            out.backward(do)
            err = max(((t.grad.float() - r).norm() / r.norm()).item() for t, r in zip((q, k, v), ref_grads))
            err = max(err, ((out.float() - ref).norm() / ref.norm()).item())
            for _ in range(2):
                f().backward(do)
            times = []
            for _ in range(3):
                sync_device(a.device)
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    f().backward(do)
                sync_device(a.device)
                times.append((time.perf_counter() - t0) / a.iters)
        except RuntimeError as e:
            print(f"{name}: not run ({str(e)[:200]})")
            continue
        ms = statistics.median(times) * 1e3
        row = {"kernel": name, "ms_fwd_bwd": ms, "tflops": fl / (ms / 1e3) / 1e12, "rel_err_vs_fp32_math": err}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{res['device']}, torch {res['torch']}, causal attention (B, H, T, d) = {tuple(shape)}, bf16, "
          "forward + backward\n\n| kernel | ms | TFLOP/s | rel. error vs fp32 |\n|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['kernel']} | {r['ms_fwd_bwd']:.3f} | {r['tflops']:.1f} | {r['rel_err_vs_fp32_math']:.1e} |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

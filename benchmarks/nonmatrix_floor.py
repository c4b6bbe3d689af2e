"""What the non-matrix work of a bf16 training step costs in the step, and what its parts cost alone.

    python benchmarks/nonmatrix_floor.py [--run attn2] [--profile-name laptop] [--steps 20] [--out F.json]

One process, the threads the laptop runs use (one). First ``--steps`` training steps as the trainer
takes them (``step_worker.trainer_step``) with their matrix calls and the attention's products clocked
without the profiler (``step_worker.clocked_matrix``: the matrix share and milliseconds the headline
gives), then a ``torch.profiler`` profile of as many steps (the attention kernels' own clock on, so their
products count as matrix work there too) for the split of the rest into parts. Then each non-matrix
part of the step alone, on inputs of the step's shapes that stay in cache, repeated, medians:

- the loss's softmax and logit gradient (``fused_attention.softmax_cross_entropy_grad_``), one chunk
  of ``model.CE_FUSED_CHUNK_ROWS`` rows (as the trainer calls it), times the chunks of a step;
- the attention kernels' non-product time (the call minus its products, by their clock), forward and
  backward, times the layers;
- AdamW (``torch._fused_adamw_``) on the model's parameters and clipping's norm and scale;
- a layer norm's forward and backward on the residual stream (ATen's kernels, called without
  autograd), times the layer norms;
- one copy of the residual stream (fp32, tokens x d_model): what one pass over it costs;
- a 16 x 16 bf16 matmul called from Python: the price of one call through the dispatcher.

Prints a markdown table and, with ``--out``, JSON. The point (benchmarks/cpu_trainer.md,
"Fourteenth pass"): the matrix share of a step is ``M / (M + R)`` for matrix time M and the rest R, so
a target share s needs ``R <= M (1 - s) / s``; the table shows which parts stand between R today and
that bound, and how far each is from what it costs alone. Needs the fused kernels (a CPU with
``avx512_bf16`` and a C++ compiler); bf16 only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def median_ms(fn, calls: int = 20, reps: int = 7, warmup: int = 3) -> float:
    """Median over ``reps`` of the mean milliseconds of ``calls`` back-to-back calls of ``fn``."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(out)


def share_budget(matrix_ms: float, share: float) -> float:
    """The most milliseconds the rest of a step may take for the matrix work (``matrix_ms``) to be
    ``share`` of it: M / (M + R) >= s  <=>  R <= M (1 - s) / s."""
    return matrix_ms * (1.0 - share) / share


def share_if_alone(res: dict) -> dict:
    """The rest of the step if each part took what it takes alone (``alone_ms``; parts without a
    measurement as in the step), plus the remainder outside the named parts less the profiler's own
    time (the rest of the profiled step minus the rest of the clocked one; not below zero), and the
    matrix share that would give."""
    parts = sum(res["alone_ms"][p] if res["alone_ms"].get(p) is not None else t for p, t in res["in_step_ms"].items())
    # the profiler's own time outside the matrix work: the rest profiled minus the rest clocked
    other = max(0.0, res["other_ms_profiled"] - (res["rest_ms_profiled"] - res["rest_ms_unprofiled"]))
    rest = parts + other
    return {"rest_ms_if_alone": rest, "share_if_alone": res["matrix_ms"] / (res["matrix_ms"] + rest)}


# profiler op names (after step_worker._short) of each part of the step outside the matrix calls
PARTS = {
    "loss softmax + logit gradient": ("icl_fused::softmax_cross_entropy_grad", "icl_fused::softmax_cross_entropy_grad_"),
    # with RoPE the attention reads the projection's output and rotates queries and keys itself (the
    # sixteenth pass; before it the separate rope_split_qkv kernels, counted here too for older checkouts)
    "attention, outside its products": ("icl_fused::causal_attention_fwd", "icl_fused::causal_attention_bwd",
                                        "icl_fused::attention_qkv_fwd", "icl_fused::attention_qkv_bwd",
                                        "icl_fused::rope_split_qkv", "icl_fused::rope_split_qkv_bwd"),
    "AdamW": ("aten::_fused_adamw_",),
    # the clipping's ops by name: a generic op (add, mul_, div) elsewhere outside the compiled graph counts here too
    "clipping (norms, scale)": ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::mul_", "aten::_foreach_mul_",
                                "aten::stack", "aten::clamp", "aten::add", "aten::reciprocal", "aten::div"),
    "inductor's elementwise kernels (layer norms, residual adds, casts, embedding)":
        ("compiled elementwise kernels (inductor)",),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="attn2")
    ap.add_argument("--profile-name", default="laptop")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7, help="repetitions of each part alone (medians)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    import torch

    from icl_core import data as D
    from icl_core import fused_attention
    from icl_core import model as M
    from icl_core import train as T
    from icl_core.profiles import load_profile
    from icl_core.runs import cache_dir
    from step_worker import MATRIX_OPS, attention_products, clocked_matrix, profiled, trainer_step

    torch.set_num_threads(1)
    T.reuse_freed_memory()
    cfg = load_profile(a.profile_name).run_config(a.run)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16"))
    if not fused_attention.available():
        raise SystemExit("nonmatrix_floor: the fused CPU kernels are not built here (they need avx512_bf16 and a C++ compiler)")
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # name inductor's kernels in the profile
    step, batches = trainer_step(D, T, cfg, D.Corpus(cfg.data, cache_dir()), True, a.steps)
    for i in range(3):
        step(batches[i % len(batches)])
    # the step as it trains: matrix calls and the attention's products clocked without the profiler
    clocked = clocked_matrix(step, batches, a.steps)
    step_ms, aten, attn_products_ms = clocked["step_ms"], clocked["aten_matrix_ms"], clocked["attention_products_ms"]
    matrix_ms = aten + attn_products_ms
    # where the rest goes: the profiler's split of the same steps (it lengthens what it records)
    by_op, ticks = profiled(step, batches, a.steps)
    by_op = {op: t / a.steps / 1e3 for op, t in by_op.items()}  # ms per step
    total = sum(by_op.values())
    aten_prof = sum(t for op, t in by_op.items() if op in MATRIX_OPS)
    prod = attention_products(by_op, ticks, aten_prof, total)
    matrix_prof = aten_prof + prod.get("attention_products_share", 0.0) * total
    in_step = {part: sum(by_op.get(op, 0.0) for op in ops) for part, ops in PARTS.items()}
    in_step["attention, outside its products"] -= prod.get("attention_products_share", 0.0) * total

    # each part alone, on the step's shapes, hot in cache
    mc, B, Tn = cfg.model, cfg.train.batch_size, cfg.model.n_ctx
    rows, V, d, H, dh = B * (Tn - 1), mc.d_vocab, mc.d_model, mc.n_heads, mc.d_head
    g = torch.Generator().manual_seed(0)
    chunk = min(M.CE_FUSED_CHUNK_ROWS, rows)
    logits = torch.randn(chunk, V, generator=g).mul_(2).to(torch.bfloat16)
    targets = torch.randint(0, V, (chunk,), generator=g)
    # in place, as the trainer calls it (after the first call the buffer holds gradients: the same work)
    alone = {"loss softmax + logit gradient": math.ceil(rows / chunk) * median_ms(
        lambda: fused_attention.softmax_cross_entropy_grad_(logits, targets, 1.0 / rows), reps=a.reps)}
    alone["attention, outside its products"] = None  # a model whose attention the kernel does not take
    if fused_attention.takes_shape(Tn, dh):
        ops = torch.ops.icl_fused
        if mc.positional == "rope" and not mc.smeared_keys:  # as the step calls it: from the projection's output
            qkv = torch.randn(B, Tn, 3, H, dh, generator=g).to(torch.bfloat16)
            dO = torch.randn(B, Tn, H, dh, generator=g).to(torch.bfloat16)
            cos, sin = (t[:Tn].to(torch.bfloat16).contiguous() for t in M.rope_tables(Tn, dh))
            _O, P, QK = ops.attention_qkv_fwd(qkv, cos, sin)
            fwd_call, bwd_call = (lambda: ops.attention_qkv_fwd(qkv, cos, sin)), (
                lambda: ops.attention_qkv_bwd(dO, qkv, cos, sin, P, QK))
        else:
            q, k, v, dO = (torch.randn(B * H, Tn, dh, generator=g).to(torch.bfloat16) for _ in range(4))
            _O, P = ops.causal_attention_fwd(q, k, v)
            fwd_call, bwd_call = (lambda: ops.causal_attention_fwd(q, k, v)), (
                lambda: ops.causal_attention_bwd(dO, q, k, v, P))
        fused_attention.attention_cycles(True)
        fwd = median_ms(fwd_call, reps=a.reps)
        bwd = median_ms(bwd_call, reps=a.reps)
        tk = fused_attention.attention_cycles(False)
        alone["attention, outside its products"] = mc.n_layers * (
            fwd * (1 - tk["fwd_products"] / tk["fwd_total"]) + bwd * (1 - tk["bwd_products"] / tk["bwd_total"]))
    params = [pp.detach().clone() for pp in T.init_model(cfg).parameters()]
    grads = [torch.randn(pp.shape, generator=g) * 1e-3 for pp in params]
    exp_avg, exp_avg_sq = [torch.zeros_like(pp) for pp in params], [torch.zeros_like(pp) for pp in params]
    steps_t = [torch.tensor(1.0) for _ in params]
    alone["AdamW"] = median_ms(lambda: torch._fused_adamw_(
        params, grads, exp_avg, exp_avg_sq, [], steps_t, amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.95,
        weight_decay=0.1, eps=1e-8, maximize=False, grad_scale=None, found_inf=None), reps=a.reps)

    def clip():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        torch._foreach_mul_(grads, torch.clamp(1.0 / (norm + 1e-6), max=1.0))

    alone["clipping (norms, scale)"] = median_ms(clip, reps=a.reps)
    x, dy = torch.randn(B * Tn, d, generator=g), torch.randn(B * Tn, d, generator=g)
    w, b = torch.ones(d), torch.zeros(d)
    _y, mean, rstd = torch.native_layer_norm(x, (d,), w, b, 1e-5)

    def layer_norm():  # ATen's kernels, forward and backward, without autograd's own calls
        torch.native_layer_norm(x, (d,), w, b, 1e-5)
        torch.ops.aten.native_layer_norm_backward(dy, x, (d,), mean, rstd, w, b, [True, True, True])

    n_ln = mc.n_layers * (1 if mc.attn_only else 2) + 1
    alone["inductor's elementwise kernels (layer norms, residual adds, casts, embedding)"] = n_ln * median_ms(
        layer_norm, reps=a.reps)
    resid, resid2 = torch.randn(B * Tn, d, generator=g), torch.empty(B * Tn, d)
    one_pass = median_ms(lambda: resid2.copy_(resid), calls=200, reps=a.reps)
    t16 = torch.randn(16, 16, generator=g).to(torch.bfloat16)
    o16 = torch.empty(16, 16, dtype=torch.bfloat16)
    call_us = median_ms(lambda: torch.mm(t16, t16, out=o16), calls=2000, reps=a.reps) * 1e3

    res = {"run": a.run, "steps": a.steps, "step_ms_unprofiled": step_ms, "step_ms_profiled": total,
           "matrix_ms": matrix_ms, "aten_matrix_ms": aten, "attention_products_ms": attn_products_ms,
           "matrix_ms_profiled": matrix_prof, "matrix_share_clocked": clocked["matrix_share"],
           "matrix_share_profiled": matrix_prof / total,
           "rest_ms_unprofiled": step_ms - matrix_ms, "rest_ms_profiled": total - matrix_prof,
           "budget_rest_ms_60": share_budget(matrix_ms, 0.6), "in_step_ms": in_step, "alone_ms": alone,
           "one_pass_over_residual_ms": one_pass, "call_us": call_us,
           "other_ms_profiled": total - matrix_prof - sum(in_step.values())}
    res.update(share_if_alone(res))
    print(f"`{a.run}` bf16 step: {step_ms:.2f} ms clocked without the profiler ({total:.2f} under it); matrix work "
          f"{matrix_ms:.2f} ms (ATen {aten:.2f} + attention products {attn_products_ms:.2f}; under the profiler "
          f"{matrix_prof:.2f}) = {res['matrix_share_clocked']:.1%} of the step (median of the steps' shares; "
          f"{matrix_prof / total:.1%} profiled). For 60% the rest may take {res['budget_rest_ms_60']:.2f} ms; it takes "
          f"{step_ms - matrix_ms:.2f} ({total - matrix_prof:.2f} under the profiler). With every part as fast as alone "
          f"(unmeasured parts as in the step, the rest less the profiler's own time), the rest would take "
          f"{res['rest_ms_if_alone']:.2f} ms and the matrix share be {res['share_if_alone']:.1%}.")
    print("\n| part | in the step, ms (profiler) | alone, ms |\n|---|---|---|")
    for part in PARTS:
        al = alone.get(part)
        print(f"| {part} | {in_step[part]:.2f} | {'-' if al is None else f'{al:.2f}'} |")
    print(f"| everything else (inductor's wrapper, autograd, dynamo, small ops) | {res['other_ms_profiled']:.2f} | "
          f"a call through the dispatcher: {call_us:.1f} us |")
    print(f"\nOne pass over the residual stream ({B * Tn} x {d} fp32): {one_pass:.3f} ms.")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

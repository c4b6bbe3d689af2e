"""One benchmark measurement in a fresh process, on the code of any checkout (benchmarks/bench.py).

    python benchmarks/step_worker.py --tree DIR --run attn2 --precision bf16 [--threads 1] [--clocked-steps 10]
                                     [--steps 20] [--warmup 3] [--profile-steps 0]

Imports ``icl_core`` from ``DIR`` (this checkout, or an older commit's files that bench.py
unpacked), builds the laptop profile's run ``--run`` at ``--precision``, and times the training
step as that checkout's trainer takes it: its optimizer and loss, and ``torch.compile`` where that
checkout's Trainer would compile a run of this length on this device. Prints one JSON line:
tokens/s (median and min-max over the timed steps), the process's peak resident memory, whether
the loss was compiled, the minor page faults per timed step (the checkout's trainer's allocator
policy applied: icl_core.train.reuse_freed_memory where it exists; ``ICL_MALLOC=default`` measures
without it), and with ``--profile-steps N`` a ``torch.profiler`` breakdown of N steps
(share of the step in matrix products, the top ops). Only calls that exist in every checkout
since the benchmarks began (init_model, make_loss, make_optimizer, Corpus, train_batch) are used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time

# matched after _short, which names inductor's C++-wrapper calls (aoti_torch_cpu_mm_out, ...) as aten ops
MATRIX_OPS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::matmul_out", "aten::linear")
FUSED_PREFIX = "icl_fused::"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", required=True)
    ap.add_argument("--run", default="attn2")
    ap.add_argument("--profile-name", default="laptop")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--clocked-steps", type=int, default=0,
                    help="steps whose matrix calls are clocked without the profiler (clocked_matrix; compiled steps)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="auto: as the checkout's Trainer would for this run on the CPU")
    a = ap.parse_args(argv)
    sys.path.insert(0, a.tree)
    import torch

    from icl_core import data as D
    from icl_core import train as T
    from icl_core.profiles import load_profile
    from icl_core.runs import cache_dir

    torch.set_num_threads(a.threads)
    # the checkout's trainer's allocator policy, where it has one (icl_core.train.reuse_freed_memory;
    # ICL_MALLOC=default measures without it)
    malloc_reuse = bool(getattr(T, "reuse_freed_memory", lambda: False)())
    if a.profile_steps:
        # name inductor's C++ kernels and the matmuls its C++ wrapper calls in torch.profiler (a
        # checkout that compiles with cpp_wrapper records its matmuls only so); off, a guard per kernel
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    cfg = load_profile(a.profile_name).run_config(a.run)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=a.precision))
    compile = {"on": True, "off": False}.get(a.compile, compiles_on_cpu(T, cfg))
    step, batches = trainer_step(D, T, cfg, D.Corpus(cfg.data, cache_dir()), compile, a.steps)

    t0 = time.perf_counter()
    for i in range(a.warmup):
        step(batches[i % len(batches)])
    warmup_s = time.perf_counter() - t0
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for x in batches:
        t = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults  # page faults of the timed steps
    n_tok = batches[0].numel()
    tok_s = [n_tok / t for t in times]
    out = {"tree": a.tree, "run": a.run, "precision": a.precision, "threads": a.threads, "compiled": compile,
           "warmup_s": warmup_s, "tok_s": {"median": statistics.median(tok_s), "min": min(tok_s), "max": max(tok_s),
                                           "n": len(tok_s)},
           "flops_per_token": cfg.flops_per_token(), "peak_rss_mb": peak_rss_mb(), "bf16_matmul": _bf16_kernel(),
           "malloc_reuse": malloc_reuse, "minor_faults_per_step": faults / len(times)}
    if a.clocked_steps and compile:
        out["clocked"] = clocked_matrix(step, batches, a.clocked_steps)
    if a.profile_steps:
        by_op, ticks = profiled(step, batches, a.profile_steps)
        total = sum(by_op.values())
        matrix = sum(t for op, t in by_op.items() if op in MATRIX_OPS)
        # the fused CPU kernels (icl_core/fused_attention.py; the attention does its products and
        # softmax in one call): their own share, reported beside the matrix share rather than inside it
        fused = sum(t for op, t in by_op.items() if op.startswith(FUSED_PREFIX))
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
        out["profile"] = {"step_ms": total / a.profile_steps / 1e3, "matrix_share": matrix / total,
                          "fused_share": fused / total,
                          **attention_products(by_op, ticks, matrix, total),
                          "top": [{"op": op, "ms": t / a.profile_steps / 1e3, "share": t / total} for op, t in top]}
    print(json.dumps(out))


def profiled(step, batches, n: int) -> tuple[dict, dict | None]:
    """``n`` steps under ``torch.profiler``: each op's self time (us, summed over the steps; names
    after :func:`_short`) and the attention kernels' own clock over them (checkouts since the
    thirteenth pass; else None): the share of each attention call spent in its products, which the
    profiler cannot split out of the call."""
    from torch.profiler import ProfilerActivity, profile

    cycles = _attention_cycles()
    if cycles:
        cycles(True)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for i in range(n):
            step(batches[i % len(batches)])
    ticks = cycles(False) if cycles else None
    by_op: dict[str, float] = {}
    for k in p.key_averages():
        by_op[_short(k.key)] = by_op.get(_short(k.key), 0.0) + k.self_cpu_time_total
    return by_op, ticks


def clocked_matrix(step, batches, n: int) -> dict | None:
    """The matrix share of ``n`` compiled steps as they run without the profiler: each matrix call
    inductor's wrapper makes (``extern_kernels.mm``, ``bmm``, ``addmm``, ``baddbmm``) timed with
    ``time.perf_counter`` around it, the attention kernels' products by their own clock (ticks over
    :func:`icl_core.fused_attention.tsc_hz`), against each step's wall time; medians over the steps.
    The profiler's share divides matrix time measured under the profiler, which perturbs the matrix
    calls themselves (in this pass's runs ATen's matrix calls took 7.1 ms of a step clocked this way
    and 9.8 ms of the same process's profiled steps; benchmarks/cpu_trainer.md, "Sixteenth pass");
    here nothing is recorded but the calls' own times (two clock reads per matrix call). Only the
    compiled graphs' matrix calls are seen: None for an eager step, or where this PyTorch has no
    ``extern_kernels``. The attention's products count only where the checkout has ``tsc_hz``."""
    try:
        from torch._inductor.select_algorithm import extern_kernels
    except ImportError:
        return None
    names = [nm for nm in ("mm", "bmm", "addmm", "baddbmm") if hasattr(extern_kernels, nm)]
    originals = {nm: getattr(extern_kernels, nm) for nm in names}
    spent = {"s": 0.0, "calls": 0}

    def timed(fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["s"] += time.perf_counter() - t
                spent["calls"] += 1
        return call

    cycles = _attention_cycles()
    try:
        from icl_core import fused_attention
        hz = fused_attention.tsc_hz() if cycles and hasattr(fused_attention, "tsc_hz") else None
    except ImportError:
        hz = None
    products = lambda: sum(cycles()[k] for k in ("fwd_products", "bwd_products")) / hz if hz else 0.0  # noqa: E731
    for nm in names:
        setattr(extern_kernels, nm, timed(originals[nm]))
    try:
        if cycles:
            cycles(True)
        walls, aten, prods = [], [], []
        for i in range(n):
            t, m0, p0 = time.perf_counter(), spent["s"], products()
            step(batches[i % len(batches)])
            walls.append(time.perf_counter() - t)
            aten.append(spent["s"] - m0)
            prods.append(products() - p0)
        if cycles:
            cycles(False)
    finally:
        for nm, fn in originals.items():
            setattr(extern_kernels, nm, fn)
    if spent["calls"] == 0:
        return None
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return {"steps": n, "step_ms": med(walls), "aten_matrix_ms": med(aten), "attention_products_ms": med(prods),
            "matrix_calls_per_step": spent["calls"] / n,
            "matrix_share": statistics.median((m + p) / w for m, p, w in zip(aten, prods, walls))}


def _attention_cycles():
    """The checkout's (the one --tree put first on the path) icl_core.fused_attention.attention_cycles where it has one and its kernels are
    built here, else None."""
    try:
        from icl_core import fused_attention
    except ImportError:
        return None
    fn = getattr(fused_attention, "attention_cycles", None)
    return fn if fn is not None and fused_attention.available() else None


# the fused attention's ops per direction, each timed by the kernel's clock: on (N, T, d_head) inputs,
# and reading the projection's output with RoPE (since the sixteenth pass)
ATTENTION_OPS = {"fwd": ("icl_fused::causal_attention_fwd", "icl_fused::attention_qkv_fwd"),
                 "bwd": ("icl_fused::causal_attention_bwd", "icl_fused::attention_qkv_bwd")}


def attention_products(by_op: dict, ticks: dict | None, matrix: float, total: float) -> dict:
    """The attention's products as matrix work: each direction's call time (profiler self time, in
    ``by_op``) times the fraction of that call's thread time the kernel's own clock put in its
    products (``ticks``: icl_core.fused_attention.attention_cycles). Returns the products' share of
    the step and the matrix share with them (the ATen matrix calls, ``matrix``, plus the products);
    empty without ticks. The ATen calls' time includes oneDNN's own packing; the kernel's products
    exclude its packing, softmax and stores, so the count is, if anything, low."""
    if not ticks:
        return {}
    frac = {part: ticks[f"{part}_products"] / ticks[f"{part}_total"] for part in ("fwd", "bwd")
            if ticks[f"{part}_total"] > 0}
    prod = sum(by_op.get(op, 0.0) * f for part, f in frac.items() for op in ATTENTION_OPS[part])
    return {"attention_products_share": prod / total, "matrix_share_with_attention": (matrix + prod) / total,
            "attention_products_fraction": frac}


def compiles_on_cpu(T, cfg) -> bool:
    """Whether a checkout's Trainer (its icl_core.train, ``T``) compiles this run's loss on the CPU
    (checkouts before CPU_COMPILE_MIN_STEPS never did)."""
    min_steps = getattr(T, "CPU_COMPILE_MIN_STEPS", None)
    return min_steps is not None and cfg.total_steps >= min_steps


def trainer_step(D, T, cfg, corpus, compile: bool, n_batches: int):
    """(step, batches): one training step as a checkout's trainer takes it (``D``, ``T``: that
    checkout's icl_core.data and icl_core.train; its model, optimizer and loss, clipping as the
    trainer clips and updates: ``T.ClipAndStep`` where the checkout has it) and ``n_batches`` of the
    run's training batches. Otherwise only calls that exist in every checkout since the benchmarks
    began are used."""
    import torch

    model = T.init_model(cfg)
    opt = T.make_optimizer(model, cfg)
    loss_of = T.make_loss(model, cfg, "cpu", compile=compile)
    params = list(model.parameters())
    batches = [D.train_batch(corpus, cfg.train.batch_size, cfg.model.n_ctx, 0, s) for s in range(n_batches)]

    update = getattr(T, "ClipAndStep", None)  # the trainer's clipping + AdamW, where it has one
    update = update(opt, params, cfg.train.grad_clip or 1.0) if update else None

    def step(x):
        loss = loss_of(x)
        if update is not None:
            loss.backward()
            update()
            return
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or 1.0)
        opt.step()

    return step, batches


def _short(name: str) -> str:
    """Inductor's compiled graphs are named by a hash: one label for all of them."""
    if name.startswith("graph_") and "_cpp_fused" in name:
        return "compiled elementwise kernels (inductor)"
    if name.startswith("## Call CompiledFxGraph"):
        return "compiled graph's wrapper (inductor)"
    if name.startswith("aoti_torch_cpu_") and name.endswith("_out"):  # the C++ wrapper's ATen calls
        return "aten::" + name[len("aoti_torch_cpu_"):-len("_out")]
    return name[:60]


def _bf16_kernel() -> str:
    """What computed the checkout's bf16 products (checkouts before icl_core.precision: PyTorch's own)."""
    try:
        from icl_core import precision
    except ImportError:
        return "native bf16"
    return precision.bf16_matmul_kernel()


def peak_rss_mb():  # as icl_core.train.peak_rss_mb, which older checkouts lack
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


if __name__ == "__main__":
    main()

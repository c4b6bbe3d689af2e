"""A fused causal attention for CPUs with AVX-512 bf16 dot products (``csrc/causal_attention.cpp``).

The laptop models train in bf16 on one CPU thread, and their attention (scores, softmax, products
over 256 × 256 patterns) was a third of a training step: each of its passes read or wrote an
(N, T, T) tensor in memory. The kernel does a whole (batch × head) slice at a time in cache, skips
the blocks above the causal diagonal, and fuses scale, mask and softmax (forward) and the softmax's
backward into the products. Same formulas as :class:`icl_core.model._CausalAttention`; fp32 scores
and accumulation, bf16 results. PyTorch 2.13 has no CPU kernel that does this with a fast backward
(its CPU flash attention's backward cost ~2.6x the explicit path; ``flex_attention`` has no CPU
backward): hence hand-written C++, built once per machine with PyTorch's own extension builder and
used only where :func:`available` says so (``benchmarks/cpu_trainer.md``, "Ninth pass").

The same extension holds three smaller kernels of the bf16 training step, each replacing compiled
torch ops that made several passes over memory where one suffices (``benchmarks/cpu_trainer.md``,
"Tenth pass"): :func:`rope_split_qkv` (the attention's queries and keys rotated and all three laid
out per head, one pass each way, ``csrc/rope_qkv.cpp``), :func:`softmax_cross_entropy_grad` (the
loss's softmax and logit gradient, one exp per logit, ``csrc/cross_entropy.cpp``) and
:func:`bias_gelu` (the MLP's bias + exact GELU, its backward in one pass, ``csrc/bias_gelu.cpp``).
Since the sixteenth pass training calls :func:`attention_qkv` instead of :func:`rope_split_qkv` and
:func:`attention`: the same rotation and attention, bit for bit, in one kernel per direction that reads
the projection's output and writes z as W_O reads it; :func:`rope_split_qkv` stays as the composition
it is tested against.
Like the attention they run only where gradients are wanted; evaluation keeps the torch ops.

On CPUs with AMX (``amx_bf16``, ``amx_tile``: Intel Xeon from Sapphire Rapids on) the attention's
products run on the matrix unit, the softmax and the rest on AVX-512 as elsewhere; its fp32 sums
differ from the dot-product loop's in the last bits, so :func:`amx` tells which path a process takes
and the run's manifest lists it (``ICL_FUSED_AMX=0`` keeps the dot-product loop; ``benchmarks/cpu_trainer.md``,
"Twelfth pass").

Switch them all off with ``ICL_FUSED_ATTENTION=0`` (the explicit attention and the torch ops are then
used, as on CPUs without ``avx512_bf16`` or without a C++ compiler). The operators are process-wide
(``icl_fused``): two trees with different kernel sources cannot both load theirs into one process.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
# the attention, its RoPE'd inputs (:func:`rope_split_qkv`), the training loss's softmax step
# (:func:`softmax_cross_entropy_grad`) and the MLP's bias + GELU (:func:`bias_gelu`): one extension, one build
_SOURCES = [_CSRC / "causal_attention.cpp", _CSRC / "rope_qkv.cpp", _CSRC / "cross_entropy.cpp",
            _CSRC / "bias_gelu.cpp"]
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16"]
_state: dict[str, object] = {}


def cpu_supports() -> bool:
    """True where the CPU has AVX-512 (F, VL, BW, DQ) with bf16 dot products (``avx512_bf16``), as
    PyTorch's cpuinfo reports them."""
    return torch.cpu._is_avx512_supported() and torch.cpu._is_avx512_bf16_supported()


def enabled() -> bool:
    """The switch: ``ICL_FUSED_ATTENTION`` unset or not "0"."""
    return os.environ.get("ICL_FUSED_ATTENTION", "1") != "0"


@torch._dynamo.disable
def _load() -> bool:
    ok = False
    if enabled() and cpu_supports():
        try:
            from torch.utils.cpp_extension import load

            if shutil.which("ninja") is None:  # PyTorch's builder runs `ninja`; the pinned wheel ships one
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            load(name="icl_fused_attention", sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS,
                 is_python_module=False, verbose=False)
            ok = hasattr(torch.ops.icl_fused, "causal_attention_fwd")
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, ...: the explicit attention instead
            warnings.warn(f"fused CPU attention not built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "using the explicit attention", stacklevel=2)
    _state["ok"] = ok
    if ok:
        _register()
    return ok


def available() -> bool:
    """Whether :func:`attention` can run here: the switch on, the CPU able, the kernel built
    (decided on the first call, once per process: call it before ``torch.compile`` traces a model)."""
    ok = _state.get("ok")
    return _load() if ok is None else bool(ok)


def amx(enable: bool | None = None) -> bool:
    """Whether the attention's products run on AMX tiles in this process (False where the kernels
    are not built or the CPU has no AMX). ``enable`` switches the path for later calls (tests and
    A/Bs); by default ``ICL_FUSED_AMX`` decides once, AMX unless it is "0"."""
    if not available():
        return False
    return bool(torch.ops.icl_fused.amx(-1 if enable is None else int(bool(enable))))


ATTENTION_TICKS = ("fwd_products", "fwd_total", "bwd_products", "bwd_total")


def attention_cycles(start: bool | None = None) -> dict[str, int] | None:
    """Time stamp counter ticks the attention kernels spent in their products (AMX tiles or the
    dot-product loop) and in total, summed over calls and threads since timing started: a profile
    can then count those products as matrix work (torch.profiler sees one call per attention pass;
    benchmarks/step_worker.py). ``start=True`` zeroes the counters and starts timing, ``False``
    stops it, None only reads. Off by default (the kernels then read no clock). None where the
    kernels are not built."""
    if not available():
        return None
    mode = -1 if start is None else int(bool(start))
    return dict(zip(ATTENTION_TICKS, torch.ops.icl_fused.attention_cycles(mode)))


def tsc_hz(seconds: float = 0.05) -> float | None:
    """The time stamp counter's ticks per second (what :func:`attention_cycles` counts), measured
    against ``time.perf_counter`` over ``seconds``; None where the kernels are not built. The CPUs
    these kernels run on have an invariant counter (``constant_tsc``), so one measurement serves."""
    if not available():
        return None
    read = lambda: torch.ops.icl_fused.attention_cycles(2)[0]  # noqa: E731
    t0, c0 = time.perf_counter(), read()
    time.sleep(seconds)
    c1, t1 = read(), time.perf_counter()
    return (c1 - c0) / (t1 - t0)


def takes_shape(n_ctx: int, d_head: int) -> bool:
    """Whether the kernel takes this sequence length and head size (multiples of 32)."""
    return n_ctx % 32 == 0 and d_head % 32 == 0


def usable(q: torch.Tensor) -> bool:
    """Whether the kernel takes these (N, T, d_head) inputs: CPU bf16, T and d_head multiples of 32."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.dim() == 3
            and takes_shape(q.shape[1], q.shape[2]) and available())


def _register():
    # once per process: two copies of icl_core in one process (benchmarks/interleaved_ab.py) share
    # the operator, which the first copy's registration serves
    if torch._C._dispatch_has_kernel_for_dispatch_key("icl_fused::causal_attention_fwd", "Autograd"):
        return

    @torch.library.register_fake("icl_fused::causal_attention_fwd")
    def _(q, k, v):
        N, T, _d = q.shape
        return torch.empty_like(q), q.new_empty((N, T, T))

    @torch.library.register_fake("icl_fused::causal_attention_bwd")
    def _(dO, q, k, v, P):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("icl_fused::softmax_cross_entropy_grad")
    def _(logits, targets, scale):
        return logits.new_empty((), dtype=torch.float32), torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.save_for_backward(q, k, v, output[1])

    def backward(ctx, dO, _dP):
        q, k, v, P = ctx.saved_tensors
        return tuple(torch.ops.icl_fused.causal_attention_bwd(dO.contiguous(), q, k, v, P))

    torch.library.register_autograd("icl_fused::causal_attention_fwd", backward, setup_context=setup_context)

    @torch.library.register_fake("icl_fused::attention_qkv_fwd")
    def _(qkv, cos, sin):
        B, T, _three, H, D = qkv.shape
        return qkv.new_empty((B, T, H, D)), qkv.new_empty((B * H, T, T)), qkv.new_empty((2, B * H, T, D))

    @torch.library.register_fake("icl_fused::attention_qkv_bwd")
    def _(dO, qkv, cos, sin, P, QK):
        return torch.empty_like(qkv)

    def qkv_setup(ctx, inputs, output):
        qkv, cos, sin = inputs
        ctx.save_for_backward(qkv, cos, sin, output[1], output[2])

    def qkv_backward(ctx, dO, _dP, _dQK):
        qkv, cos, sin, P, QK = ctx.saved_tensors
        return torch.ops.icl_fused.attention_qkv_bwd(dO.contiguous(), qkv, cos, sin, P, QK), None, None

    torch.library.register_autograd("icl_fused::attention_qkv_fwd", qkv_backward, setup_context=qkv_setup)

    @torch.library.register_fake("icl_fused::softmax_cross_entropy_grad_")
    def _(logits, targets, scale):
        return logits.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("icl_fused::bias_gelu_fwd")
    def _(m, b):
        return torch.empty_like(m)

    @torch.library.register_fake("icl_fused::bias_gelu_bwd")
    def _(da, m, b):
        return torch.empty_like(m), torch.empty_like(b)

    def gelu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gelu_backward(ctx, da):
        m, b = ctx.saved_tensors
        return tuple(torch.ops.icl_fused.bias_gelu_bwd(da.contiguous(), m, b))

    torch.library.register_autograd("icl_fused::bias_gelu_fwd", gelu_backward, setup_context=gelu_setup)

    @torch.library.register_fake("icl_fused::rope_split_qkv")
    def _(qkv, cos, sin):
        B, T, _three, H, D = qkv.shape
        return tuple(qkv.new_empty((B * H, T, D)) for _ in range(3))

    @torch.library.register_fake("icl_fused::rope_split_qkv_bwd")
    def _(dq, dk, dv, cos, sin, H):
        BH, T, D = dq.shape
        return dq.new_empty((BH // H, T, 3, H, D))

    def rope_setup(ctx, inputs, output):
        qkv, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.n_heads = qkv.shape[3]

    def rope_backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return (torch.ops.icl_fused.rope_split_qkv_bwd(dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin,
                                                       ctx.n_heads), None, None)

    torch.library.register_autograd("icl_fused::rope_split_qkv", rope_backward, setup_context=rope_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d_head + causal mask) v for contiguous (N, T, d_head) bf16 CPU tensors (see
    :func:`usable`); differentiable in q, k and v."""
    return torch.ops.icl_fused.causal_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())[0]


def pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The (N, T, T) bf16 attention pattern the kernel computes (for tests), zero above the diagonal.
    The kernel saves it for its backward by pairs of rows (``P[n, i // 2, j, i % 2]``) and leaves most
    of the upper triangle unwritten (its products never read it): unpacked here."""
    N, T, _d = q.shape
    P = torch.ops.icl_fused.causal_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())[1]
    return P.view(N, T // 2, T, 2).transpose(2, 3).reshape(N, T, T).tril()


def cross_entropy_usable(h: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether :func:`softmax_cross_entropy_grad` takes the logits ``h @ W`` of (rows, d) rows and a
    (d, V) unembedding: both CPU bf16, V a multiple of 16, the kernels built."""
    return (h.device.type == "cpu" and h.dtype == torch.bfloat16 and W.dtype == torch.bfloat16 and W.dim() == 2
            and W.shape[1] % 16 == 0 and available())


def softmax_cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float):
    """(sum over rows of −log softmax(logits)[target], (softmax − onehot(target)) · scale) for
    (rows, V) bf16 CPU logits and int64 targets: the loss's forward and its logit gradient in one
    pass per row, one exp per logit (``csrc/cross_entropy.cpp``). The sum is fp32, the gradient bf16.
    Not differentiable: :class:`icl_core.model._LinearCrossEntropy` supplies the backward."""
    return torch.ops.icl_fused.softmax_cross_entropy_grad(logits.contiguous(), targets, scale)


def softmax_cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`softmax_cross_entropy_grad` with the gradient written over ``logits`` (contiguous, and
    no longer needed as logits): returns the loss sum. Bit for bit the same values; one (rows, V)
    buffer between the logits' product and the gradient's products instead of two."""
    return torch.ops.icl_fused.softmax_cross_entropy_grad_(logits, targets, scale)


def bias_gelu_usable(m: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`bias_gelu` takes this product and bias: an (…, d_mlp) bf16 CPU product, an fp32
    bias, d_mlp a multiple of 16, the kernels built."""
    return (m.device.type == "cpu" and m.dtype == torch.bfloat16 and b.dtype == torch.float32 and b.dim() == 1
            and m.shape[-1] == b.shape[0] and b.shape[0] % 16 == 0 and available())


def bias_gelu(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GELU(m + b) (exact, erf-based; fp32 inside) as bf16, for a bf16 CPU product ``m`` of shape
    (…, d_mlp) and an fp32 bias ``b``; differentiable in both (``csrc/bias_gelu.cpp``)."""
    shape = m.shape
    return torch.ops.icl_fused.bias_gelu_fwd(m.reshape(-1, shape[-1]).contiguous(), b.contiguous()).view(shape)


def rope_split_usable(qkv: torch.Tensor) -> bool:
    """Whether :func:`rope_split_qkv` takes this (B, T, 3, H, d_head) product: CPU bf16, T and
    d_head multiples of 32 (the attention kernel's shapes), the kernels built."""
    return (qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16 and qkv.dim() == 5 and qkv.shape[2] == 3
            and takes_shape(qkv.shape[1], qkv.shape[4]) and available())


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, T: int):
    """The first T rows of RoPE's (n_ctx, d_head) tables as the kernels take them: contiguous bf16."""
    return tuple(t[:T].to(torch.bfloat16).contiguous() for t in (cos, sin))


def rope_split_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k, v), each (B·H, T, d_head) bf16, from the (B, T, 3, H, d_head) product of
    :class:`icl_core.model.Attention`'s half-split W_qkv: q and k rotated as ``x * cos +
    swap_halves(x) * sin`` with the (T, d_head) tables in that order; differentiable in ``qkv``
    (``csrc/rope_qkv.cpp``)."""
    return torch.ops.icl_fused.rope_split_qkv(qkv.contiguous(), *_rope_tables(cos, sin, qkv.shape[1]))


def attention_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The attention of :func:`rope_split_qkv`'s (q, k, v) as (B, T, H, d_head) bf16 (the layout W_O's
    product reads), bit for bit ``attention(*rope_split_qkv(qkv, cos, sin))`` transposed, without
    the separate passes: each (batch × head) slice's queries and keys are rotated as the kernel packs
    them (and kept for the backward), values read in place, and the backward writes the
    (B, T, 3, H, d_head) gradient directly
    (``csrc/causal_attention.cpp``; benchmarks/cpu_trainer.md, "Sixteenth pass"). Differentiable in ``qkv``."""
    return torch.ops.icl_fused.attention_qkv_fwd(qkv.contiguous(), *_rope_tables(cos, sin, qkv.shape[1]))[0]


def kernels_for(mc) -> list[str]:
    """The fused kernels a bf16 CPU training run of model config ``mc`` (icl_core.config.ModelConfig)
    takes here, for its manifest: "attention" (and "attention_amx" where its products run on AMX
    tiles), "rope_qkv", "cross_entropy", "bias_gelu"."""
    if not available():
        return []
    out = []
    if takes_shape(mc.n_ctx, mc.d_head):
        out.append("attention")
        if amx():
            out.append("attention_amx")
        if mc.positional == "rope" and not mc.smeared_keys:
            out.append("rope_qkv")
    if mc.d_vocab % 16 == 0:
        out.append("cross_entropy")
    if not mc.attn_only and mc.d_mlp % 16 == 0:
        out.append("bias_gelu")
    return out

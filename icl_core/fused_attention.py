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

Switch it off with ``ICL_FUSED_ATTENTION=0`` (the explicit attention is then used, as on CPUs
without ``avx512_bf16`` or without a C++ compiler). The operator is process-wide (``icl_fused``):
two trees with different kernel sources cannot both load theirs into one process.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "causal_attention.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
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
            load(name="icl_fused_attention", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
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

    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.save_for_backward(q, k, v, output[1])

    def backward(ctx, dO, _dP):
        q, k, v, P = ctx.saved_tensors
        return tuple(torch.ops.icl_fused.causal_attention_bwd(dO.contiguous(), q, k, v, P))

    torch.library.register_autograd("icl_fused::causal_attention_fwd", backward, setup_context=setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d_head + causal mask) v for contiguous (N, T, d_head) bf16 CPU tensors (see
    :func:`usable`); differentiable in q, k and v."""
    return torch.ops.icl_fused.causal_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())[0]


def pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The (N, T, T) bf16 attention pattern the kernel computes (for tests)."""
    return torch.ops.icl_fused.causal_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())[1]

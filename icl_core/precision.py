"""bf16 matrix products on CPUs without bf16 matrix kernels: the same numbers at fp32 speed.

The book trains and evaluates under bf16 autocast: a matrix product's inputs are rounded to bf16,
multiplied with fp32 accumulation, and its output rounded to bf16. On a CPU that oneDNN serves in
bf16 (AVX-512 or AMX; ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) that is fast; on the
others (AVX2 only: AMD Zen 2 and 3, most laptop chips before 2023) PyTorch falls back to a generic
bf16 product that is two orders of magnitude slower than its fp32 one (measured on a Zen 2 EPYC:
0.7 vs 72 GFLOP/s at one thread; a laptop ``attn2`` training step 30x slower in bf16 than in fp32;
benchmarks/cpu_trainer.md).

There this module computes every bf16 product as the fp32 product of the bf16-rounded inputs,
rounded back to bf16: ``(a.bfloat16().float() @ b.bfloat16().float()).bfloat16()``. A product of two
bf16 numbers is exact in fp32, so this is the native bf16 product up to the order in which fp32
partial sums are added (which differs between any two matrix kernels anyway), and gradients, which
autograd rounds to bf16 through the same casts, follow. A run keeps its precision, its config hash
and its science; the manifest records which kernel computed it (:func:`bf16_matmul_kernel`).

Two places use it: under autocast, the CPU autocast kernels of the matrix products (``mm``,
``bmm``, ``baddbmm``, ``addmm``, ``matmul``, ``linear``) are replaced (``torch.library``), so the
model, the metrics, the chapters and TransformerLens in the benchmarks all take it; outside
autocast, the chunked loss's and the attention's explicit bf16 products call :func:`lowp_matmul`
and :func:`lowp_baddbmm`.

``ICL_BF16_MATMUL=native|emulated`` overrides the automatic choice (``auto``).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

ENV = "ICL_BF16_MATMUL"
# the products autocast runs in bf16 on the CPU that the model, the metrics and TransformerLens use
_AUTOCAST_OPS = ("mm", "bmm", "baddbmm", "addmm", "matmul", "linear")
_library = None


@functools.lru_cache(maxsize=None)
def native_bf16_matmul() -> bool:
    """True where oneDNN computes bf16 matrix products on this CPU (AVX-512 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a PyTorch built without oneDNN
        return False


def emulating() -> bool:
    """Whether bf16 products on the CPU run as fp32 products of bf16-rounded inputs."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "native", "emulated"):
        raise ValueError(f"{ENV}={choice!r} is not auto, native or emulated")
    if choice == "auto":
        return not native_bf16_matmul()
    return choice == "emulated"


def bf16_matmul_kernel() -> str:
    """What computes a CPU bf16 product in this process, for run manifests and benchmark tables."""
    return "fp32 of bf16-rounded inputs" if _library is not None else "native bf16"


def lowp_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for tensors already in the product's dtype, outside autocast: in bf16 on the CPU,
    while the emulation is installed (:func:`install`), the fp32 product rounded to bf16."""
    if a.dtype == torch.bfloat16 and a.device.type == "cpu" and _library is not None:
        return (a.float() @ b.float()).to(torch.bfloat16)
    return a @ b


def lowp_baddbmm(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.baddbmm(m, a, b)`` outside autocast, as :func:`lowp_matmul`: in bf16 on the CPU while
    the emulation is installed, the fp32 product (plus m) rounded once to bf16, as the emulated
    autocast kernel computes it."""
    if a.dtype == torch.bfloat16 and a.device.type == "cpu" and _library is not None:
        return torch.baddbmm(m.to(torch.bfloat16).float(), a.float(), b.float()).to(torch.bfloat16)
    return torch.baddbmm(m, a, b)


def _emulated(op):
    excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        # as autocast would, floating tensors are rounded to bf16 (fp64 left alone); the product of
        # those values is taken in fp32 (exact) and rounded once to bf16. Autocast to another dtype
        # than bf16 (unused by the project) runs in that dtype, as PyTorch's own kernel would
        dtype = torch.get_autocast_dtype("cpu")
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            if dtype != torch.bfloat16:
                return op(*[_cast(a, dtype, dtype) for a in args], **kwargs)
            return op(*[_cast(a, dtype, torch.float32) for a in args], **kwargs).to(dtype)
    return kernel


def _cast(a, rounded, to):
    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
        return a.to(rounded).to(to)
    return a


def install(force: bool = False) -> bool:
    """Replace the CPU autocast kernels of the matrix products where :func:`emulating` (or with
    ``force``, on any CPU: tests compare the two); once per process (later calls return the state).
    Returns whether the emulation is active."""
    global _library
    if _library is not None or not (force or emulating()):
        return _library is not None
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": intended
        for name in _AUTOCAST_OPS:
            lib.impl(name, _emulated(getattr(torch.ops.aten, name).default), "AutocastCPU")
    _library = lib
    return True


def uninstall() -> None:
    """Restore PyTorch's own autocast kernels (tests compare the two)."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None

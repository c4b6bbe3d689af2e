"""Temporary hooks, always as context managers (permanent hooks are global state).

Hook point names follow TransformerLens: ``blocks.{l}.attn.hook_pattern`` (B, H, T, T),
``blocks.{l}.attn.hook_result`` (B, T, H, D: each head's output), ``blocks.{l}.hook_resid_pre``,
``hook_embed``, ``hook_resid_final``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .model import Transformer


@contextlib.contextmanager
def hooks(model: Transformer, fns: dict[str, Callable]) -> Iterator[None]:
    """Register ``{hook_name: fn}`` for the duration of the block; fn(x) returns x or None."""
    added = []
    try:
        for name, fn in fns.items():
            model._hooks.setdefault(name, []).append(fn)
            added.append((name, fn))
        yield
    finally:
        for name, fn in added:
            model._hooks[name].remove(fn)
            if not model._hooks[name]:
                del model._hooks[name]


@contextlib.contextmanager
def cache(model: Transformer, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the tensors at the given hook points: ``with cache(m, [...]) as c: m(x)``."""
    store: dict[str, torch.Tensor] = {}

    def make(name):
        def fn(x):
            store[name] = x.detach()
        return fn

    with hooks(model, {n: make(n) for n in names}):
        yield store


def pattern_names(model: Transformer) -> list[str]:
    return [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]


def result_names(model: Transformer) -> list[str]:
    return [f"blocks.{l}.attn.hook_result" for l in range(model.cfg.n_layers)]


@contextlib.contextmanager
def cache_patterns(model: Transformer) -> Iterator[dict[str, torch.Tensor]]:
    """Cache every layer's attention pattern (B, H, T, T)."""
    with cache(model, pattern_names(model)) as c:
        yield c


def stack_patterns(model: Transformer, store: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L, H, T, T) from a pattern cache."""
    return torch.stack([store[n] for n in pattern_names(model)], dim=1)


@contextlib.contextmanager
def zero_heads(model: Transformer, mask: torch.Tensor) -> Iterator[None]:
    """Zero the outputs of heads where ``mask`` is True.

    mask: bool (n_layers, n_heads), the same for the whole batch, or (B, n_layers, n_heads), one
    ablation per batch element (this batches many single-head ablations into one forward pass).
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if mask.shape[-2:] != (n_layers, n_heads):
        raise ValueError(f"head mask has shape {tuple(mask.shape)}, expected (..., {n_layers}, {n_heads})")
    fns = {}
    for l in range(n_layers):
        m = mask[..., l, :]
        if not bool(m.any()):
            continue

        def fn(x, m=m):  # x: (B, T, H, D)
            keep = (~m).to(x.dtype)
            keep = keep[None, None, :, None] if keep.dim() == 1 else keep[:, None, :, None]
            return x * keep
        fns[f"blocks.{l}.attn.hook_result"] = fn
    with hooks(model, fns):
        yield


@contextlib.contextmanager
def force_patterns(model: Transformer, patterns: torch.Tensor) -> Iterator[None]:
    """Replace every layer's attention pattern with ``patterns`` (B, L, H, T, T).

    The forced layers skip their queries' rotation, scores and softmax (the pattern-preserving
    ablations' ablated passes spent about a third of their time computing patterns they then
    replaced), so ``hook_attn_scores`` does not fire there; ``hook_pattern`` hooks see the forced
    pattern."""
    if patterns.dim() != 5 or patterns.shape[1] != model.cfg.n_layers:
        raise ValueError(f"forced patterns have shape {tuple(patterns.shape)}, expected (B, {model.cfg.n_layers}, H, T, T)")
    before = dict(model._forced_patterns)
    model._forced_patterns.update({l: patterns[:, l] for l in range(model.cfg.n_layers)})
    try:
        yield
    finally:
        model._forced_patterns.clear()
        model._forced_patterns.update(before)

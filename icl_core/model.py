"""A small decoder-only transformer with the paper's architecture options.

One file a reader can hold in their head (after nanoGPT), with TransformerLens' names and per-head
weight shapes so the circuit metrics read them directly:

    W_E [d_vocab, d_model]   W_pos [n_ctx, d_model]   W_U [d_model, d_vocab]
    blocks[l].attn.W_Q, W_K, W_V [n_heads, d_model, d_head]   W_O [n_heads, d_head, d_model]

Options (``ModelConfig``): attention-only or with MLPs; positions ``learned`` (added to the
residual), ``shortformer`` (added to the inputs of queries and keys only, as in the paper), ``rope``
or ``none``; pre-LayerNorm on/off; smeared keys (paper, Argument 2): k'_j = s k_j + (1 - s) k_{j-1}
with s = sigmoid(alpha_h), one trainable alpha per head, the first key unchanged.

Hook points (TransformerLens names) are active only inside the context managers of
:mod:`icl_core.hooks`. Without hooks, attention runs through ``scaled_dot_product_attention``
(under bf16 autocast on the CPU through :func:`causal_attention`: in training the fused kernel of
:mod:`icl_core.fused_attention` where the CPU has it, otherwise explicit products with a written-out
backward); with an attention hook registered for a layer, that layer switches to the explicit path.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import precision
from . import fused_attention
from .precision import lowp_baddbmm, lowp_matmul
from .config import ModelConfig

# bf16 products at fp32 speed on CPUs without bf16 matrix kernels (icl_core.precision)
precision.install()

HookFn = Callable[[torch.Tensor], torch.Tensor | None]


class LayerNorm(nn.Module):
    def __init__(self, d: int, enabled: bool):
        super().__init__()
        self.enabled = enabled
        if enabled:
            self.w = nn.Parameter(torch.ones(d))
            self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        if not self.enabled:
            return x
        return F.layer_norm(x, (x.shape[-1],), self.w, self.b, 1e-5)


def rope_tables(n_ctx: int, d_head: int, base: float = 10000.0):
    """(cos, sin) tables (T, d_head) for :func:`apply_rope`, each angle repeated for its pair of
    dimensions (even, odd); the sin table carries the rotation's sign: -sin on even dimensions."""
    inv = 1.0 / base ** (torch.arange(0, d_head, 2).float() / d_head)
    ang = torch.arange(n_ctx).float()[:, None] * inv[None, :]  # (T, dh/2)
    cos = ang.cos().repeat_interleave(2, -1)
    sin = torch.stack((-ang.sin(), ang.sin()), -1).flatten(-2)
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate each pair of dimensions (even, odd) of x (B, H, T, dh) by its position's angle:
    (x_e, x_o) -> (x_e cos - x_o sin, x_e sin + x_o cos), written as x * cos + swap(x) * sin with
    the pairs swapped and the sign in the table. Same values as slicing out x_e and x_o, with fewer
    elementwise passes (measured +8% training throughput on the laptop's 3-layer model, bf16)."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    return x * cos + swap_pairs(x) * sin


def swap_halves(x):
    """Swap the two halves of the last axis: :func:`swap_pairs` in half-split order."""
    h = x.shape[-1] // 2
    return torch.cat([x[..., h:], x[..., :h]], -1)


def half_split_order(d_head: int) -> torch.Tensor:
    """The permutation of a head's dimensions that puts each RoPE pair's even member in the first
    half and its odd member at the same place in the second half: (0, 2, ..., dh-2, 1, 3, ..., dh-1)."""
    return torch.cat([torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)])


def swap_pairs(x):
    """Swap each pair of dimensions (even, odd) of the last axis: RoPE's partner of each value."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).flip(-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, model: "Transformer"):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self._model = [model]  # list: not a submodule
        D, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        # stored fused for one matmul; W_Q/W_K/W_V below are [H, D, dh] views
        self.W_qkv = nn.Parameter(torch.randn(D, 3, H, dh) * cfg.init_std)
        self.W_O_ = nn.Parameter(torch.randn(H, dh, D) * cfg.init_std / math.sqrt(2 * cfg.n_layers))
        if cfg.attn_bias:
            # b_Q, b_K, b_V fused like W_qkv (TransformerLens b_Q/b_K/b_V are [H, dh] views), and b_O
            self.b_qkv = nn.Parameter(torch.zeros(3, H, dh))
            self.b_O = nn.Parameter(torch.zeros(D))
        if cfg.smeared_keys:
            # [book choice] the paper does not give the initial value: alpha = 0 (sigmoid 0.5, an
            # even mix of each key and its predecessor); alpha -> +inf recovers a vanilla model
            self.alpha = nn.Parameter(torch.zeros(H))

    def _half_split(self, w):
        """w (..., 3, H, dh) with the query and key dimensions put in half-split order."""
        order = self._model[0].rope_half_order  # a buffer: built once, on the model's device
        return torch.cat([w[..., :2, :, :].index_select(-1, order), w[..., 2:, :, :]], -3)

    @property
    def W_Q(self):
        return self.W_qkv[:, 0].transpose(0, 1)  # (H, D, dh)

    @property
    def W_K(self):
        return self.W_qkv[:, 1].transpose(0, 1)

    @property
    def W_V(self):
        return self.W_qkv[:, 2].transpose(0, 1)

    @property
    def W_O(self):
        return self.W_O_  # (H, dh, D)

    @property
    def b_Q(self):
        return self.b_qkv[0] if self.cfg.attn_bias else None  # (H, dh)

    @property
    def b_K(self):
        return self.b_qkv[1] if self.cfg.attn_bias else None

    @property
    def b_V(self):
        return self.b_qkv[2] if self.cfg.attn_bias else None

    def _out(self, z):
        """z (B, T, H*dh) -> (B, T, D) through W_O (and b_O)."""
        H, dh, D = self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model
        out = z @ self.W_O_.reshape(H * dh, D)
        return out + self.b_O if self.cfg.attn_bias else out

    def smear(self, k):
        """Smeared keys: k'_j = s k_j + (1-s) k_{j-1}, first key unchanged. k: (B, H, T, dh)."""
        s = torch.sigmoid(self.alpha).to(k.dtype)[None, :, None, None]
        prev = torch.cat([k[:, :, :1], k[:, :, :-1]], dim=2)
        out = s * k + (1 - s) * prev
        return torch.cat([k[:, :, :1], out[:, :, 1:]], dim=2)

    def _queries_keys(self, q, k, rotated: bool = False):
        """Queries and keys (B, H, T, dh) as the scores use them: rotated (RoPE, unless
        ``rotated`` says the projection did it), keys smeared."""
        cfg, model = self.cfg, self._model[0]
        if cfg.positional == "rope" and not rotated:
            q = apply_rope(q, model.rope_cos, model.rope_sin)
            k = apply_rope(k, model.rope_cos, model.rope_sin)
        if cfg.smeared_keys:
            k = self.smear(k)
        return q, k

    def _pattern(self, q, k, name: str):
        """The attention pattern (B, H, T, T), after the ``hook_attn_scores`` hooks."""
        model = self._model[0]
        B, H, T, dh = q.shape
        # one kernel for scale, QK^T and the causal mask: the mask is additive (0 / -inf, cached),
        # so its backward is free, and q is scaled before the product (B*H*T*dh, not T*T, values)
        scores = torch.baddbmm(model._causal_mask(T, q.device), (q * (1.0 / math.sqrt(dh))).reshape(B * H, T, dh),
                               k.reshape(B * H, T, dh).transpose(1, 2)).view(B, H, T, T)
        scores = model._hook(f"{name}.hook_attn_scores", scores)
        return scores.softmax(-1)

    def forward(self, x, pos=None):
        """x: (B, T, D) normalised residual; pos: (B, T, D) normalised residual + W_pos, the
        query/key input for shortformer positions (None otherwise)."""
        cfg, model = self.cfg, self._model[0]
        B, T, D = x.shape
        H, dh = cfg.n_heads, cfg.d_head
        name = f"blocks.{self.layer}.attn"
        forced = model._forced_patterns.get(self.layer)  # hooks.force_patterns: (B, H, T, T) or None
        # RoPE in the projection: the query and key columns of W_qkv are taken in half-split order
        # (half_split_order, a permutation of each head's dimensions applied to both, so every
        # score q.k is unchanged), where each pair's partner is in the other half: the rotation is
        # q cos + swap_halves(q) sin on the matmul's output, two elementwise products whose
        # compiled backward reads whole vectors. Swapping pairs of the (B, T, H, dh) activations
        # kept the compiled backward in a scalar loop (~10% of a laptop step), and computing the
        # swapped q and k by a second set of weight columns (x @ swap_pairs(W_Q)) cost 5/3 of the
        # projection's products (benchmarks/cpu_trainer.md, "Sixth pass").
        rope_in_projection = pos is None and cfg.positional == "rope" and forced is None
        W = self.W_qkv.reshape(D, 3 * H * dh)
        if pos is not None:  # shortformer: positions enter queries and keys only
            xp = pos  # the caller passes LN(resid) + W_pos as the query/key input
            qk = xp @ W[:, : 2 * H * dh]
            v = x @ W[:, 2 * H * dh:]
            if cfg.attn_bias:
                b = self.b_qkv.reshape(3 * H * dh)
                qk, v = qk + b[: 2 * H * dh], v + b[2 * H * dh:]
            qk, v = qk.view(B, T, 2, H, dh), v.view(B, T, H, dh)
            q, k = qk[:, :, 0], qk[:, :, 1]
        elif rope_in_projection:
            qkv = x @ self._half_split(self.W_qkv).reshape(D, 3 * H * dh)
            if cfg.attn_bias:
                qkv = qkv + self._half_split(self.b_qkv.unsqueeze(0)).reshape(3 * H * dh)
            qkv = qkv.view(B, T, 3, H, dh)
            # training in bf16 on a CPU with AVX-512 and nothing hooked: the fused attention reads the
            # projection's output, rotating queries and keys as it packs them, and writes z in the
            # (B, T, H, dh) layout W_O reads (icl_core.fused_attention.attention_qkv); the same formulas
            # as the lines below (benchmarks/cpu_trainer.md, "Tenth pass", "Sixteenth pass")
            if (torch.is_grad_enabled() and qkv.requires_grad and not cfg.smeared_keys and not model._wants(name)
                    and torch.is_autocast_enabled(x.device.type) and fused_attention.rope_split_usable(qkv)):
                z = fused_attention.attention_qkv(qkv, model.rope_cos_half, model.rope_sin_half)
                return self._out(z.reshape(B, T, H * dh))
            cos, sin = (t[:T, None].to(qkv.dtype) for t in (model.rope_cos_half, model.rope_sin_half))  # (T, 1, dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            q = q * cos + swap_halves(q) * sin  # apply_rope(q) with its dimensions in half-split order
            k = k * cos + swap_halves(k) * sin
        else:
            qkv = x @ W
            if cfg.attn_bias:
                qkv = qkv + self.b_qkv.reshape(3 * H * dh)
            qkv = qkv.view(B, T, 3, H, dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, dh)
        if forced is not None:
            # the pattern is given, so rotated queries and keys, scores and softmax are not
            # computed; it enters in the dtype the softmax would have produced (bitwise the same
            # as replacing the softmax's output; tests/test_model.py)
            auto = torch.is_autocast_enabled(x.device.type)
            pattern = forced.to(torch.get_autocast_dtype(x.device.type) if auto else q.dtype)
        else:
            q, k = self._queries_keys(q, k, rotated=rope_in_projection)
            # measured on the project's CPUs: with bf16 autocast explicit products are faster than
            # SDPA at head size 32 (its CPU flash attention's forward + backward took ~2.6x the
            # explicit path's; benchmarks/cpu_trainer.md); in fp32 SDPA is ~1.4x faster. Without
            # hooks the explicit path is causal_attention (same forward, bit for bit the hooked
            # path's; a written-out backward)
            cpu_bf16 = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            if not (model._wants(name) or not model.use_sdpa or cpu_bf16):
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, dh)
                return self._out(z.transpose(1, 2).reshape(B, T, H * dh))
            if cpu_bf16 and not model._wants(name):
                z = causal_attention(q.reshape(B * H, T, dh), k.reshape(B * H, T, dh), v.reshape(B * H, T, dh),
                                     model._causal_mask(T, q.device))
                return self._out(z.view(B, H, T, dh).transpose(1, 2).reshape(B, T, H * dh))
            pattern = self._pattern(q, k, name)
        pattern = model._hook(f"{name}.hook_pattern", pattern)  # (B, H, T, T)
        z = (pattern.to(v.dtype) @ v)  # (B, H, T, dh)
        if not model._wants(f"{name}.hook_result"):
            return self._out(z.transpose(1, 2).reshape(B, T, H * dh))
        result = torch.einsum("bhtd,hdm->bthm", z, self.W_O_.to(z.dtype))  # (B, T, H, D)
        result = model._hook(f"{name}.hook_result", result)
        return result.sum(2) + self.b_O if cfg.attn_bias else result.sum(2)


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(dh) + mask) v for (N, T, dh) queries, keys and values, with the
    backward written out instead of derived op by op: the derived one computed the keys' and
    values' gradients as transposed products (dK^T = Q^T dS, a (dh, T) result that the next
    elementwise kernel read with a stride of T) and the softmax's backward from the (N, T, T)
    pattern twice. Same products and the same formulas (dS = P * (dP - rowsum(dP * P)) in fp32,
    as PyTorch's softmax backward), in an order chosen for the CPU (benchmarks/cpu_trainer.md)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        qs = q * (1.0 / math.sqrt(q.shape[-1]))  # scaled before the product: N*T*dh, not T*T, values
        p = lowp_baddbmm(mask.to(qs.dtype), qs, k.transpose(1, 2)).softmax(-1)
        ctx.save_for_backward(qs, k, v, p)
        return lowp_matmul(p, v)

    @staticmethod
    def backward(ctx, dz):
        qs, k, v, p = ctx.saved_tensors
        dp = lowp_matmul(dz, v.transpose(1, 2))
        acc = torch.promote_types(p.dtype, torch.float32)  # bf16 patterns: the softmax backward in fp32
        pf, dpf = p.to(acc), dp.to(acc)
        ds = (pf * (dpf - (dpf * pf).sum(-1, keepdim=True))).to(p.dtype)
        dq = lowp_matmul(ds, k) * (1.0 / math.sqrt(qs.shape[-1]))
        dk = lowp_matmul(ds.transpose(1, 2), qs)
        dv = lowp_matmul(p.transpose(1, 2), dz)
        return dq, dk, dv, None


def causal_attention(q, k, v, mask):
    """Causal attention of (N, T, dh) queries, keys and values; ``mask`` is the additive (T, T)
    causal mask. Under autocast the products run in its dtype (all three inputs cast once), emulated
    where icl_core.precision emulates bf16 products."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # training (gradients wanted), bf16 on a CPU with avx512_bf16: the fused kernel, same formulas.
    # Evaluation stays on the explicit path, bit for bit the hooked one, so a loss and a metric read
    # through hooks (ablations, cached patterns) never differ by rounding (tests/test_model.py)
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if wants_grad and fused_attention.usable(q):
        return fused_attention.attention(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        return _CausalAttention.apply(q, k, v, mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(cfg.d_model, cfg.d_mlp) * cfg.init_std)
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.randn(cfg.d_mlp, cfg.d_model) * cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x):
        pre = x @ self.W_in
        # training in bf16 on a CPU with AVX-512: bias + GELU (and its backward) in one pass,
        # icl_core.fused_attention.bias_gelu; the same formulas (benchmarks/cpu_trainer.md, "Tenth pass")
        if torch.is_grad_enabled() and pre.requires_grad and fused_attention.bias_gelu_usable(pre, self.b_in):
            return fused_attention.bias_gelu(pre, self.b_in) @ self.W_out + self.b_out
        return F.gelu(pre + self.b_in) @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, model: "Transformer"):
        super().__init__()
        self.cfg = cfg
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm)
        self.attn = Attention(cfg, layer, model)
        if not cfg.attn_only:
            self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm)
            self.mlp = MLP(cfg)

    def forward(self, x, pos=None):
        # shortformer (as in TransformerLens): queries and keys read LN(resid) + W_pos, values LN(resid)
        h = self.ln1(x)
        x = x + self.attn(h, h + pos[: x.shape[1]] if pos is not None else None)
        if not self.cfg.attn_only:
            x = x + self.mlp(self.ln2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.randn(cfg.d_vocab, cfg.d_model) * cfg.init_std)
        if cfg.positional in ("learned", "shortformer"):
            std = cfg.init_std if cfg.pos_init_std is None else cfg.pos_init_std
            self.W_pos = nn.Parameter(torch.randn(cfg.n_ctx, cfg.d_model) * std)
        if cfg.positional == "rope":
            cos, sin = rope_tables(cfg.n_ctx, cfg.d_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            order = half_split_order(cfg.d_head)
            self.register_buffer("rope_half_order", order, persistent=False)
            self.register_buffer("rope_cos_half", cos[:, order].contiguous(), persistent=False)
            self.register_buffer("rope_sin_half", sin[:, order].contiguous(), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg, l, self) for l in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm)
        self.W_U = nn.Parameter(torch.randn(cfg.d_model, cfg.d_vocab) * cfg.init_std)
        self._hooks: dict[str, list[HookFn]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._forced_patterns: dict[int, torch.Tensor] = {}  # layer -> (B, H, T, T), hooks.force_patterns
        self.use_sdpa = True

    def _causal_mask(self, T: int, device) -> torch.Tensor:
        """(T, T) additive causal mask (0 on and below the diagonal, -inf above), cached per device."""
        key = (T, str(device))
        m = self._masks.get(key)
        if m is None:
            m = torch.full((T, T), float("-inf"), device=device).triu(1)
            self._masks[key] = m
        return m

    # --- hooks (registered only by the context managers in icl_core.hooks) ------------------
    def _wants(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self._hooks)

    def _hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self._hooks.get(name, ()):
            out = fn(x)
            if out is not None:
                x = out
        return x

    # --- forward ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, return_loss: bool = False) -> torch.Tensor:
        """tokens (B, T) int -> logits (B, T, d_vocab); with ``return_loss`` the mean next-token
        cross-entropy instead (:func:`linear_cross_entropy`: the logits are never stored whole)."""
        h = self.residual(tokens)
        if return_loss:
            return linear_cross_entropy(h, self.W_U, tokens)
        return h @ self.W_U

    def token_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T-1) fp32 per-token losses, no gradient (:func:`token_losses` of the
        residual: the logits are never stored whole). Evaluation's forward pass."""
        return token_losses(self.residual(tokens), self.W_U, tokens)

    def residual(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int -> the final normalised residual stream (B, T, d_model), the input of W_U."""
        B, T = tokens.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} exceeds n_ctx={self.cfg.n_ctx}")
        # F.embedding, not W_E[tokens]: the indexing's backward (an accumulating index_put) sums in a
        # thread-dependent order with 2+ CPU threads, so training was not repeatable; embedding's
        # backward is (bitwise equal to it at 1 thread, and ~3x faster; tests/test_model.py)
        x = F.embedding(tokens, self.W_E)  # (B, T, D)
        pos = None
        if self.cfg.positional == "learned":
            x = x + self.W_pos[:T]
        elif self.cfg.positional == "shortformer":
            pos = self.W_pos
        x = self._hook("hook_embed", x)
        for l, block in enumerate(self.blocks):
            x = self._hook(f"blocks.{l}.hook_resid_pre", x)
            x = block(x, pos)
        x = self._hook("hook_resid_final", x)
        return self.ln_final(x)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; with reduction='none' returns (B, T-1) per-token losses."""
    B, T, V = logits.shape
    # every position is scored against the next token and the last one is ignored (-100): slicing
    # off the last position instead copies the logits (measured ~3% of a laptop training step)
    target = torch.cat([tokens[:, 1:], tokens.new_full((B, 1), -100)], 1)
    loss = F.cross_entropy(logits.reshape(-1, V).float(), target.reshape(-1), reduction=reduction)
    return loss.view(B, T)[:, :-1] if reduction == "none" else loss


# rows of logits per chunk of linear_cross_entropy: 256 x 2048 fp32 logits (2 MB) stay in a core's
# L2 cache between the matmul, the log-softmax and the gradient (chunks of 128-512 measured alike)
CE_CHUNK_ROWS = 256
# rows per chunk of the training loss where its softmax step is the fused kernel (bf16 on a CPU with
# AVX-512): bf16 logits overwritten by their gradient, a 4 MB buffer at 1,024 rows. Larger than L2,
# and still faster than 256 rows (x1.036 attn2, x1.025 attn3, x1.055 d256 interleaved; 2,048 rows no
# better): a quarter of the chunks, so of the calls and of the products' small-M overhead
# (benchmarks/cpu_trainer.md, "Fifteenth pass"). Not bit for bit the 256-row chunks: W's gradient is
# summed over fewer chunks (one bf16 product each) and the loss over fewer partial sums
CE_FUSED_CHUNK_ROWS = 1024


@torch.no_grad()
def token_losses(h: torch.Tensor, W_U: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T-1) fp32 per-token losses of the logits ``h @ W_U`` (h: (B, T, d_model), the final
    normalised residual), bitwise equal to ``loss_fn(h @ W_U, tokens, reduction="none")`` (tested)
    but computed :data:`CE_CHUNK_ROWS` rows at a time, so no (tokens x vocab) logits, fp32 copy or
    log-softmax output is stored whole. For evaluation (no gradient): the snapshot metrics and the
    ablations spent about half their time in one log-softmax over 2048 x 2048 fp32 logits, which
    runs several times slower per row than over chunks that stay in cache (benchmarks/cpu_trainer.md).
    Under autocast the matmul runs in its dtype, as ``h @ W_U`` would."""
    B, T, D = h.shape
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, W_U = h.to(dtype), W_U.to(dtype)
    rows = h.reshape(B * T, D)
    # the target of a window's last position is a placeholder (its loss is dropped below)
    targets = torch.cat([tokens[:, 1:], tokens[:, :1]], 1).reshape(B * T, 1)
    out = torch.empty(B * T, dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, B * T, CE_CHUNK_ROWS):
            logp = torch.log_softmax(lowp_matmul(rows[s:s + CE_CHUNK_ROWS], W_U).float(), -1)
            out[s:s + CE_CHUNK_ROWS] = logp.gather(1, targets[s:s + CE_CHUNK_ROWS]).squeeze(1).neg_()
    return out.view(B, T)[:, :-1]


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits ``h @ W`` against ``targets``, with both its gradients
    computed in the forward pass, one chunk of rows at a time (the fused "linear + cross-entropy"
    of Liger-Kernel and Apple's cut-cross-entropy, which are Triton kernels for GPUs; here plain
    torch ops that run on the CPU): a chunk's fp32 log-probabilities and its logit gradient
    ``(softmax - onehot) / N`` live only in cache, where they go straight into the chunk's share of
    the residual's gradient (``g @ W.T``) and of W's (``h.T @ g``, summed over chunks in fp32).
    Nothing of size (N, V) is stored: the unfused loss materialised the logits, an fp32 copy, the
    log-softmax output, a zero-filled NLL gradient and the log-softmax backward (about half of a
    laptop training step for 2048 x 2048 logits), and the previous version of this function the
    (N, V) logit gradient, which the compiled backward glued back together from its chunks in a
    scalar loop (~10% of the step; benchmarks/cpu_trainer.md)."""

    @staticmethod
    def forward(ctx, h, W, targets):
        n = h.shape[0]
        want_h, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 log-softmax of bf16 logits
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h, grad_W, W_t = [], None, W.t()
        # training in bf16 on a CPU with AVX-512: the softmax step in one pass per row
        # (icl_core.fused_attention.softmax_cross_entropy_grad; benchmarks/cpu_trainer.md, "Tenth pass")
        fused = (want_h or want_W) and fused_attention.cross_entropy_usable(h, W)
        chunk = CE_FUSED_CHUNK_ROWS if fused else CE_CHUNK_ROWS
        minus_one = None if fused else torch.full((min(chunk, n), 1), -1.0, dtype=acc, device=h.device)
        for s in range(0, n, chunk):
            tgt, rows = targets[s:s + chunk, None], h[s:s + chunk]
            if fused:
                # the chunk's logits overwritten by their gradient: one (rows, V) buffer in cache between
                # the three products, not two (x1.025 attn2, x1.013 attn3 interleaved; cpu_trainer.md,
                # "Fourteenth pass"); the same bits as softmax_cross_entropy_grad
                g = lowp_matmul(rows, W)
                total += fused_attention.softmax_cross_entropy_grad_(g, tgt[:, 0], 1.0 / n)
            else:
                logp = torch.log_softmax(lowp_matmul(rows, W).to(acc), -1)  # (rows, V)
                total -= logp.gather(1, tgt).sum()
                if not (want_h or want_W):
                    continue
                p = logp.exp_()  # softmax, in place
                p.scatter_add_(1, tgt, minus_one[: len(tgt)])  # softmax - onehot
                g = p.mul_(1.0 / n).to(h.dtype)  # the logits' gradient, in the matmuls' dtype
            if want_h:
                grad_h.append(lowp_matmul(g, W_t))
            if want_W:
                part = lowp_matmul(rows.t(), g).to(acc)
                grad_W = part if grad_W is None else grad_W + part
        ctx.save_for_backward(torch.cat(grad_h) if want_h else None,
                              grad_W.to(W.dtype) if want_W else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        # eager on the CPU, skip the pass over the gradients for the usual loss.backward(); compiled,
        # always scale (reading the value would break the graph) and let inductor fuse it
        if torch.compiler.is_compiling() or grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            grad_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
            grad_W = None if grad_W is None else grad_W * grad_out.to(grad_W.dtype)
        return grad_h, grad_W, None


def linear_cross_entropy(h: torch.Tensor, W_U: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits ``h @ W_U`` (h: (B, T, d_model), tokens (B, T)),
    every position but the last scored against the next token: the same value as
    ``loss_fn(h @ W_U, tokens)`` (fp32 log-softmax of the logits in the matmul's dtype) without
    materialising the logits. Under autocast the matmuls run in its dtype, as ``h @ W_U`` would."""
    B, T, D = h.shape
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, W_U = h.to(dtype), W_U.to(dtype)
    rows = h[:, :-1].reshape(B * (T - 1), D)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(rows, W_U, tokens[:, 1:].reshape(-1))

"""The paper's metrics (../shared/PAPER.md), all heads at once; per-head results are (n_layers, n_heads).

Behavioural: :func:`per_token_losses`, :func:`icl_score`,
:func:`loss_pca`, :func:`before_after_projection`.
Head activity: :func:`prefix_matching_scores`, :func:`previous_token_scores`, :func:`copying_scores`.
Weights: :func:`ov_eigen_copying_scores`, :func:`k_composition_traces`, :func:`composition_scores`.
Ablations: :func:`ablation_effects` (full and pattern-preserving).
Head classes and a run's window (thresholds, top heads) are in :mod:`icl_core.heads`; curve maths
over training (the phase-change window rule, smoothing in log tokens, the bump) in :mod:`icl_core.curves`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from . import hooks as H
from .config import icl_indices
from .model import Transformer


def _autocast(model: Transformer, precision: str):
    if precision == "bf16":
        dev = next(model.parameters()).device.type
        return torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- behaviour ---------------------------------------------------------------------------------

# [book choice] windows per forward pass when evaluating. Measured on the laptop's 3-layer model,
# bf16, 1 thread: 8 windows per pass are ~1.5x faster than 32 (the fp32 logits and attention
# scores of 8 windows stay in the CPU's cache); 4 are slower again.
EVAL_BATCH = 8
# on a GPU a pass of 8 windows is launch-bound; passes of 64 fill it (benchmarks/gpu_bench.py)
EVAL_BATCH_CUDA = 64


def eval_batch(device: torch.device | str) -> int:
    """Windows per evaluation pass on ``device``: EVAL_BATCH on the CPU, EVAL_BATCH_CUDA on a GPU."""
    return EVAL_BATCH if torch.device(device).type == "cpu" else EVAL_BATCH_CUDA


@torch.no_grad()
def per_token_losses(model: Transformer, tokens: torch.Tensor, batch_size: int | None = None,
                     precision: str = "fp32", head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T-1) per-token loss l_n(i) = -log p(x_i | x_<i); column c is the token at 0-based position c+1.
    ``batch_size``: windows per pass (default :func:`eval_batch` of the model's device)."""
    model.eval()
    dev = next(model.parameters()).device
    batch_size = batch_size or eval_batch(dev)
    out = []
    for i in range(0, len(tokens), batch_size):
        x = tokens[i:i + batch_size].to(dev)
        ctx = H.zero_heads(model, head_mask) if head_mask is not None else contextlib.nullcontext()
        with ctx, _autocast(model, precision):
            out.append(model.token_losses(x).cpu())
    return torch.cat(out)


# [book choice] sequences per forward pass in ablations (windows x ablations repeated in one batch).
# Measured on the laptop's 3-layer model, 1 thread, 16 windows x 13 ablations: 13 sequences per pass
# were 2.0x faster than 52 in fp32 and 1.3x in bf16 (smaller passes stay in the CPU's cache).
ABLATION_SEQS_PER_PASS = 16


# the previous-token score is measured on the first this-many evaluation windows, in training
# (train.cheap_metrics) and in the chapters (analysis.head_scores reuses the logged values)
PREV_TOKEN_WINDOWS = 32


@torch.no_grad()
def losses_and_previous_token_scores(model: Transformer, tokens: torch.Tensor, n_prev: int = PREV_TOKEN_WINDOWS,
                                     batch_size: int | None = None, precision: str = "fp32"):
    """:func:`per_token_losses` on ``tokens`` and :func:`previous_token_scores` on its first ``n_prev``
    windows from one pass (the patterns are cached while those windows' losses are computed), so a
    snapshot's cheap metrics run the model over the eval set once, not twice."""
    model.eval()
    dev = next(model.parameters()).device
    batch_size = batch_size or eval_batch(dev)
    n_prev = max(1, min(n_prev, len(tokens)))
    losses, pt_sum = [], 0.0
    for i in range(0, n_prev, batch_size):
        x = tokens[i:min(i + batch_size, n_prev)].to(dev)
        with H.cache_patterns(model) as c, _autocast(model, precision):
            losses.append(model.token_losses(x).cpu())
        # the score is a mean over windows and positions: sum each batch's mean, weighted by its size
        pt_sum = pt_sum + previous_token_scores_from_patterns(H.stack_patterns(model, c).float()) * len(x)
    if len(tokens) > n_prev:
        losses.append(per_token_losses(model, tokens[n_prev:], batch_size, precision))
    return torch.cat(losses), pt_sum / n_prev


def icl_score_from_losses(losses: torch.Tensor, n_ctx: int | None = None,
                          indices: tuple[int, int] | None = None, band: bool = False) -> float:
    """mean_n [l_n(late) - l_n(early)] (nats; negative = in-context learning). [book choice] sign.

    ``indices`` are 1-based text-token indices (default :func:`icl_indices`: 500 and 50, rescaled
    for contexts shorter than 512). Text token i sits at column i-1 (column 0 follows the BOS).
    ``band=True`` gives the lower-variance banded estimate (:func:`icl_band_score`).
    """
    if band:
        return icl_band_score(losses, n_ctx)
    late, early = indices or icl_indices(n_ctx if n_ctx is not None else losses.shape[1] + 1)
    if late > losses.shape[1] or early < 1:
        raise ValueError(f"ICL indices ({late}, {early}) do not fit losses of length {losses.shape[1]}")
    return float((losses[:, late - 1] - losses[:, early - 1]).mean())


def icl_band_widths(n_ctx: int) -> tuple[int, int]:
    """Half-widths of the bands :func:`icl_band_score` averages over: late +- 2% of n_ctx, early +-
    10% of the early index (each >= 1)."""
    _, early = icl_indices(n_ctx)
    return max(1, round(0.02 * n_ctx)), max(1, round(0.1 * early))


def icl_band_score(losses: torch.Tensor, n_ctx: int | None = None) -> float:
    """A lower-variance ICL estimate: mean loss over a band of indices around the late index minus
    the mean over a band around the early one. [book choice] (with a few hundred evaluation
    windows, single-index ICL is noisy; the paper had
    10,000: with 256 windows a handful of high-loss tokens at exactly index 250 or 25 can move
    the single-index score by 0.4 nats, and they stay in the fixed evaluation set at every
    snapshot). The book's curves and tables use this estimate and call it the ICL score; the
    single-index value is kept beside it as ``icl_single``.

    Bands: late +- 2% of n_ctx (clipped to the context), early +- 10% of the early index (>= 1).
    """
    n_ctx = n_ctx if n_ctx is not None else losses.shape[1] + 1
    late, early = icl_indices(n_ctx)
    wl, we = icl_band_widths(n_ctx)
    lo_l, hi_l = max(early + we + 1, late - wl), min(losses.shape[1], late + wl)
    lo_e, hi_e = max(1, early - we), early + we
    return float(losses[:, lo_l - 1:hi_l].mean() - losses[:, lo_e - 1:hi_e].mean())


def icl_score(model: Transformer, tokens: torch.Tensor, **kw) -> float:
    return icl_score_from_losses(per_token_losses(model, tokens, **kw), model.cfg.n_ctx)


# --- head activity -----------------------------------------------------------------------------

@torch.no_grad()
def attention_patterns(model: Transformer, tokens: torch.Tensor, batch_size: int = 32,
                       precision: str = "fp32"):
    """Yield (batch tokens, patterns (B, L, H, T, T)) over ``tokens``."""
    model.eval()
    dev = next(model.parameters()).device
    for i in range(0, len(tokens), batch_size):
        x = tokens[i:i + batch_size].to(dev)
        with H.cache_patterns(model) as c, _autocast(model, precision):
            model.residual(x)  # the patterns are all that is kept: no logits
        yield x, H.stack_patterns(model, c).float()


def prefix_matching_mask(tokens: torch.Tensor, first_query: int) -> torch.Tensor:
    """(B, T, T) bool: key k for query q is on the induction stripe if token[k-1] == token[q], k <= q.

    Only queries at positions >= ``first_query`` count (the paper: queries in repeats 2-4).
    """
    B, T = tokens.shape
    prev = torch.cat([torch.full((B, 1), -1, dtype=tokens.dtype, device=tokens.device), tokens[:, :-1]], 1)
    m = tokens[:, :, None] == prev[:, None, :]  # (B, q, k)
    m &= torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()[None]
    m[:, :first_query] = False
    return m


def prefix_matching_scores_from_patterns(patterns: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """patterns (B, L, H, T, T), tokens (B, T) of BOS + repeated random sequence -> (L, H)."""
    mask = prefix_matching_mask(tokens, 1 + seq_len).to(patterns.dtype)  # (B, T, T)
    per_query = (patterns * mask[:, None, None]).sum(-1)  # (B, L, H, T)
    q = slice(1 + seq_len, tokens.shape[1])
    return per_query[..., q].mean(dim=(0, 3))


def prefix_matching_scores(model: Transformer, rep_tokens: torch.Tensor, seq_len: int, **kw) -> torch.Tensor:
    """Paper's prefix-matching score per head (L, H), in [0, 1], on repeated random tokens."""
    tot, n = 0, 0
    for x, pat in attention_patterns(model, rep_tokens, **kw):
        tot = tot + prefix_matching_scores_from_patterns(pat, x, seq_len) * len(x)
        n += len(x)
    return tot / n


def previous_token_scores_from_patterns(patterns: torch.Tensor) -> torch.Tensor:
    """Mean attention A[i, i-1] over positions i >= 1 -> (L, H)."""
    d = torch.diagonal(patterns, offset=-1, dim1=-2, dim2=-1)  # (B, L, H, T-1)
    return d.mean(dim=(0, 3))


def previous_token_scores(model: Transformer, tokens: torch.Tensor, **kw) -> torch.Tensor:
    """Previous-token score per head (L, H): mean A[i, i-1] on real text."""
    tot, n = 0, 0
    for x, pat in attention_patterns(model, tokens, **kw):
        tot = tot + previous_token_scores_from_patterns(pat) * len(x)
        n += len(x)
    return tot / n


@torch.no_grad()
def copying_scores(model: Transformer, rep_tokens: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Empirical copying score per head (L, H), in [-1, 1]. [book choice] (the paper under-specifies it).

    For each head and each query position we take the head's direct-path output (its per-head
    result, passed through the final LayerNorm's scale as a linear map and W_U), mean-centre the
    logits over the vocabulary and ReLU them. Let a = mean boost on the tokens the head attends to
    (weighted by attention) and b = mean boost over all tokens of the sequence. The score is
    (a - b) / (a + b) in [-1, 1]: 1 when the head raises only the tokens it attends to.
    """
    model.eval()
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    tot = torch.zeros(n_layers, n_heads)
    n = 0
    W_U = model.W_U.float()
    for i in range(0, len(rep_tokens), batch_size):
        x = rep_tokens[i:i + batch_size]
        names = H.pattern_names(model) + H.result_names(model)
        with H.cache(model, names) as c:
            model(x)
        for l in range(n_layers):
            pat = c[f"blocks.{l}.attn.hook_pattern"].float()  # (B, H, T, T)
            res = c[f"blocks.{l}.attn.hook_result"].float()  # (B, T, H, D)
            if model.cfg.layer_norm:
                res = res * model.ln_final.w.float()
            logits = torch.einsum("bthd,dv->bthv", res, W_U)
            logits = torch.relu(logits - logits.mean(-1, keepdim=True))  # (B, T, H, V)
            idx = x[:, None, :].expand(-1, x.shape[1], -1)  # (B, Tq, Tk) token ids of keys
            g = torch.gather(logits, 3, idx[:, :, None, :].expand(-1, -1, n_heads, -1))  # (B, Tq, H, Tk)
            a = (g * pat.permute(0, 2, 1, 3)).sum(-1)  # attention-weighted boost of attended tokens
            causal = torch.ones(x.shape[1], x.shape[1]).tril()
            b = (g * causal[None, :, None, :]).sum(-1) / causal.sum(-1)[None, :, None]
            s = (a - b) / (a + b + 1e-9)
            tot[l] += s[:, 1:].mean(dim=(0, 1)) * len(x)
        n += len(x)
    return tot / n


# --- weights -------------------------------------------------------------------------------------

@torch.no_grad()
def ov_circuits(model: Transformer, layer: int, tokens=None) -> torch.Tensor:
    """(H, d_vocab, d_vocab) full OV circuits W_E W_V W_O W_U in the direct path (LayerNorms ignored);
    with ``tokens``, only their rows: (H, N, d_vocab)."""
    a = model.blocks[layer].attn
    WE, WU = model.W_E.float(), model.W_U.float()
    if tokens is not None:
        WE = WE[torch.as_tensor(tokens, dtype=torch.long)]
    WOV = torch.einsum("hmd,hdn->hmn", a.W_V.float(), a.W_O.float())  # (H, D, D)
    return torch.einsum("vm,hmn,nw->hvw", WE, WOV, WU)


@torch.no_grad()
def ov_eigen_copying_scores(model: Transformer) -> torch.Tensor:
    """Paper's OV eigenvalue score sum(lambda)/sum(|lambda|) of W_E W_V W_O W_U, per head (L, H).

    The nonzero eigenvalues of W_E (W_V W_O W_U) equal those of the small d_model x d_model matrix
    (W_V W_O W_U) W_E, so we never form the vocab x vocab matrix.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = torch.zeros(n_layers, n_heads)
    WE, WU = model.W_E.double(), model.W_U.double()
    for l in range(n_layers):
        a = model.blocks[l].attn
        for h in range(n_heads):
            M = a.W_V[h].double() @ a.W_O[h].double() @ WU @ WE  # (D, D), same nonzero spectrum
            ev = torch.linalg.eigvals(M)
            out[l, h] = float(ev.real.sum() / ev.abs().sum())
    return out


@torch.no_grad()
def eigen_score(M: torch.Tensor) -> float:
    """sum(lambda)/sum(|lambda|) for a square matrix."""
    ev = torch.linalg.eigvals(M.double())
    return float(ev.real.sum() / ev.abs().sum())


@torch.no_grad()
def k_composition_traces(model: Transformer, prev_scores: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """QK K-composition trace per head of layer >= 1 (L, H); layer 0 is NaN.

    W = sum_e p(e) W_E W_Q^h (W_E W_OV^e W_K^h)^T (V x V; entry (a, b): how much a query on token a
    attends to a key whose previous token is b, through head e), over earlier heads e weighted by
    their previous-token scores p(e); score tr(W) (= sum of eigenvalues). Positive for induction heads. With ``normalise`` we divide by sum |lambda| of
    W (the eigenvalue-ratio form, in [-1, 1]) so heads and snapshots compare.
    Computed on the d_model-sized equivalent so that no vocab x vocab matrix is formed.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = torch.full((n_layers, n_heads), float("nan"))
    WE = model.W_E.double()
    G = WE.T @ WE  # (D, D): W_E^T W_E
    for l in range(1, n_layers):
        a = model.blocks[l].attn
        for h in range(n_heads):
            # tr(W_E W_Q (W_E W_OV W_K)^T) = tr(W_Q K^T W_OV^T W_E^T W_E) with the D x D Gram matrix
            M = torch.zeros(WE.shape[1], WE.shape[1], dtype=torch.float64)
            for le in range(l):
                ae = model.blocks[le].attn
                for e in range(n_heads):
                    ov = ae.W_V[e].double() @ ae.W_O[e].double()  # (D, D)
                    M += float(prev_scores[le, e]) * (ov @ a.W_K[h].double() @ a.W_Q[h].double().T)
            # W = W_E W_Q (W_E OV W_K)^T = W_E [W_Q W_K^T OV^T] W_E^T ; nonzero spectrum of
            # [W_Q W_K^T OV^T] W_E^T W_E = (M)^T G
            core = M.T @ G
            ev = torch.linalg.eigvals(core)
            tr = ev.real.sum()
            out[l, h] = float(tr / ev.abs().sum()) if normalise else float(tr)
    return out


@torch.no_grad()
def composition_scores(model: Transformer) -> dict[str, torch.Tensor]:
    """Q/K/V composition scores ||W_A W_B||_F / (||W_A||_F ||W_B||_F) between every head of layer
    l1 < l2: dict kind -> (L, H, L, H) with NaN where undefined (Elhage et al. 2021).

    Row-vector convention (x @ W): W_A = W_OV = W_V W_O of the earlier head; the later head reads
    x W_OV through its query side for Q-composition (W_B = W_QK = W_Q W_K^T), its key side for
    K-composition (W_B = W_QK^T) and its value side for V-composition (W_B = W_OV)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = {k: torch.full((n_layers, n_heads, n_layers, n_heads), float("nan")) for k in "QKV"}
    OV = [[(b.attn.W_V[h] @ b.attn.W_O[h]).double() for h in range(n_heads)] for b in model.blocks]
    QK = [[(b.attn.W_Q[h] @ b.attn.W_K[h].T).double() for h in range(n_heads)] for b in model.blocks]
    for l1 in range(n_layers):
        for h1 in range(n_heads):
            A = OV[l1][h1]
            for l2 in range(l1 + 1, n_layers):
                for h2 in range(n_heads):
                    for k, B in (("Q", QK[l2][h2]), ("K", QK[l2][h2].T), ("V", OV[l2][h2])):
                        out[k][l1, h1, l2, h2] = float((A @ B).norm() / (A.norm() * B.norm()))
    return out


def composition_baseline(d_model: int, d_head: int, n: int = 200, seed: int = 0) -> float:
    """Mean composition score of random rank-d_head matrices (the paper's baseline)."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n):
        A = torch.randn(d_model, d_head, generator=g) @ torch.randn(d_head, d_model, generator=g)
        B = torch.randn(d_model, d_head, generator=g) @ torch.randn(d_head, d_model, generator=g)
        vals.append(float((A @ B).norm() / (A.norm() * B.norm())))
    return float(np.mean(vals))


# --- ablations -----------------------------------------------------------------------------------

def single_head_masks(n_layers: int, n_heads: int, heads: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """(len(heads), L, H) bool masks, one head per mask (default: every head, in (layer, head) order)."""
    heads = heads if heads is not None else [(l, h) for l in range(n_layers) for h in range(n_heads)]
    masks = torch.zeros(len(heads), n_layers, n_heads, dtype=torch.bool)
    for i, (l, h) in enumerate(heads):
        masks[i, l, h] = True
    return masks


@torch.no_grad()
def ablation_losses(model: Transformer, tokens: torch.Tensor, heads: list[tuple[int, int]] | None = None,
                    pattern_preserving: bool = True, batch_size: int = 16,
                    masks: torch.Tensor | None = None, precision: str = "fp32") -> torch.Tensor:
    """Per-token losses with each ablation applied, (n_ablations, N, T-1).

    Each ablation zeroes a set of heads' outputs at test time. By default one ablation per head
    (``heads``: all heads). ``masks`` (n_ablations, L, H) gives arbitrary sets instead.
    Full ablation: everything downstream recomputes. Pattern-preserving (the paper's main table):
    every attention pattern is forced to the one cached from the clean run.
    All ablations of a batch run in one forward pass (the batch is repeated per ablation).
    ``precision`` bf16 runs the clean and ablated passes under bf16 autocast (losses in fp32).
    """
    model.eval()
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if masks is None:
        masks = single_head_masks(n_layers, n_heads, heads)
    A = len(masks)
    out = torch.empty(A, len(tokens), tokens.shape[1] - 1)
    step = max(1, batch_size)
    for i in range(0, len(tokens), step):
        x = tokens[i:i + step]
        B = len(x)
        pats = None
        if pattern_preserving:
            with H.cache_patterns(model) as c, _autocast(model, precision):
                model.residual(x)
            pats = H.stack_patterns(model, c)  # (B, L, H, T, T)
        xr = x.repeat(A, 1)  # (A*B, T): ablation-major
        m = masks.repeat_interleave(B, 0)  # (A*B, L, H)
        ctx = [H.zero_heads(model, m), _autocast(model, precision)]
        if pattern_preserving:
            ctx.append(H.force_patterns(model, pats.repeat(A, 1, 1, 1, 1)))
        with contextlib.ExitStack() as st:
            for cm in ctx:
                st.enter_context(cm)
            out[:, i:i + B] = model.token_losses(xr).view(A, B, -1)
    return out


@dataclass
class AblationResult:
    clean: torch.Tensor  # (N, T-1) clean per-token losses
    clean_icl: float
    delta_icl: torch.Tensor  # (L, H) ablated ICL - clean ICL (positive = ablation removes ICL)
    delta_loss: torch.Tensor  # (L, H) mean loss change
    losses: torch.Tensor  # (L*H, N, T-1)


def ablation_effects(model: Transformer, tokens: torch.Tensor, pattern_preserving: bool = True,
                     batch_size: int = 16, precision: str = "fp32") -> AblationResult:
    """Per-head change in ICL score and loss when that head alone is ablated."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    # the clean losses come from the same batched pass, as the ablation of no head: under bf16 the
    # hooked path rounds differently from a plain forward, and the deltas must not carry that offset
    masks = torch.cat([torch.zeros(1, n_layers, n_heads, dtype=torch.bool), single_head_masks(n_layers, n_heads)])
    both = ablation_losses(model, tokens, masks=masks, pattern_preserving=pattern_preserving,
                           batch_size=batch_size, precision=precision)
    clean, abl = both[0], both[1:]
    c_icl = icl_score_from_losses(clean, model.cfg.n_ctx, band=True)
    d_icl = torch.tensor([icl_score_from_losses(a, model.cfg.n_ctx, band=True) - c_icl for a in abl]).view(n_layers, n_heads)
    d_loss = (abl.mean(dim=(1, 2)) - clean.mean()).view(n_layers, n_heads)
    return AblationResult(clean, c_icl, d_icl, d_loss, abl)


# --- training-dynamics analyses --------------------------------------------------------------------

def sample_token_positions(n_examples: int, n_positions: int, seed: int = 0) -> np.ndarray:
    """One random loss column per eval example (fixed across models): the paper's PCA sample."""
    return np.random.default_rng(seed).integers(0, n_positions, size=n_examples)


def loss_vectors(losses: torch.Tensor, positions: np.ndarray) -> np.ndarray:
    """Pick one (example, position) per example: (N,) loss vector of one snapshot."""
    return losses[torch.arange(len(positions)), torch.as_tensor(positions)].numpy()


def loss_pca(vectors: dict[str, np.ndarray], n_components: int = 2):
    """Fit one PCA on the stacked per-token-loss vectors of all snapshots of all models.

    vectors: model name -> (n_snapshots, N). Returns (pca, {name: (n_snapshots, n_components)}).
    """
    from sklearn.decomposition import PCA

    X = np.concatenate(list(vectors.values()))
    pca = PCA(n_components=n_components).fit(X)
    return pca, {k: pca.transform(v) for k, v in vectors.items()}


def before_after_vector(loss_start: np.ndarray, loss_end: np.ndarray, centred: bool = False) -> np.ndarray:
    """u = normalise(L_end - L_start) across the phase change. ``centred``: the mean change is
    subtracted first, so a loss that falls everywhere by the same amount (the global loss shift of
    the window) has no component along u, and only *which* tokens improved more than average counts."""
    d = np.asarray(loss_end, dtype=np.float64) - np.asarray(loss_start, dtype=np.float64)
    if centred:
        d = d - d.mean()
    n = np.linalg.norm(d)
    if n == 0:
        raise ValueError("loss vectors before and after are identical; no before-and-after direction")
    return d / n


def global_shift_share(loss_start: np.ndarray, loss_end: np.ndarray) -> float:
    """The share of the squared length of L_end - L_start that is its mean (a uniform loss shift):
    N * mean^2 / |d|^2, 1 when every token changed by the same amount, 0 when the change averages out."""
    d = np.asarray(loss_end, dtype=np.float64) - np.asarray(loss_start, dtype=np.float64)
    return float(len(d) * d.mean() ** 2 / max(float(d @ d), 1e-300))


def before_after_projection(u: np.ndarray, clean: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """u . (L_ablated - L_clean) for each ablation (rows of ``ablated``); negative for induction heads
    (ablating them moves the loss back against the direction training took)."""
    return (np.asarray(ablated) - np.asarray(clean)[None]) @ u

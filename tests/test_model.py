"""Model and hooks: known answers, not pinned floats."""
import contextlib

import pytest
import torch

from icl_core import hooks as H
from icl_core import model as model_module
from icl_core.model import Transformer, linear_cross_entropy, loss_fn, token_losses
from icl_core.config import ModelConfig
from tests.conftest import tiny_model


@pytest.mark.parametrize("positional", ["learned", "shortformer", "rope", "none"])
@pytest.mark.parametrize("attn_only", [True, False])
def test_explicit_path_equals_sdpa(positional, attn_only):
    m = tiny_model(positional=positional, attn_only=attn_only)
    x = torch.randint(0, 50, (3, 40))
    fast = m(x)
    with H.cache_patterns(m) as c:
        slow = m(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    pat = H.stack_patterns(m, c)
    assert pat.shape == (3, 2, 2, 40, 40)
    assert torch.allclose(pat.sum(-1), torch.ones(3, 2, 2, 40), atol=1e-5)
    assert (pat.triu(1) == 0).all()  # causal


@pytest.mark.parametrize("positional", ["shortformer", "rope"])
def test_attention_biases_on_every_path(positional):
    """b_Q, b_K, b_V, b_O (GPT-2 / TransformerLens): the SDPA path, the explicit path and the
    per-head results (which exclude b_O, as in TransformerLens) agree, and the biases are used."""
    m = tiny_model(positional=positional, attn_bias=True)
    with torch.no_grad():
        for b in m.blocks:
            b.attn.b_qkv.normal_(0, 0.5); b.attn.b_O.normal_(0, 0.5)
    x = torch.randint(0, 50, (3, 40))
    fast = m(x)
    with H.cache(m, H.result_names(m)) as c:
        slow = m(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert m.blocks[0].attn.b_Q.shape == (2, 16) and m.blocks[0].attn.b_O.shape == (32,)
    plain = tiny_model(positional=positional)
    assert not torch.allclose(fast, plain(x), atol=1e-3)
    with H.zero_heads(m, torch.ones(2, 2, dtype=torch.bool)):
        zeroed = m(x)  # every head removed: only b_O (a constant) is left of attention
    assert not torch.allclose(zeroed, fast, atol=1e-3)


def test_weight_shapes_follow_transformer_lens():
    m = tiny_model(d_model=32, n_heads=4)
    a = m.blocks[0].attn
    assert a.W_Q.shape == a.W_K.shape == a.W_V.shape == (4, 32, 8)
    assert a.W_O.shape == (4, 8, 32)
    assert m.W_E.shape == (50, 32) and m.W_U.shape == (32, 50)


def test_per_head_results_sum_to_attention_output():
    m = tiny_model()
    x = torch.randint(0, 50, (2, 20))
    with H.cache(m, H.result_names(m)) as c:
        out = m(x)
    assert c["blocks.0.attn.hook_result"].shape == (2, 20, 2, 32)
    assert torch.allclose(out, m(x), atol=1e-5)


def test_smeared_keys_with_sigmoid_one_equal_vanilla():
    van = tiny_model()
    sm = tiny_model(smeared_keys=True)
    sd = {k: v for k, v in van.state_dict().items()}
    missing = sm.load_state_dict(sd, strict=False).missing_keys
    assert all("alpha" in k for k in missing) and missing
    for b in sm.blocks:
        b.attn.alpha.data.fill_(100.0)  # sigmoid(100) == 1 in float32
    x = torch.randint(0, 50, (2, 30))
    assert torch.allclose(van(x), sm(x), atol=1e-6)


def test_smeared_keys_formula():
    sm = tiny_model(smeared_keys=True, n_layers=1)
    a = sm.blocks[0].attn
    a.alpha.data = torch.tensor([0.0, 1.0])
    k = torch.randn(1, 2, 5, 16)
    out = a.smear(k)
    s = torch.sigmoid(a.alpha.data)
    assert torch.equal(out[:, :, 0], k[:, :, 0])  # first key unchanged
    for h in range(2):
        assert torch.allclose(out[0, h, 1:], s[h] * k[0, h, 1:] + (1 - s[h]) * k[0, h, :-1])


def test_zero_no_heads_changes_nothing():
    m = tiny_model()
    x = torch.randint(0, 50, (2, 30))
    base = loss_fn(m(x), x)
    with H.zero_heads(m, torch.zeros(2, 2, dtype=torch.bool)):
        same = loss_fn(m(x), x)
    assert abs(float(base - same)) < 1e-6


def test_batched_head_masks_equal_separate_runs():
    m = tiny_model()
    x = torch.randint(0, 50, (1, 30))
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 1, 1] = True
    masks[2, 0, 1] = masks[2, 1, 0] = True
    with H.zero_heads(m, masks):
        batched = m(x.repeat(3, 1))
    for i in range(3):
        with H.zero_heads(m, masks[i]):
            assert torch.allclose(batched[i], m(x)[0], atol=1e-5)


def test_force_patterns_to_clean_ones_changes_nothing():
    m = tiny_model()
    x = torch.randint(0, 50, (2, 25))
    with H.cache_patterns(m) as c:
        clean = m(x)
    with H.force_patterns(m, H.stack_patterns(m, c)):
        forced = m(x)
    assert torch.allclose(clean, forced, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kw", [dict(positional="rope"), dict(positional="shortformer", attn_only=False),
                                dict(smeared_keys=True, positional="rope")])
def test_forced_patterns_skip_the_scores_bitwise(precision, kw):
    """Forcing patterns skips the scores and softmax; the output is bit for bit what replacing the
    softmax's output with a hook gives (the earlier implementation), with heads zeroed as in the
    pattern-preserving ablations; the forced patterns are gone after the block."""
    m = tiny_model(**kw)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 50, (3, 30), generator=g)
    other = torch.randint(0, 50, (3, 30), generator=g)  # patterns of another input: forcing must matter
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    mask = torch.zeros(m.cfg.n_layers, m.cfg.n_heads, dtype=torch.bool)
    mask[0, 1] = True
    with torch.no_grad(), ctx(), H.cache_patterns(m) as c:
        m(other)
    pats = H.stack_patterns(m, c)
    replace = {f"blocks.{l}.attn.hook_pattern": (lambda p, l=l: pats[:, l].to(p.dtype)) for l in range(m.cfg.n_layers)}
    with torch.no_grad(), ctx(), H.zero_heads(m, mask):
        with H.hooks(m, replace):
            want = m(x)
        with H.force_patterns(m, pats):
            assert m._forced_patterns
            got = m(x)
        plain = m(x)
    assert not m._forced_patterns
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_forced_patterns_of_the_wrong_shape_are_refused():
    m = tiny_model()
    with pytest.raises(ValueError, match="forced patterns have shape"):
        with H.force_patterns(m, torch.zeros(2, 3, 2, 5, 5)):
            pass
    assert not m._forced_patterns


def test_hooks_are_removed_after_context():
    m = tiny_model()
    with H.cache_patterns(m):
        assert m._hooks
    assert not m._hooks


def test_sequence_longer_than_context_is_refused():
    m = tiny_model(n_ctx=16)
    with pytest.raises(ValueError, match="n_ctx"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_rope_rotates_each_pair_by_its_positions_angle():
    """Known answer: RoPE turns the pair (x_2i, x_2i+1) at position t by t * base^(-2i/dh); the
    swap-and-signed-table form equals the rotation written out pair by pair, in fp32 and bf16."""
    from icl_core.model import apply_rope, rope_tables

    T, dh = 12, 8
    cos, sin = rope_tables(T, dh)
    x = torch.randn(2, 3, T, dh)
    ang = torch.arange(T).float()[:, None] / 10000.0 ** (torch.arange(0, dh, 2).float() / dh)
    xe, xo = x[..., 0::2], x[..., 1::2]
    want = torch.stack((xe * ang.cos() - xo * ang.sin(), xe * ang.sin() + xo * ang.cos()), -1).flatten(-2)
    assert torch.allclose(apply_rope(x, cos, sin), want, atol=1e-6)
    assert torch.equal(apply_rope(x[..., :1, :], cos, sin), x[..., :1, :])  # position 0: no turn
    # a rotation keeps each pair's length
    got = apply_rope(x, cos, sin).unflatten(-1, (dh // 2, 2)).norm(dim=-1)
    assert torch.allclose(got, x.unflatten(-1, (dh // 2, 2)).norm(dim=-1), atol=1e-5)
    xb = x.bfloat16()
    assert torch.allclose(apply_rope(xb, cos, sin).float(), want, atol=0.05)


def test_loss_fn_scores_each_position_against_the_next_token():
    logits = torch.randn(3, 7, 11)
    tokens = torch.randint(0, 11, (3, 7))
    per = loss_fn(logits, tokens, reduction="none")
    assert per.shape == (3, 6)
    want = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(per, want, atol=1e-5)
    assert torch.allclose(loss_fn(logits, tokens), want.mean(), atol=1e-6)  # the last position is not scored


@pytest.mark.parametrize("chunk", [4, 7, 1000])  # chunks that split the rows unevenly, and one chunk
def test_linear_cross_entropy_equals_the_plain_loss_and_its_gradients(chunk, monkeypatch):
    """The chunked linear + cross-entropy (the eager training loss) is loss_fn of the logits: same
    value and same gradients for the residual and W_U, whatever the chunking, and the gradient
    scales with the upstream gradient (loss * 3)."""
    monkeypatch.setattr(model_module, "CE_CHUNK_ROWS", chunk)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 9, 8, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(8, 13, generator=g, dtype=torch.float64).requires_grad_()
    tokens = torch.randint(0, 13, (3, 9), generator=g)
    want = torch.nn.functional.cross_entropy((h @ W)[:, :-1].reshape(-1, 13), tokens[:, 1:].reshape(-1))  # fp64
    want_h, want_W = torch.autograd.grad(3 * want, (h, W))
    got = linear_cross_entropy(h, W, tokens)
    got_h, got_W = torch.autograd.grad(3 * got, (h, W))
    assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got_h, want_h, atol=1e-12) and torch.allclose(got_W, want_W, atol=1e-12)
    assert got_h[:, -1].abs().max() == 0  # the last position predicts nothing


@pytest.mark.parametrize("chunk", [5, 64, 10_000])  # uneven chunks, chunks of whole windows, one chunk
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_token_losses_are_bitwise_the_losses_of_the_logits(chunk, precision, monkeypatch):
    """The evaluation's chunked per-token loss is loss_fn(model(x), reduction='none'), bit for bit,
    in fp32 and under bf16 autocast (the snapshot metrics and ablations moved to it without
    changing a logged number), on real-sized logits (vocabulary 2048). One thread, as the trainer's
    snapshot metrics run: with two, MKL's fp32 GEMM on an AVX2-only CPU (Zen 2) splits the whole
    product across the threads and sums some logits in another order than the 5-row chunks."""
    monkeypatch.setattr(model_module, "CE_CHUNK_ROWS", chunk)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = tiny_model(d_vocab=2048, d_model=64)
    x = torch.randint(0, 2048, (3, 64), generator=torch.Generator().manual_seed(2))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    try:
        with torch.no_grad(), ctx:
            want = loss_fn(m(x), x, reduction="none")
            got = token_losses(m.residual(x), m.W_U, x)
    finally:
        torch.set_num_threads(threads)
    assert got.shape == (3, 63) and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_model_training_loss_matches_logits_loss_in_fp32_and_bf16():
    """model(x, return_loss=True) is the loss of model(x); under bf16 autocast both use bf16
    matmuls and an fp32 log-softmax, so they agree to bf16 rounding of the summed terms."""
    m = tiny_model(d_vocab=50)
    x = torch.randint(0, 50, (4, 40), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(m(x, return_loss=True), loss_fn(m(x), x), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = m(x, return_loss=True)
        plain = loss_fn(m(x), x)
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, plain, atol=1e-4)
    gf = torch.autograd.grad(fused, m.W_U)[0]
    gp = torch.autograd.grad(plain, m.W_U)[0]
    assert torch.allclose(gf, gp, atol=1e-3 * gp.abs().max().item())


def test_training_gradients_are_repeatable_with_two_threads():
    """Two CPU threads must not make a training step's gradients depend on thread timing (the
    token-embedding gradient did, through W_E[tokens]'s accumulating backward). Many repeated
    tokens, so rows of W_E collect many contributions from different threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = tiny_model(d_vocab=16, n_ctx=128)
        x = torch.randint(0, 16, (16, 128), generator=torch.Generator().manual_seed(0))

        def grads():
            m.zero_grad(set_to_none=True)
            m(x, return_loss=True).backward()  # the training loss
            return {n: p.grad.clone() for n, p in m.named_parameters()}

        ref = grads()
        for _ in range(10):
            g = grads()
            assert all(torch.equal(ref[n], g[n]) for n in ref), [n for n in ref if not torch.equal(ref[n], g[n])]
    finally:
        torch.set_num_threads(old)


def test_half_split_rope_is_apply_rope_with_its_dimensions_permuted():
    """The forward pass rotates queries and keys with their dimensions in half-split order (each
    RoPE pair's even member in the first half, its odd member in the second): with the weights'
    columns and the tables permuted alike, the rotated values are bit for bit apply_rope's,
    permuted, in fp32 and bf16; the swap of halves is the swap of pairs, permuted."""
    from icl_core.model import apply_rope, half_split_order, swap_halves, swap_pairs

    m = tiny_model(positional="rope", n_layers=1)
    order = half_split_order(m.cfg.d_head)
    assert sorted(order.tolist()) == list(range(m.cfg.d_head))
    assert order[: m.cfg.d_head // 2].tolist() == list(range(0, m.cfg.d_head, 2))
    x = torch.randn(2, m.cfg.n_heads, 12, m.cfg.d_head, generator=torch.Generator().manual_seed(4))
    assert torch.equal(swap_halves(x[..., order]), swap_pairs(x)[..., order])
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        cos, sin = (t[:12].to(dtype) for t in (m.rope_cos_half, m.rope_sin_half))
        assert torch.equal(xd[..., order] * cos + swap_halves(xd[..., order]) * sin,
                           apply_rope(xd, m.rope_cos, m.rope_sin)[..., order])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kw", [{}, {"attn_bias": True}, {"smeared_keys": True}])
def test_rope_in_the_projection_gives_apply_rope_patterns(precision, kw):
    """The model's attention patterns (queries and keys in half-split order, one matmul for q, k
    and v) are those of apply_rope on x @ W_Q and x @ W_K up to the order in which each score's
    d_head products are summed: within 1e-6 in fp32 and one bf16 rounding under bf16 autocast,
    with biases and smeared keys."""
    from icl_core.model import apply_rope

    m = tiny_model(positional="rope", n_layers=1, **kw)
    x = torch.randint(0, m.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    att, cfg = m.blocks[0].attn, m.cfg
    with torch.no_grad(), ctx, H.cache(m, ["blocks.0.attn.hook_pattern"]) as c:
        m(x)
        h = m.blocks[0].ln1(_embed(m, x))
        qkv = h @ att.W_qkv.reshape(cfg.d_model, -1)
        if cfg.attn_bias:
            qkv = qkv + att.b_qkv.reshape(-1)
        qkv = qkv.view(2, 12, 3, cfg.n_heads, cfg.d_head).permute(2, 0, 3, 1, 4)  # (3, B, H, T, dh)
        q = apply_rope(qkv[0], m.rope_cos, m.rope_sin)
        k = apply_rope(qkv[1], m.rope_cos, m.rope_sin)
        if cfg.smeared_keys:
            k = att.smear(k)
        want = att._pattern(q, k, "reference")
    got = c["blocks.0.attn.hook_pattern"]
    assert got.dtype == want.dtype
    tol = 1e-6 if precision == "fp32" else 2 ** -7  # a pattern value below 1 is rounded to 2^-8 or finer
    assert (got.float() - want.float()).abs().max() <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_causal_attention_backward_is_the_derived_one(dtype):
    """causal_attention's written-out backward gives the gradients autograd derives from the
    explicit formula softmax(q k^T / sqrt(dh) + mask) v: to 1e-12 in float64; in bf16 within a
    few roundings of the float64 answer, as close as the derived bf16 gradients are. Its output
    is bit for bit the explicit formula's in both."""
    from icl_core.model import causal_attention

    g = torch.Generator().manual_seed(5)
    N, T, dh = 3, 10, 8
    q, k, v = (torch.randn(N, T, dh, generator=g, dtype=torch.float64) for _ in range(3))
    dz = torch.randn(N, T, dh, generator=g, dtype=torch.float64)
    mask = torch.full((T, T), float("-inf")).triu(1)

    def explicit(q, k, v):
        s = torch.baddbmm(mask.to(q.dtype), q * (1.0 / dh ** 0.5), k.transpose(1, 2))
        return torch.bmm(s.softmax(-1), v)

    def grads(f, dtype):
        x = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = f(*x)
        out.backward(dz.to(dtype))
        return out.detach(), [t.grad.double() for t in x]

    ref_out, ref = grads(explicit, torch.float64)
    out, got = grads(lambda *x: causal_attention(*x, mask), dtype)
    want_out, want = grads(explicit, dtype)
    assert torch.equal(out, want_out)
    for a, b, r in zip(got, want, ref):
        if dtype == torch.float64:
            assert torch.allclose(a, r, atol=1e-12, rtol=0)
        else:
            err, derived_err = (a - r).norm() / r.norm(), (b - r).norm() / r.norm()
            assert err < 0.02 and err < 2 * derived_err + 1e-3, (err, derived_err)


def _embed(m, x):
    return torch.nn.functional.embedding(x, m.W_E)


@pytest.mark.parametrize("which", ["h", "W"])
def test_linear_cross_entropy_gradient_of_one_input(which):
    """Only the gradients asked for are computed in the forward pass; each equals the plain loss's."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=which == "h")
    W = torch.randn(8, 13, generator=g, dtype=torch.float64, requires_grad=which == "W")
    tokens = torch.randint(0, 13, (2, 11), generator=g)
    hh = h.view(2, 10, 8)
    want = torch.nn.functional.cross_entropy((hh @ W)[:, :-1].reshape(-1, 13), tokens[:, 1:10].reshape(-1))
    got = linear_cross_entropy(hh, W, tokens[:, :10])
    x = h if which == "h" else W
    assert torch.allclose(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], atol=1e-12)


@pytest.mark.parametrize("kw,T", [({}, 12), ({"smeared_keys": True}, 12), ({"attn_only": False}, 12),
                                  ({"d_model": 64}, 64)])  # d_head 32, T 64: shapes the fused kernel takes
def test_unhooked_bf16_attention_is_bitwise_the_hooked_path(kw, T):
    """Under bf16 autocast on the CPU an unhooked layer runs causal_attention and a layer whose
    pattern is cached the explicit pattern path: the same losses bit for bit, so a metric read
    through hooks and the loss of the same model never disagree by rounding (evaluation never
    takes the fused training kernel)."""
    m = tiny_model(positional="rope", n_layers=2, **kw)
    x = torch.randint(0, m.cfg.d_vocab, (2, T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = m.token_losses(x)
        with H.cache(m, H.pattern_names(m)):
            hooked = m.token_losses(x)
    assert torch.equal(plain, hooked)

"""The fused CPU kernels beside the attention (icl_core/csrc): the loss's softmax step
(cross_entropy.cpp), the MLP's bias + GELU (bias_gelu.cpp) and the attention's RoPE'd inputs
(rope_qkv.cpp, and inside the attention: causal_attention.cpp's attention_qkv), against float64 and
the torch ops they replace; training takes them, evaluation not."""
import math

import pytest
import torch
import torch.nn.functional as F

from icl_core import fused_attention as fa
from icl_core import model as M

pytestmark = pytest.mark.skipif(not fa.available(), reason="no avx512_bf16 CPU or no C++ compiler: torch ops are used")


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def threads_outputs(fn, counts=(1, 1, 2)):
    """fn() under each thread count: a list of its outputs (tuples of tensors)."""
    n0 = torch.get_num_threads()
    try:
        out = []
        for n in counts:
            torch.set_num_threads(n)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(n0)


# --- the loss's softmax step -------------------------------------------------------------------
def ce_inputs(R=64, V=256, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(R, V, generator=g)).bfloat16(), torch.randint(0, V, (R,), generator=g)


def test_cross_entropy_matches_float64():
    x, t = ce_inputs()
    loss, g = fa.softmax_cross_entropy_grad(x, t, 1 / 500)
    lp = torch.log_softmax(x.double(), -1)
    want_g = lp.exp()
    want_g[torch.arange(len(t)), t] -= 1
    want_g /= 500
    assert loss.dtype == torch.float32 and loss.dim() == 0 and g.dtype == torch.bfloat16 and g.shape == x.shape
    assert abs(loss.item() + lp.gather(1, t[:, None]).sum().item()) < 1e-5 * abs(loss.item())
    assert (g.double() - want_g).abs().max() < 2 ** -8 * want_g.abs().max()  # bf16 rounding
    assert rel(g, want_g) < 3e-3


def test_cross_entropy_exponential_within_a_few_ulp():
    """The kernel's exponential (avx512_bf16.h: exp2_nonpos, 1.4 ulp) through the loss: a row of one
    0 and fifteen logits a has loss log(1 + 15 e^a) for target 0, within the fp32 rounding of the
    sum and the log (a few 1e-7) for a over [-8, 0] (an error of 3e-6 in e^a fails it: checked); 90 below the
    max a logit's term is 2^-126 rather than 0, which changes nothing."""
    a = torch.linspace(-8, 0, 997).bfloat16()
    x = a[:, None].repeat(1, 16)
    x[:, 0] = 0
    t = torch.zeros(len(a), dtype=torch.long)
    for r in range(len(a)):
        loss, _ = fa.softmax_cross_entropy_grad(x[r:r + 1], t[r:r + 1], 1.0)
        want = math.log1p(15 * math.exp(float(a[r])))
        assert abs(loss.item() - want) <= 3e-7 * want + 2.5e-7, (float(a[r]), loss.item(), want)
    far = torch.zeros(1, 16, dtype=torch.bfloat16)
    far[0, 1:] = -90.0
    loss, g = fa.softmax_cross_entropy_grad(far, t[:1], 1.0)
    assert loss.item() == 0.0 and g[0, 0].item() == 0.0 and g[0, 1:].abs().max().item() < 1e-37


def test_cross_entropy_known_answer_uniform_logits():
    """Equal logits: each row's loss is log V, the gradient (1/V - onehot) * scale."""
    V = 128
    x, t = torch.zeros(4, V, dtype=torch.bfloat16), torch.tensor([0, 5, 127, 64])
    loss, g = fa.softmax_cross_entropy_grad(x, t, 1.0)
    assert abs(loss.item() - 4 * math.log(V)) < 1e-5
    want = torch.full((4, V), 1 / V)
    want[torch.arange(4), t] -= 1
    assert torch.equal(g, want.bfloat16())


def test_cross_entropy_bitwise_repeatable_and_thread_independent():
    x, t = ce_inputs(R=256, V=512)
    outs = threads_outputs(lambda: fa.softmax_cross_entropy_grad(x, t, 1 / 255))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


def test_cross_entropy_in_place_is_the_same_bits():
    """The gradient written over the logits: the same loss and gradient, bit for bit, at 1 and 2
    threads; bad input refused in one line, the logits untouched."""
    x, t = ce_inputs(R=300, V=512)
    want = fa.softmax_cross_entropy_grad(x, t, 1 / 299)
    outs = threads_outputs(lambda: (lambda g: (fa.softmax_cross_entropy_grad_(g, t, 1 / 299), g))(x.clone()))
    for loss, g in outs:
        assert torch.equal(loss, want[0]) and torch.equal(g, want[1])
    bad = x.clone()
    with pytest.raises(RuntimeError, match="target 512 at row 3 outside \\[0, 512\\)"):
        fa.softmax_cross_entropy_grad_(bad, t.index_fill(0, torch.tensor([3]), 512), 1.0)
    assert torch.equal(bad, x)


def test_cross_entropy_bad_input_one_clear_line():
    x, t = ce_inputs()
    with pytest.raises(RuntimeError, match="target 256 at row 3 outside \\[0, 256\\)"):
        fa.softmax_cross_entropy_grad(x, t.index_fill(0, torch.tensor([3]), 256), 1.0)
    with pytest.raises(RuntimeError, match="logits must be a contiguous \\(rows, V\\) bf16 CPU tensor"):
        fa.softmax_cross_entropy_grad(x.float(), t, 1.0)
    with pytest.raises(RuntimeError, match="targets must be an int64 CPU vector"):
        fa.softmax_cross_entropy_grad(x, t.int(), 1.0)
    h = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert fa.cross_entropy_usable(h, torch.zeros(8, 96, dtype=torch.bfloat16))
    assert not fa.cross_entropy_usable(h, torch.zeros(8, 97, dtype=torch.bfloat16))  # V not a multiple of 16
    assert not fa.cross_entropy_usable(h.float(), torch.zeros(8, 96))  # fp32: the torch ops


@pytest.mark.parametrize("chunk", [100, 1024])  # uneven chunks; one chunk (the trainer's size)
def test_linear_cross_entropy_training_takes_the_kernel_evaluation_does_not(monkeypatch, chunk):
    """With gradients wanted the bf16 loss runs the kernel, CE_FUSED_CHUNK_ROWS rows a call, to the
    torch ops' value and gradients within bf16 rounding; without, the torch ops (no kernel call)."""
    monkeypatch.setattr(M, "CE_FUSED_CHUNK_ROWS", chunk)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 129, 64, generator=g).bfloat16()
    W = (0.1 * torch.randn(64, 256, generator=g)).bfloat16()
    tok = torch.randint(0, 256, (2, 129), generator=g)
    calls = []
    orig = fa.softmax_cross_entropy_grad_
    monkeypatch.setattr(fa, "softmax_cross_entropy_grad_", lambda *a: calls.append(1) or orig(*a))
    with torch.no_grad():
        l_eval = M.linear_cross_entropy(h, W, tok)
    assert calls == []
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    l_train = M.linear_cross_entropy(hg, Wg, tok)
    l_train.backward()
    n_calls = -(-256 // chunk)  # 2 x 128 scored positions
    assert len(calls) == n_calls
    monkeypatch.setattr(fa, "cross_entropy_usable", lambda *a: False)
    he, We = h.clone().requires_grad_(), W.clone().requires_grad_()
    l_torch = M.linear_cross_entropy(he, We, tok)
    l_torch.backward()
    assert len(calls) == n_calls
    assert abs(l_train.item() - l_torch.item()) < 1e-5 * l_torch.item()
    assert abs(l_eval.item() - l_torch.item()) < 1e-5 * l_torch.item()
    assert rel(hg.grad, he.grad.double()) < 1e-2 and rel(Wg.grad, We.grad.double()) < 1e-2


# --- the MLP's bias + GELU ---------------------------------------------------------------------
def gelu_inputs(R=96, Fd=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((2 * torch.randn(R, Fd, generator=g)).bfloat16(), 0.5 * torch.randn(Fd, generator=g),
            torch.randn(R, Fd, generator=g).bfloat16())


def test_bias_gelu_matches_float64():
    m, b, da = gelu_inputs()
    mf, bf = m.clone().requires_grad_(), b.clone().requires_grad_()
    a = fa.bias_gelu(mf, bf)
    a.backward(da)
    md, bd = m.double().requires_grad_(), b.double().requires_grad_()
    ad = F.gelu(md + bd)
    ad.backward(da.double())
    assert a.dtype == torch.bfloat16 and a.shape == m.shape
    assert (a.double() - ad).abs().max() <= 2 ** -8 * ad.abs().max()  # bf16 rounding of the output
    assert rel(mf.grad, md.grad) < 4e-3  # rounded to bf16
    assert rel(bf.grad, bd.grad) < 1e-5  # fp32


def test_bias_gelu_known_answers():
    """GELU(0) = 0 with slope 1/2; far above 0 the identity (slope 1); far below, 0 (slope 0)."""
    m = torch.tensor([[0.0] * 16, [8.0] * 16, [-8.0] * 16], dtype=torch.bfloat16).requires_grad_()
    b = torch.zeros(16, requires_grad=True)
    a = fa.bias_gelu(m, b)
    a.backward(torch.ones_like(a))
    assert torch.equal(a[0], torch.zeros(16, dtype=torch.bfloat16)) and torch.equal(a[1], m[1].detach())
    assert a[2].abs().max() < 1e-12
    assert torch.equal(m.grad[0], torch.full((16,), 0.5, dtype=torch.bfloat16))
    assert torch.equal(m.grad[1], torch.ones(16, dtype=torch.bfloat16)) and m.grad[2].abs().max() < 1e-12
    assert torch.allclose(b.grad, torch.full((16,), 1.5))


def test_bias_gelu_bitwise_repeatable_and_thread_independent():
    m, b, da = gelu_inputs(R=128, Fd=256)

    def run():
        mg, bg = m.clone().requires_grad_(), b.clone().requires_grad_()
        a = fa.bias_gelu(mg, bg)
        a.backward(da)
        return a.detach(), mg.grad, bg.grad

    outs = threads_outputs(run)
    for o in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], o))


def test_bias_gelu_bad_input_one_clear_line():
    m, b, _ = gelu_inputs()
    with pytest.raises(RuntimeError, match="the bias must be a contiguous fp32 CPU vector of d_mlp entries"):
        torch.ops.icl_fused.bias_gelu_fwd(m, b[:32])
    with pytest.raises(RuntimeError, match="d_mlp a multiple of 16"):
        torch.ops.icl_fused.bias_gelu_fwd(m[:, :40].contiguous(), b[:40])
    assert not fa.bias_gelu_usable(m.float(), b) and not fa.bias_gelu_usable(m, b.bfloat16())


def test_mlp_training_takes_the_kernel_evaluation_does_not(monkeypatch):
    from icl_core.config import ModelConfig

    torch.manual_seed(0)
    mlp = M.MLP(ModelConfig(n_layers=1, d_model=64, n_heads=2, d_vocab=97, n_ctx=64, attn_only=False))
    x = torch.randn(2, 8, 64)
    calls = []
    orig = fa.bias_gelu
    monkeypatch.setattr(fa, "bias_gelu", lambda *a: calls.append(1) or orig(*a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_eval = mlp(x)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_train = mlp(x)
    assert calls == [1]
    # the fused output is the forward of the torch ops to bf16 rounding
    assert rel(y_train.detach(), y_eval.double()) < 1e-2


# --- the attention's RoPE'd inputs -------------------------------------------------------------
def rope_inputs(B=2, T=64, H=3, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g).bfloat16()
    cos, sin = M.rope_tables(T, D)
    order = M.half_split_order(D)
    return qkv, cos[:, order], sin[:, order]


def rope_reference(x, cos, sin):
    """x (B, T, H, D) rotated with one rounding (fp32 inside), as (B H, T, D)."""
    B, T, H, D = x.shape
    c, s = (t[:T, None].bfloat16().double() for t in (cos, sin))
    y = x.double() * c + M.swap_halves(x.double()) * s
    return y.transpose(1, 2).reshape(B * H, T, D)


def test_rope_split_forward_is_the_formula_rounded_once():
    qkv, cos, sin = rope_inputs()
    B, T, _, H, D = qkv.shape
    q, k, v = fa.rope_split_qkv(qkv, cos, sin)
    assert torch.equal(q, rope_reference(qkv[:, :, 0], cos, sin).bfloat16())
    assert torch.equal(k, rope_reference(qkv[:, :, 1], cos, sin).bfloat16())
    assert torch.equal(v, qkv[:, :, 2].transpose(1, 2).reshape(B * H, T, D))


def test_rope_split_known_answer_position_zero_and_norm():
    """At position 0 the rotation is the identity; at every position it keeps each pair's norm."""
    qkv, cos, sin = rope_inputs(D=32)
    q, _, _ = fa.rope_split_qkv(qkv, cos, sin)
    B, T, _, H, D = qkv.shape
    x = qkv[:, :, 0].transpose(1, 2).reshape(B * H, T, D)
    assert torch.equal(q[:, 0], x[:, 0])
    pair_norm = lambda t: t.double()[..., : D // 2] ** 2 + t.double()[..., D // 2:] ** 2  # noqa: E731
    assert torch.allclose(pair_norm(q), pair_norm(x), rtol=2e-2, atol=1e-2)


def test_rope_split_gradient_is_the_float64_one_rounded():
    qkv, cos, sin = rope_inputs()
    g = torch.Generator().manual_seed(1)
    B, T, _, H, D = qkv.shape
    gq, gk, gv = (torch.randn(B * H, T, D, generator=g).bfloat16() for _ in range(3))
    x = qkv.clone().requires_grad_()
    q, k, v = fa.rope_split_qkv(x, cos, sin)
    (q.float() * gq.float() + k.float() * gk.float() + v.float() * gv.float()).sum().backward()
    xd = qkv.double().requires_grad_()
    vd = xd[:, :, 2].transpose(1, 2).reshape(B * H, T, D)
    (rope_reference(xd[:, :, 0], cos, sin) * gq.double() + rope_reference(xd[:, :, 1], cos, sin) * gk.double()
     + vd * gv.double()).sum().backward()
    assert torch.equal(x.grad, xd.grad.bfloat16())


def test_rope_split_bitwise_repeatable_and_thread_independent():
    qkv, cos, sin = rope_inputs(B=4, T=128)
    g = torch.randn(4 * 3, 128, 64, generator=torch.Generator().manual_seed(3)).bfloat16()

    def run():
        x = qkv.clone().requires_grad_()
        q, k, v = fa.rope_split_qkv(x, cos, sin)
        (q * g).sum().backward()
        return q.detach(), k.detach(), v.detach(), x.grad

    outs = threads_outputs(run)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


def test_rope_split_bad_input_one_clear_line():
    qkv, cos, sin = rope_inputs()
    with pytest.raises(RuntimeError, match="qkv must be a contiguous \\(B, T, 3, H, d_head\\) bf16 CPU tensor"):
        torch.ops.icl_fused.rope_split_qkv(qkv.float(), cos.bfloat16(), sin.bfloat16())
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous bf16 CPU tables"):
        torch.ops.icl_fused.rope_split_qkv(qkv, cos.bfloat16()[:10].contiguous(), sin.bfloat16())
    assert not fa.rope_split_usable(qkv[:, :48].contiguous())  # T not a multiple of 32


@pytest.mark.parametrize("B,T,H,D", [(2, 64, 3, 32), (3, 96, 2, 64), (1, 256, 4, 32), (2, 160, 2, 32)])
def test_attention_qkv_is_rope_split_then_attention_bit_for_bit(B, T, H, D):
    """The attention reading the projection's output (queries and keys rotated as it packs them, z
    written as (B, T, H, D), the gradient as (B, T, 3, H, D)) is the two kernels it replaces, bit for
    bit: output, pattern and gradient, on both product paths (where the CPU has AMX) and at 1 and 2
    threads."""
    qkv, cos, sin = rope_inputs(B=B, T=T, H=H, D=D)
    qkv = qkv * 2
    dO = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(5)).bfloat16()
    before = fa.amx()
    paths = [False, True] if fa.amx(True) else [False]
    try:
        for use in paths:
            fa.amx(use)

            def both():
                x1, x2 = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
                q, k, v = fa.rope_split_qkv(x1, cos, sin)
                z1 = fa.attention(q, k, v).view(B, H, T, D).transpose(1, 2)
                z1.backward(dO)
                z2 = fa.attention_qkv(x2, cos, sin)
                z2.backward(dO)
                c, s = (t[:T].bfloat16().contiguous() for t in (cos, sin))
                P2 = torch.ops.icl_fused.attention_qkv_fwd(qkv, c, s)[1]
                unpack = lambda P: P.view(B * H, T // 2, T, 2).transpose(2, 3).reshape(B * H, T, T).tril()  # noqa: E731
                assert torch.equal(z2, z1) and torch.equal(x2.grad, x1.grad)
                assert torch.equal(unpack(P2), fa.pattern(q.detach(), k.detach(), v.detach()))
                return z2.detach(), x2.grad

            outs = threads_outputs(both, counts=(1, 2))
            assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    finally:
        fa.amx(before)


def test_attention_qkv_bad_input_one_clear_line():
    qkv, cos, sin = rope_inputs()
    c, s = cos.bfloat16().contiguous(), sin.bfloat16().contiguous()
    with pytest.raises(RuntimeError, match="qkv must be a contiguous \\(B, T, 3, H, d_head\\) bf16 CPU tensor"):
        torch.ops.icl_fused.attention_qkv_fwd(qkv[:, :48].contiguous(), c, s)  # T not a multiple of 32
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous bf16 CPU tables"):
        torch.ops.icl_fused.attention_qkv_fwd(qkv, c[:10].contiguous(), s)
    O, P, QK = torch.ops.icl_fused.attention_qkv_fwd(qkv, c, s)
    with pytest.raises(RuntimeError, match="dO must be a contiguous \\(B, T, H, d_head\\) bf16 CPU tensor"):
        torch.ops.icl_fused.attention_qkv_bwd(O.float(), qkv, c, s, P, QK)
    with pytest.raises(RuntimeError, match="QK must be the forward's"):
        torch.ops.icl_fused.attention_qkv_bwd(O, qkv, c, s, P, QK[:1].contiguous())


def test_model_training_step_fused_against_torch_ops(monkeypatch):
    """A bf16 training step of a model with RoPE and MLPs (n_ctx 64, d_head 32, d_vocab 256): with
    the kernels and with the torch ops, the same loss to bf16 precision and gradients within its
    rounding; each kernel ran."""
    from icl_core.config import ModelConfig
    from icl_core.model import Transformer

    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, d_vocab=256, n_ctx=64, attn_only=False, positional="rope")
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    calls = {}
    for name in ("attention_qkv", "bias_gelu", "softmax_cross_entropy_grad_"):
        orig = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, _o=orig, _n=name: calls.__setitem__(_n, calls.get(_n, 0) + 1) or _o(*a))

    def step():
        torch.manual_seed(0)
        net = Transformer(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x, return_loss=True)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in net.named_parameters()}

    l_fused, g_fused = step()
    assert calls == {"attention_qkv": 2, "bias_gelu": 2, "softmax_cross_entropy_grad_": 1}
    monkeypatch.setitem(fa._state, "ok", False)
    l_torch, g_torch = step()
    assert calls == {"attention_qkv": 2, "bias_gelu": 2, "softmax_cross_entropy_grad_": 1}
    assert abs(l_fused - l_torch) < 5e-3 * l_torch
    for n in g_torch:
        assert rel(g_fused[n], g_torch[n].double()) < 5e-2, n


def test_kernels_for_lists_what_a_run_takes():
    """The manifest's fused_kernels: what a bf16 CPU training run of each model takes."""
    from icl_core.config import ModelConfig

    laptop = dict(n_layers=2, d_model=128, n_heads=4, d_vocab=2048, n_ctx=256, positional="rope")
    att = ["attention", "attention_amx"] if fa.amx() else ["attention"]
    assert fa.kernels_for(ModelConfig(**laptop)) == att + ["rope_qkv", "cross_entropy"]
    assert fa.kernels_for(ModelConfig(**laptop, attn_only=False)) == att + ["rope_qkv", "cross_entropy", "bias_gelu"]
    assert fa.kernels_for(ModelConfig(**{**laptop, "positional": "shortformer"})) == att + ["cross_entropy"]
    assert fa.kernels_for(ModelConfig(**{**laptop, "n_ctx": 48, "d_vocab": 97})) == []

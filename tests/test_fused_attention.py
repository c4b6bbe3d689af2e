"""The fused CPU attention (icl_core/csrc/causal_attention.cpp) against float64 and the explicit path."""
import math

import pytest
import torch

from icl_core import fused_attention as fa
from icl_core.model import _CausalAttention

pytestmark = pytest.mark.skipif(not fa.available(), reason="no avx512_bf16 CPU or no C++ compiler: the explicit attention is used")


def reference(q, k, v):
    T, d = q.shape[1], q.shape[2]
    s = q @ k.transpose(1, 2) / math.sqrt(d) + torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)
    p = s.softmax(-1)
    return p @ v, p


def inputs(N=3, T=64, d=32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(N, T, d, generator=g, dtype=torch.float64)).bfloat16() for _ in range(3)]


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("T,d", [(32, 32), (64, 32), (96, 64), (256, 32)])
def test_forward_and_gradients_match_float64(amx_path, T, d):
    for use in amx_path:  # the dot-product loop, and AMX's tiles where the CPU has them
        fa.amx(use)
        check_against_float64(T, d)


def check_against_float64(T, d):
    q, k, v = inputs(T=T, d=d)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    o_ref, p_ref = reference(qd, kd, vd)
    g = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o_ref.backward(g)
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    o = fa.attention(qb, kb, vb)
    o.backward(g.bfloat16())
    p = fa.pattern(q, k, v)
    assert o.dtype == torch.bfloat16 and o.shape == q.shape
    assert (p.double() - p_ref).abs().max() < 4e-3  # bf16 rounding of values <= 1
    assert rel(o, o_ref) < 6e-3
    for a, b in ((qb, qd), (kb, kd), (vb, vd)):
        assert rel(a.grad, b.grad) < 1e-2
    # the explicit path on the same bf16 inputs: the fused kernel is at least as close to float64
    # (its scores and softmax backward stay in fp32 where the explicit path rounds them to bf16)
    qe, ke, ve = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", enabled=False):
        oe = _CausalAttention.apply(qe, ke, ve, torch.full((T, T), float("-inf")).triu(1))
    oe.backward(g.bfloat16())
    for a, e, b in ((qb, qe, qd), (kb, ke, kd), (vb, ve, vd)):
        assert rel(a.grad, b.grad) <= 1.1 * rel(e.grad, b.grad)


def test_pattern_is_causal_and_normalised():
    q, k, v = inputs(N=2, T=64)
    p = fa.pattern(q, k, v).double()
    assert torch.all(p.triu(1) == 0)
    assert torch.allclose(p.sum(-1), torch.ones(2, 64, dtype=torch.float64), atol=2e-2)
    assert torch.all(p[:, 0, 0] == 1)  # the first query sees only itself


def test_known_answer_previous_token_head():
    """Queries that match only the previous position's key: the output is the previous value
    (position 0 attends to itself), as a perfect previous-token head would give."""
    T, d = 64, 64  # one key direction per position
    basis = torch.eye(d, dtype=torch.float64)
    pos = torch.arange(T)
    k = basis[pos] * 40.0                          # key j: one-hot direction j
    q = basis[(pos - 1).clamp(min=0)] * 40.0        # query i looks for key i-1
    v = torch.randn(T, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    o = fa.attention(q[None].bfloat16(), k[None].bfloat16(), v[None].bfloat16())[0].double()
    want = v.bfloat16().double()[(pos - 1).clamp(min=0)]
    assert torch.allclose(o, want, atol=1e-2 * want.abs().max().item())


def test_bitwise_repeatable_and_thread_independent():
    q, k, v = inputs(N=8, T=128)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 1, 2):
            torch.set_num_threads(n)
            qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
            o = fa.attention(qb, kb, vb)
            o.backward(g)
            outs.append([o.detach(), qb.grad, kb.grad, vb.grad])
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.fixture
def amx_path():
    """Both product paths where the CPU has AMX (restoring the process's choice), else the one."""
    before = fa.amx()
    yield [False, True] if fa.amx(True) else [False]
    fa.amx(before)


@pytest.mark.parametrize("T,d", [(32, 32), (96, 64), (160, 32), (256, 32)])
def test_amx_and_dot_product_paths_agree_to_bf16_rounding(amx_path, T, d):
    """Where AMX runs the products, forward, pattern and gradients equal the dot-product loop's but
    for rare last-bit roundings (both accumulate exact bf16 products in fp32, in different orders),
    and each path is bitwise repeatable. (Skips where there is no AMX: the dot-product loop is all.)"""
    if len(amx_path) == 1:
        pytest.skip("no AMX on this CPU")
    q, k, v = inputs(N=4, T=T, d=d, scale=2.0)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    outs = {}
    for use in amx_path + amx_path:
        assert fa.amx(use) == use
        qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
        o = fa.attention(qb, kb, vb)
        o.backward(g)
        got = [o.detach(), fa.pattern(q, k, v), qb.grad, kb.grad, vb.grad]
        if use in outs:
            assert all(torch.equal(a, b) for a, b in zip(outs[use], got))
        outs[use] = got
    for a, b in zip(outs[False], outs[True]):
        differ = (a != b).float().mean().item()
        assert differ < 5e-3  # measured: at most 0.14% of outputs
        # a last-bit difference of dP flips dS's bf16 rounding now and then, which dQ and dK sum:
        # measured up to 7e-4 of the tensor's largest entry, 2e-4 of its norm
        a, b = a.double(), b.double()
        assert (a - b).abs().max() <= 2e-3 * a.abs().max() and (a - b).norm() <= 1e-3 * a.norm()


def test_attention_clock_counts_products_and_changes_nothing(amx_path):
    """The kernels' own clock (benchmarks' matrix share): off by default, no ticks; on, both
    directions' products take some but not all of their calls' time; the results bit for bit those
    of the untimed calls; stopped, the counts stay put."""
    q, k, v = inputs(N=4, T=96, d=32, scale=2.0)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).bfloat16()

    def run():
        qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
        o = fa.attention(qb, kb, vb)
        o.backward(g)
        return [o.detach(), qb.grad, kb.grad, vb.grad]

    for use in amx_path:
        fa.amx(use)
        idle = fa.attention_cycles()
        plain = run()
        assert fa.attention_cycles() == idle  # not started: the kernels read no clock
        assert fa.attention_cycles(True) == dict.fromkeys(fa.ATTENTION_TICKS, 0)
        timed = run()
        ticks = fa.attention_cycles(False)
        assert all(torch.equal(a, b) for a, b in zip(plain, timed))
        for part in ("fwd", "bwd"):
            assert 0 < ticks[f"{part}_products"] < ticks[f"{part}_total"], (use, ticks)
        run()
        assert fa.attention_cycles() == ticks


def test_tsc_hz_converts_the_clock_to_seconds():
    """The counter's rate turns an attention call's ticks into its wall time: one thread, 20 forward
    calls of ~1 ms, their ticks over tsc_hz within 25% of perf_counter's time (the calls' Python
    around the kernel is outside the ticks); the rate is that of a GHz-class counter."""
    import time

    hz = fa.tsc_hz()
    assert 1e8 < hz < 1e10
    q, k, v = inputs(N=16, T=256, d=32)
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fa.attention(q, k, v)
        fa.attention_cycles(True)
        t = time.perf_counter()
        for _ in range(20):
            fa.attention(q, k, v)
        wall = time.perf_counter() - t
        ticks = fa.attention_cycles(False)["fwd_total"]
    finally:
        torch.set_num_threads(n0)
    assert ticks / hz == pytest.approx(wall, rel=0.25)


def test_usable_only_for_its_inputs():
    q = torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    assert fa.usable(q)
    assert not fa.usable(q.float())                              # fp32: the explicit path
    assert not fa.usable(torch.zeros(2, 48, 32, dtype=torch.bfloat16))  # T not a multiple of 32
    assert not fa.usable(torch.zeros(2, 64, 16, dtype=torch.bfloat16))  # d_head 16


def test_bad_input_one_clear_line():
    q = torch.zeros(2, 64, 32)
    with pytest.raises(RuntimeError, match="must be a contiguous \\(N, T, d_head\\) bf16 CPU tensor"):
        torch.ops.icl_fused.causal_attention_fwd(q, q, q)
    qb = torch.zeros(2, 48, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        torch.ops.icl_fused.causal_attention_fwd(qb, qb, qb)


def test_switch_off_uses_the_explicit_path(monkeypatch):
    """A model step with the kernel and with ICL_FUSED_ATTENTION=0's path: same loss to bf16
    precision, and the explicit path really runs when the switch is off."""
    from icl_core.config import ModelConfig
    from icl_core.model import Transformer

    torch.manual_seed(0)
    net = Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=2, d_vocab=97, n_ctx=64))
    x = torch.randint(0, 97, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = net(x, return_loss=True).item()
    calls = []
    orig = _CausalAttention.forward
    monkeypatch.setitem(fa._state, "ok", False)
    monkeypatch.setattr(_CausalAttention, "forward", staticmethod(lambda *a: calls.append(1) or orig(*a)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = net(x, return_loss=True).item()
    assert len(calls) == 2 and not fa.available()
    assert abs(fused - explicit) < 2e-2 * abs(explicit)


def test_training_takes_the_kernel_evaluation_does_not(monkeypatch):
    """causal_attention runs the kernel only where gradients are wanted (a training step); under
    no_grad, or for inputs that do not require gradients, it runs the explicit path."""
    from icl_core.model import causal_attention

    calls = []
    orig = fa.attention
    monkeypatch.setattr(fa, "attention", lambda *a: calls.append(1) or orig(*a))
    q, k, v = inputs(N=2, T=64)
    mask = torch.full((64, 64), float("-inf")).triu(1)
    with torch.no_grad():
        causal_attention(q, k, v, mask)
    causal_attention(q, k, v, mask)
    assert calls == []
    qg = q.clone().requires_grad_()
    out = causal_attention(qg, k, v, mask)
    assert calls == [1]
    assert torch.equal(out, orig(q, k, v))

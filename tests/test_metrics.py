"""The paper's metrics against known answers (../shared/PAPER.md, metric definitions)."""
import numpy as np
import pytest
import torch

from icl_core import curves as Cu
from icl_core import hooks as H
from icl_core import metrics as M
from icl_core.data import repeated_random_tokens
from icl_core.model import loss_fn
from tests.conftest import tiny_model

L_SEQ = 25


def rep_tokens(n=3, seed=0):
    return repeated_random_tokens(np.arange(1, 50), n, L_SEQ, 4, seed)


def test_perfect_induction_stripe_scores_one():
    x = rep_tokens()
    B, T = x.shape
    pat = torch.zeros(B, 1, 1, T, T)
    for q in range(T):
        k = q - L_SEQ + 1 if q >= 1 + L_SEQ else 0
        pat[:, 0, 0, q, k] = 1.0
    s = M.prefix_matching_scores_from_patterns(pat, x, L_SEQ)
    assert s.shape == (1, 1)
    assert float(s) == pytest.approx(1.0, abs=1e-6)


def test_uniform_head_scores_its_share_of_matching_keys():
    x = rep_tokens()
    B, T = x.shape
    pat = torch.ones(T, T).tril()
    pat = (pat / pat.sum(-1, keepdim=True)).expand(B, 1, 1, T, T)
    s = float(M.prefix_matching_scores_from_patterns(pat, x, L_SEQ))
    # a query in repeat j (j = 1, 2, 3) has j matching keys among its q + 1 keys
    expect = np.mean([((q - 1) // L_SEQ) / (q + 1)
                      for q in range(1 + L_SEQ, T)])
    assert s == pytest.approx(expect, rel=1e-5)
    assert s < 0.05


def test_previous_token_head_scores_one():
    T = 20
    pat = torch.zeros(2, 1, 2, T, T)
    pat[..., 0, 0] = 1
    for i in range(1, T):
        pat[:, 0, 0, i, i - 1] = 1
        pat[:, 0, 1, i, i] = 1
    s = M.previous_token_scores_from_patterns(pat)
    assert float(s[0, 0]) == pytest.approx(1.0)
    assert float(s[0, 1]) == pytest.approx(0.0)


def _identity_model(n_layers=1, d=16, sign=1.0, layer_norm=False):
    m = tiny_model(n_layers=n_layers, d_model=d, n_heads=1, d_vocab=d, layer_norm=layer_norm)
    eye = torch.eye(d)
    with torch.no_grad():
        m.W_E.copy_(eye)
        m.W_U.copy_(eye)
        for b in m.blocks:
            b.attn.W_qkv[:, 2, 0].copy_(eye)  # W_V = I
            b.attn.W_O_[0].copy_(sign * eye)
    return m


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ov_eigen_score_identity_is_copying(sign):
    s = M.ov_eigen_copying_scores(_identity_model(sign=sign))
    assert float(s[0, 0]) == pytest.approx(sign, abs=1e-6)


def test_ov_eigen_score_matches_full_vocab_matrix():
    m = tiny_model(d_model=16, n_heads=2, d_vocab=40)
    s = M.ov_eigen_copying_scores(m)
    full = M.ov_circuits(m, 1)  # (H, V, V)
    for h in range(2):
        assert float(s[1, h]) == pytest.approx(M.eigen_score(full[h]), abs=1e-4)


def _k_comp_model(sign):
    m = _identity_model(n_layers=2, d=8)
    with torch.no_grad():
        a = m.blocks[1].attn
        a.W_qkv[:, 0, 0].copy_(torch.eye(8))
        a.W_qkv[:, 1, 0].copy_(sign * torch.eye(8))
    return m


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_k_composition_trace_sign(sign):
    s = M.k_composition_traces(_k_comp_model(sign), torch.ones(2, 1))
    assert torch.isnan(s[0]).all()
    assert float(s[1, 0]) == pytest.approx(sign, abs=1e-6)


def test_k_composition_trace_matches_explicit_vocab_matrix():
    m = tiny_model(d_model=16, n_heads=2, d_vocab=40)
    p = torch.tensor([[0.7, 0.2], [0.0, 0.0]])
    got = M.k_composition_traces(m, p, normalise=False)
    WE = m.W_E.double()
    for h in range(2):
        a1 = m.blocks[1].attn
        W = 0
        for e in range(2):
            a0 = m.blocks[0].attn
            ov = a0.W_V[e].double() @ a0.W_O[e].double()
            W = W + p[0, e].item() * (WE @ a1.W_Q[h].double()) @ (WE @ ov @ a1.W_K[h].double()).T
        assert float(got[1, h]) == pytest.approx(float(torch.trace(W)), rel=1e-6)


def test_composition_scores_separate_q_and_k():
    m = tiny_model(d_model=8, n_heads=1, d_head=4, n_layers=2)
    with torch.no_grad():
        m.blocks[0].attn.W_O_.zero_()
        m.blocks[0].attn.W_O_[0, :, :4] = torch.randn(4, 4)  # head 0.0 writes dims 0-3
        q = m.blocks[1].attn.W_qkv[:, 0, 0]
        k = m.blocks[1].attn.W_qkv[:, 1, 0]
        q.zero_(); q[:4] = torch.randn(4, 4)  # reads dims 0-3 into its query
        k.zero_(); k[4:] = torch.randn(4, 4)  # reads dims 4-7 into its key
    c = M.composition_scores(m)
    assert float(c["K"][0, 0, 1, 0]) == pytest.approx(0.0, abs=1e-9)
    assert float(c["Q"][0, 0, 1, 0]) > 0.05
    assert torch.isnan(c["V"][1, 0, 0, 0])
    base = M.composition_baseline(8, 4, n=50)
    assert 0 < base < 1


@pytest.mark.parametrize("sign,lo,hi", [(1.0, 0.6, 1.0), (-1.0, -1.0, -0.8)])
def test_copying_score_of_identity_ov(sign, lo, hi):
    m = _identity_model(sign=sign, d=16)
    with torch.no_grad():  # attend to copies of the current token
        m.blocks[0].attn.W_qkv[:, 0, 0].copy_(8 * torch.eye(16))
        m.blocks[0].attn.W_qkv[:, 1, 0].copy_(8 * torch.eye(16))
    x = repeated_random_tokens(np.arange(1, 16), 4, 12, 3, seed=0)
    s = float(M.copying_scores(m, x)[0, 0])
    assert lo <= s <= hi


def test_icl_score_of_flat_losses_is_zero_and_sign_convention():
    flat = torch.full((10, 255), 3.0)
    assert M.icl_score_from_losses(flat, 256) == 0.0
    falling = torch.linspace(5, 2, 255).repeat(10, 1)
    assert M.icl_score_from_losses(falling, 256) < 0  # negative = in-context learning
    late, early = M.icl_indices(512)
    assert (late, early) == (500, 50)
    losses = torch.zeros(2, 511)
    losses[:, 499], losses[:, 49] = 1.0, 3.0
    assert M.icl_score_from_losses(losses, 512) == pytest.approx(-2.0)


def test_ablating_nothing_leaves_loss_unchanged():
    m = tiny_model()
    x = torch.randint(0, 50, (4, 40))
    clean = M.per_token_losses(m, x)
    for pp in (True, False):
        out = M.ablation_losses(m, x, masks=torch.zeros(1, 2, 2, dtype=torch.bool), pattern_preserving=pp)
        assert (out[0] - clean).abs().max() < 1e-6


def test_pattern_preserving_ablation_removes_direct_and_downstream_paths():
    m = tiny_model(layer_norm=False, positional="shortformer")
    x = torch.randint(0, 50, (2, 30))
    with H.cache(m, H.pattern_names(m) + H.result_names(m)) as c:
        clean_logits = m(x)
    resid = clean_logits @ torch.linalg.pinv(m.W_U)  # not used: we rebuild from terms below
    del resid
    ab = M.ablation_losses(m, x, pattern_preserving=True)  # (L*H, N, T-1), heads in (l, h) order
    a1 = m.blocks[1].attn
    for h0 in range(2):
        r = c["blocks.0.attn.hook_result"][:, :, h0]  # (B, T, D) direct term of head 0.h0
        down = 0
        for h1 in range(2):
            P = c["blocks.1.attn.hook_pattern"][:, h1]  # (B, T, T)
            down = down + P @ (r @ a1.W_V[h1] @ a1.W_O[h1])
        logits = clean_logits - (r + down) @ m.W_U
        want = loss_fn(logits, x, reduction="none")
        assert (ab[h0] - want).abs().max() < 1e-4
    for h1 in range(2):  # a last-layer head has only its direct term
        r = c["blocks.1.attn.hook_result"][:, :, h1]
        want = loss_fn(clean_logits - r @ m.W_U, x, reduction="none")
        assert (ab[2 + h1] - want).abs().max() < 1e-4


def test_full_ablation_differs_from_pattern_preserving_when_downstream_attention_moves():
    m = tiny_model()
    x = torch.randint(0, 50, (2, 30))
    full = M.ablation_losses(m, x, heads=[(0, 0)], pattern_preserving=False)
    pp = M.ablation_losses(m, x, heads=[(0, 0)], pattern_preserving=True)
    assert (full - pp).abs().max() > 1e-6
    last_full = M.ablation_losses(m, x, heads=[(1, 0)], pattern_preserving=False)
    last_pp = M.ablation_losses(m, x, heads=[(1, 0)], pattern_preserving=True)
    assert (last_full - last_pp).abs().max() < 1e-5  # nothing downstream of the last layer


def test_ablation_effects_shapes():
    m = tiny_model()
    x = torch.randint(0, 50, (3, 64))
    r = M.ablation_effects(m, x)
    assert r.delta_icl.shape == (2, 2) and r.delta_loss.shape == (2, 2)


@pytest.mark.parametrize("pp", [True, False])
def test_ablation_effects_in_bf16_match_fp32(pp):
    """bf16 ablations (the laptop profile's eval precision): the clean losses are the no-head row of
    the same batched pass, and each head's effects agree with fp32 to bf16 rounding; each head's
    row is that head's own ablation."""
    m = tiny_model(n_ctx=256, d_model=64, n_heads=4, d_vocab=300)
    with torch.no_grad():  # a model whose heads matter: larger weights than the initialisation
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    x = torch.randint(0, 300, (6, 256))
    r32 = M.ablation_effects(m, x, pattern_preserving=pp, batch_size=3)
    r16 = M.ablation_effects(m, x, pattern_preserving=pp, batch_size=3, precision="bf16")
    assert (r32.clean - M.per_token_losses(m, x)).abs().max() < 1e-5
    assert (r16.clean - M.per_token_losses(m, x)).abs().mean() < 0.05
    assert r32.delta_loss.abs().max() > 0.01  # the heads matter, so agreement is a real check
    torch.testing.assert_close(r16.delta_loss, r32.delta_loss, atol=0.003, rtol=0.05)
    torch.testing.assert_close(r16.delta_icl, r32.delta_icl, atol=0.01, rtol=0.05)
    one = M.ablation_losses(m, x, heads=[(1, 2)], pattern_preserving=pp, batch_size=3)
    assert (one[0] - r32.losses[4 + 2]).abs().max() < 1e-5


def test_phase_change_window_finds_sigmoid_drop():
    t = np.logspace(4, 8, 60)
    icl = -0.05 - 0.4 / (1 + np.exp(-(np.log(t) - np.log(1e6)) * 4))
    w = Cu.phase_change_window(t, icl)
    assert w.found and w.start < 1e6 < w.end
    assert w.end / w.start < 20
    inside = (t >= w.start) & (t <= w.end)
    assert (icl[inside][0] - icl[inside][-1]) / (icl[0] - icl[-1]) > 0.75


@pytest.mark.parametrize("t0", [1.5e6, 4.5e6, 6.0e6])
def test_phase_change_window_is_robust_to_snapshot_noise_on_the_laptop_grid(t0):
    """Known answer with noise: an ICL drop of 0.3 nats, a sigmoid in ln(tokens) centred on t0,
    plus 0.04 nats of independent noise per snapshot (the size of the fluctuations of the laptop
    runs' ICL at a constant learning rate), on the laptop's snapshot grid (dense, linear, late).
    The window contains t0 in at least 90% of draws; the earlier 3-snapshot moving average
    (the curve averaged with its neighbouring snapshots, then not smoothed again) did in about 70%,
    which is why the window smooths in ln(tokens)."""
    from icl_core.train import snapshot_steps
    t = np.array(snapshot_steps(3906, 40), dtype=np.float64) * 2048
    rng = np.random.default_rng(0)
    hits = {"log": 0, "old": 0}
    for _ in range(100):
        icl = -0.1 - 0.3 / (1 + np.exp(-(np.log(np.maximum(t, 1)) - np.log(t0)) / 0.12)) + rng.normal(0, 0.04, len(t))
        moving_average = np.convolve(np.pad(icl, 1, mode="edge"), np.ones(3) / 3, mode="valid")
        for k, curve, width in (("log", icl, Cu.WINDOW_SMOOTH_WIDTH), ("old", moving_average, 0)):
            w = Cu.phase_change_window(t, curve, width=width)
            hits[k] += w.found and w.start <= t0 <= w.end
    assert hits["log"] >= 90
    assert hits["old"] <= 85


def test_smoothing_in_log_tokens_keeps_a_line_in_log_tokens():
    t = np.array([1e3, 1e4, 1e5, 1.1e5, 1.2e5, 1.3e5, 1e6])
    y = 2.0 - 0.5 * np.log(t)
    ys = Cu.smooth_in_log_tokens(t, y, width=1e-3)
    assert np.allclose(ys, y)  # a very narrow kernel changes nothing
    flat = Cu.smooth_in_log_tokens(t, np.full(len(t), 3.0))
    assert np.allclose(flat, 3.0)


def test_phase_change_window_absent_for_flat_curve():
    t = np.logspace(4, 8, 30)
    w = Cu.phase_change_window(t, np.full(30, -0.02) + 0.001 * np.sin(np.arange(30)))
    assert not w.found


def test_before_after_projection_sign():
    start, end = np.array([3.0, 3.0, 3.0]), np.array([3.0, 2.0, 1.0])
    u = M.before_after_vector(start, end)
    assert np.linalg.norm(u) == pytest.approx(1.0)
    undo = M.before_after_projection(u, end, np.stack([start, end]))
    assert undo[0] < 0 and undo[1] == pytest.approx(0.0)


def test_loss_pca_joint_fit():
    rng = np.random.default_rng(0)
    vecs = {"a": rng.normal(size=(10, 50)), "b": rng.normal(size=(7, 50))}
    pca, traj = M.loss_pca(vecs)
    assert traj["a"].shape == (10, 2) and traj["b"].shape == (7, 2)
    pos = M.sample_token_positions(50, 255, seed=1)
    assert pos.shape == (50,) and pos.max() < 255
    assert (M.sample_token_positions(50, 255, seed=1) == pos).all()


def test_one_pass_losses_and_previous_token_scores_equal_separate_ones():
    m = tiny_model()
    x = torch.randint(0, 50, (40, 30))
    losses, prev = M.losses_and_previous_token_scores(m, x, n_prev=16, batch_size=8)
    torch.testing.assert_close(losses, M.per_token_losses(m, x, batch_size=8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev, M.previous_token_scores(m, x[:16]), rtol=1e-5, atol=1e-6)
    short, prev_all = M.losses_and_previous_token_scores(m, x[:5], n_prev=16)  # fewer windows than n_prev
    assert short.shape == (5, 29)
    torch.testing.assert_close(prev_all, M.previous_token_scores(m, x[:5]), rtol=1e-5, atol=1e-6)


def test_eval_losses_do_not_depend_on_windows_per_pass():
    """A GPU evaluates 64 windows per pass, the CPU 8 (metrics.eval_batch): the per-token losses
    and previous-token scores must be the same function of the windows either way."""
    assert M.eval_batch("cpu") == M.EVAL_BATCH and M.eval_batch("cuda:0") == M.EVAL_BATCH_CUDA
    m = tiny_model(n_ctx=64)
    x = torch.randint(0, 50, (70, 64), generator=torch.Generator().manual_seed(1))
    a, pa = M.losses_and_previous_token_scores(m, x, batch_size=8)
    b, pb = M.losses_and_previous_token_scores(m, x, batch_size=64)
    assert a.shape == (70, 63) and torch.allclose(a, b, atol=1e-5) and torch.allclose(pa, pb, atol=1e-6)
    assert torch.allclose(M.per_token_losses(m, x), a, atol=1e-5)  # the device's default batch

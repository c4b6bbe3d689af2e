"""Known-answer tests of chapter 5's weight analyses (icl_core.mechanism)."""
import math

import numpy as np
import pytest
import torch

from icl_core import circuits as Ci
from icl_core import mechanism as Me
from icl_core.config import ModelConfig
from icl_core.curves import Window
from icl_core.model import Transformer


def _model(**kw):
    cfg = ModelConfig(**{"n_layers": 2, "d_model": 8, "n_heads": 1, "n_ctx": 16, "d_vocab": 8,
                         "positional": "shortformer", **kw})
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@torch.no_grad()
def _induction_weights(m: Transformer):
    """Hand-built circuit: W_E = I (token t is basis vector t); the layer-0 head's OV is the
    identity; the layer-1 head's query reads the token and its key reads the same token: so the
    K-composition circuit W_E W_Q (W_E W_OV W_K)^T is the identity (times a scale)."""
    D = m.cfg.d_model
    m.W_E.copy_(torch.eye(D))
    a0, a1 = m.blocks[0].attn, m.blocks[1].attn
    I = torch.eye(D)
    W = a0.W_qkv.data  # (D, 3, H, dh)
    W.zero_()
    W[:, 2, 0] = I  # W_V of layer 0
    a0.W_O_.data[0] = I
    W1 = a1.W_qkv.data
    W1.zero_()
    W1[:, 0, 0] = I  # W_Q
    W1[:, 1, 0] = I  # W_K


def test_kcomp_circuit_is_diagonal_for_a_hand_built_induction_circuit():
    m = _model()
    _induction_weights(m)
    c = Ci.kcomp_circuit(m, 1, 0, (0, 0), np.arange(8))
    assert torch.allclose(c, torch.eye(8, dtype=c.dtype) / math.sqrt(m.cfg.d_head))
    st = Ci.diagonal_stats(c)
    assert st["row_argmax_on_diagonal"] == 1.0 and st["chance"] == 1 / 8 and st["diag_z"] > 2


def test_kcomp_circuit_matches_explicit_formula():
    m = _model(init_std=0.3)
    toks = [1, 3, 5]
    c = Ci.kcomp_circuit(m, 1, 0, (0, 0), toks)
    a, p = m.blocks[1].attn, m.blocks[0].attn
    WE = m.W_E[toks].double()
    ref = (WE @ a.W_Q[0].double()) @ (WE @ (p.W_V[0] @ p.W_O[0]).double() @ a.W_K[0].double()).T
    assert torch.allclose(c, ref / math.sqrt(m.cfg.d_head))


def test_diagonal_stats_on_random_matrix_is_near_chance():
    g = torch.Generator().manual_seed(0)
    st = Ci.diagonal_stats(torch.randn(200, 200, generator=g))
    assert st["row_argmax_on_diagonal"] < 0.05
    assert abs(st["diag_z"]) < 0.5


@torch.no_grad()
def test_positional_attention_of_a_previous_token_head():
    """Positions one-hot (W_pos = I); W_Q maps position i to the direction of position i - 1 and
    W_K is the identity, scaled up: the positional QK pattern puts ~all attention at offset 1."""
    m = _model(n_layers=1, d_model=16, n_ctx=16, d_vocab=8)
    m.W_pos.copy_(torch.eye(16))
    a = m.blocks[0].attn
    W = a.W_qkv.data
    W.zero_()
    shift = torch.zeros(16, 16)
    for i in range(1, 16):
        shift[i, i - 1] = 1.0
    W[:, 0, 0] = 40 * shift  # query of position i points at position i-1
    W[:, 1, 0] = torch.eye(16)
    out = Me.positional_attention(m, 0, 0, max_offset=4)
    assert out["weights"].argmax() == 1 and out["weights"][1] > 0.95
    m2 = _model(n_layers=1, positional="rope", d_model=8)
    assert Me.positional_attention(m2, 0, 0)["weights"] is None


def test_rise_token_and_timing():
    t = np.array([0, 1e3, 2e3, 4e3, 8e3, 16e3, 32e3])
    v = np.array([0, 0.0, 0.0, 0.1, 0.9, 1.0, 1.0])
    r = Me.rise_token(t, v)
    assert 4e3 < r < 8e3
    assert np.isnan(Me.rise_token(t, -v))
    s = {"tokens": t, "prefix": np.zeros((7, 2, 1)), "prev_token": np.zeros((7, 2, 1)),
         "ov_eigen": np.zeros((7, 2, 1)), "k_comp": np.full((7, 2, 1), np.nan),
         "window": Window(3e3, 9e3, 5e3, True)}
    s["prefix"][:, 1, 0] = v
    s["ov_eigen"][:, 1, 0] = v
    s["k_comp"][:, 1, 0] = v * 0.01  # too small a rise to count
    s["prev_token"][:, 0, 0] = v
    tm = Me.rise_timing(s)
    assert tm["induction_head"] == (1, 0) and tm["prev_head"] == (0, 0)
    assert tm["prefix"]["where"] == "inside the window" and tm["ov_eigen"]["where"] == "inside the window"
    assert tm["k_comp"]["where"] == "no rise"
    s["window"] = Window(1e4, 2e4, 1.5e4, True)
    assert Me.rise_timing(s)["prefix"]["where"] == "before the window"


def test_agreement_rank_correlation():
    pm = np.array([[0.0, 0.1, 0.05], [0.9, 0.2, 0.5]])
    ov = pm * 2 - 0.3  # same ranks
    kc = np.array([[np.nan] * 3, [0.8, -0.1, 0.2]])
    scores = {"m": {"prefix": [pm], "ov_eigen": [ov], "k_comp": [kc]}}
    a = Me.agreement(scores).set_index("model")
    assert a.loc["m", "rho_prefix_ov"] == pytest.approx(1.0)
    assert a.loc["m", "rho_prefix_k"] == pytest.approx(1.0)
    assert a.loc["m", "induction heads"] == 2 and a.loc["m", "with OV > 0"] == 2
    assert a.loc["m", "with K-comp > 0"] == 2 and a.loc["m", "in layers >= 1"] == 2
    assert a.loc["all models (pooled)", "n_k"] == 3


def test_frequent_tokens_skips_eos():
    counts = np.array([100, 5, 50, 7])
    assert Ci.frequent_tokens(counts, 2).tolist() == [2, 3]


def test_agreement_sentence_reports_models_with_induction_heads_one_by_one():
    import pandas as pd
    from icl_core import mechanism as Me
    rng = np.random.default_rng(0)
    L, H = 3, 4
    prefix = np.zeros((1, L, H)); prefix[0, 2, 1] = 0.6; prefix[0, 2, 2] = 0.2; prefix[0, 1, 0] = 0.05
    good = {"prefix": prefix, "ov_eigen": prefix + 0.01 * np.arange(L * H).reshape(1, L, H) / 100,
            "k_comp": np.where(np.arange(L)[None, :, None] >= 1, prefix + 1e-3 * rng.random((1, L, H)), np.nan)}
    none_ = {"prefix": np.full((1, L, H), 0.02) + 1e-3 * rng.random((1, L, H)), "ov_eigen": -rng.random((1, L, H)),
             "k_comp": np.where(np.arange(L)[None, :, None] >= 1, rng.random((1, L, H)), np.nan)}
    agr = Me.agreement({"good": good, "none": none_})
    text = Me.agreement_sentence(agr, pd.DataFrame(columns=["score", "where"]))
    row = agr.set_index("model").loc["good"]
    assert row["induction heads"] == 1 and row["rho_prefix_k"] > 0.8
    assert "In `good`" in text and f"{row['rho_prefix_k']:+.2f}" in text
    assert "In `none`" not in text  # no induction heads: only in the pooled figure
    assert "Pooled over all" in text


def test_circuit_readouts_known_answers():
    """The hand-built induction circuit: every row of its K-composition circuit peaks on the
    diagonal; with W_U = I and an identity OV the induction head copies every token; a zero OV
    copies nothing (argmax ties go to column 0, which is not among the tokens)."""
    m = _model()
    _induction_weights(m)
    with torch.no_grad():
        a1 = m.blocks[1].attn
        a1.W_qkv.data[:, 2, 0] = torch.eye(8)  # the induction head's OV: identity
        a1.W_O_.data[0] = torch.eye(8)
        m.W_U.copy_(torch.eye(8))
    toks = np.arange(1, 8)
    r = Ci.circuit_readouts(m, (1, 0), (0, 0), toks)
    assert r["ov_copy"] == 1.0 and r["k_diag"] == 1.0
    assert np.isnan(Ci.circuit_readouts(m, (1, 0), None, toks)["k_diag"])
    with torch.no_grad():
        a1.W_O_.data.zero_()
    assert Ci.circuit_readouts(m, (1, 0), (0, 0), toks)["ov_copy"] == 0.0


def test_rise_timing_uses_the_circuits_own_snapshots():
    t = np.array([0, 1e3, 2e3, 4e3, 8e3, 16e3, 32e3])
    flat = np.zeros((7, 2, 1))
    s = {"tokens": t, "prefix": flat.copy(), "prev_token": flat.copy(), "ov_eigen": flat.copy(),
         "k_comp": flat.copy(), "window": Window(3e3, 9e3, 5e3, True)}
    s["prefix"][:, 1, 0] = [0, 0, 0, 0.1, 0.9, 1, 1]
    s["prev_token"][:, 0, 0] = 0.5
    tc = np.arange(0, 33e3, 1e3)  # finer snapshots
    circ = {"tokens": tc, "ov_copy": (tc > 20e3).astype(float), "k_diag": (tc >= 5e3).astype(float),
            "induction_head": (1, 0), "prev_head": (0, 0)}
    tm = Me.rise_timing(s, circuits=circ)
    assert tm["k_circuit"]["where"] == "inside the window" and tm["ov_circuit"]["where"] == "after the window"
    tab = Me.timing_table({"m": tm})
    assert {"ov_circuit", "k_circuit"} <= set(tab.score)
    with pytest.raises(ValueError, match="top induction head"):
        Me.rise_timing(s, circuits={**circ, "induction_head": (0, 0)})


def test_circuits_over_training_on_a_trained_run_is_cached(tiny_run_cfg, tmp_path):
    from icl_core.runs import get_or_train
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    c = Ci.circuits_over_training(run, (1, 0), (0, 1), n_tokens=20)
    assert len(c["k_diag"]) == len(run.steps) == len(c["tokens"])
    assert ((0 <= c["ov_copy"]) & (c["ov_copy"] <= 1)).all() and c["chance_k"] == 1 / 20
    m = run.load(run.steps[-1])
    toks = Ci.frequent_tokens(run.corpus.counts, 20)
    direct = Ci.circuit_readouts(m, (1, 0), (0, 1), toks)
    assert float(c["k_diag"][-1]) == direct["k_diag"] and float(c["ov_copy"][-1]) == direct["ov_copy"]
    assert list((run.path / "analysis").glob("circuits-*.safetensors"))
    again = Ci.circuits_over_training(run, (1, 0), (0, 1), n_tokens=20)
    assert torch.equal(again["k_diag"], c["k_diag"]) and float(again["seconds"]) == float(c["seconds"])


def test_agreement_sentence_counts_each_kind_of_timing():
    import pandas as pd
    agr = Me.agreement({"m": {"prefix": [np.array([[0.1], [0.5]])], "ov_eigen": [np.array([[0.1], [0.5]])],
                              "k_comp": [np.array([[np.nan], [0.5]])]}})
    tab = pd.DataFrame({"score": ["ov_eigen", "k_comp", "ov_circuit", "k_circuit", "prefix"],
                        "where": ["before the window", "before the window", "after the window",
                                  "inside the window", "inside the window"]})
    text = Me.agreement_sentence(agr, tab)
    assert "Of the 2 eigenvalue scores" in text and "0 cover half their rise inside the phase-change window, 2 before" in text
    assert "Of the 2 token-level circuit readouts" in text and "1 cover half their rise inside the phase-change window, 0 before it and 1 after" in text


def test_logged_seconds_sums_each_cached_analysis_and_skips_corrupt_ones(tiny_run_cfg, tmp_path, capsys):
    from icl_core import analysis as A
    from icl_core.runs import get_or_train
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    assert A.logged_seconds(run) == {}
    c = Ci.circuits_over_training(run, (1, 0), (0, 1), n_tokens=10)
    c2 = Ci.circuits_over_training(run, (1, 1), (0, 0), n_tokens=10)
    got = A.logged_seconds(run)
    assert set(got) == {"circuits"}
    assert got["circuits"] == pytest.approx(float(c["seconds"]) + float(c2["seconds"]))
    f = sorted((run.path / "analysis").glob("circuits-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-3] + b"xyz")
    assert set(A.logged_seconds(run)) == {"circuits"} and "not counted" in capsys.readouterr().out


def test_warm_caches_what_compute_reads(tiny_run_cfg, tmp_path):
    """The scores warmed alone (benchmarks/gpu/run_profile.py, in another process) leave the chapter's
    call nothing to compute: no new cache file, the same scores."""
    from icl_core.runs import get_or_train
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    assert Me.warm(run, "scores", n_steps=3) >= 0
    files = sorted(p.name for p in (run.path / "analysis").iterdir())
    assert files and all(f.startswith("heads-") for f in files)
    s = Me.scores_over_training(run, 3)
    assert sorted(p.name for p in (run.path / "analysis").iterdir()) == files
    assert s["prefix"].shape[0] == len(Me.A.select_steps(run, 3))
    with pytest.raises(ValueError, match="unknown part 'x'"):
        Me.warm(run, "x")

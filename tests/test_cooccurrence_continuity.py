"""Known answers for the curve maths (icl_core.curves) and Arguments 1 and 6 (icl_core.cooccurrence,
icl_core.continuity)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from icl_core import continuity as Ct
from icl_core import cooccurrence as Co
from icl_core import passage as PS
from icl_core import curves as Cu
from icl_core.config import ModelConfig
from icl_core.model import Transformer


def _sig(x):
    return 1 / (1 + np.exp(-x))


def test_convex_curve_has_no_gap_and_no_bump():
    t = np.geomspace(1e3, 1e7, 200)
    y = 3 + 4 * np.exp(-0.5 * np.log(t / 1e3))  # convex and decreasing in ln t
    assert np.abs(Cu.convex_gap(t, y)).max() < 1e-9
    assert not Cu.loss_bump(t, y).found


def test_lower_convex_envelope_bridges_a_bump():
    x = np.linspace(0, 4, 81)
    y = x.copy() * 0.0
    y[30:50] = 0.5  # a plateau above a flat line
    env = Cu.lower_convex_envelope(x, y)
    assert np.allclose(env, 0)


def test_loss_bump_found_at_the_plateau_then_drop():
    t = np.geomspace(1e3, 1e7, 400)
    lt = np.log(t)
    # initial fall (shoulder), a convex decline, and a late extra drop of 0.3 nats around t = 1e5
    y = 7 - 3 * _sig((lt - np.log(3e3)) * 3) - 0.1 * (lt - lt[0]) - 0.3 * _sig((lt - np.log(1e5)) * 4)
    b = Cu.loss_bump(t, y)
    assert b.found
    assert b.start < 1e5 < b.end
    assert b.height > 0.05
    assert b.n_stretches == 1
    # the same curve without the drop has no bump
    assert not Cu.loss_bump(t, y + 0.3 * _sig((lt - np.log(1e5)) * 4)).found


def test_rise_window_contains_the_steepest_rise():
    t = np.geomspace(1e3, 1e7, 40)
    p = 0.03 + 0.6 * _sig((np.log(t) - np.log(2e5)) * 3)
    w = Cu.rise_window(t, p)
    assert w.found and w.start < 2e5 < w.end
    flat = Cu.rise_window(t, np.full_like(t, 0.03))
    assert not flat.found and "never rose" in flat.reason


def test_dloss_dlnindex_recovers_a_log_slope():
    idx = np.arange(1, 256)
    loss = 5 - 0.2 * np.log(idx)
    c, d = Cu.dloss_dlnindex(idx, np.stack([loss, np.full_like(loss, 5.0)]))
    assert np.allclose(d[0, c > 4], -0.2, atol=0.02)
    assert np.allclose(d[1], 0)


def test_turn_angle_straight_and_right_angle():
    t = np.array([0, 1e3, 2e3, 4e3, 8e3, 16e3])
    straight = np.stack([np.arange(6.0), np.zeros(6)], 1)
    assert Cu.turn_angle(straight, t, 4e3, 8e3) == pytest.approx(0, abs=1e-6)
    bent = np.array([[0, 0], [0, 0], [1, 0], [2, 0], [2, 1], [2, 2]], dtype=float)
    # before 2e3 -> 4e3 the path moves along x; across 4e3 -> 8e3 it moves along y
    assert Cu.turn_angle(bent, t, 4e3, 8e3) == pytest.approx(90, abs=1e-6)
    assert np.isnan(Cu.turn_angle(bent, t, float("nan"), 8e3))


def test_scaled_early_indices():
    assert Ct.scaled_early_indices(1024) == [10, 50, 100]
    assert Ct.scaled_early_indices(512) == [10, 50, 100]
    assert Ct.scaled_early_indices(256) == [5, 25, 50]


def test_model_size_counts_non_embedding_parameters():
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=32, d_vocab=50, layer_norm=False)
    s = Ct.model_size(cfg)
    m = Transformer(cfg)
    assert s["params"] == sum(p.numel() for p in m.parameters())
    # attention-only, no LayerNorm: 4 matrices of d_model x d_model per layer (+ smear/bias-free)
    assert s["non_embedding_params"] == 2 * 4 * 16 * 16


def test_repeated_passage_is_bos_plus_two_copies():
    x = torch.arange(100, 165)[None]  # (1, 65): "BOS" then 64 tokens
    run = SimpleNamespace(eval_data=SimpleNamespace(tokens=x))
    p = PS.repeated_passage(run, 0)[0]
    half = 32
    assert p.shape[0] == 1 + 2 * half
    assert p[0] == 100
    assert torch.equal(p[1:1 + half], p[1 + half:])


# --- a fake run with a known phase change: the whole Argument-1 row, end to end ------------------

def _fake_run(n_layers, induction, seed=0, centre=2e5, smeared=False):
    t = np.r_[0, np.geomspace(1e3, 1e7, 40)].round()
    lt = np.log(np.maximum(t, 1))
    icl = -0.02 - 0.4 * _sig((lt - np.log(centre)) * 4)
    pm = 0.03 + (0.6 * _sig((lt - np.log(centre)) * 4) if induction else 0)
    loss_drop = 0.3 * _sig((lt - np.log(centre)) * 4) if induction else 0
    loss = 7 - 3 * _sig((lt - np.log(3e3)) * 3) - 0.1 * (lt - lt[1]).clip(0) - loss_drop
    df = pd.DataFrame({"step": np.arange(len(t)), "tokens": t, "loss": loss, "icl": icl, "icl_band": icl,
                       "prefix_max": pm})
    steps = np.arange(1, 2001)
    tt = np.geomspace(1e3, 1e7, 2000)
    ll = np.log(tt)
    tl = 7 - 3 * _sig((ll - np.log(3e3)) * 3) - 0.1 * (ll - ll[0]) - (0.3 * _sig((ll - np.log(centre)) * 4) if induction else 0)
    log = pd.DataFrame({"step": steps, "loss": tl, "tokens": tt})
    cfg = SimpleNamespace(model=SimpleNamespace(n_layers=n_layers, attn_only=True, smeared_keys=smeared, d_model=8, n_heads=2),
                          train=SimpleNamespace(seed=seed))
    return SimpleNamespace(name=f"fake{n_layers}_{seed}{'_smeared' if smeared else ''}", config=cfg, metrics=lambda: df,
                           train_log=lambda: log, steps=list(df["step"]))


def test_cooccurrence_row_on_a_known_phase_change():
    r = Co.cooccurrence_row(_fake_run(2, True), "2L")
    assert r["window_found"] and r["window_start"] < 2e5 < r["window_end"]
    assert r["prefix_jump_in_window"]
    assert r["bump_found"] and r["bump_in_window"]
    assert r["icl_before"] > r["icl_after"]
    assert 0 < r["frac_icl_in_window"] <= 1
    assert r["verdict"] == "co-occur"
    assert r["top_prefix_layer"] is None  # the fake run logs no per-head scores


def test_top_layer_finds_the_circuit():
    import pandas as pd
    df = pd.DataFrame({"prefix": [None, [[0.02, 0.01], [0.05, 0.44]]], "prev_token": [None, [[0.1, 0.46], [0.3, 0.2]]]})
    assert Co.top_layer(df, "prefix") == 1 and Co.top_layer(df, "prev_token") == 0
    assert Co.top_layer(df.drop(columns="prefix"), "prefix") is None
    row = {"run": "x", "window_found": False, "final_prefix": 0.44, "top_prefix_layer": 1, "top_prev_layer": 0,
           "prefix_jump_found": False}
    assert "layer 1; the top previous-token head is in layer 0" in Co.prefix_summary(pd.DataFrame([row]))


def test_cooccurrence_row_icl_without_induction_heads():
    r = Co.cooccurrence_row(_fake_run(1, False), "1L")
    assert r["window_found"]
    assert not r["prefix_jump_found"]
    assert not r["bump_found"]
    assert r["verdict"] == "ICL window without an induction-head jump"


def test_table_headline_and_verdicts():
    tab = Co.cooccurrence_table({"1L": [_fake_run(1, False)], "2L": [_fake_run(2, True, s) for s in range(3)]})
    assert list(tab["verdict"]) == ["ICL window without an induction-head jump"] + ["co-occur"] * 3
    assert Co.headline(tab).startswith("**Reproduced")
    assert "co-occur in 3 of 3 seeds" in Co.cooccurrence_verdicts(tab)
    two = tab.iloc[:3]  # two seeds only: the effect in every run, but fewer than MIN_RUNS runs
    assert Co.headline(two).startswith("**Partly reproduced") and "at least 3" in Co.headline(two)
    shown = Co.display_table(tab)
    assert shown.index[-1][0].startswith("paper")
    assert Co.showcase_run(tab) == "fake2_0"


def test_run_verdict_rules():
    base = {"window_found": True, "prefix_jump_in_window": True, "final_prefix": 0.5,
            "bump_in_window": False, "eval_bump_in_window": False}
    assert Co.run_verdict(base) == "co-occur (no bump)"
    assert Co.run_verdict({**base, "eval_bump_in_window": True}) == "co-occur"
    assert Co.run_verdict({**base, "final_prefix": 0.1}) == "ICL window without an induction-head jump"
    assert Co.run_verdict({**base, "window_found": False}) == "no ICL window"


def _family(**over):
    rows = [
        dict(model="a1", layers=1, MLPs=False, corpus="c", final_icl=-0.05, final_prefix=0.03, top_layer=0,
             top_layer_from_end=0, window_found=False, window_peak=np.nan, verdict="no ICL window"),
        dict(model="a2", layers=2, MLPs=False, corpus="c", final_icl=-0.40, final_prefix=0.6, top_layer=1,
             top_layer_from_end=0, window_found=True, window_peak=1e5, verdict="co-occur"),
        dict(model="a3", layers=3, MLPs=False, corpus="c", final_icl=-0.42, final_prefix=0.7, top_layer=2,
             top_layer_from_end=0, window_found=True, window_peak=1.5e5, verdict="co-occur"),
    dict(model="a4", layers=4, MLPs=False, corpus="c", final_icl=-0.41, final_prefix=0.7, top_layer=3,
             top_layer_from_end=0, window_found=True, window_peak=1.2e5, verdict="co-occur"),
    ]
    df = pd.DataFrame(rows)
    for k, v in over.items():
        df[k] = v
    return df


def test_claims_table_marks_reproduced_and_not():
    c = Ct.claims_table(_family())
    assert (c["verdict"] == "reproduced").all(), c
    c2 = Ct.claims_table(_family(final_prefix=[0.03, 0.05, 0.6, 0.6], verdict=["no ICL window", "no ICL window", "co-occur", "co-occur"]))
    v = c2["verdict"]
    assert v.iloc[0] == "partly" and v.iloc[1] == "partly"
    assert "claims checked" in Ct.claims_sentence(c2)


def test_claims_index_pairs_rule():
    fam = _family()
    pairs = pd.DataFrame([{"run": r, "tokens": 1.0, "late": 250, "early": e, "early_paper": e, "icl": v}
                          for e in (5, 25) for r, v in (("a1", -0.05), ("a2", -0.4), ("a3", -0.45), ("a4", -0.42))])
    c = Ct.claims_table(fam, pairs)
    row = c.loc["The conclusion does not hang on the index pair"]
    assert row["verdict"] == "reproduced"
    assert "Spearman" in Ct.index_pair_sentence(pairs.assign(run=pairs.run))


@pytest.mark.parametrize("n_models,grid,hidden", [(2, (2, 2), 0), (4, (2, 4), 0), (7, (4, 4), 2)])
def test_head_score_figure_wraps_after_four_models(n_models, grid, hidden):
    """Chapter 1's head-score figure: at most four models side by side, then another row pair."""
    import matplotlib
    matplotlib.use("Agg")
    from icl_core.plots import cooccurrence as P
    from icl_core.curves import Window
    t = np.array([0.0, 1e3, 1e4, 1e5])
    data = {f"m{i}": (t, np.random.default_rng(i).random((4, 2, 3)), np.random.default_rng(i + 9).random((4, 2, 3)))
            for i in range(n_models)}
    fig = P.plot_head_score_curves(data, {"m0": Window(1e3, 1e4, 5e3, True)})
    axes = fig.axes
    assert len(axes) == grid[0] * grid[1]
    assert sum(not a.get_visible() for a in axes) == hidden
    titles = [a.get_title() for a in axes if a.get_visible() and a.get_title()]
    assert titles == [f"m{i}" for i in range(n_models)]  # every model once, in order
    import matplotlib.pyplot as plt
    plt.close(fig)

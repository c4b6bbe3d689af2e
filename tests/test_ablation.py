"""Chapter 3 logic (icl_core.ablation): head sets, batched set ablation, verdicts, and one tiny trained run."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from icl_core import ablation as AB
from icl_core import metrics as M

from .conftest import tiny_model


def test_random_head_sets_exhaustive_or_sampled():
    cand = [(0, 0), (0, 1), (1, 0), (1, 1)]
    sets, exhaustive = AB.random_head_sets(cand, 2, n_draws=20)
    assert exhaustive and len(sets) == math.comb(4, 2) == len(set(sets))
    many = [(l, h) for l in range(3) for h in range(4)]
    sets, exhaustive = AB.random_head_sets(many, 3, n_draws=20, seed=1)
    assert not exhaustive and len(sets) == 20 == len(set(sets))
    assert all(len(set(s)) == 3 and set(s) <= set(many) for s in sets)
    assert sets == AB.random_head_sets(many, 3, n_draws=20, seed=1)[0]  # seeded
    assert AB.random_head_sets(cand, 0, 20) == ([], False)
    assert AB.random_head_sets(cand, 5, 20) == ([], False)


def test_fraction_removed():
    np.testing.assert_allclose(AB.fraction_removed(-0.5, [-0.5, 0.0, -0.1, -0.6]), [0, 1, 0.8, -0.2])
    assert np.isnan(AB.fraction_removed(0.1, [-0.1])).all()


def test_heads_mask():
    m = AB.heads_mask([(0, 1), (1, 0)], 2, 2)
    assert m.tolist() == [[False, True], [True, False]]


def test_set_ablation_known_answers():
    model = tiny_model(n_layers=1, n_heads=2)
    x = torch.randint(0, 50, (6, 64), generator=torch.Generator().manual_seed(0))
    masks = torch.stack([AB.heads_mask([], 1, 2), AB.heads_mask([(0, 0), (0, 1)], 1, 2)])
    for pp in (True, False):
        icl = AB.set_ablation_icl(model, x, masks, pattern_preserving=pp)
        band = lambda m: M.icl_score_from_losses(M.per_token_losses(m, x), 64, band=True)  # noqa: E731
        assert icl[0] == pytest.approx(band(model), abs=1e-5)  # empty set = clean
        # all heads of a 1-layer attention-only model ablated = a model whose W_O is zero
        z = tiny_model(n_layers=1, n_heads=2)
        with torch.no_grad():
            z.blocks[0].attn.W_O_.zero_()
        assert icl[1] == pytest.approx(band(z), abs=1e-5)


def overview(kinds_heads):
    return pd.DataFrame([{"run": r, "kind": k, "induction heads": n} for r, k, n in kinds_heads]).set_index("run")


def test_evidence_prefers_vanilla_then_smeared_and_flags_mlp():
    main, s = AB.evidence_sentence(overview([("attn2", "attention-only", 2), ("smear2", "smeared keys", 1),
                                             ("mlp2", "with MLPs", 1)]))
    assert main == ["attn2"] and "weaker evidence" in s
    main, s = AB.evidence_sentence(overview([("attn2", "attention-only", 0), ("smear1", "smeared keys", 2)]))
    assert main == ["smear1"] and "No vanilla attention-only run" in s
    main, s = AB.evidence_sentence(overview([("attn2", "attention-only", 0), ("mlp2", "with MLPs", 0)]))
    assert main == [] and "No run" in s and "weaker evidence" in s


def table(clean, ind, rnd, n_ind=2):
    rnd = np.asarray(rnd, dtype=float)
    d = {"clean": clean, "induction": ind, "previous_token": float("nan"), "random": rnd,
         "random_mean": float(rnd.mean()) if len(rnd) else float("nan"),
         "random_interval": tuple(np.quantile(rnd, [0.025, 0.975])) if len(rnd) else (float("nan"),) * 2}
    return {"induction": [(1, h) for h in range(n_ind)], "previous_token": [], "random_sets": [()] * len(rnd),
            "exhaustive": False, "interval": 0.95, "pp": d, "full": d, "seconds": 0.0}


def test_ablation_verdict():
    ok, s = AB.ablation_verdict("r", table(-0.5, -0.05, [-0.5, -0.48, -0.45, -0.52]))
    assert ok is True and "90%" in s
    ok, _ = AB.ablation_verdict("r", table(-0.5, -0.05, [-0.5, -0.1, -0.2, -0.52]))  # random removes too much
    assert ok is False
    ok, _ = AB.ablation_verdict("r", table(-0.5, -0.3, [-0.5, -0.5]))  # induction removes only 40%
    assert ok is False
    assert AB.ablation_verdict("r", table(-0.5, -0.5, [], n_ind=0))[0] is None
    assert AB.ablation_verdict("r", table(0.1, 0.1, [0.1]))[0] is None


def test_table_rows_format_every_condition():
    rows = AB.table_rows("r", table(-0.5, -0.05, [-0.5, -0.45]))
    assert [r["ablated"] for r in rows] == ["clean", "induction heads", "random non-induction heads",
                                             "previous-token heads"]
    assert rows[1]["ICL removed (pattern-preserving)"] == "90%"
    assert rows[3]["ICL (full)"] == "no such head"


def test_on_a_tiny_trained_run(tiny_run_cfg, tmp_path):
    from icl_core.runs import get_or_train

    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    res = AB.ablation_over_training(run, n_steps=3, n_examples=4, n_steps_full=2)
    L, H = run.config.model.n_layers, run.config.model.n_heads
    s0, s1 = res["ba_steps"]
    for mode in ("pp", "full"):
        assert res[f"delta_icl_{mode}"].shape == (len(res[f"steps_{mode}"]), L, H)
        assert {s0, s1} <= set(res[f"steps_{mode}"].tolist())
        assert np.isfinite(res[f"projection_{mode}"]).all()
    labels = np.full((L, H), "other", dtype=object)
    labels[1, 0] = "induction"
    labels[0, 1] = "previous-token"
    t = AB.final_ablation_table(run, labels, n_examples=4, n_draws=5)
    assert t["induction"] == [(1, 0)] and t["previous_token"] == [(0, 1)]
    assert len(t["random_sets"]) == 3 and t["exhaustive"]  # 3 non-induction heads, 1 per set
    clean = M.per_token_losses(run.load(), run.eval_data.tokens[:4])
    assert t["pp"]["clean"] == pytest.approx(M.icl_score_from_losses(clean, run.config.model.n_ctx, band=True), abs=1e-4)
    again = AB.final_ablation_table(run, labels, n_examples=4, n_draws=5)  # cached
    assert again["pp"]["induction"] == t["pp"]["induction"]
    assert len(AB.table_frame({"tiny": t})) == 4


def test_warm_caches_exactly_what_compute_reads(tiny_run_cfg, tmp_path):
    """Each part warmed alone (as benchmarks/gpu/run_profile.py does in separate processes) leaves the
    chapter's own calls nothing to compute: no new cache file, the same numbers."""
    from icl_core.runs import get_or_train

    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    kw = dict(n_steps=3, n_examples=4, n_random_draws=5, n_steps_full=2, n_table_examples=6)
    for part in AB.PARTS:
        assert AB.warm(run, part, **kw) >= 0
    files = sorted(p.name for p in (run.path / "analysis").iterdir())
    assert sum(f.startswith("ablations-") for f in files) == 4 and any(f.startswith("ablation_sets-") for f in files)
    res = AB.ablation_over_training(run, n_steps=3, n_examples=4, n_steps_full=2)
    t = AB.final_ablation_table(run, AB.head_labels(run), n_examples=6, n_draws=5)
    assert sorted(p.name for p in (run.path / "analysis").iterdir()) == files  # all loaded, nothing new
    assert {"delta_icl_pp", "delta_icl_full"} <= set(res) and t["n_examples"] == 6
    only_pp = AB.ablation_over_training(run, n_steps=3, n_examples=4, n_steps_full=2, modes=("pp",))
    assert "delta_icl_full" not in only_pp and np.array_equal(only_pp["delta_icl_pp"], res["delta_icl_pp"])
    with pytest.raises(ValueError, match="unknown part 'nope'"):
        AB.warm(run, "nope", **kw)


def fake_run(icl_band):
    from types import SimpleNamespace
    steps = [0] + [2 ** i for i in range(len(icl_band) - 1)]
    tokens = [1000 * s for s in steps]
    df = pd.DataFrame({"step": steps, "tokens": tokens, "icl": icl_band, "icl_band": icl_band})
    cfg = SimpleNamespace(tokens_per_step=1000)
    return SimpleNamespace(steps=steps, metrics=lambda: df, config=cfg, tokens=lambda s: 1000 * s)


def test_before_after_uses_the_window_or_falls_back_labelled():
    drop = [0.0, 0.0, -0.01, -0.02, -0.3, -0.5, -0.52, -0.53]
    run = fake_run(drop)
    s0, s1, label = AB.before_after_steps(run)
    assert s0 < s1 and "phase-change window" in label and (s0, s1) != (0, 64)
    flat = fake_run([0.0] * 8)
    assert AB.before_after_steps(flat)[:2] == (0, 64)
    assert "first and last snapshots" in AB.before_after_steps(flat)[2]
    # a window holding less than min_share of the run's ICL change is not taken as the phase change
    s0, s1, label = AB.before_after_steps(run, min_share=0.999)
    assert (s0, s1) == (0, 64) and "under 100%" in label


def _table(clean, ind, rnd):
    return {"induction": [(1, 0)], "random_sets": [[(0, 1)]] * len(rnd), "exhaustive": False, "interval": 0.95,
            "pp": {"clean": clean, "induction": ind, "random": np.asarray(rnd), "random_mean": float(np.mean(rnd)),
                   "random_interval": (min(rnd), max(rnd))}}


def test_seed_spread_reports_every_seed_with_an_interval():
    """Old mistake: Argument 3 rested on one run (attn3); its other seeds were never ablated."""
    import pandas as pd
    ov = pd.DataFrame([{"run": r, "kind": "attention-only", "layers": 2} for r in ("a", "b", "c")]
                      + [{"run": "m", "kind": "with MLPs", "layers": 2}]).set_index("run")
    tabs = {"a": _table(-0.4, -0.04, [-0.39, -0.38]), "b": _table(-0.4, -0.1, [-0.4, -0.37]),
            "c": _table(-0.4, -0.2, [-0.4, -0.38]), "m": _table(-0.3, 0.0, [-0.3])}
    t = AB.seed_spread(ov, tabs)
    assert len(t) == 1  # the one-seed MLP model has no spread
    r = t.iloc[0]
    assert r["seeds"] == 3 and r["tested"] == 3
    assert r["mean removed"] == pytest.approx((0.9 + 0.75 + 0.5) / 3)
    assert r["interval low"] < 0.5 < 0.9 < r["interval high"]  # three seeds give a wide t-interval
    assert r["test passes"] == 2  # c removes only 50% < REMOVAL_THRESHOLD
    # a seed without an induction head is not tested and not averaged
    tabs["c"]["induction"] = []
    r = AB.seed_spread(ov, tabs).iloc[0]
    assert r["tested"] == 2 and r["mean removed"] == pytest.approx(0.825) and "`c` n/a" in r["removed per seed"]


def test_centred_before_after_vector_ignores_a_global_loss_shift():
    """Old mistake: in attn3 the most negative projection was a non-induction head (L0H1, -6.85 vs the
    induction head's -6.22) because the window's vector is mostly the loss falling everywhere."""
    rng = np.random.default_rng(0)
    n = 128
    start = rng.normal(5, 1, n)
    rep = np.zeros(n, bool)
    rep[::4] = True  # tokens induction can help
    end = start - 1.0 - 0.6 * rep  # everything falls by 1 nat, repeated tokens by 0.6 more
    assert M.global_shift_share(start, end) > 0.8
    assert M.global_shift_share(start, start + rng.normal(0, 1, n) - rng.normal(0, 1, n).mean()) < 0.2
    u, uc = M.before_after_vector(start, end), M.before_after_vector(start, end, centred=True)
    assert abs(uc.sum()) < 1e-9 and np.linalg.norm(uc) == pytest.approx(1)
    clean = end
    generic = clean + 0.8  # a head whose ablation raises the loss everywhere
    induction = clean + 0.6 * rep  # the induction head: undoes exactly the repeated tokens' gain
    ablated = np.stack([generic, induction])
    raw = M.before_after_projection(u, clean, ablated)
    cen = M.before_after_projection(uc, clean, ablated)
    assert raw[0] < raw[1]  # the paper's vector ranks the generic head first (the old mistake)
    assert cen[1] < cen[0] and cen[0] == pytest.approx(0, abs=1e-9)  # centred: only the induction head
    labels = np.array([["other", "induction"]])
    s = {"n_induction": 1, "most_negative_centred_head": (0, int(np.argmin(cen)))}
    assert AB.projection_specific(s, labels) is True
    assert AB.projection_specific({"n_induction": 0}, labels) is None

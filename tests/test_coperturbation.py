"""Chapter 2 logic (icl_core.coperturbation): pairing, table, verdicts, seed bands — on synthetic curves."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from icl_core import coperturbation as C
from icl_core.curves import Window

TOKENS = np.array([0, 1e3, 2e3, 4e3, 8e3, 16e3, 32e3, 64e3, 128e3])


def frame(icl, prefix, smear=None):
    df = pd.DataFrame({"tokens": TOKENS, "loss": np.linspace(7, 4, len(TOKENS)), "icl": icl,
                       "prefix_max": prefix})
    df["smear"] = [smear] * len(TOKENS) if smear is not None else None
    return df


FLAT = np.full(len(TOKENS), -0.02)
DROP = np.array([-0.02, -0.02, -0.03, -0.05, -0.4, -0.6, -0.62, -0.63, -0.63])  # falls at 4k-16k


def curves(name, seed, layers, smeared, icl, prefix_final, window=None):
    pm = np.full(len(TOKENS), 0.03)
    pm[-1] = prefix_final
    sm = [[0.5] * 2] * layers if smeared else None
    return C.curves_from_metrics(name, seed, layers, smeared, frame(icl, pm, sm), window=window)


def one_layer_pairs(gains_ok=(True, True)):
    out = []
    for seed, ok in enumerate(gains_ok):
        van = curves(f"attn1_s{seed}", seed, 1, False, FLAT, 0.03)
        sm = curves(f"smear1_s{seed}", seed, 1, True, DROP if ok else FLAT - 0.1, 0.6 if ok else 0.1)
        out.append((van, sm))
    return {"1L": out}


def test_window_detected_from_icl_curve_only_when_icl_falls():
    assert curves("a", 0, 1, True, DROP, 0.6).window.found
    assert not curves("a", 0, 1, False, FLAT, 0.03).window.found


def test_smear_curve_is_read_per_layer_and_head():
    c = curves("s", 0, 2, True, DROP, 0.6)
    assert c.smear.shape == (len(TOKENS), 2, 2)
    assert curves("v", 0, 2, False, FLAT, 0.03).smear is None


def test_pair_table_gain_is_vanilla_minus_smeared():
    t = C.pair_table(one_layer_pairs())
    assert len(t) == 2
    assert t["ICL gain (smeared)"].iloc[0] == pytest.approx(-0.02 - (-0.63))
    assert t["smeared induction head"].all() and not t["vanilla induction head"].any()


def test_one_layer_verdict_requires_every_seed():
    ok, s = C.one_layer_verdict(C.pair_table(one_layer_pairs((True, True, True))))
    assert ok is True and s.startswith("**Reproduced")
    ok, s = C.one_layer_verdict(C.pair_table(one_layer_pairs()))  # every seed, but fewer than MIN_RUNS
    assert ok == "partly" and s.startswith("**Partly reproduced") and "reproduced needs ≥ 3" in s
    assert "partly reproduced" in C.summary_sentence(ok, "untested")
    ok, s = C.one_layer_verdict(C.pair_table(one_layer_pairs((True, False))))
    assert ok is False and "1 of 2" in s
    ok, _ = C.one_layer_verdict(C.pair_table({"2L": one_layer_pairs()["1L"]}).assign(layers=2))
    assert ok is None


def two_layer_table(v_window, s_window):
    van = curves("attn2", 0, 2, False, DROP, 0.6, window=v_window)
    sm = curves("smear2", 0, 2, True, DROP, 0.6, window=s_window)
    return C.pair_table({"2L": [(van, sm)]})


W_NONE = Window(np.nan, np.nan, np.nan, False, "flat")


@pytest.mark.parametrize("v, s, verdict", [
    (Window(8e3, 32e3, 16e3, True), Window(1e3, 4e3, 2e3, True), "earlier"),
    (Window(8e3, 32e3, 16e3, True), Window(4e3, 16e3, 8e3, True), "earlier (overlapping windows)"),
    (Window(2e3, 8e3, 4e3, True), Window(8e3, 32e3, 16e3, True), "later"),
    (Window(8e3, 32e3, 16e3, True), Window(8e3, 32e3, 16e3, True), "mixed"),
    (W_NONE, Window(1e3, 4e3, 2e3, True), "not resolved"),
])
def test_two_layer_comparison(v, s, verdict):
    got, sentence = C.two_layer_comparison(two_layer_table(v, s))
    assert got == verdict
    if verdict == "not resolved":
        assert "vanilla 2-layer model" in sentence


def test_seed_band_mean_min_max():
    a = curves("a", 0, 1, False, FLAT, 0.03)
    b = curves("b", 1, 1, False, FLAT - 0.2, 0.03)
    t, mean, lo, hi = C.seed_band([a, b], "icl")
    assert (t > 0).all() and len(t) == len(TOKENS) - 1
    np.testing.assert_allclose(mean, -0.12)
    np.testing.assert_allclose(lo, -0.22)
    np.testing.assert_allclose(hi, -0.02)


def test_load_pairs_refuses_non_twins():
    def fake_run(name, seed, layers, smeared):
        cfg = SimpleNamespace(model=SimpleNamespace(n_layers=layers, smeared_keys=smeared), train=SimpleNamespace(seed=seed))
        sm = [[0.5, 0.5]] * layers if smeared else None
        df = frame(DROP, np.full(len(TOKENS), 0.03), sm)
        return SimpleNamespace(name=name, config=cfg, metrics=lambda: df)

    runs = {"v": fake_run("v", 0, 1, False), "s": fake_run("s", 0, 1, True), "s1": fake_run("s1", 1, 1, True)}
    prof = SimpleNamespace(run=lambda n: runs[n])
    assert len(C.load_pairs(prof, {"1L": [["v", "s"]]})["1L"]) == 1
    with pytest.raises(ValueError, match="seed"):
        C.load_pairs(prof, {"1L": [["v", "s1"]]})
    with pytest.raises(ValueError, match="vanilla run then a smeared"):
        C.load_pairs(prof, {"1L": [["s", "v"]]})


def test_summary_sentence_is_conditional():
    assert "as the paper found" in C.summary_sentence(True, "earlier")
    assert "does not reproduce" in C.summary_sentence(False, "not resolved")


def test_twins_of_different_lengths_are_compared_at_the_common_budget():
    """A vanilla twin trained twice as long is read at the smeared twin's last snapshot, not its own."""
    van = curves("attn3", 0, 3, False, DROP, 0.6)  # its head appears only at the last snapshot
    short = dataclasses.replace(curves("smear3", 0, 3, True, DROP, 0.5))
    keep = TOKENS <= 64e3
    for f in ("tokens", "loss", "icl", "prefix_max"):
        setattr(short, f, getattr(short, f)[keep])
    short.prefix_max[-1] = 0.5
    t = C.pair_table({"3L": [(van, short)]}).iloc[0]
    assert t["compared at"] == 64e3
    assert t["vanilla final ICL"] == DROP[7] and t["vanilla top prefix"] == 0.03  # at 64k, not at 128k
    assert t["smeared top prefix"] == 0.5 and not t["vanilla induction head"]
    same = C.pair_table({"3L": [(van, van)]}).iloc[0]
    assert same["compared at"] == 128e3 and same["vanilla top prefix"] == 0.6
    assert "compared at" in C.table_for_display(C.pair_table({"3L": [(van, short)]})).columns


def test_multi_layer_comparison_is_per_depth_then_combined():
    """A 2-layer pair with no vanilla phase change does not hide a resolved 3-layer pair."""
    early, late = Window(1e3, 4e3, 2e3, True), Window(8e3, 32e3, 16e3, True)
    def pair(layers, v, s):
        return (curves(f"attn{layers}", 0, layers, False, DROP, 0.6, window=v),
                curves(f"smear{layers}", 0, layers, True, DROP, 0.6, window=s))
    t = C.pair_table({"2L": [pair(2, W_NONE, early)], "3L": [pair(3, late, early)]})
    verdict, sentence = C.two_layer_comparison(t)
    assert verdict == "earlier"
    assert "*2 layers:*" in sentence and "vanilla 2-layer model" in sentence and "*3 layers:* **Earlier**: partly (1 of 1 seeds; reproduced needs ≥ 3)." in sentence
    t2 = C.pair_table({"2L": [pair(2, early, late)], "3L": [pair(3, late, early)]})
    assert C.two_layer_comparison(t2)[0] == "mixed"
    t3 = C.pair_table({"2L": [pair(2, W_NONE, early)], "3L": [pair(3, W_NONE, early)]})
    assert C.two_layer_comparison(t3)[0] == "not resolved"

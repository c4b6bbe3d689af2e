"""icl_core.verdicts: known answers on both sides of every margin, and the verdicts of issue 22 that
said more than their numbers (each test builds the case the old computation got wrong)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from icl_core import continuity as Ct
from icl_core import cooccurrence as Co
from icl_core import corpus_mix as CM
from icl_core import stats as S
from icl_core import loss_pca as LP
from icl_core import verdicts as V
from icl_core import circuits as Ci
from icl_core.circuits import rotation_caveat
from icl_core.heads import INDUCTION_THRESHOLD, is_control


# --- the rules, with known answers ------------------------------------------------------------------

@pytest.mark.parametrize("k,n,status", [(3, 3, V.REPRODUCED), (4, 4, V.REPRODUCED), (2, 2, V.PARTLY),
                                        (1, 3, V.PARTLY), (3, 4, V.PARTLY), (0, 3, V.NULL), (0, 0, V.NOT_TESTABLE)])
def test_count_verdict_needs_min_runs(k, n, status):
    v = V.count_verdict(k, n)
    assert v.status == status
    if status == V.PARTLY:
        assert f"{k} of {n} runs" in v.text
    assert V.count_verdict(0, 2, null=V.NOT_REPRODUCED).status == V.NOT_REPRODUCED


@pytest.mark.parametrize("margin", [V.SHARE_MARGIN, V.LOSS_MARGIN])
def test_measurement_margin_both_sides(margin):
    assert V.measurement(margin * 1.1, margin * 0.5, margin * 2, 0.0, margin) == "above chance"
    assert V.measurement(margin * 0.9, margin * 0.5, margin * 2, 0.0, margin) == V.NULL
    assert V.measurement(-margin * 1.1, -margin * 2, -margin * 0.5, 0.0, margin) == "below chance"
    assert V.measurement(-margin * 0.9, -margin * 2, -margin * 0.5, 0.0, margin) == V.NULL


def test_composition_ok_both_sides_of_the_ratio_and_needs_an_induction_head():
    b = 0.1
    assert V.composition_ok(0.05, b * V.COMPOSITION_MIN_RATIO * 1.01, 0.05, b, True)
    assert not V.composition_ok(0.05, b * V.COMPOSITION_MIN_RATIO * 0.99, 0.05, b, True)
    assert not V.composition_ok(0.05, b * 3, 0.05, b, False)  # no induction head: not the circuit
    assert not V.composition_ok(b * 4, b * 3, 0.05, b, True)  # Q larger than K


def test_pivot_counts_both_sides_of_the_margins():
    lo, mg = V.PIVOT_MIN_DEG, V.PIVOT_MARGIN_DEG
    assert V.pivot_counts([lo + mg + 1] * 3, [1.0]).status == V.REPRODUCED
    assert V.pivot_counts([lo + mg - 1] * 3, [lo + 1]).status == V.NOT_REPRODUCED  # the 1-layer paths turn as much
    assert V.pivot_counts([lo + 1, lo + 4 * mg + 1], [lo + 1]).status == V.NOT_REPRODUCED  # 1-layer pivots too (book: 71° vs 55°)
    assert V.pivot_counts([lo + 1] * 3, [lo - mg + 2]).status == V.NULL  # within the margin of the 1-layer turn
    assert V.pivot_counts([lo - 1] * 3, [1.0]).status == V.NULL  # no turn beyond the wobble
    assert V.pivot_counts([lo + mg + 1, lo - 1, lo - 1], [1.0]).status == V.PARTLY
    assert V.pivot_counts([lo + mg + 1] * 3, [np.nan]).status == V.PARTLY  # no 1-layer path: at most partly
    assert V.pivot_counts([np.nan], [1.0]).status == V.NOT_TESTABLE


def test_is_control():
    assert is_control(1, False, INDUCTION_THRESHOLD - 0.01)
    assert not is_control(1, False, INDUCTION_THRESHOLD)
    assert not is_control(1, True, 0.0)  # smeared keys: the model under test, not a control
    assert not is_control(2, False, 0.0)


# --- the sentences of issue 22 ----------------------------------------------------------------------

def _row(**kw):
    base = dict(model="1L smeared keys", run="smear1", layers=1, seed=0, window_found=True, final_prefix=0.77,
                final_icl=-0.3, verdict="co-occur", smeared=True)
    base.update(kw)
    base["induction_head"] = base["final_prefix"] >= INDUCTION_THRESHOLD
    base["control"] = is_control(base["layers"], base["smeared"], base["final_prefix"])
    return base


def test_smeared_one_layer_runs_are_not_controls():
    """Old: every 1-layer run was 'the one-layer control', so smeared runs with an induction head
    (top prefix 0.77, verdict co-occur) were said to show 'ICL that improves without an induction head'."""
    tab = pd.DataFrame([_row(run="smear1"), _row(run="smear1_s1", seed=1),
                        _row(model="2L smeared keys", run="smear2", layers=2)])
    s = Co.headline(tab)
    assert "without an induction head" not in s and "control finds" not in s
    assert "not controls: 2 of 2 form an induction head, and in 2 it forms inside the ICL window" in s
    vanilla = pd.concat([tab, pd.DataFrame([_row(model="1L", run="attn1", smeared=False, final_prefix=0.05,
                                                 verdict="ICL window without an induction-head jump")])])
    assert "controls (vanilla, no induction head) find an ICL window in 1 of 1" in Co.headline(vanilla)


def _pattern(share, lo, hi, acc=0.25):
    s = {"head": (2, 0), "n_seqs": 64}
    for key, (v, a, b, ch) in {"share": (share, lo, hi, 0.25), "label_share": (share, lo, hi, 0.25),
                               "accuracy": (acc, acc - 0.05, acc + 0.05, 0.25)}.items():
        s.update({key: v, f"{key}_lo": a, f"{key}_hi": b, f"{key}_chance": ch})
    return {"summary": s}


def _heads(model, kind):
    return pd.DataFrame([{"model": model, "layer": 0, "head": 0, "kind": kind}])


def test_abstract_pattern_matching_inside_the_margin_is_not_partly():
    """Old: a share of 0.254 against chance 0.250 (interval just above chance), accuracy at chance,
    read 'partly' reproduced."""
    t = S.summary_table({}, {"attn3": _pattern(0.254, 0.2505, 0.258)}, _heads("attn3", "induction"))
    st = S.behaviour_status(t).set_index("behaviour")["status"]
    assert st["abstract pattern matching"] == V.NULL
    assert "is **not distinguishable from chance**" in S.behaviour_sentences(S.behaviour_status(t))
    big = S.summary_table({}, {"attn3": _pattern(0.25 + 2 * V.SHARE_MARGIN, 0.25 + V.SHARE_MARGIN, 0.4)},
                          _heads("attn3", "induction"))
    assert S.behaviour_status(big).set_index("behaviour")["status"]["abstract pattern matching"] == S.IN_PART


def _paired(benefit):
    rows = pd.DataFrame([{"task": "exact repeat", "behaviour": "literal copying", "n": 48,
                          "attention": 0.02, "attention_lo": 0.01, "attention_hi": 0.03, "attention_chance": 0.02,
                          "loss_benefit": benefit, "loss_benefit_lo": benefit - 0.05, "loss_benefit_hi": benefit + 0.05}])
    return {"head": (1, 0, 0.1), "rows": rows}


def test_copying_without_an_induction_head_is_not_credited_to_one():
    """Old: literal copying was 'partly' present in models with no induction head, from the loss benefit alone."""
    t = S.summary_table({"attn2": _paired(0.8)}, {}, _heads("attn2", "other"))
    status = S.behaviour_status(t)
    assert status.set_index("behaviour")["status"]["literal copying"] == S.NO_HEAD
    text = S.behaviour_sentences(status)
    assert "partly" not in text and "not credited to induction heads in `attn2`" in text


def _composition(k, prefix, baseline=0.088):
    arr = lambda v: np.full((1, 2, 2, 2, 2), v)  # noqa: E731  (S, L, H, L, H)
    comp = {"attn2": {"baseline": baseline, "Q": arr(0.05), "K": arr(k), "V": arr(0.06)}}
    return Ci.Composition(comp, {"attn2": ((1, 0), (0, 1))}, "attn2", 0.0, {"attn2": prefix})


def test_composition_needs_a_margin_and_an_induction_head():
    """Old: K 0.106 > baseline 0.088 and K >= max(Q, V) counted as the circuit in a run without an induction head."""
    ct = Ci.composition_table(_composition(0.106, 0.1))
    assert not ct["K-circuit"].iloc[0]
    text = Ci.composition_text(ct)
    assert "0 of 1 models" in text and "**not distinguishable from chance**" in text and "has no induction head" in text and "not the paper's circuit" in text
    assert not Ci.composition_table(_composition(0.106, 0.8))["K-circuit"].iloc[0]  # inside the margin
    assert Ci.composition_table(_composition(0.2, 0.8))["K-circuit"].iloc[0]


def _turns(multi, single):
    return pd.DataFrame([{"model": f"m{i}", "run": f"m{i}", "layers": 2, "turn_reference_window": t} for i, t in enumerate(multi)]
                        + [{"model": f"s{i}", "run": f"s{i}", "layers": 1, "turn_reference_window": t} for i, t in enumerate(single)])


def _pca(multi, single):
    turns = _turns(multi, single)
    return LP.LossPCA({"coords": {}}, turns, 0.0, LP.pivot_verdict(turns))


def test_pca_sentence_has_a_verdict_without_one_layer_turns():
    """Old: with NaN 1-layer turns the sentence gave no verdict at all."""
    s = LP.pca_sentence(_pca([5.0, 8.0, 4.0], [np.nan, np.nan]))
    assert "**not distinguishable from chance**" in s and "no 1-layer path is long enough" in s


def test_pca_sentence_without_measurable_turns_says_not_testable():
    assert "**not testable**" in LP.pca_sentence(_pca([np.nan], [np.nan]))


def test_a_turn_shared_with_one_layer_runs_is_not_the_pivot():
    s = LP.pca_sentence(_pca([30.0, 33.0, 31.0], [29.0]))
    assert "**not reproduced**" in s and "shared with them" in s


def test_continuity_pca_row_quotes_the_one_verdict():
    """Old: chapter 6's claims table said 'partly' (1-layer mean below the ≥2-layer mean) while its
    sentence said 'not clearly reproduced', for turns of 3–10° against a 1-layer 5°."""
    pca = _pca([3.0, 10.0, 6.0], [5.0])
    fam = pd.DataFrame([dict(model="a1", layers=1, MLPs=False, corpus="c", final_icl=-0.05, final_prefix=0.03,
                             top_layer=0, top_layer_from_end=0, window_found=False, window_peak=np.nan, verdict="no ICL window")])
    row = Ct.claims_table(fam, None, pca).loc["PCA paths of ≥2-layer models pivot at the phase change, 1-layer paths do not"]
    assert row["verdict"] == pca.verdict.status == V.NULL
    assert f"**{pca.verdict.status}**" in LP.pca_sentence(pca)


def test_models_table_shows_each_seeds_tokens():
    """Old: the first seed's token count was shown for every seed of a model."""
    def run(name, seed, tokens):
        cfg = SimpleNamespace(model=SimpleNamespace(n_layers=2, d_model=8, n_heads=2, attn_only=True),
                              train=SimpleNamespace(seed=seed))
        df = pd.DataFrame({"tokens": [0, tokens]})
        return SimpleNamespace(name=name, config=cfg, metrics=lambda: df, steps=[0, 1])
    res = SimpleNamespace(models={"2L": [run("attn2", 0, 7_999_488), run("attn2_s1", 1, 4_000_000)]})
    line = Co.models_table(res).splitlines()[-1]
    assert "7,999,488" in line and "4,000,000" in line


# --- deviations, stated -----------------------------------------------------------------------------

def _fake_corpus(lengths, seed=0):
    g = np.random.default_rng(seed)
    docs = [np.r_[0, g.integers(1, 50, n)] for n in lengths]
    off = np.r_[0, np.cumsum([len(d) for d in docs])]
    return SimpleNamespace(val=np.concatenate(docs), val_offsets=off, val_ids=[f"code/p/{i}" for i in range(len(docs))])


def test_eval_window_sources_match_the_windows():
    from icl_core import data as D
    c = _fake_corpus([5, 40, 200, 90])
    docs, starts = D.eval_window_sources(c, 8, 32, 7)
    w = D.eval_windows(c, 8, 32, 7)
    for r, (d, s) in enumerate(zip(docs, starts)):
        assert (s - c.val_offsets[d]) % 32 == 0 and s + 32 <= c.val_offsets[d + 1]  # tiles the document
        assert torch.equal(w[r], torch.from_numpy(c.val[s:s + 32].astype(np.int64)))
        assert (w[r, 0] == D.EOS_ID) == (s == c.val_offsets[d])  # EOS only at a document start
    assert 0 not in set(docs.tolist())  # too short for a window
    assert len(set(starts.tolist())) == 8  # no window twice


def test_eval_windows_are_drawn_per_document_and_balanced():
    """Old mistake: windows drawn per token, so one long file dominated (143 of 256 sympy windows)."""
    from icl_core import data as D
    lengths = [3000] + [70] * 6 + [70] * 6  # one long code file, six short code files, six prose documents
    c = _fake_corpus(lengths)
    c.val_ids = ["code/p/0"] + [f"code/p/{i}" for i in range(1, 7)] + [f"bible/x/{i}" for i in range(6)]
    docs, _ = D.eval_window_sources(c, 24, 32, 0)
    kinds = [c.val_ids[d].split("/")[0] for d in docs]
    assert kinds.count("bible") == 12 and kinds.count("code") == 12  # equal shares
    # round-robin: each short code file gives both its windows before the long file gives a third
    assert sum(d == 0 for d in docs) <= 2
    # a group that runs out passes its shortfall on
    docs, _ = D.eval_window_sources(c, 40, 32, 0)
    kinds = [c.val_ids[d].split("/")[0] for d in docs]
    assert kinds.count("bible") == 12 and kinds.count("code") == 28
    from icl_core.config import ConfigError
    with pytest.raises(ConfigError, match="lower data.n_eval"):
        D.eval_window_sources(c, 10_000, 32, 0)


def test_corpus_kinds_and_bos_artefact():
    assert CM.kind("code/sympy/core/add.py") == "code" and CM.kind("bible/kjv/01001") == "prose"
    assert CM.source("code/sympy/core/add.py") == "code/sympy"
    art = CM.bos_artefact([np.r_[9.5, 6.0, 5.0, 5.0, 4.0, 3.0]], 2048)
    assert art["first"] == pytest.approx(9.5) and art["uniform"] == pytest.approx(np.log(2048))
    assert art["next"] == pytest.approx(5.0)
    assert "9.50 nats" in CM.bos_text(art) and "ln 2048" in CM.bos_text(art)
    shares = pd.DataFrame([{"split": "train", "kind": "code", "source": "code/sympy", "tokens": 7, "share": 0.7},
                           {"split": "train", "kind": "prose", "source": "bible/kjv", "tokens": 3, "share": 0.3},
                           {"split": "eval", "kind": "code", "source": "code/sympy", "tokens": 6, "share": 0.6},
                           {"split": "eval", "kind": "prose", "source": "bible/kjv", "tokens": 4, "share": 0.4}])
    assert CM.code_share(shares, "train") == pytest.approx(0.7)
    assert "70% Python" in CM.mix_text(shares) and "60% code" in CM.mix_text(shares)


def test_rotation_caveat_names_the_setting():
    run = lambda p: SimpleNamespace(config=SimpleNamespace(model=SimpleNamespace(positional=p)))  # noqa: E731
    s = rotation_caveat({"attn2": run("rope"), "attn3": run("rope")})
    assert "`attn2`, `attn3` use rotary" in s and "without the rotation" in s and "offset 0" in s
    assert "rotary" not in rotation_caveat({"attn2": run("shortformer")})


def test_icl_by_window_splits_the_logged_score(tiny_run_cfg, tmp_path):
    """The ICL score per kind and place of the evaluation windows: the 'all' row is the logged score
    (single-index, or banded with band=True), and the groups partition the windows."""
    from icl_core.runs import get_or_train
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    t = CM.icl_by_window(run)
    logged = run.metrics().iloc[-1]
    assert t.loc["all", "icl"] == pytest.approx(logged["icl_single"], abs=1e-6)
    assert CM.icl_by_window(run, band=True).loc["all", "icl"] == pytest.approx(logged["icl"], abs=1e-6)
    assert t["n"].drop("all").sum() == t.loc["all", "n"] == tiny_run_cfg.data.n_eval
    assert t.loc["prose, first", "n"] >= 1  # every document's first window counts
    early = CM.icl_by_window(run, run.steps[0])
    assert early.loc["all", "icl"] == pytest.approx(run.metrics().iloc[0]["icl_single"], abs=1e-6)


def test_icl_on_random_windows_known_answers(tiny_run_cfg, tmp_path):
    """Windows at random offsets of the validation stream: the scores are those of per_token_losses on
    exactly those windows, the 'inside' ones those without an EOS after their first token."""
    import numpy as np
    import torch
    from icl_core import metrics as M
    from icl_core.runs import get_or_train
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    r = CM.icl_on_random_windows(run, n=12, seed=3)
    n_ctx = run.config.model.n_ctx
    val = np.asarray(run.corpus.val)
    starts = np.random.default_rng(3).integers(0, len(val) - n_ctx, 12)
    toks = torch.from_numpy(np.stack([val[s:s + n_ctx] for s in starts]).astype(np.int64))
    L = M.per_token_losses(run.load(), toks, precision=run.metrics_precision)
    assert r["icl"] == pytest.approx(M.icl_score_from_losses(L, n_ctx), abs=1e-6)
    assert r["icl_band"] == pytest.approx(M.icl_band_score(L, n_ctx), abs=1e-6)
    inside = (toks[:, 1:] != 0).all(1)
    assert r["n"] == 12 and r["n_inside"] == int(inside.sum())
    if inside.any():
        assert r["icl_band_inside"] == pytest.approx(M.icl_band_score(L[inside], n_ctx), abs=1e-6)
    assert CM.icl_on_random_windows(run, n=12, seed=3) == r  # the same windows for the same seed


def test_window_rule_table_and_text(tiny_run_cfg, tmp_path):
    """The methods appendix's measure of the window rule: the logged score beside the random windows'."""
    from types import SimpleNamespace
    from icl_core.runs import get_or_train
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    prof = SimpleNamespace(runs={"attn2": None, "other": None}, run=lambda name: run)
    t = CM.window_rule_table(prof, n=16, seed=1)
    assert list(t.index) == ["attn2"]  # attn2_s1/_s2 absent from this profile
    r = CM.icl_on_random_windows(run, n=16, seed=1)
    assert t.loc["attn2", "random offsets"] == r["icl_band"]
    assert t.loc["attn2", "book's windows"] == pytest.approx(float(run.metrics()["icl"].iloc[-1]))
    assert t.loc["attn2", "book minus random"] == pytest.approx(t.loc["attn2", "book's windows"] - r["icl_band"])
    txt = CM.window_rule_text(t)
    assert "`attn2`" in txt and "16 windows drawn as training draws them" in txt and "[Deviation]" in txt
    assert "not measured" in CM.window_rule_text(CM.window_rule_table(SimpleNamespace(runs={}, run=None)))

    def untrained(name):
        raise FileNotFoundError(name)
    assert CM.window_rule_table(SimpleNamespace(runs={"attn2": None}, run=untrained)).empty  # the appendix trains nothing

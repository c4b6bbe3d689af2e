"""The reproduction scorecard (icl_core.scorecard): claims, rows from the chapters' own verdict
functions, results files (round trip, missing, bad), the landing page's table, the build's wiring."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import nbformat as nbf
import numpy as np
import pandas as pd
import pytest

from icl_core import ablation as AB
from icl_core import circuits as Ci
from icl_core import cooccurrence as Co
from icl_core import coperturbation as C
from icl_core import mechanism as Me
from icl_core import scorecard as SC
from icl_core import verdicts as V
from icl_core.book import pipeline

ROOT = Path(__file__).resolve().parent.parent


# --- the claims ------------------------------------------------------------------------------------

def test_claims_cover_the_six_arguments_with_at_least_ten_claims():
    assert len(SC.CLAIMS) >= 10
    assert {c.argument for c in SC.CLAIMS} == set(SC.CHAPTERS) == {1, 2, 3, 4, 5, 6}
    assert len({c.id for c in SC.CLAIMS}) == len(SC.CLAIMS)
    for c in SC.CLAIMS:
        assert c.text and c.paper and c.section and SC.anchor(c.section)
        assert (ROOT / "chapters" / f"{c.chapter}.ipynb").exists()


def test_every_claim_links_to_a_heading_of_its_chapter():
    """The section a claim names is a heading of its chapter's notebook, and every argument chapter
    ends with the scorecard section and its record() call."""
    for c in SC.CLAIMS:
        ids = SC.section_ids(ROOT / "chapters" / f"{c.chapter}.ipynb")
        assert SC.anchor(c.section) in ids, (c.id, c.section)
    for chapter in SC.CHAPTERS.values():
        nb = nbf.read(ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
        assert SC.anchor(SC.SCORECARD_HEADING) in SC.section_ids(ROOT / "chapters" / f"{chapter}.ipynb")
        assert "SC.record(profile" in nb.cells[-1].source


def test_anchor_and_section_ids_follow_jupyter_book(tmp_path):
    assert SC.anchor("The previous-token head's positional pattern") == "the-previous-token-head-s-positional-pattern"
    assert SC.anchor("Composition: which heads read which") == "composition-which-heads-read-which"
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell("# Title\n\n## A section\n\n```python\n# not a heading\n```\n#not either"),
                nbf.v4.new_code_cell("# a comment")]
    nbf.write(nb, tmp_path / "x.ipynb")
    assert SC.section_ids(tmp_path / "x.ipynb") == {"title", "a-section"}


# --- rows come from the chapters' own verdict functions ---------------------------------------------

def _co_row(model, run, layers, seed, verdict, prefix, smeared=False, window=True, bump=False):
    return {"model": model, "run": run, "layers": layers, "seed": seed, "verdict": verdict, "final_prefix": prefix,
            "induction_head": prefix >= 0.3, "smeared": smeared, "control": layers == 1 and not smeared and prefix < 0.3,
            "window_found": window, "icl_before": -0.05 if window else np.nan, "icl_after": -0.4 if window else np.nan,
            "frac_icl_in_window": 0.8 if window else np.nan, "bump_found": bump}


def _cooccurrence(one_layer_prefix=0.05):
    table = pd.DataFrame([_co_row("2L", "attn2", 2, 0, "co-occur", 0.6, bump=True),
                          _co_row("2L", "attn2_s1", 2, 1, "co-occur", 0.5, bump=True),
                          _co_row("3L", "attn3", 3, 0, "co-occur (no bump)", 0.7),
                          _co_row("1L", "attn1", 1, 0, "no ICL window", one_layer_prefix, window=False),
                          _co_row("1L", "attn1_s1", 1, 1, "no ICL window", 0.02, window=False)])
    turns = pd.DataFrame({"run": ["attn2", "attn2_s1", "attn3", "attn1", "attn1_s1"], "layers": [2, 2, 3, 1, 1],
                          "turn_reference_window": [60.0, 55.0, 70.0, 5.0, 8.0]})
    pca = SimpleNamespace(turns=turns, verdict=V.pivot_counts([60.0, 55.0, 70.0], [5.0, 8.0]))
    return SimpleNamespace(table=table), pca


def test_cooccurrence_rows_use_the_chapters_verdicts():
    res, pca = _cooccurrence()
    rows = {r.claim.id: r for r in SC.cooccurrence(res, pca)}
    assert list(rows) == ["phase_change", "loss_bump", "one_layer", "pca_pivot"]
    assert rows["phase_change"].status == V.REPRODUCED == Co.cooccurrence_verdict(res.table).status
    assert Co.headline(res.table).startswith("**Reproduced at this scale** (3 of 3 runs)")
    assert (rows["loss_bump"].status, rows["loss_bump"].verdict) == (V.PARTLY, "partly (2 of 3 runs)")
    assert rows["one_layer"].status == V.PARTLY and rows["one_layer"].verdict.startswith("partly (2 of 2 runs")
    assert rows["pca_pivot"].status == V.REPRODUCED
    assert "seeds 0, 1" in rows["phase_change"].runs and "3L: seed 0" in rows["phase_change"].runs
    assert "3 of 3 runs" in rows["phase_change"].build and "80%" in rows["phase_change"].build


def test_a_one_layer_induction_head_makes_cooccurrence_partly_in_the_chapter_and_the_scorecard():
    res, pca = _cooccurrence(one_layer_prefix=0.5)
    rows = {r.claim.id: r for r in SC.cooccurrence(res, pca)}
    assert rows["phase_change"].status == V.PARTLY == Co.cooccurrence_verdict(res.table).status
    text = Co.headline(res.table)
    assert text.startswith("**Partly reproduced at this scale:**") and "reproduced needs" not in text
    assert "1 vanilla one-layer run forms an induction head" in text
    assert rows["one_layer"].verdict == "partly (1 of 2 runs)"


def _pairs(layers, seeds, smeared_start, vanilla_start, prefix=(0.5, 0.1), gain=0.4):
    return [{"model": f"{layers}L", "layers": layers, "seed": s, "smeared top prefix": prefix[0],
             "vanilla top prefix": prefix[1], "ICL gain (smeared)": gain, "vanilla induction head": prefix[1] >= 0.3,
             "smeared window start": smeared_start, "smeared window end": smeared_start * 1.5 if np.isfinite(smeared_start) else np.nan,
             "vanilla window start": vanilla_start, "vanilla window end": vanilla_start * 1.5 if np.isfinite(vanilla_start) else np.nan}
            for s in seeds]


@pytest.mark.parametrize("smeared, vanilla, word, status", [
    (1e5, 1e6, "earlier", V.REPRODUCED), (2e6, 1e6, "later", V.NOT_REPRODUCED),
    (1e5, np.nan, "not resolved", V.NOT_TESTABLE)])
def test_coperturbation_rows_use_the_chapters_verdicts(smeared, vanilla, word, status):
    table = pd.DataFrame(_pairs(1, [0, 1, 2], np.nan, np.nan) + _pairs(2, [0, 1, 2], smeared, vanilla))
    rows = SC.coperturbation(SimpleNamespace(table=table))
    assert [r.claim.id for r in rows] == ["smeared_one_layer", "smeared_earlier"]
    assert rows[0].status == V.REPRODUCED and C.one_layer_verdict(table)[0] is True
    assert C.two_layer_comparison(table)[0] == word and rows[1].status == status
    assert rows[1].build.startswith(word)


def test_coperturbation_partly_when_a_seed_fails():
    table = pd.DataFrame(_pairs(1, [0, 1], np.nan, np.nan) + _pairs(1, [2], np.nan, np.nan, gain=0.0))
    v = C.one_layer_counts(table)
    assert (v.status, v.k, v.n) == (V.PARTLY, 2, 3)
    assert C.one_layer_verdict(table)[1].startswith("**Partly at this scale.** Only 2 of 3")
    assert SC.coperturbation(SimpleNamespace(table=table))[1].status == V.NOT_TESTABLE  # no 2-layer pair


def _ablation_table(induction_icl, clean=-0.4):
    return {"induction": [(1, 0)], "random_sets": [[(0, 0)], [(0, 1)]], "interval": 0.95, "exhaustive": True,
            "pp": {"clean": clean, "induction": induction_icl, "random_mean": -0.38, "random_interval": [-0.39, -0.37]}}


def test_ablation_row_uses_the_chapters_causal_verdict():
    runs = {n: SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(seed=s))) for n, s in
            (("attn2", 0), ("attn2_s1", 1), ("attn3", 0))}
    a = SimpleNamespace(runs=runs, main_runs=list(runs), tables={"attn2": _ablation_table(-0.02),
                        "attn2_s1": _ablation_table(-0.05), "attn3": _ablation_table(-0.3)})
    (r,) = SC.ablation(a)
    assert r.status == V.PARTLY == AB.causal_verdict(a).status and r.verdict == "partly (2 of 3 runs)"
    assert "attn2 95%" in r.build and "random heads 5%" in r.build and "attn2_s1: seed 1" in r.runs
    a.tables["attn3"] = _ablation_table(-0.01)
    assert SC.ablation(a)[0].status == V.REPRODUCED
    a.main_runs = []
    assert SC.ablation(a)[0].status == V.NOT_TESTABLE


def test_generality_rows_use_behaviour_verdicts():
    status = pd.DataFrame([{"model": m, "behaviour": b, "above chance": "2/2" if m != "mlp2" else "0/2",
                            "status": "shown" if m != "mlp2" else "no induction head"}
                           for m in ("attn2", "attn3", "smear2", "mlp2")
                           for b in ("literal copying", "fuzzy copying", "translation analogue", "abstract pattern matching")])
    table = pd.DataFrame([{"model": "attn2", "behaviour": "abstract pattern matching", "measure": "L1H0 attention share on same-label items",
                           "value": 0.4, "chance": 0.25, "induction_head": True}])
    models = {m: SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(seed=0))) for m in ("attn2", "attn3", "smear2", "mlp2")}
    rows = SC.generality(SimpleNamespace(models=models), SimpleNamespace(status=status, table=table))
    assert [r.claim.id for r in rows] == ["literal_copying", "fuzzy_copying", "translation", "pattern_matching"]
    assert all(r.status == V.REPRODUCED and r.n == 3 for r in rows)
    assert "no induction head in mlp2" in rows[0].build and "0.40–0.40 (chance 0.25)" in rows[3].build


def test_mechanism_rows_use_composition_and_ov_verdicts(monkeypatch):
    ct = pd.DataFrame([{"model": m, "pair": "L0H1 → L1H0", "baseline": 0.1, "Q": 0.1, "K": k, "V": 0.1, "prefix": 0.6,
                        "K-circuit": V.composition_ok(0.1, k, 0.1, 0.1, True)} for m, k in (("attn2", 0.3), ("attn3", 0.12))])
    agr = pd.DataFrame([{"model": "attn2", "induction heads": 2, "with OV > 0": 2},
                        {"model": "attn3", "induction heads": 1, "with OV > 0": 0},
                        {"model": "attn1", "induction heads": 0, "with OV > 0": 0},
                        {"model": "all models (pooled)", "induction heads": 3, "with OV > 0": 2}])
    assert Me.ov_copying_verdict(agr).text == "partly (1 of 2 models with an induction head)"
    assert Ci.composition_verdict(ct).text == "partly (1 of 2 models)"
    assert Ci.composition_verdict(None).status == V.NOT_TESTABLE
    models = {m: SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(seed=0))) for m in ("attn1", "attn2", "attn3")}
    monkeypatch.setattr(Ci, "composition_table", lambda comp: ct)
    rows = SC.mechanism(SimpleNamespace(models=models), None, agr)
    assert [(r.claim.id, r.verdict) for r in rows] == [("k_composition", "partly (1 of 2 models)"),
                                                       ("ov_copying", "partly (1 of 2 models with an induction head)")]
    assert "attn2: 2 of 2 induction heads" in rows[1].build


def test_continuity_rows_are_the_claims_table():
    claims = pd.DataFrame([{"claim": "Every ≥2-layer model forms induction heads (models on bible+code)", "paper": "yes",
                            "here": "3 of 3 models", "verdict": V.REPRODUCED, "rule": "all"},
                           {"claim": "1-layer models form no induction heads and have less ICL", "paper": "yes",
                            "here": "…", "verdict": V.PARTLY, "rule": "both"}]).set_index("claim")
    family = pd.DataFrame({"model": ["attn1", "attn2"], "n_seeds": [2, 1]})
    rows = SC.continuity(claims, SimpleNamespace(family=family))
    assert [r.claim.id for r in rows] == ["continuity_every_2_layer_model_forms_induction_heads",
                                          "continuity_1_layer_models_form_no_induction_heads_and_have_less_icl"]
    assert [r.status for r in rows] == [V.REPRODUCED, V.PARTLY] and rows[0].runs == "attn1: 2 seeds; attn2: 1 seed"
    assert all(r.claim.chapter == "06_continuity" and r.claim.section == "The paper's claims, checked" for r in rows)


# --- results files -----------------------------------------------------------------------------------

def _rows():
    res, pca = _cooccurrence()
    return SC.cooccurrence(res, pca)


def test_record_then_load_round_trip_and_not_built_rows(tmp_path):
    shown = SC.record("smoke", _rows(), tmp_path)
    assert list(shown.data.columns) == ["claim", "paper", "this build", "runs (seeds)", "verdict"] and len(shown.data) == 4
    d = json.loads((tmp_path / "01_cooccurrence.json").read_text())
    assert d["profile"] == "smoke" and d["chapter"] == "01_cooccurrence" and d["schema"] == SC.SCHEMA
    rows = SC.load(tmp_path, "smoke")
    assert [r["status"] for r in rows[:4]] == [r.status for r in _rows()]
    rest = rows[4:]
    assert {r["chapter"] for r in rest} == set(list(SC.CHAPTERS.values())[1:])
    assert all(r["status"] == SC.NOT_BUILT and r["verdict"].startswith(SC.NOT_BUILT) for r in rest)
    assert len(rest) == len([c for c in SC.CLAIMS if c.argument > 1])


def test_record_writes_where_the_build_says(tmp_path, monkeypatch):
    monkeypatch.setenv(SC.RESULTS_ENV, str(tmp_path / "r"))
    SC.record("smoke", _rows())
    assert (tmp_path / "r" / "01_cooccurrence.json").exists()
    monkeypatch.delenv(SC.RESULTS_ENV)
    assert SC.results_dir("laptop") == ROOT / "_build" / "executed" / "laptop" / "results"
    assert pipeline.RESULTS_ENV == SC.RESULTS_ENV


def test_record_refuses_bad_rows(tmp_path):
    with pytest.raises(SC.ScorecardError, match="no rows"):
        SC.record("smoke", [], tmp_path)
    other = SC.row("ablation", "x", "y", V.Verdict(V.PARTLY, 1, 2))
    with pytest.raises(SC.ScorecardError, match="several chapters"):
        SC.record("smoke", _rows() + [other], tmp_path)
    with pytest.raises(SC.ScorecardError, match="no verdict"):
        SC.record("smoke", [SC.Row(SC.CLAIMS[0], "x", "y", 1, "looks good", "looks good")], tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text("{not json"), "is not valid JSON"),
    (lambda p: p.write_text(p.read_text().replace("smoke", "smokey")), "failed its checksum"),
    (lambda p: p.write_text(json.dumps({"rows": []})), "has no checksum")])
def test_a_bad_results_file_is_one_clear_line(tmp_path, damage, message):
    SC.record("smoke", _rows(), tmp_path)
    damage(tmp_path / "01_cooccurrence.json")
    with pytest.raises(SC.ScorecardError) as e:
        SC.load(tmp_path, "smoke")
    assert message in str(e.value) and "01_cooccurrence.json" in str(e.value) and "\n" not in str(e.value)


def test_a_file_of_another_profile_or_schema_is_refused(tmp_path):
    SC.record("laptop", _rows(), tmp_path)
    with pytest.raises(SC.ScorecardError, match="written by profile 'laptop', not 'smoke'"):
        SC.load(tmp_path, "smoke")
    from icl_core.io import atomic_write_json

    atomic_write_json(tmp_path / "01_cooccurrence.json", {"schema": 99, "profile": "laptop", "rows": []})
    with pytest.raises(SC.ScorecardError, match="schema 99"):
        SC.load(tmp_path, "laptop")


def test_compare_two_builds(tmp_path):
    SC.record("laptop", _rows(), tmp_path / "a")
    res, pca = _cooccurrence(one_layer_prefix=0.5)
    SC.record("gpu", SC.cooccurrence(res, pca), tmp_path / "b")
    cmp = SC.compare(tmp_path / "a", "laptop", tmp_path / "b", "gpu")
    assert list(cmp.columns) == ["a: laptop", "b: gpu", "agree"]
    first = cmp.loc[SC.CLAIMS_BY_ID["phase_change"].text]
    assert (first["a: laptop"], first["b: gpu"], first["agree"]) == (V.REPRODUCED, V.PARTLY, False)
    assert cmp["agree"].sum() == 3  # bump, 1-layer and PCA; chapters built by neither do not count as agreeing


# --- the landing page ---------------------------------------------------------------------------------

def test_landing_html_names_the_profile_and_links_every_row(tmp_path):
    SC.record("smoke", _rows(), tmp_path)
    rows = SC.load(tmp_path, "smoke")
    sections = {"01_cooccurrence": {"every-run-checked", "per-token-loss-pca", SC.anchor(SC.SCORECARD_HEADING)},
                "02_coperturbation": set()}
    out = SC.landing_html(rows, "smoke", sections)
    assert "<strong>smoke</strong> profile" in out and f"{len(rows)} claims" in out
    assert "\n\n" in out and "\n\n" not in out.split("\n\n", 1)[1]  # one HTML block for the table
    trs = re.findall(r'<tr data-claim="([^"]+)" data-chapter="([^"]+)" data-status="([^"]+)">', out)
    assert [t[0] for t in trs] == [r["id"] for r in rows]
    assert [t[2] for t in trs] == [r["status"] for r in rows]
    hrefs = re.findall(r'class="scorecard-link" href="([^"]+)"', out)
    assert hrefs[0] == "chapters/01_cooccurrence.html#every-run-checked"
    assert hrefs[1] == "chapters/01_cooccurrence.html#this-chapter-in-the-scorecard"  # its section is gone
    assert hrefs[4] == "chapters/02_coperturbation.html"  # neither section exists: the page
    assert hrefs[-1] == "chapters/06_continuity.html#the-paper-s-claims-checked"  # sections unknown: as recorded
    assert "a &lt; b" in SC.landing_html([{**rows[0], "build": "a < b"}], "smoke")


def test_the_site_fills_the_landing_page_or_fails_in_one_line(tmp_path):
    from icl_core.book import BookError, Paths
    from icl_core.book.site import SCORECARD_MARKER, scorecard_block
    from icl_core.profiles import load_profile

    assert SCORECARD_MARKER in (ROOT / "index.md").read_text()
    paths = Paths(ROOT, tmp_path)
    prof = load_profile("smoke")
    logs = []
    block = scorecard_block(prof, paths, logs.append)
    assert block.count("<tr data-claim") == len(SC.CLAIMS) and "not built" in block
    assert any("no scorecard results" in m for m in logs)
    results = paths.executed("smoke") / "results"
    SC.record("smoke", _rows(), results)
    assert 'data-status="reproduced"' in scorecard_block(prof, paths, logs.append)
    (results / "02_coperturbation.json").write_text("garbage")
    with pytest.raises(BookError) as e:
        scorecard_block(prof, paths, logs.append)
    assert str(e.value).startswith("scorecard: ") and "\n" not in str(e.value)


# --- the build runs record() with the results folder set -------------------------------------------

def test_execute_sets_the_results_folder_and_drops_a_stale_file(tmp_path):
    from icl_core import book
    from icl_core.profiles import Profile

    (tmp_path / "chapters").mkdir()
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: index\nchapters:\n  - file: chapters/01_cooccurrence\n")
    (tmp_path / "index.md").write_text("# Index\n")
    nb = nbf.v4.new_notebook()
    params = nbf.v4.new_code_cell('profile = "laptop"')
    params.metadata["tags"] = ["parameters"]
    body = ("import os, pathlib\nd = pathlib.Path(os.environ['ICL_RESULTS_DIR'])\n"
            "d.mkdir(parents=True, exist_ok=True)\n(d / '01_cooccurrence.json').write_text(profile)")
    nb.cells = [params, nbf.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, tmp_path / "chapters" / "01_cooccurrence.ipynb")
    paths, prof = book.Paths(tmp_path, tmp_path), Profile("tiny", "", "", runs={}, chapters={})
    book.execute(prof, paths, profiles_dir=tmp_path, log=lambda *a: None)
    out = paths.executed("tiny") / "results" / "01_cooccurrence.json"
    assert out.read_text() == "tiny"
    nb.cells[1].source = "raise ValueError('boom')"
    nbf.write(nb, tmp_path / "chapters" / "01_cooccurrence.ipynb")
    with pytest.raises(book.ChapterFailed):
        book.execute(prof, paths, profiles_dir=tmp_path, log=lambda *a: None)
    assert not out.exists()  # a failed chapter leaves no results behind


def test_faithful_scale_column_reads_a_committed_gpu_build(tmp_path):
    """Issue 23: every build shows the committed GPU build's verdicts beside its own, or says none exists."""
    here = tmp_path / "here"
    row = SC.row("one_layer", "0 of 2 runs form one", "`attn1`, `attn1_s1`", V.count_verdict(2, 2)).to_dict()
    SC.atomic_write_json(here / "01_cooccurrence.json", {"schema": SC.SCHEMA, "profile": "laptop",
                                                         "chapter": "01_cooccurrence", "rows": [row]})
    gpu = tmp_path / "gpu"
    t = SC.faithful_table("laptop", here, gpu)
    assert set(t["at the faithful scale (gpu)"]) == {"not run yet"}
    assert "has not been trained yet" in SC.faithful_text(gpu)
    g = dict(row, build="0 of 3 runs form one", status=V.REPRODUCED)
    gpu.mkdir()
    (gpu / "results.json").write_text(json.dumps({"profile": "gpu", "files": {"executed/gpu/results/01_cooccurrence.json": {
        "schema": SC.SCHEMA, "profile": "gpu", "chapter": "01_cooccurrence", "rows": [g]}}}))
    (gpu / "provenance.json").write_text(json.dumps({"profile": "gpu", "git": {"commit": "abcdef123456"},
                                                     "device": {"gpu": "NVIDIA H200"}, "started_utc": "2026-12-02",
                                                     "status": "built", "wall_s": 512.0}))
    t = SC.faithful_table("laptop", here, gpu)
    assert t.loc[row["claim"], "at the faithful scale (gpu)"] == f"0 of 3 runs form one — {V.REPRODUCED}"
    assert "not in the GPU build" in set(t["at the faithful scale (gpu)"])  # claims of chapters 2-6
    txt = SC.faithful_text(gpu)
    assert "abcdef1234" in txt and "NVIDIA H200" in txt and "512 s" in txt
    (gpu / "results.json").write_text("{")
    with pytest.raises(SC.ScorecardError, match="not a results folder"):
        SC.faithful_rows(gpu)


def _gpu_build(d, runs, git=None, carry=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({"profile": "gpu", "files": {}}))
    (d / "provenance.json").write_text(json.dumps({"profile": "gpu", "git": git or {"commit": "c" * 40},
                                                   "setup": {"carry_manifest": {"git": carry}} if carry else {},
                                                   "runs": runs, "chapters": {"00_intro": {}}}))
    return d


def _curve_run(layers, icl, prefix):
    cols = ["tokens", "loss", "icl", "prefix_max", "prev_token_max"]
    return {"layers": layers, "d_model": 64, "curve_columns": cols,
            "curve": [[1e6 * (i + 1), 5.0 - i, a, p, 0.1] for i, (a, p) in enumerate(zip(icl, prefix))]}


def test_faithful_runs_read_the_logged_curves_with_known_answers(tmp_path):
    """Issue 23's report: per run of the committed GPU build, when the top prefix score crossed the
    induction line and the ICL score before it, at its highest and at the end."""
    assert SC.faithful_runs(tmp_path / "none") is None
    assert "No GPU build" in SC.faithful_runs_text(None)
    runs = {"attn2": _curve_run(2, [0.0, 0.3, 0.1, -0.4], [0.03, 0.05, 0.35, 0.6]),
            "attn1": _curve_run(1, [0.0, 0.2, 0.2, 0.1], [0.03, 0.03, 0.03, 0.03]),
            "smear1": _curve_run(1, [0.0, -0.1, -0.2, -0.3], [0.03, 0.4, 0.5, 0.5])}
    t = SC.faithful_runs(_gpu_build(tmp_path / "g", runs))
    a = t.loc["attn2"]
    assert a["prefix score reached 0.3 at"] == 3e6 and a["ICL before"] == 0.3
    assert a["highest ICL"] == 0.3 and a["at"] == 2e6 and a["final ICL"] == -0.4 and a["top prefix score"] == 0.6
    assert np.isnan(t.loc["attn1", "prefix score reached 0.3 at"]) and np.isnan(t.loc["attn1", "ICL before"])
    txt = SC.faithful_runs_text(t)
    assert "Of the 1 vanilla runs with two or more layers, 1 formed an induction head" in txt
    assert "3M (attn2)" in txt and "+0.30 to +0.30 nats at the snapshot before" in txt and "-0.40 to -0.40 at the end" in txt
    assert "In 2 of 2 vanilla runs the ICL score rose above zero" in txt  # smear1 is not vanilla
    bad = dict(runs, attn2={**runs["attn2"], "curve_columns": ["tokens", "loss"]})
    with pytest.raises(SC.ScorecardError, match="no curve"):
        SC.faithful_runs(_gpu_build(tmp_path / "b", bad))


def test_faithful_commit_prefers_the_carry_when_the_source_matches(tmp_path):
    """The device machine's .git was stale once: the carry's commit counts when its icl_core hash is the build's."""
    carry = {"commit": "b" * 40, "icl_core_source": "h1"}
    assert SC.faithful_commit({"git": {"commit": "a" * 40, "icl_core_source": "h1"}, "setup": {"carry_manifest": {"git": carry}}}) == "b" * 40
    assert SC.faithful_commit({"git": {"commit": "a" * 40, "icl_core_source": "h2"}, "setup": {"carry_manifest": {"git": carry}}}) == "a" * 40
    assert SC.faithful_commit({}) == "unknown"
    d = _gpu_build(tmp_path / "g", {}, git={"commit": "a" * 40, "icl_core_source": "h1"}, carry=carry)
    assert "`bbbbbbbbbb`" in SC.faithful_text(d) and "(00_intro)" in SC.faithful_text(d)


def test_the_committed_gpu_build_reads():
    """results/gpu/ as committed: its claims, its per-run table and its commit all read."""
    rows, prov = SC.faithful_rows()
    if prov is None:
        pytest.skip("no GPU build committed")
    t = SC.faithful_runs()
    assert rows and set(t.index) == set(prov["runs"]) and SC.faithful_commit(prov) != "unknown"


def test_landing_table_has_a_faithful_scale_column():
    row = SC.row("one_layer", "0 of 2 runs form one", "`attn1`", V.count_verdict(2, 2)).to_dict()
    assert '<td class="faithful">not run yet</td>' in SC.landing_html([row], "laptop")
    g = dict(row, status=V.REPRODUCED)
    assert f'<td class="faithful">{V.REPRODUCED}</td>' in SC.landing_html([row], "laptop", faithful={"one_layer": g})
    assert '<td class="faithful">not in the GPU build</td>' in SC.landing_html([row], "laptop", faithful={"x": g})

"""The recipe-sweep harness: variants validate before training, summaries come from the run, and the
committed rounds load into the methods appendix's tables."""
import dataclasses

import numpy as np
import pytest
import torch

from icl_core import data as D
from icl_core import sweep
from icl_core.config import ConfigError, DataConfig, RunConfig
from icl_core.runs import get_or_train


def test_a_bad_variant_fails_before_anything_trains():
    spec = {"base": {"model": {"n_layers": 2}}, "variants": {"ok": {}, "bad": {"model": {"positional": "alibi"}}}}
    with pytest.raises(ConfigError, match="positional"):
        sweep.variant_configs(spec)


def test_variants_merge_over_base_and_run_single_threaded():
    spec = {"base": {"model": {"n_layers": 2, "d_model": 64}}, "variants": {"deep": {"model": {"n_layers": 3}}}}
    d = sweep.variant_configs(spec)["deep"]
    cfg = RunConfig.from_dict(d)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.train.threads, cfg.name) == (3, 64, 1, "deep")


def test_summary_of_a_tiny_run(tiny_run_cfg, tmp_path):
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    row = sweep.summarise(run)
    m = run.metrics()
    assert row["tokens_M"] == pytest.approx(m["tokens"].iloc[-1] / 1e6)
    assert row["prefix_maxall"] == pytest.approx(m["prefix_max"].max())
    per_layer = [float(x) for x in row["prev_by_layer"].split("/")]
    assert len(per_layer) == tiny_run_cfg.model.n_layers
    assert max(per_layer) == pytest.approx(row["prev_final"], abs=0.005)


def test_committed_rounds_load_with_their_notes():
    tables = sweep.sweep_tables()
    assert tables, "no committed sweep summaries under configs/sweeps"
    for name, notes, df in tables:
        assert notes, f"{name}.yaml has no comment block saying what the round tested"
        assert {"variant", "changes from base", "prefix_maxall"} <= set(df.columns)


def test_longer_copied_spans_are_a_labelled_option(tiny_run_cfg, tmp_path):
    """repeat_span_max: spans up to that length are copied to a later place in the same row."""
    from icl_core.runs import cache_dir
    corpus = D.Corpus(tiny_run_cfg.data, cache_dir(tmp_path))
    plain = D.train_batch(corpus, 8, 128, seed=0, step=3)
    long = D.train_batch(corpus, 8, 128, seed=0, step=3, repeat_fraction=1.0, span_max=60)
    checked = 0
    for r in range(8):
        diff = np.flatnonzero((plain[r] != long[r]).numpy())
        if len(diff) == 0:  # the copy happened to equal what it replaced
            continue
        checked += 1
        b, e = diff[0], diff[-1] + 1
        span = long[r, b:e]
        # the changed stretch is a copy of an earlier stretch of the same row
        hits = [a for a in range(0, b - (e - b) + 1) if torch.equal(long[r, a:a + e - b], span)]
        assert hits, f"row {r}: the changed tokens are not a copy of an earlier span"
    # with repeat_fraction=1 every row gets a copied span; a copy equal to what it replaced is rare
    assert checked >= 6, f"only {checked} of 8 rows have a copied span to check"
    with pytest.raises(ConfigError, match="repeat_span_max"):
        DataConfig(repeat_span_max=4)
    # leaving it unset keeps the hash of configs written before the option existed
    cfg = dataclasses.replace(tiny_run_cfg, data=dataclasses.replace(tiny_run_cfg.data, repeat_span_max=None))
    assert cfg.hash() == tiny_run_cfg.hash()


def test_attention_biases_and_the_recipe_are_listed_as_deviations():
    import dataclasses as dc

    from icl_core.book import deviations_table
    from icl_core.profiles import Profile, load_profile
    laptop = load_profile("laptop")
    tab = deviations_table(laptop)
    row = "attention biases (b_Q, b_K, b_V, b_O)"
    assert tab.loc[row].iloc[-1] == "no"
    assert "0.002" in tab.loc["optimiser"].iloc[-1]  # the recipe's learning rate is stated
    assert tab.loc["batch (sequences x context)"].iloc[-1] == "8 x 256"
    assert "ablations in bf16 " in tab.loc["evaluation set"].iloc[-1]  # train.eval_precision is stated
    assert "in fp32 " in deviations_table(load_profile("smoke")).loc["evaluation set"].iloc[-1]
    cfg = laptop.run_config("attn3")
    biased = Profile("b", "", "", {"a": cfg, "b": dc.replace(cfg, model=dc.replace(cfg.model, attn_bias=True))})
    assert "yes" in deviations_table(biased).loc[row].iloc[-1] and "no" in deviations_table(biased).loc[row].iloc[-1]


def test_rounds_are_listed_in_numeric_order():
    names = [n for n, _, _ in sweep.sweep_tables()]
    nums = [int(n.removeprefix("recipe")) for n in names if n.removeprefix("recipe").isdigit()]
    assert nums == sorted(nums) and len(nums) >= 10


def test_sweep_cli_reports_a_bad_field_in_one_line_with_exit_2(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("base: {train: {total_tokens: 1000}}\nvariants: {a: {model: {n_layerz: 2}}}\n")
    assert sweep.main([str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_layerz" in err[0]
    assert sweep.main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err

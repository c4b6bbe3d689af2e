"""The benchmark scripts: the GPU mode's arithmetic, and a CPU dry run so the script cannot rot
while CI has no GPU (the numbers of a dry run mean nothing)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import gpu_bench  # noqa: E402
import step_worker  # noqa: E402


def test_speedup_ceiling_over_transformer_lens():
    # TransformerLens at 10k tok/s x 10 MFLOP/token = 100 GFLOP/s on a 400 GFLOP/s peak: 25% of it,
    # so a trainer at 100% of the peak would be 4x faster, and no faster
    frac, ceiling = bench.speedup_ceiling(10_000, 1e7, 400.0)
    assert frac == pytest.approx(0.25) and ceiling == pytest.approx(4.0)


def test_snapshot_metrics_floor():
    from icl_core.profiles import load_profile
    cfg = load_profile("laptop").run_config("attn3")  # 1,024 windows x 256 tokens, 8M tokens
    # 40 snapshots x 262,144 evaluated tokens over 3 x 8M trained: 44% (it was 11% with 256 windows)
    assert bench.snapshot_metrics_floor(cfg, 40) == pytest.approx(40 * 1024 * 256 / (3 * 8_000_000))
    assert 0.43 < bench.snapshot_metrics_floor(cfg, 40) < 0.45


def test_nominal_peaks_and_mfu():
    assert gpu_bench.nominal_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_bench.nominal_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu_bench.nominal_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_bench.nominal_peak_tflops("some CPU") is None
    # 1M tokens/s x 1 GFLOP/token = 1 PFLOP/s = half of a 2,000 TFLOP/s peak
    assert gpu_bench.mfu(1e6, 1e9, 2000.0) == pytest.approx(0.5)


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    res = gpu_bench.main(["--device", "cpu", "--dry-run", "--runs", "attn1", "--batch", "2", "--out", str(tmp_path)])
    (row,) = res["rows"]
    assert row["model"] == "attn1" and row["batch"] == 2 and row["tok_s"]["median"] > 0
    assert row["mfu_nominal"] is None and 0 < row["mfu_measured"]
    saved = json.loads((tmp_path / "gpu_results.json").read_text())
    assert saved["rows"][0]["tflops"] == pytest.approx(row["tflops"])
    assert "DRY RUN" in (tmp_path / "gpu_results.md").read_text()


def test_gpu_bench_refuses_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        gpu_bench.main(["--out", str(tmp_path)])


def test_gpu_attention_dry_run_on_cpu(tmp_path):
    import gpu_attention
    res = gpu_attention.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path / "a.json")])
    by = {r["kernel"]: r for r in res["rows"]}
    assert "math" in by and by["math"]["ms_fwd_bwd"] > 0
    assert all(r["rel_err_vs_fp32_math"] < 2e-2 for r in res["rows"])  # bf16 against fp32
    # the causal count is half the full square: (B, H, T, d) = (1, 1, 2, 1) has 2 x 2 x 4 / 2 forward FLOPs
    assert gpu_attention.causal_flops(1, 1, 2, 1) == 3 * 2 * 2 * 4 / 2
    assert json.loads((tmp_path / "a.json").read_text())["rows"]


def test_share_text_names_the_fused_kernels():
    assert bench.share_text({"matrix_share": 0.51}) == "51%"
    assert bench.share_text({"matrix_share": 0.51, "fused_attention_share": 0.0}) == "51%"
    assert bench.share_text({"matrix_share": 0.51, "fused_share": 0.2}) == "51% (+20% fused kernels)"
    assert bench.share_text({"matrix_share": 0.51, "fused_attention_share": 0.2}) == "51% (+20% fused kernels)"


def test_share_text_counts_the_attention_products():
    prof = {"matrix_share": 0.35, "fused_share": 0.46, "attention_products_share": 0.09,
            "matrix_share_with_attention": 0.44}
    assert bench.share_text(prof) == "35% + 9% attention products = 44% (fused kernels 46% in all)"
    # fp32 (no fused attention) with the clock: no products to add
    assert bench.share_text({"matrix_share": 0.48, "fused_share": 0.0, "attention_products_share": 0.0,
                             "matrix_share_with_attention": 0.48}) == "48%"


def test_clocked_text():
    clocked = {"matrix_share": {"median": 0.52, "min": 0.5, "max": 0.55, "n": 2}, "step_ms": 14.2,
               "aten_matrix_ms": 6.1, "attention_products_ms": 1.3}
    assert bench.clocked_text(clocked) == "52.0% (50.0%-55.0%): 6.1 + 1.3 of 14.2 ms"
    assert bench.clocked_text(None) == "-"


def test_clocked_matrix_known_answer(monkeypatch):
    """A step that spends 4 ms in two matrix calls (a fake mm that sleeps 2 ms) and 4 ms outside them:
    half of it clocked as matrix work; the real mm is back afterwards; a step without matrix calls
    (an eager step) gives None."""
    import time as _time

    from torch._inductor.select_algorithm import extern_kernels

    def fake_mm(*args, **kwargs):
        _time.sleep(0.002)

    monkeypatch.setattr(extern_kernels, "mm", fake_mm)

    def step(_x):
        extern_kernels.mm()
        extern_kernels.mm()
        _time.sleep(0.004)

    got = step_worker.clocked_matrix(step, [None], 5)
    assert extern_kernels.mm is fake_mm
    assert got["matrix_calls_per_step"] == 2
    assert got["aten_matrix_ms"] == pytest.approx(4.0, abs=1.0) and got["step_ms"] == pytest.approx(8.0, abs=2.0)
    assert got["matrix_share"] == pytest.approx(0.5, abs=0.1)
    assert step_worker.clocked_matrix(lambda _x: _time.sleep(0.001), [None], 2) is None


def test_attention_products_known_answer():
    """Each attention call's profiler time is split by the kernel's own clock: forward 2 ms of which
    a quarter in products, backward 4 ms of which half: 2.5 ms of products in a 10 ms step."""
    by_op = {"icl_fused::causal_attention_fwd": 2.0, "icl_fused::causal_attention_bwd": 4.0, "aten::mm": 3.0}
    ticks = {"fwd_products": 25, "fwd_total": 100, "bwd_products": 7, "bwd_total": 14}
    got = step_worker.attention_products(by_op, ticks, matrix=3.0, total=10.0)
    assert got["attention_products_share"] == pytest.approx(0.25)
    assert got["matrix_share_with_attention"] == pytest.approx(0.55)
    assert got["attention_products_fraction"] == {"fwd": 0.25, "bwd": 0.5}
    assert step_worker.attention_products(by_op, None, 3.0, 10.0) == {}  # a checkout without the clock
    # no attention calls timed (a model without the fused attention): nothing added
    idle = dict.fromkeys(ticks, 0)
    assert step_worker.attention_products(by_op, idle, 3.0, 10.0)["matrix_share_with_attention"] == pytest.approx(0.3)
    # the attention reading the projection's output (RoPE models since the sixteenth pass): the same split
    qkv_ops = {"icl_fused::attention_qkv_fwd": 2.0, "icl_fused::attention_qkv_bwd": 4.0, "aten::mm": 3.0}
    assert step_worker.attention_products(qkv_ops, ticks, 3.0, 10.0)["attention_products_share"] == pytest.approx(0.25)


def test_side_by_side_of_two_checkouts(tmp_path):
    """--baseline: the committed trainer unpacked from git and this checkout's, alternating in fresh
    processes (smoke shapes, 2 steps: the numbers mean nothing; the plumbing and the table do)."""
    base = bench.unpack_commit("HEAD", tmp_path / "base")
    assert (base / "icl_core" / "train.py").exists()
    rows = bench.side_by_side(base, ["attn1"], ["fp32"], rounds=2, steps=2, profile_steps=1, profile_name="smoke")
    (row,) = rows
    assert row["baseline_tok_s"]["n"] == row["current_tok_s"]["n"] == 2 and row["speedup"] > 0
    for side in ("baseline", "current"):
        p = row["profile"][side]
        assert 0 < p["matrix_share"] < 1 and p["top"] and row["peak_rss_mb"][side] > 0
        assert row["faults_per_step"][side] >= 0  # step_worker counts them for any checkout
    res = {"peak_gflops": {"fp32": {"median": 100.0}}, "side_by_side": {"baseline": "abc", "current": "def", "rows": rows},
           "threads_scaling": {"run": "attn1", "tok_s_1_thread": 100.0, "tok_s_2_threads": 150.0, "ratio": 1.5},
           "logged_peak_rss_mb": {"attn1": 400.0}}
    text = "\n".join(bench.side_by_side_lines(res))
    assert "| attn1 | fp32 |" in text and "two 1-thread runs side by side train more tokens" in text
    assert text.count("page faults per step") == 1 and "| - → - |" not in text
    assert "largest 400" in text


def test_evaluation_side_by_side_of_two_checkouts(tmp_path, monkeypatch):
    """benchmarks/eval_ab.py: the committed evaluation unpacked from git and this checkout's, on a
    trained run (smoke attn1), in fresh processes: every measurement, its bits compared, a table."""
    import eval_ab
    from icl_core.profiles import load_profile
    from icl_core.runs import get_or_train

    get_or_train(load_profile("smoke").run_config("attn1"), root=tmp_path / "runs", progress=False)
    monkeypatch.setenv("ICL_RUNS_DIR", str(tmp_path / "runs"))
    base = bench.unpack_commit("HEAD", tmp_path / "base")
    rows = eval_ab.side_by_side(base, ["attn1"], rounds=1, profile_name="smoke")
    assert [r["what"] for r in rows] == list(eval_ab.WHAT)
    for r in rows:
        assert r["baseline_s"] > 0 and r["current_s"] > 0 and r["rss"]["current"] > 0
        assert r["same_bits"]  # HEAD's evaluation and this checkout's compute the same bits
    assert "| attn1 | ablation_pp |" in eval_ab.table(rows, "HEAD")


def test_grad_fidelity_compare_known_answers():
    import torch

    import grad_fidelity
    g = {"b0/loss": torch.tensor([2.0], dtype=torch.float64),
         "b0/blocks.0.attn.W_qkv": torch.tensor([3.0, 4.0], dtype=torch.float64),
         "b0/embed": torch.tensor([0.0, 0.0], dtype=torch.float64)}
    same = grad_fidelity.compare(g, g)["b0"]
    assert same["rel_err"] == 0 and same["cos"] == pytest.approx(1) and same["loss_diff"] == 0
    doubled = grad_fidelity.compare(g, {k: 2 * v for k, v in g.items()})["b0"]
    assert doubled["rel_err"] == pytest.approx(1) and doubled["norm_ratio"] == pytest.approx(2)
    assert doubled["cos"] == pytest.approx(1) and doubled["loss_diff"] == pytest.approx(2)
    assert doubled["attn_rel_err"] == {"blocks.0.attn.W_qkv": pytest.approx(1)}


def test_grad_fidelity_worker_bf16_against_fp64(tmp_path):
    # the smoke attn3 model at its initial weights: the fp64 gradient against itself is exact, the
    # trainer's bf16 one is off by bf16's rounding (~0.4% per value), neither 0 nor large
    import torch
    from safetensors.torch import load_file, save_file

    import grad_fidelity
    from icl_core import train as T
    from icl_core.profiles import load_profile
    cfg = load_profile("smoke").run_config("attn3")
    save_file(T.init_model(cfg).state_dict(), str(tmp_path / "w.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({"b0": torch.randint(0, cfg.model.d_vocab, (2, cfg.model.n_ctx), generator=g)}, str(tmp_path / "x.safetensors"))
    for path in ("fp64", "eager"):
        assert grad_fidelity.main(["--worker", "--tree", str(ROOT), "--path", path, "--run", "attn3",
                                   "--profile-name", "smoke", "--weights", str(tmp_path / "w.safetensors"),
                                   "--batch-file", str(tmp_path / "x.safetensors"),
                                   "--out", str(tmp_path / f"{path}.safetensors")]) == 0
    ref, got = (load_file(str(tmp_path / f"{p}.safetensors")) for p in ("fp64", "eager"))
    assert grad_fidelity.compare(ref, ref)["b0"]["rel_err"] == 0
    row = grad_fidelity.compare(ref, got)["b0"]
    assert 1e-4 < row["rel_err"] < 0.05 and row["cos"] > 0.999
    assert set(row["attn_rel_err"]) == {f"blocks.{i}.attn.W_{w}" for i in range(3) for w in ("qkv", "O_")}


def test_grad_fidelity_systematic_error_known_answers():
    import torch

    import grad_fidelity
    ref = {f"b{i}/{n}": torch.tensor(v, dtype=torch.float64) for i in range(2)
           for n, v in [("loss", [1.0]), ("w", [1.0, 0.0])]}
    # errors of opposite sign cancel in the mean gradient: no bias
    noisy = {**ref, "b0/w": torch.tensor([1.0, 0.5], dtype=torch.float64), "b1/w": torch.tensor([1.0, -0.5], dtype=torch.float64)}
    assert grad_fidelity.systematic(ref, noisy) == {"batches": 2, "rel_err": 0.0, "along": 0.0}
    # every gradient 10% short: a bias along the gradient, which the mean keeps
    short = {k: (0.9 * v if k.endswith("/w") else v) for k, v in ref.items()}
    got = grad_fidelity.systematic(ref, short)
    assert got["rel_err"] == pytest.approx(0.1) and got["along"] == pytest.approx(-0.1)


def test_interleaved_ab_paired_ratios_known_answers():
    import interleaved_ab

    # the other tree twice as fast in every round, whatever the machine did between rounds
    r = interleaved_ab.paired_ratios([0.2, 0.4, 0.1, 0.3], [0.1, 0.2, 0.05, 0.15])
    assert r["median"] == pytest.approx(2.0) and r["q25"] == pytest.approx(2.0) and r["n"] == 4
    # a tree against its own times: exactly 1
    assert interleaved_ab.paired_ratios([0.3, 0.5, 0.4], [0.3, 0.5, 0.4])["median"] == 1.0
    with pytest.raises(ValueError):
        interleaved_ab.paired_ratios([0.1, 0.2], [0.1])


def test_interleaved_ab_two_copies_of_this_checkout(tmp_path, capsys):
    """One process, two imports of this checkout's icl_core under their own names (smoke model,
    eager): every step timed, and a one-line refusal of a tree that is neither a directory with
    icl_core nor a commit."""
    import interleaved_ab

    out = tmp_path / "ab.json"
    interleaved_ab.main(["--profile-name", "smoke", "--run", "attn1", "--steps", "3", "--out", str(out), str(ROOT), str(ROOT)])
    res = json.loads(out.read_text())
    assert [len(t["step_s"]) for t in res["trees"]] == [3, 3]
    assert all(t["warmup_s"] > 0 for t in res["trees"])  # the three warm-up steps (compile, where compiled)
    assert res["trees"][0]["speed_vs_first"]["median"] == 1.0 and res["trees"][1]["speed_vs_first"]["median"] > 0
    with pytest.raises(SystemExit, match="neither a directory with icl_core nor a commit"):
        interleaved_ab.main(["no-such-ref-xyz", str(ROOT)])
    with pytest.raises(SystemExit, match="holds no icl_core"):
        interleaved_ab.main([str(tmp_path), str(ROOT)])


def test_profile_ab_groups_runs_by_training_step():
    """Seeds and corpus variants share a step; every run of the laptop profile is in one group."""
    import profile_ab
    from icl_core.profiles import load_profile

    prof = load_profile("laptop")
    groups = profile_ab.step_groups(prof)
    assert sorted(n for g in groups.values() for n in g) == sorted(prof.runs)
    by_first = {g[0]: g for g in groups.values()}
    assert by_first["attn2"] == ["attn2", "attn2_s1", "attn2_s2", "attn2_prose", "attn2_code"]
    assert by_first["attn3"] == ["attn3", "attn3_s1", "attn3_s2"] and by_first["smear1"] == ["smear1", "smear1_s1"]
    assert by_first["attn2_wide"] == ["attn2_wide"] and by_first["mlp2"] == ["mlp2"]
    assert len(groups) == 10


def test_profile_ab_projection_known_answers(capsys):
    import profile_ab
    from icl_core.profiles import load_profile

    # 100 steps of 50 ms and a 3.15 s warm-up (3 steps of 50 ms and a 3.0 s compile): 8.0 s
    assert profile_ab.projected_seconds(100, 0.05, 3.15) == pytest.approx(8.0)
    # a warm-up faster than three median steps adds nothing (never negative)
    assert profile_ab.projected_seconds(10, 0.1, 0.2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        profile_ab.projected_seconds(10, 0.0, 1.0)
    # a baseline twice as slow at every step, no compile on either side: x2 for every run and in total
    prof = load_profile("laptop")
    timed = {g[0]: {"trees": [{"median_step_ms": 80.0, "warmup_s": 0.24}, {"median_step_ms": 40.0, "warmup_s": 0.12}]}
             for g in profile_ab.step_groups(prof).values()}
    res = profile_ab.project(prof, timed)
    assert len(res["rows"]) == len(prof.runs)
    assert all(r["speedup"] == pytest.approx(2.0) for r in res["rows"]) and res["speedup"] == pytest.approx(2.0)
    steps = sum(c.total_steps for c in prof.runs.values())
    assert res["total_s"] == pytest.approx([steps * 0.08, steps * 0.04])
    assert "**x2.00**" in profile_ab.markdown(res, ["old", "new"])
    # a 10 s compile from scratch is charged once per group; the group's other runs find it cached
    groups = profile_ab.step_groups(prof)
    for t in timed.values():
        t["trees"][1].update(warmup_s=10.12, warmup_cached_s=0.12)
    res = profile_ab.project(prof, timed)
    assert res["total_s"][1] == pytest.approx(steps * 0.04 + 10.0 * len(groups))
    assert res["total_s"][0] == pytest.approx(steps * 0.08)
    # bad input: one line, exit 2
    assert profile_ab.main(["--profile", "no-such-profile", "HEAD"]) == 2
    assert profile_ab.main(["a", "b", "c"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("profile_ab:") for line in err)


def test_book_ab_profile_is_the_laptop_runs():
    """benchmarks/book_ab.yaml's runs are the laptop profile's: attn3 and attn2_wide as they are,
    the 8M-token runs the laptop's 48M-token attn2, mlp2 and attn1 with a shorter budget."""
    import dataclasses

    from icl_core.profiles import load_profile

    ab, laptop = load_profile("book_ab", ROOT / "benchmarks"), load_profile("laptop")
    assert ab.run_config("attn3") == laptop.run_config("attn3")
    assert ab.run_config("attn2_wide") == laptop.run_config("attn2_wide")
    for short, full in [("attn2_8m", "attn2"), ("mlp2_8m", "mlp2"), ("attn1_8m", "attn1")]:
        a, b = ab.run_config(short), laptop.run_config(full)
        assert a.train.total_tokens == 8_000_000 and a.train.n_snapshots == 8
        same = dataclasses.replace(a, name=b.name, train=dataclasses.replace(
            a.train, total_tokens=b.train.total_tokens, n_snapshots=b.train.n_snapshots))
        assert same == b, short


def _book_ab_block(tree, runs):
    return {"tree": tree, "runs": {n: {"train_seconds": s, "metrics_seconds": 1.0, "peak_rss_mb": 500.0}
                                   for n, s in runs.items()}}


def test_book_ab_summary_known_answers():
    import book_ab

    assert book_ab.parse_order("abba") == [0, 1, 1, 0]
    for bad in ["", "AAA", "ABC", "B"]:
        with pytest.raises(ValueError):
            book_ab.parse_order(bad)
    # baseline blocks of 300 and 200 s, current blocks of 125 s: x2 (250 / 125); the pairs x1.6, x2.4
    blocks = [_book_ab_block(0, {"r1": 200.0, "r2": 100.0}), _book_ab_block(1, {"r1": 100.0, "r2": 25.0}),
              _book_ab_block(1, {"r1": 100.0, "r2": 25.0}), _book_ab_block(0, {"r1": 100.0, "r2": 100.0})]
    res = book_ab.summarize(blocks)
    assert res["speedup"] == pytest.approx(2.0)
    assert res["pair_speedups"] == pytest.approx([300 / 125, 200 / 125])
    assert res["per_run"]["r1"]["speedup"] == pytest.approx(1.5) and res["per_run"]["r2"]["speedup"] == pytest.approx(4.0)
    assert res["block_totals"] == [300.0, 125.0, 125.0, 200.0] and res["metrics_totals"] == [2.0] * 4
    assert "**x2.00**" in book_ab.markdown(res, blocks, ["A", "B"])
    with pytest.raises(ValueError):  # blocks of different runs are not compared
        book_ab.summarize([_book_ab_block(0, {"r1": 1.0}), _book_ab_block(1, {"r2": 1.0})])


def test_book_ab_weighs_a_profile_run_by_run():
    """Each laptop run is charged the block's seconds of the book_ab run with its training step,
    times the ratio of their steps: seeds and corpus variants as their model, 48M-token runs six
    times an 8M-token one; runs whose step was not trained are listed, their tokens left out."""
    import book_ab

    from icl_core.profiles import load_profile

    ab, laptop = load_profile("book_ab", ROOT / "benchmarks"), load_profile("laptop")
    old = {n: 100.0 for n in ab.runs}
    new = dict(old, attn1_8m=25.0)  # only attn1's step is faster: x4 on attn1 and attn1_s1
    blocks = [_book_ab_block(0, old), _book_ab_block(1, new)]
    w = book_ab.weigh(blocks, ab, laptop)
    steps = {n: c.total_steps for n, c in laptop.runs.items()}
    assert w["charged_as"]["attn1_s1"] == ["attn1_8m", steps["attn1_s1"] / ab.runs["attn1_8m"].total_steps]
    assert 5.99 < w["charged_as"]["attn1_s1"][1] < 6.01  # 48M tokens against 8M
    assert w["charged_as"]["attn2_prose"] == ["attn2_8m", steps["attn2_prose"] / ab.runs["attn2_8m"].total_steps]
    assert 0.49 < w["charged_as"]["attn2_prose"][1] < 0.51  # a corpus variant, 4M tokens
    assert w["charged_as"]["attn3_s2"] == ["attn3", 1.0]
    assert sorted(w["not_covered"]) == ["attn2_narrow", "attn4", "smear1", "smear1_s1", "smear2", "smear2_s1", "smear3"]
    weights = [k for _, k in w["charged_as"].values()]
    assert w["block_totals"][0] == pytest.approx(100.0 * sum(weights))
    attn1 = w["charged_as"]["attn1"][1] + w["charged_as"]["attn1_s1"][1]
    assert w["block_totals"][1] == pytest.approx(100.0 * (sum(weights) - attn1) + 25.0 * attn1)
    assert w["speedup"] == pytest.approx(w["block_totals"][0] / w["block_totals"][1])
    tokens = {n: c.train.total_tokens for n, c in laptop.runs.items()}
    assert w["covered"] == pytest.approx(1 - sum(tokens[n] for n in w["not_covered"]) / sum(tokens.values()))
    res = dict(book_ab.summarize(blocks), weighed=w)
    assert f"**x{w['speedup']:.2f}**" in book_ab.markdown(res, blocks, ["A", "B"]).splitlines()[-1]
    with pytest.raises(ValueError):  # nothing of the weighed profile was trained
        book_ab.weigh([_book_ab_block(0, {"attn2_wide": 1.0}), _book_ab_block(1, {"attn2_wide": 1.0})],
                      ab, load_profile("smoke"))


def _stub_tree(root: Path, seconds: float) -> Path:
    """A directory whose icl_core trains nothing: book.train writes one finished manifest per run
    of the profile into $ICL_RUNS_DIR, each with ``seconds`` of training (negative: it fails)."""
    pkg = root / "icl_core"
    (pkg / "book").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "profiles.py").write_text("def load_profile(name):\n    return name\n")
    (pkg / "book" / "__init__.py").write_text(
        "import json, os, pathlib\n"
        "def train(profile, jobs=None):\n"
        f"    if {seconds} < 0:\n        raise SystemExit(3)\n"
        "    assert os.environ['ICL_CACHE_DIR']\n"
        "    for name in ('attn3', 'attn2_wide'):\n"
        "        d = pathlib.Path(os.environ['ICL_RUNS_DIR']) / f'{name}-0123abcd'\n"
        "        d.mkdir(parents=True)\n"
        f"        (d / 'manifest.json').write_text(json.dumps({{'done': True, 'train_seconds': {seconds}, "
        "'snapshots': {'10': {'metrics_seconds': 0.5}}, 'peak_rss_mb': 100.0}))\n")
    return root


def test_book_ab_end_to_end_with_stub_trainers(tmp_path, capsys):
    """The blocks run each tree's own book.train with its own runs folder, in the order asked;
    results are read from the manifests; a failed block and bad input give one line, exit 2."""
    import book_ab

    old, new, broken = (_stub_tree(tmp_path / n, s) for n, s in [("old", 30.0), ("new", 10.0), ("broken", -1.0)])
    out = tmp_path / "ab.json"
    assert book_ab.main([str(old), str(new), "--order", "ABA", "--keep", str(tmp_path / "kept"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [b["tree"] for b in res["blocks"]] == [0, 1, 0]
    assert res["block_totals"] == [60.0, 20.0, 60.0] and res["speedup"] == pytest.approx(3.0)
    assert res["pair_speedups"] == pytest.approx([3.0, 3.0]) and res["metrics_totals"] == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["block_1_A", "block_2_B", "block_3_A"]
    assert "**x3.00**" in capsys.readouterr().out
    assert book_ab.main([str(broken), str(new)]) == 2
    assert book_ab.main([str(old), str(new), "--order", "AA"]) == 2
    assert book_ab.main([str(old), str(new), "--profile", "no-such-profile"]) == 2
    assert book_ab.main([str(old), str(new), "--keep", str(tmp_path / "kept")]) == 2  # not empty
    assert book_ab.main([str(tmp_path / "nowhere"), str(new)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("book_ab:") for line in err), err
    assert "training failed" in err[0]


def test_share_budget_known_answer():
    """60% of the step in 9 ms of matrix work leaves 6 ms for the rest (9 / (9 + 6) = 0.6)."""
    import nonmatrix_floor

    assert nonmatrix_floor.share_budget(9.0, 0.6) == pytest.approx(6.0)
    assert nonmatrix_floor.share_budget(9.0, 0.5) == pytest.approx(9.0)


def test_share_if_alone_known_answer():
    """Parts of 3 + 2 ms in the step, 2 + (unmeasured) 2 alone; 2.5 ms outside them under the profiler,
    which added 1 ms to the rest: the rest 2 + 2 + 1.5 = 5.5 ms beside 5.5 ms of matrix work, a 50% share."""
    import nonmatrix_floor

    res = {"in_step_ms": {"a": 3.0, "b": 2.0}, "alone_ms": {"a": 2.0, "b": None}, "other_ms_profiled": 2.5,
           "rest_ms_profiled": 8.5, "rest_ms_unprofiled": 7.5, "matrix_ms": 5.5}
    got = nonmatrix_floor.share_if_alone(res)
    assert got["rest_ms_if_alone"] == pytest.approx(5.5)
    assert got["share_if_alone"] == pytest.approx(0.5)


def test_nonmatrix_floor_runs_on_the_smoke_profile(tmp_path):
    """The floor table's numbers hang together: matrix milliseconds inside the step clocked without and
    with the profiler, the rest is the step minus them, and every part was measured."""
    from icl_core import fused_attention

    if not fused_attention.available():
        pytest.skip("the fused CPU kernels are not built here")
    import subprocess

    out = tmp_path / "floor.json"  # its own process: it sets the thread count and inductor's kernel names
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nonmatrix_floor.py"), "--profile-name", "smoke",
                    "--steps", "2", "--reps", "1", "--out", str(out)], check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert res["run"] == "attn2"
    assert 0 < res["matrix_ms"] < res["step_ms_unprofiled"] and 0 < res["matrix_ms_profiled"] < res["step_ms_profiled"]
    assert 0 < res["matrix_share_clocked"] < 1
    assert res["rest_ms_unprofiled"] == pytest.approx(res["step_ms_unprofiled"] - res["matrix_ms"])
    assert res["budget_rest_ms_60"] == pytest.approx(res["matrix_ms"] * 2 / 3)
    assert res["in_step_ms"]["loss softmax + logit gradient"] > 0 and res["alone_ms"]["AdamW"] > 0
    assert res["call_us"] > 0 and res["one_pass_over_residual_ms"] > 0


def test_flag_ab_ratio_known_answer():
    """Steps of 2 ms (A) against 1 ms (B): A / B is x2 in every pair."""
    import flag_ab

    got = flag_ab.ratio_summary([0.002] * 5, [0.001] * 5)
    assert got["ratio"] == pytest.approx(2.0) and got["q1"] == pytest.approx(2.0) and got["q3"] == pytest.approx(2.0)
    assert got["a_ms"] == pytest.approx(2.0) and got["pairs"] == 5


def test_flag_ab_names_a_missing_attribute():
    import flag_ab

    with pytest.raises(SystemExit, match="flag_ab: icl_core.model has no attribute 'NO_SUCH_FLAG'"):
        flag_ab.main(["icl_core.model.NO_SUCH_FLAG"])
    with pytest.raises(SystemExit, match="flag_ab: no module 'icl_core.no_such_module'"):
        flag_ab.main(["icl_core.no_such_module.X"])

"""benchmarks/gpu/run_profile.py and pack_carry.py (issue 23): the one-command build of a profile on a
lent GPU, dry-run here on the CPU with the smoke profile, and its bad inputs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_profile.py"
PROVENANCE_FIELDS = ("schema", "profile", "status", "started_utc", "finished_utc", "command", "git", "device",
                     "stages", "wall_s", "gpu_s", "runs", "chapters", "results", "jobs", "train_device")
WEIGHTS_OR_NOTEBOOKS = (".ipynb", ".safetensors", ".pt", ".pth", ".bin", ".npy", ".ckpt")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rp = _load("run_profile")


def _run(args, env_extra=None, timeout=900):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _one_error_line(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# --- bad input: one line, exit 2, and still a provenance file --------------------------------------

def test_require_gpu_without_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _run(["--profile", "smoke", "--summary", str(tmp_path / "s"), "--require-gpu"])
    assert r.returncode == 2
    assert "sees no CUDA device" in _one_error_line(r)
    prov = json.loads((tmp_path / "s" / "provenance.json").read_text())
    assert prov["status"] == "bad input" and prov["failed_stage"] == "setup" and prov["device"]["gpu"] == "cpu"


@pytest.mark.parametrize("flag,what", [("--corpora", "corpus folder"), ("--carry", "is not a folder")])
def test_missing_corpus_or_carry_folder(tmp_path, flag, what):
    r = _run(["--profile", "smoke", "--summary", str(tmp_path / "s"), flag, str(tmp_path / "nowhere")])
    assert r.returncode == 2
    assert what in _one_error_line(r)


def test_unknown_profile_and_a_partial_summary_at_budget(tmp_path):
    r = _run(["--profile", "nope", "--summary", str(tmp_path / "s"), "--budget-s", "0.001"])
    assert r.returncode == 2 and "unknown profile" in _one_error_line(r)
    assert "partial summary written" in (tmp_path / "s" / "build.log").read_text()
    assert json.loads((tmp_path / "s" / "provenance.json").read_text())["status"] == "bad input"  # the final word


# --- pieces ----------------------------------------------------------------------------------------

def test_unpack_fixes_scripts_and_rejects_bad_archives(tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_text("#!/some/other/python3.11\nprint('hi')\n")
    (src / "pkg").mkdir()
    (src / "pkg" / "__init__.py").write_text("")
    arc = tmp_path / "site.tar.xz"
    with tarfile.open(arc, "w:xz") as tf:
        for p in sorted(src.iterdir()):
            tf.add(p, arcname=p.name)
    assert rp.unpack(arc, tmp_path / "out") == 2
    assert rp.fix_scripts(tmp_path / "out" / "bin", "/usr/bin/python3") == 1
    assert (tmp_path / "out" / "bin" / "tool").read_text().startswith("#!/usr/bin/python3\nprint")
    (tmp_path / "bad.tar.xz").write_bytes(b"not an archive")
    with pytest.raises(rp.BadInput, match="unreadable"):
        rp.unpack(tmp_path / "bad.tar.xz", tmp_path / "x")
    with pytest.raises(rp.BadInput, match="missing"):
        rp.unpack(tmp_path / "none.tar.xz", tmp_path / "x")


def test_collect_results_merges_small_json(tmp_path):
    build = tmp_path / "_build"
    ex = build / "executed" / "p"
    (ex / "results").mkdir(parents=True)
    (ex / "results" / "01.json").write_text(json.dumps({"claim": "x", "verdict": "reproduced"}))
    (ex / "02.results.json").write_text("[1, 2]")
    (ex / "results" / "bad.json").write_text("{")
    (ex / "03.key.json").write_text(json.dumps({"key": "abc" * 10, "seconds": 1.5}))
    merged, skipped = rp.collect_results(build, "p")
    assert merged == {"executed/p/results/01.json": {"claim": "x", "verdict": "reproduced"},
                      "executed/p/02.results.json": [1, 2]}
    assert len(skipped) == 1 and "bad.json" in skipped[0]
    assert rp.chapter_records(ex) == {"03": {"seconds": 1.5, "key": ("abc" * 10)[:12]}}
    assert rp.collect_results(tmp_path / "empty", "p") == ({}, [])


def test_gpu_profile_fits_its_budget():
    """The gpu profile is sized for one ~8-minute command (benchmarks/gpu/README.md, "Sizing"): keep
    its token total there, its chapters naming only its runs, and the paper's model at three seeds."""
    from icl_core.profiles import load_profile

    prof = load_profile("gpu")
    total = sum(c.train.total_tokens for c in prof.runs.values())
    assert total <= 1.3e9, f"{total / 1e6:.0f}M tokens: resize benchmarks/gpu/README.md's arithmetic first"
    assert {"attn2", "attn2_s1", "attn2_s2"} <= set(prof.chapter_params("01_cooccurrence")["models"]["2L attn-only"])
    for c in prof.runs.values():
        assert c.model.n_ctx == 512 and c.model.positional == "shortformer"


# --- the dry run: the whole script on the CPU with the smoke profile --------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_dry_run_smoke_on_cpu(tmp_path):
    """Pack the smoke profile's corpora as the carry folder (no site archive: this venv has the
    packages), then run the whole script on one chapter: it unpacks and verifies the corpora, trains,
    executes, renders, and writes a summary with every provenance field and no weights or notebooks."""
    pc = _load("pack_carry")
    carry = tmp_path / "carry"
    assert pc.main(["--profile", "smoke", "--dest", str(carry), "--skip", "site", "--skip", "vendor"]) == 0
    assert (carry / "corpora.tar.xz").exists() and json.loads((carry / "carry.json").read_text())["corpora"]
    summary = tmp_path / "summary"
    r = _run(["--profile", "smoke", "--chapter", "00_intro", "--chapter", "03_ablation", "--carry", str(carry),
              "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--summary", str(summary), "--jobs", "1",
              "--precompute-jobs", "2", "--precompute-threads", "1", "--keep-going",
              "--site-archive", str(tmp_path / "site.tar.gz")],
             env_extra={"ICL_RUNS_DIR": str(tmp_path / "runs")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    prov = json.loads((summary / "provenance.json").read_text())
    for f in PROVENANCE_FIELDS:
        assert f in prov, f
    assert prov["status"] == "ok" and prov["device"]["gpu"] == "cpu" and prov["gpu_s"] == 0.0
    assert prov["git"]["commit"] and isinstance(prov["git"]["dirty"], bool)
    assert set(prov["stages"]) == set(rp.STAGES) and all(s["wall_s"] >= 0 for s in prov["stages"].values())
    assert all(c["prebuilt"] for c in prov["corpora"].values())
    run = prov["runs"]["smear2"]
    assert run["done"] and run["trained_here"] and run["train_s"] > 0 and len(run["curve"]) == run["snapshots"]
    assert prov["chapters"]["00_intro"]["seconds"] > 0 and prov["chapters"]["03_ablation"]["seconds"] > 0
    pre = prov["precompute"]  # chapter 3's per-run pieces, computed as each run finished training
    from icl_core.profiles import load_profile
    ch3_runs = load_profile("smoke").chapters["03_ablation"]["runs"]
    assert pre["tasks"] == 3 * len(ch3_runs) and not pre["failed"] and len(pre["done"]) == pre["tasks"]
    assert "OMP_NUM_THREADS" in (summary / "build.log").read_text()  # chapter 0 ran beside the pieces, on fewer threads
    assert "n_files" in prov["results"] and json.loads((summary / "results.json").read_text())["profile"] == "smoke"
    assert (tmp_path / "site.tar.gz").stat().st_size > 0
    left = sorted(p.name for p in summary.rglob("*") if p.is_file())
    assert left == ["build.log", "provenance.json", "results.json"], left
    assert not [p for p in summary.rglob("*") if p.suffix in WEIGHTS_OR_NOTEBOOKS]


def test_git_info_takes_the_carry_commit_and_keeps_what_git_said():
    """The device machine's copy of .git was stale once (it named a commit two before the carry's):
    with a carry, its commit is the build's; the local .git's is kept beside it."""
    from icl_core.book.chapters import source_hash
    carry = {"git": {"commit": "f" * 40, "dirty": False, "branch": "main", "icl_core_source": source_hash()}}
    g = rp.git_info(ROOT, carry_manifest=carry)
    assert g["commit"] == "f" * 40 and g["matches_carry"] is True and g["source"].startswith("carry.json")
    assert g["git_here"]["commit"] and g["git_here"]["commit"] != "f" * 40
    other = {"git": dict(carry["git"], icl_core_source="0" * 64)}
    assert rp.git_info(ROOT, carry_manifest=other)["matches_carry"] is False
    assert rp.git_info(ROOT)["source"] == "git" and "git_here" not in rp.git_info(ROOT)


def test_pack_carry_fails_here_on_a_run_whose_validation_text_is_too_short(tmp_path, capsys):
    """A run asking for more evaluation windows than its validation text holds stops the packing
    with one line naming it (it stopped the first GPU build, on the machine, instead)."""
    from dataclasses import replace

    from icl_core.config import ConfigError
    from icl_core.profiles import load_profile
    pc = _load("pack_carry")
    smoke = load_profile("smoke")
    cfg = smoke.runs["attn2_prose"]
    too_many = replace(cfg, data=replace(cfg.data, n_eval=10 ** 6))
    prof = type(smoke)(smoke.name, smoke.description, smoke.banner, runs={"big": too_many}, chapters={})
    with pytest.raises(ConfigError, match="run 'big' of profile 'smoke': the validation documents hold only"):
        pc.profile_corpora(prof)
    assert list(pc.profile_corpora(type(smoke)(smoke.name, "", "", runs={"ok": cfg}, chapters={})).values()) == [["ok"]]

"""Reliability and safety (issue 12): nothing lost on crashes, corruption detected, one trainer per
run, bad input refused with one clear error, no unsafe loading, deterministic training.

The fault-injection tests kill real processes with SIGKILL (see tests/crash_child.py) and are marked
slow; they run in `make test`.
"""
from __future__ import annotations

import ast
import errno
import json
import math
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

import icl_core
import icl_core.io as io
import icl_core.train as T
from icl_core import data as D
from icl_core.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, icl_indices
from icl_core.io import CorruptFileError, load_tensors, read_json_checked
from icl_core.profiles import load_profile
from icl_core.runs import Run, get_or_train, run_path

HERE = Path(__file__).resolve().parent
CHILD = HERE / "crash_child.py"
PY = sys.executable


# --- a tiny run: 20 steps, snapshots at 0, 1, 4, 10, 20 --------------------------------------

@pytest.fixture(scope="module")
def cfg(text_folder) -> RunConfig:
    return RunConfig(
        name="rel",
        model=ModelConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, d_vocab=300),
        data=DataConfig(sources=(f"folder:{text_folder}",), vocab_size=300, val_fraction=0.2,
                        n_eval=8, n_prefix_seqs=4, prefix_seq_len=10),
        train=TrainConfig(batch_size=4, total_tokens=4 * 64 * 20, n_snapshots=6, warmup_steps=5, threads=1),
    )


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory) -> Run:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    run = get_or_train(cfg, root=tmp_path_factory.mktemp("reference"), progress=False)
    assert run.done and run.steps == [0, 1, 4, 10, 20]
    return run


def assert_identical(run: Run, ref: Run):
    """Same snapshots (bytes, every tensor of the final one), same metrics and kept eval losses (and
    both readable), same loss log."""
    assert run.done and run.steps == ref.steps
    for s in ref.steps:
        a, b = run.manifest["snapshots"][str(s)], ref.manifest["snapshots"][str(s)]
        assert a["sha256"] == b["sha256"], f"snapshot {s} differs"
        assert a["metrics"] == b["metrics"] and a["tokens"] == b["tokens"]
        assert a["losses_sha256"] == b["losses_sha256"], f"kept eval losses at snapshot {s} differ"
        assert torch.equal(run.eval_losses(s), ref.eval_losses(s))
    wa, wb = run.load().state_dict(), ref.load().state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb)
    assert run.manifest["train_log"] == ref.manifest["train_log"]
    assert len(ref.manifest["train_log"]) == ref.config.total_steps


def assert_clean(path: Path):
    """A finished run folder holds no partial writes and no resume state."""
    assert not list(path.rglob("*.tmp")), list(path.rglob("*.tmp"))
    assert not list(path.glob("resume*"))


def corrupt(path: Path, how: str, where: float = 0.5):
    b = bytearray(path.read_bytes())
    if how == "truncate":
        b = b[: int(len(b) * where)]
    elif how == "empty":
        b = bytearray()
    elif how == "zero":
        b = bytearray(len(b))
    elif how == "flip":
        b[int(len(b) * where)] ^= 0x10
    else:
        raise ValueError(how)
    path.unlink()  # a new file: a reader's memory map of the old one (np.load mmap_mode) stays valid
    path.write_bytes(bytes(b))


# --- crash anywhere, lose nothing ---------------------------------------------------------------

class Zygote:
    """tests/crash_child.py in zygote mode: each job runs (and dies) in a forked child process."""

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([PY, str(CHILD), "zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env)
        self.ready = False  # it imports torch while the reference run trains

    def run(self, job: dict) -> dict:
        if not self.ready:
            line = self.p.stdout.readline()
            assert "ready" in line, f"zygote did not start: {line!r}"
            self.ready = True
        self.p.stdin.write(json.dumps(job) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "zygote died"
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(shared_corpus_cache):
    z = Zygote()
    yield z
    z.close()


def _job(cfg, root, tmp, name, **kw):
    return {"root": str(root), "cfg": cfg.to_dict(), "log": str(tmp / f"{name}.log"), "resume_every": 3, **kw}


def _log(tmp, name):
    p = tmp / f"{name}.log"
    return p.read_text() if p.exists() else ""


@pytest.mark.slow
def test_kill_9_anywhere_then_rerun_is_bit_identical(cfg, zygote, reference, tmp_path, monkeypatch):
    # 1. where does an uninterrupted child write? (resume state every 3 steps, as in the killed runs)
    trace = tmp_path / "trace.txt"
    st_ = zygote.run(_job(cfg, tmp_path / "traced", tmp_path, "traced", trace=str(trace)))
    assert st_["exit"] == 0, _log(tmp_path, "traced")
    assert_identical(Run(run_path(cfg, tmp_path / "traced")), reference)
    writes = trace.read_text().split()

    def nth(name, k=0):  # 1-based index of the k-th write of `name` (k=-1: the last)
        idx = [i + 1 for i, w in enumerate(writes) if w == name]
        assert idx, (name, writes)
        return idx[k]

    def after(name, then):  # the write that follows the first write of `name`
        i = nth(name) + 1
        assert writes[i - 1] == then, (name, then, writes)
        return i
    points = [  # (label, kill spec)
        ("config, before the first write", {"write": 1, "at": "before"}),
        ("snapshot 0, half written", {"write": nth("snapshots/step_00000000.safetensors"), "at": "mid"}),
        ("first manifest, written not renamed", {"write": nth("manifest.json"), "at": "tmp"}),
        ("resume tensors at step 1, half written", {"write": nth("resume_00000001.safetensors"), "at": "mid"}),
        ("resume.json at step 3 not renamed (stale resume file)",
         {"write": after("resume_00000003.safetensors", "resume.json"), "at": "tmp"}),
        ("right after resume.json at step 6", {"write": after("resume_00000006.safetensors", "resume.json"),
                                               "at": "after"}),
        ("snapshot 10, written not renamed", {"write": nth("snapshots/step_00000010.safetensors"), "at": "tmp"}),
        ("kept eval losses at snapshot 10, half written",
         {"write": after("snapshots/step_00000010.safetensors", "snapshots/losses_00000010.safetensors"), "at": "mid"}),
        ("manifest after snapshot 10, half written",
         {"write": after("snapshots/losses_00000010.safetensors", "manifest.json"), "at": "mid"}),
        ("before the resume tensors at step 15", {"write": nth("resume_00000015.safetensors"), "at": "before"}),
        ("final manifest (done), not renamed", {"write": nth("manifest.json", -1), "at": "tmp"}),
        ("after the final manifest, before resume cleanup", {"write": nth("manifest.json", -1), "at": "after"}),
        ("training step 8", {"step": 8}),
        ("training step 17", {"step": 17}),
    ]
    rng = random.Random(12)
    points += [(f"random time {i}", {"random": round(rng.uniform(0.02, 0.35), 3)}) for i in range(4)]
    assert len(points) >= 10
    for i, (label, kill) in enumerate(points):
        root = tmp_path / f"k{i}"
        job = _job(cfg, root, tmp_path, f"k{i}")
        if "random" in kill:  # a slowed trainer (20 ms per step) killed from outside at a random time
            job.update(slow=0.02, ready=str(tmp_path / f"k{i}.ready"), kill_after=kill["random"])
        else:
            job["kill"] = kill
        res = zygote.run(job)
        assert res["signal"] == 9, (label, res, _log(tmp_path, f"k{i}"))
        path = run_path(cfg, root)
        if kill.get("at") in ("mid", "tmp"):
            assert list(path.rglob(".*.tmp")), label  # the partial write is really there
        run = get_or_train(cfg, root=root, progress=False)  # rerun (this process)
        assert_identical(run, reference)
        assert_clean(path)


@pytest.mark.slow
def test_kill_9_while_building_the_token_cache(cfg, zygote, reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    res = zygote.run(_job(cfg, tmp_path / "runs", tmp_path, "c", cache=str(cache), kill={"write": 3, "at": "mid"}))
    assert res["signal"] == 9, _log(tmp_path, "c")
    (corpus_dir,) = cache.glob("corpus-*")
    assert list(corpus_dir.glob(".*.tmp")) and not (corpus_dir / "manifest.json").exists()
    monkeypatch.setenv("ICL_CACHE_DIR", str(cache))
    assert_identical(get_or_train(cfg, root=tmp_path / "runs", progress=False), reference)
    assert not list(corpus_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_leftover_tmp_and_stale_resume_files_never_break_a_resume(cfg, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "RESUME_EVERY", 3)
    path = run_path(cfg, tmp_path)
    T.Trainer(cfg, path).run(progress=False, stop_after=8)  # resume state at step 6
    assert read_json_checked(path / "resume.json")["step"] == 6
    # garbage a killed writer could leave, and resume files resume.json does not point to
    (path / ".manifest.json.abc123.tmp").write_bytes(b'{"half')
    (path / "snapshots" / ".step_00000010.safetensors.x.tmp").write_bytes(b"\0" * 100)
    (path / ".resume.json.zz.tmp").write_text("{}")
    (path / "resume_00000009.safetensors").write_bytes(b"not a checkpoint")
    (path / "resume_00000003.safetensors").write_bytes(b"stale")
    run = get_or_train(cfg, root=tmp_path, progress=False)
    assert_identical(run, reference)
    assert_clean(path)


@pytest.mark.slow
@pytest.mark.parametrize("nth_write", [1, 3, 6])
def test_disk_full_during_a_write_loses_nothing(cfg, reference, tmp_path, monkeypatch, nth_write):
    """A write that fails (ENOSPC at fsync) leaves the previous file intact and no temporary file."""
    real, calls = os.fsync, [0]

    def fsync(fd):  # count fsyncs of files (not of folders)
        calls[0] += stat.S_ISREG(os.fstat(fd).st_mode)
        if calls[0] == nth_write and stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space"):
        get_or_train(cfg, root=tmp_path, progress=False)
    monkeypatch.setattr(io.os, "fsync", real)
    path = run_path(cfg, tmp_path)
    assert not list(path.rglob("*.tmp"))
    assert_identical(get_or_train(cfg, root=tmp_path, progress=False), reference)


# --- corruption is detected, never used ----------------------------------------------------------

HOWS = ["truncate", "empty", "zero", "flip"]


@pytest.mark.slow
@pytest.mark.parametrize("how", HOWS)
def test_corrupt_snapshot_is_refused_with_a_clear_message(reference, tmp_path, how):
    path = shutil.copytree(reference.path, tmp_path / reference.path.name)
    for step in (0, 10, 20):
        f = path / "snapshots" / f"step_{step:08d}.safetensors"
        corrupt(f, how, where=0.3)
        with pytest.raises(CorruptFileError, match=rf"step_{step:08d}.safetensors failed its checksum.*not used"):
            Run(path).load(step)
    # a missing snapshot file is refused too
    (path / "snapshots" / "step_00000004.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        Run(path).load(4)


@pytest.mark.slow
@pytest.mark.parametrize("how", HOWS)
def test_corrupt_manifest_is_refused_then_retrained_identically(cfg, reference, tmp_path, how):
    path = shutil.copytree(reference.path, run_path(cfg, tmp_path))
    corrupt(path / "manifest.json", how, where=0.37)
    with pytest.raises(CorruptFileError, match="manifest.json.*(not valid JSON|checksum|no checksum)"):
        Run(path)
    assert_identical(get_or_train(cfg, root=tmp_path, progress=False), reference)


@pytest.mark.slow
@pytest.mark.parametrize("how", HOWS)
def test_corrupt_config_json_is_refused(cfg, reference, tmp_path, how):
    path = shutil.copytree(reference.path, run_path(cfg, tmp_path))
    corrupt(path / "config.json", how)
    with pytest.raises(CorruptFileError, match="config.json"):
        Run(path)
    assert_identical(get_or_train(cfg, root=tmp_path, progress=False), reference)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_bit_flip_in_a_checksummed_json_is_caught_or_harmless(reference, tmp_path_factory, pos, bit):
    """A flipped bit either fails the checksum / JSON parse or leaves the same content (e.g. 1e-05 -> 1E-05)."""
    src = reference.path / "manifest.json"
    f = tmp_path_factory.mktemp("flip") / "manifest.json"
    b = bytearray(src.read_bytes())
    b[int(pos * len(b))] ^= 1 << bit
    f.write_bytes(bytes(b))
    try:
        got = read_json_checked(f)
    except CorruptFileError:
        return
    assert got == read_json_checked(src)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(D.Corpus.FILES) + ["manifest.json"])
def test_corrupt_token_cache_is_detected_and_rebuilt(cfg, tmp_path, capsys, name):
    ref = D.Corpus(cfg.data, tmp_path)
    want = {f: io.file_sha256(ref.dir / f) for f in D.Corpus.FILES}
    train = ref.train.copy()
    for how in HOWS:
        corrupt(ref.dir / name, how, where=0.6)
        c = D.Corpus(cfg.data, tmp_path)
        assert "failed its checksum: rebuilding" in capsys.readouterr().out, (name, how)
        assert {f: io.file_sha256(c.dir / f) for f in D.Corpus.FILES} == want
        assert (c.train == train).all() and c.encode("abc de") == ref.encode("abc de")


@pytest.fixture(scope="module")
def partial(cfg, tmp_path_factory) -> Path:
    """A run stopped at step 13: snapshots 0, 1, 4, 10 and the resume state of step 10."""
    path = run_path(cfg, tmp_path_factory.mktemp("partial"))
    T.Trainer(cfg, path).run(progress=False, stop_after=13)
    assert read_json_checked(path / "resume.json")["step"] == 10
    return path


@pytest.mark.slow
@pytest.mark.parametrize("target,how", [("tensors", "truncate"), ("tensors", "flip"), ("tensors", "missing"),
                                        ("json", "flip"), ("json", "empty")])
def test_corrupt_resume_state_is_not_used(cfg, reference, partial, tmp_path, capsys, target, how):
    path = shutil.copytree(partial, run_path(cfg, tmp_path))
    meta = read_json_checked(path / "resume.json")
    assert meta["step"] == 10
    f = path / meta["file"] if target == "tensors" else path / "resume.json"
    if how == "missing":
        f.unlink()
    else:
        corrupt(f, how, where=0.7)
    capsys.readouterr()
    run = get_or_train(cfg, root=tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "resume state unusable" in out and "restarting this run from step 0" in out, out
    assert_identical(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip", "missing"])
def test_lost_manifest_of_a_partial_run_restarts_instead_of_dropping_snapshots(cfg, reference, partial,
                                                                             tmp_path, capsys, how):
    path = shutil.copytree(partial, run_path(cfg, tmp_path))
    if how == "missing":
        (path / "manifest.json").unlink()
    else:
        corrupt(path / "manifest.json", how)
    run = get_or_train(cfg, root=tmp_path, progress=False)
    assert "restarting this run from step 0" in capsys.readouterr().out
    assert_identical(run, reference)


# --- two builds at once -------------------------------------------------------------------------

@pytest.mark.slow
def test_two_builds_at_once_train_the_run_once(cfg, zygote, reference, tmp_path):
    """Three processes start at once on an empty corpus cache: two build the same run, one another run
    of the same corpus. The run is trained once (the second builder waits on the run's lock, then
    reuses it), the token cache is built once, and nothing is corrupted."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    marker = tmp_path / "marker.txt"
    root, cache = tmp_path / "runs", tmp_path / "cache"
    other = RunConfig.from_dict({**cfg.to_dict(), "name": "rel_s1", "train": {**cfg.to_dict()["train"], "seed": 1}})
    jobs = [_job(c, root, tmp_path, f"p{i}", cache=str(cache), barrier=[str(barrier), 3], marker=str(marker),
                 result=str(tmp_path / f"p{i}.json"), slow=0.01)
            for i, c in enumerate([cfg, cfg, other])]
    res = zygote.run({"parallel": jobs})
    assert res["exit"] == [0, 0, 0], [_log(tmp_path, f"p{i}") for i in range(3)]
    lines = marker.read_text().splitlines()
    snaps = [ln.split() for ln in lines if ln.startswith("snapshot")]
    for name in ("rel", "rel_s1"):
        mine = [(pid, int(step)) for _, pid, step, n in snaps if n == name]
        assert len({pid for pid, _ in mine}) == 1, f"{name} was trained by two processes"
        assert [step for _, step in mine] == reference.steps  # each snapshot written once
    assert sum(ln.startswith("corpus") for ln in lines) == 1, lines  # the token cache was built once
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(3)]
    assert results[0]["sha"] == results[1]["sha"] == reference.manifest["snapshots"]["20"]["sha256"]
    run = Run(run_path(cfg, root))
    for s in run.steps:
        run.load(s)  # every snapshot passes its checksum
    assert_identical(run, reference)
    assert_clean(run.path)


# --- bad input: one clear error naming the field and value, before any training --------------------

BASE = {"model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_ctx": 64, "d_vocab": 300},
        "data": {"vocab_size": 300, "prefix_seq_len": 10, "n_eval": 8},
        "train": {"batch_size": 4, "total_tokens": 4 * 64 * 20}}


def _merge(patch):
    from icl_core.config import merge
    return merge(BASE, patch)


@pytest.mark.parametrize("patch,needles", [
    ({"model": {"n_layer": 2}}, ["n_layer", "did you mean 'n_layers'"]),
    ({"trian": {"lr": 1e-3}}, ["trian", "did you mean 'train'"]),
    ({"data": {"vocab": 300}}, ["vocab", "vocab_size"]),
    ({"model": {"n_ctx": "big"}}, ["model.n_ctx", "'big'", "integer"]),
    ({"model": {"n_ctx": 64.5}}, ["model.n_ctx", "64.5"]),
    ({"model": {"attn_only": "yes"}}, ["model.attn_only", "'yes'"]),
    ({"train": {"lr": "fast"}}, ["train.lr", "'fast'"]),
    ({"train": {"lr": float("nan")}}, ["train.lr", "nan"]),
    ({"train": {"lr": 10 ** 400}}, ["train.lr", "finite"]),
    ({"data": {"sources": "bible"}}, ["data.sources", "'bible'", "list"]),
    ({"data": {"sources": ["bible", 3]}}, ["data.sources[1]", "3"]),
    ({"model": []}, ["model", "mapping"]),
    ({"model": {"d_model": 30, "n_heads": 4}}, ["model.d_model=30", "n_heads=4"]),
    ({"model": {"n_ctx": 2}}, ["model.n_ctx=2", "ICL indices"]),
    ({"model": {"n_ctx": 32}}, ["model.n_ctx=32", "repeated-token"]),
    ({"model": {"n_layers": 0}}, ["model.n_layers=0", "positive"]),
    ({"model": {"n_heads": -2}}, ["model.n_heads=-2"]),
    ({"model": {"positional": "alibi"}}, ["model.positional='alibi'"]),
    ({"model": {"positional": "rope", "d_head": 5}}, ["model.d_head=5", "even"]),
    ({"model": {"d_vocab": 512}}, ["model.d_vocab=512", "data.vocab_size=300"]),
    ({"data": {"vocab_size": 100}, "model": {"d_vocab": 100}}, ["data.vocab_size=100"]),
    ({"data": {"vocab_size": 70000}, "model": {"d_vocab": 70000}}, ["data.vocab_size=70000"]),
    ({"data": {"val_fraction": 0.7}}, ["data.val_fraction=0.7"]),
    ({"data": {"sources": []}}, ["data.sources"]),
    ({"data": {"sources": ["wiki"]}}, ["data.sources", "'wiki'"]),
    ({"data": {"prefix_repeats": 1}}, ["data.prefix_repeats=1"]),
    ({"data": {"eval_seed": -1}}, ["data.eval_seed=-1"]),
    ({"train": {"seed": 2 ** 40}}, ["train.seed=1099511627776"]),
    ({"train": {"lr": 0}}, ["train.lr=0"]),
    ({"train": {"beta2": 1.0}}, ["train.beta2=1.0"]),
    ({"train": {"grad_clip": -1}}, ["train.grad_clip=-1"]),
    ({"train": {"total_tokens": 100}}, ["train.total_tokens=100", "one batch"]),
    ({"train": {"precision": "fp8"}}, ["train.precision='fp8'"]),
    ({"train": {"lr_schedule": "linear"}}, ["train.lr_schedule='linear'"]),
])
def test_bad_config_is_one_clear_error_naming_field_and_value(patch, needles):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(_merge(patch))
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert "\n" not in msg and "Traceback" not in msg


def test_icl_indices_fit_every_accepted_context():
    for n_ctx in range(2, 1100):
        late, early = icl_indices(n_ctx)
        if 1 <= early < late:
            assert late <= n_ctx - 1


@pytest.fixture
def profiles(tmp_path):
    src = yaml.safe_load((HERE.parent / "configs" / "profiles" / "smoke.yaml").read_text())
    return tmp_path, src


def test_unknown_profile_is_a_clear_error(profiles):
    d, src = profiles
    (d / "ok.yaml").write_text(yaml.safe_dump(src))
    with pytest.raises(ConfigError, match=r"unknown profile 'lap' \(known: ok\)"):
        load_profile("lap", d)
    with pytest.raises(ConfigError, match=r"unknown profile 'lptop'.*laptop"):
        load_profile("lptop")


@pytest.mark.parametrize("edit,needles", [
    (lambda s: s["runs"]["attn2"].setdefault("model", {}).update(n_layer=3), ["run 'attn2'", "n_layer", "n_layers"]),
    (lambda s: s["defaults"].setdefault("train", {}).update(lr="0.001"), ["train.lr", "'0.001'"]),
    (lambda s: s["defaults"].setdefault("model", {}).update(n_ctx=8), ["model.n_ctx=8"]),
    (lambda s: s.update(chapter={}), ["chapter"]),
    (lambda s: s["chapters"]["00_intro"].update(runs=["atn2"]), ["00_intro", "'atn2'"]),
])
def test_bad_profile_names_profile_run_and_field(profiles, edit, needles):
    d, src = profiles
    edit(src)
    (d / "bad.yaml").write_text(yaml.safe_dump(src))
    with pytest.raises(ConfigError) as e:
        load_profile("bad", d)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("text,needle", [("runs: [a, b\n", "not valid YAML"), ("- a\n- b\n", "mapping"),
                                         (b"runs: {a: \xff}\n", "not valid YAML")])
def test_unparsable_profile_is_a_config_error(tmp_path, text, needle):
    f = tmp_path / "p.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=needle):
        load_profile("p", tmp_path)


def _folder_cfg(folder) -> RunConfig:
    return RunConfig.from_dict(_merge({"data": {"sources": [f"folder:{folder}"]}}))


@pytest.mark.parametrize("kind", ["empty", "blank", "missing", "latin1", "binary"])
def test_bad_corpus_folder_fails_before_any_training(tmp_path, monkeypatch, kind):
    folder = tmp_path / "corpus"
    if kind != "missing":
        folder.mkdir()
    if kind == "blank":
        (folder / "a.txt").write_text("  \n\n")
    if kind == "latin1":
        (folder / "a.txt").write_text("hello " * 50)
        (folder / "b.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    if kind == "binary":
        (folder / "x.bin").write_bytes(bytes(range(256)))
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _folder_cfg(folder)

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(T, "init_model", no_training)
    with pytest.raises(ConfigError) as e:
        get_or_train(cfg, root=tmp_path / "runs", progress=False)
    msg = str(e.value)
    assert "data.sources" in msg and str(folder) in msg, msg
    if kind in ("latin1", "binary"):
        assert "UTF-8" in msg and ("b.txt" in msg or "x.bin" in msg)
    assert not list((tmp_path / "runs").rglob("*.safetensors"))


# --- property-based: configs round-trip and hash stably; bad values raise ConfigError only ----------

_div = st.sampled_from([(1, 8), (2, 8), (2, 16), (4, 8), (4, 32), (8, 16)])


@st.composite
def valid_config_dicts(draw):
    n_heads, d_head = draw(_div)
    seq, reps = draw(st.integers(1, 30)), draw(st.integers(2, 5))
    n_ctx = draw(st.integers(max(1 + seq * reps, 4), 600))
    vocab = draw(st.integers(260, 65535))
    batch = draw(st.integers(1, 64))
    return {
        "name": draw(st.text(max_size=20)),
        "model": {"n_layers": draw(st.integers(1, 12)), "d_model": n_heads * d_head, "n_heads": n_heads,
                  "n_ctx": n_ctx, "d_vocab": vocab, "attn_only": draw(st.booleans()),
                  "positional": draw(st.sampled_from(["learned", "shortformer", "rope", "none"])),
                  "smeared_keys": draw(st.booleans()),
                  "init_std": draw(st.floats(1e-6, 1.0)),
                  "pos_init_std": draw(st.none() | st.floats(1e-6, 1.0)),
                  "d_mlp": draw(st.none() | st.integers(1, 1024))},
        "data": {"sources": draw(st.lists(st.sampled_from(["bible", "code", "folder:/x", "hf:wikitext"]),
                                          min_size=1, max_size=3)),
                 "vocab_size": vocab, "val_fraction": draw(st.floats(0.001, 0.499)),
                 "split_seed": draw(st.integers(0, 2**31)), "eval_seed": draw(st.integers(0, 2**32 - 1)),
                 "n_eval": draw(st.integers(1, 1000)), "prefix_seq_len": seq, "prefix_repeats": reps,
                 "repeat_fraction": draw(st.floats(0, 1)), "max_chars_per_source": draw(st.integers(0, 10**9))},
        "train": {"seed": draw(st.integers(0, 2**32 - 1)), "batch_size": batch,
                  "lr": draw(st.floats(1e-6, 1.0)), "warmup_steps": draw(st.integers(0, 10**4)),
                  "lr_schedule": draw(st.sampled_from(["constant", "cosine"])),
                  "weight_decay": draw(st.floats(0, 1)), "beta1": draw(st.floats(0, 0.999)),
                  "beta2": draw(st.floats(0, 0.9999)), "grad_clip": draw(st.floats(0, 10)),
                  "total_tokens": draw(st.integers(batch * n_ctx, 10**10)),
                  "precision": draw(st.sampled_from(["bf16", "fp32"])), "n_snapshots": draw(st.integers(1, 500)),
                  "threads": draw(st.integers(0, 64))},
    }


def _check_round_trip(cfg: RunConfig):
    h = cfg.hash()
    assert len(h) == 12 and int(h, 16) >= 0
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.hash() == h
    via_json = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert via_json == cfg and via_json.hash() == h
    via_yaml = RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())))))
    assert via_yaml == cfg and via_yaml.hash() == h
    d = cfg.to_dict()
    d["name"], d["train"]["threads"] = d["name"] + "x", d["train"]["threads"] + 1
    assert RunConfig.from_dict(d).hash() == h  # name and threads do not change the result
    d["train"]["seed"] = (d["train"]["seed"] + 1) % 2**32
    assert RunConfig.from_dict(d).hash() != h


def test_eval_precision_left_unset_keeps_old_hashes_and_is_checked():
    """train.eval_precision is new: unset (None, fp32 metrics as before) keeps every cached run's
    hash; bf16 is another run; anything else is a ConfigError naming the field."""
    base = RunConfig()
    d = base.to_dict()
    d["train"].pop("eval_precision")
    assert RunConfig.from_dict(d).hash() == base.hash()
    bf = RunConfig.from_dict({**base.to_dict(), "train": {**base.to_dict()["train"], "eval_precision": "bf16"}})
    assert bf.hash() != base.hash()
    with pytest.raises(ConfigError, match="eval_precision"):
        RunConfig.from_dict({**base.to_dict(), "train": {**base.to_dict()["train"], "eval_precision": "fp16"}})


@settings(max_examples=60, deadline=None)
@given(valid_config_dicts())
def test_valid_configs_round_trip_and_hash_stably(d):
    _check_round_trip(RunConfig.from_dict(d))


_wild = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.one_of(st.integers(-2, 2), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from([10**400, -0.0, 1e308, 2**32, 2**64, "bible", "rope", "fp32", "cosine", ["bible"]]),
)
_FIELDS = [("model", f) for f in ModelConfig.__dataclass_fields__] + \
          [("data", f) for f in DataConfig.__dataclass_fields__] + \
          [("train", f) for f in TrainConfig.__dataclass_fields__] + \
          [("model", "n_layer"), ("data", "vocab"), ("train", "sed"), (None, "name"), (None, "modle"),
           (None, "model"), (None, "train")]


@settings(max_examples=200, deadline=None)
@given(base=valid_config_dicts(), edits=st.lists(st.tuples(st.sampled_from(_FIELDS), _wild), min_size=1, max_size=3))
def test_any_config_value_is_accepted_or_a_config_error(base, edits):
    d = json.loads(json.dumps(base))
    for (section, name), value in edits:
        if section is None:
            d[name] = value
        elif isinstance(d.get(section), dict):
            d[section][name] = value
    try:
        cfg = RunConfig.from_dict(d)
    except ConfigError as e:
        assert str(e)
        return
    _check_round_trip(cfg)  # whatever is accepted is a well-formed, finite, hashable config
    for f in ("lr", "weight_decay", "beta1", "beta2", "grad_clip"):
        assert math.isfinite(getattr(cfg.train, f))


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12))
def test_arbitrary_yaml_data_gives_config_error_only(obj):
    """Whatever YAML holds, from_dict either refuses it with a ConfigError that says why, or
    accepts a mapping and returns a well-formed config."""
    try:
        cfg = RunConfig.from_dict(obj)
    except ConfigError as e:
        assert str(e), "a ConfigError must say what is wrong"
        return
    assert isinstance(obj, dict), f"{obj!r} is not a mapping, yet it was accepted as a run config"
    _check_round_trip(cfg)


@pytest.mark.parametrize("obj", [None, 3, "attn2", [1, 2], {"model": 3}, {"train": {"lr": "fast"}}])
def test_yaml_that_is_no_run_config_is_refused(obj):
    with pytest.raises(ConfigError, match=".+"):
        RunConfig.from_dict(obj)


# --- no unsafe loading --------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Unsafe deserialisation in Python source: pickle-family imports, torch.load without
    weights_only=True, yaml.load/unsafe_load/full_load, np.load(allow_pickle=True), pandas read_pickle."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            bad += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                bad.append(f"{where} from {node.module} import")
            bad += [f"{where} import {a.name}" for a in node.names
                    if a.name in ("load", "unsafe_load", "full_load", "read_pickle") and node.module in
                    ("torch", "yaml", "pandas")]
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f"{where} torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                bad.append(f"{where} yaml.{name} (use yaml.safe_load)")
            if owner in ("np", "numpy") and name == "load":
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    bad.append(f"{where} np.load with allow_pickle")
            if name in ("read_pickle", "loads") and owner in UNSAFE_MODULES | {"pd", "pandas"}:
                bad.append(f"{where} {owner}.{name}")
            if name == "Unpickler":
                bad.append(f"{where} Unpickler")
    return bad


def test_the_scanner_catches_unsafe_loading():
    for src in ["import pickle", "import dill as d", "from pickle import loads", "from torch import load",
                "torch.load('x')", "torch.load('x', weights_only=False)", "yaml.load(s)", "yaml.full_load(s)",
                "np.load('x', allow_pickle=True)", "numpy.load(f, allow_pickle=flag)", "pd.read_pickle('x')",
                "import joblib"]:
        assert unsafe_calls(src), src
    for src in ["torch.load('x', weights_only=True)", "yaml.safe_load(s)", "np.load('x')",
                "np.load('x', allow_pickle=False)", "from safetensors.torch import load"]:
        assert not unsafe_calls(src), src


def test_no_unsafe_loading_in_icl_core():
    pkg = Path(icl_core.__file__).resolve().parent
    files = sorted(pkg.rglob("*.py"))
    assert len(files) > 10
    bad = [b for f in files for b in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(pkg.parent)))]
    assert not bad, "unsafe loading:\n" + "\n".join(bad)
    # and no string-level escape hatches (e.g. importlib.import_module("pickle"))
    for f in files:
        text = f.read_text(encoding="utf-8")
        for word in ("import_module(\"pickle\")", "import_module('pickle')", "__import__('pickle')",
                     "allow_pickle=True", "weights_only=False"):
            assert word not in text, f"{f}: {word}"


# --- determinism --------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_config_and_seed_give_identical_runs(cfg, reference, tmp_path):
    again = get_or_train(cfg, root=tmp_path, progress=False)
    assert_identical(again, reference)
    assert again.metrics().to_dict() == reference.metrics().to_dict()
    # and a different seed does not (the comparison above is not vacuous)
    other = RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": 1}})
    o = get_or_train(other, root=tmp_path, progress=False)
    assert o.manifest["train_log"] != reference.manifest["train_log"]


def test_token_cache_is_rebuilt_identically(cfg, tmp_path):
    a = D.Corpus(cfg.data, tmp_path / "a")
    b = D.Corpus(cfg.data, tmp_path / "b")
    assert a.manifest["sha256"] == b.manifest["sha256"]

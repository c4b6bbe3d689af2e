"""Training, the run cache, resume and corruption handling."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from icl_core import data as D
from icl_core import train as T
from icl_core.config import ConfigError, RunConfig
from icl_core.io import CorruptFileError
from icl_core.runs import Run, get_or_train, run_path
from icl_core.train import Trainer, snapshot_steps


def test_snapshot_schedule_is_log_then_linear():
    s = snapshot_steps(10_000, 40)
    assert s[0] == 0 and s[-1] == 10_000 and s == sorted(set(s))
    assert {1, 2, 3}.issubset(s)  # dense early
    assert len(s) >= 30


def test_twenty_step_run_is_reused_without_training(tiny_run_cfg, tmp_path, monkeypatch):
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    assert run.done and run.steps[-1] == tiny_run_cfg.total_steps == 20
    df = run.metrics()
    assert {"loss", "icl", "prefix_max", "prev_token_max"} <= set(df.columns)
    assert len(df) == len(run.steps)

    def boom(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(Trainer, "run", boom)
    again = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    assert again.steps == run.steps
    m = again.load()
    assert m.cfg == tiny_run_cfg.model


def _weights(run: Run):
    return run.load(run.steps[-1]).state_dict()


def test_resume_states_are_written_at_most_once_per_min_seconds(tiny_run_cfg, tmp_path, monkeypatch):
    """With the time floor (a fast GPU run), a run stopped early has written no resume state yet;
    rerun, it starts over and still ends identical to an uninterrupted run."""
    import icl_core.train as T
    full = get_or_train(tiny_run_cfg, root=tmp_path / "a", progress=False)
    monkeypatch.setattr(T, "RESUME_MIN_SECONDS", 3600.0)
    path = run_path(tiny_run_cfg, tmp_path / "b")
    Trainer(tiny_run_cfg, path).run(progress=False, stop_after=13)
    assert not (path / "resume.json").exists() and len(list((path / "snapshots").glob("step_*"))) >= 3
    resumed = get_or_train(tiny_run_cfg, root=tmp_path / "b", progress=False)
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.manifest["train_log"] == resumed.manifest["train_log"]
    monkeypatch.setattr(T, "RESUME_MIN_SECONDS", 0.0)
    Trainer(tiny_run_cfg, run_path(tiny_run_cfg, tmp_path / "c")).run(progress=False, stop_after=13)
    assert (run_path(tiny_run_cfg, tmp_path / "c") / "resume.json").exists()  # the floor made the difference


def test_killed_run_resumes_to_identical_weights(tiny_run_cfg, tmp_path):
    full = get_or_train(tiny_run_cfg, root=tmp_path / "a", progress=False)
    path = run_path(tiny_run_cfg, tmp_path / "b")
    Trainer(tiny_run_cfg, path).run(progress=False, stop_after=7)  # "killed" after 7 steps
    assert not json.loads((path / "manifest.json").read_text())["done"]
    resumed = get_or_train(tiny_run_cfg, root=tmp_path / "b", progress=False)
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.manifest["train_log"] == resumed.manifest["train_log"]


def test_compiled_cpu_run_resumes_to_identical_weights(tiny_run_cfg, tmp_path, monkeypatch):
    """The laptop runs train compiled on the CPU (bf16): stopped after 7 steps and rerun from its
    last resume state, a compiled run ends bit-identical to an uninterrupted compiled one."""
    import dataclasses

    import icl_core.train as T
    monkeypatch.setattr(T, "RESUME_MIN_SECONDS", 0.0)
    cfg = dataclasses.replace(tiny_run_cfg, train=dataclasses.replace(tiny_run_cfg.train, precision="bf16"))
    full = Trainer(cfg, tmp_path / "a", compile=True)
    full.run(progress=False)
    Trainer(cfg, tmp_path / "b", compile=True).run(progress=False, stop_after=7)
    assert 0 < json.loads((tmp_path / "b" / "resume.json").read_text())["step"] <= 7
    resumed = Trainer(cfg, tmp_path / "b", compile=True).run(progress=False)
    assert resumed["compiled"] is True
    a, b = _weights(Run(tmp_path / "a")), _weights(Run(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.manifest()["train_log"] == resumed["train_log"]


@pytest.mark.parametrize("how", ["truncate", "flip", "zero"])
def test_corrupt_checkpoint_is_refused(tiny_run_cfg, tmp_path, how):
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    step = run.steps[-1]
    f = run.path / "snapshots" / f"step_{step:08d}.safetensors"
    b = bytearray(f.read_bytes())
    if how == "truncate":
        b = b[: len(b) // 2]
    elif how == "flip":
        b[len(b) // 2] ^= 0x01
    else:
        b = bytearray(len(b))
    f.write_bytes(bytes(b))
    with pytest.raises(CorruptFileError, match="checksum"):
        run.load(step)


def test_corrupt_manifest_is_detected(tiny_run_cfg, tmp_path):
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    p = run.path / "manifest.json"
    d = json.loads(p.read_text())
    d["snapshots"]["0"]["tokens"] = 12345  # edited without updating the checksum
    p.write_text(json.dumps(d))
    with pytest.raises(CorruptFileError):
        Run(run.path)


def test_corrupt_token_cache_is_rebuilt(tiny_run_cfg, tmp_path):
    c1 = D.Corpus(tiny_run_cfg.data, tmp_path)
    ref = c1.train.copy()
    f = c1.dir / "train.npy"
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))
    c2 = D.Corpus(tiny_run_cfg.data, tmp_path)
    assert (c2.train == ref).all()


def test_prebuilt_corpus_folder_is_used_as_is_or_refused(tiny_run_cfg, tmp_path):
    """Corpus.from_folder: a machine without the source packages (a lent GPU) uses a carried
    corpus folder: the same arrays when it verifies; a clear error when it is another corpus or
    a file is corrupt (never rebuilt, never used)."""
    import dataclasses
    built = D.Corpus(tiny_run_cfg.data, tmp_path / "cache")
    moved = tmp_path / "elsewhere" / built.dir.name
    shutil.copytree(built.dir, moved)
    c = D.Corpus.from_folder(moved, tiny_run_cfg.data)
    assert (c.train == built.train).all() and c.vocab_size == built.vocab_size
    other = dataclasses.replace(tiny_run_cfg.data, vocab_size=301)
    with pytest.raises(ConfigError, match="another corpus"):
        D.Corpus.from_folder(moved, other)
    f = moved / "val.npy"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(CorruptFileError, match="fails its checksum"):
        D.Corpus.from_folder(moved, tiny_run_cfg.data)


@pytest.mark.parametrize("patch,field", [
    ({"model": {"n_layer": 2}}, "n_layer"),
    ({"model": {"d_model": 30, "n_heads": 4}}, "d_model"),
    ({"model": {"n_ctx": "big"}}, "n_ctx"),
    ({"model": {"positional": "sinusoid"}}, "positional"),
    ({"model": {"n_ctx": 16}}, "n_ctx"),
    ({"train": {"lr": -1.0}}, "lr"),
    ({"train": {"precision": "fp8"}}, "precision"),
    ({"data": {"sources": []}}, "sources"),
    ({"data": {"vocab_size": 100}}, "vocab_size"),
])
def test_bad_config_names_the_field(patch, field):
    base = {"model": {"d_vocab": 512}, "data": {"vocab_size": 512}}
    from icl_core.config import merge
    d = merge(base, patch)
    if field == "vocab_size":
        d["model"]["d_vocab"] = 100
    with pytest.raises(ConfigError, match=field):
        RunConfig.from_dict(d)


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        RunConfig.from_dict({"model": {"n_layer": 2}})


def test_empty_corpus_folder_and_non_utf8_are_clear_errors(tmp_path):
    from icl_core.config import DataConfig
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no non-empty text files"):
        D.load_documents(DataConfig(sources=(f"folder:{empty}",)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"caf\xe9 \xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8"):
        D.load_documents(DataConfig(sources=(f"folder:{bad}",)))


def test_training_batches_are_a_function_of_step(tiny_run_cfg, tmp_path):
    c = D.Corpus(tiny_run_cfg.data, tmp_path)
    a = D.train_batch(c, 4, 64, seed=0, step=5)
    b = D.train_batch(c, 4, 64, seed=0, step=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, D.train_batch(c, 4, 64, seed=0, step=6))


def test_repeat_rows_contain_a_copied_span(tiny_run_cfg, tmp_path):
    c = D.Corpus(tiny_run_cfg.data, tmp_path)
    x = D.train_batch(c, 4, 64, seed=0, step=1, repeat_fraction=1.0)
    for row in x.tolist():
        found = any(row[a:a + 8] == row[b:b + 8] for a in range(64 - 8) for b in range(a + 8, 64 - 7))
        assert found


def test_eval_windows_stay_inside_validation_documents(tiny_run_cfg, tmp_path):
    c = D.Corpus(tiny_run_cfg.data, tmp_path)
    w = D.eval_windows(c, 6, 64, seed=3)
    assert w.shape == (6, 64)
    assert ((w[:, 1:] == D.EOS_ID).sum() == 0)  # never crosses a document boundary
    assert torch.equal(w, D.eval_windows(c, 6, 64, seed=3))


def test_split_is_by_document_and_deterministic():
    from icl_core.config import DataConfig
    cfg = DataConfig(val_fraction=0.1)
    keys = [f"k{i}" for i in range(2000)]
    v = [D.is_validation(k, cfg) for k in keys]
    assert v == [D.is_validation(k, cfg) for k in keys]
    assert 0.05 < sum(v) / len(v) < 0.15


def test_bible_parallel_versions_share_split():
    from icl_core.config import DataConfig
    docs = D.bible_documents(["kjv", "bbe"], max_chars=20000)
    by_key = {}
    for d in docs:
        by_key.setdefault(d.split_key, []).append(d.id)
    assert any(len(v) == 2 for v in by_key.values())
    assert docs[0].text.startswith("In the beginning God created")


@pytest.mark.parametrize("eval_precision", [None, "bf16"])
def test_eval_losses_kept_in_training_equal_a_fresh_computation(tiny_run_cfg, tmp_path, capsys, eval_precision):
    """The trainer keeps each snapshot's per-token eval losses; the chapters' loss analyses read them
    (no model run) and get what running the model gives, in the run's eval precision; a corrupt
    kept file is recomputed the same way, not used."""
    import dataclasses
    from icl_core import analysis as A
    from icl_core import metrics as M
    tiny_run_cfg = dataclasses.replace(
        tiny_run_cfg, train=dataclasses.replace(tiny_run_cfg.train, eval_precision=eval_precision))
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    assert run.metrics_precision == (eval_precision or "fp32")
    steps = run.steps[-3:]
    kept = A.snapshot_losses(run, steps=steps)
    fresh = torch.stack([M.per_token_losses(run.load(s), run.eval_data.tokens, precision=run.metrics_precision)
                         for s in steps])
    if eval_precision == "bf16":  # the other precision gives other numbers: the test can tell them apart
        fp32 = torch.stack([M.per_token_losses(run.load(s), run.eval_data.tokens) for s in steps])
        assert (fp32 - kept["losses"]).abs().max() > 1e-3
    assert kept["losses"].shape == fresh.shape == (3, tiny_run_cfg.data.n_eval, tiny_run_cfg.model.n_ctx - 1)
    torch.testing.assert_close(kept["losses"], fresh, rtol=1e-4, atol=1e-4)
    assert not (run.path / "analysis").exists()  # nothing had to be computed and cached
    # the logged loss is the mean of the kept losses: one computation, not two
    logged = run.metrics().set_index("step")["loss"]
    assert logged[steps[-1]] == pytest.approx(float(kept["losses"][-1].mean()), rel=1e-5)
    assert run.metrics_seconds() > 0
    # corrupt one kept file: detected, reported, recomputed
    f = run.path / "snapshots" / f"losses_{steps[0]:08d}.safetensors"
    b = bytearray(f.read_bytes()); b[-3] ^= 0xFF; f.write_bytes(bytes(b))
    with pytest.raises(CorruptFileError):
        run.eval_losses(steps[0])
    again = A.snapshot_losses(Run(run.path), steps=steps)
    assert "recomputing" in capsys.readouterr().out
    torch.testing.assert_close(again["losses"], fresh, rtol=1e-4, atol=1e-4)


def test_head_scores_reuse_the_scores_logged_in_training(tiny_run_cfg, tmp_path):
    """analysis.head_scores takes prefix-matching and previous-token scores from the training log
    (the same computation on the same sequences) and they equal a fresh computation."""
    from icl_core import analysis as A
    from icl_core import metrics as M
    run = get_or_train(tiny_run_cfg, root=tmp_path, progress=False)
    steps = run.steps[-2:]

    def not_again(*a, **k):
        raise AssertionError("head_scores recomputed a score the training log holds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "prefix_matching_scores", not_again)
        mp.setattr(M, "previous_token_scores", not_again)
        hs = A.head_scores(run, steps)
    for i, s in enumerate(steps):
        m = run.load(s)
        ev = run.eval_data
        torch.testing.assert_close(hs["prefix"][i], M.prefix_matching_scores(m, ev.rep, tiny_run_cfg.data.prefix_seq_len),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hs["prev_token"][i], M.previous_token_scores(m, ev.tokens[:32]), rtol=1e-4, atol=1e-5)


def test_compiled_training_step_matches_eager(tiny_run_cfg, tmp_path):
    """CUDA trains with ``torch.compile`` by default (Trainer(compile=None)); CI has no GPU, so the
    same compiled path runs here on the CPU: its loss log must match the eager run's (fp32; the
    compiled kernels may round differently, not compute something else)."""
    eager = Trainer(tiny_run_cfg, tmp_path / "eager", compile=False).run(progress=False)
    compiled = Trainer(tiny_run_cfg, tmp_path / "compiled", compile=True).run(progress=False)
    a = [v for _, v in eager["train_log"]]
    b = [v for _, v in compiled["train_log"]]
    assert len(a) == len(b) == tiny_run_cfg.total_steps
    assert a[-1] < a[0] - 0.1  # it learned something, so the comparison is not of two constants
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    assert compiled["compiled"] is True and eager["compiled"] is False
    assert compiled["peak_rss_mb"] > 0  # logged (Linux)


def test_cpu_compiles_only_runs_long_enough_to_repay_it(tiny_run_cfg, tmp_path, monkeypatch):
    """Trainer(compile=None) on the CPU: short runs (the smoke profile) stay eager, runs of at least
    CPU_COMPILE_MIN_STEPS compile, and ICL_COMPILE=0 turns compiling off."""
    from icl_core.train import CPU_COMPILE_MIN_STEPS
    assert tiny_run_cfg.total_steps < CPU_COMPILE_MIN_STEPS
    assert Trainer(tiny_run_cfg, tmp_path / "short").compile is False
    d = tiny_run_cfg.to_dict()
    d["train"]["total_tokens"] = CPU_COMPILE_MIN_STEPS * tiny_run_cfg.tokens_per_step
    long_cfg = RunConfig.from_dict(d)
    assert Trainer(long_cfg, tmp_path / "long").compile is True
    monkeypatch.setenv("ICL_COMPILE", "0")
    assert Trainer(long_cfg, tmp_path / "long").compile is False


def test_a_compiler_failure_falls_back_to_eager(tiny_run_cfg, capsys):
    """Where the CPU cannot compile (no C++ compiler), the first call warns once and trains eagerly."""
    from icl_core.train import _EagerFallback

    def broken(x):
        raise RuntimeError("no C++ compiler\nmore")
    loss_of = _EagerFallback(broken, lambda x: x * 2)
    assert loss_of(3) == 6 and loss_of(4) == 8 and loss_of.fell_back
    assert capsys.readouterr().out.count("warning: torch.compile failed") == 1


@pytest.mark.parametrize("text, names", [("train: {lr: fast}\n", "lr"), ("modle: {}\n", "modle"), (None, "does not exist")])
def test_train_cli_reports_a_bad_config_in_one_line(tmp_path, capsys, text, names):
    """python -m icl_core.train CONFIG: a bad field, value or missing file is one line on stderr
    naming it, and exit status 2 (no traceback)."""
    from icl_core.train import main
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    assert main([str(path), "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and names in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_fast_cpu_exp_keeps_softmax_exact_enough_and_masked_scores_zero():
    """train.fast_cpu_exp makes inductor's C++ kernels use ATen's exp_u20: a compiled causal softmax
    (bf16 scores, fp32 softmax, as the trainer's attention) stays within a few fp32 ulp of eager
    and gives exactly 0 to every masked (-inf) score, and the compiled loss still matches eager."""
    import torch

    from icl_core.train import fast_cpu_exp

    assert fast_cpu_exp() is True  # this PyTorch has the hook
    mask = torch.full((64, 64), float("-inf")).triu(1)
    x = (torch.randn(6, 64, 64, generator=torch.Generator().manual_seed(0)) * 4 + mask).bfloat16()
    f = torch.compile(lambda s: s.float().softmax(-1), dynamic=False)
    got, want = f(x), x.float().softmax(-1)
    assert torch.equal(got[:, mask.isinf()], torch.zeros_like(got[:, mask.isinf()]))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(got, want)  # the fast exp is in use (Sleef's 1-ulp exp would match eager)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_reset_peak_rss_hands_freed_heap_back_first():
    """A book worker that built the corpora held ~2.4 GB of freed heap, which every later run's
    logged peak RSS was charged for; reset_peak_rss trims the heap first (glibc malloc_trim), so
    ~300 MB freed behind a few kept blocks leave the resident set and the new peak."""
    from icl_core.train import peak_rss_mb, reset_peak_rss

    def rss():
        return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

    keep, junk = [], []
    for i in range(150_000):  # 2 KB blocks from the heap, one in 50 kept so the heap cannot shrink from its top
        (keep if i % 50 == 0 else junk).append(bytearray(2000))
    del junk
    before = rss()
    reset_peak_rss()
    assert before - rss() > 150
    assert peak_rss_mb() < before - 150
    del keep


_MALLOC_STEPS = r"""
import hashlib, resource, sys
import torch
from icl_core import train as T
from icl_core.config import RunConfig
tuned = T.reuse_freed_memory()
torch.set_num_threads(1)
cfg = RunConfig.from_dict({"model": {"n_layers": 2, "d_model": 128, "n_heads": 4, "n_ctx": 256, "d_vocab": 2048},
                           "train": {"batch_size": 8, "precision": "fp32"}})
model = T.init_model(cfg); opt = T.make_optimizer(model, cfg); loss_of = T.make_loss(model, cfg, "cpu")
g = torch.Generator().manual_seed(0)
faults = 0
for step in range(24):
    if step == 8:  # the heap has grown to the step's size by then
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss = loss_of(torch.randint(0, 2048, (8, 256), generator=g))
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 16
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(tuned, faults, digest)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux (glibc) only")
def test_reused_freed_memory_removes_page_faults_and_changes_no_bit():
    """reuse_freed_memory (glibc mallopt) makes a laptop-sized training step reuse the heap instead of
    faulting in fresh pages for its 4-8 MB attention buffers; the weights after 24 steps are the
    same bytes with and without it (only where the memory lives changes)."""
    import subprocess
    import sys

    out = {}
    for mode in ("tuned", "default"):
        env = {**os.environ, "ICL_MALLOC": mode}
        r = subprocess.run([sys.executable, "-c", _MALLOC_STEPS], capture_output=True, text=True, env=env,
                           cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        tuned, faults, digest = r.stdout.split()[-3:]
        out[mode] = (tuned == "True", float(faults), digest)
    if not out["tuned"][0]:
        pytest.skip("the C library has no mallopt (not glibc)")
    assert out["default"][0] is False
    assert out["tuned"][2] == out["default"][2]  # bitwise the same training
    assert out["tuned"][1] < out["default"][1] / 2, out  # page faults per step (measured 0-177 vs 627-2,124)


def test_malloc_policy_is_checked(monkeypatch):
    from icl_core.train import reuse_freed_memory

    monkeypatch.setenv("ICL_MALLOC", "fast")
    with pytest.raises(ConfigError, match="ICL_MALLOC"):
        reuse_freed_memory()


@pytest.mark.parametrize("clip", [1.0, 1e-3, 0.0])
def test_clip_and_step_is_clip_grad_norm_then_adamw_bit_for_bit(tiny_run_cfg, clip):
    """ClipAndStep (the trainer's clipping + fused AdamW on lists built once) leaves weights, AdamW
    moments and step counts bit for bit as clip_grad_norm_ + opt.step() do, from the first step (which
    creates the state) on, with clipping that binds (1e-3), that does not (1.0: ClipAndStep skips the
    product by 1) and none (0); the
    gradients are released after each step; an optimizer it does not know takes the library calls."""
    import dataclasses

    cfg = dataclasses.replace(tiny_run_cfg, train=dataclasses.replace(tiny_run_cfg.train, grad_clip=clip))
    sides = []
    for _ in range(2):
        model = T.init_model(cfg)
        sides.append((model, T.make_optimizer(model, cfg)))
    update = T.ClipAndStep(sides[1][1], sides[1][0].parameters(), clip)
    assert update.direct
    x = torch.randint(0, cfg.model.d_vocab, (4, cfg.model.n_ctx))
    norms = []
    for step in range(5):
        for i, (model, opt) in enumerate(sides):
            for g in opt.param_groups:
                g["lr"] = T.lr_at(step, cfg)
            model(x, return_loss=True).backward()
            if i == 0:
                if clip:
                    norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                update()
        assert all(p.grad is None for p in sides[1][0].parameters())
    assert update.groups is not None  # the later steps took the direct kernels
    if clip:  # 1e-3 binds at every step; 1.0 never does (ClipAndStep then skips the product by 1)
        assert all(n > clip for n in norms) if clip < 1 else all(n < clip for n in norms)
    for a, b in zip(sides[0][0].parameters(), sides[1][0].parameters()):
        assert torch.equal(a, b)
        sa, sb = sides[0][1].state[a], sides[1][1].state[b]
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    sgd = torch.optim.SGD(sides[1][0].parameters(), lr=0.1)
    assert not T.ClipAndStep(sgd, sides[1][0].parameters(), clip).direct


def test_loss_log_reads_cpu_losses_at_once_with_the_same_values():
    """On the CPU the loss log keeps no tensor between flushes (hundreds of pending 0-dim tensors
    fragmented the heap of a whole run); the logged values are those of the tensors, rounded as
    before, and divided by the data-parallel ranks."""
    log = []
    losses = T._LossLog(log, world=2)
    vals = torch.tensor([2.123456789, 7.5, 0.1], dtype=torch.float32)
    for i, v in enumerate(vals):
        losses.add(i + 1, v.clone().requires_grad_())
    assert not any(torch.is_tensor(v) for _, v in losses.pending)
    losses.flush()
    assert log == [[i + 1, round(v / 2, 5)] for i, v in enumerate(vals.tolist())] and not losses.pending

"""train(config, run_dir): AdamW with warmup, clipping, bf16 autocast, dense snapshots, exact resume.

Determinism: model init is seeded inside a forked RNG; the batch at step s is a pure function of
(seed, s) (:func:`icl_core.data.train_batch`). The resume state (weights, AdamW moments, step, loss
log) is written atomically at snapshots and every ``RESUME_EVERY`` steps, at most once per
``RESUME_MIN_SECONDS``, so a run killed at any point and rerun ends with weights bit-identical to
an uninterrupted one (same device and threads).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import fused_attention
from .data import EvalData
from . import metrics as M
from . import precision
from .config import RunConfig, ConfigError
from .io import (CorruptFileError, atomic_write_json, load_tensors, read_json_checked, save_tensors)
from .model import Transformer, loss_fn

RESUME_EVERY = 200
# ...and no sooner than this many seconds after the last one: on a GPU 200 steps take about a
# second, and writing weights and AdamW moments that often (and at every snapshot) made an H100
# run's wall time 1.34x its training time, 1.11x with this floor (benchmarks/gpu/README.md); a
# kill loses at most this much training
RESUME_MIN_SECONDS = 30.0
# CPU runs this long compile their loss (Trainer(compile=None)): compiling takes ~5-25 s per process,
# a few hundred steps of the laptop models; the smoke profile's runs (160 steps) stay eager
CPU_COMPILE_MIN_STEPS = 1000


def snapshot_steps(total_steps: int, n: int) -> list[int]:
    """Half log-spaced (dense early, where induction heads may form) and half linear, plus 0 and the end."""
    n_log = max(2, n // 2)
    log = np.unique(np.round(np.logspace(0, math.log10(max(total_steps, 1)), n_log)).astype(int))
    lin = np.unique(np.round(np.linspace(0, total_steps, max(2, n - len(log)))).astype(int))
    return sorted(set(log.tolist()) | set(lin.tolist()) | {0, total_steps})


def lr_at(step: int, cfg: RunConfig) -> float:
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        total = cfg.total_steps
        p = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
        return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
    return t.lr


def init_model(cfg: RunConfig, device: str = "cpu") -> Transformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model)
    return model.to(device)


def make_optimizer(model: Transformer, cfg: RunConfig) -> torch.optim.AdamW:
    t = cfg.train
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    # the fused kernel updates all parameters in a few launches on CUDA, and in one pass per
    # parameter on the CPU (x1.02 of a laptop training step against the default foreach kernels)
    fused = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused)


class ClipAndStep:
    """Clip the gradients and update the weights: ``clip_grad_norm_(params, clip)`` then ``opt.step()``
    (then the gradients released), the same arithmetic bit for bit, without the Python around them.

    For a CPU fused AdamW (:func:`make_optimizer`) the calls are the kernels those two functions end
    in: ``_foreach_norm``, the norm of the norms, ``_foreach_mul_`` by ``min(clip / (norm + 1e-6), 1)``
    (skipped where that is exactly 1: a product by 1 changes no bit),
    ``_foreach_add_`` on the step counts and one ``_fused_adamw_`` per parameter group, on lists built
    once from the optimizer's state. What is skipped is per-call bookkeeping (grouping tensors by
    device and dtype, state lookups, hooks): ~0.4-0.5 ms of a 19-37 ms laptop step (x1.015-1.03;
    benchmarks/cpu_trainer.md, "Eleventh pass"). Under data parallelism the gradients arrive
    already averaged, so the same calls apply. The first call (which creates the AdamW state), a
    step with a parameter lacking its gradient, a CUDA run and any other optimizer take the library
    calls themselves."""

    def __init__(self, opt: torch.optim.Optimizer, params, clip: float | None):
        self.opt, self.params, self.clip = opt, list(params), clip
        self.groups = None  # per group: (group, params, exp_avg, exp_avg_sq, step) lists
        self.direct = (isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused")
                       and not opt.defaults.get("amsgrad") and not opt.defaults.get("maximize")
                       and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in self.params))

    def __call__(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        direct = self.direct and len(grads) == len(self.params)
        if self.clip:
            if direct:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
                coef = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
                # a product by exactly 1 changes no bit: skip that pass over the gradients when the
                # clipping does not bind (most laptop steps); a NaN coefficient still multiplies
                if float(coef) != 1.0:
                    torch._foreach_mul_(grads, coef)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if self.groups is None or not direct:
            self.opt.step()
            if self.direct and all(p in self.opt.state for p in self.params):
                st = self.opt.state
                self.groups = [(g, g["params"], [st[p]["exp_avg"] for p in g["params"]],
                                [st[p]["exp_avg_sq"] for p in g["params"]], [st[p]["step"] for p in g["params"]])
                               for g in self.opt.param_groups if g["params"]]
        else:
            for g, ps, exp_avg, exp_avg_sq, steps in self.groups:
                torch._foreach_add_(steps, 1)
                beta1, beta2 = g["betas"]
                torch._fused_adamw_(ps, [p.grad for p in ps], exp_avg, exp_avg_sq, [], steps, amsgrad=False,
                                    lr=g["lr"], beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"],
                                    eps=g["eps"], maximize=False, grad_scale=None, found_inf=None)
        for p in self.params:
            p.grad = None


def make_loss(net, cfg: RunConfig, device: str, compile: bool = False, mode: str | None = None):
    """The training step's loss of a token batch: the forward pass under the run's precision
    (bf16 autocast or fp32), then next-token cross-entropy.

    Eager, the loss is the model's chunked linear + cross-entropy (``net(x, return_loss=True)``,
    :func:`icl_core.model.linear_cross_entropy`), which never stores the logits. With ``compile``
    the forward and loss are one ``torch.compile``-d function (static shapes): on CUDA the plain
    logits + cross-entropy (the log-softmax fuses with the unembedding), on the CPU the chunked
    loss (inductor fuses the elementwise work around the matmuls into C++ loops)."""
    dev_type = device.split(":")[0]
    bf16 = cfg.train.precision == "bf16"

    def loss_of(x):
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        return loss_fn(logits, x)

    def fused_loss_of(x):
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            return net(x, return_loss=True)

    if dev_type == "cpu" and bf16:
        fused_attention.available()  # build or load the fused attention before anything traces the model
    if not compile:
        return fused_loss_of
    if dev_type == "cuda":
        return torch.compile(loss_of, dynamic=False, mode=mode)
    fast_cpu_exp()
    # inductor's own Python wrapper around the compiled kernels: its C++ one (cpp_wrapper) gained
    # nothing per step with the fused kernels (interleaved x0.991 attn1, x1.000 attn2) and its compile
    # cost 6 s more per configuration from an empty cache, 0.6 s from a warm one (cpu_trainer.md,
    # "Eleventh pass")
    compiled = torch.compile(fused_loss_of, dynamic=False, mode=mode)
    return _EagerFallback(compiled, fused_loss_of)


def fast_cpu_exp() -> bool:
    """Make inductor's vectorised C++ kernels use ATen's ``exp_u20`` (a degree-5 polynomial, 20 ulp
    in fp32, exactly 0 below ln(FLT_MIN), so masked scores stay 0; the exp of PyTorch's own CPU
    flash attention and softmax kernels) instead of Sleef's 1-ulp ``exp``: the attention softmax
    and the loss's log-softmax are exp-bound (~0.75 ns per value), and their probabilities are
    rounded to bf16 (2^-8) or summed in fp32 right after. Applies to kernels compiled afterwards in
    this process (the trainer compiles only its CPU loss); returns False where this PyTorch has no
    such hook (the kernels then keep the exact exp). Measured: x1.07 of a laptop step (cpu_trainer.md)."""
    try:
        from torch._inductor.codegen.cpp import CppVecOverrides
    except ImportError:  # pragma: no cover - a PyTorch without inductor's C++ backend
        return False
    if not callable(getattr(CppVecOverrides, "exp", None)):  # pragma: no cover
        return False
    CppVecOverrides.exp = staticmethod(_exp_u20)
    return True


def _exp_u20(x):
    return f"{x}.exp_u20()"


class _EagerFallback:
    """A compiled CPU loss that falls back to eager, with one warning, if its first call cannot
    compile (inductor's CPU kernels need a C++ compiler; a machine without one still trains)."""

    def __init__(self, compiled, eager):
        self.fn, self.eager, self.checked, self.fell_back = compiled, eager, False, False

    def __call__(self, x):
        if self.checked:
            return self.fn(x)
        try:
            out = self.fn(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure: train eagerly instead
            print(f"warning: torch.compile failed on this CPU ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "training eagerly (ICL_COMPILE=0 skips the attempt)")
            self.fn, self.fell_back = self.eager, True
            out = self.fn(x)
        self.checked = True
        return out


def cheap_metrics(model: Transformer, cfg: RunConfig, ev: EvalData,
                  precision: str = "fp32") -> tuple[dict, torch.Tensor]:
    """(metrics, per-token eval losses): loss, ICL score, prefix-matching and previous-token scores
    per head (logged at every snapshot), and the (n_eval, n_ctx - 1) losses they came from. Losses
    and previous-token scores come from one pass (:func:`metrics.losses_and_previous_token_scores`)."""
    was_training = model.training
    losses, pt = M.losses_and_previous_token_scores(model, ev.tokens, precision=precision)
    pm = M.prefix_matching_scores(model, ev.rep, cfg.data.prefix_seq_len, precision=precision)
    model.train(was_training)
    late, early = M.icl_indices(cfg.model.n_ctx)
    out = {
        "loss": float(losses.mean()),
        "icl": M.icl_score_from_losses(losses, cfg.model.n_ctx),
        "icl_band": M.icl_band_score(losses, cfg.model.n_ctx),
        "loss_early": float(losses[:, early - 1].mean()),
        "loss_late": float(losses[:, late - 1].mean()),
        "prefix_max": float(pm.max()),
        "prefix": pm.tolist(),
        "prev_token": pt.tolist(),
        "prev_token_max": float(pt.max()),
    }
    if cfg.model.smeared_keys:
        out["smear"] = [torch.sigmoid(b.attn.alpha).tolist() for b in model.blocks]
    return out, losses


def _opt_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                meta["scalars"][f"{idx}.{k}"] = v
    return tensors, meta


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict):
    state: dict = {}
    for name, v in tensors.items():
        if not name.startswith("opt."):
            continue
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def reset_peak_rss() -> None:
    """Reset this process's peak resident memory (Linux: VmHWM), so :func:`peak_rss_mb` measures
    from here (a book worker trains several runs one after another). Memory freed before (e.g. by
    building the corpora: tokenizer training left a worker at 2.4 GB resident, 0.4 GB once trimmed;
    benchmarks/cpu_trainer.md) is first handed back to the system, so the run is not charged for it."""
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# glibc malloc for a training process (benchmarks/cpu_trainer.md, "Fourth pass"): blocks up to glibc's
# largest mmap threshold (32 MB: attention scores, their softmax and gradients, 4-16 MB each at the
# laptop sizes) come from the heap, and up to 256 MB of freed heap top is kept, so a step reuses the
# previous step's pages instead of mapping fresh zeroed ones. In a fresh process (the benchmark's
# step) that removed 2,900-5,600 page faults per step, 10-25% of it; in whole runs glibc had mostly
# adapted by itself (~500 per step) and training time did not change measurably (Zen 5: 217.9 vs
# 219.4 s for attn3), so this fixes the allocator's state rather than speeding up the book. Bytes
# computed are the same; only where they live changes.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to :data:`MALLOC_MMAP_THRESHOLD` in the heap for
    reuse (``mallopt``; see the comment above). Process-wide, for the rest of the process; False where
    the C library has no ``mallopt`` (not glibc), which changes nothing but speed. ``ICL_MALLOC=default``
    leaves glibc's own policy (for measuring the difference; benchmarks/step_worker.py)."""
    mode = os.environ.get("ICL_MALLOC", "tuned")
    if mode not in ("tuned", "default"):
        raise ConfigError(f"ICL_MALLOC={mode!r}: expected 'tuned' or 'default'")
    if mode == "default":
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); False where there is none."""
    malloc_trim = _libc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def _libc_function(name: str):
    """A function of the C library (ctypes), or None where there is no such function (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB since start or :func:`reset_peak_rss` (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _LossLog:
    """The training loss log ([step, loss] pairs). On a GPU losses stay on the device until a flush,
    so it never waits for the host between steps (one .item() per step would synchronise every
    step). On the CPU each loss is read at once: a pending 0-dim tensor is a 4-byte block of the
    heap among the step's megabyte buffers, and the hundreds pending between two flushes (~30 s
    apart) fragmented glibc's heap until a whole laptop run sawed between 0.6 and 1.3 GB resident
    (benchmarks/cpu_trainer.md, "Eleventh pass"). The values are the same either way. Under data
    parallelism the summed loss is divided by the ranks."""

    def __init__(self, log: list, world: int = 1):
        self.log, self.world, self.pending = log, world, []

    def add(self, step: int, loss: torch.Tensor):
        self.pending.append((step, float(loss.detach()) if loss.device.type == "cpu" else loss))

    def flush(self):
        if self.pending:
            on_device = [v for _, v in self.pending if torch.is_tensor(v)]
            fetched = iter(torch.stack(on_device).float().tolist() if on_device else [])
            vals = [next(fetched) if torch.is_tensor(v) else v for _, v in self.pending]
            self.log.extend([s, round(v / self.world, 5)] for (s, _), v in zip(self.pending, vals))
            self.pending.clear()


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, corpus: D.Corpus | None = None,
                 device: str = "cpu", cache_dir: str | Path | None = None, compile: bool | None = None):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.device = device
        self.cuda = device.startswith("cuda")
        # torch.compile of the forward pass and loss: an execution option like the device (not part
        # of the run's hash); None = on unless ICL_COMPILE=0: always on CUDA (x1.6-2.2 on an H100,
        # benchmarks/gpu/), on the CPU for runs of at least CPU_COMPILE_MIN_STEPS steps, which repay
        # the compile's seconds (benchmarks/cpu_trainer.md)
        if compile is None:
            compile = os.environ.get("ICL_COMPILE", "1") != "0" and (
                self.cuda or cfg.total_steps >= CPU_COMPILE_MIN_STEPS)
        self.compile = compile
        self.malloc_reuse = False  # set by run(): reuse_freed_memory()
        # data parallel (torchrun): every rank builds the same global batch and trains on its
        # slice; DDP averages gradients; only rank 0 writes files
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                              f"{self.world} data-parallel processes")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "snapshots").mkdir(exist_ok=True)
        self.corpus = corpus or D.Corpus(cfg.data, cache_dir or self.dir.parent / "_cache")
        if self.corpus.vocab_size != cfg.model.d_vocab:
            raise ConfigError(f"tokenizer has {self.corpus.vocab_size} tokens but model.d_vocab={cfg.model.d_vocab}")
        self.steps = snapshot_steps(cfg.total_steps, cfg.train.n_snapshots)
        if self.rank == 0:
            self._write_config()
        self._barrier()

    def _barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    # --- files ----------------------------------------------------------------------------------
    def _write_config(self):
        p = self.dir / "config.json"
        if p.exists():
            try:
                old = read_json_checked(p)
            except CorruptFileError:
                old = None
            if old is not None and old.get("hash") != self.cfg.hash():
                raise ConfigError(f"run folder {self.dir} holds a different config (hash {old.get('hash')})")
            if old is not None:
                return
        atomic_write_json(p, {"hash": self.cfg.hash(), "config": self.cfg.to_dict()})

    def manifest(self) -> dict:
        p = self.dir / "manifest.json"
        if p.exists():
            try:
                return read_json_checked(p)
            except CorruptFileError as e:
                print(f"warning: {e}; snapshots will be re-verified")
        return {"hash": self.cfg.hash(), "snapshots": {}, "done": False}

    def _resume_state(self):
        p = self.dir / "resume.json"
        if not p.exists():
            return None
        try:
            meta = read_json_checked(p)
            tensors = load_tensors(self.dir / meta["file"], meta["sha256"])
        except (CorruptFileError, KeyError) as e:
            print(f"warning: resume state unusable ({e}); restarting this run from step 0")
            return None
        return meta, tensors

    def _save_resume(self, step: int, model, opt, log):
        if self.rank != 0:
            return self._barrier()
        ot, ometa = _opt_tensors(opt)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(ot)
        fname = f"resume_{step:08d}.safetensors"
        sha = save_tensors(self.dir / fname, tensors)
        atomic_write_json(self.dir / "resume.json", {"file": fname, "sha256": sha, "step": step,
                                                     "opt": ometa, "log": log})
        for f in self.dir.glob("resume_*.safetensors"):
            if f.name != fname:
                f.unlink(missing_ok=True)
        self._barrier()

    # --- loop -----------------------------------------------------------------------------------
    def run(self, progress: bool = True, stop_after: int | None = None) -> dict:
        """Train from step 0 or the last resume state to the end (or to ``stop_after``): restore,
        then steps with snapshots and resume states on their schedules, then finish."""
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        man = self.manifest()
        if man.get("done"):
            return man
        self.malloc_reuse = reuse_freed_memory()
        # peak memory of this run alone (a book worker trains several runs one after another); why
        # the chunked loss keeps it flat: benchmarks/cpu_trainer.md ("Memory")
        reset_peak_rss()
        model, opt, start, log = self._restore(man)
        ev = EvalData(cfg, self.corpus)
        ev.tokens, ev.rep = ev.tokens.to(self.device), ev.rep.to(self.device)
        loss_of = self._loss(model)
        update = ClipAndStep(opt, model.parameters(), cfg.train.grad_clip)
        total, snap = cfg.total_steps, set(self.steps)
        losses = _LossLog(log, self.world)
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)
        t0, n_tokens = time.time(), 0
        model.train()
        train_time = man.get("train_seconds", 0.0)
        step = start
        seg = last_resume = time.time()
        while True:
            if step in snap:
                train_time += self._segment_end(seg, losses)
                self._snapshot(step, model, ev, man)
                seg = time.time()
            if step >= total or (stop_after is not None and step >= stop_after):
                break
            n_tokens += self._step(step, update, loss_of, losses)
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    losses.flush()
                    bar.set_postfix(loss=f"{log[-1][1]:.3f}", tok_s=f"{n_tokens / (time.time() - t0):.0f}")
            if (step % RESUME_EVERY == 0 or step in snap) and time.time() - last_resume >= RESUME_MIN_SECONDS:
                train_time += self._segment_end(seg, losses)
                self._save_resume(step, model, opt, log)
                man["train_seconds"] = train_time
                seg = last_resume = time.time()
        train_time += self._segment_end(seg, losses)
        if bar is not None:
            bar.close()
        if step < total:
            return man
        return self._finish(man, log, train_time, loss_of)

    def _restore(self, man: dict):
        """(model, optimizer, start step, loss log): fresh, or from the resume state when the
        manifest holds every snapshot before it."""
        model = init_model(self.cfg, self.device)
        opt = make_optimizer(model, self.cfg)
        st = self._resume_state()
        if st is not None:
            missing = [s for s in self.steps if s < st[0]["step"] and str(s) not in man["snapshots"]]
            if missing:  # the manifest was lost or corrupt: its earlier snapshots cannot be trusted
                print(f"warning: manifest lacks snapshots {missing} before the resume step "
                      f"{st[0]['step']}; restarting this run from step 0")
                st = None
        if st is None:
            return model, opt, 0, []
        meta, tensors = st
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_opt(opt, tensors, meta["opt"])
        return model, opt, meta["step"], meta["log"]

    def _loss(self, model):
        """The training loss (:func:`make_loss`) of the model, data-parallel under torchrun."""
        net = torch.nn.parallel.DistributedDataParallel(model) if self.distributed else model
        if self.compile:
            # every run's loss closes over a new model, so dynamo would recompile the same code for
            # each run trained in this process and, past its recompile limit (8), silently run eager
            torch._dynamo.reset()
        return make_loss(net, self.cfg, self.device, self.compile)

    def _step(self, step: int, update: ClipAndStep, loss_of, losses: "_LossLog") -> int:
        """One optimisation step on the batch of ``step`` (this rank's slice of it); its loss goes
        to ``losses`` as the loss after ``step + 1`` steps. Returns the tokens trained (all ranks)."""
        cfg, t = self.cfg, self.cfg.train
        x = D.train_batch(self.corpus, t.batch_size, cfg.model.n_ctx, t.seed, step,
                          cfg.data.repeat_fraction, cfg.data.repeat_span_max)
        if self.distributed:
            b = t.batch_size // self.world
            x = x[self.rank * b:(self.rank + 1) * b]
        x = x.pin_memory().to(self.device, non_blocking=True) if self.cuda else x.to(self.device)
        lr = lr_at(step, cfg)
        for g in update.opt.param_groups:
            g["lr"] = lr
        loss = loss_of(x)
        loss.backward()
        update()  # clipping, AdamW, gradients released
        if self.distributed:  # log the global batch's loss, as one process would
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
        losses.add(step + 1, loss.detach())
        return x.numel() * self.world

    def _segment_end(self, seg_start: float, losses: "_LossLog") -> float:
        """Training seconds since seg_start, with the device's queued work included."""
        losses.flush()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.time() - seg_start

    def _finish(self, man: dict, log: list, train_time: float, loss_of) -> dict:
        """Mark the run done in its manifest (with the loss log, the training seconds, whether the
        loss compiled and the peak memory) and delete its resume state."""
        if self.rank != 0:
            self._barrier()
            return self.manifest()
        man["done"] = True
        man["train_seconds"] = train_time
        man["train_log"] = log
        man["total_steps"] = self.cfg.total_steps
        man["tokens_per_step"] = self.cfg.tokens_per_step
        man["compiled"] = bool(self.compile) and not getattr(loss_of, "fell_back", False)
        # this process's peak resident memory over the (last resumed part of the) run
        man["peak_rss_mb"] = peak_rss_mb()
        man["malloc_reuse"] = self.malloc_reuse  # glibc keeps freed blocks for reuse
        if self.cfg.train.precision == "bf16" and self.device.startswith("cpu"):
            man["bf16_matmul"] = precision.bf16_matmul_kernel()  # icl_core.precision
            # which fused CPU kernels trained it (icl_core.fused_attention: the attention, its RoPE'd
            # inputs, the loss's softmax, bias + GELU); fused_attention as earlier manifests logged it
            man["fused_kernels"] = fused_attention.kernels_for(self.cfg.model)
            man["fused_attention"] = "attention" in man["fused_kernels"]
        atomic_write_json(self.dir / "manifest.json", man)
        for f in self.dir.glob("resume_*.safetensors"):
            f.unlink(missing_ok=True)
        (self.dir / "resume.json").unlink(missing_ok=True)
        self._barrier()
        return man

    def _snapshot(self, step: int, model, ev: EvalData, man: dict):
        if self.rank != 0:
            return self._barrier()
        sha = save_tensors(self.dir / "snapshots" / f"step_{step:08d}.safetensors", model.state_dict(),
                           {"step": step})
        entry = {"sha256": sha, "tokens": step * self.cfg.tokens_per_step, "metrics": {}}
        if self.cfg.train.metrics_every_snapshot:
            t0 = time.perf_counter()
            entry["metrics"], losses = cheap_metrics(model, self.cfg, ev,
                                                    precision=self.cfg.train.metrics_precision)
            # the per-token eval losses are kept (checksummed), so the chapters' loss analyses
            # (heatmaps, PCA, index pairs) read them instead of running the model again
            entry["losses_sha256"] = save_tensors(self.dir / "snapshots" / f"losses_{step:08d}.safetensors",
                                                  {"losses": losses.float().contiguous()})
            entry["metrics_seconds"] = time.perf_counter() - t0
        man["snapshots"][str(step)] = entry
        atomic_write_json(self.dir / "manifest.json", man)
        self._barrier()


def train(cfg: RunConfig, run_dir: str | Path, device: str = "cpu", progress: bool = True,
          corpus: D.Corpus | None = None, stop_after: int | None = None) -> dict:
    """Train (or resume) ``cfg`` in ``run_dir``; returns the manifest."""
    return Trainer(cfg, run_dir, corpus=corpus, device=device).run(progress=progress, stop_after=stop_after)


def main(argv=None) -> int:
    """``python -m icl_core.train CONFIG.yaml --run-dir DIR``; under ``torchrun --nproc_per_node N``
    the run is trained data-parallel (gloo on CPU, NCCL on CUDA) with the same global batch."""
    import argparse
    import os

    from .config import load_yaml

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("config", help="a RunConfig YAML file")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        cfg = RunConfig.from_dict(load_yaml(a.config))
    except ConfigError as e:  # a bad field or value, or no such file: one line, exit 2
        import sys
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = a.device
    if world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        train(cfg, a.run_dir, device=device, progress=not a.no_progress)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

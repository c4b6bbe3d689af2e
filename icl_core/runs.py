"""The run cache: one folder per run, keyed by a hash of the full config.

    runs/<name>-<hash>/config.json        the RunConfig (checksummed JSON)
                       manifest.json      snapshots {step: sha256, tokens, cheap metrics}, loss log, done
                       snapshots/step_XXXXXXXX.safetensors

``get_or_train(config)`` reuses a finished run and trains (or resumes) otherwise, holding a per-run
lock so that two builds never train the same run at once. The runs folder is ``runs/`` in the
working directory's project root, or ``$ICL_RUNS_DIR``.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch

from . import data as D
from .config import RunConfig
from .io import CorruptFileError, FileLock, load_tensors, read_json_checked
from .model import Transformer
from .data import EvalData
from .train import Trainer

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def runs_dir() -> Path:
    return Path(os.environ.get("ICL_RUNS_DIR", PROJECT_ROOT / "runs"))


def cache_dir(root: str | Path | None = None) -> Path:
    """Corpus/tokenizer cache: ``$ICL_CACHE_DIR`` or ``<runs folder>/_cache``."""
    env = os.environ.get("ICL_CACHE_DIR")
    return Path(env) if env else Path(root or runs_dir()) / "_cache"


def run_path(cfg: RunConfig, root: str | Path | None = None) -> Path:
    return Path(root or runs_dir()) / f"{cfg.name}-{cfg.hash()}"


class Run:
    """A finished (or partial) run on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            c = read_json_checked(self.path / "config.json")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} is not a run folder (no config.json)") from None
        self.config = RunConfig.from_dict(c["config"])
        if self.config.hash() != c["hash"]:
            raise CorruptFileError(f"{self.path}/config.json does not match its recorded hash")
        self.manifest = read_json_checked(self.path / "manifest.json")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def done(self) -> bool:
        return bool(self.manifest.get("done"))

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.manifest["snapshots"])

    def tokens(self, step: int) -> int:
        return step * self.config.tokens_per_step

    @property
    def metrics_precision(self) -> str:
        """Precision of the metrics logged at its snapshots (:attr:`TrainConfig.metrics_precision`: the
        config field ``train.eval_precision``, fp32 if unset): analyses that recompute a logged number
        use it too."""
        return self.config.train.metrics_precision

    def load(self, step: int | None = None, device: str = "cpu") -> Transformer:
        """The model at snapshot ``step`` (default: the last). Checksum-verified, no pickle."""
        step = self.steps[-1] if step is None else step
        entry = self.manifest["snapshots"].get(str(step))
        if entry is None:
            raise KeyError(f"run {self.name} has no snapshot at step {step}; steps: {self.steps}")
        sd = load_tensors(self.path / "snapshots" / f"step_{step:08d}.safetensors", entry["sha256"])
        model = Transformer(self.config.model)
        model.load_state_dict(sd)
        return model.to(device).eval()

    def eval_losses(self, step: int) -> torch.Tensor | None:
        """Per-token losses (n_eval, n_ctx - 1) on the fixed eval set, as logged at snapshot ``step``
        during training; None for runs trained before they were kept. Checksum-verified: a corrupt
        file raises CorruptFileError."""
        entry = self.manifest["snapshots"].get(str(step))
        if entry is None:
            raise KeyError(f"run {self.name} has no snapshot at step {step}; steps: {self.steps}")
        if "losses_sha256" not in entry:
            return None
        return load_tensors(self.path / "snapshots" / f"losses_{step:08d}.safetensors", entry["losses_sha256"])["losses"]

    def metrics_seconds(self) -> float:
        """Seconds spent on the cheap metrics at all snapshots (nan for runs that did not record it)."""
        vals = [e.get("metrics_seconds") for e in self.manifest["snapshots"].values()]
        return float(sum(vals)) if vals and all(v is not None for v in vals) else float("nan")

    def metrics(self) -> pd.DataFrame:
        """Cheap per-snapshot metrics logged during training, one row per snapshot.

        ``icl`` is the book's ICL score, the banded estimate (:func:`metrics.icl_band_score`);
        ``icl_single`` is the paper's single-index L(late) - L(early) on the same windows."""
        rows = []
        for s in self.steps:
            e = self.manifest["snapshots"][str(s)]
            m = e.get("metrics", {})
            rows.append({"step": s, "tokens": e["tokens"],
                         **{k: v for k, v in m.items() if not isinstance(v, list)},
                         "prefix": m.get("prefix"), "prev_token": m.get("prev_token"), "smear": m.get("smear")})
        df = pd.DataFrame(rows)
        if "icl_band" in df.columns:  # [book choice] the banded estimate is the book's ICL score
            df["icl_single"] = df["icl"]
            df["icl"] = df["icl_band"]
        return df

    def train_log(self) -> pd.DataFrame:
        log = self.manifest.get("train_log", [])
        df = pd.DataFrame(log, columns=["step", "loss"])
        df["tokens"] = df["step"] * self.config.tokens_per_step
        return df

    @property
    def train_seconds(self) -> float:
        return float(self.manifest.get("train_seconds", float("nan")))

    # --- data the run was trained and evaluated on --------------------------------------------
    @cached_property
    def corpus(self) -> D.Corpus:
        return D.Corpus(self.config.data, cache_dir(self.path.parent))

    @cached_property
    def eval_data(self) -> EvalData:
        return EvalData(self.config, self.corpus)

    def __repr__(self):
        return f"Run({self.name!r}, {len(self.steps)} snapshots, done={self.done})"


def get_or_train(cfg: RunConfig, root: str | Path | None = None, device: str = "cpu",
                 progress: bool = True) -> Run:
    """Reuse the finished run for ``cfg`` or train it (resuming a partial one)."""
    path = run_path(cfg, root)
    path.mkdir(parents=True, exist_ok=True)
    with FileLock(path / ".lock"):
        # partial writes of a killed trainer (we hold the lock, so no one is writing them)
        for tmp in [*path.glob(".*.tmp"), *path.glob("snapshots/.*.tmp")]:
            tmp.unlink(missing_ok=True)
        if (path / "manifest.json").exists():
            try:
                run = Run(path)
                if run.done:
                    for f in [*path.glob("resume_*.safetensors"), path / "resume.json"]:
                        f.unlink(missing_ok=True)  # killed after finishing, before its cleanup
                    return run
            except CorruptFileError as e:
                print(f"warning: {e}; resuming/retraining {cfg.name}")
        Trainer(cfg, path, device=device, cache_dir=cache_dir(path.parent)).run(progress=progress)
        return Run(path)

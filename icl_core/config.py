"""Frozen configuration dataclasses and their validation.

Every config is a frozen dataclass built from a plain dict (YAML/JSON, loaded with safe loaders).
Unknown fields, wrong types and impossible values raise :class:`ConfigError` naming the field and
value, before anything is trained.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible."""


POSITIONAL = ("learned", "shortformer", "rope", "none")


@dataclass(frozen=True)
class ModelConfig:
    """The transformer (names follow TransformerLens: n_layers, d_model, n_heads, d_head ...)."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None  # default d_model // n_heads
    n_ctx: int = 256
    d_vocab: int = 2048
    attn_only: bool = True
    d_mlp: int | None = None  # default 4 * d_model
    positional: str = "shortformer"  # learned | shortformer | rope | none
    layer_norm: bool = True
    smeared_keys: bool = False
    init_std: float = 0.02
    pos_init_std: float | None = None  # default init_std; shortformer positions are added after
    # LayerNorm (as in TransformerLens), where the token signal has unit scale
    attn_bias: bool | None = None  # biases b_Q, b_K, b_V, b_O (GPT-2, TransformerLens); None = off

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "n_ctx", "d_vocab"):
            _positive(self, name)
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                    "set d_head explicitly or change one of them")
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        _positive(self, "d_head")
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        _positive(self, "d_mlp")
        if self.positional not in POSITIONAL:
            raise ConfigError(f"model.positional={self.positional!r} is not one of {POSITIONAL}")
        if self.positional == "rope" and self.d_head % 2:
            raise ConfigError(f"model.d_head={self.d_head} must be even for rope positions")
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std={self.init_std} must be > 0")
        if self.pos_init_std is not None and not self.pos_init_std > 0:
            raise ConfigError(f"model.pos_init_std={self.pos_init_std} must be > 0")


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and evaluation data.

    ``sources`` name corpora: ``bible`` (public-domain translations from pythonbible wheels),
    ``code`` (Python source of pinned pure-Python packages), ``folder:/path`` (text files),
    ``hf:name[:split[:column]]`` (a Hugging Face dataset, online only).
    """

    sources: tuple[str, ...] = ("bible", "code")
    bible_versions: tuple[str, ...] = ("kjv", "asv", "bbe", "web")
    code_packages: tuple[str, ...] = ("sympy", "networkx")
    max_chars_per_source: int = 0  # 0 = no cap; the smoke profile caps the corpus
    vocab_size: int = 2048
    val_fraction: float = 0.05
    split_seed: int = 0
    n_eval: int = 256  # fixed evaluation windows (the paper uses 10,000 of 512 tokens)
    eval_seed: int = 1234
    n_prefix_seqs: int = 16  # repeated-random-token sequences for head scores (paper: 10+)
    prefix_seq_len: int = 25
    prefix_repeats: int = 4
    # documents are packed into training windows; this fraction of training rows (deviation from
    # the paper, labelled as such where used) is a document followed by a repeat of one of its spans
    repeat_fraction: float = 0.0
    repeat_span_max: int | None = None  # longest copied span (None = 48); spans are 8..max tokens

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources is empty: name at least one corpus")
        for s in self.sources:
            if not (s in ("bible", "code") or s.startswith("folder:") or s.startswith("hf:")):
                raise ConfigError(f"data.sources has unknown source {s!r} "
                                  "(use bible, code, folder:/path or hf:name)")
        if self.vocab_size < 260:
            raise ConfigError(f"data.vocab_size={self.vocab_size} must be >= 260 (256 bytes + specials)")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")
        if not 0 <= self.repeat_fraction <= 1:
            raise ConfigError(f"data.repeat_fraction={self.repeat_fraction} must be in [0, 1]")
        if self.repeat_span_max is not None and self.repeat_span_max < 8:
            raise ConfigError(f"data.repeat_span_max={self.repeat_span_max} must be >= 8 (spans are 8..max tokens)")
        for name in ("n_eval", "n_prefix_seqs", "prefix_seq_len", "prefix_repeats"):
            _positive(self, name)
        if self.prefix_repeats < 2:
            raise ConfigError(f"data.prefix_repeats={self.prefix_repeats} must be >= 2")
        if self.max_chars_per_source < 0:
            raise ConfigError(f"data.max_chars_per_source={self.max_chars_per_source} must be >= 0")
        if self.vocab_size > 65535:
            raise ConfigError(f"data.vocab_size={self.vocab_size} must be <= 65535 (tokens are stored as uint16)")
        _seed(self, "eval_seed")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and checkpointing."""

    seed: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    total_tokens: int = 5_000_000
    precision: str = "bf16"  # bf16 | fp32 (bf16 autocast; parameters stay fp32)
    # precision of the metrics logged at each snapshot and of the chapters' ablations (None = fp32,
    # as before the field existed). bf16 autocast makes them ~1.4x cheaper on CPU; on the laptop's
    # 3-layer model it moved the eval loss by 2e-4 and the banded ICL score by 4e-4 nats (losses
    # are computed in fp32 from the logits on)
    eval_precision: str | None = None
    n_snapshots: int = 60  # log-spaced early steps plus a linear grid
    metrics_every_snapshot: bool = True
    threads: int = 0  # 0 = leave torch's default

    @property
    def metrics_precision(self) -> str:
        """The precision the snapshot metrics and ablations use: ``eval_precision``, fp32 if unset."""
        return self.eval_precision or "fp32"

    def __post_init__(self):
        for name in ("batch_size", "total_tokens", "n_snapshots"):
            _positive(self, name)
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r} is not constant or cosine")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision={self.precision!r} is not bf16 or fp32")
        if self.eval_precision not in (None, "bf16", "fp32"):
            raise ConfigError(f"train.eval_precision={self.eval_precision!r} is not bf16, fp32 or null")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be >= 0")
        if self.threads < 0:
            raise ConfigError(f"train.threads={self.threads} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip} must be >= 0 (0 = no clipping)")
        _seed(self, "seed")


@dataclass(frozen=True)
class RunConfig:
    """One training run: a name (for people) plus everything that determines the result."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model.d_vocab != self.data.vocab_size:
            raise ConfigError(
                f"model.d_vocab={self.model.d_vocab} differs from data.vocab_size={self.data.vocab_size}")
        late, early = icl_indices(self.model.n_ctx)
        if early < 1 or late <= early:
            raise ConfigError(
                f"model.n_ctx={self.model.n_ctx} is too small for the ICL indices "
                f"(need room for two distinct token indices; got late={late}, early={early})")
        rep_len = 1 + self.data.prefix_seq_len * self.data.prefix_repeats
        if rep_len > self.model.n_ctx:
            raise ConfigError(f"model.n_ctx={self.model.n_ctx} is shorter than the repeated-token sequences "
                              f"(1 + data.prefix_seq_len x data.prefix_repeats = {rep_len})")
        if self.train.total_tokens < self.train.batch_size * self.model.n_ctx:
            raise ConfigError(f"train.total_tokens={self.train.total_tokens} is less than one batch "
                              f"({self.train.batch_size} x {self.model.n_ctx})")

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x (weight-matrix parameters: attention, MLP, unembedding)
        plus 6 x n_layers x n_ctx x d_model for the attention scores and mixing (causal, so half
        of 12 x n_ctx x d_model). Embedding lookups, LayerNorm and softmax are not counted."""
        m = self.model
        p = m.n_layers * 4 * m.d_model * m.n_heads * m.d_head + m.d_model * m.d_vocab
        if not m.attn_only:
            p += m.n_layers * 2 * m.d_model * m.d_mlp
        return 6 * p + 6 * m.n_layers * m.n_ctx * m.d_model

    def training_flops(self) -> float:
        """FLOPs of the whole run (``flops_per_token`` x total tokens): used to schedule runs."""
        return self.flops_per_token() * self.train.total_tokens

    # --- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that determines the run's result (the name and threads excluded)."""
        d = self.to_dict()
        d.pop("name")
        d["train"].pop("threads")
        # optional fields left at None mean "as before they existed": keep old hashes valid
        d["model"] = {k: v for k, v in d["model"].items() if v is not None}
        d["data"] = {k: v for k, v in d["data"].items() if v is not None}
        d["train"] = {k: v for k, v in d["train"].items() if v is not None}
        if self.model.smeared_keys:  # the initial alpha changed from 3 to 0: older runs differ
            d["model"]["smear_alpha_init"] = 0.0
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.model.n_ctx

    @property
    def total_steps(self) -> int:
        return max(1, self.train.total_tokens // self.tokens_per_step)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return from_dict(cls, d, "")


def icl_indices(n_ctx: int) -> tuple[int, int]:
    """1-based token indices (late, early) for the ICL score.

    The paper uses L(500) - L(50) with 512-token contexts. With a shorter context the book rescales
    both indices by n_ctx / 512 (its adaptation; chapters report the indices used).
    """
    if n_ctx >= 512:
        return 500, 50
    late = int(round(500 * n_ctx / 512))
    early = max(1, int(round(50 * n_ctx / 512)))
    return min(late, n_ctx - 1), early


def _positive(obj, name):
    v = getattr(obj, name)
    section = {ModelConfig: "model", DataConfig: "data", TrainConfig: "train"}.get(type(obj), "")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{section}.{name}={v!r} must be a positive integer")


def _seed(obj, name):
    v = getattr(obj, name)
    section = {DataConfig: "data", TrainConfig: "train"}.get(type(obj), "")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
        raise ConfigError(f"{section}.{name}={v!r} must be an integer in [0, 2**32)")


def _check_type(value, tp, where: str):
    """Check ``value`` against a (simple) annotation; convert lists to tuples. Return the value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for a in args:
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r} has the wrong type (expected {tp})")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}={value!r} must be null")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        try:
            f = float(value)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return f
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    return value


def from_dict(cls, d: Any, prefix: str):
    """Build dataclass ``cls`` from dict ``d``; unknown keys and wrong types raise ConfigError."""
    where = prefix.rstrip(".") or cls.__name__
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config field {prefix}{k!r}{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _check_type(v, tp, f"{prefix}{k}")
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge two plain dicts (override wins)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(d).__name__}")
    return d or {}

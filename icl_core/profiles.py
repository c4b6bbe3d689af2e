"""Profiles: which runs the book trains and which parameters each chapter gets (configs/profiles/*.yaml).

A profile file has

    profile: smoke                  # its name
    description: ...                # shown in the book's banner / appendix
    banner: ...                     # optional warning printed at the top of every chapter
    defaults: {model: .., data: .., train: ..}   # merged under every run
    runs: {name: overrides}         # every run the book needs
    chapters: {00_intro: {runs: [...], ...}, ...}  # papermill parameters per chapter

``load_profile(name)`` validates every run config before anything is trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, RunConfig, load_yaml, merge

PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs" / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


@dataclass
class Profile:
    name: str
    description: str
    banner: str
    runs: dict[str, RunConfig]
    chapters: dict[str, dict] = field(default_factory=dict)

    def run_config(self, name: str) -> RunConfig:
        if name not in self.runs:
            raise KeyError(f"profile {self.name!r} has no run {name!r}; runs: {sorted(self.runs)}")
        return self.runs[name]

    def run(self, name: str, train: bool = False, root=None, progress: bool = False):
        """The trained Run ``name``. With train=False (chapters) a missing run is an error, not a
        silent hour of training: build it with ``make book`` or ``python -m icl_core.book train``."""
        from .runs import Run, get_or_train, run_path

        cfg = self.run_config(name)
        if train:
            return get_or_train(cfg, root=root, progress=progress)
        path = run_path(cfg, root)
        try:
            run = Run(path)
        except FileNotFoundError:
            run = None
        if run is None or not run.done:
            raise FileNotFoundError(
                f"run {name!r} of profile {self.name!r} is not trained yet ({path}); "
                f"run `make book PROFILE={self.name}` or `python -m icl_core.book train --profile {self.name}`")
        return run

    def chapter_params(self, chapter: str) -> dict:
        return dict(self.chapters.get(chapter, {}))


def load_profile(name: str, profiles_dir: str | Path | None = None) -> Profile:
    d = Path(profiles_dir) if profiles_dir else PROFILES_DIR
    path = d / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in d.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r} (known: {', '.join(known)})")
    spec = load_yaml(path)
    allowed = {"profile", "description", "banner", "defaults", "runs", "chapters"}
    for k in spec:
        if k not in allowed:
            raise ConfigError(f"profile {name!r}: unknown top-level field {k!r} (known: {sorted(allowed)})")
    if not isinstance(spec, dict):
        raise ConfigError(f"profile {name!r} must be a mapping of fields, got {type(spec).__name__}")
    for k in ("defaults", "runs", "chapters"):
        if spec.get(k) is not None and not isinstance(spec[k], dict):
            raise ConfigError(f"profile {name!r}: {k} must be a mapping, got {spec[k]!r}")
    defaults = spec.get("defaults") or {}
    runs = {}
    for rname, over in (spec.get("runs") or {}).items():
        if over is not None and not isinstance(over, dict):
            raise ConfigError(f"profile {name!r}, run {rname!r} must be a mapping of overrides, got {over!r}")
        d_ = merge(defaults, over or {})
        d_["name"] = rname
        try:
            runs[rname] = RunConfig.from_dict(d_)
        except ConfigError as e:
            raise ConfigError(f"profile {name!r}, run {rname!r}: {e}") from None
    chapters = spec.get("chapters") or {}
    for ch, params in chapters.items():
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"profile {name!r}, chapter {ch!r} parameters must be a mapping, got {params!r}")
        for r in (params or {}).get("runs", []):
            if r not in runs:
                raise ConfigError(f"profile {name!r}, chapter {ch!r} names unknown run {r!r}")
    return Profile(spec.get("profile", name), spec.get("description", ""), spec.get("banner", ""),
                   runs, {k: dict(v or {}) for k, v in chapters.items()})

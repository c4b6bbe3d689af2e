"""The command line: ``python -m icl_core.book {train,execute,render,build} --profile NAME``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import ConfigError
from ..profiles import Profile, load_profile
from . import __doc__ as BOOK_DOC
from .chapters import PROJECT_ROOT, BookError, Paths, UsageError, chapter_runs
from .pipeline import execute, train
from .site import render


def build(profile: Profile, paths: Paths, chapters=None, no_train=False, force=False, strict=True,
          jobs=None, profiles_dir=None, log=print) -> dict:
    """Train what the chapters need (unless ``no_train``), execute them, render the site; the seconds
    each step took."""
    times = {}
    t = time.time()
    if not no_train:
        train(profile, chapter_runs(profile, paths.root, chapters), jobs=jobs, profiles_dir=profiles_dir, log=log)
    times["train"] = time.time() - t
    t = time.time()
    execute(profile, paths, chapters, force=force, profiles_dir=profiles_dir, log=log)
    times["execute"] = time.time() - t
    t = time.time()
    render(profile, paths, strict=strict, log=log)
    times["render"] = time.time() - t
    log("[build] " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return times


def main(argv=None) -> int:
    """Exit status 0 on success, 1 when a step fails, 2 for a bad name (profile, config field,
    chapter) at the command line; errors are one line on stderr."""
    ap = argparse.ArgumentParser(prog="python -m icl_core.book", description=BOOK_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "execute", "render", "build"])
    ap.add_argument("--profile", default="laptop", help="configs/profiles/<name>.yaml (default laptop)")
    ap.add_argument("--chapter", action="append", help="only this chapter (id or unique prefix); repeatable")
    ap.add_argument("--no-train", action="store_true", help="never train; a chapter whose runs are missing fails")
    ap.add_argument("--force", action="store_true", help="re-execute chapters even if up to date")
    ap.add_argument("--no-strict", action="store_true", help="render without -W (warnings are not errors)")
    ap.add_argument("--jobs", type=int, default=None, help="training workers (default: 2 on 2+ CPU cores)")
    ap.add_argument("--out", default=None, help="build under <out>/_build instead of the project's _build")
    ap.add_argument("--profiles-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        prof = load_profile(a.profile, a.profiles_dir)
        paths = Paths(PROJECT_ROOT, Path(a.out).resolve() if a.out else PROJECT_ROOT)
        if a.command == "train":
            names = chapter_runs(prof, paths.root, a.chapter) if a.chapter else None
            train(prof, names, jobs=a.jobs, profiles_dir=a.profiles_dir)
        elif a.command == "execute":
            execute(prof, paths, a.chapter, force=a.force, profiles_dir=a.profiles_dir)
        elif a.command == "render":
            render(prof, paths, strict=not a.no_strict)
        else:
            build(prof, paths, a.chapter, no_train=a.no_train, force=a.force, strict=not a.no_strict,
                  jobs=a.jobs, profiles_dir=a.profiles_dir)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

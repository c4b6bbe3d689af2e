"""Train the runs a build needs, then execute the chapters with papermill (one kernel per chapter).

Executed notebooks go to ``<out>/_build/executed/<profile>/<chapter>.ipynb`` with their up-to-date
key beside them (:mod:`icl_core.book.chapters`), and each chapter's scorecard rows to
``results/<chapter>.json`` there (:mod:`icl_core.scorecard`, through ``$ICL_RESULTS_DIR``); a failed chapter keeps its partial output as
``<chapter>.failed.ipynb`` and is reported with its cell (:class:`ChapterFailed`).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from ..profiles import PROFILES_DIR, Profile, load_profile
from .chapters import (PROJECT_ROOT, BookError, ChapterFailed, Paths, chapter_key, chapter_notebooks, chapter_parameters,
                       is_up_to_date, notebook_defaults, profile_hash, runs_named_in, select_chapters, source_hash)

#: where a chapter's kernel writes its scorecard rows: :data:`icl_core.scorecard.RESULTS_ENV` (not
#: imported, so that the build's process does not load torch; tests/test_scorecard.py checks they agree)
RESULTS_ENV = "ICL_RESULTS_DIR"


def _device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def _train_one(args):
    """Worker: train one run of a profile (1 torch thread when running beside other workers)."""
    profile_name, profiles_dir, run_name, device, one_thread, progress = args
    import torch

    if one_thread:
        torch.set_num_threads(1)
    from ..runs import get_or_train

    prof = load_profile(profile_name, profiles_dir)
    t = time.time()
    run = get_or_train(prof.run_config(run_name), device=device, progress=progress)
    return run_name, time.time() - t, str(run.path)


def missing_runs(profile: Profile, names=None) -> list[str]:
    out = []
    for n in names if names is not None else profile.runs:
        try:
            profile.run(n)
        except FileNotFoundError:
            out.append(n)
    return out


def train(profile: Profile, names=None, jobs: int | None = None, profiles_dir=None, log=print) -> list[str]:
    """Train every run in ``names`` (default: all of the profile's) that is not cached yet."""
    todo = missing_runs(profile, names)
    # longest first (by training FLOPs), so the last run to start is a short one and the workers
    # finish together (the classic longest-processing-time rule for two machines)
    todo.sort(key=lambda n: -profile.run_config(n).training_flops())
    if not todo:
        log(f"[train] all {len(names if names is not None else profile.runs)} runs of profile "
            f"{profile.name!r} are cached")
        return []
    device = _device()
    cores = os.cpu_count() or 1
    if jobs is None:
        jobs = 1 if device != "cpu" or cores < 2 else min(2, len(todo))
    jobs = max(1, min(jobs, len(todo)))
    log(f"[train] {len(todo)} run(s) to train on {device} with {jobs} worker(s): {', '.join(todo)}")
    bars = sys.stderr.isatty()  # per-step bars on a terminal; one line per finished run in logs
    args = [(profile.name, profiles_dir, n, device, jobs > 1, bars) for n in todo]
    t0 = time.time()
    if jobs == 1:
        for a in args:
            name, sec, _ = _train_one(a)
            log(f"[train] {name} done in {sec:.1f}s")
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for name, sec, _ in pool.imap_unordered(_train_one, args):
                log(f"[train] {name} done in {sec:.1f}s")
    log(f"[train] {len(todo)} run(s) trained in {time.time() - t0:.1f}s")
    return todo


# --- precompute: a chapter's per-run analyses in parallel, before the chapter runs ----------------

#: chapters whose heavy analyses split into independent (run, part) pieces, each cached in the run's
#: folder: (module, function, parts); ``function(run, part, **the chapter's parameters it takes)``
#: computes one piece exactly as the chapter's own ``compute`` would, which then only loads it.
PRECOMPUTE = {"03_ablation": ("icl_core.ablation", "warm", ("pp", "full", "sets")),
              "05_mechanism": ("icl_core.mechanism", "warm", ("scores",))}


def precompute_tasks(profile: Profile, chapters: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(chapter, run, part) for every :data:`PRECOMPUTE` chapter of ``profile`` (or of ``chapters``)."""
    ids = [c for c in PRECOMPUTE if c in profile.chapters and (chapters is None or c in chapters)]
    return [(c, r, part) for c in ids for r in profile.chapters[c].get("runs", []) for part in PRECOMPUTE[c][2]]


def precompute_one(args) -> tuple[str, str, str, float]:
    """Worker: one (chapter, run, part) of :func:`precompute_tasks`, with ``threads`` torch threads, its
    process niced by ``nice`` (below the training processes it runs beside)."""
    profile_name, profiles_dir, chapter, run_name, part, threads, nice = args
    if nice:
        try:
            os.nice(nice)
        except OSError:  # not allowed here: run at the same priority
            pass
    import importlib
    import inspect

    import torch

    if threads:
        torch.set_num_threads(threads)
    prof = load_profile(profile_name, profiles_dir)
    mod, fn_name, _ = PRECOMPUTE[chapter]
    fn = getattr(importlib.import_module(mod), fn_name)
    takes = inspect.signature(fn).parameters
    given = {**notebook_defaults(chapter_notebooks(PROJECT_ROOT)[chapter]), **chapter_parameters(prof, chapter)}
    params = {k: v for k, v in given.items() if k in takes and k not in ("run", "part")}
    t = time.time()
    fn(prof.run(run_name), part, **params)
    return chapter, run_name, part, time.time() - t


# --- execute ---------------------------------------------------------------------------------

def _error_cell(nb_path: Path) -> tuple[int | None, str, str]:
    """(1-based cell number in the source notebook, first source line, error) of the first error output."""
    nb = json.loads(nb_path.read_text())
    offset = 0
    for i, c in enumerate(nb.get("cells", [])):
        tags = c.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags or any(t.startswith("papermill-error-cell") for t in tags):
            offset += 1  # cells papermill added: not in the source notebook
            continue
        for o in c.get("outputs", []) or []:
            if o.get("output_type") == "error":
                src = "".join(c.get("source", "")).strip().splitlines()
                return i + 1 - offset, (src[0] if src else ""), f"{o.get('ename')}: {o.get('evalue')}"
    return None, "", ""


def _hide_default_parameters(nb_path: Path) -> None:
    """Tag the notebook's own ``parameters`` cell ``remove-cell`` when papermill injected values after
    it, so the page shows the parameters actually used once."""
    nb = json.loads(nb_path.read_text())
    tags = [c.get("metadata", {}).get("tags", []) for c in nb.get("cells", [])]
    if not any("injected-parameters" in t for t in tags):
        return
    for c, t in zip(nb["cells"], tags):
        if "parameters" in t and "remove-cell" not in t:
            c.setdefault("metadata", {})["tags"] = t + ["remove-cell"]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def execute_chapter(chapter: str, nb_path: Path, out_dir: Path, params: dict, key: dict,
                    cwd: Path | None = None, timeout: int | None = None, log=print) -> float:
    """Execute one notebook with papermill into ``out_dir/<chapter>.ipynb``; raise ChapterFailed on error.

    The output replaces the previous one only when the whole notebook succeeded; a failure leaves
    ``<chapter>.failed.ipynb`` for inspection and removes the (now stale) previous output.
    """
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{chapter}.ipynb"
    failed = out_dir / f"{chapter}.failed.ipynb"
    stamp = final.with_suffix(".key.json")
    tmp = out_dir / f".{chapter}.running.ipynb"
    results = out_dir / "results"  # the chapter's scorecard rows (icl_core.scorecard.record) land here
    (results / f"{chapter}.json").unlink(missing_ok=True)  # never a stale file beside a new execution
    t = time.time()
    # the kernel imports icl_core from this project even when it is not pip-installed
    env_path = os.environ.get("PYTHONPATH", "")
    env_results = os.environ.get(RESULTS_ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env_path] if env_path else []))
    os.environ[RESULTS_ENV] = str(results)
    try:
        pm.execute_notebook(str(nb_path), str(tmp), parameters=params, kernel_name="python3",
                            progress_bar=False, cwd=str(cwd or nb_path.parent),
                            request_save_on_cell_execute=False, execution_timeout=timeout)
    except Exception as e:  # papermill's PapermillExecutionError, kernel death, timeouts ...
        cell, first, err = _error_cell(tmp) if tmp.exists() else (None, "", "")
        if tmp.exists():
            os.replace(tmp, failed)
        for p in (final, stamp, results / f"{chapter}.json"):
            p.unlink(missing_ok=True)
        if not err:
            err = f"{type(e).__name__}: {getattr(e, 'evalue', e)}"
        where = f"cell {cell} ({first!r})" if cell else "before any cell ran"
        raise ChapterFailed(chapter, cell, f"chapter {chapter} ({nb_path}) failed in {where}: {err}\n"
                            f"  partial output: {failed}") from None
    finally:
        for var, old in (("PYTHONPATH", env_path), (RESULTS_ENV, env_results)):
            if old:
                os.environ[var] = old
            else:
                os.environ.pop(var, None)
    errors = _error_cell(tmp)
    if errors[0] is not None:  # an error output in a cell tagged raises-exception is still an error
        (results / f"{chapter}.json").unlink(missing_ok=True)
        os.replace(tmp, failed)
        raise ChapterFailed(chapter, errors[0], f"chapter {chapter} ({nb_path}) has an error output in cell "
                            f"{errors[0]} ({errors[1]!r}): {errors[2]}\n  partial output: {failed}")
    _hide_default_parameters(tmp)
    os.replace(tmp, final)
    failed.unlink(missing_ok=True)
    sec = time.time() - t
    stamp.write_text(json.dumps({**key, "params": params, "seconds": round(sec, 2),
                                 "source": str(nb_path)}, indent=1, sort_keys=True))
    return sec


def execute(profile: Profile, paths: Paths, chapters: list[str] | None = None, force: bool = False,
            profiles_dir=None, log=print, keep_going: bool = False, before_chapter=None) -> dict[str, str]:
    """Execute the chapters that are not up to date, in book order. Returns {chapter: status}.

    A failed chapter raises :class:`ChapterFailed` at once; with ``keep_going`` the later chapters
    still run (a one-shot build on a lent machine keeps what it can) and the first failure is raised
    at the end, its message naming every chapter that failed. ``before_chapter(chapter)`` is called
    before a chapter that is not up to date runs (``benchmarks/gpu/run_profile.py`` waits there for
    the chapter's precomputed pieces)."""
    nbs = chapter_notebooks(paths.root)
    missing_nb = [c for c in profile.chapters if c not in nbs]
    if missing_nb:
        raise BookError(f"profile {profile.name!r} has parameters for chapters with no notebook in _toc.yml: "
                        f"{', '.join(missing_nb)}")
    ids = select_chapters(list(nbs), chapters)
    prof_h = profile_hash(profile, Path(profiles_dir) if profiles_dir else PROFILES_DIR)
    src_h = source_hash()
    out_dir = paths.executed(profile.name)
    status, failures = {}, []
    for c in ids:
        params = chapter_parameters(profile, c)
        key = chapter_key(nbs[c], params, prof_h, src_h)
        out = out_dir / f"{c}.ipynb"
        if not force and is_up_to_date(out, key):
            status[c] = "up to date"
            log(f"[execute] {c}: up to date")
            continue
        need = runs_named_in(params, profile.runs)
        absent = missing_runs(profile, need)
        try:
            if absent:
                raise ChapterFailed(c, None, f"chapter {c} needs run(s) {', '.join(absent)} of profile "
                                    f"{profile.name!r}, which are not trained; run without --no-train")
            if before_chapter is not None:
                before_chapter(c)
            log(f"[execute] {c}: running {nbs[c].relative_to(paths.root)} with {json.dumps(params)}")
            sec = execute_chapter(c, nbs[c], out_dir, params, key, log=log)
        except ChapterFailed as e:
            if not keep_going:
                raise
            failures.append(e)
            status[c] = f"failed: {e}"
            log(f"[execute] {c}: FAILED ({e}); going on with the next chapter")
            continue
        status[c] = f"executed in {sec:.1f}s"
        log(f"[execute] {c}: done in {sec:.1f}s")
    if failures:
        first = failures[0]
        names = ", ".join(f.chapter for f in failures)
        raise ChapterFailed(first.chapter, first.cell, f"{len(failures)} chapter(s) failed ({names}); first: {first}")
    return status


def stale_chapters(profile: Profile, paths: Paths, profiles_dir=None) -> list[str]:
    """Chapters whose executed output is missing or older than their key."""
    prof_h = profile_hash(profile, Path(profiles_dir) if profiles_dir else PROFILES_DIR)
    src_h = source_hash()
    out = []
    for c, nb in chapter_notebooks(paths.root).items():
        key = chapter_key(nb, chapter_parameters(profile, c), prof_h, src_h)
        if not is_up_to_date(paths.executed(profile.name) / f"{c}.ipynb", key):
            out.append(c)
    return out

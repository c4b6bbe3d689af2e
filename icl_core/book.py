"""Build the book: train the profile's runs, execute the chapters with papermill, render with Jupyter Book.

    python -m icl_core.book build   --profile laptop                 # train + execute + render
    python -m icl_core.book train   --profile smoke                  # only train what is missing
    python -m icl_core.book execute --profile smoke --chapter 01     # one chapter (id or unique prefix)
    python -m icl_core.book build   --profile smoke --no-train       # never train; fail if a run is missing
    python -m icl_core.book render  --profile smoke                  # HTML from what is executed

Layout under ``<root>/_build`` (root = the project, or ``--root``):

    executed/<profile>/<chapter>.ipynb     executed notebooks (papermill output)
    executed/<profile>/<chapter>.key.json  what they were executed from (the up-to-date key)
    executed/<profile>/<chapter>.failed.ipynb   the partial output of a failed chapter
    src/                                    the assembled Jupyter Book source (rewritten by render)
    html/                                   the site

Chapters are the notebooks named in ``_toc.yml``. Each gets ``profile=<name>`` plus the profile's
``chapters:`` parameters for its id (the file stem). A chapter is re-executed only when its key
changes: the notebook's source, its parameters, the profile (file and run-config hashes) or the
icl_core source. Runs are trained by :mod:`icl_core.runs` and cached by config hash.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .profiles import PROFILES_DIR, Profile, load_profile

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(__file__).resolve().parent

# --- offline JavaScript for the site ---------------------------------------------------------
# npm packages copied into the site at render time, pinned by version and checked by sha256 of the
# files we use (npm itself checks the tarball's integrity against the registry). They go to
# <src>/site_js/, which _config.yml lists in html_static_path, so they land in html/_static/.
# Never put them in a source folder named `_static`: Jupyter Book 1 adds every .js there to
# every page.
VENDOR = {  # npm spec: (folder under site_js/, prefix stripped from package paths, globs)
    "@jupyter-widgets/html-manager@1.0.15": ("ipywidgets", "dist/", [
        "dist/embed-amd.js", "dist/*.woff2", "dist/*.woff", "dist/*.ttf", "dist/*.eot", "dist/*.svg"]),
    "requirejs@2.3.7": ("ipywidgets", "", ["require.js"]),
    "mathjax@3.2.2": ("mathjax", "es5/", [
        "es5/tex-mml-chtml.js", "es5/a11y/*", "es5/adaptors/*", "es5/input/*", "es5/output/chtml.js",
        "es5/output/chtml/*", "es5/ui/*"]),
}
VENDOR_STAMP = "vendor.json"
# embed-amd.js defines its modules (html-manager, base, controls, output) under AMD names, and
# their webpack code finds its font files next to the module's RequireJS URL, which by default is
# a path relative to the page that does not exist. This script (loaded after require.js, before
# embed-amd.js) maps those names to the folder the script itself was loaded from.
REQUIRE_CONFIG_JS = """(function () {
  var base = document.currentScript.src.replace(/\\/[^\\/]*$/, "");  // .../_static/ipywidgets
  window.__jupyter_widgets_assets_path__ = base + "/";
  require.config({paths: {"@jupyter-widgets/html-manager/dist": base, "@jupyter-widgets": base}});
})();
"""


class BookError(RuntimeError):
    """A build step failed; the message says which and what to do."""


class ChapterFailed(BookError):
    def __init__(self, chapter: str, cell: int | None, message: str):
        self.chapter, self.cell = chapter, cell
        super().__init__(message)


# --- paths and chapters ----------------------------------------------------------------------

@dataclass
class Paths:
    root: Path  # where _config.yml, _toc.yml and chapters/ live (the project)
    out: Path  # <out>/_build holds everything built

    @property
    def build(self) -> Path:
        return self.out / "_build"

    def executed(self, profile: str) -> Path:
        return self.build / "executed" / profile

    @property
    def src(self) -> Path:
        return self.build / "src"

    @property
    def html(self) -> Path:
        return self.build / "html"

    @property
    def vendor(self) -> Path:
        return self.build / "vendor"


def toc_files(root: Path) -> list[str]:
    """Every ``file:`` of _toc.yml (root first), in reading order, as paths without suffix."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    out = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                out.append(node["file"])
            for k in ("parts", "chapters", "sections"):
                for child in node.get(k, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk({k: v for k, v in toc.items() if k != "root"})
    return out


def chapter_notebooks(root: Path) -> dict[str, Path]:
    """{chapter id: notebook path} for the notebooks in _toc.yml, in book order."""
    out = {}
    for f in toc_files(root):
        p = root / f"{f}.ipynb"
        if p.exists():
            out[Path(f).stem] = p
    return out


def select_chapters(all_ids: list[str], wanted: list[str] | None) -> list[str]:
    """Chapter ids from exact ids or unique prefixes ("01" -> "01_cooccurrence")."""
    if not wanted:
        return list(all_ids)
    out = []
    for w in wanted:
        w = Path(w).stem  # accept chapters/01_x.ipynb too
        hits = [c for c in all_ids if c == w] or [c for c in all_ids if c.startswith(w)]
        if len(hits) != 1:
            raise BookError(f"--chapter {w!r} matches {hits or 'no chapter'}; chapters: {', '.join(all_ids)}")
        if hits[0] not in out:
            out.append(hits[0])
    return out


def chapter_parameters(profile: Profile, chapter: str) -> dict:
    return {"profile": profile.name, **profile.chapter_params(chapter)}


def runs_named_in(params, run_names) -> list[str]:
    """Run names that appear anywhere in a chapter's parameters (lists, dicts, pairs)."""
    found = []

    def walk(v):
        if isinstance(v, str):
            if v in run_names and v not in found:
                found.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(params)
    return found


# --- up-to-date keys -------------------------------------------------------------------------

def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def source_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """Hash of the icl_core source (every .py file, by relative path)."""
    h = hashlib.sha256()
    for p in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        h.update(p.relative_to(package_dir).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def profile_hash(profile: Profile, profiles_dir: Path = PROFILES_DIR) -> str:
    path = Path(profiles_dir) / f"{profile.name}.yaml"
    blob = {"file": _sha(path.read_bytes()) if path.exists() else "",
            "runs": {k: v.hash() for k, v in sorted(profile.runs.items())}}
    return _sha(json.dumps(blob, sort_keys=True).encode())


def notebook_source_hash(nb_path: Path) -> str:
    """Hash of a notebook's cells (type, source, tags), ignoring outputs and volatile metadata."""
    nb = json.loads(Path(nb_path).read_text())
    cells = [[c.get("cell_type"), "".join(c.get("source", "")), sorted(c.get("metadata", {}).get("tags", []))]
             for c in nb.get("cells", [])]
    kernel = nb.get("metadata", {}).get("kernelspec", {}).get("name", "")
    return _sha(json.dumps([cells, kernel]).encode())


def chapter_key(nb_path: Path, params: dict, prof_hash: str, src_hash: str) -> dict:
    parts = {"notebook": notebook_source_hash(nb_path), "params": _sha(json.dumps(params, sort_keys=True).encode()),
             "profile": prof_hash, "icl_core": src_hash}
    return {"key": _sha(json.dumps(parts, sort_keys=True).encode()), "parts": parts}


def is_up_to_date(out_nb: Path, key: dict) -> bool:
    stamp = out_nb.with_suffix(".key.json")
    if not (out_nb.exists() and stamp.exists()):
        return False
    try:
        return json.loads(stamp.read_text()).get("key") == key["key"]
    except (ValueError, OSError):
        return False


# --- train -----------------------------------------------------------------------------------

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
    from .runs import get_or_train

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
    t = time.time()
    # the kernel imports icl_core from this project even when it is not pip-installed
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env_path] if env_path else []))
    try:
        pm.execute_notebook(str(nb_path), str(tmp), parameters=params, kernel_name="python3",
                            progress_bar=False, cwd=str(cwd or nb_path.parent),
                            request_save_on_cell_execute=False, execution_timeout=timeout)
    except Exception as e:  # papermill's PapermillExecutionError, kernel death, timeouts ...
        cell, first, err = _error_cell(tmp) if tmp.exists() else (None, "", "")
        if tmp.exists():
            os.replace(tmp, failed)
        for p in (final, stamp):
            p.unlink(missing_ok=True)
        if not err:
            err = f"{type(e).__name__}: {getattr(e, 'evalue', e)}"
        where = f"cell {cell} ({first!r})" if cell else "before any cell ran"
        raise ChapterFailed(chapter, cell, f"chapter {chapter} ({nb_path}) failed in {where}: {err}\n"
                            f"  partial output: {failed}") from None
    finally:
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            os.environ.pop("PYTHONPATH", None)
    errors = _error_cell(tmp)
    if errors[0] is not None:  # an error output in a cell tagged raises-exception is still an error
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
            profiles_dir=None, log=print) -> dict[str, str]:
    """Execute the chapters that are not up to date, in book order. Returns {chapter: status}."""
    nbs = chapter_notebooks(paths.root)
    missing_nb = [c for c in profile.chapters if c not in nbs]
    if missing_nb:
        raise BookError(f"profile {profile.name!r} has parameters for chapters with no notebook in _toc.yml: "
                        f"{', '.join(missing_nb)}")
    ids = select_chapters(list(nbs), chapters)
    prof_h = profile_hash(profile, Path(profiles_dir) if profiles_dir else PROFILES_DIR)
    src_h = source_hash()
    out_dir = paths.executed(profile.name)
    status = {}
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
        if absent:
            raise ChapterFailed(c, None, f"chapter {c} needs run(s) {', '.join(absent)} of profile "
                                f"{profile.name!r}, which are not trained; run without --no-train")
        log(f"[execute] {c}: running {nbs[c].relative_to(paths.root)} with {json.dumps(params)}")
        sec = execute_chapter(c, nbs[c], out_dir, params, key, log=log)
        status[c] = f"executed in {sec:.1f}s"
        log(f"[execute] {c}: done in {sec:.1f}s")
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


# --- render ----------------------------------------------------------------------------------

def _npm_pack(spec: str, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise BookError("npm is needed once to fetch the widget JavaScript (apt-get install npm), "
                        f"or copy the files of {spec} into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", str(dest)],
                       capture_output=True, text=True)
    if r.returncode:
        raise BookError(f"npm pack {spec} failed:\n{r.stderr}")
    return dest / r.stdout.strip().splitlines()[-1]


def vendor_js(paths: Paths, log=print) -> Path:
    """Fetch (once, via npm) and unpack the pinned JS packages into ``_build/vendor``; return it."""
    import fnmatch

    vdir = paths.vendor
    stamp = vdir / VENDOR_STAMP
    want = sorted(VENDOR)
    want.append(_sha(REQUIRE_CONFIG_JS.encode()))
    if stamp.exists() and json.loads(stamp.read_text()).get("packages") == want:
        return vdir
    shutil.rmtree(vdir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as td:
        for spec, (dest, strip, globs) in VENDOR.items():
            log(f"[render] fetching {spec} (npm pack, once)")
            tgz = _npm_pack(spec, Path(td))
            with tarfile.open(tgz) as tf:
                names = [m.name[len("package/"):] for m in tf.getmembers() if m.isfile()]
                for g in globs:
                    hits = [n for n in names if fnmatch.fnmatch(n, g)]
                    if not hits:
                        raise BookError(f"npm package {spec} has no file matching {g}")
                    for n in hits:
                        target = vdir / dest / n[len(strip):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tf.extractfile("package/" + n).read())
    (vdir / "ipywidgets" / "require-config.js").write_text(REQUIRE_CONFIG_JS)
    stamp.write_text(json.dumps({"packages": want}))
    return vdir


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _banner_markdown(profile: Profile) -> str:
    lines = [f"This site was built with the **{profile.name}** profile."]
    if profile.banner.strip():
        return "```{warning}\n" + profile.banner.strip() + "\n```"
    return " ".join(lines)


def assemble_source(profile: Profile, paths: Paths, log=print) -> Path:
    """Write the Jupyter Book source: config, toc, pages, executed notebooks, vendored JS."""
    root, src = paths.root, paths.src
    files: dict[str, bytes] = {}
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    subs = cfg.setdefault("parse", {}).setdefault("myst_substitutions", {})
    subs.update({"profile": profile.name, "profile_banner": _banner_markdown(profile),
                 "profile_description": " ".join(profile.description.split())})
    files["_config.yml"] = yaml.safe_dump(cfg, sort_keys=False).encode()
    files["_toc.yml"] = (root / "_toc.yml").read_bytes()
    for extra in ("references.bib",):
        if (root / extra).exists():
            files[extra] = (root / extra).read_bytes()
    executed = paths.executed(profile.name)
    stale = set(stale_chapters(profile, paths))
    for f in toc_files(root):
        for suffix in (".md", ".ipynb"):
            p = root / f"{f}{suffix}"
            if not p.exists():
                continue
            rel = f"{f}{suffix}"
            if suffix == ".ipynb":
                ex = executed / f"{Path(f).stem}.ipynb"
                if ex.exists():
                    files[rel] = ex.read_bytes()
                    if Path(f).stem in stale:
                        log(f"[render] warning: {Path(f).stem} was executed from an older source; "
                            "`execute` brings it up to date")
                else:
                    files[rel] = p.read_bytes()
                    log(f"[render] warning: {Path(f).stem} is not executed for profile {profile.name!r}; "
                        "its page shows code without outputs")
            else:
                files[rel] = p.read_bytes()
    # chapter assets (images, data next to the pages); never notebooks or md outside the toc
    for p in (root / "chapters").rglob("*"):
        if p.is_file() and p.suffix not in (".ipynb", ".md", ".py") and ".ipynb_checkpoints" not in p.parts \
                and "_executed" not in p.parts:
            files[p.relative_to(root).as_posix()] = p.read_bytes()
    vdir = vendor_js(paths, log)
    for p in vdir.rglob("*"):
        if p.is_file() and p.name != VENDOR_STAMP:
            files[f"site_js/{p.relative_to(vdir).as_posix()}"] = p.read_bytes()
    # write, removing anything left from an earlier assembly
    src.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*"), reverse=True):
        rel = p.relative_to(src).as_posix()
        if p.is_file() and rel not in files:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    for rel, data in files.items():
        _write_if_changed(src / rel, data)
    return src


def render(profile: Profile, paths: Paths, strict: bool = True, log=print) -> Path:
    """Assemble the source and run ``jupyter-book build`` (notebooks are not executed by it)."""
    src = assemble_source(profile, paths, log)
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(src), "--path-output", str(paths.out)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    # a page set that changed (another profile, a chapter added) needs a fresh environment
    marker = paths.build / ".render-profile"
    pages = sorted(toc_files(paths.root))
    state = json.dumps({"profile": profile.name, "pages": pages})
    if not marker.exists() or marker.read_text() != state:
        cmd.append("--all")
    log(f"[render] {' '.join(cmd)}")
    env = dict(os.environ)  # the build imports icl_core.sphinx_site from this project
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, cwd=paths.root, capture_output=True, text=True, env=env)
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode:
        tail = "\n".join(out.strip().splitlines()[-40:])
        raise BookError(f"jupyter-book build failed (exit {r.returncode}):\n{tail}")
    marker.write_text(state)
    index = paths.html / "index.html"
    if not index.exists():
        raise BookError(f"jupyter-book build produced no {index}")
    log(f"[render] site: {index}")
    return paths.html


# --- used by the chapters: banner and the reproducibility appendix (chapters/07_methods) ------

def chapter_banner(profile: Profile):
    """The profile note at the top of every chapter (a warning when the profile has a banner)."""
    from IPython.display import Markdown

    if profile.banner.strip():
        return Markdown("```{warning}\n" + " ".join(profile.banner.split()) + "\n```")
    return Markdown(f"*Built with the **{profile.name}** profile.*")


def _trained(profile: Profile, name: str):
    try:
        return profile.run(name)
    except FileNotFoundError:
        return None


def runs_table(profile: Profile):
    """One row per run: model, training, seeds, config hash and compute (train_seconds)."""
    import pandas as pd

    rows = []
    for name, cfg in profile.runs.items():
        m, t, d = cfg.model, cfg.train, cfg.data
        run = _trained(profile, name)
        rows.append({
            "run": name, "layers": m.n_layers, "d_model": m.d_model, "heads": m.n_heads, "d_head": m.d_head,
            "MLPs": not m.attn_only, "positions": m.positional, "attention biases": bool(m.attn_bias),
            "smeared keys": m.smeared_keys, "n_ctx": m.n_ctx, "vocab": m.d_vocab, "batch": t.batch_size, "lr": t.lr,
            "schedule": f"{t.lr_schedule}, warmup {t.warmup_steps}", "tokens": t.total_tokens,
            "steps": cfg.total_steps, "snapshots": len(run.steps) if run else None, "precision": t.precision,
            "metrics precision": t.metrics_precision,
            "seed": t.seed, "split seed": d.split_seed, "eval seed": d.eval_seed, "config hash": cfg.hash(),
            "train seconds": round(run.train_seconds, 1) if run else None,
            # evaluation at the snapshots (loss, ICL, head scores); nan for runs trained before it was logged
            "snapshot metrics seconds": round(run.metrics_seconds(), 1) if run else None,
        })
    return pd.DataFrame(rows).set_index("run")


def corpus_table(profile: Profile):
    """One row per distinct corpus (tokenizer + token arrays) the profile's runs use."""
    import pandas as pd

    from . import data as D

    rows, seen = [], set()
    for name, cfg in profile.runs.items():
        key = D.corpus_key(cfg.data)
        if key in seen:
            continue
        seen.add(key)
        run = _trained(profile, name)
        man = run.corpus.manifest if run else {}
        d = cfg.data
        rows.append({
            "corpus key": key, "runs": ", ".join(n for n, c in profile.runs.items() if D.corpus_key(c.data) == key),
            "sources": ", ".join(d.sources),
            "bible versions": ", ".join(d.bible_versions) if "bible" in d.sources else "",
            "code packages": ", ".join(d.code_packages) if "code" in d.sources else "",
            "package versions": ", ".join(f"{k} {v}" for k, v in D.source_versions(d).items()),
            "chars per source cap": d.max_chars_per_source or "none",
            "tokenizer": f"byte-level BPE, {d.vocab_size} tokens (trained on the training split)",
            "train documents": man.get("n_docs", {}).get("train"), "val documents": man.get("n_docs", {}).get("val"),
            "train tokens": man.get("n_tokens", {}).get("train"), "val tokens": man.get("n_tokens", {}).get("val"),
            "eval windows": f"{d.n_eval} x {cfg.model.n_ctx} tokens",
        })
    return pd.DataFrame(rows).set_index("corpus key")


def package_versions(names=("torch", "numpy", "tokenizers", "pandas", "matplotlib", "papermill",
                            "jupyter-book", "ipywidgets", "nbclient")):
    import importlib.metadata as md
    import platform

    import pandas as pd

    rows = [{"package": "python", "version": platform.python_version()}]
    for n in names:
        try:
            rows.append({"package": n, "version": md.version(n)})
        except md.PackageNotFoundError:
            rows.append({"package": n, "version": "not installed"})
    return pd.DataFrame(rows).set_index("package")


def _span(values) -> str:
    vals = sorted(set(values), key=lambda v: (str(type(v)), v))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and len(vals) > 2:
        return f"{vals[0]:,}-{vals[-1]:,}"
    return ", ".join(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for v in vals)


def deviations_table(profile: Profile):
    """The paper's setup (Olsson et al. 2022) next to this profile's, row by row."""
    import pandas as pd

    from .config import icl_indices

    cfgs = list(profile.runs.values())
    m = [c.model for c in cfgs]
    t = [c.train for c in cfgs]
    d = [c.data for c in cfgs]
    idx = sorted({icl_indices(x.n_ctx) for x in m})
    rows = [
        ("layers (small models)", "1-6", _span(x.n_layers for x in m)),
        ("d_model", "768", _span(x.d_model for x in m)),
        ("heads per layer", "12", _span(x.n_heads for x in m)),
        ("attention-only / with MLPs", "both", _span("with MLPs" if not x.attn_only else "attention-only" for x in m)),
        ("positions", "Shortformer (queries and keys only)", _span(x.positional for x in m)),
        ("attention biases (b_Q, b_K, b_V, b_O)", "not stated",
         _span("yes" if x.attn_bias else "no" for x in m)
         + (" (the laptop recipe's runs; the sweep's control without them forms its induction head too)"
            if any(x.attn_bias for x in m) else "")),
        ("context (n_ctx)", "8192", _span(x.n_ctx for x in m)),
        ("vocabulary", "2^16 BPE", _span(x.vocab_size for x in d) + " byte-level BPE trained on the corpus"),
        ("training data", "web text, books, ~10% Python", _span(",".join(x.sources) for x in d)
         + " (public-domain Bible translations, Python source of pinned packages)"),
        ("training tokens", "~10B", _span(x.total_tokens for x in t)),
        ("batch (sequences x context)", "not stated for the small models",
         _span(f"{c.train.batch_size} x {c.model.n_ctx}" for c in cfgs)),
        ("snapshots", "200 (every 50 steps)", _span(x.n_snapshots for x in t) + " requested, log-spaced early plus linear"),
        ("optimiser", "not fully specified", "AdamW, lr " + _span(x.lr for x in t) + ", warmup, "
         + _span(x.lr_schedule for x in t) + " schedule"),
        ("evaluation set", "10,000 random 512-token examples",
         _span(f"{x.n_eval} x {c.model.n_ctx}" for x, c in zip(d, cfgs)) + " tokens, fixed across snapshots; "
         "snapshot metrics and ablations in " + _span(x.metrics_precision for x in t)
         + " (train.eval_precision; bf16: autocast forward, fp32 losses)"),
        ("ICL score", "L(500) - L(50) (sign varies in the paper)",
         "L(late) - L(early), negative = ICL [book choice]; (late, early) = "
         + ", ".join(f"({a}, {b})" for a, b in idx)
         + "; averaged over a band of indices around each (metrics.icl_band_score) [book choice]"),
        ("smeared keys: initial alpha", "not given", "alpha = 0, sigmoid 0.5 [book choice]"),
        ("phase-change window", "chosen from dICL/dlog tokens", "computed: steepest fall of the banded ICL "
         "curve (smoothed in ln tokens) and the contiguous snapshots within 30% of it [book choice]"),
        ("prefix-matching sequences", "25 random tokens x 4, 10+ sequences",
         _span(f"{x.prefix_seq_len} x {x.prefix_repeats}, {x.n_prefix_seqs} sequences" for x in d)),
    ]
    if any(x.repeat_fraction for x in d):
        rows.append(("repeated spans in training rows", "none",
                     _span(x.repeat_fraction for x in d) + " of rows repeat a span of their document"))
    return pd.DataFrame(rows, columns=["aspect", "paper", f"profile {profile.name}"]).set_index("aspect")


# --- CLI -------------------------------------------------------------------------------------

def build(profile: Profile, paths: Paths, chapters=None, no_train=False, force=False, strict=True,
          jobs=None, profiles_dir=None, log=print) -> dict:
    times = {}
    t = time.time()
    if not no_train:
        nbs = chapter_notebooks(paths.root)
        ids = select_chapters(list(nbs), chapters)
        if chapters:
            names = []
            for c in ids:
                names += [n for n in runs_named_in(chapter_parameters(profile, c), profile.runs) if n not in names]
        else:
            names = list(profile.runs)
        train(profile, names, jobs=jobs, profiles_dir=profiles_dir, log=log)
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
    ap = argparse.ArgumentParser(prog="python -m icl_core.book", description=__doc__,
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
            if a.chapter:
                ids = select_chapters(list(chapter_notebooks(paths.root)), a.chapter)
                names = []
                for c in ids:
                    names += [n for n in runs_named_in(chapter_parameters(prof, c), prof.runs) if n not in names]
            else:
                names = None
            train(prof, names, jobs=a.jobs, profiles_dir=a.profiles_dir)
        elif a.command == "execute":
            execute(prof, paths, a.chapter, force=a.force, profiles_dir=a.profiles_dir)
        elif a.command == "render":
            render(prof, paths, strict=not a.no_strict)
        else:
            build(prof, paths, a.chapter, no_train=a.no_train, force=a.force, strict=not a.no_strict,
                  jobs=a.jobs, profiles_dir=a.profiles_dir)
    except BookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a whole profile in one command on a bare machine (issue 23): set up, check the corpora,
train, execute the chapters, render the site, and write a small summary with provenance.

    python3 benchmarks/gpu/run_profile.py --profile gpu --carry .gpu-carry --require-gpu \\
        --summary "$OUT" [--jobs 4] [--precompute-jobs 7] [--keep-going] [--out DIR] [--site-archive "$OUT/site.tar.gz"]

Stages, each timed (wall seconds; on a GPU machine also the mean GPU utilisation NVML reported):

setup    ``--carry DIR`` (made here by ``benchmarks/gpu/pack_carry.py``): unpack ``site.tar.xz`` (the
         book's Python packages the machine's image lacks, installed for its Python) into
         ``--work``/site and put it first on ``PYTHONPATH`` and its ``bin`` on ``PATH``; unpack
         ``corpora.tar.xz`` (the profile's prebuilt corpus folders) into ``--work``/cache, which
         becomes ``$ICL_CACHE_DIR``; unpack ``vendor.tar.xz`` (the site's JavaScript, as npm would
         fetch it) into the build's ``_build/vendor``. The machine's own torch is used.
corpus   every data config of the profile must have its ``corpus-<key>`` folder (``--corpora DIR``,
         or the carried one) and it must verify (``Corpus.from_folder``: manifest and checksums);
         nothing is rebuilt. Without ``--corpora``/``--carry`` the usual cache builds what is missing.
train    ``icl_core.book.pipeline.train`` with ``--jobs`` workers; on CUDA they share the one GPU
         (default 4 there: small runs leave the GPU idle while Python issues the next step; the
         gain is UNMEASURED, see benchmarks/gpu/README.md).
(precompute)  with ``--precompute-jobs N``: the chapters' heavy per-run analyses
         (``icl_core.book.pipeline.PRECOMPUTE``: chapter 3's ablations, in three parts per run) in N
         processes of ``--precompute-threads`` torch threads on the CPU, each run's pieces started as
         soon as it is trained, while the GPU trains the others; the chapters before chapter 3 run
         beside the last pieces (on the cores they leave), chapter 3 waits for them and then only loads
         them from the runs' caches. ``provenance.json``'s ``precompute`` gives each piece's seconds.
         Why: at the gpu profile's shapes chapter 3 alone took 1,300 s on a 2-core CPU (models of 50
         steps), the other chapters about 4 minutes together.
execute  ``icl_core.book.pipeline.execute`` (papermill, one chapter at a time; ``--keep-going``: the
         later chapters run after a failed one, and the stage still fails).
render   ``icl_core.book.site.render`` (Jupyter Book).

The summary folder (``--summary``) gets ``provenance.json`` (commit, dirty flag, GPU, torch, date,
command, seconds per stage, per-run training seconds from the run manifests, per-chapter seconds),
``results.json`` (every small results JSON file the chapters wrote, merged) and ``build.log``;
never weights or notebooks. ``--site-archive PATH`` also packs the HTML site (to look at; not to
commit). A failed stage still writes the summary, with ``status: failed`` and the error; so does
SIGTERM; ``--budget-s S`` writes it after S seconds as it stands, in case the command is killed at
a hard time limit (the device tool's 10 minutes).

Exit status: 0 built; 1 a stage failed; 2 bad input (no GPU with ``--require-gpu``, a missing or
corrupt corpus folder or carry archive, an unknown profile or chapter), reported in one line.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = 1
STAGES = ("setup", "corpus", "train", "execute", "render")
MAX_RESULT_BYTES = 1 << 20  # a results file larger than this is listed, not copied
CURVE_KEYS = ("loss", "icl", "prefix_max", "prev_token_max")  # logged at every snapshot (train.cheap_metrics)


class BadInput(Exception):
    """Reported in one line, exit status 2."""


class Terminated(Exception):
    """SIGTERM (a time limit): the stage fails and the summary is still written."""


def _terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


# --- setup: the carried archives ------------------------------------------------------------------

def unpack(archive: Path, dest: Path) -> int:
    """Extract a .tar.xz/.tar.gz into ``dest`` (safe paths only); the number of files."""
    if not archive.exists():
        raise BadInput(f"carry archive {archive} is missing (make it with benchmarks/gpu/pack_carry.py)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            tf.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BadInput(f"carry archive {archive} is unreadable: {e}") from None
    return sum(m.isfile() for m in members)


def fix_scripts(bin_dir: Path, python: str) -> int:
    """Point the console scripts pip wrote elsewhere (``#!/other/python``) at this ``python``."""
    n = 0
    for p in sorted(bin_dir.glob("*")) if bin_dir.is_dir() else []:
        data = p.read_bytes()
        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
            p.write_bytes(b"#!" + python.encode() + b"\n" + data.split(b"\n", 1)[1])
            p.chmod(0o755)
            n += 1
    return n


def setup(carry: Path, work: Path, build_dir: Path, log) -> dict:
    """Unpack the carry folder (see the module docstring); set PYTHONPATH, PATH and ICL_CACHE_DIR for
    this process and every one it starts. Returns what was done."""
    if not carry.is_dir():
        raise BadInput(f"--carry {carry} is not a folder (make it with benchmarks/gpu/pack_carry.py)")
    info = {"carry": str(carry)}
    man = carry / "carry.json"
    if man.exists():
        info["carry_manifest"] = json.loads(man.read_text())
    site = work / "site"
    if (carry / "site.tar.xz").exists():
        info["site_files"] = unpack(carry / "site.tar.xz", site)
        info["scripts_fixed"] = fix_scripts(site / "bin", sys.executable)
        sys.path.insert(0, str(site))
        os.environ["PATH"] = os.pathsep.join([str(site / "bin"), os.environ.get("PATH", "")])
    else:
        log(f"[setup] no {carry}/site.tar.xz: using the installed packages")
    # the project first, then the carried packages, for this process's children (kernels, workers, jupyter-book)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([str(site)] if site.is_dir() else []) + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    if (carry / "corpora.tar.xz").exists():
        info["corpus_files"] = unpack(carry / "corpora.tar.xz", work / "cache")
        os.environ["ICL_CACHE_DIR"] = str(work / "cache")
    if (carry / "vendor.tar.xz").exists():
        info["vendor_files"] = unpack(carry / "vendor.tar.xz", build_dir / "vendor")
    missing = [m for m in ("torch", "papermill", "nbformat", "ipykernel", "jupyter_book", "yaml")
               if not _importable(m)]
    if missing:
        raise BadInput(f"packages missing after setup: {', '.join(missing)} (rebuild the carry with pack_carry.py)")
    return info


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


# --- corpus -----------------------------------------------------------------------------------------

def check_corpora(profile, corpora: Path | None, names, log) -> dict:
    """Each distinct data config of ``names`` must have a verified prebuilt ``corpus-<key>`` folder in
    ``corpora`` (then ``$ICL_CACHE_DIR`` points there); with ``corpora`` None the cache builds what
    is missing. A folder whose key differs only by the installed source versions is linked under
    the key this machine computes (the text is the same: its manifest records the versions)."""
    from icl_core import data as D
    from icl_core.io import CorruptFileError, read_json_checked
    from icl_core.runs import cache_dir

    out = {}
    if corpora is not None:
        if not corpora.is_dir():
            raise BadInput(f"corpus folder {corpora} does not exist (--corpora: a folder of prebuilt corpus-<key> folders)")
        os.environ["ICL_CACHE_DIR"] = str(corpora)
    seen = {}
    for n in names:
        cfg = profile.run_config(n).data
        key = D.corpus_key(cfg)
        if key in seen:
            out[seen[key]]["runs"].append(n)
            continue
        t = time.time()
        if corpora is None:
            c = D.Corpus(cfg, cache_dir())
            entry = {"key": key, "folder": str(c.dir), "prebuilt": False}
        else:
            folder = corpora / f"corpus-{key}"
            aliased = None
            if not folder.exists():  # the same text under other installed versions?
                for cand in sorted(corpora.glob("corpus-*")):
                    try:
                        vers = read_json_checked(cand / "manifest.json").get("versions", {})
                    except (CorruptFileError, FileNotFoundError, ValueError):
                        continue
                    if cand.name == f"corpus-{D.corpus_key(cfg, vers)}":
                        folder.symlink_to(cand.name)
                        aliased = cand.name
                        break
            if not folder.exists():
                raise BadInput(f"no prebuilt corpus for run {n!r}: {folder} is missing (pack it with "
                               "benchmarks/gpu/pack_carry.py, or drop --corpora to build it)")
            try:
                c = D.Corpus.from_folder(folder.resolve(), cfg)
            except Exception as e:  # CorruptFileError, ConfigError
                raise BadInput(f"prebuilt corpus {folder} does not verify: {e}") from None
            entry = {"key": key, "folder": str(folder), "prebuilt": True, "aliased_from": aliased}
        entry.update(runs=[n], tokens=c.manifest.get("n_tokens"), seconds=round(time.time() - t, 2))
        seen[key] = key
        out[key] = entry
        log(f"[corpus] corpus-{key}: {entry['tokens']} tokens, {'verified' if entry['prebuilt'] else 'cached'}")
    return out


# --- GPU utilisation sampler --------------------------------------------------------------------------

class GpuSampler:
    """Mean device utilisation (NVML, through torch.cuda.utilization) over a stage; all processes."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = None

    def __enter__(self):
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.utilization()  # raises without NVML
                self._thread = threading.Thread(target=self._run, args=(torch,), daemon=True)
                self._thread.start()
        except Exception:
            self._thread = None
        return self

    def _run(self, torch):
        while not self._stop.wait(self.period):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


# --- provenance -------------------------------------------------------------------------------------

def git_info(root: Path = ROOT, carry_manifest: dict | None = None) -> dict:
    """Commit, dirty flag and branch of the checkout. With a carry, the commit is the one pack_carry.py
    recorded (the device tool's copy of .git was stale once: it named a commit two before the carry's),
    ``matches_carry`` whether the icl_core source hash computed here equals the carry's, and
    ``git_here`` what the local .git said, if there is one."""
    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        except OSError:
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    out = {"commit": commit, "dirty": bool(status) if status is not None else None,
           "branch": git("rev-parse", "--abbrev-ref", "HEAD"), "source": "git"}
    from icl_core.book.chapters import source_hash
    out["icl_core_source"] = source_hash()
    if carry_manifest:  # the device machine's .git can be a stale copy (seen 2026-12-04: HEAD two commits old)
        git_c = carry_manifest.get("git", {})
        if commit is not None:
            out["git_here"] = {"commit": commit, "dirty": out["dirty"], "branch": out["branch"]}
        out.update(commit=git_c.get("commit"), dirty=git_c.get("dirty"), branch=git_c.get("branch"),
                   source="carry.json (pack_carry.py, at the last commit before the call)",
                   matches_carry=git_c.get("icl_core_source") == out["icl_core_source"])
    return out


def device_info() -> dict:
    import platform

    out = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "gpu": "cpu"}
    try:
        import torch
        out.update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            out.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                       gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    except Exception as e:  # torch missing or broken: say so, never fail the summary
        out["torch_error"] = str(e)
    return out


def run_records(profile, names, trained_wall: dict) -> dict:
    """Per run: its hash, tokens, the manifest's training and snapshot-metrics seconds, and the wall
    seconds this command spent training it (absent when it was cached)."""
    from icl_core.heads import INDUCTION_THRESHOLD
    from icl_core.runs import Run, run_path

    out = {}
    for n in names:
        cfg = profile.run_config(n)
        rec = {"hash": cfg.hash(), "layers": cfg.model.n_layers, "d_model": cfg.model.d_model,
               "tokens": cfg.train.total_tokens, "trained_here": n in trained_wall}
        path = run_path(cfg)
        try:
            run = Run(path)
            rec.update(done=run.done, train_s=round(float(run.manifest.get("train_seconds", 0.0)), 2),
                       metrics_s=round(float(run.metrics_seconds()), 2), compiled=run.manifest.get("compiled"),
                       snapshots=len(run.steps))
            # the logged snapshot metrics, compactly: enough to see where each run's phase change fell
            curve = []
            for s in run.steps:
                e = run.manifest["snapshots"][str(s)]
                m = e.get("metrics") or {}
                curve.append([e.get("tokens")] + [round(float(m[k]), 4) if isinstance(m.get(k), (int, float)) else None
                                                  for k in CURVE_KEYS])
            rec["curve_columns"], rec["curve"] = ["tokens", *CURVE_KEYS], curve
            # first snapshot whose top prefix-matching score reaches the book's induction-head line
            crossed = [c[0] for c in curve if c[3] is not None and c[3] >= INDUCTION_THRESHOLD]
            rec["tokens_to_induction_threshold"] = crossed[0] if crossed else None
        except (FileNotFoundError, KeyError, ValueError) as e:
            rec.update(done=False, error=str(e))
        if n in trained_wall:
            rec["wall_s"] = round(trained_wall[n], 2)
        out[n] = rec
    return out


def chapter_records(executed: Path) -> dict:
    out = {}
    for stamp in sorted(executed.glob("*.key.json")):
        try:
            k = json.loads(stamp.read_text())
        except ValueError:
            continue
        out[stamp.name[: -len(".key.json")]] = {"seconds": k.get("seconds"), "key": k.get("key", "")[:12]}
    for failed in sorted(executed.glob("*.failed.ipynb")):
        out.setdefault(failed.name[: -len(".failed.ipynb")], {})["failed"] = True
    return out


def collect_results(build: Path, profile: str) -> tuple[dict, list[str]]:
    """{relative path: parsed JSON} of the results files the chapters wrote: ``results/**/*.json``
    under the executed chapters' folder or the build folder, and ``*.results.json`` beside the
    executed chapters. Files over MAX_RESULT_BYTES, or not JSON, are listed in the second value."""
    executed = build / "executed" / profile
    cands = set()
    for base in (executed, build):
        cands.update(p for p in (base / "results").rglob("*.json") if p.is_file())
    cands.update(executed.glob("*.results.json"))
    merged, skipped = {}, []
    for p in sorted(cands):
        rel = p.relative_to(build).as_posix()
        if p.stat().st_size > MAX_RESULT_BYTES:
            skipped.append(f"{rel} (over {MAX_RESULT_BYTES} bytes)")
            continue
        try:
            merged[rel] = json.loads(p.read_text())
        except ValueError as e:
            skipped.append(f"{rel} (not JSON: {e})")
    return merged, skipped


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def archive_site(html: Path, dest: Path) -> int:
    """The rendered site as a .tar.gz (to look at; the site's _sources hold notebooks: never commit it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz", compresslevel=6) as tf:
        tf.add(html, arcname="html")
    return dest.stat().st_size


# --- precompute: the chapters' per-run analyses while the GPU trains -----------------------------------

#: the precompute processes' niceness: the training processes (one core each, issuing the GPU's work
#: from Python) come first; once training ends the pieces have every core
PRECOMPUTE_NICE = 10


class Precompute:
    """A pool of ``--precompute-jobs`` processes (``--precompute-threads`` torch threads each) that
    computes the (chapter, run, part) pieces of ``icl_core.book.pipeline.PRECOMPUTE`` for each run as
    soon as it is trained, so that the chapter only loads them from the run's cache. A piece that
    fails is logged and left to the chapter, which computes it itself (and reports its error)."""

    def __init__(self, profile, a, log):
        import multiprocessing as mp

        from icl_core.book.chapters import PROJECT_ROOT, chapter_notebooks, select_chapters
        from icl_core.book.pipeline import precompute_tasks

        chapters = select_chapters(list(chapter_notebooks(PROJECT_ROOT)), a.chapter)
        self.tasks = precompute_tasks(profile, chapters)
        self.args = (profile.name, a.profiles_dir)
        self.threads, self.log = a.precompute_threads, log
        self.pool = mp.get_context("spawn").Pool(a.precompute_jobs) if self.tasks else None
        self.pending, self.started, self._env_saved = [], time.time(), {}
        self.busy_threads = a.precompute_jobs * a.precompute_threads
        self.record = {"jobs": a.precompute_jobs, "threads": a.precompute_threads, "tasks": len(self.tasks),
                       "done": {}, "failed": {}}

    def submit(self, run: str) -> None:
        from icl_core.book.pipeline import precompute_one

        for chapter, r, part in self.tasks:
            if r == run and self.pool is not None:
                args = (*self.args, chapter, r, part, self.threads, PRECOMPUTE_NICE)
                self.pending.append(((chapter, r, part), self.pool.apply_async(precompute_one, (args,))))

    def before_chapter(self, chapter: str) -> None:
        """Called before each chapter runs: a chapter with precomputed pieces waits for them all (then
        the chapters have every core); one without runs beside them on the cores they leave
        (``OMP_NUM_THREADS`` for its kernel: oversubscribed OpenMP threads slow a kernel several-fold)."""
        from icl_core.book.pipeline import PRECOMPUTE

        if chapter in PRECOMPUTE or not self.pending:
            if self.pending:
                t = time.time()
                self.log(f"[precompute] {chapter} waits for {len(self.pending)} piece(s)")
                self.wait()
                self.record["waited_s"] = round(self.record.get("waited_s", 0.0) + time.time() - t, 2)
            self._restore_threads()
        elif "OMP_NUM_THREADS" not in self._env_saved:
            self._env_saved["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) - self.busy_threads))
            self.log(f"[precompute] chapters beside it get OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")

    def _restore_threads(self) -> None:
        for k, v in self._env_saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._env_saved = {}

    def wait(self) -> None:
        for (chapter, r, part), res in self.pending:
            name = f"{chapter} {r} {part}"
            try:
                sec = res.get()[3]
                self.record["done"][name] = round(sec, 2)
                self.log(f"[precompute] {name}: {sec:.1f}s")
            except Exception as e:  # the chapter computes it itself, and reports the error there
                self.record["failed"][name] = f"{type(e).__name__}: {e}"[:500]
                self.log(f"[precompute] {name}: FAILED ({type(e).__name__}: {e}); the chapter will compute it")
        self.record["wall_s_after_start"] = round(time.time() - self.started, 2)
        self.pending = []

    def close(self) -> None:
        self._restore_threads()
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# --- main -------------------------------------------------------------------------------------------

def default_jobs(device: str, cores: int) -> int:
    """Training workers: 4 sharing one GPU (UNMEASURED: see the README), else the pipeline's CPU rule."""
    return 4 if device == "cuda" else (1 if cores < 2 else 2)


def parse(argv):
    ap = argparse.ArgumentParser(prog="run_profile.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--profiles-dir", default=None, help="folder of profile YAMLs (default configs/profiles)")
    ap.add_argument("--chapter", action="append", help="only this chapter (and the runs it reads); repeatable")
    ap.add_argument("--out", default=None, help="build under <out>/_build (default: the project's _build)")
    ap.add_argument("--summary", required=True, help="folder for provenance.json, results.json, build.log")
    ap.add_argument("--carry", default=None, help="folder made by pack_carry.py: site, corpora, vendor archives")
    ap.add_argument("--work", default="/tmp/icl-gpu", help="where --carry unpacks (default /tmp/icl-gpu)")
    ap.add_argument("--corpora", default=None, help="folder of prebuilt corpus-<key> folders (default: the "
                    "carried ones with --carry, else the usual cache, which builds what is missing)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="training workers (default 4 on CUDA, sharing the GPU: unmeasured; CPU: 1-2)")
    ap.add_argument("--precompute-jobs", type=int, default=0,
                    help="processes that compute the chapters' per-run analyses (pipeline.PRECOMPUTE) as each run "
                         "finishes training, on the CPU cores the training leaves idle (default 0: the chapters compute them)")
    ap.add_argument("--precompute-threads", type=int, default=2, help="torch threads per precompute process (default 2)")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 unless torch sees a CUDA device")
    ap.add_argument("--force", action="store_true", help="re-execute chapters even if up to date")
    ap.add_argument("--keep-going", action="store_true",
                    help="after a failed chapter, execute the later ones too (the stage still fails, and the site is not rendered)")
    ap.add_argument("--no-strict", action="store_true", help="render without -W")
    ap.add_argument("--site-archive", default=None, help="also write the HTML site as this .tar.gz")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="write a partial summary after this many seconds (before a hard time limit kills the command)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_start = time.time()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    summary = Path(a.summary).resolve()
    summary.mkdir(parents=True, exist_ok=True)
    log_file = (summary / "build.log").open("w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    out = Path(a.out).resolve() if a.out else ROOT
    prov = {"schema": SCHEMA, "profile": a.profile, "status": "running", "started_utc": started,
            "command": shlex.join(["python3", os.path.relpath(__file__, ROOT), *argv]),
            "cwd": os.getcwd(), "stages": {}}
    stages = prov["stages"]
    code = 0
    trained_wall: dict[str, float] = {}
    profile = names = paths = pre = None
    stage = "setup"
    lock = threading.Lock()

    def write_summary():
        """provenance.json and results.json from what is known now (also mid-build: --budget-s)."""
        with lock:
            prov.setdefault("device", device_info() if "torch" in sys.modules else {"gpu": "unknown"})
            if "git" not in prov:
                try:
                    sys.path.insert(0, str(ROOT))
                    prov["git"] = git_info()
                except Exception as e:
                    prov["git"] = {"commit": None, "error": str(e)}
            total = time.time() - t_start
            on_gpu = prov["device"].get("gpu") not in ("cpu", "unknown")
            for st in list(stages.values()):  # the machine's GPU is held for the whole command
                st["gpu_s"] = st["wall_s"] if on_gpu else 0.0
            prov["wall_s"] = round(total, 2)
            prov["gpu_s"] = round(total, 2) if on_gpu else 0.0
            prov["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            if profile is not None and names is not None:
                try:
                    prov["runs"] = run_records(profile, names, dict(trained_wall))
                    tr = [r["train_s"] for r in prov["runs"].values() if r.get("trained_here") and "train_s" in r]
                    prov["train_process_s"] = round(sum(tr), 2)  # GPU-process seconds when workers share the GPU
                except Exception as e:
                    prov["runs_error"] = str(e)
            if paths is not None:
                ex = paths.executed(profile.name)
                prov["chapters"] = chapter_records(ex)
                merged, skipped = collect_results(paths.build, profile.name)
                prov["results"] = {"n_files": len(merged), "files": sorted(merged), "skipped": skipped}
                if not merged:
                    prov["results"]["note"] = (f"no results JSON files found under {ex}/results, "
                                               f"{paths.build}/results or {ex}/*.results.json")
                write_json(summary / "results.json", {"profile": profile.name, "commit": prov["git"].get("commit"),
                                                      "files": merged})
            write_json(summary / "provenance.json", prov)

    def at_budget():
        """--budget-s passed: write the summary as it stands, so that it comes back even if the
        command is then killed at the device's limit; the build goes on, and a normal end rewrites it."""
        with lock:
            if prov["status"] != "running":  # the build has just ended: its own summary follows
                return
            prov["status"] = f"still running at --budget-s {a.budget_s:g} (stage {stage}); killed before the end if no later status"
        try:
            write_summary()
            log(f"[summary] --budget-s {a.budget_s:g} reached during {stage}: partial summary written")
        except Exception as e:  # never disturb the build
            print(f"warning: partial summary failed: {e}", file=sys.stderr)

    watchdog = threading.Timer(a.budget_s, at_budget) if a.budget_s else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        t = time.time()
        if a.carry:
            prov["setup"] = setup(Path(a.carry).resolve(), Path(a.work).resolve(), out / "_build", log)
        else:
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, str(ROOT))
        prov["git"] = git_info(carry_manifest=(prov.get("setup") or {}).get("carry_manifest"))
        prov["device"] = device_info()
        if a.require_gpu and prov["device"]["gpu"] == "cpu":
            raise BadInput(f"--require-gpu: torch {prov['device'].get('torch', '(missing)')} sees no CUDA device")
        from icl_core.book.chapters import PROJECT_ROOT, Paths, UsageError, chapter_runs
        from icl_core.config import ConfigError
        from icl_core.profiles import load_profile
        try:
            profile = load_profile(a.profile, a.profiles_dir)
            names = chapter_runs(profile, PROJECT_ROOT, a.chapter)
        except (ConfigError, UsageError) as e:
            raise BadInput(str(e)) from None
        paths = Paths(PROJECT_ROOT, out)
        from icl_core.book.chapters import profile_hash
        from icl_core.profiles import PROFILES_DIR
        prov["profile_hash"] = profile_hash(profile, Path(a.profiles_dir) if a.profiles_dir else PROFILES_DIR)
        prov["n_runs"], prov["tokens_total"] = len(names), sum(profile.run_config(n).train.total_tokens for n in names)
        prov["runs_dir"] = os.environ.get("ICL_RUNS_DIR", str(PROJECT_ROOT / "runs"))
        stages["setup"] = {"wall_s": round(time.time() - t, 2)}

        stage = "corpus"
        t = time.time()
        corpora = Path(a.corpora).resolve() if a.corpora else (
            Path(a.work).resolve() / "cache" if a.carry and (Path(a.carry) / "corpora.tar.xz").exists() else None)
        prov["corpora"] = check_corpora(profile, corpora, names, log)
        stages["corpus"] = {"wall_s": round(time.time() - t, 2)}

        from icl_core.book.pipeline import _device, execute, missing_runs, train
        from icl_core.book.site import render
        device = _device()
        jobs = a.jobs if a.jobs else default_jobs(device, os.cpu_count() or 1)
        prov.update(train_device=device, jobs=jobs)
        pre = Precompute(profile, a, log) if a.precompute_jobs > 0 else None
        if pre is not None:
            prov["precompute"] = pre.record
            absent = set(missing_runs(profile, names))
            for n in names:  # runs already trained (cached) start at once, the others as they finish
                if n not in absent:
                    pre.submit(n)

        def train_log(msg):
            log(msg)
            if msg.startswith("[train] ") and " done in " in msg:
                name, sec = msg[len("[train] "):].split(" done in ")
                trained_wall[name] = float(sec.rstrip("s"))
                if pre is not None:
                    pre.submit(name)

        for stage, fn in (("train", lambda: train(profile, names, jobs=jobs, profiles_dir=a.profiles_dir, log=train_log)),
                          ("execute", lambda: execute(profile, paths, a.chapter, force=a.force, profiles_dir=a.profiles_dir,
                                                      log=log, keep_going=a.keep_going,
                                                      before_chapter=pre.before_chapter if pre is not None else None)),
                          ("render", lambda: render(profile, paths, strict=not a.no_strict, log=log))):
            t = time.time()
            with GpuSampler() as gs:
                fn()
            stages[stage] = {"wall_s": round(time.time() - t, 2), "gpu_util_mean_pct": gs.mean}
            log(f"[{stage}] {stages[stage]['wall_s']:.1f}s")
        if a.site_archive:
            size = archive_site(paths.html, Path(a.site_archive).resolve())
            prov["site_archive"] = {"path": a.site_archive, "bytes": size}
        prov["status"] = "ok"
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        log_file.write(f"error: {e}\n")
        prov.update(status="bad input", failed_stage=stage, error=str(e))
        code = 2
    except Exception as e:  # BookError (a chapter, jupyter-book), a training crash: recorded, exit 1
        msg = f"{type(e).__name__}: {e}"
        print(f"error: stage {stage} failed: {msg}", file=sys.stderr)
        log_file.write(f"error: stage {stage} failed: {msg}\n")
        prov.update(status="failed", failed_stage=stage, error=msg[-4000:])
        code = 1
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if pre is not None:
            pre.close()
        write_summary()
        log(f"[summary] {summary}/provenance.json: status {prov['status']}, {prov['wall_s']:.1f}s")
        log_file.close()
    return code


if __name__ == "__main__":
    sys.exit(main())

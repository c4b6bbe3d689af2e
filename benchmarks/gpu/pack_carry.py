"""Make the folder a lent GPU machine needs beside the working tree (issue 23), here, once:

    .venv/bin/python benchmarks/gpu/pack_carry.py --profile gpu [--dest .gpu-carry] [--wheels DIR]

It writes (each archive .tar.xz; ``run_profile.py --carry`` unpacks them there):

site.tar.xz     the packages of benchmarks/gpu/device-requirements.txt, installed with
                ``pip install --target`` for the machine's CPython 3.12 on x86-64 (wheels only,
                no dependencies: the image has the rest), then pruned (PRUNE). Downloaded through
                pip from the package index, or from ``--wheels DIR`` (``pip download`` output).
corpora.tar.xz  every prebuilt ``corpus-<key>`` folder the profile's runs read, from this machine's
                cache (built here first if missing: the machine there must never rebuild one).
vendor.tar.xz   the site's JavaScript (``icl_core.book.vendor``; npm runs here, never there).
carry.json      commit, profile, the archives' sizes and sha256.

The device tool sends the working tree and at most 64 MiB in all; the script fails if the
folder would not fit beside the tree. ``.gpu-carry/`` is in .gitignore: name it in ``carry``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

REQUIREMENTS = Path(__file__).with_name("device-requirements.txt")
LIMIT = 64 * 2**20  # the device tool's cap on the working tree plus carried paths
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
BIBLES = ("kjv", "asv", "bbe", "web")
# pruned after install: (glob under the site folder, why nothing in the build reads it)
PRUNE = [
    *[(f"pythonbible_{v}/{f}", "icl_core.data.bible_verses reads plain_text_bible.py only")
      for v in BIBLES for f in ("html_bible.py", "html_notes_bible.py", "html_readers_bible.py",
                                "plain_text_notes_bible.py", "plain_text_readers_bible.py")],
    ("debugpy", "ipykernel runs without its debugger when debugpy is absent"),
    ("debugpy-*.dist-info", "ditto"),
    ("jedi", "IPython imports jedi only to complete code"),
    ("jedi-*.dist-info", "ditto"),
    ("widgetsnbextension", "the classic notebook's frontend bundle; the site vendors its own widget JS"),
    ("widgetsnbextension-*.dist-info", "ditto"),
    ("share/jupyter/nbextensions", "ditto"),
]
BABEL_KEEP = ("root.dat", "en.dat")  # and en_*.dat: Sphinx formats dates in English


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tar_xz(src: Path, dest: Path, exclude=(".lock",)) -> int:
    """``src``'s contents (not the folder itself) as ``dest``; its size in bytes."""
    def keep(ti):
        return None if Path(ti.name).name in exclude else ti
    with tarfile.open(dest, "w:xz", preset=6) as tf:
        for p in sorted(src.iterdir()):
            tf.add(p, arcname=p.name, filter=keep)
    return dest.stat().st_size


def install_site(site: Path, wheels: str | None, log=print) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--target", str(site), "-r", str(REQUIREMENTS)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if wheels:
        cmd += ["--no-index", "--find-links", str(wheels)]
    log("[pack] " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def prune(site: Path, log=print) -> int:
    n = 0
    for pattern, _why in PRUNE:
        for p in site.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            n += 1
    locale = site / "babel" / "locale-data"
    for p in locale.glob("*.dat") if locale.is_dir() else []:
        if p.name not in BABEL_KEEP and not p.name.startswith("en_"):
            p.unlink()
            n += 1
    log(f"[pack] pruned {n} paths")
    return n


def profile_corpora(profile) -> dict:
    """{corpus folder: [runs]} for every run of the profile, built here if missing. Each run's
    evaluation windows are drawn here too, so that a run whose validation text is too short for its
    ``n_eval`` fails here (ConfigError naming it), not on the lent machine (it did once: 2026-12-04)."""
    from icl_core import data as D
    from icl_core.config import ConfigError
    from icl_core.runs import cache_dir

    out: dict[Path, list[str]] = {}
    for name, cfg in profile.runs.items():
        c = D.Corpus(cfg.data, cache_dir())
        try:
            D.eval_window_sources(c, cfg.data.n_eval, cfg.model.n_ctx, cfg.data.eval_seed)
        except ConfigError as e:
            raise ConfigError(f"run {name!r} of profile {profile.name!r}: {e}") from None
        out.setdefault(c.dir, []).append(name)
    return out


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the working tree the device tool sends (tracked and untracked-not-ignored files)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                       capture_output=True, check=True)
    return sum((root / f).stat().st_size for f in r.stdout.decode().split("\0") if f and (root / f).is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--dest", default=str(ROOT / ".gpu-carry"))
    ap.add_argument("--wheels", default=None, help="install from these downloaded wheels (no index)")
    ap.add_argument("--skip", action="append", default=[], choices=["site", "corpora", "vendor"],
                    help="leave one archive out (a test; the machine then lacks it)")
    a = ap.parse_args(argv)
    from icl_core.book.chapters import Paths
    from icl_core.book.vendor import vendor_js
    from icl_core.config import ConfigError
    from icl_core.profiles import load_profile

    try:
        prof = load_profile(a.profile)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dest = Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    info = {"profile": prof.name, "archives": {}}
    from icl_core.book.chapters import source_hash
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    # the machine there gets no .git: run_profile.py reports this commit, and whether its icl_core still matches
    info["git"] = {"commit": git("rev-parse", "HEAD") or None, "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
                   "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                   "icl_core_source": source_hash()}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        if "site" not in a.skip:
            install_site(td / "site", a.wheels)
            prune(td / "site")
            tar_xz(td / "site", dest / "site.tar.xz")
            info["requirements"] = [ln for ln in REQUIREMENTS.read_text().splitlines() if ln and not ln.startswith("#")]
        if "corpora" not in a.skip:
            try:
                folders = profile_corpora(prof)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            (td / "corpora").mkdir()
            for folder in folders:
                shutil.copytree(folder, td / "corpora" / folder.name, ignore=shutil.ignore_patterns(".lock"))
            tar_xz(td / "corpora", dest / "corpora.tar.xz")
            info["corpora"] = {f.name: runs for f, runs in folders.items()}
        if "vendor" not in a.skip:
            vdir = vendor_js(Paths(ROOT, td / "v"))
            tar_xz(vdir, dest / "vendor.tar.xz")
    for name in ("site.tar.xz", "corpora.tar.xz", "vendor.tar.xz"):
        p = dest / name
        if p.exists() and name.split(".")[0] not in a.skip:
            info["archives"][name] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    (dest / "carry.json").write_text(json.dumps(info, indent=1) + "\n")
    carried = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    tree = tree_bytes()
    print(f"[pack] {dest}: {carried / 2**20:.1f} MiB (" + ", ".join(
        f"{k} {v['bytes'] / 2**20:.1f}" for k, v in info["archives"].items()) +
        f"); working tree {tree / 2**20:.1f} MiB; limit {LIMIT / 2**20:.0f} MiB")
    if carried + tree > LIMIT:
        print(f"error: the carry folder and the working tree hold {(carried + tree) / 2**20:.1f} MiB, over the "
              f"device tool's {LIMIT / 2**20:.0f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render the site: assemble the Jupyter Book source from the executed chapters, then build HTML."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ..profiles import Profile
from .chapters import PROJECT_ROOT, BookError, Paths, toc_files
from .pipeline import stale_chapters
from .vendor import VENDOR_STAMP, vendor_js


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


#: where the landing page (the toc's root) shows the scorecard (:func:`scorecard_block`)
SCORECARD_MARKER = "{{ scorecard }}"


def scorecard_block(profile: Profile, paths: Paths, log=print) -> str:
    """The landing page's scorecard from the chapters' results files of this profile
    (``executed/<profile>/results``, :func:`icl_core.scorecard.load`), each row linked to the section
    of the page that shows it (:func:`icl_core.scorecard.section_ids` of the executed notebooks)."""
    from .. import scorecard as SC

    executed = paths.executed(profile.name)
    try:
        rows = SC.load(executed / "results", profile.name)
    except SC.ScorecardError as e:
        raise BookError(f"scorecard: {e}") from None
    missing = sorted({r["chapter"] for r in rows if r["status"] == SC.NOT_BUILT})
    if missing:
        log(f"[render] warning: no scorecard results for {', '.join(missing)} (profile {profile.name!r}); "
            "their rows say 'not built'")
    sections = {}
    for chapter in SC.CHAPTERS.values():
        nb = executed / f"{chapter}.ipynb"
        nb = nb if nb.exists() else paths.root / "chapters" / f"{chapter}.ipynb"
        if nb.exists():
            sections[chapter] = SC.section_ids(nb)
    for r in rows:
        if r["chapter"] in sections and r["anchor"] not in sections[r["chapter"]]:
            log(f"[render] warning: scorecard claim {r['id']!r}: {r['chapter']} has no section {r['section']!r}; "
                "the row links to the chapter's scorecard section")
    return SC.landing_html(rows, profile.name, sections, SC.faithful_rows()[0])  # the committed GPU build, if any


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
                if f == toc_files(root)[0] and SCORECARD_MARKER.encode() in files[rel]:
                    files[rel] = files[rel].replace(SCORECARD_MARKER.encode(),
                                                    scorecard_block(profile, paths, log).encode())
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

"""The book's chapters: where things are built, which notebooks are chapters, what each is executed
with, and the key that says whether an executed chapter is up to date.

A chapter is re-executed only when its key changes: the notebook's source, its parameters, the
profile (file and run-config hashes) or the icl_core source (:func:`source_hash`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..profiles import PROFILES_DIR, Profile

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # icl_core/
PROJECT_ROOT = PACKAGE_DIR.parent


class BookError(RuntimeError):
    """A build step failed; the message says which and what to do."""


class ChapterFailed(BookError):
    def __init__(self, chapter: str, cell: int | None, message: str):
        self.chapter, self.cell = chapter, cell
        super().__init__(message)


class UsageError(BookError):
    """A bad name at the command line (a chapter, a profile): reported in one line, exit status 2."""


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
            raise UsageError(f"--chapter {w!r} matches {hits or 'no chapter'}; chapters: {', '.join(all_ids)}")
        if hits[0] not in out:
            out.append(hits[0])
    return out


def chapter_parameters(profile: Profile, chapter: str) -> dict:
    return {"profile": profile.name, **profile.chapter_params(chapter)}


def notebook_defaults(nb_path: Path) -> dict:
    """The literal values a notebook's ``parameters`` cell assigns (what papermill's injected values
    override): ``{name: value}``; assignments that are not literals are left out."""
    import ast

    nb = json.loads(Path(nb_path).read_text())
    out = {}
    for c in nb.get("cells", []):
        if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", []):
            for node in ast.parse("".join(c.get("source", ""))).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        out[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        pass
            break
    return out


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



def chapter_runs(profile: Profile, root: Path, chapters: list[str] | None) -> list[str]:
    """The runs the chapters (ids or unique prefixes; None: every chapter) name in their parameters;
    every run of the profile when ``chapters`` is None."""
    if not chapters:
        return list(profile.runs)
    names: list[str] = []
    for c in select_chapters(list(chapter_notebooks(root)), chapters):
        names += [n for n in runs_named_in(chapter_parameters(profile, c), profile.runs) if n not in names]
    return names


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

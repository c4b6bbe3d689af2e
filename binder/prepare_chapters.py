"""Make the chapters runnable where a launch button opens them (Binder runs this from postBuild).

    python binder/prepare_chapters.py [--profile smoke] [chapters]

Each chapter notebook in the folder is rewritten in place: papermill's "injected-parameters" cell
after its `parameters` cell sets the profile's parameters for that chapter (as `make book` passes
them), and the next cell trains the chapter's runs of that profile first (only the missing ones;
smoke runs take seconds each). The smoke profile is the default: its tiny models train in
minutes on a free Binder machine, and every page says its numbers are not results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nbformat
import papermill

from icl_core import book
from icl_core.profiles import load_profile

TRAIN_TAG = "train-runs-first"


def train_cell(profile: str, chapter: str):
    return nbformat.v4.new_code_cell(
        f"# Launched with the {profile} profile: train this chapter's runs first (only those missing).\n"
        "from icl_core import book as _book\n\n"
        f"assert _book.main([\"train\", \"--profile\", profile, \"--chapter\", {json.dumps(chapter)}]) == 0",
        metadata={"tags": [TRAIN_TAG]})


def prepare(nb_path: Path, profile_name: str) -> None:
    prof = load_profile(profile_name)
    chapter = nb_path.stem
    # papermill's own parameter injection, without executing (papermill --prepare-only)
    nb = papermill.execute_notebook(str(nb_path), None, parameters=book.chapter_parameters(prof, chapter),
                                    prepare_only=True, kernel_name="python3", progress_bar=False)
    at = next(i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, train_cell(prof.name, chapter))
    nbformat.write(nb, nb_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="chapters")
    ap.add_argument("--profile", default="smoke")
    a = ap.parse_args(argv)
    nbs = sorted(Path(a.folder).glob("*.ipynb"))
    for nb in nbs:
        prepare(nb, a.profile)
        print(f"prepared {nb} for the {a.profile} profile")
    return 0 if nbs else 1


if __name__ == "__main__":
    sys.exit(main())

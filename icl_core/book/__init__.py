"""Build the book: train the profile's runs, execute the chapters with papermill, render with Jupyter Book.

    python -m icl_core.book build   --profile laptop                 # train + execute + render
    python -m icl_core.book train   --profile smoke                  # only train what is missing
    python -m icl_core.book execute --profile smoke --chapter 01     # one chapter (id or unique prefix)
    python -m icl_core.book build   --profile smoke --no-train       # never train; fail if a run is missing
    python -m icl_core.book render  --profile smoke                  # HTML from what is executed

Layout under ``<out>/_build`` (out = the project, or ``--out``):

    executed/<profile>/<chapter>.ipynb     executed notebooks (papermill output)
    executed/<profile>/<chapter>.key.json  what they were executed from (the up-to-date key)
    executed/<profile>/<chapter>.failed.ipynb   the partial output of a failed chapter
    src/                                    the assembled Jupyter Book source (rewritten by render)
    html/                                   the site

Chapters are the notebooks named in ``_toc.yml``. Each gets ``profile=<name>`` plus the profile's
``chapters:`` parameters for its id (the file stem). A chapter is re-executed only when its key
changes: the notebook's source, its parameters, the profile (file and run-config hashes) or the
icl_core source. Runs are trained by :mod:`icl_core.runs` and cached by config hash.

The package: :mod:`~icl_core.book.cli` (the command line, ``build``), :mod:`~icl_core.book.chapters`
(paths, chapter selection and parameters, up-to-date keys), :mod:`~icl_core.book.pipeline` (train,
execute with papermill), :mod:`~icl_core.book.site` (assemble the source, render HTML),
:mod:`~icl_core.book.vendor` (offline JavaScript) and :mod:`~icl_core.book.appendix` (the banner
and the methods appendix's tables, used by the chapters).
"""
from .appendix import (alignment, alignment_text, chapter_banner, corpus_table, deviations_table, package_versions,
                       profile_summary, runs_table, show_sweep_rounds)
from .chapters import (PACKAGE_DIR, PROJECT_ROOT, BookError, ChapterFailed, Paths, UsageError, chapter_key,
                       chapter_notebooks, chapter_parameters, chapter_runs, is_up_to_date, notebook_source_hash, profile_hash,
                       runs_named_in, select_chapters, source_hash, toc_files)
from .pipeline import execute, execute_chapter, missing_runs, stale_chapters, train
from .site import assemble_source, render
from .vendor import VENDOR, vendor_js
from .cli import build, main  # noqa: E402  (cli reads this package's docstring)

__all__ = ["build", "main", "alignment", "alignment_text", "profile_summary", "show_sweep_rounds", "BookError", "ChapterFailed", "PACKAGE_DIR", "PROJECT_ROOT", "Paths", "UsageError", "VENDOR",
           "assemble_source", "chapter_banner", "chapter_key", "chapter_notebooks", "chapter_parameters", "chapter_runs",
           "corpus_table", "deviations_table", "execute", "execute_chapter", "is_up_to_date", "missing_runs",
           "notebook_source_hash", "package_versions", "profile_hash", "render", "runs_named_in", "runs_table",
           "select_chapters", "source_hash", "stale_chapters", "toc_files", "train", "vendor_js"]

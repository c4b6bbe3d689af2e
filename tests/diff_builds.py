"""Diff the text outputs of the executed chapters of two book builds, ignoring timings.

    python tests/diff_builds.py /tmp/before/_build/executed/smoke _build/executed/smoke
    python tests/diff_builds.py BEFORE AFTER --numbers    # compare only the numbers, in order
    python tests/diff_builds.py BEFORE AFTER --unordered  # outputs may have moved between cells
    python tests/diff_builds.py BEFORE AFTER --ignore-figure-size   # a figure laid out anew is no difference

A refactor that changes no behaviour must leave every computed number of the book unchanged. This
reads each ``<chapter>.ipynb`` present in both folders, joins its text outputs (stream text, and
the ``text/plain``, ``text/markdown`` and ``text/html`` data of results and displays, with images
and embedded data removed) in cell order, masks timings (a number followed by a unit of time, such
as ``12.3 s`` or ``4 minutes``) and prints a unified diff per chapter. With ``--numbers`` only the
sequence of numbers in those outputs is compared, so a change of wording alone is not reported.
Exit status: 0 when the builds agree, 1 when they differ, 2 on a bad argument.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

TEXT_MIMES = ("text/plain", "text/markdown", "text/html")
TIMING = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?\s*(?:ms|s|sec|secs|seconds?|min|mins|minutes?|h|hours?)\b")
NUMBER = re.compile(r"[-+−]?\d+(?:[.,]\d+)*(?:e[+-]?\d+)?")
FIGURE_SIZE = re.compile(r"<Figure size \d+x\d+ with")
IMAGE = re.compile(r"<img\b[^>]*>|data:[a-z]+/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=]+", re.I)
# widget views and matplotlib reprs name objects by id or memory address, and pandas' Styler
# names its table by a random uuid (T_1a2b3_row0_col0): all differ per run
VOLATILE = re.compile(r"0x[0-9a-f]{6,}|\"model_id\": \"[0-9a-f]+\"|(?<=T_)[0-9a-f]{5}(?=[_\"\s])", re.I)


def _text(x) -> str:
    return "".join(x) if isinstance(x, list) else str(x)


def output_lines(nb_path: Path, unordered: bool = False, ignore_figure_size: bool = False) -> list[str]:
    """The text outputs of an executed notebook, one string per line, with timings masked; with
    ``unordered`` the outputs (each one a block of lines) are sorted, so that moving an output to
    another cell or place is not a difference; with ``ignore_figure_size`` a figure's repr keeps only
    its number of axes (``<Figure size 900x300 with 3 Axes>`` -> ``<Figure with 3 Axes>``)."""
    nb = json.loads(Path(nb_path).read_text())
    blocks: list[list[str]] = []
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if out.get("output_type") == "stream":
                chunks = [_text(out.get("text", ""))]
            elif out.get("output_type") == "error":
                chunks = [f"{out.get('ename')}: {out.get('evalue')}"]
            else:
                data = out.get("data", {})
                chunks = [_text(data[m]) for m in TEXT_MIMES if m in data]
            for chunk in chunks:
                chunk = VOLATILE.sub("<id>", TIMING.sub("<time>", IMAGE.sub("<image>", chunk)))
                if ignore_figure_size:
                    chunk = FIGURE_SIZE.sub("<Figure with", chunk)
                blocks.append([line.rstrip() for line in chunk.splitlines()])
    return [line for block in (sorted(blocks) if unordered else blocks) for line in block]


def numbers(lines: list[str]) -> list[str]:
    """The numbers in ``lines``, in order (timings are already masked)."""
    return [n.replace("−", "-") for line in lines for n in NUMBER.findall(line)]


def diff_builds(before: Path, after: Path, numbers_only: bool = False, unordered: bool = False,
                ignore_figure_size: bool = False) -> dict[str, list[str]]:
    """{chapter: unified-diff lines} for every chapter whose outputs differ, or that is missing
    from one build (reported as a one-line diff)."""
    a = {p.name: p for p in Path(before).glob("*.ipynb") if not p.name.endswith(".failed.ipynb")}
    b = {p.name: p for p in Path(after).glob("*.ipynb") if not p.name.endswith(".failed.ipynb")}
    out: dict[str, list[str]] = {}
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            out[name] = [f"only in {'after' if name in b else 'before'}"]
            continue
        la = output_lines(a[name], unordered, ignore_figure_size)
        lb = output_lines(b[name], unordered, ignore_figure_size)
        if numbers_only:
            la, lb = numbers(la), numbers(lb)
        d = list(difflib.unified_diff(la, lb, f"before/{name}", f"after/{name}", lineterm="", n=1))
        if d:
            out[name] = d
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--numbers", action="store_true", help="compare only the numbers in the outputs")
    ap.add_argument("--unordered", action="store_true",
                    help="ignore the order of the outputs (a figure moved above its sentence is no difference)")
    ap.add_argument("--ignore-figure-size", action="store_true",
                    help="compare figures by their number of axes only (a figure laid out anew is no difference)")
    a = ap.parse_args(argv)
    for d in (a.before, a.after):
        if not d.is_dir() or not any(d.glob("*.ipynb")):
            print(f"error: {d} is not a folder of executed notebooks", file=sys.stderr)
            return 2
    diffs = diff_builds(a.before, a.after, a.numbers, a.unordered, a.ignore_figure_size)
    for name, d in diffs.items():
        print("\n".join(d))
    n = len({p.name for p in a.before.glob("*.ipynb")} | {p.name for p in a.after.glob("*.ipynb")})
    what = (('numbers' if a.numbers else 'text outputs') + (', in any order' if a.unordered else '')
            + (', figure sizes ignored' if a.ignore_figure_size else ''))
    print(f"{len(diffs)} of {n} notebooks differ ({what}, timings ignored)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

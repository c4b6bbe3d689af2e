"""The book pipeline (icl_core.book): chapter selection, parameters, up-to-date keys, failures.

Execution tests run tiny notebooks (no models) in a temporary project with the real papermill.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat as nbf
import pytest

from icl_core import book
from icl_core.book import cli, pipeline
from icl_core.profiles import Profile, available_profiles, load_profile

ROOT = Path(__file__).resolve().parent.parent


# --- a throwaway project with two chapters --------------------------------------------------

def _notebook(path: Path, body: str, extra: str = ""):
    nb = nbf.v4.new_notebook()
    params = nbf.v4.new_code_cell('profile = "laptop"\nn = 1' + extra)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbf.v4.new_markdown_cell(f"# {path.stem}"), params, nbf.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, path)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: index\nparts:\n  - caption: A\n    chapters:\n"
        "      - file: chapters/00_first\n      - file: chapters/01_second\n      - file: chapters/notes\n")
    (tmp_path / "index.md").write_text("# Index\n")
    (tmp_path / "chapters" / "notes.md").write_text("# Notes\n")
    _notebook(tmp_path / "chapters" / "00_first.ipynb", "print('first', profile, n)")
    _notebook(tmp_path / "chapters" / "01_second.ipynb", "print('second', profile, n)")
    prof = Profile("tiny", "a test profile", "", runs={}, chapters={"00_first": {"n": 2}, "01_second": {"n": 3}})
    return book.Paths(tmp_path, tmp_path), prof


def _run(paths, prof, **kw):
    return book.execute(prof, paths, profiles_dir=paths.root, log=lambda *a: None, **kw)


def _stdout(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", [])
                   if o.get("name") == "stdout")


def test_toc_order_and_chapter_selection(project):
    paths, _ = project
    assert list(book.chapter_notebooks(paths.root)) == ["00_first", "01_second"]  # md pages are not executed
    assert book.select_chapters(["00_first", "01_second"], ["01"]) == ["01_second"]
    assert book.select_chapters(["00_first", "01_second"], ["chapters/00_first.ipynb"]) == ["00_first"]
    with pytest.raises(book.BookError, match="matches"):
        book.select_chapters(["00_first", "01_second"], ["0"])
    with pytest.raises(book.BookError, match="no chapter"):
        book.select_chapters(["00_first", "01_second"], ["99"])


def test_parameters_are_injected(project):
    paths, prof = project
    status = _run(paths, prof)
    assert all(s.startswith("executed") for s in status.values())
    out = paths.executed("tiny")
    assert _stdout(out / "00_first.ipynb").strip() == "first tiny 2"
    assert _stdout(out / "01_second.ipynb").strip() == "second tiny 3"
    nb = json.loads((out / "00_first.ipynb").read_text())
    tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
    assert any("injected-parameters" in t for t in tags)
    assert any("parameters" in t and "remove-cell" in t for t in tags)  # defaults hidden on the page


def test_up_to_date_detection(project):
    paths, prof = project
    _run(paths, prof)
    assert set(_run(paths, prof).values()) == {"up to date"}
    # editing one notebook re-executes that one only
    _notebook(paths.root / "chapters" / "01_second.ipynb", "print('second, edited', profile, n)")
    status = _run(paths, prof)
    assert status["00_first"] == "up to date" and status["01_second"].startswith("executed")
    # outputs alone do not count as a change (only cell sources, tags and the kernel do)
    nb = json.loads((paths.root / "chapters" / "00_first.ipynb").read_text())
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x"}]
    (paths.root / "chapters" / "00_first.ipynb").write_text(json.dumps(nb))
    assert _run(paths, prof)["00_first"] == "up to date"
    # changing a chapter's parameters re-executes it
    prof.chapters["00_first"] = {"n": 5}
    status = _run(paths, prof)
    assert status["00_first"].startswith("executed") and status["01_second"] == "up to date"
    assert _stdout(paths.executed("tiny") / "00_first.ipynb").strip() == "first tiny 5"
    # --force re-executes everything; --chapter limits it
    assert set(_run(paths, prof, chapters=["01"], force=True)) == {"01_second"}


def test_key_covers_every_part(tmp_path):
    nb = tmp_path / "a.ipynb"
    _notebook(nb, "1")
    base = book.chapter_key(nb, {"profile": "p"}, "prof", "src")["key"]
    assert book.chapter_key(nb, {"profile": "q"}, "prof", "src")["key"] != base
    assert book.chapter_key(nb, {"profile": "p"}, "prof2", "src")["key"] != base
    assert book.chapter_key(nb, {"profile": "p"}, "prof", "src2")["key"] != base
    _notebook(nb, "2")
    assert book.chapter_key(nb, {"profile": "p"}, "prof", "src")["key"] != base


def test_source_hash_tracks_icl_core(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    h = book.source_hash(pkg)
    (pkg / "a.py").write_text("x = 2\n")
    assert book.source_hash(pkg) != h


def test_failure_names_chapter_and_cell_and_keeps_other_outputs(project):
    paths, prof = project
    _run(paths, prof)
    good = (paths.executed("tiny") / "00_first.ipynb").read_bytes()
    _notebook(paths.root / "chapters" / "01_second.ipynb", "x = 1\nraise ValueError('deliberate failure')")
    _notebook(paths.root / "chapters" / "00_first.ipynb", "print('first', profile, n)  # edited")
    prof.chapters["00_first"] = {"n": 2}
    with pytest.raises(book.ChapterFailed) as e:
        _run(paths, prof)
    msg = str(e.value)
    assert e.value.chapter == "01_second" and e.value.cell == 3
    assert "01_second" in msg and "cell 3" in msg and "x = 1" in msg and "deliberate failure" in msg
    out = paths.executed("tiny")
    assert (out / "00_first.ipynb").exists()  # the chapter before the failure was executed and kept
    assert _stdout(out / "00_first.ipynb").strip() == "first tiny 2" and good
    assert not (out / "01_second.ipynb").exists()  # no stale output of the failed chapter
    assert (out / "01_second.failed.ipynb").exists()  # its partial output, for inspection
    # after the fix only the failed chapter runs again
    _notebook(paths.root / "chapters" / "01_second.ipynb", "print('second', profile, n)")
    status = _run(paths, prof)
    assert status == {"00_first": "up to date", "01_second": status["01_second"]}
    assert status["01_second"].startswith("executed")
    assert not (out / "01_second.failed.ipynb").exists()


def test_keep_going_runs_the_chapters_after_a_failure_and_still_fails(project):
    paths, prof = project
    _notebook(paths.root / "chapters" / "00_first.ipynb", "raise ValueError('deliberate failure')")
    with pytest.raises(book.ChapterFailed):  # by default the build stops at the first failure
        _run(paths, prof)
    assert not (paths.executed("tiny") / "01_second.ipynb").exists()
    with pytest.raises(book.ChapterFailed) as e:
        _run(paths, prof, keep_going=True)
    assert e.value.chapter == "00_first" and "1 chapter(s) failed (00_first)" in str(e.value)
    out = paths.executed("tiny")
    assert _stdout(out / "01_second.ipynb").strip() == "second tiny 3"  # the later chapter ran
    assert (out / "00_first.failed.ipynb").exists() and not (out / "00_first.ipynb").exists()


def test_cli_reports_failure(project, capsys, monkeypatch):
    paths, prof = project
    _notebook(paths.root / "chapters" / "00_first.ipynb", "1/0")
    monkeypatch.setattr(cli, "PROJECT_ROOT", paths.root)
    monkeypatch.setattr(cli, "load_profile", lambda name, d=None: prof)
    assert cli.main(["execute", "--profile", "tiny", "--chapter", "00"]) == 1
    err = capsys.readouterr().err
    assert "chapter 00_first" in err and "cell 3" in err and "ZeroDivisionError" in err


def test_a_chapter_whose_runs_are_missing_fails_before_running(project):
    paths, _ = project
    smoke = load_profile("smoke")
    prof = Profile("tiny", "", "", runs={"r": smoke.runs["attn2"].__class__.from_dict(
        {**smoke.runs["attn2"].to_dict(), "name": "r", "data": {**smoke.runs["attn2"].to_dict()["data"],
                                                                 "split_seed": 987654}})},
                   chapters={"00_first": {"runs": ["r"]}})
    with pytest.raises(book.ChapterFailed, match="not trained"):
        _run(paths, prof, chapters=["00"])


def test_precompute_tasks_and_notebook_defaults():
    """The pieces benchmarks/gpu/run_profile.py computes ahead of chapter 3: every run it reads, every
    part; parameters the profile leaves out come from the notebook's own parameters cell."""
    gpu = load_profile("gpu")
    tasks = pipeline.precompute_tasks(gpu)
    runs = gpu.chapters["03_ablation"]["runs"]
    assert tasks == ([("03_ablation", r, p) for r in runs for p in ("pp", "full", "sets")]
                     + [("05_mechanism", r, "scores") for r in gpu.chapters["05_mechanism"]["runs"]])
    assert pipeline.precompute_tasks(gpu, ["00_intro"]) == []
    d = book.chapter_notebooks(ROOT)
    defaults = pipeline.notebook_defaults(d["03_ablation"])
    assert defaults["profile"] == "laptop" and isinstance(defaults["n_steps"], int) and "runs" in defaults
    import inspect
    from icl_core import ablation
    from icl_core import mechanism
    assert set(inspect.signature(ablation.warm).parameters) - {"run", "part"} <= set(defaults)
    assert set(inspect.signature(mechanism.warm).parameters) - {"run", "part"} <= set(pipeline.notebook_defaults(d["05_mechanism"]))


# --- the real book's configuration ----------------------------------------------------------# --- the real book's configuration ----------------------------------------------------------

def test_profiles_share_chapters_and_name_known_runs():
    names = available_profiles()
    assert {"smoke", "laptop", "gpu"} <= set(names)
    chapters = {n: list(load_profile(n).chapters) for n in ("smoke", "laptop", "gpu")}
    assert chapters["laptop"] == chapters["smoke"] == chapters["gpu"]
    for n in ("smoke", "laptop", "gpu"):
        prof = load_profile(n)
        for c in prof.chapters:
            params = book.chapter_parameters(prof, c)
            assert params["profile"] == n
            assert book.runs_named_in(params, prof.runs), f"{n}:{c} names no run"


def test_runs_named_in_finds_nested_names():
    prof = load_profile("smoke")
    params = {"pairs": {"1L": [["attn1", "smear1"]], "2L": [["attn2", "smear2"]]}, "n_steps": 3, "label": "x"}
    assert book.runs_named_in(params, prof.runs) == ["attn1", "smear1", "attn2", "smear2"]
    assert book.runs_named_in({"seeds": {"attn2": ["attn2", "attn2_s1"]}}, prof.runs) == ["attn2", "attn2_s1"]
    assert book.runs_named_in({"seeds": {"attn2": ["not_a_run"]}}, prof.runs) == ["attn2"]


def test_every_profile_chapter_has_a_notebook_in_the_toc():
    nbs = book.chapter_notebooks(ROOT)
    for c in load_profile("smoke").chapters:
        assert c in nbs
    assert list(nbs)[0] == "00_intro"
    for f in book.toc_files(ROOT):
        assert (ROOT / f"{f}.md").exists() or (ROOT / f"{f}.ipynb").exists(), f


#: what a chapter's code may not contain: the work belongs in icl_core (load -> plot -> say)
FORBIDDEN = {ast.For: "a loop", ast.AsyncFor: "a loop", ast.While: "a loop", ast.ListComp: "a comprehension",
             ast.SetComp: "a comprehension", ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension",
             ast.Lambda: "a lambda", ast.FunctionDef: "a def", ast.AsyncFunctionDef: "a def", ast.ClassDef: "a class",
             ast.If: "a branch", ast.IfExp: "a branch", ast.Compare: "a comparison (a rule belongs in icl_core)"}
MAX_CELL_LINES = 8  # lines of code in a cell, not counting imports, comments and blank lines


def _says_only(tree: ast.Module) -> bool:
    """Every statement displays prose: display(Markdown(...)) or say(...)."""
    def prose(call):
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            return False
        if call.func.id == "say":
            return True
        return (call.func.id == "display" and len(call.args) == 1 and isinstance(call.args[0], ast.Call)
                and isinstance(call.args[0].func, ast.Name) and call.args[0].func.id == "Markdown")
    return bool(tree.body) and all(isinstance(st, ast.Expr) and prose(st.value) for st in tree.body)


def chapter_violations(nb) -> list[str]:
    """Why a chapter notebook is not load -> plot -> say, one string per problem (empty: it is)."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"cell {i + 1}"
        tags = cell.metadata.get("tags", [])
        try:
            tree = ast.parse(cell.source)
        except SyntaxError as e:
            out.append(f"{where}: does not parse ({e.msg})")
            continue
        for node in ast.walk(tree):
            if type(node) in FORBIDDEN:
                out.append(f"{where}, line {node.lineno}: {FORBIDDEN[type(node)]}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                out.append(f"{where}, line {node.lineno}: private attribute {node.attr}")
            elif isinstance(node, ast.ImportFrom) and any(a.name.startswith("_") for a in node.names):
                out.append(f"{where}, line {node.lineno}: imports a private name")
            elif isinstance(node, ast.Constant) and isinstance(node.value, float) and "parameters" not in tags:
                out.append(f"{where}, line {node.lineno}: a typed-in number {node.value} (use icl_core's constants)")
            elif (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and "parameters" in tags
                  and "threshold" in node.id):
                out.append(f"{where}: threshold {node.id} is a parameter (icl_core.heads owns thresholds)")
        code = [ln for ln in cell.source.splitlines()
                if ln.strip() and not ln.lstrip().startswith(("#", "import ", "from "))]
        if "parameters" not in tags and len(code) > MAX_CELL_LINES:
            out.append(f"{where}: {len(code)} lines of code (at most {MAX_CELL_LINES})")
        if _says_only(tree) and "remove-input" not in tags:
            out.append(f"{where}: only displays prose but is not tagged remove-input")
    return out


def test_chapter_notebooks_are_thin_and_stored_without_outputs():
    for c, path in book.chapter_notebooks(ROOT).items():
        nb = nbf.read(path, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        params = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
        assert len(params) == 1 and "profile =" in params[0].source, c
        for cell in code:
            assert not cell.outputs and cell.execution_count is None, f"{c}: outputs are committed"
        assert "chapter_banner" in "".join(cell.source for cell in code), f"{c}: no profile banner"
        assert chapter_violations(nb) == [], c


def _chapter(*sources, tags=None):
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_code_cell('profile = "smoke"')] + [nbf.v4.new_code_cell(s) for s in sources]
    nb.cells[0].metadata["tags"] = ["parameters"]
    for cell in nb.cells[1:]:
        cell.metadata["tags"] = list(tags or [])
    return nb


def test_the_chapter_check_accepts_load_plot_say():
    nb = _chapter("res = Co.compute(prof, models)", "P.plot_loss_curves(*Co.loss_curve_data(res.models));")
    nb.cells.append(nbf.v4.new_code_cell("display(Markdown(Co.bump_summary(res.table)))"))
    nb.cells[-1].metadata["tags"] = ["remove-input"]
    assert chapter_violations(nb) == []


def test_the_chapter_check_fails_on_a_loop_and_the_other_forbidden_code():
    loop = chapter_violations(_chapter("for r in runs:\n    print(r)"))
    assert len(loop) == 1 and "a loop" in loop[0]
    assert "a comprehension" in " ".join(chapter_violations(_chapter("x = [prof.run(r) for r in runs]")))
    assert "a def" in " ".join(chapter_violations(_chapter("def f():\n    return 1")))
    assert "private attribute _fmt" in " ".join(chapter_violations(_chapter("D._fmt(1)")))
    assert "typed-in number 0.3" in " ".join(chapter_violations(_chapter("heads[heads.prefix >= 0.3]")))
    assert "threshold" in " ".join(chapter_violations(_chapter()) + chapter_violations(
        nbf.v4.new_notebook(cells=[nbf.v4.new_code_cell("prefix_threshold = 0.3", metadata={"tags": ["parameters"]})])))
    assert "lines of code" in " ".join(chapter_violations(_chapter("\n".join(f"x{i} = {i}" for i in range(9)))))
    assert "remove-input" in " ".join(chapter_violations(_chapter("display(Markdown(text))")))
    assert "a branch" in " ".join(chapter_violations(_chapter("if res.found:\n    say(text)")))
    assert "a comparison" in " ".join(chapter_violations(_chapter("x = res.table[res.table.layers >= 2]")))


def test_runs_train_longest_first(monkeypatch):
    """book.train hands the runs to the workers in decreasing training FLOPs (longest first), so
    the two workers finish close together; FLOPs grow with depth, width and tokens."""
    prof = load_profile("laptop")
    names = ["attn1", "attn2_wide", "attn2", "attn3"]
    monkeypatch.setattr(pipeline, "missing_runs", lambda profile, n=None: list(names))
    started = []
    monkeypatch.setattr(pipeline, "_train_one", lambda a: (started.append(a[2]), (a[2], 0.0, ""))[1])
    book.train(prof, names, jobs=1, log=lambda *_: None)
    flops = {n: prof.run_config(n).training_flops() for n in names}
    assert started == sorted(names, key=lambda n: -flops[n])
    assert flops["attn2"] > flops["attn3"]  # the 2-layer model trains six times as many tokens
    assert prof.run_config("attn3").flops_per_token() > prof.run_config("attn2").flops_per_token() \
        > prof.run_config("attn1").flops_per_token()
    assert prof.run_config("attn2_wide").flops_per_token() > prof.run_config("attn2").flops_per_token()


# --- the command line: a bad name is one line and exit status 2 ---------------------------------

def test_cli_bad_profile_chapter_or_field_is_one_line_and_exit_2(tmp_path, capsys):
    assert book.main is cli.main and book.build is cli.build  # binder/prepare_chapters.py calls book.main
    assert cli.main(["build", "--profile", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown profile 'nosuch'" in err[0]
    assert cli.main(["execute", "--profile", "smoke", "--chapter", "99_nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'99_nosuch' matches no chapter" in err[0]
    (tmp_path / "bad.yaml").write_text("profile: bad\ndefaults: {train: {nosuch_field: 1}}\nruns: {r: {}}\n")
    assert cli.main(["train", "--profile", "bad", "--profiles-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch_field" in err[0]


def test_python_m_icl_core_book_with_a_bad_profile_prints_no_traceback():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "icl_core.book", "build", "--profile", "nosuch"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert "unknown profile 'nosuch'" in r.stderr

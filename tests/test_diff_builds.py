"""tests/diff_builds.py: two builds whose outputs differ only in timings agree; any other change
of a computed number is reported."""
from __future__ import annotations

from pathlib import Path

import nbformat as nbf

from tests.diff_builds import diff_builds, main, output_lines


def _executed(folder: Path, name: str, text: str, html: str = "<p>ok</p>"):
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbf.v4.new_notebook()
    cell = nbf.v4.new_code_cell("print(...)")
    cell.outputs = [
        nbf.v4.new_output("stream", name="stdout", text=text),
        nbf.v4.new_output("display_data", data={"text/markdown": text, "text/html": html,
                                                 "image/png": "iVBORw0KGgo="}),
    ]
    nb.cells = [nbf.v4.new_markdown_cell("# x"), cell]
    nbf.write(nb, folder / f"{name}.ipynb")


def test_timings_and_images_are_ignored(tmp_path):
    _executed(tmp_path / "a", "01", "ICL -0.41 at 3.2M tokens (took 12.5 s, 3 minutes)",
              '<img src="data:image/png;base64,AAAA"/><b>0.41</b>')
    _executed(tmp_path / "b", "01", "ICL -0.41 at 3.2M tokens (took 9.0 s, 4 minutes)",
              '<img src="data:image/png;base64,BBBB"/><b>0.41</b>')
    assert diff_builds(tmp_path / "a", tmp_path / "b") == {}
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "<time>" in "\n".join(output_lines(tmp_path / "a" / "01.ipynb"))


def test_a_changed_number_is_reported(tmp_path, capsys):
    _executed(tmp_path / "a", "01", "ICL -0.41 at 3.2M tokens")
    _executed(tmp_path / "b", "01", "ICL -0.42 at 3.2M tokens")
    diffs = diff_builds(tmp_path / "a", tmp_path / "b")
    assert list(diffs) == ["01.ipynb"]
    assert any(line.startswith("+") and "-0.42" in line for line in diffs["01.ipynb"])
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "1 of 1 notebooks differ" in capsys.readouterr().out


def test_numbers_mode_ignores_rewording_but_not_numbers(tmp_path):
    _executed(tmp_path / "a", "01", "The ICL score is -0.41.")
    _executed(tmp_path / "b", "01", "ICL score: −0.41")
    _executed(tmp_path / "c", "01", "ICL score: -0.40")
    assert diff_builds(tmp_path / "a", tmp_path / "b") != {}
    assert diff_builds(tmp_path / "a", tmp_path / "b", numbers_only=True) == {}
    assert diff_builds(tmp_path / "a", tmp_path / "c", numbers_only=True) != {}


def test_a_missing_chapter_is_reported(tmp_path):
    _executed(tmp_path / "a", "01", "x")
    _executed(tmp_path / "a", "02", "y")
    _executed(tmp_path / "b", "01", "x")
    assert diff_builds(tmp_path / "a", tmp_path / "b") == {"02.ipynb": ["only in before"]}
    assert main([str(tmp_path / "a"), str(tmp_path / "nosuch")]) == 2


def test_unordered_mode_ignores_moved_outputs_only(tmp_path):
    for name, texts in (("a", ["x = 1", "y = 2"]), ("b", ["y = 2", "x = 1"]), ("c", ["y = 2", "x = 3"])):
        folder = tmp_path / name
        folder.mkdir()
        nb = nbf.v4.new_notebook()
        nb.cells = [nbf.v4.new_code_cell("")]
        nb.cells[0].outputs = [nbf.v4.new_output("stream", name="stdout", text=t) for t in texts]
        nbf.write(nb, folder / "01.ipynb")
    assert diff_builds(tmp_path / "a", tmp_path / "b") != {}
    assert diff_builds(tmp_path / "a", tmp_path / "b", unordered=True) == {}
    assert diff_builds(tmp_path / "a", tmp_path / "c", unordered=True) != {}


def test_pandas_styler_uuids_are_ignored(tmp_path):
    _executed(tmp_path / "a", "01", "x", html='<style>#T_1a2b3_row0_col0 {}</style><table id="T_1a2b3"><td>0.41</td>')
    _executed(tmp_path / "b", "01", "x", html='<style>#T_9f8e7_row0_col0 {}</style><table id="T_9f8e7"><td>0.41</td>')
    _executed(tmp_path / "c", "01", "x", html='<style>#T_9f8e7_row0_col0 {}</style><table id="T_9f8e7"><td>0.42</td>')
    assert diff_builds(tmp_path / "a", tmp_path / "b") == {}
    assert diff_builds(tmp_path / "a", tmp_path / "c") != {}


def test_figure_sizes_can_be_ignored_but_not_the_number_of_axes(tmp_path):
    for name, fig in (("a", "<Figure size 1296x261 with 4 Axes>"), ("b", "<Figure size 828x522 with 4 Axes>"),
                      ("c", "<Figure size 828x522 with 3 Axes>")):
        folder = tmp_path / name
        folder.mkdir()
        nb = nbf.v4.new_notebook()
        nb.cells = [nbf.v4.new_code_cell("")]
        nb.cells[0].outputs = [nbf.v4.new_output("display_data", data={"text/plain": fig, "image/png": "AAAA"})]
        nbf.write(nb, folder / "01.ipynb")
    assert diff_builds(tmp_path / "a", tmp_path / "b") != {}
    assert diff_builds(tmp_path / "a", tmp_path / "b", ignore_figure_size=True) == {}
    assert diff_builds(tmp_path / "a", tmp_path / "c", ignore_figure_size=True) != {}

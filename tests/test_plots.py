"""Figures stay readable at the page's width, and token labels never draw as blanks."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from icl_core.curves import Window  # noqa: E402
from icl_core.plots.common import visible_token  # noqa: E402
from icl_core.plots.mechanism import plot_circuit_timing, plot_token_circuit  # noqa: E402

PAGE_PX = 1000  # a little more than the book's content column


def _timing_data(n_models: int):
    t = np.geomspace(1e3, 1e6, 8)
    scores, circuits = {}, {}
    for i in range(n_models):
        head = np.zeros((8, 2, 2))
        scores[f"m{i}"] = {"window": Window(1e4, 1e5, 3e4, True), "tokens": t, "prefix": head + 0.5,
                           "ov_eigen": head, "k_comp": head}
        circuits[f"m{i}"] = {"induction_head": (1, 0), "prev_head": (0, 1) if i else None, "tokens": t,
                             "ov_copy": np.linspace(0, 1, 8), "k_diag": np.linspace(0, 1, 8)}
    return scores, circuits


def test_the_circuit_timing_figure_wraps_into_a_grid_that_fits_the_page():
    for n in (1, 2, 5):
        fig = plot_circuit_timing(*_timing_data(n), title="t")
        width, height = fig.get_size_inches() * fig.dpi
        assert width <= PAGE_PX, f"{n} models: {width:.0f} px wide"
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert len(visible) == n
        assert len(fig.legends) == 1  # one legend for all panels, outside them
    assert plot_circuit_timing({}, {}) is None


def test_whitespace_tokens_are_drawn_visibly():
    assert visible_token(" the") == "␣the"
    assert visible_token("\n\n") == "⏎⏎" and visible_token("\t") == "⇥"
    assert visible_token("a\x00") == "a\\x00"
    fig = plot_token_circuit(np.eye(3), [" ", "\n", "x"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["␣", "⏎", "x"] and all(label.strip() for label in labels)

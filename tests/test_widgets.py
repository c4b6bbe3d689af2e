"""icl_core.widgets: selectors jslink-ed to Stacks of precomputed images (no Python callbacks)."""
from __future__ import annotations

import ipywidgets as W
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from ipywidgets.widgets.widget_link import Link  # noqa: E402

from icl_core import widgets  # noqa: E402

PNG = widgets.to_png(plt.figure(figsize=(1, 1)))


def _all(w):
    yield w
    for c in getattr(w, "children", ()):
        yield from _all(c)


def test_png_of_figure_closes_it():
    fig = plt.figure(figsize=(1, 1))
    png = widgets.to_png(fig)
    assert png.startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_grid_selector_nests_stacks_linked_to_dropdowns():
    before = set(W.Widget.widgets)
    images = {(l, h, s): PNG for s in (0, 10, 20) for l in range(2) for h in range(3)}
    box = widgets.image_grid_selector(images, ("layer", "head", "checkpoint"),
                                      labels={"checkpoint": {0: "start", 20: "end"}}, initial=(1, 2, 20))
    parts = list(_all(box))
    dropdowns = [w for w in parts if isinstance(w, W.Dropdown)]
    stacks = [w for w in parts if isinstance(w, W.Stack)]
    imgs = [w for w in parts if isinstance(w, W.Image)]
    assert [d.description for d in dropdowns] == ["layer", "head", "checkpoint"]
    assert [o[0] for o in dropdowns[2].options] == ["start", "10", "end"]
    assert [d.index for d in dropdowns] == [1, 2, 2]
    assert len(stacks) == 1 + 2 + 2 * 3 and len(imgs) == 18
    links = [W.Widget.widgets[k] for k in set(W.Widget.widgets) - before
             if isinstance(W.Widget.widgets[k], Link)]
    assert len(links) == len(stacks)  # every Stack follows a selector in the browser
    for link in links:
        assert link.source[1] == "index" and link.target[1] == "selected_index"
    assert "icl-image-selector" in box._dom_classes


def test_missing_combinations_and_bad_keys():
    box = widgets.image_grid_selector({(0, 0): PNG, (1, 1): PNG}, ("a", "b"))
    assert any(isinstance(w, W.HTML) and "no image" in w.value for w in _all(box))
    with pytest.raises(ValueError):
        widgets.image_grid_selector({(0,): PNG}, ("a", "b"))
    with pytest.raises(ValueError):
        widgets.image_grid_selector({}, ("a",))
    one = widgets.image_selector({"x": PNG, "y": PNG}, name="pick")
    assert [w.description for w in _all(one) if isinstance(w, W.Dropdown)] == ["pick"]

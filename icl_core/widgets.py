"""Widgets that work in the static site, with no kernel behind them.

Every image is computed when the chapter is executed. Selectors (``Dropdown``) are ``jslink``-ed to
``Stack`` widgets, so choosing a value only changes which precomputed image the browser shows: no
Python callback, nothing to recompute. The widget state (including the PNG bytes) is saved in the
executed notebook and embedded in the page by Jupyter Book; the page loads the ipywidgets
html-manager from the site's own copy (``_config.yml``, ``icl_core.book.VENDOR``).

    image_selector({"step 0": fig0, "step 100": fig1}, name="checkpoint")
    image_grid_selector({(layer, head, step): fig, ...}, names=("layer", "head", "checkpoint"))

Keep the number of images modest (each is a PNG inside the page): tens, not thousands.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Sequence

import ipywidgets as W

__all__ = ["to_png", "image_widget", "image_selector", "image_grid_selector"]


def to_png(img, dpi: int | None = None) -> bytes:
    """PNG bytes of a matplotlib Figure (closed afterwards), a PIL image or PNG bytes."""
    if isinstance(img, (bytes, bytearray)):
        return bytes(img)
    if hasattr(img, "savefig"):  # matplotlib Figure
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        img.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(img)
        return buf.getvalue()
    if hasattr(img, "save"):  # PIL image
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot make a PNG from {type(img).__name__}")


def image_widget(img, width: str | None = None) -> W.Image:
    layout = W.Layout(width=width) if width else W.Layout()
    return W.Image(value=to_png(img), format="png", layout=layout)


def _fmt(v) -> str:
    return str(v)


def image_grid_selector(images: dict[tuple, object], names: Sequence[str],
                        labels: dict[str, dict | Callable[[Hashable], str]] | None = None,
                        initial: tuple | None = None, width: str | None = None,
                        title: str | None = None) -> W.VBox:
    """A view of images indexed by several values, one ``Dropdown`` per dimension.

    ``images`` maps a tuple (one value per name) to a Figure/PIL image/PNG bytes. Values of each
    dimension are shown in order of first appearance; ``labels[name]`` (a {value: label} dict or a
    function) names them in the selector.
    Missing combinations show a short note. Implementation: nested ``Stack`` widgets, one level per
    dimension; every Stack of level i has its ``selected_index`` jslink-ed to the i-th selector.
    """
    names = list(names)
    if not images:
        raise ValueError("image_grid_selector needs at least one image")
    for k in images:
        if not isinstance(k, tuple) or len(k) != len(names):
            raise ValueError(f"key {k!r} is not a tuple of {len(names)} values ({', '.join(names)})")
    labels = labels or {}
    values: list[list] = [[] for _ in names]
    for k in images:
        for i, v in enumerate(k):
            if v not in values[i]:
                values[i].append(v)
    start = [0] * len(names)
    if initial is not None:
        start = [values[i].index(v) for i, v in enumerate(initial)]
    stacks: list[list[W.Stack]] = [[] for _ in names]

    def build(prefix: tuple, level: int) -> W.Widget:
        if level == len(names):
            if prefix in images:
                return image_widget(images[prefix], width)
            return W.HTML(f"<em>no image for {dict(zip(names, prefix))}</em>")
        children = [build(prefix + (v,), level + 1) for v in values[level]]
        st = W.Stack(children=children, selected_index=start[level])
        stacks[level].append(st)
        return st

    view = build((), 0)
    selectors = []
    for i, name in enumerate(names):
        fmt = labels.get(name, _fmt)
        if isinstance(fmt, dict):
            fmt = (lambda d: lambda v: str(d.get(v, v)))(fmt)
        sel = W.Dropdown(options=[(fmt(v), j) for j, v in enumerate(values[i])], value=start[i],
                         description=name, style={"description_width": "initial"},
                         layout=W.Layout(width="max-content"))
        for st in stacks[i]:
            W.jslink((sel, "index"), (st, "selected_index"))
        selectors.append(sel)
    parts = []
    if title:
        parts.append(W.HTML(f"<b>{title}</b>"))
    parts += [W.HBox(selectors, layout=W.Layout(flex_flow="row wrap", gap="0.5em")), view]
    box = W.VBox(parts)
    box.add_class("icl-image-selector")
    return box


def image_selector(images: dict[Hashable, object], name: str = "show", width: str | None = None,
                   title: str | None = None) -> W.VBox:
    """One ``Dropdown`` choosing among {label: image}; see :func:`image_grid_selector`."""
    return image_grid_selector({(k,): v for k, v in images.items()}, [name], width=width, title=title)

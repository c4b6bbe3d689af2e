"""The head explorer of chapter 5: every head's attention on repeated random tokens, at a few
snapshots, as a static widget (:func:`head_explorer`) whose images are computed at build time."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import analysis as A
from . import metrics as M
from .heads import top_heads
from .runs import Run


@torch.no_grad()
def head_explorer_data(run: Run, n_snapshots: int = 4, seq_index: int = 0) -> dict:
    """For ``n_snapshots`` snapshots: attention patterns on one repeated random sequence
    (L, H, T, T) and per-head prefix, previous-token (logged in training), OV-eigenvalue and
    K-composition scores. Computed from weights and one forward pass per snapshot."""
    steps = A.select_steps(run, n_snapshots)
    df = run.metrics().set_index("step")
    rep = run.eval_data.rep[seq_index:seq_index + 1]
    out = {}
    for s in steps:
        m = run.load(s)
        pat = next(M.attention_patterns(m, rep))[1][0].numpy()
        prev = torch.tensor(df.loc[s, "prev_token"], dtype=torch.float32)
        out[s] = {"pattern": pat, "prefix": np.asarray(df.loc[s, "prefix"]), "prev_token": prev.numpy(),
                  "ov_eigen": M.ov_eigen_copying_scores(m).numpy(), "k_comp": M.k_composition_traces(m, prev).numpy(),
                  "tokens": run.tokens(s)}
    return {"steps": steps, "snapshots": out, "seq_len": run.config.data.prefix_seq_len}


def head_explorer_images(runs: dict[str, Run], n_snapshots: int = 4, size: float = 3.0,
                         dpi: int = 64) -> tuple[dict, dict]:
    """Images {(model, snapshot number, layer, head): Figure} for
    :func:`icl_core.widgets.image_grid_selector`, and the labels of the snapshot numbers."""
    from .plots.intro import plot_attention_pattern

    images = {}
    for name, run in runs.items():
        d = head_explorer_data(run, n_snapshots)
        for i, s in enumerate(d["steps"]):
            e = d["snapshots"][s]
            n_layers, n_heads = e["pattern"].shape[:2]
            for l in range(n_layers):
                for h in range(n_heads):
                    kc = e["k_comp"][l, h]
                    title = (f"{name} L{l}H{h}, step {s} ({e['tokens']:,} tok)\n"
                             f"prefix {e['prefix'][l, h]:.2f} · prev {e['prev_token'][l, h]:.2f} · "
                             f"OV {e['ov_eigen'][l, h]:+.2f} · K-comp " + ("—" if not np.isfinite(kc) else f"{kc:+.2f}"))
                    fig = plot_attention_pattern(e["pattern"][l, h], d["seq_len"], title=title, size=size)
                    fig.axes[0].title.set_fontsize(7.5)
                    fig.set_dpi(dpi)  # small PNGs: the page embeds every image
                    images[(name, i, l, h)] = fig
    n = max(i for (_, i, _, _) in images) + 1
    labels = {i: f"#{i + 1} of {n}" + (" (first)" if i == 0 else " (last)" if i == n - 1 else "") for i in range(n)}
    return images, labels


@dataclass
class Explorer:
    widget: object
    models: list[str]
    n_images: int
    n_snapshots: int
    seconds: float


def head_explorer(m, runs: list[str] | None = None, n_snapshots: int = 4) -> Explorer:
    """The static head explorer (:func:`head_explorer_images`) of ``runs`` (default: every model),
    opening on the first model's top induction head at its last snapshot."""
    from . import widgets as W

    t0 = time.time()
    models = {name: m.models[name] for name in (runs or m.models)}
    images, labels = head_explorer_images(models, n_snapshots)
    seconds = time.time() - t0
    first = next(iter(models))
    (l0, h0), _ = top_heads(m.scores[first]["prefix"][-1], m.scores[first]["prev_token"][-1])
    widget = W.image_grid_selector(images, names=("model", "snapshot", "layer", "head"), labels={"snapshot": labels},
                                   initial=(first, max(labels), l0, h0))
    return Explorer(widget, list(models), len(images), n_snapshots, seconds)

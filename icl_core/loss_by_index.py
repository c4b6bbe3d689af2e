"""Loss by context index over training (Argument 1): the paper's heatmaps.

The mean per-token loss at every context index for every snapshot (:func:`loss_by_index`, from
the cached per-token losses of :func:`icl_core.analysis.snapshot_losses`), its derivative with
respect to ln(index) (:func:`icl_core.curves.dloss_dlnindex`), and how the late-index slope changes
across the phase-change window. Figure: :func:`icl_core.plots.cooccurrence.plot_loss_index_heatmaps`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import analysis as A
from .corpus_mix import bos_artefact, bos_text
from .curves import Window, dloss_dlnindex
from .prose import fmt_tokens
from .runs import Run


def loss_by_index(run: Run, steps: list[int] | None = None, n_examples: int | None = None) -> dict:
    """Mean per-token loss over the eval set at each snapshot and context index.

    Returns tokens (S,), index (T-1,) 1-based text-token indices, loss (S, T-1), and the seconds
    the cached per-token losses took to compute."""
    res = A.snapshot_losses(run, n_examples, steps)
    loss = res["losses"].mean(1).numpy()
    return {"tokens": res["tokens"].numpy().astype(np.float64), "index": np.arange(1, loss.shape[1] + 1),
            "loss": loss, "seconds": float(res["seconds"])}


def late_index_slope(heat: dict, step_index: int, late_from: float = 0.25) -> float:
    """Mean ∂loss/∂ln(index) over indices ≥ ``late_from`` × context at one snapshot (nats per e-fold):
    about 0 when the loss has stopped improving with more context, negative when it keeps improving."""
    c, d = dloss_dlnindex(heat["index"], heat["loss"][step_index:step_index + 1])
    m = c >= late_from * (heat["index"][-1] + 1)
    return float(d[0, m].mean())


def heatmap_summary(heat: dict, window: Window) -> dict:
    """Late-index loss slope at the snapshots just before and just after the window."""
    t = heat["tokens"]
    if not window.found:
        return {"found": False}
    i0 = int(np.nonzero(t <= window.start)[0][-1]) if (t <= window.start).any() else 0
    i1 = int(np.nonzero(t >= window.end)[0][0]) if (t >= window.end).any() else len(t) - 1
    return {"found": True, "before_tokens": float(t[i0]), "after_tokens": float(t[i1]),
            "slope_before": late_index_slope(heat, i0), "slope_after": late_index_slope(heat, i1),
            "slope_final": late_index_slope(heat, len(t) - 1)}


def heatmap_data(models: dict[str, list[Run]], steps_n: int | None = None,
                 n_examples: int | None = None) -> dict:
    """{label: loss_by_index(...) + centres, dloss} for the first run of each model."""
    out = {}
    for k, rs in models.items():
        h = loss_by_index(rs[0], A.select_steps(rs[0], steps_n), n_examples)
        h["centres"], h["dloss"] = dloss_dlnindex(h["index"], h["loss"])
        out[k] = h
    return out


def heatmap_sentence(heats: dict, windows: dict) -> str:
    """What the heatmaps show, per model: late-index ∂loss/∂ln(index) before vs after the window."""
    parts = []
    for k, h in heats.items():
        s = heatmap_summary(h, windows[k])
        if not s["found"]:
            parts.append(f"- **{k}**: no ICL window; at the last snapshot the late-index slope is "
                         f"{late_index_slope(h, len(h['tokens']) - 1):+.3f} nats per e-fold of context.")
            continue
        parts.append(f"- **{k}**: late-index slope {s['slope_before']:+.3f} nats per e-fold of context "
                     f"before the window ({fmt_tokens(s['before_tokens'])} tokens), {s['slope_after']:+.3f} "
                     f"after it ({fmt_tokens(s['after_tokens'])} tokens), {s['slope_final']:+.3f} at the end"
                     + (" — late tokens improve more after the window." if s["slope_after"] < s["slope_before"]
                        else " — late tokens do not improve more after the window."))
    return "\n".join(parts)


@dataclass
class Heatmaps:
    """Loss by context index over training, for the first run of each model (:func:`heatmaps`)."""
    data: dict  # {label: loss_by_index(...) + centres, dloss}
    n_steps: int | None
    seconds: float  # wall time of heatmaps()


def heatmaps(res, n_steps: int | None = None, n_examples: int | None = None) -> Heatmaps:
    """:func:`heatmap_data` of the models of ``res`` (a :class:`icl_core.cooccurrence.Cooccurrence`) at ``n_steps`` snapshots spread in log tokens."""
    t0 = time.time()
    data = heatmap_data(res.models, n_steps, n_examples)
    return Heatmaps(data, n_steps, time.time() - t0)


def heatmaps_summary(h: Heatmaps, windows: dict) -> str:
    """The late-index slopes before and after each model's window (:func:`heatmap_sentence`)."""
    return (f"Late-index slope: the mean ∂loss/∂ln(index) over indices beyond a quarter of the context (more negative = "
            f"late tokens still improving), for the first run of each model; {h.n_steps} snapshots spread in log tokens "
            f"(per-token losses: {sum(x['seconds'] for x in h.data.values()):.0f} s to read those kept in training or compute and cache the rest, "
            f"this cell {h.seconds:.0f} s).\n\n" + heatmap_sentence(h.data, windows))


def bos_summary(h: Heatmaps, res) -> str:
    """The BOS artefact of the heatmaps' first column (:func:`icl_core.corpus_mix.bos_text`), measured
    at the last snapshot of each model shown (``res``: the chapter's :class:`~icl_core.cooccurrence.Cooccurrence`)."""
    vocab = next(iter(res.runs.values())).corpus.vocab_size
    return bos_text(bos_artefact([d["loss"][-1] for d in h.data.values()], vocab))

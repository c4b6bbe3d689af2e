"""Which heads are induction heads, and when a run's phase change happens: the one home of both.

Every chapter and argument module classifies heads and finds phase-change windows through this
module, and the chapters' prose quotes its constants:

* :data:`INDUCTION_THRESHOLD`, :data:`PREV_TOKEN_THRESHOLD`: *[book choice]* a head is an
  induction head when its prefix-matching score is at least 0.3, a previous-token head when its
  previous-token score is (the paper names heads by these scores without a cut-off).
* :func:`classify_heads` / :func:`head_labels`: 'induction' / 'previous-token' / 'other' per head,
  as an ``[n_layers, n_heads]`` array.
* :func:`top_induction_head`, :func:`top_heads`, :func:`circuit_heads`: the heads the chapters
  follow (the highest prefix-matching score; its previous-token partner in an earlier layer).
* :func:`phase_change_window`: a run's phase-change window, found by
  :func:`icl_core.curves.phase_change_window` on its banded ICL curve (:func:`icl_curve`).
"""
from __future__ import annotations

import numpy as np
import torch

from .curves import Window
from .curves import phase_change_window as curve_window

#: [book choice] a head with prefix-matching score >= this is an induction head.
INDUCTION_THRESHOLD = 0.3
#: [book choice] a head with previous-token score >= this is a previous-token head.
PREV_TOKEN_THRESHOLD = 0.3


def classify_heads(prefix: torch.Tensor, prev: torch.Tensor, prefix_threshold: float = INDUCTION_THRESHOLD,
                   prev_threshold: float = PREV_TOKEN_THRESHOLD) -> np.ndarray:
    """Label each head ``[n_layers, n_heads]`` 'induction' (prefix >= ``prefix_threshold``),
    'previous-token' (previous-token score >= ``prev_threshold``) or 'other'; induction wins."""
    labels = np.full(tuple(prefix.shape), "other", dtype=object)
    labels[np.asarray(prev) >= prev_threshold] = "previous-token"
    labels[np.asarray(prefix) >= prefix_threshold] = "induction"
    return labels


def final_head_scores(run) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix, prev_token), each ``[n_layers, n_heads]``, at the last snapshot (from the cheap
    metrics of the training log)."""
    df = run.metrics()
    return (torch.tensor(df["prefix"].iloc[-1], dtype=torch.float32),
            torch.tensor(df["prev_token"].iloc[-1], dtype=torch.float32))


def head_labels(run, prefix_threshold: float = INDUCTION_THRESHOLD,
                prev_threshold: float = PREV_TOKEN_THRESHOLD) -> np.ndarray:
    """:func:`classify_heads` of a run's heads at its last snapshot."""
    prefix, prev = final_head_scores(run)
    return classify_heads(prefix, prev, prefix_threshold, prev_threshold)


def top_head(scores) -> tuple[int, int]:
    """(layer, head) of the highest of ``scores`` ``[n_layers, n_heads]``."""
    s = np.asarray(scores, dtype=float)
    layer, head = np.unravel_index(int(s.argmax()), s.shape)
    return int(layer), int(head)


def top_induction_head(run, step: int | None = None) -> tuple[int, int, float]:
    """(layer, head, prefix score) of the head with the highest prefix-matching score at ``step``
    (default: the last snapshot), from the scores logged during training."""
    df = run.metrics()
    row = df.iloc[-1] if step is None else df[df.step == step].iloc[0]
    prefix = np.asarray(row["prefix"], dtype=float)
    layer, head = top_head(prefix)
    return layer, head, float(prefix[layer, head])


def top_heads(prefix, prev) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(induction head, previous-token head): the highest prefix score, and the highest
    previous-token score among heads of earlier layers (None for an induction head in layer 0)."""
    layer, head = top_head(prefix)
    if layer == 0:
        return (layer, head), None
    return (layer, head), top_head(np.asarray(prev, dtype=float)[:layer])


def circuit_heads(prefix, prev) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The two-head circuit's candidates in a model with >= 2 layers: the head of layers >= 1 with
    the highest prefix score, and the head of an earlier layer with the highest previous-token
    score (None for a one-layer model)."""
    masked = np.asarray(prefix, dtype=float).copy()
    if masked.shape[0] < 2:
        return None
    masked[0] = -np.inf
    return top_heads(masked, prev)  # type: ignore[return-value]


def icl_curve(run) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, ICL score) per snapshot from the cheap metrics logged in training (the book's
    banded estimate, see :meth:`icl_core.runs.Run.metrics`)."""
    df = run.metrics()
    return df["tokens"].to_numpy(), df["icl"].to_numpy()


def phase_change_window(run, require_induction_head: bool = False,
                        prefix_threshold: float = INDUCTION_THRESHOLD, **kw) -> Window:
    """The run's phase-change window, detected from its banded ICL curve
    (:func:`icl_core.curves.phase_change_window`, whose keywords ``kw`` are).

    With ``require_induction_head`` *[book choice of Argument 2]* an ICL window counts only if the
    run forms an induction head (its top prefix-matching score reaches ``prefix_threshold``); an ICL
    drop without one (e.g. from in-context token statistics) is reported as no window."""
    tokens, icl = icl_curve(run)
    window = curve_window(tokens, icl, **kw)
    if require_induction_head and window.found and float(run.metrics()["prefix_max"].max()) < prefix_threshold:
        return Window(float("nan"), float("nan"), float("nan"), False,
                        f"an ICL window without an induction head (top prefix score < {prefix_threshold})")
    return window


def is_control(n_layers: int, smeared_keys: bool, final_prefix: float,
               prefix_threshold: float = INDUCTION_THRESHOLD) -> bool:
    """A control of Argument 1: a vanilla (no smeared keys) run without an induction head (top
    prefix-matching score below ``prefix_threshold``). A smeared 1-layer run that forms an induction
    head is a model under test, not a control; a 1-layer vanilla run is the paper's control."""
    return n_layers == 1 and not smeared_keys and float(final_prefix) < prefix_threshold

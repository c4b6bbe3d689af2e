"""Chapter 1's repeated passage (chapters/01_cooccurrence): a real passage shown twice, its per-token
loss before and after the phase change.

The passage is the first half of an evaluation window, repeated (:func:`repeated_passage`); its
per-token losses at every snapshot are cached in the run (:func:`passage_losses`);
:func:`passage_change` takes the change across a window and picks a helped and a hurt token by
rule; :func:`passage` applies it to the chapter's showcase run (:func:`icl_core.cooccurrence.showcase_run`)
and :func:`passage_summary` says what it shows. The figures: :mod:`icl_core.plots.cooccurrence`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import analysis as A
from . import metrics as M
from .config import icl_indices
from .cooccurrence import showcase_run
from .curves import Window
from .prose import fmt_tokens
from .runs import Run
from .verdicts import REPEAT_GAIN_MIN

if TYPE_CHECKING:
    from .cooccurrence import Cooccurrence


def repeated_passage(run: Run, example: int = 0) -> torch.Tensor:
    """(1, T): BOS, then the first ⌊(n_ctx−1)/2⌋ text tokens of eval window ``example``, twice."""
    x = run.eval_data.tokens[example]
    half = (len(x) - 1) // 2
    p = x[1:1 + half]
    return torch.cat([x[:1], p, p])[None]


def passage_losses(run: Run, example: int = 0) -> dict:
    """Per-token loss on :func:`repeated_passage` at every snapshot (cached): losses (S, T-1)."""
    x = repeated_passage(run, example)

    def compute():
        out = torch.stack([M.per_token_losses(run.load(s), x)[0] for s in run.steps])
        return {"losses": out, "steps": torch.tensor(run.steps), "passage": x[0]}

    res = A.cached(run, "passage_losses", {"example": example, "steps": run.steps}, compute)
    res["tokens"] = res["steps"] * run.config.tokens_per_step
    return res


def passage_change(run: Run, window: Window, example: int = 0) -> dict:
    """Per-token loss change on the repeated passage from the snapshot at the window's start to the
    one at its end, and two tokens chosen by rule:

    - *helped*: in the second copy, the token whose loss fell the most across the window;
    - *hurt*: anywhere in the passage from the early ICL index on (the first tokens have almost no
      context), the token whose loss rose the most (or, if none rose, fell the least).

    Without a window (``window.found`` False) the change is taken over the whole of training.
    """
    res = passage_losses(run, example)
    t = res["tokens"].numpy().astype(np.float64)
    losses = res["losses"].numpy()
    x = res["passage"].numpy()
    if window.found and (t <= window.start).any() and (t >= window.end).any():
        i0 = int(np.nonzero(t <= window.start)[0][-1])
        i1 = int(np.nonzero(t >= window.end)[0][0])
        span = "window"
    else:
        i0, i1 = 0, len(t) - 1
        span = "whole training"
    delta = losses[i1] - losses[i0]  # column c predicts token x[c+1]
    half = (len(x) - 1) // 2
    col = np.arange(len(delta))
    second = col >= half  # columns predicting tokens of the second copy
    helped = int(np.flatnonzero(second)[np.argmin(delta[second])])
    _, early = icl_indices(run.config.model.n_ctx)
    cand = np.flatnonzero(col >= early - 1)
    hurt = int(cand[np.argmax(delta[cand])])
    tok = run.corpus.token_str
    return {"delta": delta, "half": half, "tokens": t, "losses": losses, "i_before": i0, "i_after": i1, "span": span,
            "helped": helped, "hurt": hurt,
            "helped_token": tok(int(x[helped + 1])), "hurt_token": tok(int(x[hurt + 1])),
            "helped_context": run.corpus.decode(x[max(1, helped - 6):helped + 2]),
            "hurt_context": run.corpus.decode(x[max(1, hurt - 6):hurt + 2]),
            "mean_delta_first": float(delta[~second].mean()), "mean_delta_second": float(delta[second].mean()),
            "seconds": float(res["seconds"])}


@dataclass
class Passage:
    """The repeated passage of the chapter's showcase run (:func:`passage`)."""
    run: str
    window: Window  # the window the change is taken across
    own_window: bool  # the run's own window (else the reference window or the whole of training)
    change: dict  # passage_change(...)

    @property
    def span_label(self) -> str:
        return "ICL window" if self.change["span"] == "window" else "whole of training"

    @property
    def shaded_window(self) -> Window | None:
        """The window to shade on the token curves (None when the change spans the whole of training)."""
        return self.window if self.change["span"] == "window" else None


def passage(res: Cooccurrence, example: int = 0) -> Passage:
    """:func:`passage_change` of :func:`showcase_run` across its own window (or the reference window
    of the ≥2-layer runs when it has none)."""
    from .loss_pca import reference_window

    show = showcase_run(res.table)
    own = res.windows[show]
    win = own if own.found else reference_window(res.table)
    return Passage(show, win, win is own, passage_change(res.runs[show], win, example))


def passage_summary(p: Passage) -> str:
    """The mean loss change on each copy, and a helped and a hurt token."""
    change = p.change
    return (
        f"Run `{p.run}`, snapshots at {fmt_tokens(change['tokens'][change['i_before']])} and "
        f"{fmt_tokens(change['tokens'][change['i_after']])} tokens ("
        + ("its own ICL window" if p.own_window and change["span"] == "window" else
           "the reference window of the ≥2-layer runs" if change["span"] == "window" else "no window: first and last snapshot")
        + f"). Mean loss change: {change['mean_delta_first']:+.2f} nats on the first copy, "
        f"{change['mean_delta_second']:+.2f} on the second"
        + (f" — the repeat gains {change['mean_delta_first'] - change['mean_delta_second']:.2f} nats more, as induction predicts."
           if change['mean_delta_second'] <= change['mean_delta_first'] - REPEAT_GAIN_MIN
           else f" — the repeat does not gain at least {REPEAT_GAIN_MIN} nats more than the first copy *[book choice: threshold]*: "
                "no clear sign of induction on this passage.")
        + f" Helped token: {change['helped_token']!r} in …{change['helped_context']!r} "
        f"({change['delta'][change['helped']]:+.2f} nats); hurt token: {change['hurt_token']!r} in …{change['hurt_context']!r} "
        f"({change['delta'][change['hurt']]:+.2f} nats)."
    )

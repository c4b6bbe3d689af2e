"""Known answers for head classification and the phase-change window of a run (icl_core.heads)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from icl_core import heads

TOKENS = np.array([0, 1e3, 2e3, 4e3, 8e3, 16e3, 32e3, 64e3, 128e3])
DROP = np.array([-0.02, -0.02, -0.03, -0.05, -0.4, -0.6, -0.62, -0.63, -0.63])  # falls at 4k-16k


def fake_run(prefix_max_final: float, icl=DROP):
    """A stand-in for a Run: only ``metrics()`` is read."""
    pm = np.full(len(TOKENS), 0.03)
    pm[-1] = prefix_max_final
    prefix = [[[0.0, p]] for p in pm]  # (S, 1 layer, 2 heads)
    df = pd.DataFrame({"step": np.arange(len(TOKENS)), "tokens": TOKENS, "icl": icl, "prefix_max": pm,
                       "prefix": prefix, "prev_token": [[[0.5, 0.0]]] * len(TOKENS)})
    return SimpleNamespace(metrics=lambda: df)


def test_classify_heads_at_the_thresholds():
    prefix = torch.tensor([[heads.INDUCTION_THRESHOLD, 0.1, 0.1]])
    prev = torch.tensor([[0.9, heads.PREV_TOKEN_THRESHOLD, 0.0]])  # induction wins over previous-token
    assert heads.classify_heads(prefix, prev).tolist() == [["induction", "previous-token", "other"]]
    assert heads.classify_heads(prefix, prev, prefix_threshold=0.95).tolist() == [
        ["previous-token", "previous-token", "other"]]


def test_top_heads():
    pm = torch.tensor([[0.1, 0.0], [0.2, 0.8]])
    pt = torch.tensor([[0.1, 0.7], [0.9, 0.0]])
    assert heads.top_heads(pm, pt) == ((1, 1), (0, 1))  # the previous-token head comes from earlier layers
    assert heads.top_heads(torch.tensor([[0.9, 0.1]]), torch.tensor([[0.0, 0.5]]))[1] is None
    # the circuit skips layer 0 even when it holds the top prefix score
    assert heads.circuit_heads(torch.tensor([[0.9, 0.0], [0.2, 0.4]]), pt) == ((1, 1), (0, 1))
    assert heads.circuit_heads(torch.tensor([[0.9, 0.1]]), torch.tensor([[0.0, 0.5]])) is None


def test_top_induction_head_reads_the_logged_scores():
    run = fake_run(0.7)
    assert heads.top_induction_head(run) == (0, 1, 0.7)
    assert heads.top_induction_head(run, step=0) == (0, 1, 0.03)


def test_phase_change_window_can_require_an_induction_head():
    with_head, without = fake_run(0.7), fake_run(0.1)
    w = heads.phase_change_window(with_head, require_induction_head=True)
    assert w.found and 4e3 <= w.peak <= 16e3
    assert heads.phase_change_window(without).found  # the ICL curve alone has a window
    w = heads.phase_change_window(without, require_induction_head=True)
    assert not w.found and "without an induction head" in w.reason


def test_story_steps_add_the_window_edges(monkeypatch):
    """The intro's checkpoints: log-spaced ones miss a head that forms late in a long run."""
    from types import SimpleNamespace

    from icl_core import analysis as A
    from icl_core import curves, heads
    steps = [0, 1, 3, 10, 30, 100, 1000, 2000, 4000, 8000, 16000]
    run = SimpleNamespace(steps=steps, config=SimpleNamespace(tokens_per_step=10))
    win = curves.Window(start=20000.0, end=79000.0, peak=41000.0, found=True)
    monkeypatch.setattr(heads, "phase_change_window", lambda r: win)
    got = A.story_steps(run, 6)
    assert {0, 16000, 2000, 4000, 8000} <= set(got)  # first, last, and the snapshots nearest the window
    monkeypatch.setattr(heads, "phase_change_window", lambda r: curves.Window(start=float("nan"), end=float("nan"), peak=float("nan"), found=False, reason="none"))
    assert A.story_steps(run, 6) == A.select_steps(run, 6)

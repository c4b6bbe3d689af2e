"""Curve maths over training (no runs, no models): smoothing in log tokens, the loss bump, rise windows.

The functions the chapters apply to a run's logged curves, next to :mod:`icl_core.metrics` (which
owns the ICL score and the head scores):

* :func:`phase_change_window` (a :class:`Window`): where the ICL score falls fastest in log tokens,
  after smoothing in ln(tokens) (:func:`smooth_in_log_tokens`); a run's window is
  :func:`icl_core.heads.phase_change_window`.
* :func:`smooth_log_curve`: the same smoothing onto a log grid.
* :func:`lower_convex_envelope`, :func:`convex_gap`, :func:`loss_bump`: the paper's phase-change
  "bump", the stretch where loss vs log tokens is not convex (after :func:`initial_fall_end`).
* :func:`rise_window`: where a rising score (the top prefix-matching score) rises fastest.
* :func:`dloss_dlnindex`: the derivative of loss with respect to ln(context index).
* :func:`turn_angle`: how far a PCA path turns across a window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Window:
    start: float  # tokens
    end: float
    peak: float
    found: bool
    reason: str = ""


#: [book choice] s.d., in ln(tokens), of the Gaussian kernel that smooths a curve before
#: :func:`phase_change_window` differentiates it. The snapshots are log-spaced early and linear
#: late, so late neighbours are only ~5% apart in tokens and a snapshot-to-snapshot fluctuation of
#: the ICL score (~0.04 nats at a constant learning rate) becomes a steep "drop" there. On a
#: synthetic sigmoid in ln(tokens) with that noise, on the laptop's snapshot grid, the window
#: contains the true midpoint in 95-99% of draws with this kernel, 67-73% with the earlier
#: 3-snapshot moving average (tests/test_metrics.py).
WINDOW_SMOOTH_WIDTH = 0.1


def smooth_in_log_tokens(tokens: np.ndarray, values: np.ndarray, width: float = WINDOW_SMOOTH_WIDTH,
                         at: np.ndarray | None = None) -> np.ndarray:
    """Gaussian-kernel average of ``values`` at each of ``tokens`` (> 0), or at the token counts
    ``at``, kernel s.d. ``width`` in ln(tokens): as much smoothing where snapshots are dense as
    where they are sparse."""
    lt = np.log(np.asarray(tokens, dtype=np.float64))
    g = lt if at is None else np.log(np.asarray(at, dtype=np.float64))
    w = np.exp(-0.5 * ((g[:, None] - lt[None, :]) / width) ** 2)
    return (w @ np.asarray(values, dtype=np.float64)) / w.sum(1)


def phase_change_window(tokens: np.ndarray, icl: np.ndarray, frac: float = 0.3,
                        min_change: float = 0.05, width: float = WINDOW_SMOOTH_WIDTH) -> Window:
    """Phase-change window from the ICL-score curve over training.

    The curve is smoothed in ln(tokens) (:func:`smooth_in_log_tokens`, kernel s.d. ``width``; 0 =
    none); d = dICL/dlog(tokens) by finite differences; the peak is the most negative d; the window
    is the contiguous run of snapshots around the peak where -d >= ``frac`` x peak. No window is
    reported if ICL never falls by ``min_change`` nats overall (a 1-layer model, for example).
    """
    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(icl, dtype=np.float64)
    keep = t > 0
    t, y = t[keep], y[keep]
    # where the log-spaced and linear snapshot grids meet, two snapshots can be a few steps apart;
    # their tiny log-token gap would turn noise into a huge derivative: keep one of each such pair
    if len(t) > 1:
        keep = np.concatenate([[True], t[1:] / t[:-1] >= 1.02])
        t, y = t[keep], y[keep]
    if len(t) < 3:
        return Window(float("nan"), float("nan"), float("nan"), False, "fewer than 3 snapshots")
    ys = smooth_in_log_tokens(t, y, width) if width > 0 else y
    lt = np.log(t)
    d = np.diff(ys) / np.diff(lt)  # between snapshots j and j+1
    drop = y[0] - y.min()
    if drop < min_change:
        return Window(float("nan"), float("nan"), float("nan"), False,
                      f"ICL never fell by {min_change} nats (drop {drop:.3f})")
    p = int(np.argmin(d))
    peak = -d[p]
    if peak <= 0:
        return Window(float("nan"), float("nan"), float("nan"), False, "ICL never decreases")
    a = p
    while a > 0 and -d[a - 1] >= frac * peak:
        a -= 1
    b = p
    while b < len(d) - 1 and -d[b + 1] >= frac * peak:
        b += 1
    return Window(float(t[a]), float(t[b + 1]), float(np.sqrt(t[p] * t[p + 1])), True)


#: [book choice] the top prefix-matching score must rise by >= 0.1 to count as a jump.
PREFIX_MIN_RISE = 0.1
#: [book choice] loss above its convex envelope by more than this many nats is a "bump".
BUMP_TOL = 0.02


def smooth_log_curve(tokens, values, n_grid: int = 200, width: float = 0.1):
    """Gaussian smoothing in ln(tokens) (kernel s.d. ``width``) onto ``n_grid`` log-spaced points.

    Points with tokens <= 0 are dropped. Returns (grid tokens, smoothed values)."""
    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    keep = (t > 0) & np.isfinite(y)
    t, y = t[keep], y[keep]
    grid = np.exp(np.linspace(np.log(t[0]), np.log(t[-1]), n_grid))
    return grid, smooth_in_log_tokens(t, y, width, at=grid)


def lower_convex_envelope(x, y) -> np.ndarray:
    """The greatest convex function below the points (x sorted ascending), evaluated at x."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return np.interp(x, x[hull], y[hull])


def convex_gap(tokens, loss) -> np.ndarray:
    """How far the loss sits above its lower convex envelope in ln(tokens) (nats, >= 0).

    A loss curve that is convex in log tokens has gap 0 everywhere; the paper's phase-change "bump"
    (loss plateaus, then falls faster again) is a stretch with gap > 0."""
    return np.asarray(loss, dtype=np.float64) - lower_convex_envelope(np.log(tokens), loss)


@dataclass
class Bump:
    """The largest non-convex stretch of a loss curve (loss vs log tokens), after the initial fall."""
    found: bool
    start: float = float("nan")  # tokens
    end: float = float("nan")
    peak: float = float("nan")  # tokens where the gap is largest
    height: float = 0.0  # nats above the convex envelope at the peak
    n_stretches: int = 0  # separate stretches with gap > tol
    from_tokens: float = float("nan")  # where the analysis starts (end of the initial fall)
    reason: str = ""
    stretches: list = field(default_factory=list)  # [(start, end, height)]


def initial_fall_end(tokens, loss) -> int:
    """Index where the initial fall from ln(vocab) is steepest (in log tokens), among the points still
    above the midpoint between the first and the last loss. Loss vs log tokens is concave before
    this point for every model (a shoulder, not a bump), so the bump search starts here."""
    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    d = np.gradient(y, np.log(t))
    mid = y[-1] + 0.5 * (y[0] - y[-1])
    cand = np.nonzero(y >= mid)[0]
    if len(cand) == 0:
        return 0
    return int(cand[np.argmin(d[cand])])


def loss_bump(tokens, loss, tol: float = BUMP_TOL) -> Bump:
    """Find the phase-change bump: stretches after the initial fall where the loss is more than
    ``tol`` nats above its lower convex envelope in log tokens; report the highest one.

    ``tokens``/``loss`` should be a smooth curve (:func:`train_loss_curve`, or the eval loss)."""
    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    keep = t > 0
    t, y = t[keep], y[keep]
    if len(t) < 4:
        return Bump(False, reason="fewer than 4 points")
    i0 = initial_fall_end(t, y)
    t, y = t[i0:], y[i0:]
    if len(t) < 3:
        return Bump(False, from_tokens=float(t[0]), reason="the initial fall lasts the whole run")
    gap = convex_gap(t, y)
    above = gap > tol
    stretches = []
    i = 0
    while i < len(t):
        if above[i]:
            j = i
            while j + 1 < len(t) and above[j + 1]:
                j += 1
            a, b = max(i - 1, 0), min(j + 1, len(t) - 1)  # the envelope touches the curve just outside
            stretches.append((float(t[a]), float(t[b]), float(gap[i:j + 1].max()), int(i + np.argmax(gap[i:j + 1]))))
            i = j + 1
        else:
            i += 1
    if not stretches:
        return Bump(False, from_tokens=float(t[0]), height=float(gap.max()),
                    reason=f"loss is within {tol} nats of convex (largest gap {gap.max():.3f} nats)")
    best = max(stretches, key=lambda s: s[2])
    return Bump(True, best[0], best[1], float(t[best[3]]), best[2], len(stretches), float(t[0]),
                stretches=[s[:3] for s in stretches])


def rise_window(tokens, values, min_change: float = PREFIX_MIN_RISE, **kw) -> Window:
    """Where a rising curve (the top prefix-matching score) rises fastest in log tokens: the
    :func:`phase_change_window` rule applied to −values."""
    w = phase_change_window(tokens, -np.asarray(values, dtype=np.float64), min_change=min_change, **kw)
    if not w.found:
        w.reason = w.reason.replace("ICL never fell", "the score never rose").replace(
            "ICL never decreases", "the score never rises")
    return w


def dloss_dlnindex(index, loss, n_bins: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """∂loss/∂ln(index): mean loss in ``n_bins`` log-spaced index bins, finite differences over the
    log of the bin centres. loss (S, T-1) -> (centres (n_bins-1,), derivative (S, n_bins-1))."""
    idx = np.asarray(index, dtype=np.float64)
    loss = np.atleast_2d(np.asarray(loss, dtype=np.float64))
    edges = np.unique(np.round(np.geomspace(1, idx[-1] + 1, n_bins + 1)))
    cols, centres = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        m = (idx >= a) & (idx < b)
        if m.any():
            cols.append(loss[:, m].mean(1))
            centres.append(np.exp(np.log(idx[m]).mean()))
    B = np.stack(cols, 1)
    c = np.asarray(centres)
    d = np.diff(B, axis=1) / np.diff(np.log(c))[None]
    return np.sqrt(c[:-1] * c[1:]), d


def turn_angle(coords, tokens, start: float, end: float) -> float:
    """Degrees the PC1–PC2 path turns across [start, end]: the angle between its displacement across
    the window and its displacement over the same span of log tokens just before the window."""
    P = np.asarray(coords, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64)
    if not (np.isfinite(start) and np.isfinite(end)) or not (t <= start).any() or not (t >= end).any():
        return float("nan")
    i0 = int(np.nonzero(t <= start)[0][-1])
    i1 = int(np.nonzero(t >= end)[0][0])
    if t[i0] <= 0 or i1 <= i0:
        return float("nan")
    t_prev = t[i0] / (t[i1] / t[i0])
    pos = t > 0
    ip = int(np.nonzero(pos)[0][np.argmin(np.abs(np.log(t[pos]) - np.log(t_prev)))])
    if ip >= i0:
        return float("nan")
    a, b = P[i0] - P[ip], P[i1] - P[i0]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(a @ b / (na * nb), -1, 1))))


def overlaps(a0, a1, b0, b1) -> bool:
    """Do the intervals [a0, a1] and [b0, b1] (all finite) overlap?"""
    return bool(np.isfinite([a0, a1, b0, b1]).all() and a0 <= b1 and b0 <= a1)


def inside(x, a0, a1) -> bool:
    """Is x (finite) inside [a0, a1]?"""
    return bool(np.isfinite([x, a0, a1]).all() and a0 <= x <= a1)

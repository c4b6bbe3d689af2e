"""Training dynamics across runs: Argument 1 (co-occurrence) and Argument 6 (continuity across scale).

Everything here works on finished runs (:class:`icl_core.runs.Run`) and returns plain arrays,
dicts and DataFrames for :mod:`icl_core.plots.cooccurrence` and :mod:`icl_core.plots.continuity`.
The chapters' verdict sentences are generated here from the numbers, so they stay true under every
profile.

Curves
    :func:`smooth_log_curve`, :func:`train_loss_curve` (training loss, smoothed in log tokens),
    :func:`convex_gap` and :func:`loss_bump` (the non-convex stretch of loss vs log tokens),
    :func:`rise_window` (where the top prefix-matching score jumps).
Per-token losses (cached in the run folder through :func:`icl_core.analysis.snapshot_losses`)
    :func:`loss_by_index`, :func:`dloss_dlnindex`, :func:`loss_pca_paths`, :func:`turn_angle`,
    :func:`passage_losses`, :func:`passage_change`, :func:`icl_index_pairs`.
Tables and sentences
    :func:`cooccurrence_row`, :func:`cooccurrence_table`, :func:`cooccurrence_verdicts`,
    :func:`family_table`, :func:`claims_table`, :func:`scale_range`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import analysis as A
from . import metrics as M
from .config import ModelConfig, icl_indices
from .model import Transformer
from .runs import Run

#: The paper's Argument 1 numbers (../shared/PAPER.md), in the book's sign convention
#: (ICL = L(late) - L(early), negative = in-context learning).
PAPER_ICL_BEFORE = -0.15  # "ICL < 0.15 nats before" the phase change: ICL score above -0.15
PAPER_ICL_AFTER = -0.4  # "~0.4 after"
PAPER_FRAC_IN_WINDOW = 0.75  # ">= 75% of final ICL gained inside the window"
#: [book choice] a head with prefix-matching score >= 0.3 counts as an induction head (as in
#: :func:`icl_core.analysis.classify_heads`); the top score must rise by >= 0.1 to count as a jump.
INDUCTION_THRESHOLD = 0.3
PREFIX_MIN_RISE = 0.1
#: [book choice] loss above its convex envelope by more than this many nats is a "bump".
BUMP_TOL = 0.02
#: [book choice] the second copy of a repeated passage must gain this many nats more than the first
#: (mean per-token loss change across the window) to count as a sign of induction.
REPEAT_GAIN_MIN = 0.1


# --- curves over training --------------------------------------------------------------------------

def smooth_log_curve(tokens, values, n_grid: int = 200, width: float = 0.1):
    """Gaussian smoothing in ln(tokens) (kernel s.d. ``width``) onto ``n_grid`` log-spaced points.

    Points with tokens <= 0 are dropped. Returns (grid tokens, smoothed values)."""
    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    keep = (t > 0) & np.isfinite(y)
    t, y = t[keep], y[keep]
    grid = np.exp(np.linspace(np.log(t[0]), np.log(t[-1]), n_grid))
    return grid, M.smooth_in_log_tokens(t, y, width, at=grid)


def train_loss_curve(run: Run, n_grid: int = 200, width: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The run's per-step training loss, smoothed in log tokens (:func:`smooth_log_curve`)."""
    df = run.train_log()
    return smooth_log_curve(df["tokens"].to_numpy(), df["loss"].to_numpy(), n_grid, width)


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


def rise_window(tokens, values, min_change: float = PREFIX_MIN_RISE, **kw) -> M.Window:
    """Where a rising curve (the top prefix-matching score) rises fastest in log tokens: the
    :func:`metrics.phase_change_window` rule applied to −values."""
    w = M.phase_change_window(tokens, -np.asarray(values, dtype=np.float64), min_change=min_change, **kw)
    if not w.found:
        w.reason = w.reason.replace("ICL never fell", "the score never rose").replace(
            "ICL never decreases", "the score never rises")
    return w


def _overlap(a0, a1, b0, b1) -> bool:
    return bool(np.isfinite([a0, a1, b0, b1]).all() and a0 <= b1 and b0 <= a1)


def _inside(x, a0, a1) -> bool:
    return bool(np.isfinite([x, a0, a1]).all() and a0 <= x <= a1)


# --- Argument 1: the per-run table -----------------------------------------------------------------

def cooccurrence_row(run: Run, label: str | None = None, bump_tol: float = BUMP_TOL) -> dict:
    """One run's Argument-1 numbers: ICL window, ICL and top prefix score before/after it, the
    fraction of the final ICL gained inside it, where the prefix score jumps, and the loss bump
    (from the smoothed training loss and from the eval loss), each checked against the window."""
    df = run.metrics()
    t = df["tokens"].to_numpy(dtype=np.float64)
    icl = df["icl"].to_numpy()
    pm = df["prefix_max"].to_numpy()
    w = A.window(run)
    pw = rise_window(t, pm)
    tl_t, tl_y = train_loss_curve(run)
    bump = loss_bump(tl_t, tl_y, bump_tol)
    ebump = loss_bump(t, df["loss"].to_numpy(), bump_tol)
    row = {"model": label or run.name, "run": run.name, "layers": run.config.model.n_layers,
           "MLPs": not run.config.model.attn_only, "seed": run.config.train.seed,
           "tokens": int(t[-1]), "initial_icl": float(icl[0]), "final_icl": float(icl[-1]),
           "final_prefix": float(pm[-1]), "window_found": w.found, "window_reason": w.reason,
           "window_start": w.start, "window_peak": w.peak, "window_end": w.end,
           "icl_before": np.nan, "icl_after": np.nan, "frac_icl_in_window": np.nan,
           "prefix_before": np.nan, "prefix_after": np.nan,
           "prefix_jump_found": pw.found, "prefix_jump_peak": pw.peak,
           "prefix_jump_start": pw.start, "prefix_jump_end": pw.end,
           "frac_prefix_in_window": np.nan, "prefix_jump_in_window": False,
           "bump_found": bump.found, "bump_start": bump.start, "bump_end": bump.end,
           "bump_peak": bump.peak, "bump_height": bump.height, "bump_stretches": bump.n_stretches,
           "bump_in_window": False, "eval_bump_found": ebump.found, "eval_bump_start": ebump.start,
           "eval_bump_end": ebump.end, "eval_bump_height": ebump.height, "eval_bump_in_window": False}
    if w.found:
        i0 = np.nonzero(t <= w.start)[0][-1]
        i1 = np.nonzero(t >= w.end)[0][0]
        total = icl[-1] - icl[0]
        ptotal = pm.max() - pm[0]
        row.update({"icl_before": float(icl[i0]), "icl_after": float(icl[i1]),
                    "frac_icl_in_window": float((icl[i1] - icl[i0]) / total) if total else np.nan,
                    "prefix_before": float(pm[i0]), "prefix_after": float(pm[i1]),
                    "frac_prefix_in_window": float((pm[i1] - pm[i0]) / ptotal) if ptotal > 0 else np.nan,
                    "prefix_jump_in_window": pw.found and _inside(pw.peak, w.start, w.end),
                    "bump_in_window": bump.found and _overlap(bump.start, bump.end, w.start, w.end),
                    "eval_bump_in_window": ebump.found and _overlap(ebump.start, ebump.end, w.start, w.end)})
    row["induction_head"] = row["final_prefix"] >= INDUCTION_THRESHOLD
    row["verdict"] = run_verdict(row)
    return row


def run_verdict(row: dict) -> str:
    """Classify one run from its :func:`cooccurrence_row` (the rule is stated in the chapter):

    - "co-occur": an ICL window, an induction head (top prefix >= 0.3) whose score jumps inside it,
      and a loss bump overlapping it;
    - "co-occur (no bump)": the same without the loss bump;
    - "ICL window without an induction-head jump": ICL improves in a window but the top prefix score
      does not jump inside it (e.g. context-frequency effects in small models);
    - "no ICL window".
    """
    if not row["window_found"]:
        return "no ICL window"
    heads = row["prefix_jump_in_window"] and row["final_prefix"] >= INDUCTION_THRESHOLD
    if not heads:
        return "ICL window without an induction-head jump"
    return "co-occur" if row["bump_in_window"] or row["eval_bump_in_window"] else "co-occur (no bump)"


def cooccurrence_table(models: dict[str, list[Run]]) -> pd.DataFrame:
    """:func:`cooccurrence_row` for every run of every model ({label: [runs over seeds]})."""
    return pd.DataFrame([cooccurrence_row(r, label) for label, rs in models.items() for r in rs])


def _fmt_tokens(x) -> str:
    if not np.isfinite(x):
        return "—"
    for unit, f in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g}{unit}"
    return f"{x:.0f}"


def _fmt(x, spec="+.2f") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The chapter's table: one row per model and seed, next to the paper's numbers."""
    rows = []
    for r in table.to_dict("records"):
        rows.append({
            "model": r["model"], "seed": r["seed"],
            "window (tokens)": f"{_fmt_tokens(r['window_start'])}–{_fmt_tokens(r['window_end'])}"
            if r["window_found"] else "none",
            "ICL before": _fmt(r["icl_before"]), "ICL after": _fmt(r["icl_after"]),
            "final ICL": _fmt(r["final_icl"]),
            "final ICL gained in window": _fmt(r["frac_icl_in_window"], ".0%"),
            "top prefix before": _fmt(r["prefix_before"], ".2f"),
            "top prefix after": _fmt(r["prefix_after"], ".2f"),
            "final top prefix": _fmt(r["final_prefix"], ".2f"),
            "prefix jump (tokens)": _fmt_tokens(r["prefix_jump_peak"]) if r["prefix_jump_found"] else "none",
            "loss bump (tokens)": f"{_fmt_tokens(r['bump_start'])}–{_fmt_tokens(r['bump_end'])} "
                                  f"({r['bump_height']:.3f} nats)" if r["bump_found"] else "none",
            "verdict": r["verdict"],
        })
    rows.append({"model": "paper (Olsson et al. 2022)", "seed": "", "window (tokens)": "~2.5–5B",
                 "ICL before": f"> {PAPER_ICL_BEFORE:+.2f}", "ICL after": f"≈ {PAPER_ICL_AFTER:+.1f}",
                 "final ICL": f"≈ {PAPER_ICL_AFTER:+.1f}",
                 "final ICL gained in window": f"≥ {PAPER_FRAC_IN_WINDOW:.0%}",
                 "top prefix before": "low", "top prefix after": "high", "final top prefix": "high",
                 "prefix jump (tokens)": "in window", "loss bump (tokens)": "in window",
                 "verdict": "co-occur (≥2 layers); none (1 layer)"})
    return pd.DataFrame(rows).set_index(["model", "seed"])


def paper_checks(row: dict) -> dict:
    """The paper's three numbers checked for one run: ICL before the window above −0.15, ICL after
    the window within 0.2 nats of −0.4 ([book choice] tolerance), ≥75% of the final ICL gained inside."""
    if not row["window_found"]:
        return {"before": False, "after": False, "frac": False}
    return {"before": bool(row["icl_before"] > PAPER_ICL_BEFORE),
            "after": bool(abs(row["icl_after"] - PAPER_ICL_AFTER) <= 0.2),
            "frac": bool(row["frac_icl_in_window"] >= PAPER_FRAC_IN_WINDOW)}


def _join(items: list[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def cooccurrence_verdicts(table: pd.DataFrame) -> str:
    """Markdown sentences, one per model, stating what the table shows (generated from the data)."""
    out = []
    for label, g in table.groupby("model", sort=False):
        n = len(g)
        counts = g["verdict"].value_counts()
        parts = [f"{k} in {v} of {n} seed{'s' if n > 1 else ''}" for k, v in counts.items()]
        checks = [paper_checks(r) for r in g.to_dict("records")]
        nb, na, nf = (sum(c[k] for c in checks) for k in ("before", "after", "frac"))
        s = (f"- **{label}** ({g['layers'].iloc[0]} layer{'s' if g['layers'].iloc[0] > 1 else ''}): "
             f"{_join(parts)}. Final ICL {_fmt(g['final_icl'].mean())} nats, final top prefix-matching "
             f"score {g['final_prefix'].mean():.2f} (mean over seeds).")
        if g["window_found"].any():
            s += (f" Against the paper: ICL before the window above {PAPER_ICL_BEFORE:+.2f} in {nb} of {n}, "
                  f"ICL after within 0.2 of {PAPER_ICL_AFTER:+.1f} in {na} of {n}, "
                  f"≥{PAPER_FRAC_IN_WINDOW:.0%} of final ICL gained in the window in {nf} of {n}.")
        out.append(s)
    return "\n".join(out)


def headline(table: pd.DataFrame) -> str:
    """One sentence: does the book reproduce co-occurrence at this scale?"""
    multi = table[table["layers"] >= 2]
    single = table[table["layers"] == 1]
    co = multi["verdict"].str.startswith("co-occur")
    one_clean = (~single["induction_head"]).all() if len(single) else None
    if len(multi) and co.all() and one_clean:
        s = (f"**Reproduced at this scale:** in all {len(multi)} runs with two or more layers the ICL "
             "window, the induction-head jump and the loss bump line up (see the table for the bump), "
             "and no one-layer run forms an induction head.")
    elif len(multi) and co.any():
        s = (f"**Partly reproduced at this scale:** induction heads form inside the ICL window in "
             f"{int(co.sum())} of {len(multi)} runs with two or more layers.")
    else:
        s = ("**Not reproduced at this scale:** no run with two or more layers forms an induction head "
             "inside its ICL window. Whatever ICL these models have comes from something else "
             "(for example, using how often a token has already appeared in the context).")
    if len(single):
        ws = int(single["window_found"].sum())
        s += (f" The one-layer control finds an ICL window in {ws} of {len(single)} runs"
              + (" — ICL that improves without an induction head, which is why the chapter checks "
                 "co-occurrence instead of assuming it." if ws else "."))
    return s


# --- heatmaps of loss over (training tokens, context index) ------------------------------------------

def loss_by_index(run: Run, steps: list[int] | None = None, n_examples: int | None = None) -> dict:
    """Mean per-token loss over the eval set at each snapshot and context index.

    Returns tokens (S,), index (T-1,) 1-based text-token indices, loss (S, T-1), and the seconds
    the cached per-token losses took to compute."""
    res = A.snapshot_losses(run, n_examples, steps)
    loss = res["losses"].mean(1).numpy()
    return {"tokens": res["tokens"].numpy().astype(np.float64), "index": np.arange(1, loss.shape[1] + 1),
            "loss": loss, "seconds": float(res["seconds"])}


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


def late_index_slope(heat: dict, step_index: int, late_from: float = 0.25) -> float:
    """Mean ∂loss/∂ln(index) over indices ≥ ``late_from`` × context at one snapshot (nats per e-fold):
    about 0 when the loss has stopped improving with more context, negative when it keeps improving."""
    c, d = dloss_dlnindex(heat["index"], heat["loss"][step_index:step_index + 1])
    m = c >= late_from * (heat["index"][-1] + 1)
    return float(d[0, m].mean())


def heatmap_summary(heat: dict, window: M.Window) -> dict:
    """Late-index loss slope at the snapshots just before and just after the window."""
    t = heat["tokens"]
    if not window.found:
        return {"found": False}
    i0 = int(np.nonzero(t <= window.start)[0][-1]) if (t <= window.start).any() else 0
    i1 = int(np.nonzero(t >= window.end)[0][0]) if (t >= window.end).any() else len(t) - 1
    return {"found": True, "before_tokens": float(t[i0]), "after_tokens": float(t[i1]),
            "slope_before": late_index_slope(heat, i0), "slope_after": late_index_slope(heat, i1),
            "slope_final": late_index_slope(heat, len(t) - 1)}


# --- per-token-loss PCA -----------------------------------------------------------------------------

def loss_pca_paths(runs: dict[str, Run], steps_n: int | None = None, n_examples: int | None = None,
                   seed: int = 0) -> dict:
    """The paper's per-token-loss PCA: one random (example, position) per eval example, the same for
    every run; one PCA fitted on all snapshots of all runs (which must share the eval set).

    Returns coords {name: (S, 2)}, tokens {name: (S,)}, explained (2,), seconds (per-token losses)."""
    vecs, toks, secs = {}, {}, 0.0
    shape = None
    for name, run in runs.items():
        res = A.snapshot_losses(run, n_examples, A.select_steps(run, steps_n))
        L = res["losses"]
        if shape is None:
            shape = L.shape[1:]
            pos = M.sample_token_positions(shape[0], shape[1], seed)
        elif L.shape[1:] != shape:
            raise ValueError(f"run {name} has eval losses of shape {tuple(L.shape[1:])}, not {tuple(shape)}: "
                             "a joint PCA needs one eval set")
        vecs[name] = np.stack([M.loss_vectors(L[s], pos) for s in range(len(L))])
        toks[name] = res["tokens"].numpy().astype(np.float64)
        secs += float(res["seconds"])
    pca, coords = M.loss_pca(vecs, 2)
    return {"coords": coords, "tokens": toks, "explained": pca.explained_variance_ratio_, "seconds": secs}


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


def reference_window(rows: pd.DataFrame) -> M.Window:
    """The median ICL window of the ≥2-layer runs that have one: the span used for runs without
    their own window (e.g. the 1-layer control) when comparing PCA turns."""
    g = rows[(rows["layers"] >= 2) & rows["window_found"]]
    if not len(g):
        return M.Window(float("nan"), float("nan"), float("nan"), False, "no ≥2-layer run has a window")
    return M.Window(float(np.exp(np.log(g["window_start"]).median())),
                    float(np.exp(np.log(g["window_end"]).median())),
                    float(np.exp(np.log(g["window_peak"]).median())), True)


def pca_turns(pca: dict, rows: pd.DataFrame) -> pd.DataFrame:
    """Turn angle of each run's PCA path at its own window, and at the reference window
    (:func:`reference_window`) so that runs with and without a window compare over the same span."""
    ref = reference_window(rows)
    out = []
    for r in rows.to_dict("records"):
        name = r["run"]
        if name not in pca["coords"]:
            continue
        c, t = pca["coords"][name], pca["tokens"][name]
        out.append({"model": r["model"], "run": name, "layers": r["layers"],
                    "turn_own_window": turn_angle(c, t, r["window_start"], r["window_end"]) if r["window_found"] else np.nan,
                    "turn_reference_window": turn_angle(c, t, ref.start, ref.end)})
    return pd.DataFrame(out)


def pca_sentence(turns: pd.DataFrame) -> str:
    if not len(turns):
        return "No PCA paths to compare."
    multi = turns[turns["layers"] >= 2]["turn_reference_window"].dropna()
    single = turns[turns["layers"] == 1]["turn_reference_window"].dropna()
    if not len(multi):
        return "No run with two or more layers has a path long enough around the reference window to measure a turn."
    s = (f"Across the reference window, the paths of the ≥2-layer runs turn by {multi.mean():.0f}° on "
         f"average (range {multi.min():.0f}–{multi.max():.0f}°)")
    if len(single):
        verb = ("less than" if single.mean() < multi.min() else
                ("more than" if single.mean() > multi.max() else "within the range of"))
        s += f"; the 1-layer runs turn by {single.mean():.0f}°, {verb} the ≥2-layer runs"
        s += (". The paper's pattern (only ≥2-layer paths pivot) is "
              + ("reproduced." if single.mean() < multi.min() else "not clearly reproduced here."))
    else:
        s += "."
    return s


# --- a passage that repeats itself --------------------------------------------------------------------

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

    res = A._cached(run, "passage_losses", {"example": example, "steps": run.steps}, compute)
    res["tokens"] = res["steps"] * run.config.tokens_per_step
    return res


def passage_change(run: Run, window: M.Window, example: int = 0) -> dict:
    """Per-token loss change on the repeated passage from the snapshot at the window's start to the
    one at its end, and two tokens chosen by rule:

    - *helped*: in the second copy, the token whose loss fell the most across the window;
    - *hurt*: anywhere in the passage from the early ICL index on (the first tokens have almost no
      context), the token whose loss rose the most (or, if none rose, fell the least).

    Without a window (``window.found`` False) the change is taken over the whole of training.
    """
    res = passage_losses(run, example)
    t = res["tokens"].numpy().astype(np.float64)
    L = res["losses"].numpy()
    x = res["passage"].numpy()
    if window.found and (t <= window.start).any() and (t >= window.end).any():
        i0 = int(np.nonzero(t <= window.start)[0][-1])
        i1 = int(np.nonzero(t >= window.end)[0][0])
        span = "window"
    else:
        i0, i1 = 0, len(t) - 1
        span = "whole training"
    delta = L[i1] - L[i0]  # column c predicts token x[c+1]
    half = (len(x) - 1) // 2
    col = np.arange(len(delta))
    second = col >= half  # columns predicting tokens of the second copy
    helped = int(np.flatnonzero(second)[np.argmin(delta[second])])
    _, early = icl_indices(run.config.model.n_ctx)
    cand = np.flatnonzero(col >= early - 1)
    hurt = int(cand[np.argmax(delta[cand])])
    tok = run.corpus.token_str
    return {"delta": delta, "half": half, "tokens": t, "losses": L, "i_before": i0, "i_after": i1, "span": span,
            "helped": helped, "hurt": hurt,
            "helped_token": tok(int(x[helped + 1])), "hurt_token": tok(int(x[hurt + 1])),
            "helped_context": run.corpus.decode(x[max(1, helped - 6):helped + 2]),
            "hurt_context": run.corpus.decode(x[max(1, hurt - 6):hurt + 2]),
            "mean_delta_first": float(delta[~second].mean()), "mean_delta_second": float(delta[second].mean()),
            "seconds": float(res["seconds"])}


# --- Argument 6: continuity across scale ----------------------------------------------------------------

def model_size(cfg: ModelConfig) -> dict:
    """Parameter counts (all, and non-embedding: without W_E, W_U and W_pos)."""
    with torch.device("meta"):
        m = Transformer(cfg)
    total = sum(p.numel() for p in m.parameters())
    emb = sum(p.numel() for n, p in m.named_parameters() if n in ("W_E", "W_U", "W_pos"))
    return {"params": int(total), "non_embedding_params": int(total - emb)}


def scaled_early_indices(n_ctx: int, early=(10, 50, 100)) -> list[int]:
    """The paper's early indices rescaled like :func:`icl_indices` (× n_ctx/512 below 512), distinct."""
    f = min(1.0, n_ctx / 512)
    out = []
    for e in early:
        v = max(1, int(round(e * f)))
        if v not in out:
            out.append(v)
    return out


def icl_index_pairs(run: Run, steps: list[int] | None = None, n_examples: int | None = None,
                    early=(10, 50, 100)) -> pd.DataFrame:
    """ICL = L(late) − L(early) for the default late index and several early ones, at each snapshot.

    Long format: tokens, late, early (scaled), early_paper (the paper's unscaled index), icl."""
    res = A.snapshot_losses(run, n_examples, steps)
    L = res["losses"]
    n_ctx = run.config.model.n_ctx
    late, _ = icl_indices(n_ctx)
    rows = []
    for e_paper, e in zip(early, scaled_early_indices(n_ctx, early)):
        for s in range(len(L)):
            rows.append({"run": run.name, "tokens": float(res["tokens"][s]), "late": late, "early": e,
                         "early_paper": e_paper,
                         "icl": M.icl_score_from_losses(L[s], indices=(late, e))})
    return pd.DataFrame(rows)


def layer_prefix(run: Run) -> np.ndarray:
    """Final top prefix-matching score of each layer (max over its heads), (n_layers,)."""
    p = np.asarray(run.metrics()["prefix"].iloc[-1], dtype=np.float64)
    return p.max(1)


def family_table(runs: dict[str, Run], seeds: dict[str, list[Run]] | None = None) -> pd.DataFrame:
    """One row per model of the family: architecture, size, final ICL (mean and range over seeds),
    ICL window (found, start, peak, end), final top prefix score and the layer that holds it."""
    seeds = seeds or {}
    rows = []
    for name, run in runs.items():
        m, d = run.config.model, run.config.data
        reps = [run] + [r for r in seeds.get(name, []) if r.name != name]
        icls = [float(r.metrics()["icl"].iloc[-1]) for r in reps]
        co = cooccurrence_row(run, name)
        lp = layer_prefix(run)
        top = int(np.argmax(lp))
        rows.append({"model": name, "layers": m.n_layers, "d_model": m.d_model, "heads": m.n_heads,
                     "MLPs": not m.attn_only, "corpus": "+".join(d.sources), **model_size(m),
                     "n_seeds": len(reps), "final_icl": float(np.mean(icls)),
                     "final_icl_min": float(np.min(icls)), "final_icl_max": float(np.max(icls)),
                     "window_found": co["window_found"], "window_start": co["window_start"],
                     "window_peak": co["window_peak"], "window_end": co["window_end"],
                     "final_prefix": co["final_prefix"], "prefix_jump_in_window": co["prefix_jump_in_window"],
                     "verdict": co["verdict"], "top_layer": top, "top_layer_from_end": m.n_layers - 1 - top,
                     "layer_prefix": lp.round(3).tolist(), "tokens": co["tokens"]})
    return pd.DataFrame(rows)


def scale_range(family: pd.DataFrame) -> str:
    """The range of scale the chapter covers (and the paper's, for contrast)."""
    f = family
    return (f"This chapter covers {f['layers'].min()}–{f['layers'].max()} layers, d_model "
            f"{f['d_model'].min()}–{f['d_model'].max()}, {f['params'].min():,}–{f['params'].max():,} "
            f"parameters ({f['non_embedding_params'].min():,}–{f['non_embedding_params'].max():,} "
            f"without embeddings), attention-only and with-MLP models, corpora "
            f"{_join(sorted(set(f['corpus'])))}, trained for {_span_tokens(f['tokens'])} tokens. The paper's models span 1–6 layers at d_model 768 "
            "(small models) and 13M–13B parameters (full-scale), trained on about 10B tokens: every "
            "claim below holds at most for the range above, not beyond it.")


def _span_tokens(v) -> str:
    lo, hi = float(np.min(v)), float(np.max(v))
    return _fmt_tokens(lo) if lo == hi else f"{_fmt_tokens(lo)}–{_fmt_tokens(hi)}"


def _mark(ok_all: bool, ok_some: bool) -> str:
    return "reproduced" if ok_all else ("partly" if ok_some else "not reproduced")


def claims_table(family: pd.DataFrame, pairs: pd.DataFrame | None = None,
                 turns: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's Argument-6 claims beside this family's numbers, each marked reproduced / partly /
    not reproduced (or not testable) by a stated rule."""
    base = family["corpus"].mode().iloc[0]  # the family's main corpus; size comparisons stay on it
    other = family[(family["corpus"] != base) & (family["layers"] >= 2)]
    family = family[family["corpus"] == base]
    multi = family[family["layers"] >= 2]
    single = family[family["layers"] == 1]
    attn = multi[~multi["MLPs"]]
    mlp = multi[multi["MLPs"]]
    rows = []

    def add(claim, paper, here, verdict, rule):
        rows.append({"claim": claim, "paper": paper, "here": here, "verdict": verdict, "rule": rule})

    n = len(multi)
    ih = int((multi["final_prefix"] >= INDUCTION_THRESHOLD).sum())
    add(f"Every ≥2-layer model forms induction heads (models on {base})", "yes, at every size",
        f"{ih} of {n} models have a head with prefix score ≥ {INDUCTION_THRESHOLD}",
        _mark(n > 0 and ih == n, ih > 0) if n else "not testable", "all: reproduced; some: partly")
    co = int(multi["verdict"].str.startswith("co-occur").sum())
    add("In each, induction heads form inside the ICL phase change", "yes",
        f"{co} of {n} models (top prefix score jumps inside the ICL window)",
        _mark(n > 0 and co == n, co > 0) if n else "not testable", "all: reproduced; some: partly")
    if len(single) and n:
        s_ih = bool((single["final_prefix"] < INDUCTION_THRESHOLD).all())
        s_less = bool(single["final_icl"].max() > multi["final_icl"].max())  # less negative = less ICL
        add("1-layer models form no induction heads and have less ICL", "yes",
            f"1-layer top prefix {single['final_prefix'].max():.2f}; final ICL {single['final_icl'].mean():+.2f} "
            f"vs ≥2-layer {multi['final_icl'].min():+.2f} to {multi['final_icl'].max():+.2f}",
            _mark(s_ih and s_less, s_ih or s_less), "both parts: reproduced; one: partly")
    if n >= 2:
        v = multi["final_icl"].to_numpy()
        spread = float((v.max() - v.min()) / max(abs(v.mean()), 1e-9))
        add("The amount of final ICL is similar across sizes", "≈0.4 nats at every size",
            f"{v.min():+.2f} to {v.max():+.2f} nats (spread {spread:.0%} of the mean)",
            "reproduced" if spread <= 0.25 and v.mean() < 0 else ("partly" if spread <= 0.5 and v.mean() < 0 else "not reproduced"),
            "spread (max − min)/|mean| ≤ 25%: reproduced; ≤ 50%: partly")
    wf = multi[multi["window_found"]]
    if len(wf) >= 2:
        r = float(wf["window_peak"].max() / wf["window_peak"].min())
        add("The phase change happens at a similar point in training", "≈2.5–5B tokens for all small models",
            f"window peaks {_fmt_tokens(wf['window_peak'].min())}–{_fmt_tokens(wf['window_peak'].max())} tokens "
            f"(ratio {r:.1f}) in {len(wf)} of {n} models",
            "reproduced" if r <= 2 and len(wf) == n else ("partly" if r <= 4 else "not reproduced"),
            "all have a window and peaks within ×2: reproduced; within ×4: partly")
    if len(attn):
        ok = attn[attn["final_prefix"] >= INDUCTION_THRESHOLD]
        last = int((ok["top_layer_from_end"] == 0).sum())
        add("Attention-only: induction heads sit in the last layer", "last layer",
            f"{len(ok)} of {len(attn)} models have an induction head; in {last} of them the top one is in the last layer",
            _mark(last == len(ok), last > 0) if len(ok) else "not testable",
            "among models with an induction head — all: reproduced; some: partly")
    if len(mlp):
        desc = ", ".join(f"{r.model}: layer {r.top_layer} of {r.layers} (prefix {r.final_prefix:.2f})"
                         for r in mlp.itertuples())
        testable = mlp[(mlp["layers"] >= 3) & (mlp["final_prefix"] >= INDUCTION_THRESHOLD)]
        add("With MLPs: induction heads sit in the second-to-last layer",
            "second-to-last layer (team summary, PAPER.md)", desc,
            _mark(len(testable) > 0 and bool((testable["top_layer_from_end"] == 1).all()),
                  bool((testable["top_layer_from_end"] == 1).any())) if len(testable) else "not testable",
            "needs ≥3-layer MLP models with an induction head (in 2 layers the second-to-last layer "
            "cannot compose with an earlier one)")
    if pairs is not None and len(pairs) and len(single) and n:
        fin = pairs.loc[pairs.groupby(["run", "early"])["tokens"].idxmax()]
        ok, tot = 0, 0
        for e, g in fin.groupby("early"):
            s1 = g[g["run"].isin(single["model"])]["icl"]
            s2 = g[g["run"].isin(multi["model"])]["icl"]
            if len(s1) and len(s2):
                tot += 1
                ok += int(s2.max() < s1.min())
        add("The conclusion does not hang on the index pair", "same picture for other pairs",
            f"every ≥2-layer model has more ICL than every 1-layer model for {ok} of {tot} early indices",
            _mark(tot > 0 and ok == tot, ok > 0) if tot else "not testable",
            "all pairs: reproduced; some: partly")
    if len(other):
        o_co = int(other["verdict"].str.startswith("co-occur").sum())
        add("The same signatures appear on other training text", "(the paper used one mixed corpus)",
            f"{o_co} of {len(other)} models trained on {_join(sorted(set(other['corpus'])))} only show induction heads "
            f"forming inside their ICL window (main corpus: {base}); final ICL "
            + ", ".join(f"{r.model} {r.final_icl:+.2f}" for r in other.itertuples()),
            _mark(o_co == len(other), o_co > 0), "all: reproduced; some: partly")
    if turns is not None and len(turns):
        m2 = turns[turns["layers"] >= 2]["turn_reference_window"].dropna()
        m1 = turns[turns["layers"] == 1]["turn_reference_window"].dropna()
        if len(m2) and len(m1):
            add("PCA paths of ≥2-layer models pivot at the phase change, 1-layer paths do not",
                "yes", f"turn {m2.min():.0f}–{m2.max():.0f}° (≥2 layers) vs {m1.mean():.0f}° (1 layer)",
                _mark(m1.mean() < m2.min(), m1.mean() < m2.mean()),
                "1-layer turn below every ≥2-layer turn: reproduced; below their mean: partly")
    return pd.DataFrame(rows).set_index("claim")


def claims_sentence(claims: pd.DataFrame) -> str:
    c = claims["verdict"].value_counts()
    parts = [f"{c.get(k, 0)} {k}" for k in ("reproduced", "partly", "not reproduced", "not testable") if c.get(k, 0)]
    return f"Of the {len(claims)} claims checked, {_join(parts)} at this scale."


# --- figure data for the chapters (one entry per model label; the first seed stands for the model) ---

def loss_curve_data(models: dict[str, list[Run]]) -> tuple[dict, dict, dict]:
    """({label: (tokens, smoothed train loss)}, {label: Window}, {label: (tokens, convex gap)}) for
    the first run of each model; the gap is computed after the initial fall (:func:`loss_bump`)."""
    curves, windows, gaps = {}, {}, {}
    for k, rs in models.items():
        t, y = train_loss_curve(rs[0])
        curves[k] = (t, y)
        windows[k] = A.window(rs[0])
        i0 = initial_fall_end(t, y)
        gaps[k] = (t[i0:], convex_gap(t[i0:], y[i0:]))
    return curves, windows, gaps


def icl_curve_data(models: dict[str, list[Run]]) -> tuple[dict, dict]:
    """({label: (tokens, icl (n_seeds, S))}, {label: [Window per seed]}); seeds are aligned on the
    first seed's snapshots (runs of one model share the snapshot schedule)."""
    curves, windows = {}, {}
    for k, rs in models.items():
        dfs = [r.metrics() for r in rs]
        t = dfs[0]["tokens"].to_numpy(dtype=np.float64)
        ys = [np.interp(t, d["tokens"].to_numpy(dtype=np.float64), d["icl"].to_numpy()) for d in dfs]
        curves[k] = (t, np.stack(ys))
        windows[k] = [A.window(r) for r in rs]
    return curves, windows


def head_curve_data(models: dict[str, list[Run]]) -> dict:
    """{label: (tokens, prefix (S, L, H), prev_token (S, L, H))} from the first run's logged metrics."""
    out = {}
    for k, rs in models.items():
        df = rs[0].metrics()
        out[k] = (df["tokens"].to_numpy(dtype=np.float64), np.asarray(df["prefix"].tolist(), dtype=np.float64),
                  np.asarray(df["prev_token"].tolist(), dtype=np.float64))
    return out


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
                     f"before the window ({_fmt_tokens(s['before_tokens'])} tokens), {s['slope_after']:+.3f} "
                     f"after it ({_fmt_tokens(s['after_tokens'])} tokens), {s['slope_final']:+.3f} at the end"
                     + (" — late tokens improve more after the window." if s["slope_after"] < s["slope_before"]
                        else " — late tokens do not improve more after the window."))
    return "\n".join(parts)


def showcase_run(table: pd.DataFrame) -> str:
    """[book choice] The run whose repeated passage the chapter shows: the ≥2-layer run with the
    highest final top prefix-matching score (ties: the first listed)."""
    multi = table[table["layers"] >= 2]
    g = multi if len(multi) else table
    return str(g.loc[g["final_prefix"].idxmax(), "run"])


def window_rule() -> str:
    """The phase-change window rule, with the defaults :func:`metrics.phase_change_window` uses."""
    import inspect

    p = inspect.signature(M.phase_change_window).parameters
    return (f"The ICL score is smoothed with a Gaussian of s.d. {p['width'].default} in ln(tokens) (the late "
            f"snapshots are close together in log tokens, so unsmoothed, a snapshot-to-snapshot "
            f"fluctuation of the score would pass for its steepest fall) *[book choice]*, and its "
            f"derivative with respect to log training tokens is computed between snapshots; the window is the "
            f"contiguous run of snapshots around its steepest fall where the fall is at least "
            f"{p['frac'].default:.0%} of the steepest; no window is reported if ICL never falls by "
            f"{p['min_change'].default} nats. Like every ICL score in the book it uses the banded estimate "
            f"(`metrics.icl_band_score`, a few indices around each of the two), "
            f"because single-index ICL is noisy with a few hundred evaluation windows")


# --- Argument 6 helpers for the chapter -----------------------------------------------------------------

def family_names(groups: dict[str, list[str]]) -> list[str]:
    """The distinct run names of the chapter's groups (depth, width, mlp, corpus), in order."""
    out = []
    for names in groups.values():
        for n in names:
            if n not in out:
                out.append(n)
    return out


def shared_eval_subset(runs: dict[str, Run]) -> tuple[dict[str, Run], list[str]]:
    """The largest set of runs that share an evaluation set (same corpus and context), for a joint
    PCA; returns (those runs, the names left out)."""
    from .data import corpus_key

    keys = {n: (corpus_key(r.config.data), r.config.model.n_ctx, r.config.data.n_eval, r.config.data.eval_seed)
            for n, r in runs.items()}
    counts: dict = {}
    for k in keys.values():
        counts[k] = counts.get(k, 0) + 1
    best = max(counts, key=lambda k: (counts[k], -list(keys.values()).index(k)))
    keep = {n: r for n, r in runs.items() if keys[n] == best}
    return keep, [n for n in runs if n not in keep]


def index_pair_table(runs: dict[str, Run], steps_n: int | None = None, n_examples: int | None = None,
                     early=(10, 50, 100)) -> pd.DataFrame:
    """:func:`icl_index_pairs` for every run (long format, all snapshots)."""
    return pd.concat([icl_index_pairs(r, A.select_steps(r, steps_n), n_examples, early) for r in runs.values()],
                     ignore_index=True)


def index_pair_sentence(pairs: pd.DataFrame) -> str:
    """How much the ranking of models by final ICL depends on the early index (Spearman rank
    correlation between every pair of early indices, over models)."""
    fin = pairs.loc[pairs.groupby(["run", "early"])["tokens"].idxmax()]
    wide = fin.pivot(index="run", columns="early", values="icl")
    if wide.shape[0] < 3 or wide.shape[1] < 2:
        return "Too few models or index pairs to compare rankings."
    rk = wide.rank()
    cors = []
    cols = list(wide.columns)
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            cors.append((cols[i], cols[j], float(np.corrcoef(rk[cols[i]], rk[cols[j]])[0, 1])))
    lo = min(c for _, _, c in cors)
    late = int(fin["late"].iloc[0])
    s = (f"Ranking the {wide.shape[0]} models by final ICL with late index {late} and early index "
         + ", ".join(str(c) for c in cols) + f" gives Spearman correlations between {lo:.2f} and "
         f"{max(c for _, _, c in cors):.2f}")
    s += (": the ordering does not hang on the choice of pair." if lo >= 0.8 else
          ": the ordering changes with the early index, so comparisons between close models depend on the pair.")
    return s


def depth_sentence(family: pd.DataFrame) -> str:
    """Where the top prefix-matching head sits in each model (generated from the data)."""
    parts = []
    for r in family.itertuples():
        kind = "with MLPs" if r.MLPs else "attention-only"
        ok = r.final_prefix >= INDUCTION_THRESHOLD
        parts.append(f"`{r.model}` ({r.layers} layer{'s' if r.layers > 1 else ''}, {kind}): top head in layer {r.top_layer}"
                     f" (score {r.final_prefix:.2f}{'' if ok else ', below the induction threshold'})")
    return "; ".join(parts) + "."

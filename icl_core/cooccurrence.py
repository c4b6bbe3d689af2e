"""Argument 1, co-occurrence (chapters/01_cooccurrence): induction heads and ICL appear together.

For each run: where its ICL improves fastest (the phase-change window, :mod:`icl_core.heads`),
where its top prefix-matching score jumps and where its loss curve bumps (:mod:`icl_core.curves`),
and whether the three line up. The paper's other views of the same runs have their own modules:
:mod:`icl_core.passage` (a passage that repeats itself), :mod:`icl_core.loss_by_index` (heatmaps)
and :mod:`icl_core.loss_pca` (per-token-loss PCA). Returns arrays, dicts and DataFrames for
:mod:`icl_core.plots.cooccurrence`, and the chapter's sentences, generated from the numbers so
they stay true under every profile.

Load
    :func:`compute` -> :class:`Cooccurrence` (the runs, their windows, :func:`cooccurrence_table`:
    one :func:`cooccurrence_row` per run, with its :func:`run_verdict`).
Figure data (the first seed stands for a model)
    :func:`loss_curve_data`, :func:`icl_curve_data`, :func:`head_curve_data`.
Say
    :func:`models_table`, :func:`definitions`, :func:`verdict_summary`, :func:`verdict_rule`,
    :func:`bump_rule`, :func:`bump_summary`, :func:`prefix_summary`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import icl_indices
from .curves import (BUMP_TOL, PREFIX_MIN_RISE, Window, convex_gap, initial_fall_end, inside, loss_bump, overlaps,
                     rise_window, smooth_log_curve)
from .curves import phase_change_window as curve_window
from .heads import INDUCTION_THRESHOLD, is_control, phase_change_window, top_head
from .prose import fmt, fmt_tokens, join
from .verdicts import MIN_RUNS, NOT_REPRODUCED, PARTLY, REPRODUCED, Verdict, count_verdict
from .runs import Run

#: The paper's Argument 1 numbers (../shared/PAPER.md), in the book's sign convention
#: (ICL = L(late) - L(early), negative = in-context learning).
PAPER_ICL_BEFORE = -0.15  # "ICL < 0.15 nats before" the phase change: ICL score above -0.15
PAPER_ICL_AFTER = -0.4  # "~0.4 after"
PAPER_FRAC_IN_WINDOW = 0.75  # ">= 75% of final ICL gained inside the window"


def train_loss_curve(run: Run, n_grid: int = 200, width: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The run's per-step training loss, smoothed in log tokens (:func:`smooth_log_curve`)."""
    df = run.train_log()
    return smooth_log_curve(df["tokens"].to_numpy(), df["loss"].to_numpy(), n_grid, width)


def top_layer(df: pd.DataFrame, score: str) -> int | None:
    """The layer of the head with the highest per-head ``score`` ('prefix' or 'prev_token', logged as
    (layers, heads) lists) at the last snapshot; None when the metrics lack per-head scores."""
    v = df[score].iloc[-1] if score in df else None
    if v is None:
        return None
    return top_head(v)[0]


def cooccurrence_row(run: Run, label: str | None = None, bump_tol: float = BUMP_TOL) -> dict:
    """One run's Argument-1 numbers: ICL window, ICL and top prefix score before/after it, the
    fraction of the final ICL gained inside it, where the prefix score jumps, and the loss bump
    (from the smoothed training loss and from the eval loss), each checked against the window."""
    df = run.metrics()
    t = df["tokens"].to_numpy(dtype=np.float64)
    icl = df["icl"].to_numpy()
    pm = df["prefix_max"].to_numpy()
    w = phase_change_window(run)
    pw = rise_window(t, pm)
    tl_t, tl_y = train_loss_curve(run)
    bump = loss_bump(tl_t, tl_y, bump_tol)
    ebump = loss_bump(t, df["loss"].to_numpy(), bump_tol)
    row = {"model": label or run.name, "run": run.name, "layers": run.config.model.n_layers,
           "MLPs": not run.config.model.attn_only, "seed": run.config.train.seed,
           "tokens": int(t[-1]), "initial_icl": float(icl[0]), "final_icl": float(icl[-1]),
           "final_icl_single": float(df["icl_single"].iloc[-1]) if "icl_single" in df else np.nan,
           # where the circuit sits at the end: the layers of the top prefix-matching (induction) head
           # and of the top previous-token head (the circuit needs the second before the first)
           "top_prefix_layer": top_layer(df, "prefix"), "top_prev_layer": top_layer(df, "prev_token"),
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
                    "prefix_jump_in_window": pw.found and inside(pw.peak, w.start, w.end),
                    "bump_in_window": bump.found and overlaps(bump.start, bump.end, w.start, w.end),
                    "eval_bump_in_window": ebump.found and overlaps(ebump.start, ebump.end, w.start, w.end)})
    row["induction_head"] = row["final_prefix"] >= INDUCTION_THRESHOLD
    row["smeared"] = bool(run.config.model.smeared_keys)
    row["control"] = is_control(row["layers"], row["smeared"], row["final_prefix"])
    row["verdict"] = run_verdict(row)
    return row


def run_verdict(row: dict) -> str:
    """Classify one run from its :func:`cooccurrence_row` (the rule is stated in the chapter):

    - "co-occur": an ICL window, an induction head (top prefix >= INDUCTION_THRESHOLD) whose score jumps inside it,
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


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The chapter's table: one row per model and seed, next to the paper's numbers."""
    rows = []
    for r in table.to_dict("records"):
        rows.append({
            "model": r["model"], "seed": r["seed"],
            "window (tokens)": f"{fmt_tokens(r['window_start'])}–{fmt_tokens(r['window_end'])}"
            if r["window_found"] else "none",
            "ICL before": fmt(r["icl_before"]), "ICL after": fmt(r["icl_after"]),
            "final ICL": fmt(r["final_icl"]),
            "final ICL (single index)": fmt(r["final_icl_single"]),
            "final ICL gained in window": fmt(r["frac_icl_in_window"], ".0%"),
            "top prefix before": fmt(r["prefix_before"], ".2f"),
            "top prefix after": fmt(r["prefix_after"], ".2f"),
            "final top prefix": fmt(r["final_prefix"], ".2f"),
            "prefix jump (tokens)": fmt_tokens(r["prefix_jump_peak"]) if r["prefix_jump_found"] else "none",
            "loss bump (tokens)": f"{fmt_tokens(r['bump_start'])}–{fmt_tokens(r['bump_end'])} "
                                  f"({r['bump_height']:.3f} nats)" if r["bump_found"] else "none",
            "verdict": r["verdict"],
        })
    rows.append({"model": "paper (Olsson et al. 2022)", "seed": "", "window (tokens)": "~2.5–5B",
                 "ICL before": f"> {PAPER_ICL_BEFORE:+.2f}", "ICL after": f"≈ {PAPER_ICL_AFTER:+.1f}",
                 "final ICL": f"≈ {PAPER_ICL_AFTER:+.1f}", "final ICL (single index)": f"≈ {PAPER_ICL_AFTER:+.1f}",
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
             f"{join(parts)}. Final ICL {fmt(g['final_icl'].mean())} nats, final top prefix-matching "
             f"score {g['final_prefix'].mean():.2f} (mean over seeds).")
        if g["window_found"].any():
            s += (f" Against the paper: ICL before the window above {PAPER_ICL_BEFORE:+.2f} in {nb} of {n}, "
                  f"ICL after within 0.2 of {PAPER_ICL_AFTER:+.1f} in {na} of {n}, "
                  f"≥{PAPER_FRAC_IN_WINDOW:.0%} of final ICL gained in the window in {nf} of {n}.")
        out.append(s)
    return "\n".join(out)


def cooccurrence_verdict(table: pd.DataFrame) -> Verdict:
    """The chapter's co-occurrence verdict (:func:`headline`): the count of ≥2-layer runs whose
    induction head forms inside the ICL window goes through :func:`icl_core.verdicts.count_verdict`;
    "reproduced" also needs every vanilla one-layer run to stay without an induction head (else it
    is "partly")."""
    multi = table[table["layers"] >= 2]
    v = count_verdict(int(multi["verdict"].str.startswith("co-occur").sum()), len(multi), null=NOT_REPRODUCED)
    if v.status == REPRODUCED and one_layer_induction_heads(table):
        return Verdict(PARTLY, v.k, v.n)
    return v


def one_layer_induction_heads(table: pd.DataFrame) -> int:
    """How many vanilla 1-layer runs form an induction head (smeared ones are under test, not controls)."""
    single = table[table["layers"] == 1]
    return int(single[~single["smeared"]]["induction_head"].sum())


def control_verdict(table: pd.DataFrame) -> Verdict:
    """The paper's "1-layer models do not": :func:`icl_core.verdicts.count_verdict` of the vanilla
    1-layer runs that form no induction head (not testable without such runs)."""
    single = table[(table["layers"] == 1) & ~table["smeared"]]
    return count_verdict(int((~single["induction_head"]).sum()), len(single), null=NOT_REPRODUCED)


def bump_verdict(table: pd.DataFrame) -> Verdict:
    """The loss bump: :func:`icl_core.verdicts.count_verdict` of the ≥2-layer runs whose
    :func:`run_verdict` is "co-occur" (the induction-head jump *and* a loss bump inside the window)."""
    multi = table[table["layers"] >= 2]
    return count_verdict(int((multi["verdict"] == "co-occur").sum()), len(multi), null=NOT_REPRODUCED)


def headline(table: pd.DataFrame) -> str:
    """One sentence: does the book reproduce co-occurrence at this scale (:func:`cooccurrence_verdict`)?
    Only vanilla 1-layer runs without an induction head (:func:`icl_core.heads.is_control`) are called
    controls."""
    single = table[table["layers"] == 1]
    v = cooccurrence_verdict(table)
    one_ih = one_layer_induction_heads(table)
    if v.status == REPRODUCED:
        s = (f"**Reproduced at this scale** ({v.k} of {v.n} runs): in every run with two or more layers the ICL "
             "window, the induction-head jump and the loss bump line up (see the table for the bump), "
             "and no vanilla one-layer run forms an induction head.")
    elif v.k:
        s = (f"**Partly reproduced at this scale:** induction heads form inside the ICL window in "
             f"{v.k} of {v.n} runs with two or more layers"
             + (f" (reproduced needs all of them, and at least {MIN_RUNS})" if v.k < v.n or v.n < MIN_RUNS else "")
             + (f"; {one_ih} vanilla one-layer run{'s' if one_ih > 1 else ''} form{'' if one_ih > 1 else 's'} an induction head" if one_ih else "") + ".")
    else:
        s = ("**Not reproduced at this scale:** no run with two or more layers forms an induction head "
             "inside its ICL window. Whatever ICL these models have comes from something else "
             "(for example, using how often a token has already appeared in the context).")
    controls = single[single["control"]]
    if len(controls):
        ws = int(controls["window_found"].sum())
        s += (f" The one-layer controls (vanilla, no induction head) find an ICL window in {ws} of {len(controls)} runs"
              + (" — ICL that improves without an induction head, which is why the chapter checks "
                 "co-occurrence instead of assuming it." if ws else "."))
    tested = single[~single["control"]]
    if len(tested):
        s += (f" The {len(tested)} one-layer run{'s' if len(tested) > 1 else ''} with smeared keys or an induction head "
              f"{'are' if len(tested) > 1 else 'is'} not {'controls' if len(tested) > 1 else 'a control'}: "
              f"{int(tested['induction_head'].sum())} of {len(tested)} form an induction head, and in "
              f"{int(tested['verdict'].str.startswith('co-occur').sum())} it forms inside the ICL window.")
    return s


def loss_curve_data(models: dict[str, list[Run]]) -> tuple[dict, dict, dict]:
    """({label: (tokens, smoothed train loss)}, {label: Window}, {label: (tokens, convex gap)}) for
    the first run of each model; the gap is computed after the initial fall (:func:`loss_bump`)."""
    curves, windows, gaps = {}, {}, {}
    for k, rs in models.items():
        t, y = train_loss_curve(rs[0])
        curves[k] = (t, y)
        windows[k] = phase_change_window(rs[0])
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
        windows[k] = [phase_change_window(r) for r in rs]
    return curves, windows


def head_curve_data(models: dict[str, list[Run]]) -> dict:
    """{label: (tokens, prefix (S, L, H), prev_token (S, L, H))} from the first run's logged metrics."""
    out = {}
    for k, rs in models.items():
        df = rs[0].metrics()
        out[k] = (df["tokens"].to_numpy(dtype=np.float64), np.asarray(df["prefix"].tolist(), dtype=np.float64),
                  np.asarray(df["prev_token"].tolist(), dtype=np.float64))
    return out


def showcase_run(table: pd.DataFrame) -> str:
    """[book choice] The run whose repeated passage the chapter shows: the ≥2-layer run with the
    highest final top prefix-matching score (ties: the first listed)."""
    multi = table[table["layers"] >= 2]
    g = multi if len(multi) else table
    return str(g.loc[g["final_prefix"].idxmax(), "run"])


def window_rule() -> str:
    """The phase-change window rule, with the defaults :func:`curves.phase_change_window` uses."""
    import inspect

    p = inspect.signature(curve_window).parameters
    return (f"The ICL score is smoothed with a Gaussian of s.d. {p['width'].default} in ln(tokens) (the late "
            f"snapshots are close together in log tokens, so unsmoothed, a snapshot-to-snapshot "
            f"fluctuation of the score would pass for its steepest fall) *[book choice]*, and its "
            f"derivative with respect to log training tokens is computed between snapshots; the window is the "
            f"contiguous run of snapshots around its steepest fall where the fall is at least "
            f"{p['frac'].default:.0%} of the steepest; no window is reported if ICL never falls by "
            f"{p['min_change'].default} nats. Like every ICL score in the book it uses the banded estimate "
            f"(`metrics.icl_band_score`, a few indices around each of the two), "
            f"because single-index ICL is noisier (the table shows both at the last snapshot)")


# --- the chapter: load -> plot -> say ---------------------------------------------------------------

@dataclass
class Cooccurrence:
    """The runs of the chapter and their per-run table (:func:`compute`)."""
    models: dict[str, list[Run]]  # {model label: [runs over seeds]}
    runs: dict[str, Run]  # every run by name
    table: pd.DataFrame  # cooccurrence_table(models)
    late: int
    early: int
    seconds: float = 0.0  # to compute the table
    windows: dict = field(default_factory=dict)  # {run name: phase-change window}


def compute(prof, models: dict[str, list[str]]) -> Cooccurrence:
    """Load the runs of ``models`` ({label: [run names]}) from the profile and build their table."""
    runs = {label: [prof.run(r) for r in names] for label, names in models.items()}
    every = {r.name: r for rs in runs.values() for r in rs}
    late, early = icl_indices(next(iter(every.values())).config.model.n_ctx)
    t0 = time.time()
    table = cooccurrence_table(runs)
    return Cooccurrence(runs, every, table, late, early, time.time() - t0,
                        {n: phase_change_window(r) for n, r in every.items()})


def groups(res: Cooccurrence) -> dict[str, str]:
    """{run name: model label}."""
    return {r.name: k for k, rs in res.models.items() for r in rs}


def models_table(res: Cooccurrence) -> str:
    """Markdown: one row per model (runs, architecture, each seed's own training tokens in run order,
    snapshots)."""
    return ("| model | runs (seeds) | layers | d_model | heads | MLPs | training tokens | snapshots |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(f"| {k} | {', '.join(f'`{r.name}` ({r.config.train.seed})' for r in rs)} | {rs[0].config.model.n_layers} | "
                        f"{rs[0].config.model.d_model} | {rs[0].config.model.n_heads} | {'yes' if not rs[0].config.model.attn_only else 'no'} | "
                        f"{' / '.join(f'{r.metrics().tokens.iloc[-1]:,}' for r in rs)} | {len(rs[0].steps)} |" for k, rs in res.models.items()))


def definitions(res: Cooccurrence) -> str:
    """The ICL score, the phase-change window and the induction-head threshold, as the chapter uses them."""
    first = next(iter(res.runs.values()))
    return (
        f"**ICL score.** L({res.late}) − L({res.early}): the mean loss around the {res.late}th text token minus the mean loss "
        f"around the {res.early}th (a band of a few indices around each, `metrics.icl_band_score`, see the introduction), over the {len(first.eval_data.tokens)} fixed evaluation windows, in nats; "
        f"**negative means in-context learning** *[book choice: the paper's sign varies]*. The paper uses "
        f"indices 500 and 50 with 512-token contexts; with this profile's context of {first.config.model.n_ctx} tokens the "
        f"book rescales both by n_ctx/512 *[book choice]*.\n\n"
        f"**Phase-change window.** {window_rule()}.\n\n"
        f"**Induction heads.** A head counts as an induction head when its prefix-matching score (attention "
        f"from a repeated token to the token after its earlier copy, on repeated random tokens) reaches "
        f"{INDUCTION_THRESHOLD} *[book choice]*; the top score *jumps* where it rises fastest in log tokens "
        f"(the same window rule applied to the rising score, requiring a rise of {PREFIX_MIN_RISE})."
    )


def verdict_summary(table: pd.DataFrame) -> str:
    """:func:`headline` and :func:`cooccurrence_verdicts`."""
    return headline(table) + "\n\n" + cooccurrence_verdicts(table)


def verdict_rule(res: Cooccurrence) -> str:
    """How a run's verdict is decided (:func:`run_verdict`)."""
    return ("**Verdict rule.** *co-occur*: an ICL window, a top prefix-matching score that ends at or above "
            f"{INDUCTION_THRESHOLD} and jumps inside the window, and a loss bump overlapping it; *co-occur (no bump)*: the "
            "same without the bump; *ICL window without an induction-head jump*: ICL improves in a window but no "
            "induction head forms inside it; *no ICL window*: the ICL curve never falls steeply enough. "
            f"*[Book choice]* 'ICL after ≈ −0.4' is checked within 0.2 nats. (Table computed in {res.seconds:.1f} s.)")


def bump_rule() -> str:
    """How the loss bump is measured."""
    return ("The paper's bump is a short stretch where the loss, plotted against log tokens, stops being convex: "
            "it flattens, then falls faster again. We measure it directly: the training loss (logged at every step, "
            "smoothed with a Gaussian of width 0.1 in ln tokens) minus its **lower convex envelope** in log tokens, "
            "after the initial fall from ln(vocabulary), where every model's curve has a concave shoulder. A convex "
            f"curve has zero gap everywhere; a bump is a stretch more than {BUMP_TOL} nats above the envelope "
            "*[book choice: smoothing width and threshold]*. The same test on the evaluation loss (at the snapshots) "
            "is a second check, reported below the figure.")


def bump_summary(table: pd.DataFrame) -> str:
    """Per run: the largest non-convex stretch of its loss, and whether it overlaps the window."""
    parts = []
    for r in table.to_dict("records"):
        if r["bump_found"]:
            parts.append(f"`{r['run']}`: {r['bump_height']:.3f} nats at {fmt_tokens(r['bump_peak'])} tokens "
                         f"({r['bump_stretches']} stretch{'es' if r['bump_stretches'] > 1 else ''} above threshold), "
                         f"overlapping the window: {'yes' if r['bump_in_window'] else 'no'}")
        else:
            parts.append(f"`{r['run']}`: no bump")
        parts[-1] += (f" (eval loss: {'bump at ' + fmt_tokens(r['eval_bump_start']) + '–' + fmt_tokens(r['eval_bump_end']) + ' tokens' if r['eval_bump_found'] else 'no bump'}"
                      f"{', overlapping the window' if r['eval_bump_in_window'] else ''})")
    n1 = table[table.layers == 1]
    return ("Largest non-convex stretch of the smoothed training loss per run — " + "; ".join(parts) + ". "
            + (f"The one-layer runs have {'no bump' if not n1.bump_found.any() else f'a bump in {int(n1.bump_found.sum())} of {len(n1)} runs'}"
               + (", so a bump alone does not mark induction heads at this scale." if n1.bump_found.any() else ", as in the paper.")
               if len(n1) else ""))


def prefix_summary(table: pd.DataFrame) -> str:
    """Per run: the top prefix score across the window, and where it rises fastest."""
    return "\n".join(
        f"- `{r['run']}`: "
        + (f"top prefix score {fmt(r['prefix_before'], '.2f')} → {fmt(r['prefix_after'], '.2f')} across the ICL window, "
           if r['window_found'] else "no ICL window; top prefix score ")
        + f"{fmt(r['final_prefix'], '.2f')} at the end"
        + (f" (layer {r['top_prefix_layer']}; the top previous-token head is in layer {r['top_prev_layer']})"
           if r.get("top_prefix_layer") is not None and r.get("top_prev_layer") is not None else "") + "; "
        + (f"it rises fastest at {fmt_tokens(r['prefix_jump_peak'])} tokens, "
           f"{'inside' if r['prefix_jump_in_window'] else 'outside'} the ICL window"
           + (f", and {fmt(r['frac_prefix_in_window'], '.0%')} of its rise happens inside it" if r['window_found'] else "")
           if r['prefix_jump_found'] else f"it never rises by {PREFIX_MIN_RISE}")
        + "." for r in table.to_dict("records"))

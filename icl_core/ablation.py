"""Argument 3, direct ablation (chapters/03_ablation): knock out heads at test time, watch ICL.

Olsson et al. (2022), "Argument 3": in small attention-only models, zeroing the output of the
induction heads at test time removes almost all in-context learning, while ablating other heads
leaves it or raises it. Per head and per snapshot we measure the change in ICL score
(:func:`icl_core.analysis.ablations`, full and pattern-preserving) and the projection of the
per-token loss change onto the before-and-after vector of the phase change; at the final snapshot
we ablate whole sets of heads (induction, previous-token, random) in one batched pass
(:func:`icl_core.metrics.ablation_losses` with ``masks``).

Sign conventions: the ICL score is L(late) - L(early) (negative = ICL). ``delta_icl`` = ablated -
clean, so a positive value means the ablation *removes* ICL. ``fraction removed`` =
1 - ICL_ablated / ICL_clean (1 = all ICL gone, 0 = untouched, < 0 = ICL increased).

The chapter loads everything with :func:`compute` (an :class:`Ablation`), draws it with
:mod:`icl_core.plots.ablation` (and the explorers here), and says what it shows with the
``*_text`` / ``*_summary`` functions. Head classes and thresholds: :mod:`icl_core.heads`; the
final-snapshot ablation of head sets (the chapter's table, its causal test and its spread over
seeds): :mod:`icl_core.head_sets`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import analysis as A
from . import metrics as M
from . import verdicts as V
from .verdicts import REMOVAL_THRESHOLD
from .config import icl_indices
# the final-snapshot table of head sets lives in icl_core.head_sets (its names re-exported here)
from .head_sets import (ablation_verdict, final_ablation_table, fraction_removed, heads_mask,  # noqa: F401
                        random_head_sets, seed_spread, set_ablation_icl, table_frame, table_rows)
from .heads import (INDUCTION_THRESHOLD, PREV_TOKEN_THRESHOLD, final_head_scores, head_labels, icl_curve,
                    phase_change_window)

# the chapter's margin (stated in the chapter) lives in icl_core.verdicts; head classes in icl_core.heads


# --- which runs, which heads ---------------------------------------------------------------------

def run_kind(cfg) -> str:
    m = cfg.model
    if not m.attn_only:
        return "with MLPs"
    return "smeared keys" if m.smeared_keys else "attention-only"


def runs_overview(runs: list, prefix_threshold: float = INDUCTION_THRESHOLD,
                  prev_threshold: float = PREV_TOKEN_THRESHOLD) -> pd.DataFrame:
    """One row per run: kind, depth, final ICL, top prefix score and head counts per class."""
    rows = []
    for run in runs:
        lab = head_labels(run, prefix_threshold, prev_threshold)
        df = run.metrics()
        rows.append({"run": run.name, "kind": run_kind(run.config), "layers": run.config.model.n_layers,
                     "heads": lab.size, "final ICL": float(df["icl"].iloc[-1]),
                     "top prefix": float(df["prefix_max"].iloc[-1]),
                     "induction heads": int((lab == "induction").sum()),
                     "previous-token heads": int((lab == "previous-token").sum())})
    return pd.DataFrame(rows).set_index("run")


def evidence_sentence(overview: pd.DataFrame, prefix_threshold: float = INDUCTION_THRESHOLD) -> tuple[list[str], str]:
    """(runs whose analysis is the chapter's main evidence, the sentence saying which and why).

    Main evidence: vanilla attention-only runs with at least one induction head. If there are none,
    the smeared-key runs with induction heads stand in (and the sentence says so). Runs with MLPs
    are always flagged as weaker evidence."""
    has = overview["induction heads"] > 0
    van = overview.index[has & (overview["kind"] == "attention-only")].tolist()
    sm = overview.index[has & (overview["kind"] == "smeared keys")].tolist()
    mlp = overview.index[has & (overview["kind"] == "with MLPs")].tolist()
    names = lambda xs: ", ".join(f"`{x}`" for x in xs)  # noqa: E731
    crit = f"at least one head with final prefix-matching score ≥ {prefix_threshold:g}"
    if van:
        main = van
        s = f"The vanilla attention-only runs with {crit} are {names(van)}; they are the main evidence."
        if sm:
            s += f" The smeared-key runs {names(sm)} also have induction heads and get the same analysis."
    elif sm:
        main = sm
        s = (f"**No vanilla attention-only run in this profile has {crit}**, so (as the paper's argument "
             f"allows) the chapter runs the same analysis on the smeared-key models that do: {names(sm)}. "
             f"Smeared keys change the architecture, so this is evidence about those models.")
    else:
        main = []
        s = (f"**No run in this profile has {crit}**, so the chapter's central test (ablate the induction "
             f"heads) cannot be run; the per-head results below are shown for completeness.")
    if mlp:
        s += (f" The MLP model {names(mlp)} is shown too, but as **weaker evidence**: its MLPs can also "
              f"carry in-context information, and the paper's causal claim is for attention-only models.")
    elif (overview["kind"] == "with MLPs").any():
        s += (f" The MLP model {names(overview.index[overview['kind'] == 'with MLPs'].tolist())} has no "
              f"induction head by this threshold; it is shown as weaker evidence.")
    return main, s


# --- per-head ablations over training -----------------------------------------------------------

def _step_at(run, tokens: float) -> int:
    tps = run.config.tokens_per_step
    s = int(round(tokens / tps))
    if s not in run.steps:
        s = min(run.steps, key=lambda x: abs(x * tps - tokens))
    return s


def before_after_steps(run, min_share: float = 0.5) -> tuple[int, int, str]:
    """(start step, end step, label) of the before-and-after vector: the phase-change window's edges
    (:func:`icl_core.heads.phase_change_window`), or the first and last snapshots if no window is found or
    the window holds less than ``min_share`` of the run's ICL change (first to last snapshot)."""
    w = phase_change_window(run)
    why = w.reason or "the window is a single snapshot"
    if w.found:
        s0, s1 = _step_at(run, w.start), _step_at(run, w.end)
        _, curve = icl_curve(run)  # the curve the window was detected on
        icl = dict(zip(run.steps, curve))
        total = float(curve[-1] - curve[0])
        inside = float(icl[s1] - icl[s0])
        # [book choice] a window that holds under half of the run's ICL change is not "the" phase change
        if s0 != s1 and total < 0 and inside <= min_share * total:
            return s0, s1, (f"the start and end of the phase-change window (steps {s0} → {s1}, "
                            f"{run.tokens(s0):,} → {run.tokens(s1):,} tokens)")
        if s0 != s1:
            why = (f"the detected window, {run.tokens(s0):,} → {run.tokens(s1):,} tokens, holds "
                   f"{inside:+.3f} of the run's {total:+.3f} nats of ICL change, under {min_share:.0%}")
    s0, s1 = run.steps[0], run.steps[-1]
    return s0, s1, (f"the **first and last snapshots** (steps {s0} → {s1}), because no phase-change "
                    f"window was found ({why})")


def ablation_over_training(run, n_steps: int | None = 12, n_examples: int = 64, pca_seed: int = 0,
                           n_steps_full: int | None = None, modes=("pp", "full")) -> dict:
    """Single-head ablations over training (:func:`icl_core.analysis.ablations`, cached in the run).

    Pattern-preserving ablation ('pp', the paper's main view) at ~``n_steps`` snapshots, full
    ablation ('full') at ~``n_steps_full`` (default the same), both always including the two
    before-and-after snapshots (:func:`before_after_steps`, described by ``ba_label``). Returns per
    mode: steps_<mode>, tokens_<mode> (S,), clean_icl_<mode> (S,), delta_icl_<mode> (S, L, H) and
    projection_<mode> (S, L, H) = u . (L_ablated - L_clean), u the before-and-after vector of that
    mode's clean loss vectors; ``seconds`` (compute time of both modes, as cached) and
    ``wall_seconds`` (this call). ``modes``: a subset of ("pp", "full") computes only those (:func:`warm`)."""
    t0 = time.time()
    s0, s1, ba_label = before_after_steps(run)
    n_layers, n_heads = run.config.model.n_layers, run.config.model.n_heads
    out = {"ba_steps": (s0, s1), "ba_label": ba_label, "seconds": 0.0,
           "n_examples": len(run.eval_data.tokens[:n_examples])}
    for mode, pp, n in (("pp", True, n_steps), ("full", False, n_steps if n_steps_full is None else n_steps_full)):
        if mode not in modes:
            continue
        steps = sorted(set(A.select_steps(run, n)) | {s0, s1})
        r = A.ablations(run, steps, n_examples=n_examples, pattern_preserving=pp, pca_seed=pca_seed)
        cvec, avec = r["clean_vec"].numpy(), r["ablated_vec"].numpy()  # (S, N), (S, L*H, N)
        a0, a1 = cvec[steps.index(s0)], cvec[steps.index(s1)]
        u = M.before_after_vector(a0, a1)
        uc = M.before_after_vector(a0, a1, centred=True)  # the global loss shift projected out (issue 22)
        proj = np.stack([M.before_after_projection(u, cvec[i], avec[i]) for i in range(len(steps))])
        projc = np.stack([M.before_after_projection(uc, cvec[i], avec[i]) for i in range(len(steps))])
        out[f"projection_centred_{mode}"] = projc.reshape(len(steps), n_layers, n_heads)
        out[f"global_share_{mode}"] = M.global_shift_share(a0, a1)
        out[f"steps_{mode}"] = np.array(steps)
        out[f"tokens_{mode}"] = r["tokens"].numpy()
        out[f"clean_icl_{mode}"] = r["clean_icl"].numpy()
        out[f"delta_icl_{mode}"] = r["delta_icl"].numpy()
        out[f"projection_{mode}"] = proj.reshape(len(steps), n_layers, n_heads)
        out["seconds"] += float(r["seconds"])
    out["wall_seconds"] = time.time() - t0
    return out


def per_head_summary(res: dict, labels: np.ndarray, small: float = 0.02) -> dict:
    """Final-snapshot per-head facts for the prose: ΔICL (pattern-preserving) of each class and how
    many non-induction heads leave ICL within ``small`` nats or improve it."""
    d = res["delta_icl_pp"][-1]
    p = res["projection_pp"][-1]
    pc = res["projection_centred_pp"][-1]
    ind, non = labels == "induction", labels != "induction"
    return {"n_induction": int(ind.sum()), "n_other": int(non.sum()),
            "induction_delta": d[ind].tolist(), "induction_proj": p[ind].tolist(),
            "other_small_or_negative": int((d[non] <= small).sum()),
            "other_max_delta": float(d[non].max()) if non.any() else float("nan"),
            "top_head": tuple(int(x) for x in np.unravel_index(np.argmax(d), d.shape)),
            "top_delta": float(d.max()), "most_negative_proj": float(p.min()),
            "most_negative_proj_head": tuple(int(x) for x in np.unravel_index(np.argmin(p), p.shape)),
            "induction_proj_centred": pc[ind].tolist(), "most_negative_centred": float(pc.min()),
            "most_negative_centred_head": tuple(int(x) for x in np.unravel_index(np.argmin(pc), pc.shape)),
            "global_share": float(res["global_share_pp"])}


def seed_spread_text(a: "Ablation") -> str:
    """The ablation result over seeds, with its interval (issue 22: no claim on one run)."""
    t = seed_spread(a.overview, a.tables)
    if t.empty:
        return "No model in this profile has two seeds in this chapter, so there is no spread over seeds to report."
    lines = []
    for r in t.to_dict("records"):
        if not r["tested"]:
            lines.append(f"- **{r['model']}** ({r['seeds']} seeds): no seed has an induction head and ICL to remove.")
            continue
        iv = (f"; {t.attrs['level']:.0%} t-interval over the {r['tested']} tested seeds "
              f"[{r['interval low']:.0%}, {r['interval high']:.0%}]" if r["tested"] > 1 else "")
        lines.append(f"- **{r['model']}** ({r['seeds']} seeds): ablating the induction heads (pattern-preserving) "
                     f"removes {r['mean removed']:.0%} of the ICL score on average ({r['removed per seed']}{iv}); "
                     f"the test passes in {r['test passes']} of {r['seeds']} seeds.")
    return ("**Over seeds.** The same table's induction-head row, per model with several seeds (a seed counts as tested "
            "when it has an induction head and ICL to remove):\n\n" + "\n".join(lines))


# --- the chapter: load -> plot -> say ---------------------------------------------------------------

@dataclass
class Ablation:
    """The chapter's runs, their head classes and ablations (:func:`compute`)."""
    runs: dict  # {name: Run}
    overview: pd.DataFrame  # runs_overview(...)
    labels: dict[str, np.ndarray]  # {name: head_labels(run)}
    main_runs: list[str]  # the runs of the main evidence (evidence_sentence)
    evidence: str
    over_training: dict[str, dict]  # {name: ablation_over_training(...)}
    tables: dict[str, dict]  # {name: final_ablation_table(...)}
    n_random_draws: int
    started: float = field(default_factory=time.time)  # when compute() began (the page's compute time)

    @property
    def first(self) -> str:
        """The run the chapter's explorers open on: the first of the main evidence."""
        return self.main_runs[0] if self.main_runs else next(iter(self.runs))


def compute(prof, runs: list[str], n_steps: int = 12, n_examples: int = 64, n_random_draws: int = 20,
            n_steps_full: int = 6, n_table_examples: int = 256) -> Ablation:
    """Classify every run's heads, then ablate single heads over training
    (:func:`ablation_over_training`) and sets of heads at the final snapshot
    (:func:`final_ablation_table`); both are cached in each run's folder after the first build."""
    started = time.time()
    R = {name: prof.run(name) for name in runs}
    overview = runs_overview(list(R.values()))
    labels = {name: head_labels(run) for name, run in R.items()}
    main_runs, evidence = evidence_sentence(overview)
    res = {name: ablation_over_training(run, n_steps=n_steps, n_examples=n_examples, n_steps_full=n_steps_full)
           for name, run in R.items()}
    tables = {name: final_ablation_table(run, labels[name], n_examples=n_table_examples, n_draws=n_random_draws)
              for name, run in R.items()}
    return Ablation(R, overview, labels, main_runs, evidence, res, tables, n_random_draws, started)


#: the independent parts of :func:`compute`'s work for one run, each cached in the run's folder
PARTS = ("pp", "full", "sets")


def warm(run, part: str, n_steps: int = 12, n_examples: int = 64, n_random_draws: int = 20,
         n_steps_full: int = 6, n_table_examples: int = 256) -> float:
    """Compute and cache one part of what :func:`compute` (same arguments) reads for ``run``: the
    single-head ablations over training, pattern-preserving ("pp") or full ("full"), or the head-set
    table at the final snapshot ("sets"). Parts of several runs can run in separate processes
    (``benchmarks/gpu/run_profile.py`` starts them as runs finish training); :func:`compute` then only
    loads. Returns the seconds this call took."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}: expected one of {', '.join(PARTS)}")
    t0 = time.time()
    if part == "sets":
        final_ablation_table(run, head_labels(run), n_examples=n_table_examples, n_draws=n_random_draws)
    else:
        ablation_over_training(run, n_steps=n_steps, n_examples=n_examples, n_steps_full=n_steps_full, modes=(part,))
    return time.time() - t0


def choices_summary(a: Ablation) -> str:
    """The thresholds, the ICL score and how much was ablated, then :func:`evidence_sentence`."""
    r0, t0 = a.over_training[a.first], a.tables[a.first]
    cfg = next(iter(a.runs.values())).config
    late, early = icl_indices(cfg.model.n_ctx)
    return (
        f"*Book choices.* Thresholds: prefix-matching score ≥ {INDUCTION_THRESHOLD:g} for an induction head, "
        f"previous-token score ≥ {PREV_TOKEN_THRESHOLD:g} for a previous-token head. ICL is L({late}) − L({early}) "
        f"(the paper's indices 500 and 50 rescaled to a {cfg.model.n_ctx}-token context), estimated as in the "
        f"rest of the book by the mean loss in a band of indices around each (see the introduction). The paper "
        f"ablates at all of its snapshots on 10,000 examples; to keep the chapter to minutes on a CPU we "
        f"ablate single heads on the first {r0['n_examples']} evaluation windows at {len(r0['steps_pp'])} snapshots "
        f"spread evenly in log(tokens) (pattern-preserving) and {len(r0['steps_full'])} (full ablation), and "
        f"the final-snapshot table uses {t0['n_examples']} windows (numbers for run `{a.first}`).\n\n" + a.evidence
    )


def _explorer(a: Ablation, plot, title: str):
    from . import widgets as W

    figs = {(name,): plot(r, a.labels[name], title=title.format(name=name, kind=a.overview.loc[name, "kind"]))
            for name, r in a.over_training.items()}
    return W.image_grid_selector(figs, names=("run",), initial=(a.first,))


def delta_icl_explorer(a: Ablation):
    """A static widget: ΔICL of each head over training, one figure per run."""
    from .plots.ablation import plot_delta_icl_over_training

    return _explorer(a, plot_delta_icl_over_training, "run {name} ({kind}): ΔICL when one head is ablated")


def projection_explorer(a: Ablation):
    """A static widget: each head's projection onto the before-and-after vector, one figure per run."""
    from .plots.ablation import plot_projection_over_training

    return _explorer(a, plot_projection_over_training,
                     "run {name}: projection of each head's ablation onto the before-and-after vector")


def per_head_text(a: Ablation) -> str:
    """Per run: the head whose ablation removes the most ICL at the last snapshot, and its induction heads."""
    lines = []
    for name, r in a.over_training.items():
        s = per_head_summary(r, a.labels[name])
        l, h = s["top_head"]
        txt = (f"`{name}`: the head whose ablation removes the most ICL at the last snapshot is L{l}H{h} "
               f"(class *{a.labels[name][l, h]}*, ΔICL {s['top_delta']:+.3f} nats)")
        if s["n_induction"]:
            txt += (f"; its {s['n_induction']} induction head{'s' if s['n_induction'] > 1 else ''} have ΔICL "
                    + ", ".join(f"{d:+.3f}" for d in s["induction_delta"]))
        txt += (f"; {s['other_small_or_negative']} of its {s['n_other']} non-induction heads remove at most "
                f"0.02 nats of ICL or increase it.")
        lines.append("- " + txt)
    return "At the last snapshot, with pattern-preserving ablation:\n\n" + "\n".join(lines)


def final_points(a: Ablation) -> dict:
    """{run: (final prefix scores, final ΔICL (pattern-preserving), head labels)} per head."""
    return {name: (final_head_scores(a.runs[name])[0].numpy(), r["delta_icl_pp"][-1], a.labels[name])
            for name, r in a.over_training.items()}


def projection_windows_text(a: Ablation) -> str:
    """Between which snapshots each run's before-and-after vector is taken."""
    return "\n".join(f"- `{name}`: u is taken between {r['ba_label']}." for name, r in a.over_training.items())


def projection_specific(s: dict, labels: np.ndarray) -> bool | None:
    """Is the before-and-after projection specific to induction heads? True when the most negative
    *centred* projection (global loss shift removed) belongs to an induction head; None without one."""
    if not s["n_induction"]:
        return None
    return bool(labels[s["most_negative_centred_head"]] == "induction")


def projection_text(a: Ablation) -> str:
    """Per run: the most negative projection at the last snapshot onto the paper's vector and onto the
    centred one (the window's mean loss change removed), and whether the centred one singles out an
    induction head; then how many runs with induction heads it does."""
    lines, spec = [], []
    for name, r in a.over_training.items():
        s = per_head_summary(r, a.labels[name])
        l, h = s["most_negative_proj_head"]
        lc, hc = s["most_negative_centred_head"]
        ok = projection_specific(s, a.labels[name])
        if ok is not None and name in a.main_runs:
            spec.append(ok)
        lines.append(f"- `{name}` ({s['global_share']:.0%} of the change's squared length is the uniform shift): "
                     f"most negative projection L{l}H{h} ({a.labels[name][l, h]}, {s['most_negative_proj']:+.3f})"
                     + ("; induction heads " + ", ".join(f"{p:+.3f}" for p in s["induction_proj"]) if s["n_induction"] else "")
                     + f". Centred: L{lc}H{hc} ({a.labels[name][lc, hc]}, {s['most_negative_centred']:+.3f})"
                     + ("; induction heads " + ", ".join(f"{p:+.3f}" for p in s["induction_proj_centred"]) if s["n_induction"] else ""))
    head = ("**Is the vector specific to induction heads?** Over the phase-change window the loss also falls on "
            "tokens that induction cannot help, so the paper's vector mixes the induction effect with a global "
            "shift. Centring it (subtracting the mean change before normalising) removes the uniform part; a head "
            "whose ablation raises the loss everywhere then no longer looks like it undoes the phase change. ")
    if spec:
        vd = V.count_verdict(sum(spec), len(spec), null=V.NOT_REPRODUCED)
        head += (f"On the centred vector, the most negative projection belongs to an induction head in {vd.k} of "
                 f"{vd.n} main-evidence runs: that the vector singles out induction heads is {vd.bold}.")
    else:
        head += "No main-evidence run has an induction head, so specificity cannot be tested here."
    return head + "\n\n" + "\n".join(lines)


def verdicts(a: Ablation) -> dict[str, tuple[bool | None, str]]:
    """{run: :func:`ablation_verdict`} at :data:`REMOVAL_THRESHOLD`."""
    return {name: ablation_verdict(name, a.tables[name], threshold=REMOVAL_THRESHOLD) for name in a.runs}


def verdicts_text(a: Ablation) -> str:
    """How the random sets are drawn, then each run's verdict (main evidence first)."""
    v = verdicts(a)
    order = a.main_runs + [n for n in a.runs if n not in a.main_runs]
    lines = []
    for name in order:
        ok, s = v[name]
        tag = " *(with MLPs: weaker evidence)*" if a.overview.loc[name, "kind"] == "with MLPs" else ""
        tag = tag or (" *(smeared keys)*" if a.overview.loc[name, "kind"] == "smeared keys" else "")
        lines.append(f"- {s}{tag}")
    drawn = [t for t in a.tables.values() if t["random_sets"]]
    n = a.n_random_draws
    intro = ("For each run the random sets are sets of as many non-induction heads as it has induction heads: "
             "all such sets when there are at most " + str(n) + ", otherwise " + str(n)
             + " distinct random ones; the interval holds the central "
             + f"{drawn[0]['interval']:.0%} of them (pattern-preserving ablation only).\n\n") if drawn else ""
    return intro + "\n".join(lines)


def causal_verdict(a: Ablation) -> V.Verdict:
    """The causal argument's verdict (:func:`chapter_summary`): :func:`icl_core.verdicts.count_verdict` of
    the runs of the main evidence whose :func:`ablation_verdict` passes; not testable without such runs."""
    v = verdicts(a)
    return V.count_verdict(sum(bool(v[n][0]) for n in a.main_runs), len(a.main_runs), null=V.NOT_REPRODUCED)


def chapter_summary(a: Ablation) -> str:
    """Is the causal argument reproduced, and what the ablations cost."""
    main_runs = a.main_runs
    if not main_runs:
        summary = ("No run in this profile has an induction head by the threshold, so the central test of this "
                   "argument cannot be run here; the per-head results above show which heads matter most.")
    else:  # icl_core.verdicts: "reproduced" needs the test to pass in every run of the main evidence, and >= MIN_RUNS
        vd = causal_verdict(a)
        summary = (f"The causal test (ablating the induction heads removes at least {REMOVAL_THRESHOLD:.0%} of the ICL score "
                   f"while as many random heads remove far less) passes in {vd.k} of {vd.n} runs of the main evidence "
                   f"({', '.join(f'`{n}`' for n in main_runs)}): the paper's causal argument is {vd.bold} at this scale.")
    res, tables = a.over_training, a.tables
    seconds = sum(r["seconds"] for r in res.values()) + sum(t["seconds"] for t in tables.values())
    return (f"**Summary.** {summary}\n\n*Compute.* The ablations took {seconds:.0f} s when they were computed "
            f"(per run: " + ", ".join(f"`{n}` {res[n]['seconds'] + tables[n]['seconds']:.0f} s" for n in a.runs)
            + f"); they are cached in each run's folder, and this page took {time.time() - a.started:.0f} s to compute.")

"""Argument 2, co-perturbation (chapters/02_coperturbation): smeared keys vs vanilla twins.

The paper (Olsson et al. 2022, "Argument 2") changes the architecture so that induction heads can
form in a single layer: each head's keys become k'_j = s k_j + (1 - s) k_{j-1}, s = sigma(alpha_h)
learned. If induction heads carry in-context learning, the ICL gain must move with them: the
smeared 1-layer model should gain induction heads and ICL that its vanilla twin lacks, and the
smeared 2-layer model's phase change should come earlier.

Everything here reads the cheap per-snapshot metrics logged during training
(:meth:`icl_core.runs.Run.metrics`): no model is re-run. Verdict sentences are generated from the
data with the thresholds printed, so the chapter's prose stays true under every profile.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import icl_indices
from .curves import Window
from .curves import phase_change_window as curve_window
from . import verdicts as V
from .verdicts import SMEAR_ICL_GAIN as ICL_GAIN
from .heads import INDUCTION_THRESHOLD, phase_change_window
from .prose import fmt_tokens

# the chapter's margins (printed in the chapter) live in icl_core.verdicts; head classes in icl_core.heads


@dataclass
class Curves:
    """One run's per-snapshot curves (from the training log's cheap metrics)."""
    name: str
    seed: int
    n_layers: int
    smeared: bool
    tokens: np.ndarray  # (S,)
    loss: np.ndarray  # (S,) eval loss, nats
    icl: np.ndarray  # (S,) ICL score L(late) - L(early), nats
    prefix_max: np.ndarray  # (S,) top prefix-matching score over heads
    smear: np.ndarray | None  # (S, L, H) sigma(alpha_h), smeared runs only
    window: Window = field(default=None)


def curves_from_metrics(name: str, seed: int, n_layers: int, smeared: bool, df: pd.DataFrame,
                        window: Window | None = None, **window_kw) -> Curves:
    """:class:`Curves` from a :meth:`Run.metrics` frame. ``window`` defaults to the one detected
    from its ICL curve (:func:`icl_core.curves.phase_change_window`)."""
    t = df["tokens"].to_numpy(dtype=float)
    smear = None
    if smeared and "smear" in df and df["smear"].notna().all():
        smear = np.asarray(df["smear"].tolist(), dtype=float)
    w = window if window is not None else curve_window(t, df["icl"].to_numpy(dtype=float), **window_kw)
    return Curves(name, seed, n_layers, smeared, t, df["loss"].to_numpy(dtype=float),
                  df["icl"].to_numpy(dtype=float), df["prefix_max"].to_numpy(dtype=float), smear, w)


def load_curves(run, **window_kw) -> Curves:
    """A run's curves, with its phase-change window (:func:`icl_core.heads.phase_change_window`).

    [book choice] An ICL window counts as a phase change only if the run forms an induction head
    (top prefix-matching score reaching :data:`icl_core.heads.INDUCTION_THRESHOLD`); an ICL drop
    without one (e.g. from in-context token statistics) is reported as no phase change."""
    m = run.config.model
    df = run.metrics()
    w = phase_change_window(run, require_induction_head=True, **window_kw)
    return curves_from_metrics(run.name, run.config.train.seed, m.n_layers, m.smeared_keys, df, window=w)


def load_pairs(prof, pairs: dict[str, list], **window_kw) -> dict[str, list[tuple[Curves, Curves]]]:
    """{depth label: [(vanilla Curves, smeared Curves) per seed]} from the chapter's ``pairs``.

    Checks that each pair really is a vanilla/smeared twin (same depth and seed)."""
    out = {}
    for label, plist in pairs.items():
        out[label] = []
        for van, sm in plist:
            a, b = load_curves(prof.run(van), **window_kw), load_curves(prof.run(sm), **window_kw)
            if a.smeared or not b.smeared:
                raise ValueError(f"pair {van}/{sm}: expected a vanilla run then a smeared-key run")
            if a.n_layers != b.n_layers or a.seed != b.seed:
                raise ValueError(f"pair {van}/{sm} differs in depth or seed ({a.n_layers}/{b.n_layers} layers, "
                                 f"seeds {a.seed}/{b.seed}); twins must be trained identically")
            out[label].append((a, b))
    return out


def pair_table(pairs: dict[str, list[tuple[Curves, Curves]]],
               prefix_threshold: float = INDUCTION_THRESHOLD) -> pd.DataFrame:
    """One row per pair: window start/end (tokens), final ICL and final top prefix score of each twin.

    "Final" is at the twins' common budget (``compared at``: the shorter run's last snapshot; the
    longer twin is read at its last snapshot at or before it), so twins trained for different
    numbers of tokens are compared after the same training. Windows are each run's own.
    ``icl_gain`` = vanilla final ICL - smeared final ICL (positive: the smeared twin learns more in
    context, since a more negative ICL score is more in-context learning)."""
    rows = []
    for label, plist in pairs.items():
        for a, b in plist:
            budget = float(min(a.tokens[-1], b.tokens[-1]))
            row = {"model": label, "layers": a.n_layers, "seed": a.seed, "vanilla": a.name, "smeared": b.name,
                   "compared at": budget}
            for tag, c in (("vanilla", a), ("smeared", b)):
                i = max(int(np.searchsorted(c.tokens, budget, side="right")) - 1, 0)
                row[f"{tag} window start"] = c.window.start if c.window.found else np.nan
                row[f"{tag} window end"] = c.window.end if c.window.found else np.nan
                row[f"{tag} final ICL"] = float(c.icl[i])
                row[f"{tag} top prefix"] = float(c.prefix_max[i])
            row["ICL gain (smeared)"] = row["vanilla final ICL"] - row["smeared final ICL"]
            row["smeared induction head"] = row["smeared top prefix"] >= prefix_threshold
            row["vanilla induction head"] = row["vanilla top prefix"] >= prefix_threshold
            rows.append(row)
    return pd.DataFrame(rows)


def one_layer_counts(table: pd.DataFrame, prefix_threshold: float = INDUCTION_THRESHOLD,
                     icl_gain: float = ICL_GAIN) -> V.Verdict:
    """The 1-layer claim as a :class:`icl_core.verdicts.Verdict` over seeds (:func:`one_layer_verdict`
    states it): a seed counts when its smeared model has top prefix score > ``prefix_threshold`` and ICL
    better by >= ``icl_gain`` nats than its vanilla twin; reproduced needs >= MIN_RUNS seeds."""
    t = table[table["layers"] == 1]
    k = int(((t["smeared top prefix"] > prefix_threshold) & (t["ICL gain (smeared)"] >= icl_gain)).sum())
    return V.count_verdict(k, len(t), null=V.NOT_REPRODUCED, unit="seeds")


def one_layer_verdict(table: pd.DataFrame, prefix_threshold: float = INDUCTION_THRESHOLD,
                      icl_gain: float = ICL_GAIN) -> tuple[bool | None, str]:
    """(passed, sentence) for the 1-layer claim: for every seed the smeared model has top prefix
    score > ``prefix_threshold`` and ICL better by >= ``icl_gain`` nats than its vanilla twin.
    ``passed`` is True when that holds in every seed and at least :data:`icl_core.verdicts.MIN_RUNS`
    seeds, 'partly' when it holds in every seed but fewer, False when a seed fails, None when the
    table has no 1-layer pair."""
    t = table[table["layers"] == 1]
    if t.empty:
        return None, "There is no 1-layer pair in this profile, so the 1-layer claim is not tested."
    van_none = ~t["vanilla induction head"]
    v = one_layer_counts(table, prefix_threshold, icl_gain)
    n, k = v.n, v.k
    per_seed = "; ".join(
        f"seed {r.seed}: top prefix score {r['smeared top prefix']:.2f} (smeared) vs "
        f"{r['vanilla top prefix']:.2f} (vanilla), ICL gain {r['ICL gain (smeared)']:+.2f} nats"
        for _, r in t.iterrows())
    crit = (f"top prefix-matching score above {prefix_threshold:g} and an ICL score at least "
            f"{icl_gain:g} nats better than its vanilla twin")
    if k == n:
        s = (f"**{'Reproduced' if v.status == V.REPRODUCED else 'Partly reproduced'} at this scale** ({v.text}). "
             f"For all {n} seeds the smeared 1-layer model has a {crit} ({per_seed}).")
        if van_none.all():
            s += f" No vanilla 1-layer model has a head above {prefix_threshold:g}."
        return (True if v.status == V.REPRODUCED else V.PARTLY), s
    return False, (f"**{v.status[0].upper() + v.status[1:]} at this scale.** Only {k} of {n} smeared 1-layer models have a {crit} "
                   f"({per_seed}).")


def two_layer_verdict(table: pd.DataFrame) -> V.Verdict:
    """:func:`two_layer_comparison`'s verdict as a :class:`icl_core.verdicts.Verdict` over the seeds of
    the pairs with 2 or more layers: 'earlier' (with or without overlapping windows) is
    :func:`icl_core.verdicts.count_verdict` of every seed, as the chapter states it; 'later' is not
    reproduced; 'mixed' counts the seeds whose smeared window starts first; 'not resolved' (a twin
    without a window) and 'untested' are not testable."""
    verdict, _ = two_layer_comparison(table)
    t = table[table["layers"] >= 2]
    both = t[t["vanilla window start"].notna() & t["smeared window start"].notna()]
    n = len(both)
    if verdict.startswith("earlier"):
        return V.count_verdict(n, n, unit="seeds")
    if verdict == "later":
        return V.Verdict(V.NOT_REPRODUCED, 0, n, "seeds")
    if verdict == "mixed":
        k = int((both["smeared window start"] < both["vanilla window start"]).sum())
        return V.count_verdict(k, n, unit="seeds")
    return V.Verdict(V.NOT_TESTABLE, 0, 0, "seeds")


def window_interval(start: float, end: float) -> str:
    return f"[{fmt_tokens(start)}, {fmt_tokens(end)}] tokens" if np.isfinite(start) else "no window"


def two_layer_comparison(table: pd.DataFrame) -> tuple[str, str]:
    """(verdict, sentence) comparing the smeared and vanilla windows of the pairs with 2 or more
    layers, per seed; with several depths (e.g. 2L and 3L pairs), per depth, then combined.

    verdict is one of 'earlier', 'earlier (overlapping windows)', 'later', 'mixed' (seeds disagree or
    windows start at the same snapshot), 'not resolved' or 'untested'. Windows live on the snapshot
    grid, so "same" means the same snapshot. 'earlier' means every seed's smeared window starts before its vanilla twin's and
    ends before the vanilla window starts; '(overlapping windows)' drops the second condition.
    'not resolved' when a twin has no detected window (e.g. no vanilla phase change in the profile).
    Combined over depths: the verdict of the depths that are resolved (all of them agreeing, else
    'mixed'), or 'not resolved' when none is.
    """
    t = table[table["layers"] >= 2]
    if t.empty:
        return "untested", "There is no pair with 2 or more layers in this profile."
    depths = sorted(set(t["layers"]))
    if len(depths) == 1:
        return _window_verdict(t)
    got = {d: _window_verdict(t[t["layers"] == d]) for d in depths}
    resolved = {v for v, _ in got.values() if v != "not resolved"}
    verdict = "not resolved" if not resolved else resolved.pop() if len(resolved) == 1 else "mixed"
    return verdict, " ".join(f"*{d} layers:* {sent}" for d, (_, sent) in got.items())


def _window_verdict(t: pd.DataFrame) -> tuple[str, str]:
    depth = f"{int(t['layers'].iloc[0])}-layer"
    parts, rel = [], []
    for _, r in t.iterrows():
        vs, ve, ss, se = (r["vanilla window start"], r["vanilla window end"],
                          r["smeared window start"], r["smeared window end"])
        parts.append(f"seed {r.seed}: smeared {window_interval(ss, se)}, vanilla {window_interval(vs, ve)}")
        if not (np.isfinite(vs) and np.isfinite(ss)):
            rel.append("none")
        elif ss < vs:
            rel.append("disjoint" if se <= vs else "overlap")
        elif ss > vs:
            rel.append("later")
        else:
            rel.append("same")
    detail = "; ".join(parts)
    if "none" in rel:
        missing = []
        if t["vanilla window start"].isna().any():
            missing.append(f"the vanilla {depth} model" + (" (some seeds)" if t["vanilla window start"].notna().any() else ""))
        if t["smeared window start"].isna().any():
            missing.append(f"the smeared {depth} model" + (" (some seeds)" if t["smeared window start"].notna().any() else ""))
        verb = "have" if len(missing) > 1 else "has"
        return "not resolved", (f"**Not resolved in this profile:** {' and '.join(missing)} {verb} no phase "
                                f"change (no ICL window in which an induction head forms, top prefix-matching "
                                f"score ≥ {INDUCTION_THRESHOLD}), so there is nothing to compare ({detail}).")
    seeds = V.count_verdict(len(rel), len(rel), unit="seeds").text  # every seed agrees: reproduced needs >= MIN_RUNS
    if all(x == "disjoint" for x in rel):
        return "earlier", (f"**Earlier**: {seeds}. For every seed the smeared {depth} window ends before its vanilla "
                           f"twin's begins ({detail}).")
    if all(x in ("disjoint", "overlap") for x in rel):
        return "earlier (overlapping windows)", (
            f"**Earlier, but the windows overlap**: {seeds}. For every seed the smeared {depth} window starts "
            f"first, though the intervals overlap ({detail}).")
    if all(x == "later" for x in rel):
        return "later", f"**Not reproduced: later.** The smeared {depth} windows start after the vanilla ones ({detail})."
    n_early = sum(x in ("disjoint", "overlap") for x in rel)
    n_same = rel.count("same")
    n_late = rel.count("later")
    return "mixed", (f"**Not resolved:** the smeared window starts earlier for {n_early}, at the same "
                     f"snapshot for {n_same} and later for {n_late} of {len(rel)} seeds ({detail}).")


def seed_band(curves: list[Curves], attr: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mean, min, max) over seeds of a per-snapshot curve, on the first run's token grid
    (interpolated in log tokens if the grids differ). Snapshot 0 is dropped (log axis)."""
    t = curves[0].tokens
    keep = t > 0
    t = t[keep]
    ys = []
    for c in curves:
        y = getattr(c, attr)
        if len(c.tokens) == len(curves[0].tokens) and np.allclose(c.tokens, curves[0].tokens):
            ys.append(y[keep])
        else:
            k = c.tokens > 0
            ys.append(np.interp(np.log(t), np.log(c.tokens[k]), y[k]))
    Y = np.stack(ys)
    return t, Y.mean(0), Y.min(0), Y.max(0)


def table_for_display(table: pd.DataFrame) -> pd.DataFrame:
    """The pair table with tokens written compactly (for the chapter)."""
    out = table.copy()
    for tag in ("vanilla", "smeared"):
        out[f"{tag} window"] = [window_interval(s, e) for s, e in
                                zip(out.pop(f"{tag} window start"), out.pop(f"{tag} window end"))]
    out["compared at"] = [fmt_tokens(x) for x in out["compared at"]]
    cols = ["model", "seed", "vanilla", "smeared", "vanilla window", "smeared window", "compared at", "vanilla final ICL",
            "smeared final ICL", "ICL gain (smeared)", "vanilla top prefix", "smeared top prefix"]
    return out[cols].round(3).set_index(["model", "seed"])


def smear_summary(pairs: dict[str, list[tuple[Curves, Curves]]]) -> str:
    """A sentence on how much the heads smear at the end: min and max final sigma(alpha) per model."""
    parts = []
    for label, plist in pairs.items():
        finals = [b.smear[-1] for _, b in plist if b.smear is not None]
        inits = [b.smear[0] for _, b in plist if b.smear is not None]
        if not finals:
            continue
        f, i = np.concatenate([x.ravel() for x in finals]), np.concatenate([x.ravel() for x in inits])
        parts.append(f"{label}: σ(α) starts at {i.mean():.2f} and ends between {f.min():.2f} and {f.max():.2f} "
                     f"across heads and seeds")
    if not parts:
        return "No smeared run logged σ(α)."
    return "; ".join(parts) + "."


def summary_sentence(one_layer_ok: bool | str | None, two_layer: str) -> str:
    """The chapter's closing sentence, from the two verdicts."""
    one = {True: "the smeared one-layer models gain an induction head and in-context learning that their "
                 "vanilla twins lack, for every seed",
           V.PARTLY: "the smeared one-layer models gain an induction head and in-context learning that their "
                     f"vanilla twins lack for every seed, but there are fewer than {V.MIN_RUNS} seeds (partly reproduced)",
           False: "the one-layer prediction fails for at least one seed",
           None: "the one-layer prediction is not tested"}[one_layer_ok]
    two = {"earlier": "the smeared multi-layer phase change comes earlier for every seed, at every depth where "
                      "both twins have one",
           "earlier (overlapping windows)": "the smeared multi-layer phase change starts earlier for every seed, "
                                            "with overlapping windows, at every depth where both twins have one",
           "later": "the smeared multi-layer phase change comes later, against the prediction",
           "mixed": "the multi-layer comparison is not resolved (the seeds or depths disagree, or the windows coincide)",
           "not resolved": "the multi-layer comparison is not resolved (a twin has no phase change)",
           "untested": "the multi-layer comparison is not tested"}[two_layer]
    if one_layer_ok is True and two_layer.startswith("earlier"):
        tail = ("So the same architectural change moves the induction heads and the in-context learning "
                "together, as the paper found. Co-perturbation does not by itself show that the heads "
                "*cause* the learning; the next chapter removes them to test that.")
    elif one_layer_ok is True:
        tail = ("The one-layer result is the paper's central co-perturbation evidence; the timing "
                "comparison adds nothing at this scale.")
    elif one_layer_ok == V.PARTLY:
        tail = (f"With fewer than {V.MIN_RUNS} seeds the one-layer result points the paper's way but does not "
                "reproduce it; the figures above show every seed.")
    else:
        tail = ("At this scale the chapter does not reproduce the paper's co-perturbation evidence; the "
                "figures above show how far the runs got.")
    return f"{one[0].upper() + one[1:]}; {two}. {tail}"


# --- the chapter: load -> plot -> say ---------------------------------------------------------------

@dataclass
class Coperturbation:
    """The chapter's vanilla/smeared pairs, their table and verdicts (:func:`compute`)."""
    profile: object
    pairs: dict[str, list]  # {depth label: [[vanilla run name, smeared run name], ...]}
    data: dict[str, list[tuple[Curves, Curves]]]  # load_pairs(...)
    table: pd.DataFrame  # pair_table(data)
    one_layer: tuple[bool | None, str]  # one_layer_verdict(table)
    two_layer: tuple[str, str]  # two_layer_comparison(table)


def compute(prof, pairs: dict[str, list]) -> Coperturbation:
    """Load the pairs' curves (:func:`load_pairs`), tabulate them and decide both verdicts."""
    data = load_pairs(prof, pairs)
    table = pair_table(data)
    return Coperturbation(prof, pairs, data, table, one_layer_verdict(table), two_layer_comparison(table))


def runs_summary(res: Coperturbation) -> str:
    """The runs, the ICL score and the book's choices (including the initial smear, read from the
    first smeared model at its first snapshot)."""
    prof, pairs = res.profile, res.pairs
    first = prof.run(pairs[next(iter(pairs))][0][1])
    cfg = first.config
    late, early = icl_indices(cfg.model.n_ctx)
    n_seeds = {label: len(p) for label, p in res.data.items()}
    alpha0 = float(first.load(first.steps[0]).blocks[0].attn.alpha.detach().mean())
    sigma0 = 1 / (1 + np.exp(-alpha0))
    return (
        f"The **{prof.name}** profile trains {sum(n_seeds.values())} vanilla/smeared pairs: "
        + ", ".join(f"{n} seed{'s' if n > 1 else ''} of the {label} pair" for label, n in n_seeds.items())
        + f". Every model has d_model = {cfg.model.d_model}, {cfg.model.n_heads} heads per layer, "
        f"{'no MLPs' if cfg.model.attn_only else 'MLPs'}, "
        f"a context of {cfg.model.n_ctx} tokens and {len(first.steps)} snapshots; "
        + "; ".join(f"the {tag} twins see {', '.join(sorted({f'{prof.run_config(p[i]).train.total_tokens:,}' for ps in pairs.values() for p in ps}))} training tokens"
                    for i, tag in ((0, "vanilla"), (1, "smeared")))
        + f". ICL is L({late}) − L({early}) in nats on the fixed evaluation "
        f"set (negative = in-context learning), estimated as everywhere in the book by the mean loss in a band "
        f"of indices around each (see the introduction).\n\n"
        f"*Book choices.* The paper's smeared-key models are 1 and 2 layers of its small-model family "
        f"(d_model 768, 12 heads, context 8192); ours are much smaller, trained on far fewer tokens, with "
        f"{', '.join(f'{n} seed' + ('s' if n > 1 else '') + f' at {label}' for label, n in n_seeds.items())}. The ICL indices are the paper's 500 and 50 rescaled to "
        f"the context ({late} and {early} here). The paper does not say how α is initialised; we start "
        f"α = {alpha0:g}, so σ(α) = {sigma0:.2f}: at initialisation each key is {sigma0:.0%} its own token's "
        f"and {1 - sigma0:.0%} the previous token's. "
        f"A head counts as an induction head when its prefix-matching score is at least "
        f"{INDUCTION_THRESHOLD:g}."
    )


def one_layer_summary(res: Coperturbation) -> str:
    """The one-layer test and its verdict (:func:`one_layer_verdict`)."""
    return (f"**One layer.** The test: for every seed the smeared one-layer model has a top prefix-matching "
            f"score above {INDUCTION_THRESHOLD:g} and an ICL score at least {ICL_GAIN:g} nats more negative than "
            f"its vanilla twin's after the same training (the shorter twin's last snapshot). " + res.one_layer[1])


def two_layer_summary(res: Coperturbation) -> str:
    """The multi-layer test and its verdict (:func:`two_layer_comparison`)."""
    return ("**Two or more layers.** The paper's prediction is that the smeared two-layer window comes earlier than its "
            "vanilla twin's; we test it at every depth the profile pairs (only a vanilla model with a phase change gives a window to compare with). We call it *earlier* when, for every seed, the smeared window ends before the "
            "vanilla one starts, and *earlier, but overlapping* when it only starts first; windows are "
            "located on the snapshot grid, so the intervals below are the resolution of the comparison. "
            + res.two_layer[1])


def chapter_summary(res: Coperturbation) -> str:
    """The closing summary with its thresholds (:func:`summary_sentence`)."""
    return (f"**Summary** (thresholds: top prefix score > {INDUCTION_THRESHOLD:g}, ICL gain ≥ {ICL_GAIN:g} nats). "
            + summary_sentence(res.one_layer[0], res.two_layer[0]))

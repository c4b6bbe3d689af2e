"""Argument 6, continuity (chapters/06_continuity): the same signatures across depth, width, MLPs and corpus.

A family of models that differ in one thing at a time; for each, the Argument-1 numbers
(:func:`icl_core.cooccurrence.cooccurrence_row`), its size, where its top induction head sits, and
ICL with other index pairs. :func:`claims_table` puts the paper's continuity claims beside them,
each with a verdict by a stated rule. The chapter loads with :func:`compute`, adds
:func:`index_pairs` and :func:`family_pca`, and says what they show with the ``*_summary``
functions. Figures: :mod:`icl_core.plots.continuity`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import analysis as A
from . import loss_pca as LP
from . import metrics as M
from . import verdicts as V
from .config import ModelConfig, icl_indices
from .cooccurrence import cooccurrence_row, cooccurrence_table
from .curves import Window
from .heads import INDUCTION_THRESHOLD, phase_change_window
from .model import Transformer
from .prose import fmt_tokens, join, span_tokens
from .runs import Run


def model_size(cfg: ModelConfig) -> dict:
    """Parameter counts (all, and non-embedding: without W_E, W_U and W_pos)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = model.n_params()
    emb = sum(p.numel() for n, p in model.named_parameters() if n in ("W_E", "W_U", "W_pos"))
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
    losses = res["losses"]
    n_ctx = run.config.model.n_ctx
    late, _ = icl_indices(n_ctx)
    rows = []
    for e_paper, e in zip(early, scaled_early_indices(n_ctx, early)):
        for s in range(len(losses)):
            rows.append({"run": run.name, "tokens": float(res["tokens"][s]), "late": late, "early": e,
                         "early_paper": e_paper,
                         "icl": M.icl_score_from_losses(losses[s], indices=(late, e))})
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
            f"{join(sorted(set(f['corpus'])))}, trained for {span_tokens(f['tokens'])} tokens. The paper's models span 1–6 layers at d_model 768 "
            "(small models) and 13M–13B parameters (full-scale), trained on about 10B tokens: every "
            "claim below holds at most for the range above, not beyond it.")


def _mark(ok_all: bool, ok_some: bool, n_runs: int) -> str:
    """A claim tested by a rule rather than by counting runs (e.g. 'both parts'): 'reproduced' also
    needs :data:`icl_core.verdicts.MIN_RUNS` models behind it, else it is at most 'partly'."""
    if ok_all and n_runs >= V.MIN_RUNS:
        return V.REPRODUCED
    return V.PARTLY if ok_all or ok_some else V.NOT_REPRODUCED


def _count(k: int, n: int) -> str:
    """:func:`icl_core.verdicts.count_verdict` of a claim that holds in ``k`` of ``n`` models."""
    return V.count_verdict(k, n, null=V.NOT_REPRODUCED, unit="models").status


def claims_table(family: pd.DataFrame, pairs: pd.DataFrame | None = None,
                 pca: LP.LossPCA | None = None) -> pd.DataFrame:
    """The paper's Argument-6 claims beside this family's numbers, each marked reproduced / partly /
    not reproduced (or not testable) by a stated rule; counted claims go through
    :func:`icl_core.verdicts.count_verdict`, the PCA row quotes ``pca``'s one verdict."""
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
        _count(ih, n), f"all (≥ {V.MIN_RUNS}): reproduced; some: partly")
    co = int(multi["verdict"].str.startswith("co-occur").sum())
    add("In each, induction heads form inside the ICL phase change", "yes",
        f"{co} of {n} models (top prefix score jumps inside the ICL window)",
        _count(co, n), f"all (≥ {V.MIN_RUNS}): reproduced; some: partly")
    if len(single) and n:
        s_ih = bool((single["final_prefix"] < INDUCTION_THRESHOLD).all())
        # less negative = less ICL: every 1-layer model by at least ICL_MARGIN nats less than every ≥2-layer one
        s_less = bool(single["final_icl"].min() - multi["final_icl"].max() >= V.ICL_MARGIN)
        add("1-layer models form no induction heads and have less ICL", "yes",
            f"1-layer top prefix {single['final_prefix'].max():.2f}; final ICL {single['final_icl'].mean():+.2f} "
            f"vs ≥2-layer {multi['final_icl'].min():+.2f} to {multi['final_icl'].max():+.2f}",
            _mark(s_ih and s_less, s_ih or s_less, n), f"both parts (less ICL: by ≥ {V.ICL_MARGIN} nats), "
            f"≥ {V.MIN_RUNS} models: reproduced; one: partly")
    if n >= 2:
        v = multi["final_icl"].to_numpy()
        spread = float((v.max() - v.min()) / max(abs(v.mean()), 1e-9))
        add("The amount of final ICL is similar across sizes", "≈0.4 nats at every size",
            f"{v.min():+.2f} to {v.max():+.2f} nats (spread {spread:.0%} of the mean)",
            _mark(spread <= 0.25 and v.mean() < 0, spread <= 0.5 and v.mean() < 0, n),
            "spread (max − min)/|mean| ≤ 25%: reproduced; ≤ 50%: partly")
    wf = multi[multi["window_found"]]
    if len(wf) >= 2:
        r = float(wf["window_peak"].max() / wf["window_peak"].min())
        add("The phase change happens at a similar point in training", "≈2.5–5B tokens for all small models",
            f"window peaks {fmt_tokens(wf['window_peak'].min())}–{fmt_tokens(wf['window_peak'].max())} tokens "
            f"(ratio {r:.1f}) in {len(wf)} of {n} models",
            _mark(r <= 2 and len(wf) == n, r <= 4, n),
            "all have a window and peaks within ×2: reproduced; within ×4: partly")
    if len(attn):
        ok = attn[attn["final_prefix"] >= INDUCTION_THRESHOLD]
        last = int((ok["top_layer_from_end"] == 0).sum())
        add("Attention-only: induction heads sit in the last layer", "last layer",
            f"{len(ok)} of {len(attn)} models have an induction head; in {last} of them the top one is in the last layer",
            _count(last, len(ok)), f"among models with an induction head — all (≥ {V.MIN_RUNS}): reproduced; some: partly")
    if len(mlp):
        desc = ", ".join(f"{r.model}: layer {r.top_layer} of {r.layers} (prefix {r.final_prefix:.2f})"
                         for r in mlp.itertuples())
        testable = mlp[(mlp["layers"] >= 3) & (mlp["final_prefix"] >= INDUCTION_THRESHOLD)]
        add("With MLPs: induction heads sit in the second-to-last layer",
            "second-to-last layer (team summary, PAPER.md)", desc,
            _count(int((testable["top_layer_from_end"] == 1).sum()), len(testable)),
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
                ok += int(s1.min() - s2.max() >= V.ICL_MARGIN)  # more ICL = more negative
        add("The conclusion does not hang on the index pair", "same picture for other pairs",
            f"every ≥2-layer model has at least {V.ICL_MARGIN} nats more ICL than every 1-layer model for {ok} of {tot} early indices",
            _mark(tot > 0 and ok == tot, ok > 0, n) if tot else V.NOT_TESTABLE,
            "all pairs: reproduced; some: partly")
    if len(other):
        o_co = int(other["verdict"].str.startswith("co-occur").sum())
        add("The same signatures appear on other training text", "(the paper used one mixed corpus)",
            f"{o_co} of {len(other)} models trained on {join(sorted(set(other['corpus'])))} only show induction heads "
            f"forming inside their ICL window (main corpus: {base}); final ICL "
            + ", ".join(f"{r.model} {r.final_icl:+.2f}" for r in other.itertuples()),
            _count(o_co, len(other)), f"all (≥ {V.MIN_RUNS}): reproduced; some: partly")
    if pca is not None and len(pca.turns):
        m2 = pca.turns[pca.turns["layers"] >= 2]["turn_reference_window"].dropna()
        m1 = pca.turns[pca.turns["layers"] == 1]["turn_reference_window"].dropna()
        if len(m2):
            add("PCA paths of ≥2-layer models pivot at the phase change, 1-layer paths do not",
                "yes", f"turn {m2.min():.0f}–{m2.max():.0f}° (≥2 layers) vs "
                + (f"{m1.max():.0f}° at most (1 layer)" if len(m1) else "no measurable 1-layer turn"),
                pca.verdict.status, f"a ≥2-layer turn of ≥ {V.PIVOT_MIN_DEG:.0f}° and ≥ {V.PIVOT_MARGIN_DEG:.0f}° above "
                f"every 1-layer turn, in all (≥ {V.MIN_RUNS}) runs: reproduced; in some: partly")
    return pd.DataFrame(rows).set_index("claim")


def claims_sentence(claims: pd.DataFrame) -> str:
    c = claims["verdict"].value_counts()
    parts = [f"{c.get(k, 0)} {k}" for k in V.STATUSES if c.get(k, 0)]
    return f"Of the {len(claims)} claims checked, {join(parts)} at this scale."


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


# --- the chapter: load -> plot -> say ---------------------------------------------------------------

@dataclass
class Continuity:
    """The family of models and its table (:func:`compute`)."""
    groups: dict[str, list[str]]  # {comparison: [run names]}
    runs: dict[str, Run]  # one run per model of the family, by name
    seeds: dict[str, list[Run]]  # extra seeds of family members
    family: pd.DataFrame  # family_table(runs, seeds)
    late: int
    early: int
    seconds: float  # to build the table


def compute(prof, depth: list[str], width: list[str], mlp: list[str], corpus: list[str],
            seeds: dict[str, list[str]]) -> Continuity:
    """Load the family (the runs that vary depth, width, MLPs and corpus, each once) and build its table."""
    groups = {"depth (attention-only)": depth, "width (2 layers)": width, "attention-only vs MLPs": mlp,
              "corpus": corpus}
    names = family_names(groups)
    runs = {n: prof.run(n) for n in names}
    seed_runs = {n: [prof.run(s) for s in seeds.get(n, [])] for n in names}
    t0 = time.time()
    family = family_table(runs, seed_runs)
    late, early = icl_indices(runs[names[0]].config.model.n_ctx)
    return Continuity(groups, runs, seed_runs, family, late, early, time.time() - t0)


def all_models(res: Continuity) -> dict[str, list[Run]]:
    """{model: [its run and its extra seeds]}."""
    return {n: [r] + res.seeds[n] for n, r in res.runs.items()}


def family_display(res: Continuity) -> pd.DataFrame:
    """The family table as the chapter shows it."""
    return res.family[["model", "layers", "d_model", "heads", "MLPs", "corpus", "params", "non_embedding_params",
                       "tokens", "n_seeds", "final_icl", "final_prefix", "top_layer", "verdict"]].set_index("model").round(3)


def family_summary(res: Continuity) -> str:
    """:func:`scale_range` and the ICL convention."""
    return (scale_range(res.family) + f" ICL is L({res.late}) − L({res.early}) (negative = in-context learning), "
            f"with indices rescaled to the context *[book choice]*. ({len(res.runs)} models; table {res.seconds:.1f} s.)")


def final_icl_summary(family: pd.DataFrame) -> str:
    """The range of final ICL over the family, among ≥2-layer models and over seeds."""
    multi = family[family.layers >= 2]
    return (
        f"Final ICL ranges from {family.final_icl.min():+.2f} nats (`{family.loc[family.final_icl.idxmin(), 'model']}`) "
        f"to {family.final_icl.max():+.2f} (`{family.loc[family.final_icl.idxmax(), 'model']}`)"
        + (f"; among ≥2-layer models, from {multi.final_icl.min():+.2f} to {multi.final_icl.max():+.2f}." if len(multi) else ".")
        + " Seed ranges: " + "; ".join(f"`{r.model}` {r.final_icl_min:+.2f} to {r.final_icl_max:+.2f}"
                                       for r in family.itertuples() if r.n_seeds > 1) + "."
        + (" The models' training budgets differ (the *tokens* column above): each final value is at the model's own "
           "last snapshot, so compare models with equal budgets." if family.tokens.nunique() > 1 else "")
    )


def window_summary(family: pd.DataFrame) -> str:
    """Each model's ICL window and verdict."""
    return "\n".join(
        f"- `{r.model}`: " + (f"window {fmt_tokens(r.window_start)}–{fmt_tokens(r.window_end)} tokens, steepest at "
                              f"{fmt_tokens(r.window_peak)}; verdict: {r.verdict}" if r.window_found else f"no ICL window; verdict: {r.verdict}")
        for r in family.itertuples())


@dataclass
class IndexPairs:
    """ICL with other index pairs over training (:func:`index_pairs`)."""
    table: pd.DataFrame  # index_pair_table(...)
    n_steps: int | None
    seconds: float


def index_pairs(res: Continuity, n_steps: int | None = None, n_examples: int | None = None) -> IndexPairs:
    """:func:`index_pair_table` of the family at ``n_steps`` snapshots per run."""
    t0 = time.time()
    table = index_pair_table(res.runs, n_steps, n_examples)
    return IndexPairs(table, n_steps, time.time() - t0)


def index_pairs_summary(p: IndexPairs) -> str:
    """The indices used and :func:`index_pair_sentence`."""
    pairs = p.table
    return (f"Early indices used: {', '.join(str(e) for e in sorted(set(pairs.early)))} (paper: 10, 50, 100), late index "
            f"{int(pairs.late.iloc[0])}; {p.n_steps} snapshots per run spread in log tokens ({p.seconds:.0f} s). "
            + index_pair_sentence(pairs))


@dataclass
class FamilyPCA:
    """One per-token-loss PCA of the models that share an evaluation set (:func:`family_pca`)."""
    pca: LP.LossPCA
    runs: dict[str, Run]  # the runs fitted
    left_out: list[str]  # runs with another evaluation set
    windows: dict[str, Window]
    seconds: float


def family_pca(res: Continuity, n_steps: int | None = None, n_examples: int | None = None,
               seed: int = 0) -> FamilyPCA:
    """:func:`icl_core.loss_pca.compute` on the largest set of family runs with one evaluation set."""
    t0 = time.time()
    runs, left_out = shared_eval_subset(res.runs)
    rows = cooccurrence_table({n: [r] for n, r in runs.items()})
    pca = LP.compute(runs, rows, n_steps, n_examples, seed)
    return FamilyPCA(pca, runs, left_out, {n: phase_change_window(r) for n, r in runs.items()}, time.time() - t0)


def family_pca_summary(p: FamilyPCA) -> str:
    """Which runs were fitted, and :func:`icl_core.loss_pca.pca_sentence`."""
    return (f"Fitted on {len(p.runs)} models ({', '.join(f'`{n}`' for n in p.runs)})"
            + (f"; left out (other evaluation text): {', '.join(f'`{n}`' for n in p.left_out)}" if p.left_out else "")
            + f". {LP.pca_sentence(p.pca)} ({p.seconds:.0f} s.)")


def claims_summary(claims: pd.DataFrame, family: pd.DataFrame) -> str:
    """:func:`claims_sentence` and the range of scale it holds for."""
    return claims_sentence(claims) + " " + scale_range(family).split(". The paper")[0] + "."

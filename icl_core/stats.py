"""Argument 4's numbers to verdicts: bootstrap intervals over examples (:func:`bootstrap_ci`), the
summary table of every measurement (:func:`summary_table`, each verdict by
:func:`icl_core.verdicts.measurement`), and each behaviour's status per model and verdict over the
models (:func:`behaviour_status`, :func:`behaviour_verdicts`, :func:`behaviour_sentences`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import verdicts as V
from .prose import join


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap interval of the mean over examples."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def summary_table(paired: dict[str, dict], patterns: dict[str, dict], heads: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, measurement): value, 95% interval, chance and verdict, grouped by the
    paper's three behaviours. Every verdict is recomputed here by :func:`icl_core.verdicts.measurement`
    (a share or accuracy must clear :data:`~icl_core.verdicts.SHARE_MARGIN`, a loss benefit
    :data:`~icl_core.verdicts.LOSS_MARGIN`); ``induction_head``: the model has one (``heads``)."""
    rows = []
    for name, res in paired.items():
        l, h, pm = res["head"]
        for _, r in res["rows"].iterrows():
            rows.append({"model": name, "behaviour": r["behaviour"], "task": r["task"],
                         "measure": f"L{l}H{h} attention on the aligned word", "value": r["attention"],
                         "lo": r["attention_lo"], "hi": r["attention_hi"], "chance": r["attention_chance"],
                         "margin": V.SHARE_MARGIN, "n": r["n"]})
            rows.append({"model": name, "behaviour": r["behaviour"], "task": r["task"],
                         "measure": "loss benefit of A in context (nats)", "value": r["loss_benefit"],
                         "lo": r["loss_benefit_lo"], "hi": r["loss_benefit_hi"], "chance": 0.0,
                         "margin": V.LOSS_MARGIN, "n": r["n"]})
    for name, res in patterns.items():
        s = res["summary"]
        l, h = s["head"]
        for key, label in (("share", f"L{l}H{h} attention share on same-label items"),
                           ("label_share", f"L{l}H{h} attention share on same-label labels"),
                           ("accuracy", "label accuracy, second half of the items")):
            rows.append({"model": name, "behaviour": "abstract pattern matching", "task": "category → label",
                         "measure": label, "value": s[key], "lo": s[f"{key}_lo"], "hi": s[f"{key}_hi"],
                         "chance": s[f"{key}_chance"], "margin": V.SHARE_MARGIN, "n": s["n_seqs"]})
    t = pd.DataFrame(rows)
    if not len(t):
        return t
    t["verdict"] = [V.measurement(r.value, r.lo, r.hi, r.chance, r.margin) for r in t.itertuples()]
    with_ih = set(heads[heads["kind"] == "induction"]["model"])
    t["induction_head"] = t["model"].isin(with_ih)
    return t


BEHAVIOURS = ("literal copying", "fuzzy copying", "translation analogue", "abstract pattern matching")
#: per-model statuses of a behaviour (:func:`behaviour_status`)
SHOWN, IN_PART, NO_HEAD = "shown", "in part", "no induction head"


def behaviour_status(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and behaviour: 'shown' when every measurement of it clears its margin above chance,
    'in part' when some do, 'not distinguishable from chance' when none does, and 'no induction head'
    for a model without one: its copying (or any behaviour) cannot be credited to induction heads."""
    rows = []
    for (model, beh), g in table.groupby(["model", "behaviour"], sort=False):
        k = int((g["verdict"] == "above chance").sum())
        if not bool(g["induction_head"].iloc[0]):
            status = NO_HEAD
        else:
            status = SHOWN if k == len(g) else (IN_PART if k else V.NULL)
        rows.append({"model": model, "behaviour": beh, "above chance": f"{k}/{len(g)}", "status": status})
    return pd.DataFrame(rows)


def behaviour_verdicts(status: pd.DataFrame) -> dict[str, V.Verdict]:
    """{behaviour: :func:`icl_core.verdicts.count_verdict`} over the models with an induction head:
    reproduced when it is fully shown in all of them (and >= MIN_RUNS), partly (with the count of
    models showing any of it) when some show it, else not distinguishable from chance."""
    out = {}
    for beh in BEHAVIOURS:
        g = status[(status.behaviour == beh) & (status.status != NO_HEAD)]
        if (status.behaviour == beh).any():
            unit = "models with an induction head"
            v = V.count_verdict(int((g.status == SHOWN).sum()), len(g), unit=unit)
            k_any = int(g.status.isin([SHOWN, IN_PART]).sum())
            out[beh] = v if v.status == V.REPRODUCED or not k_any else V.Verdict(V.PARTLY, k_any, len(g), unit)
    return out


def behaviour_sentences(status: pd.DataFrame) -> str:
    """Markdown: for each of the paper's behaviours, its verdict (:func:`behaviour_verdicts`) and in
    which models it is shown at this scale."""
    paper = {"literal copying": "literal copying of a repeated passage",
             "fuzzy copying": "fuzzy copying (the same words in a different case)",
             "translation analogue": "the translation analogue (the same verses in another English version)",
             "abstract pattern matching": "abstract pattern matching (category → label)"}
    out = []
    for beh, v in behaviour_verdicts(status).items():
        g = status[status.behaviour == beh]
        shown, part = (g[g.status == st]["model"].tolist() for st in (SHOWN, IN_PART))
        none = g[g.status == NO_HEAD]["model"].tolist()
        s = f"is {v.bold}" + (f": shown in {join(f'`{m}`' for m in shown)}" if shown else "")
        s += f"; some measurements only in {join(f'`{m}`' for m in part)}" if part else ""
        s += (f"; not credited to induction heads in {join(f'`{m}`' for m in none)}, which "
              f"{'have' if len(none) > 1 else 'has'} none") if none else ""
        out.append(f"- {paper[beh][0].upper() + paper[beh][1:]} {s}.")
    return "\n".join(out)

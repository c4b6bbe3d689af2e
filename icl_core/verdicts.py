"""How a number becomes a verdict: the one home of the book's effect-size margins and run counts.

Every chapter's "reproduced / partly / not distinguishable / not reproduced" goes through this
module, so that no verdict says more than its numbers:

* an effect counts only when it clears a *margin* (not merely when its interval excludes chance):
  :func:`measurement` (a share, an accuracy or a loss benefit against its chance level),
  :func:`composition_counts` (K-composition against the random-matrix baseline, only for a pair whose
  later head is an induction head), :func:`pivot_counts` (a per-token-loss PCA path that turns);
* a claim is **reproduced** only when the effect holds in every run tested and in at least
  :data:`MIN_RUNS` of them; **partly** when it holds in at least one (the verdict says in how many
  of how many); an effect that no run shows beyond its margin reads **not distinguishable from
  chance** (:func:`count_verdict`), never "partly".

The margins are *[book choice]*s; each constant says why its value, and the chapters quote the
constants (never typed-in numbers). The chapter-specific margins live here too: Argument 1's
:data:`REPEAT_GAIN_MIN`, Argument 2's :data:`SMEAR_ICL_GAIN`, Argument 3's :data:`REMOVAL_THRESHOLD`
and Argument 5's :data:`ONE_HEAD_MIN_BORROWED` / :data:`ONE_HEAD_MIN_DIAG_Z`. Head classes (the
prefix-matching threshold) are :mod:`icl_core.heads`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: [book choice] "reproduced" needs the effect in at least this many runs (seeds or models): one or
#: two runs cannot separate an effect from a lucky seed (issue 22).
MIN_RUNS = 3
#: [book choice] an attention share or an accuracy counts when it is at least this far (absolute)
#: above its chance level *and* its 95% interval excludes chance: five points is a fifth of the
#: pattern task's chance share of 0.25, and more than the bootstrap intervals' half-width with a few
#: dozen sequences, so a share of 0.254 against 0.250 does not count.
SHARE_MARGIN = 0.05
#: [book choice] a per-token loss benefit (nats) counts from this size: an eighth of the paper's
#: ~0.4 nats of ICL, well above the differences between evaluation snapshots of a trained model.
LOSS_MARGIN = 0.05
#: [book choice] a difference in ICL score (nats) between groups of models counts from this size:
#: a quarter of the paper's ~0.4 nats, above the banded ICL score's noise at a few hundred windows.
ICL_MARGIN = 0.1
#: [book choice] K-composition counts when it is at least this multiple of the random-matrix
#: baseline (and the largest of Q, K, V, and the later head is an induction head): the baseline is
#: the *mean* of random pairs, so a score a few percent above it (0.106 vs 0.088) is not a circuit.
COMPOSITION_MIN_RATIO = 1.5
#: [book choice] a PCA path "pivots" when it turns by at least this many degrees across the
#: reference window: paths of every model wobble by a few degrees from snapshot to snapshot.
PIVOT_MIN_DEG = 20.0
#: [book choice] ... and by at least this many degrees more than the largest 1-layer turn, since a
#: turn the 1-layer paths share is not the paper's pivot (which only ≥2-layer models have).
PIVOT_MARGIN_DEG = 10.0

#: [book choice] Argument 3, "removes almost all ICL": ablating a run's induction heads must remove at
#: least this share of its ICL score (while as many random heads remove less than half of that); the
#: paper says "almost all" without a number, and 70% leaves room for the noise of a few hundred windows.
REMOVAL_THRESHOLD = 0.7
#: [book choice] Argument 2: a smeared 1-layer model must gain at least this many nats of ICL over its
#: vanilla twin: three quarters of the paper's ~0.4 nats, so that the gain is most of a phase change.
SMEAR_ICL_GAIN = 0.3
#: [book choice] Argument 1's repeated passage: the second copy must gain at least this many nats more
#: than the first (mean per-token loss change across the window): a quarter of the paper's ~0.4 nats.
REPEAT_GAIN_MIN = 0.1
#: [book choice] Argument 5, one smeared-key head doing both jobs: its keys borrow more than this share
#: from the previous token (1 - σ(α)), ...
ONE_HEAD_MIN_BORROWED = 0.2
#: ... its token QK circuit's diagonal stands more than this many off-diagonal standard deviations above
#: the rest (and its OV copying score is positive): one standard deviation is the weakest diagonal one
#: can call a pattern.
ONE_HEAD_MIN_DIAG_Z = 1

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "partly", "not reproduced", "not testable"
NULL = "not distinguishable from chance"
#: every status a verdict can have, strongest first.
STATUSES = (REPRODUCED, PARTLY, NULL, NOT_REPRODUCED, NOT_TESTABLE)


@dataclass(frozen=True)
class Verdict:
    """A claim's status and the run count behind it (``k`` of ``n`` runs show the effect)."""
    status: str
    k: int
    n: int
    unit: str = "runs"

    @property
    def text(self) -> str:
        """The status with its count, e.g. 'partly (1 of 2 runs; reproduced needs ≥ 3)'."""
        if self.n == 0 or self.status == NOT_TESTABLE:
            return NOT_TESTABLE
        detail = f"{self.k} of {self.n} {self.unit}"
        if self.status == PARTLY and self.k == self.n:
            detail += f"; reproduced needs ≥ {MIN_RUNS}"
        return f"{self.status} ({detail})"

    @property
    def bold(self) -> str:
        """:attr:`text` with the status in bold, for prose."""
        return f"**{self.status}**" + self.text[len(self.status):]


def count_verdict(k: int, n: int, null: str = NULL, unit: str = "runs", min_runs: int = MIN_RUNS) -> Verdict:
    """The verdict of a claim whose effect (already past its margin) holds in ``k`` of ``n`` runs:
    reproduced (k == n >= ``min_runs``), partly (k >= 1), ``null`` (k == 0), not testable (n == 0)."""
    k, n = int(k), int(n)
    if n == 0:
        return Verdict(NOT_TESTABLE, 0, 0, unit)
    if k == n and k >= min_runs:
        return Verdict(REPRODUCED, k, n, unit)
    return Verdict(PARTLY if k else null, k, n, unit)


def measurement(value: float, lo: float, hi: float, chance: float, margin: float,
                higher_is_better: bool = True) -> str:
    """One measurement against its chance level: 'above chance' when its interval excludes chance
    *and* it is at least ``margin`` above it, 'below chance' for the mirror case, else
    :data:`NULL` ('undetermined' without a finite interval)."""
    if not all(np.isfinite(x) for x in (value, lo, hi, chance)):
        return "undetermined"
    if not higher_is_better:
        value, lo, hi, chance = -value, -hi, -lo, -chance
    if lo > chance and value - chance >= margin:
        return "above chance"
    if hi < chance and chance - value >= margin:
        return "below chance"
    return NULL


def composition_ok(q: float, k: float, v: float, baseline: float, induction_head: bool,
                   min_ratio: float = COMPOSITION_MIN_RATIO) -> bool:
    """Does a (previous-token head -> later head) pair show the paper's K-composition? Only when the
    later head is an induction head, K is the largest of Q, K, V, and K >= ``min_ratio`` x baseline."""
    return bool(induction_head) and k >= min_ratio * baseline and k >= max(q, v)


def pivot_counts(multi, single, min_deg: float = PIVOT_MIN_DEG, margin: float = PIVOT_MARGIN_DEG) -> Verdict:
    """The PCA claim 'paths of ≥2-layer models pivot at the phase change, 1-layer paths do not' from
    the turn angles (degrees) of the ≥2-layer runs (``multi``) and of the 1-layer runs (``single``):
    a ≥2-layer run counts when it turns by ``min_deg`` and by ``margin`` more than every 1-layer run.
    A 1-layer path that itself turns by ``min_deg`` makes the claim 'not reproduced' (the turn is
    shared with the controls, not the paper's pivot); no ≥2-layer run pivoting reads 'not
    distinguishable from chance' (no turn beyond a wobble). Without 1-layer turns the contrast is
    untested, so the claim is at most 'partly'."""
    m = np.asarray([x for x in multi if np.isfinite(x)], dtype=float)
    s = np.asarray([x for x in single if np.isfinite(x)], dtype=float)
    if not len(m):
        return Verdict(NOT_TESTABLE, 0, 0)
    bar = max(min_deg, s.max() + margin) if len(s) else min_deg
    k = int((m >= bar).sum())
    if len(s) and s.max() >= min_deg and m.max() >= min_deg:
        return Verdict(NOT_REPRODUCED, k, len(m))  # the 1-layer paths pivot too: the contrast fails
    if k == 0:
        return Verdict(NULL, 0, len(m))
    return count_verdict(k, len(m), min_runs=MIN_RUNS if len(s) else len(m) + 1)


def pivot_sentence(v: Verdict, has_single: bool) -> str:
    """What :func:`pivot_counts`'s verdict means, in one clause."""
    why = {REPRODUCED: "every ≥2-layer path turns and the 1-layer paths do not",
           PARTLY: "only some ≥2-layer paths turn beyond the margin" if has_single
           else "the ≥2-layer paths turn, but there is no 1-layer path to compare",
           NULL: "no ≥2-layer path turns beyond the wobble every path has",
           NOT_REPRODUCED: "the 1-layer paths turn as well, so a turn is shared with them and is not the paper's pivot",
           NOT_TESTABLE: "no path is long enough to measure"}[v.status]
    return (f"The paper's pattern (only ≥2-layer paths pivot) is {v.bold}: {why} *[book choice: a pivot is a turn of "
            f"at least {PIVOT_MIN_DEG:.0f}° and {PIVOT_MARGIN_DEG:.0f}° more than every 1-layer turn]*.")


def rule_text() -> str:
    """The verdict rules as a chapter states them (the constants of this module)."""
    return (f"*[Book choice]* A claim is **reproduced** only when its effect holds in every run tested and in at least "
            f"{MIN_RUNS} runs, **partly** when it holds in some (the count is given), and **{NULL}** when no run "
            f"shows it beyond its margin: an attention share or accuracy at least {SHARE_MARGIN} above chance (with its "
            f"95% interval excluding chance), a loss benefit of at least {LOSS_MARGIN} nats, an ICL difference of at "
            f"least {ICL_MARGIN} nats, K-composition at least {COMPOSITION_MIN_RATIO}× its random baseline into an "
            f"induction head (`icl_core.verdicts`).")

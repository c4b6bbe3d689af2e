"""The reproduction scorecard: the paper's claims, this build's numbers and verdicts, one row per claim.

Each argument chapter ends with one call, ``record(profile, <chapter>(...))``. The row builders here
(:func:`cooccurrence`, :func:`coperturbation`, :func:`ablation`, :func:`generality`,
:func:`mechanism`, :func:`continuity`) take the chapter's own result objects, and every verdict comes
from the chapter's own verdict function (through :mod:`icl_core.verdicts`): no threshold lives in
this module. :func:`record` writes ``<results dir>/<chapter>.json`` (checksummed JSON,
:mod:`icl_core.io`) and returns the chapter's rows as a table; the render step
(:mod:`icl_core.book.site`) reads every chapter's file into the landing page (:func:`landing_html`),
and a build with another profile compares against the same files (:func:`compare`).

The claims and the paper's numbers are constants (:data:`CLAIMS`, from ../shared/PAPER.md and the
argument modules' ``PAPER_*`` constants); Argument 6's claims are the rows of its own claims table
(:func:`icl_core.continuity.claims_table`). The results folder is ``$ICL_RESULTS_DIR`` (the build
sets it to ``_build/executed/<profile>/results`` for every chapter it executes), else
``<project>/_build/executed/<profile>/results`` for a chapter run by hand (:func:`results_dir`).
"""
from __future__ import annotations

import html
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import verdicts as V
from .cooccurrence import PAPER_FRAC_IN_WINDOW, PAPER_ICL_AFTER, PAPER_ICL_BEFORE
from .heads import INDUCTION_THRESHOLD
from .io import CorruptFileError, atomic_write_json, read_json_checked
from .prose import fmt, fmt_tokens, join

#: the environment variable the build sets to its results folder (see :func:`results_dir`)
RESULTS_ENV = "ICL_RESULTS_DIR"
#: the results files' format; a file of another version is refused
SCHEMA = 1
#: the argument chapters, in book order (their results files are ``<id>.json``)
CHAPTERS = {1: "01_cooccurrence", 2: "02_coperturbation", 3: "03_ablation", 4: "04_generality",
            5: "05_mechanism", 6: "06_continuity"}
#: the heading every argument chapter ends with, over its :func:`record` cell: a row whose section
#: heading is gone from the page links here instead
SCORECARD_HEADING = "This chapter in the scorecard"
#: the verdict of a claim whose chapter wrote no results file in this build
NOT_BUILT = "not built"

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ScorecardError(ValueError):
    """A results file is unreadable or not a scorecard; the message is one line naming the file."""


@dataclass(frozen=True)
class Claim:
    """One claim of the paper: its id, argument, text, the paper's number (as text) and the heading of
    the chapter section that shows it."""
    id: str
    argument: int
    text: str
    paper: str
    section: str

    @property
    def chapter(self) -> str:
        return CHAPTERS[self.argument]


#: The paper's claims the book checks (PAPER.md: "The six arguments"), in book order. Argument 6 has
#: one placeholder here (shown while its chapter is not built); its rows are its claims table's.
CLAIMS = (
    Claim("phase_change", 1, "In models with two or more layers, induction heads form inside an early phase change "
          "in which in-context learning improves abruptly",
          f"ICL score above {PAPER_ICL_BEFORE:+.2f} nats before the phase change, ≈ {PAPER_ICL_AFTER:+.1f} after; "
          f"≥ {PAPER_FRAC_IN_WINDOW:.0%} of the final ICL gained inside it", "Every run, checked"),
    Claim("loss_bump", 1, "The loss curve of those models has a bump (its only non-convex stretch) during the phase change",
          "a bump inside the phase change of every ≥2-layer model", "The loss curve and its bump"),
    Claim("one_layer", 1, "One-layer models show none of it: no induction head forms",
          "no induction heads and no phase change in 1-layer models", "Every run, checked"),
    Claim("pca_pivot", 1, "Per-token-loss PCA paths of ≥2-layer models pivot at the phase change; 1-layer paths do not",
          "≥2-layer paths turn at the phase change, 1-layer paths do not", "Per-token-loss PCA"),
    Claim("smeared_one_layer", 2, "Smeared keys give one-layer models induction heads and in-context learning",
          "a 1-layer smeared-key model forms induction heads and gains ICL; its vanilla twin does not",
          "In-context learning and induction heads, smeared vs vanilla"),
    Claim("smeared_earlier", 2, "Smeared keys move the phase change of models with two or more layers earlier",
          "the smeared 2-layer phase change comes earlier than its vanilla twin's",
          "Loss curves and phase-change windows"),
    Claim("ablation", 3, "In small attention-only models, ablating the induction heads removes almost all "
          "in-context learning (and as many random heads remove far less)",
          "almost all ICL removed by ablating the induction heads (pattern-preserving)",
          "Ablating sets of heads at the final snapshot"),
    Claim("literal_copying", 4, "Induction heads copy a repeated passage literally",
          "literal copying of repeated text, at every model size", "Literal copying of a real passage"),
    Claim("fuzzy_copying", 4, "Induction heads also copy fuzzily (the same words in a different case)",
          "fuzzy copying in large models", "Fuzzy copying and a translation analogue"),
    Claim("translation", 4, "Induction heads match across translations (here: the same verses in another English version)",
          "translation heads in the 13B model", "Fuzzy copying and a translation analogue"),
    Claim("pattern_matching", 4, "Induction heads do abstract pattern matching (category → label)",
          "a head puts about 65% of its attention on correct-category positions", "Abstract pattern matching"),
    Claim("k_composition", 5, "The induction head reads a previous-token head through K-composition",
          "K-composition from the previous-token head into the induction head (positive QK K-composition trace)",
          "Composition: which heads read which"),
    Claim("ov_copying", 5, "The induction head's OV circuit copies",
          "positive OV-eigenvalue copying score of induction heads", "Do the weights agree with the behaviour?"),
    Claim("continuity", 6, "Induction heads, the phase change and the amount of ICL look alike across depth, width, "
          "MLPs and training text", "the same picture from 1 to 6 layers and 13M to 13B parameters",
          "The paper's claims, checked"),
)
CLAIMS_BY_ID = {c.id: c for c in CLAIMS}


@dataclass(frozen=True)
class Row:
    """One row of the scorecard: a claim, this build's numbers (``build``), the runs behind them
    (``runs``, with seeds; ``n`` of them) and the verdict (``status``, one of
    :data:`icl_core.verdicts.STATUSES`; ``verdict`` with its count)."""
    claim: Claim
    build: str
    runs: str
    n: int
    status: str
    verdict: str

    def to_dict(self) -> dict:
        return {"id": self.claim.id, "argument": self.claim.argument, "chapter": self.claim.chapter,
                "claim": self.claim.text, "paper": self.claim.paper, "section": self.claim.section,
                "anchor": anchor(self.claim.section), "build": self.build, "runs": self.runs, "n": int(self.n),
                "status": self.status, "verdict": self.verdict}


def row(claim_id: str, build: str, runs: str, verdict: V.Verdict) -> Row:
    """A :class:`Row` of one of :data:`CLAIMS` with ``verdict`` (a chapter's
    :class:`icl_core.verdicts.Verdict`)."""
    return Row(CLAIMS_BY_ID[claim_id], build, runs or "—", verdict.n, verdict.status, verdict.text)


def anchor(heading: str) -> str:
    """The id Jupyter Book gives a section with this heading (docutils' ``make_id``)."""
    from docutils.nodes import make_id

    return make_id(heading)


def section_ids(nb_path: str | Path) -> set[str]:
    """The ids of the sections of a notebook's page: its Markdown headings, by :func:`anchor`."""
    nb = json.loads(Path(nb_path).read_text())
    out = set()
    for c in nb.get("cells", []):
        if c.get("cell_type") != "markdown":
            continue
        fence = False
        for line in "".join(c.get("source", "")).splitlines():
            if line.lstrip().startswith(("```", ":::")):
                fence = not fence
            elif not fence and line.startswith("#") and line.lstrip("#").startswith(" "):
                out.add(anchor(line.lstrip("#").strip()))
    return out


# --- the chapters' rows (each verdict by the chapter's own function) ----------------------------------

def _seeds(pairs) -> str:
    """'label: seeds 0, 1; label2: seed 0' from (label, seed) pairs, in order."""
    by: dict[str, list[str]] = {}
    for label, seed in pairs:
        by.setdefault(str(label), []).append(str(seed))
    return "; ".join(f"{k}: seed{'s' if len(v) > 1 else ''} {', '.join(v)}" for k, v in by.items())


def _mean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if len(x) else float("nan")


def cooccurrence(res, pca) -> list[Row]:
    """Argument 1 (:mod:`icl_core.cooccurrence`, :mod:`icl_core.loss_pca`): ``res`` the chapter's
    :class:`~icl_core.cooccurrence.Cooccurrence`, ``pca`` its :class:`~icl_core.loss_pca.LossPCA`."""
    from . import cooccurrence as Co

    t = res.table
    multi, single = t[t["layers"] >= 2], t[(t["layers"] == 1) & ~t["smeared"]]
    seeds_multi = _seeds(zip(multi["model"], multi["seed"]))
    v = Co.cooccurrence_verdict(t)
    wf = multi[multi["window_found"]]
    build = (f"induction heads form inside the ICL window in {v.k} of {v.n} runs with ≥2 layers; "
             + (f"ICL {_mean(wf['icl_before']):+.2f} nats before the window, {_mean(wf['icl_after']):+.2f} after, "
                f"{fmt(_mean(wf['frac_icl_in_window']), '.0%')} of the final ICL gained inside it "
                f"(mean of the {len(wf)} run{'s' if len(wf) > 1 else ''} with a window)" if len(wf)
                else "no run has an ICL window"))
    rows = [row("phase_change", build, seeds_multi, v)]
    v = Co.bump_verdict(t)
    ones = t[t["layers"] == 1]
    rows.append(row("loss_bump", f"the induction-head jump and a loss bump line up in {v.k} of {v.n} runs with ≥2 "
                    f"layers; {int(ones['bump_found'].sum())} of {len(ones)} 1-layer runs have a bump too",
                    seeds_multi, v))
    v = Co.control_verdict(t)
    rows.append(row("one_layer", (f"{v.k} of {v.n} vanilla 1-layer runs form no induction head (top prefix-matching "
                                  f"score {single['final_prefix'].max():.2f} at most, threshold {INDUCTION_THRESHOLD}); "
                                  f"{int(single['window_found'].sum())} of them find an ICL window")
                    if len(single) else "no vanilla 1-layer run in this profile",
                    _seeds(zip(single["model"], single["seed"])), v))
    turns = pca.turns
    m2 = turns[turns["layers"] >= 2]["turn_reference_window"].dropna() if len(turns) else pd.Series(dtype=float)
    m1 = turns[turns["layers"] == 1]["turn_reference_window"].dropna() if len(turns) else pd.Series(dtype=float)
    build = ((f"≥2-layer paths turn {m2.min():.0f}–{m2.max():.0f}° across the reference window"
              + (f", 1-layer paths {m1.max():.0f}° at most" if len(m1) else ", no 1-layer path to compare"))
             if len(m2) else "no ≥2-layer path long enough to measure")
    seeds = dict(zip(t["run"], zip(t["model"], t["seed"])))
    rows.append(row("pca_pivot", build, _seeds(seeds[r] for r in turns["run"] if r in seeds) if len(turns) else "",
                    pca.verdict))
    return rows


def coperturbation(res) -> list[Row]:
    """Argument 2 (:mod:`icl_core.coperturbation`): ``res`` the chapter's
    :class:`~icl_core.coperturbation.Coperturbation`."""
    from . import coperturbation as C

    t = res.table
    one, multi = t[t["layers"] == 1], t[t["layers"] >= 2]
    v = C.one_layer_counts(t)
    build = ("; ".join(f"seed {r['seed']}: top prefix score {r['smeared top prefix']:.2f} smeared vs "
                       f"{r['vanilla top prefix']:.2f} vanilla, ICL gain {r['ICL gain (smeared)']:+.2f} nats"
                       for r in one.to_dict("records")) or "no 1-layer pair in this profile")
    rows = [row("smeared_one_layer", build, _seeds(zip(one["model"], one["seed"])), v)]
    word = C.two_layer_comparison(t)[0]
    build = (f"{word}: " + "; ".join(
        f"{r['model']} seed {r['seed']}: smeared window starts at {fmt_tokens(r['smeared window start'])}, "
        f"vanilla at {fmt_tokens(r['vanilla window start'])} tokens" for r in multi.to_dict("records"))
             if len(multi) else "no pair with 2 or more layers in this profile")
    rows.append(row("smeared_earlier", build, _seeds(zip(multi["model"], multi["seed"])), C.two_layer_verdict(t)))
    return rows


def ablation(res) -> list[Row]:
    """Argument 3 (:mod:`icl_core.ablation`): ``res`` the chapter's :class:`~icl_core.ablation.Ablation`."""
    from . import ablation as AB

    v = AB.causal_verdict(res)
    parts = []
    for name in res.main_runs:
        d = res.tables[name]["pp"]
        f_ind = float(AB.fraction_removed(d["clean"], d["induction"]))
        txt = f"{name} {fmt(f_ind, '.0%')} ({d['clean']:+.2f} → {d['induction']:+.2f} nats)"
        if len(res.tables[name]["random_sets"]):
            txt += f", random heads {fmt(float(AB.fraction_removed(d['clean'], d['random_mean'])), '.0%')}"
        parts.append(txt)
    build = (f"the test passes in {v.k} of {v.n} runs of the main evidence; induction-head ablation removes "
             + "; ".join(parts) if parts else "no run has an induction head, so the test cannot be run")
    runs = _seeds((name, res.runs[name].config.train.seed) for name in res.main_runs)
    return [row("ablation", build, runs, v)]


def generality(res, summary) -> list[Row]:
    """Argument 4 (:mod:`icl_core.generality`, :func:`icl_core.stats.behaviour_verdicts`): ``res`` the
    chapter's :class:`~icl_core.generality.Generality`, ``summary`` its :class:`~icl_core.generality.Summary`."""
    from .stats import NO_HEAD, behaviour_verdicts

    st, table = summary.status, summary.table
    verdicts = behaviour_verdicts(st)
    ids = {"literal copying": "literal_copying", "fuzzy copying": "fuzzy_copying",
           "translation analogue": "translation", "abstract pattern matching": "pattern_matching"}
    rows = []
    for beh, cid in ids.items():
        g = st[st["behaviour"] == beh]
        with_ih = g[g["status"] != NO_HEAD]
        v = verdicts.get(beh, V.Verdict(V.NOT_TESTABLE, 0, 0))
        build = "; ".join(f"{r['model']}: {r['above chance']} measures above chance ({r['status']})"
                          for r in with_ih.to_dict("records"))
        if beh == "abstract pattern matching" and len(table):
            share = table[(table["behaviour"] == beh) & table["measure"].str.contains("same-label items")
                          & table["induction_head"]]
            if len(share):
                build += (f"; attention share on same-label items {share['value'].min():.2f}–{share['value'].max():.2f} "
                          f"(chance {share['chance'].iloc[0]:.2f})")
        no = g[g["status"] == NO_HEAD]["model"].tolist()
        if no:
            build += ("; " if build else "") + f"no induction head in {join(no)}"
        rows.append(row(cid, build or "not measured in this profile",
                        _seeds((m, res.models[m].config.train.seed) for m in with_ih["model"]), v))
    return rows


def mechanism(res, comp, agreement) -> list[Row]:
    """Argument 5 (:mod:`icl_core.circuits`, :mod:`icl_core.mechanism`): ``res`` the chapter's
    :class:`~icl_core.mechanism.Mechanism`, ``comp`` its :class:`~icl_core.circuits.Composition`,
    ``agreement`` its :func:`~icl_core.mechanism.agreement` table."""
    from . import circuits as Ci
    from . import mechanism as Me

    ct = Ci.composition_table(comp)
    v = Ci.composition_verdict(ct)
    build = ("; ".join(f"{r['model']} {r['pair']}: K {r['K']:.3f} vs baseline {r['baseline']:.3f} "
                       f"(Q {r['Q']:.3f}, V {r['V']:.3f}; later head's prefix score {r['prefix']:.2f})"
                       for r in ct.to_dict("records")) if ct is not None else "no multi-layer model in this profile")
    seed = {m: run.config.train.seed for m, run in res.models.items()}
    rows = [row("k_composition", build, _seeds((m, seed[m]) for m in ct["model"]) if ct is not None else "", v)]
    per = agreement[(agreement["model"] != "all models (pooled)") & (agreement["induction heads"] > 0)]
    v = Me.ov_copying_verdict(agreement)
    build = ("; ".join(f"{r['model']}: {r['with OV > 0']} of {r['induction heads']} induction heads"
                       for r in per.to_dict("records")) + " with a positive OV copying score") if len(per) else \
        "no model has an induction head"
    rows.append(row("ov_copying", build, _seeds((m, seed[m]) for m in per["model"]), v))
    return rows


def continuity(claims: pd.DataFrame, res) -> list[Row]:
    """Argument 6 (:func:`icl_core.continuity.claims_table`): one row per row of the chapter's claims
    table, with its verdict; ``res`` the chapter's :class:`~icl_core.continuity.Continuity`."""
    base = CLAIMS_BY_ID["continuity"]
    f = res.family
    runs = "; ".join(f"{r['model']}: {r['n_seeds']} seed{'s' if r['n_seeds'] > 1 else ''}" for r in f.to_dict("records"))
    rows = []
    for text, r in claims.iterrows():
        cid = "continuity_" + re.sub(r"[^a-z0-9]+", "_", str(text).split(" (")[0].lower()).strip("_")
        claim = Claim(cid, 6, str(text), str(r["paper"]), base.section)
        rows.append(Row(claim, str(r["here"]), runs, len(f), str(r["verdict"]), str(r["verdict"])))
    return rows


# --- results files ----------------------------------------------------------------------------------

def results_dir(profile: str) -> Path:
    """Where :func:`record` writes: ``$ICL_RESULTS_DIR``, else ``_build/executed/<profile>/results``."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else PROJECT_ROOT / "_build" / "executed" / profile / "results"


def table(rows: list[Row] | list[dict]) -> pd.DataFrame:
    """The rows as a chapter shows them: claim, the paper's number, this build's, its runs, the verdict."""
    ds = [r.to_dict() if isinstance(r, Row) else r for r in rows]
    return pd.DataFrame([{"claim": d["claim"], "paper": d["paper"], "this build": d["build"],
                          "runs (seeds)": d["runs"], "verdict": d["verdict"]} for d in ds])


def record(profile: str, rows: list[Row], directory: str | Path | None = None):
    """Write a chapter's rows to ``<directory or results_dir(profile)>/<chapter>.json`` and return
    them as :func:`table`, styled for the page (``.data``: the table). Every row must belong to the
    same chapter."""
    if not rows:
        raise ScorecardError("record() got no rows: a chapter records at least one claim")
    chapters = {r.claim.chapter for r in rows}
    if len(chapters) != 1:
        raise ScorecardError(f"record() got rows of several chapters ({', '.join(sorted(chapters))}); record one at a time")
    bad = [r.claim.id for r in rows if r.status not in V.STATUSES]
    if bad:
        raise ScorecardError(f"claims {', '.join(bad)} have no verdict of {V.STATUSES}")
    chapter = chapters.pop()
    path = Path(directory) if directory else results_dir(profile)
    atomic_write_json(path / f"{chapter}.json", {"schema": SCHEMA, "profile": profile, "chapter": chapter,
                                                 "rows": [r.to_dict() for r in rows]})
    return table(rows).style.set_properties(**{"text-align": "left"}).hide(axis="index")


ROW_FIELDS = ("id", "argument", "chapter", "claim", "paper", "section", "anchor", "build", "runs", "n", "status", "verdict")


def read(path: str | Path) -> dict:
    """One chapter's results file, checked (checksum, schema, fields); :class:`ScorecardError` (one
    line naming the file) when it is not a valid scorecard file."""
    path = Path(path)
    try:
        d = read_json_checked(path)
    except (CorruptFileError, OSError) as e:
        raise ScorecardError(" ".join(str(e).split())) from None
    if d.get("schema") != SCHEMA:
        raise ScorecardError(f"{path}: results schema {d.get('schema')!r}, expected {SCHEMA}; re-execute the chapter")
    if not isinstance(d.get("rows"), list) or not d["rows"]:
        raise ScorecardError(f"{path}: no rows")
    for r in d["rows"]:
        missing = [k for k in ROW_FIELDS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ScorecardError(f"{path}: a row lacks {', '.join(missing)}")
        if r["status"] not in V.STATUSES:
            raise ScorecardError(f"{path}: claim {r['id']!r} has an unknown verdict {r['status']!r}")
    return d


def load(directory: str | Path, profile: str) -> list[dict]:
    """Every claim of the book in order, from the results files in ``directory``: the recorded rows
    of each chapter that wrote its file, and for a chapter that did not, its claims of :data:`CLAIMS`
    with verdict :data:`NOT_BUILT`. A file written by another profile is an error."""
    out = []
    for arg, chapter in CHAPTERS.items():
        path = Path(directory) / f"{chapter}.json"
        if not path.exists():
            out += [Row(c, "—", "—", 0, NOT_BUILT, f"{NOT_BUILT}: the chapter wrote no results in this build").to_dict()
                    for c in CLAIMS if c.argument == arg]
            continue
        d = read(path)
        if d.get("profile") != profile:
            raise ScorecardError(f"{path} was written by profile {d.get('profile')!r}, not {profile!r}")
        out += d["rows"]
    return out


def compare(dir_a: str | Path, profile_a: str, dir_b: str | Path, profile_b: str) -> pd.DataFrame:
    """Two builds' scorecards side by side (e.g. a laptop build against a GPU build): one row per
    claim of either, both verdicts, and whether they agree (a claim neither built does not)."""
    a = {r["id"]: r for r in load(dir_a, profile_a)}
    b = {r["id"]: r for r in load(dir_b, profile_b)}
    ids = list(a) + [i for i in b if i not in a]
    return pd.DataFrame([{"claim": (a.get(i) or b[i])["claim"], "a": a[i]["status"] if i in a else "—",
                          "b": b[i]["status"] if i in b else "—",
                          "agree": i in a and i in b and a[i]["status"] == b[i]["status"] != NOT_BUILT} for i in ids]
                        ).rename(columns={"a": f"a: {profile_a}", "b": f"b: {profile_b}"}).set_index("claim")


# --- the faithful scale (issue 23): a GPU build's committed results beside every build --------------

#: Where a GPU build's small results are committed (benchmarks/gpu/run_profile.py writes them):
#: ``results.json`` (the chapters' results files, merged) and ``provenance.json``.
FAITHFUL_DIR = PROJECT_ROOT / "results" / "gpu"


def faithful_rows(directory: str | Path = FAITHFUL_DIR) -> tuple[dict[str, dict], dict | None]:
    """({claim id: row}, provenance) of the committed GPU build, or ({}, None) when nothing is
    committed; a file that is there but unreadable is a :class:`ScorecardError` (one line)."""
    d = Path(directory)
    res, prov = d / "results.json", d / "provenance.json"
    if not res.exists():
        return {}, None
    try:
        merged = json.loads(res.read_text()).get("files", {})  # benchmarks/gpu/run_profile.py's layout
        provenance = json.loads(prov.read_text()) if prov.exists() else {}
    except (ValueError, AttributeError) as e:
        raise ScorecardError(f"{res.parent}: not a results folder of run_profile.py ({e})") from None
    rows = {}
    for name, f in sorted(merged.items()):
        if not isinstance(f, dict) or f.get("schema") != SCHEMA or not isinstance(f.get("rows"), list):
            raise ScorecardError(f"{res}: entry {name!r} is not a scorecard file of schema {SCHEMA}")
        rows.update({r["id"]: r for r in f["rows"]})
    return rows, provenance


def faithful_table(profile: str, directory: str | Path | None = None,
                   faithful: str | Path = FAITHFUL_DIR) -> pd.DataFrame:
    """One row per claim: this build's number and verdict (the results files in ``directory``, default
    :func:`results_dir`) beside the committed GPU build's ("at the faithful scale"); the column says
    "not run yet" for every claim when no GPU build is committed."""
    here = load(directory or results_dir(profile), profile)
    there, prov = faithful_rows(faithful)
    missing = "not run yet" if prov is None else "not in the GPU build"
    return pd.DataFrame([{"claim": r["claim"], f"this build ({profile})": f"{r['build']} — {r['status']}",
                          "at the faithful scale (gpu)": (f"{there[r['id']]['build']} — {there[r['id']]['status']}"
                                                          if r["id"] in there else missing)}
                         for r in here]).set_index("claim")


def faithful_text(faithful: str | Path = FAITHFUL_DIR) -> str:
    """Where the faithful-scale column comes from: the committed GPU build's provenance, or that none is."""
    rows, prov = faithful_rows(faithful)
    if prov is None:
        return ("**At the faithful scale.** The `gpu` profile (the paper's Shortformer positions and 512-token "
                "contexts, about a billion tokens over its runs) has not been trained yet: it needs a lent GPU, and "
                "its one command is `benchmarks/gpu/run_profile.py` (`benchmarks/gpu/README.md`). When a GPU build's "
                f"`results.json` and `provenance.json` are committed under `{Path(faithful).relative_to(PROJECT_ROOT) if Path(faithful).is_relative_to(PROJECT_ROOT) else faithful}/`, "
                "the column above fills in from them, in every profile's build.")
    commit = faithful_commit(prov)[:10]
    gpu = (prov.get("device") or {}).get("gpu", "an unknown device")
    return (f"**At the faithful scale.** The column above is read from a committed `{prov.get('profile', 'gpu')}` build "
            f"(`benchmarks/gpu/run_profile.py`): commit `{commit}` on {gpu}, started {prov.get('started_utc', '?')}, "
            f"status {prov.get('status', '?')}, {float(prov.get('wall_s', float('nan'))):.0f} s of wall time; {len(rows)} claims"
            f" from the chapters it executed ({join(sorted(prov.get('chapters') or {})) or 'none'}).")


def faithful_commit(prov: dict) -> str:
    """The commit a GPU build ran: the one ``pack_carry.py`` recorded in the carry (the machine's own
    copy of ``.git`` may be stale) when the build's ``icl_core`` source hash matches the carry's,
    else what the machine's git said (or "unknown")."""
    carry = (((prov.get("setup") or {}).get("carry_manifest") or {}).get("git") or {})
    here = prov.get("git") or {}
    if carry.get("commit") and carry.get("icl_core_source") and carry["icl_core_source"] == here.get("icl_core_source"):
        return str(carry["commit"])
    return str(here.get("commit") or "unknown")


#: the logged snapshot metrics a GPU build's provenance keeps per run (benchmarks/gpu/run_profile.py)
CURVE = ("tokens", "loss", "icl", "prefix_max", "prev_token_max")


def faithful_runs(directory: str | Path = FAITHFUL_DIR) -> pd.DataFrame | None:
    """One row per run of the committed GPU build, from the snapshot metrics its provenance logged
    (``icl``: the single-index ICL score, loss at the late index minus the early one): the tokens at
    which the top prefix-matching score first reached :data:`INDUCTION_THRESHOLD`, the ICL score at
    the snapshot before that, its highest value, and both at the end. None without a committed build."""
    _, prov = faithful_rows(directory)
    if prov is None:
        return None
    rows = []
    for name, r in (prov.get("runs") or {}).items():
        curve = r.get("curve") or []
        if r.get("curve_columns", list(CURVE))[:len(CURVE)] != list(CURVE) or not curve:
            raise ScorecardError(f"{Path(directory) / 'provenance.json'}: run {name!r} has no curve of columns {CURVE}")
        c = pd.DataFrame([row[:len(CURVE)] for row in curve], columns=CURVE).astype(float)
        crossed = np.flatnonzero(c["prefix_max"].to_numpy() >= INDUCTION_THRESHOLD)
        first = int(crossed[0]) if len(crossed) else None
        peak = int(c["icl"].idxmax())
        rows.append({"run": name, "layers": r.get("layers"), "d_model": r.get("d_model"),
                     "tokens": c["tokens"].iloc[-1], "final loss": c["loss"].iloc[-1],
                     "top prefix score": c["prefix_max"].iloc[-1], "prev-token score": c["prev_token_max"].iloc[-1],
                     "prefix score reached 0.3 at": c["tokens"].iloc[first] if first is not None else np.nan,
                     "ICL before": c["icl"].iloc[first - 1] if first else np.nan,
                     "highest ICL": c["icl"].iloc[peak], "at": c["tokens"].iloc[peak],
                     "final ICL": c["icl"].iloc[-1]})
    return pd.DataFrame(rows).set_index("run")


def faithful_runs_text(table: pd.DataFrame | None) -> str:
    """What :func:`faithful_runs` shows for the vanilla models (runs named ``attn<L>``, seeds
    ``_s<k>``), against the paper's ICL before (above PAPER_ICL_BEFORE) and after (about PAPER_ICL_AFTER)."""
    if table is None:
        return "No GPU build is committed, so there is no per-run table at the faithful scale."
    van = table[table.index.str.fullmatch(r"attn\d(_s\d+)?")]
    formed = van[van["prefix score reached 0.3 at"].notna()]
    deep = van[van["layers"] >= 2]
    parts = [f"Of the {len(deep)} vanilla runs with two or more layers, {len(formed[formed['layers'] >= 2])} formed an "
             f"induction head (top prefix-matching score ≥ {INDUCTION_THRESHOLD})"
             + (f", at {join(f'{fmt_tokens(t)} ({n})' for n, t in formed['prefix score reached 0.3 at'].items())} tokens"
                if len(formed) else "")
             + f"; {len(van[van['layers'] == 1])} one-layer runs reached {fmt(van[van['layers'] == 1]['top prefix score'].max(), '.2f')} at most."]
    if len(formed):
        parts.append(f"In those runs the logged ICL score was {fmt(formed['ICL before'].min())} to {fmt(formed['ICL before'].max())} "
                     f"nats at the snapshot before the crossing (paper: above {PAPER_ICL_BEFORE}) and "
                     f"{fmt(formed['final ICL'].min())} to {fmt(formed['final ICL'].max())} at the end (paper: about {PAPER_ICL_AFTER}).")
    cross = van["prefix score reached 0.3 at"]
    pos = van[(van["highest ICL"] > 0) & (cross.isna() | (van["at"] < cross))]
    if len(pos):
        parts.append(f"In {len(pos)} of {len(van)} vanilla runs the ICL score rose above zero before any induction head "
                     f"had formed (highest {fmt(pos['highest ICL'].max())} nats): the late token's loss was higher than "
                     "the early token's, the opposite of in-context learning. A CPU check of 1-layer models traces most "
                     "of it to the evaluation windows' rule, which puts the early index in documents' opening lines "
                     "(`results/gpu/README.md`).")
    return " ".join(parts)


# --- the landing page -------------------------------------------------------------------------------

def landing_html(rows: list[dict], profile: str, sections: dict[str, set[str]] | None = None,
                 faithful: dict[str, dict] | None = None) -> str:
    """The landing page's scorecard (an HTML block for the Markdown page): a sentence naming the
    profile and counting the verdicts, then one table row per claim with a link to the section that
    shows it. ``sections``: {chapter: ids of the sections on its page} (:func:`section_ids`); a row
    whose section is missing links to the chapter's :data:`SCORECARD_HEADING` section instead (or to
    the page, when that is missing too). ``faithful``: {claim id: row} of a committed GPU build
    (:func:`faithful_rows`); its verdicts fill the last column, which says "not run yet" without one."""
    e = html.escape
    counts = pd.Series([r["status"] for r in rows]).value_counts()
    order = [*V.STATUSES, NOT_BUILT]
    tally = join(f"{int(counts[s])} {s}" for s in order if s in counts)
    built = sorted({r["chapter"] for r in rows if r["status"] != NOT_BUILT})
    lines = [f'<p class="scorecard-profile">Built with the <strong>{e(profile)}</strong> profile: {len(rows)} claims '
             f'from the results files of {len(built)} of {len(CHAPTERS)} argument chapters ({e(tally)}).</p>',
             "", '<div class="scorecard" style="overflow-x: auto; font-size: 0.85em">',
             '<table class="table scorecard" id="scorecard-table">',
             "<thead><tr><th>Claim (argument, and the section that shows it)</th><th>Paper</th><th>This build</th>"
             "<th>Runs (seeds)</th><th>Verdict</th><th>At the faithful scale (gpu)</th></tr></thead>", "<tbody>"]
    for r in rows:
        ids = (sections or {}).get(r["chapter"])
        target = r["anchor"]
        if ids is not None and target not in ids:
            target = anchor(SCORECARD_HEADING) if anchor(SCORECARD_HEADING) in ids else ""
        href = f"chapters/{r['chapter']}.html" + (f"#{target}" if target else "")
        rest = r["verdict"][len(r["status"]):] if r["verdict"].startswith(r["status"]) else f": {r['verdict']}"
        lines.append(
            f'<tr data-claim="{e(r["id"])}" data-chapter="{e(r["chapter"])}" data-status="{e(r["status"])}">'
            f"<td>{e(r['claim'])}<br><small>Argument {int(r['argument'])}: "
            f'<a class="scorecard-link" href="{e(href)}">{e(r["section"])}</a></small></td>'
            f"<td>{e(r['paper'])}</td><td>{e(r['build'])}</td><td>{e(r['runs'])}</td>"
            f'<td class="verdict"><strong>{e(r["status"])}</strong>{e(rest)}</td>'
            f'<td class="faithful">{e(faithful[r["id"]]["status"]) if faithful and r["id"] in faithful else ("not in the GPU build" if faithful else "not run yet")}</td></tr>')
    lines += ["</tbody>", "</table>", "</div>"]
    return "\n".join(lines)

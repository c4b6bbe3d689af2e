"""What the models read and what they are scored on: the corpus mix by tokens, and the first index.

* :func:`token_shares`: the share of prose and code (and of each source, e.g. one Python package)
  among the *training* tokens and among the tokens of the fixed *evaluation* windows. The paper
  trained on web text and books with about :data:`PAPER_CODE_SHARE` code (a deviation the book
  states); the evaluation windows are drawn per document, half prose and half code
  (:func:`icl_core.data.eval_window_sources`; until issue 22 they were drawn per token, so long
  sympy files made up 143 of 256 windows).
* :func:`icl_by_window`: the ICL score split by the windows' kind (prose or code) and place (a
  document's first window, which starts at its EOS, or a later one): at 512-token windows the first
  windows of code files put the early index in their opening lines (the gpu build's positive
  scores; results/gpu/README.md).
* :func:`bos_artefact`: the loss at the first index. Windows now tile documents from their start
  (a document's first window begins with its EOS, as in training; the others have no BOS); the
  earlier rule put BOS before mid-document text, which training never shows, and its first-index
  loss (about 9.5 nats) was above ln(vocabulary), the loss of a uniform guess.
"""
from __future__ import annotations

import math
import numpy as np
import pandas as pd

from . import data as D
from .prose import fmt, join

#: The paper's training mix (../shared/PAPER.md): web text and books with about this share of code.
PAPER_CODE_SHARE = 0.10


def kind(doc_id: str) -> str:
    """'code' for a source-code document (``code/<package>/...``), 'prose' for the rest."""
    return "code" if doc_id.startswith("code/") else "prose"


def source(doc_id: str) -> str:
    """The document's source: its first two path parts (``code/sympy``, ``bible/kjv``)."""
    return "/".join(doc_id.split("/")[:2])


_TRAIN_DOC_TOKENS: dict[str, list[tuple[str, int]]] = {}  # {corpus folder: [(document id, tokens)]}


def train_doc_tokens(corpus: D.Corpus) -> list[tuple[str, int]]:
    """(document id, tokens incl. its leading EOS) of every training document, re-tokenised with the
    corpus's tokenizer and checked against the stored training stream (cached per corpus folder)."""
    key = str(corpus.dir)
    if key not in _TRAIN_DOC_TOKENS:
        cfg = corpus.cfg
        docs = [d for d in D.load_documents(cfg) if not D.is_validation(d.split_key, cfg)]
        lens = [len(e.ids) + 1 for e in corpus.tokenizer.encode_batch([d.text for d in docs])]
        if sum(lens) != len(corpus.train):
            raise ValueError(f"re-tokenised training documents give {sum(lens)} tokens, the corpus has {len(corpus.train)}")
        _TRAIN_DOC_TOKENS[key] = [(d.id, n) for d, n in zip(docs, lens)]
    return _TRAIN_DOC_TOKENS[key]


def token_shares(cfg, corpus: D.Corpus) -> pd.DataFrame:
    """One row per (split, source): tokens and share of the split, for the training stream of a run
    config ``cfg`` on ``corpus`` (every training document, re-tokenised and checked against the
    stored stream) and its fixed evaluation windows (``n_ctx`` tokens each); ``kind`` is
    prose or code. Needs the corpus, not a trained run."""
    rows = [{"split": "train", "doc": i, "tokens": n} for i, n in train_doc_tokens(corpus)]
    docs, _ = D.eval_window_sources(corpus, cfg.data.n_eval, cfg.model.n_ctx, cfg.data.eval_seed)
    rows += [{"split": "eval", "doc": corpus.val_ids[int(d)], "tokens": cfg.model.n_ctx} for d in docs]
    t = pd.DataFrame(rows)
    t["source"], t["kind"] = t["doc"].map(source), t["doc"].map(kind)
    out = t.groupby(["split", "kind", "source"], sort=False)["tokens"].sum().reset_index()
    out["share"] = out["tokens"] / out.groupby("split")["tokens"].transform("sum")
    out.attrs.update(run=cfg.name, n_eval=cfg.data.n_eval, n_ctx=cfg.model.n_ctx)
    return out


def run_shares(runs: dict) -> pd.DataFrame:
    """:func:`token_shares` of the first of ``runs`` ({name: Run}, e.g. a chapter's runs on one corpus)."""
    run = next(iter(runs.values()))
    return token_shares(run.config, run.corpus)


def profile_shares(prof) -> pd.DataFrame:
    """:func:`token_shares` of the first run of chapter 1 in profile ``prof`` (the book's main
    corpus), from its config and corpus: the methods chapter needs no trained run."""
    from .runs import cache_dir
    cfg = prof.run_config(prof.chapter_params("01_cooccurrence")["runs"][0])
    return token_shares(cfg, D.Corpus(cfg.data, cache_dir()))


def shares_display(shares: pd.DataFrame) -> pd.DataFrame:
    """Share of tokens per source (rows) in the training stream and the evaluation windows (columns)."""
    return shares.pivot_table(index=["kind", "source"], columns="split", values="share", fill_value=0.0)[["train", "eval"]].round(3)


def code_share(shares: pd.DataFrame, split: str) -> float:
    """The share of code tokens in ``split`` ('train' or 'eval') of :func:`token_shares`."""
    s = shares[shares["split"] == split]
    return float(s[s["kind"] == "code"]["share"].sum())


def mix_text(shares: pd.DataFrame) -> str:
    """The corpus mix as the chapters state it (computed, never typed)."""
    ev = shares[shares["split"] == "eval"].sort_values("share", ascending=False)
    top = ev.iloc[0]
    return (f"**Corpus mix (a deviation).** By tokens, the training stream is {code_share(shares, 'train'):.0%} Python "
            f"source code and the fixed evaluation windows are {code_share(shares, 'eval'):.0%} code (the largest source, "
            f"`{top.source}`, alone {top.share:.0%}); the paper trained on web text and books with about "
            f"{PAPER_CODE_SHARE:.0%} code. The evaluation windows are drawn per document with equal shares of prose "
            "and code, so the ICL scores weigh both alike; the training stream keeps the corpus's own mix.")


def eval_rule_text(shares: pd.DataFrame) -> str:
    """The evaluation-window rule (:func:`icl_core.data.eval_window_sources`), with the profile's sizes."""
    a = shares.attrs
    return (f"**Evaluation windows.** {a['n_eval']} windows of {a['n_ctx']} tokens, the same for every model and "
            "snapshot. Each validation document is cut into consecutive windows from its start (its first window "
            "begins with the document's EOS, as in training; later ones start mid-document with no BOS). Prose and "
            "code get equal numbers of windows; within each, documents are shuffled and dealt round-robin (every "
            "document's first window, then every second one, ...), so each document counts rather than each token "
            f"(shares computed for `{a['run']}`).")


def icl_by_window(run, step: int | None = None, band: bool = False) -> pd.DataFrame:
    """The ICL score of ``run`` at snapshot ``step`` (default the last; from the per-token losses
    logged there), over all evaluation windows and over each group of them by kind (prose/code,
    :func:`kind`) and place ("first": a document's first window, from its EOS; "later": the rest),
    with each group's number of windows. The "all" row is the logged score."""
    from . import metrics as M

    cfg = run.config
    step = run.steps[-1] if step is None else step
    losses = run.eval_losses(step)
    if losses is None:
        raise ValueError(f"run {run.name} kept no per-token losses at step {step}")
    docs, starts = D.eval_window_sources(run.corpus, cfg.data.n_eval, cfg.model.n_ctx, cfg.data.eval_seed)
    first = starts == run.corpus.val_offsets[docs]
    kinds = np.array([kind(run.corpus.val_ids[d]) for d in docs])
    groups = {"all": np.ones(len(docs), bool)}
    for k in ("prose", "code"):
        for place, m in (("first", first), ("later", ~first)):
            groups[f"{k}, {place}"] = (kinds == k) & m
    rows = [{"windows": name, "n": int(m.sum()),
             "icl": M.icl_score_from_losses(losses[m], cfg.model.n_ctx, band=band) if m.any() else float("nan")}
            for name, m in groups.items()]
    return pd.DataFrame(rows).set_index("windows")


def icl_on_random_windows(run, step: int | None = None, n: int = 256, seed: int = 0) -> dict:
    """The ICL score of ``run`` at ``step`` (default the last) on ``n`` windows drawn as training draws
    them: random offsets in the validation stream, across documents (the evaluation windows instead
    tile each document from its start, :func:`icl_core.data.eval_window_sources`). Returns the
    single-index and banded scores over all windows and over those inside one document (no EOS
    after their first token), and that count. Cached in the run folder (:func:`icl_core.analysis.cached`):
    the methods appendix only loads it after the first build."""
    import torch

    from . import analysis as A
    from . import metrics as M

    n_ctx = run.config.model.n_ctx
    step = run.steps[-1] if step is None else step

    def compute():
        val = np.asarray(run.corpus.val)
        starts = np.random.default_rng(seed).integers(0, len(val) - n_ctx, n)
        toks = torch.from_numpy(np.stack([val[s:s + n_ctx] for s in starts]).astype(np.int64))
        losses = M.per_token_losses(run.load(step), toks, precision=run.metrics_precision)
        inside = (toks[:, 1:] != D.EOS_ID).all(1)
        nan = float("nan")
        out = {"icl": M.icl_score_from_losses(losses, n_ctx), "icl_band": M.icl_band_score(losses, n_ctx),
               "icl_inside": M.icl_score_from_losses(losses[inside], n_ctx) if inside.any() else nan,
               "icl_band_inside": M.icl_band_score(losses[inside], n_ctx) if inside.any() else nan}
        return {**{k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()},
                "n_inside": torch.tensor(int(inside.sum()))}

    r = A.cached(run, "random_windows", {"step": step, "n": n, "seed": seed, "precision": run.metrics_precision},
                 compute)
    return {**{k: float(r[k]) for k in ("icl", "icl_band", "icl_inside", "icl_band_inside")},
            "n": n, "n_inside": int(r["n_inside"])}


#: the runs :func:`window_rule_table` measures by default: the paper's own model, every seed the profile has
WINDOW_RULE_RUNS = ("attn2", "attn2_s1", "attn2_s2")


def window_rule_table(prof, names=None, n: int = 1024, seed: int = 0) -> pd.DataFrame:
    """Per trained run (default :data:`WINDOW_RULE_RUNS` that ``prof`` has), the final banded ICL score on the
    book's evaluation windows (as logged) and on ``n`` windows drawn as training draws them
    (:func:`icl_on_random_windows`), all of them and those inside one document, and the difference."""
    names = [r for r in (names or WINDOW_RULE_RUNS) if r in prof.runs]
    rows = []
    for name in names:
        try:
            run = prof.run(name)
        except FileNotFoundError:  # not trained (the appendix trains nothing): left out
            continue
        r = icl_on_random_windows(run, None, n, seed)
        book = float(run.metrics()["icl"].iloc[-1])
        rows.append({"run": name, "tokens": run.tokens(run.steps[-1]), "book's windows": book,
                     "random offsets": r["icl_band"], "inside one document": r["icl_band_inside"],
                     "book minus random": book - r["icl_band"], "windows": n})
    cols = ["run", "tokens", "book's windows", "random offsets", "inside one document", "book minus random", "windows"]
    return pd.DataFrame(rows, columns=cols).set_index("run")


def window_rule_text(table: pd.DataFrame) -> str:
    """What :func:`window_rule_table` shows, and why it is reported (a deviation the book states)."""
    if table.empty:
        return ("No run of the paper's own model is trained for this build: the window rule's effect is not "
                "measured here (`benchmarks/window_rule.md`).")
    d, book = table["book minus random"], table["book's windows"]
    return (f"*[Deviation]* For the paper's own model ({join(f'`{r}`' for r in table.index)}), the final banded ICL "
            f"score is {fmt(book.min())} to {fmt(book.max())} nats on the book's "
            f"evaluation windows and {fmt(table['random offsets'].min())} to {fmt(table['random offsets'].max())} on "
            f"{int(table['windows'].iloc[0]):,} windows drawn as training draws them (random offsets in the validation "
            f"stream, across documents): the book's windows shift it by {fmt(d.min())} to {fmt(d.max())} nats "
            f"(positive: less negative on the book's windows). The paper averages its score over training-like "
            "contexts; the book's windows tile each document from its start (above), so in a document's first window "
            "the early index sits in its opening lines. The chapters report the score "
            "on the book's windows (`benchmarks/window_rule.md`).")


def bos_artefact(losses, vocab_size: int) -> dict:
    """From per-index losses (each ``(T-1,)``, e.g. the last snapshot of some runs): the mean loss at
    the first text index, ln(vocabulary) and the mean loss at the next four indices."""
    x = np.stack([np.asarray(v, dtype=np.float64) for v in losses])
    return {"first": float(x[:, 0].mean()), "uniform": math.log(vocab_size), "next": float(x[:, 1:5].mean())}


def bos_text(art: dict | None = None) -> str:
    """What the first index of the loss-by-index heatmaps shows (with the measured loss when ``art`` is given)."""
    s = ("**The first index.** The first token of a window is predicted from one token of context (the document's "
         "EOS for a window that starts a document, a mid-document token otherwise), so its loss is the model's "
         "loss with almost no context")
    if art is not None:
        s += (f": {art['first']:.2f} nats, against {art['uniform']:.2f} for a uniform guess over the "
              f"vocabulary (ln {math.exp(art['uniform']):.0f}) and {art['next']:.2f} at the next few indices")
    return s + (". An earlier evaluation set put BOS before mid-document text, which training never shows, and its "
                "first index scored worse than a uniform guess; the windows now follow the training stream. The ICL "
                "score (late minus early index) does not use the first index.")

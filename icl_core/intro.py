"""The introduction (chapters/00_intro): one small model, its attention on repeated tokens, its heads.

:func:`compute` loads a run and everything the chapter shows about it (:class:`Intro`); the
``*_summary`` functions return the chapter's sentences, generated from those numbers;
:func:`attention_explorer` is the widget of attention patterns. Figures:
:mod:`icl_core.plots.intro`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import metrics as M
from .analysis import story_steps
from .config import icl_indices
from .heads import top_head
from .profiles import Profile, available_profiles, load_profile
from .runs import Run


@dataclass
class Intro:
    """One run and what the introduction shows of it."""
    profile: Profile
    run: Run
    metrics: pd.DataFrame  # Run.metrics(): one row per snapshot
    late: int  # ICL indices (icl_core.icl_indices)
    early: int
    steps: list[int]  # the checkpoints whose attention patterns are shown
    rep: object  # (1, T) BOS + a random sequence repeated
    patterns: dict[int, np.ndarray]  # {step: (n_layers, n_heads, T, T)} on ``rep``
    final_prefix: np.ndarray  # (n_layers, n_heads) at the last snapshot
    final_prev: np.ndarray
    best: tuple[int, int]  # the head with the highest final prefix-matching score


def compute(prof: Profile, run_name: str, n_checkpoints: int = 6) -> Intro:
    """Load ``run_name`` of ``prof`` and its attention patterns on one repeated random sequence at
    ``n_checkpoints`` checkpoints (:func:`icl_core.analysis.story_steps`)."""
    run = prof.run(run_name)
    df = run.metrics()
    late, early = icl_indices(run.config.model.n_ctx)
    rep = run.eval_data.rep[:1]
    steps = story_steps(run, n_checkpoints)  # first, last, log-spaced, and the phase-change window's edges
    patterns = {s: next(M.attention_patterns(run.load(s), rep))[1][0].numpy() for s in steps}
    final_prefix = np.asarray(df.prefix.iloc[-1])
    return Intro(prof, run, df, late, early, steps, rep, patterns, final_prefix,
                 np.asarray(df.prev_token.iloc[-1]), top_head(final_prefix))


def model_summary(r: Intro) -> str:
    """The model, its training and its loss and ICL at the first and last snapshot."""
    run, df, cfg = r.run, r.metrics, r.run.config
    return (
        f"The model on this page is run `{run.name}` of the **{r.profile.name}** profile: "
        f"{cfg.model.n_layers} layers of {cfg.model.n_heads} attention heads, "
        f"{'attention only' if cfg.model.attn_only else 'with MLPs'}, d_model = {cfg.model.d_model}, "
        + ("with **smeared keys** (the architecture of [Argument 2](02_coperturbation.ipynb), which makes "
           "induction heads much easier to form than in a vanilla model; the vanilla models' story "
           "is told in [Argument 1](01_cooccurrence.ipynb)), " if cfg.model.smeared_keys else "") +
        f"{cfg.model.positional} positions, "
        f"a context of {cfg.model.n_ctx} tokens and a vocabulary of {cfg.model.d_vocab} tokens. "
        f"It saw {df.tokens.iloc[-1]:,} training tokens ({cfg.total_steps:,} steps, "
        f"{run.train_seconds:.0f} s of training) and was saved at {len(run.steps)} checkpoints. "
        f"Its evaluation loss fell from {df.loss.iloc[0]:.2f} to {df.loss.iloc[-1]:.2f} nats per token, "
        f"and its ICL score, L({r.late}) − L({r.early}), went from {df.icl.iloc[0]:+.3f} to {df.icl.iloc[-1]:+.3f} nats."
    )


def sequence_summary(r: Intro) -> str:
    """The repeated random sequence and the checkpoints shown."""
    data = r.run.config.data
    return (
        f"The sequence is a BOS token followed by {data.prefix_seq_len} random tokens repeated {data.prefix_repeats} times "
        f"({r.rep.shape[1]} tokens); its first repeat reads `{r.run.corpus.decode(r.rep[0, 1:1 + data.prefix_seq_len])!r}`. "
        f"The checkpoints shown are steps {', '.join(str(s) for s in r.steps)}."
    )


def attention_explorer(r: Intro):
    """A static widget: the attention pattern of any (layer, head, checkpoint), starting at the top
    induction head at the last checkpoint."""
    from . import widgets as W
    from .plots.intro import plot_attention_pattern

    cfg, run = r.run.config, r.run
    images = {(l, h, s): plot_attention_pattern(r.patterns[s][l, h], cfg.data.prefix_seq_len,
                                                title=f"layer {l}, head {h}, step {s}")
              for s in r.steps for l in range(cfg.model.n_layers) for h in range(cfg.model.n_heads)}
    return W.image_grid_selector(images, names=("layer", "head", "checkpoint"),
                                 labels={"checkpoint": {s: f"step {s} ({run.tokens(s):,} tokens)" for s in r.steps}},
                                 initial=(r.best[0], r.best[1], r.steps[-1]))


def head_summary(r: Intro) -> str:
    """The prefix-matching and previous-token scores, and the heads with the highest of each."""
    data = r.run.config.data
    prev = top_head(r.final_prev)
    return (
        f"The paper's **prefix-matching score** measures the induction stripe: the attention a head puts "
        f"on the token after an earlier copy of the current token, averaged over repeats 2–{data.prefix_repeats} "
        f"of {data.n_prefix_seqs} random sequences (0 to 1). At the last checkpoint the highest score "
        f"belongs to layer {r.best[0]}, head {r.best[1]}: {r.final_prefix[r.best]:.2f}. The highest "
        f"**previous-token score** (mean attention to the immediately preceding token, on text) is "
        f"{r.final_prev.max():.2f}, in layer {prev[0]}, head {prev[1]}."
    )


def index_conventions(r: Intro) -> str:
    """How the paper's token indices are rescaled to this context."""
    return (
        f"**Token indices.** The paper uses indices 500 and 50 with 512-token contexts. With a shorter "
        f"context the book rescales both by n_ctx / 512 (`icl_core.icl_indices`): for this run's context of "
        f"{r.run.config.model.n_ctx} tokens that gives late = {r.late} and early = {r.early}. Indices are 1-based "
        f"positions of text tokens, counted after the BOS token. Layers and heads are numbered from 0, "
        "and every per-head result is an array of shape (n_layers, n_heads)."
    )


def band_conventions(r: Intro) -> str:
    """The banded ICL estimate, with this run's band widths (:func:`icl_core.metrics.icl_band_widths`)."""
    wl, we = M.icl_band_widths(r.run.config.model.n_ctx)
    df = r.metrics
    return (
        f"**A banded estimate.** *[Book choice]* The paper averaged over 10,000 evaluation windows; this "
        f"profile uses {len(r.run.eval_data.tokens)}. With so few, the loss at exactly one index is dominated "
        f"by a handful of hard tokens, which stay in the fixed evaluation set at every snapshot. The book's "
        f"ICL score therefore averages the loss over indices {r.late} ± {wl} (clipped to the context) minus the "
        f"average over {r.early} ± {we} (`icl_core.metrics.icl_band_score`). For this run at its last snapshot "
        f"the banded score is {df.icl.iloc[-1]:+.3f} nats and the single-index one "
        f"{df.icl_single.iloc[-1]:+.3f} nats; both are logged at every snapshot."
    )


def profiles_summary(prof: Profile) -> str:
    """The table of every profile, and which one built this page."""
    rows = []
    for name in available_profiles():
        p = load_profile(name)
        rows.append(f"| `{name}` | {len(p.runs)} | {' '.join(p.description.split())} |")
    return ("**Profiles.** What is trained, and how much, is set by a profile in `configs/profiles/`; "
            f"this page was built with **{prof.name}**. Build another with `make book PROFILE=<name>`.\n\n"
            "| profile | runs | description |\n|---|---|---|\n" + "\n".join(rows))

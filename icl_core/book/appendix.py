"""Used by the chapters: the profile banner, and the tables of the reproducibility appendix
(chapters/07_methods): runs, corpus, deviations from the paper, package versions."""
from __future__ import annotations

from ..profiles import Profile


def chapter_banner(profile: Profile):
    """The profile note at the top of every chapter (a warning when the profile has a banner)."""
    from IPython.display import Markdown

    if profile.banner.strip():
        return Markdown("```{warning}\n" + " ".join(profile.banner.split()) + "\n```")
    return Markdown(f"*Built with the **{profile.name}** profile.*")


def _trained(profile: Profile, name: str):
    try:
        return profile.run(name)
    except FileNotFoundError:
        return None


def runs_table(profile: Profile):
    """One row per run: model, training, seeds, config hash and compute (train_seconds)."""
    import pandas as pd

    rows = []
    for name, cfg in profile.runs.items():
        m, t, d = cfg.model, cfg.train, cfg.data
        run = _trained(profile, name)
        rows.append({
            "run": name, "layers": m.n_layers, "d_model": m.d_model, "heads": m.n_heads, "d_head": m.d_head,
            "MLPs": not m.attn_only, "positions": m.positional, "attention biases": bool(m.attn_bias),
            "smeared keys": m.smeared_keys, "n_ctx": m.n_ctx, "vocab": m.d_vocab, "batch": t.batch_size, "lr": t.lr,
            "schedule": f"{t.lr_schedule}, warmup {t.warmup_steps}", "tokens": t.total_tokens,
            "steps": cfg.total_steps, "snapshots": len(run.steps) if run else None, "precision": t.precision,
            "metrics precision": t.metrics_precision,
            "seed": t.seed, "split seed": d.split_seed, "eval seed": d.eval_seed, "config hash": cfg.hash(),
            "train seconds": round(run.train_seconds, 1) if run else None,
            # evaluation at the snapshots (loss, ICL, head scores); nan for runs trained before it was logged
            "snapshot metrics seconds": round(run.metrics_seconds(), 1) if run else None,
        })
    return pd.DataFrame(rows).set_index("run")


def corpus_table(profile: Profile):
    """One row per distinct corpus (tokenizer + token arrays) the profile's runs use."""
    import pandas as pd

    from .. import data as D

    rows, seen = [], set()
    for name, cfg in profile.runs.items():
        key = D.corpus_key(cfg.data)
        if key in seen:
            continue
        seen.add(key)
        run = _trained(profile, name)
        man = run.corpus.manifest if run else {}
        d = cfg.data
        rows.append({
            "corpus key": key, "runs": ", ".join(n for n, c in profile.runs.items() if D.corpus_key(c.data) == key),
            "sources": ", ".join(d.sources),
            "bible versions": ", ".join(d.bible_versions) if "bible" in d.sources else "",
            "code packages": ", ".join(d.code_packages) if "code" in d.sources else "",
            "package versions": ", ".join(f"{k} {v}" for k, v in D.source_versions(d).items()),
            "chars per source cap": d.max_chars_per_source or "none",
            "tokenizer": f"byte-level BPE, {d.vocab_size} tokens (trained on the training split)",
            "train documents": man.get("n_docs", {}).get("train"), "val documents": man.get("n_docs", {}).get("val"),
            "train tokens": man.get("n_tokens", {}).get("train"), "val tokens": man.get("n_tokens", {}).get("val"),
            "eval windows": f"{d.n_eval} x {cfg.model.n_ctx} tokens",
        })
    return pd.DataFrame(rows).set_index("corpus key")


def package_versions(names=("torch", "numpy", "tokenizers", "pandas", "matplotlib", "papermill",
                            "jupyter-book", "ipywidgets", "nbclient")):
    import importlib.metadata as md
    import platform

    import pandas as pd

    rows = [{"package": "python", "version": platform.python_version()}]
    for n in names:
        try:
            rows.append({"package": n, "version": md.version(n)})
        except md.PackageNotFoundError:
            rows.append({"package": n, "version": "not installed"})
    return pd.DataFrame(rows).set_index("package")


def _span(values) -> str:
    vals = sorted(set(values), key=lambda v: (str(type(v)), v))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and len(vals) > 2:
        return f"{vals[0]:,}-{vals[-1]:,}"
    return ", ".join(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for v in vals)


def deviations_table(profile: Profile):
    """The paper's setup (Olsson et al. 2022) next to this profile's, row by row."""
    import pandas as pd

    from ..config import icl_indices

    cfgs = list(profile.runs.values())
    m = [c.model for c in cfgs]
    t = [c.train for c in cfgs]
    d = [c.data for c in cfgs]
    idx = sorted({icl_indices(x.n_ctx) for x in m})
    rows = [
        ("layers (small models)", "1-6", _span(x.n_layers for x in m)),
        ("d_model", "768", _span(x.d_model for x in m)),
        ("heads per layer", "12", _span(x.n_heads for x in m)),
        ("attention-only / with MLPs", "both", _span("with MLPs" if not x.attn_only else "attention-only" for x in m)),
        ("positions", "Shortformer (queries and keys only)", _span(x.positional for x in m)),
        ("attention biases (b_Q, b_K, b_V, b_O)", "not stated",
         _span("yes" if x.attn_bias else "no" for x in m)
         + (" (the laptop recipe's runs; the sweep's control without them forms its induction head too)"
            if any(x.attn_bias for x in m) else "")),
        ("context (n_ctx)", "8192", _span(x.n_ctx for x in m)),
        ("vocabulary", "2^16 BPE", _span(x.vocab_size for x in d) + " byte-level BPE trained on the corpus"),
        ("training data", "web text, books, ~10% Python", _span(",".join(x.sources) for x in d)
         + " (public-domain Bible translations, Python source of pinned packages)"),
        ("training tokens", "~10B", _span(x.total_tokens for x in t)),
        ("batch (sequences x context)", "not stated for the small models",
         _span(f"{c.train.batch_size} x {c.model.n_ctx}" for c in cfgs)),
        ("snapshots", "200 (every 50 steps)", _span(x.n_snapshots for x in t) + " requested, log-spaced early plus linear"),
        ("optimiser", "not fully specified", "AdamW, lr " + _span(x.lr for x in t) + ", warmup, "
         + _span(x.lr_schedule for x in t) + " schedule"),
        ("evaluation set", "10,000 random 512-token examples",
         _span(f"{x.n_eval} x {c.model.n_ctx}" for x, c in zip(d, cfgs)) + " tokens, fixed across snapshots; "
         "snapshot metrics and ablations in " + _span(x.metrics_precision for x in t)
         + " (train.eval_precision; bf16: autocast forward, fp32 losses)"),
        ("ICL score", "L(500) - L(50) (sign varies in the paper)",
         "L(late) - L(early), negative = ICL [book choice]; (late, early) = "
         + ", ".join(f"({a}, {b})" for a, b in idx)
         + "; averaged over a band of indices around each (metrics.icl_band_score) [book choice]"),
        ("smeared keys: initial alpha", "not given", "alpha = 0, sigmoid 0.5 [book choice]"),
        ("phase-change window", "chosen from dICL/dlog tokens", "computed: steepest fall of the banded ICL "
         "curve (smoothed in ln tokens) and the contiguous snapshots within 30% of it [book choice]"),
        ("prefix-matching sequences", "25 random tokens x 4, 10+ sequences",
         _span(f"{x.prefix_seq_len} x {x.prefix_repeats}, {x.n_prefix_seqs} sequences" for x in d)),
    ]
    if any(x.repeat_fraction for x in d):
        rows.append(("repeated spans in training rows", "none",
                     _span(x.repeat_fraction for x in d) + " of rows repeat a span of their document"))
    return pd.DataFrame(rows, columns=["aspect", "paper", f"profile {profile.name}"]).set_index("aspect")


def profile_summary(profile: Profile, runs) -> str:
    """The profile, its runs and what training them cost (``runs``: :func:`runs_table`)."""
    msec = runs["snapshot metrics seconds"].astype(float)
    return (f"**Profile `{profile.name}`.** {' '.join(profile.description.split())} It defines {len(runs)} runs; "
            f"training them took {runs['train seconds'].sum():.0f} s in total (measured optimisation time, "
            f"without evaluation at checkpoints)."
            + (f" Evaluation at the snapshots took {msec.sum():.0f} s more for the {msec.notna().sum()} runs that logged it "
               f"({msec.sum() / runs.loc[msec.notna(), 'train seconds'].sum():.0%} of their training time)."
               if msec.notna().any() else ""))


def alignment(profile: Profile):
    """:func:`icl_core.data.version_alignment` of the profile's Bible versions (its first run's)."""
    from ..data import version_alignment

    return version_alignment(next(iter(profile.runs.values())).data.bible_versions)


def alignment_text(align) -> str:
    """Which translations are misaligned (median similarity below
    :data:`icl_core.parallel_text.MIN_AGREEMENT`), and what that means for the corpus."""
    from ..parallel_text import MIN_AGREEMENT

    bad = [v for v, r in align.iterrows() if r.iloc[1] < MIN_AGREEMENT]
    return (("Misaligned: " + ", ".join(f"`{v}`" for v in bad) + ". Its verse offsets drift, so its 'chapters' are "
             "contiguous slices of its text shifted against the true chapter boundaries: still English prose for "
             "training, but not parallel to the other versions, and a validation chapter of it may hold text of "
             "neighbouring (training) chapters of the same translation. Argument 4 excludes it from parallel-text "
             "measurements; a later corpus revision should replace it.") if bad else
            "All translations line up with the King James Version.")


SWEEP_COLUMNS = ["variant", "changes from base", "tokens_M", "minutes", "ktok_s", "loss_final", "icl_first",
                 "icl_min", "icl_final", "prefix_maxall", "prev_final", "prev_by_layer", "tokens_prefix_0.3_M",
                 "window_M", "finished"]


def show_sweep_rounds() -> None:
    """Display every sweep round of the laptop recipe: its notes, then its summary table
    (:func:`icl_core.sweep.sweep_tables`)."""
    from IPython.display import Markdown, display

    from ..sweep import sweep_tables

    for name, notes, table in sweep_tables():
        display(Markdown(f"**{name}.** {notes}"))
        display(table[[c for c in SWEEP_COLUMNS if c in table.columns]].round(3))

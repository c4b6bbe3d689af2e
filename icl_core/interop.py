"""TransformerLens interoperability: any run of the book as a ``HookedTransformer``.

``export_to_transformer_lens(run, step)`` copies the weights one to one (no folding, centring or
refactoring: TransformerLens' ``from_pretrained`` processing is not used), so the exported model's
logits equal ours up to float rounding. The optional extra is ``requirements-extras.txt``
(``transformer-lens==3.9.0``, the last release with ``HookedTransformer``).

What maps to what (ours -> TransformerLens ``HookedTransformerConfig``):

=====================  ==================================================================
positional learned     ``positional_embedding_type="standard"``
positional shortformer ``"shortformer"``: queries and keys read ln1(resid) + W_pos, values
                       ln1(resid) (exact only while icl_core.model does the same)
positional rope        ``"rotary"``, ``rotary_dim=d_head``, ``rotary_adjacent_pairs=True``
                       (GPT-J convention: pairs (2i, 2i+1), our convention), base 10000
positional none        ``"standard"`` with ``W_pos = 0`` (TransformerLens has no "none")
layer_norm on / off    ``normalization_type="LN"`` (eps 1e-5) / ``None``
attn_only / MLP        ``attn_only``; ``act_fn="gelu"`` is TransformerLens' exact ``F.gelu``
                       (not ``gelu_new``/``gelu_fast``, which are tanh approximations)
biases                 b_Q, b_K, b_V, b_O when model.attn_bias is on, else 0; b_U = 0
smeared_keys           not expressible: :class:`NotImplementedError`
=====================  ==================================================================

Head detection (:func:`tl_head_detection_scores`) runs TransformerLens' own
``head_detector.detect_head`` on token ids. How its scores relate to ours (default
``error_measure="mul"``, ``exclude_bos=False``), for a sequence of ``T`` tokens:

* ``"induction_head"`` marks key k for query q iff k <= q and token[k-1] == token[q]: the same
  stripe as our :func:`icl_core.metrics.prefix_matching_mask`. ``detect_head`` divides the
  attention on it by the total attention, which is T (every row sums to 1), i.e. it averages over
  *all* T queries. Ours averages over the queries in repeats 2..R only, the ``T - 1 - seq_len``
  positions after BOS and the first repeat; on BOS + random tokens repeated R times the other
  queries have no earlier copy (the tokens of one repeat are distinct and never BOS), so their
  stripe is empty. Hence, per sequence and so also for the
  mean over sequences::

      TL_induction = prefix_matching * (T - 1 - seq_len) / T,   T = 1 + seq_len * R

* ``"previous_token_head"`` marks k = q - 1; TL again divides by T while ours averages over the
  T - 1 queries that have a previous token::

      TL_previous = previous_token * (T - 1) / T

These factors are :func:`tl_induction_factor` and :func:`tl_previous_token_factor`.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from .model import Transformer

EXTRA_HINT = ("TransformerLens is an optional extra of this book: "
              "pip install -r requirements-extras.txt  (transformer-lens==3.9.0)")


def _require_transformer_lens():
    try:
        import transformer_lens
    except ImportError:
        raise ImportError(f"export_to_transformer_lens needs the 'transformer_lens' package. {EXTRA_HINT}") from None
    return transformer_lens


def _as_run_and_model(run_or_model, step: int | None):
    if isinstance(run_or_model, Transformer):
        if step is not None:
            raise ValueError("step is only meaningful for a run, not for a Transformer")
        return None, run_or_model
    from .runs import Run  # lazy: runs imports the training stack

    run = run_or_model if isinstance(run_or_model, Run) else Run(Path(run_or_model))
    return run, run.load(step)


def hf_tokenizer(tokenizer):
    """Our ``tokenizers.Tokenizer`` (byte-level BPE, ``<|endoftext|>`` = id 0) as the Hugging Face
    tokenizer TransformerLens expects; ``<|endoftext|>`` doubles as BOS, as in our sequences."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from .data import EOS

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def tl_config(cfg, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The ``HookedTransformerConfig`` equivalent to our ``ModelConfig`` (raises where none is)."""
    tl = _require_transformer_lens()
    if cfg.smeared_keys:
        raise NotImplementedError(
            "model.smeared_keys=True cannot be exported to TransformerLens: its attention computes "
            "each key from one position only (k_j = W_K x_j), and has no parameter for our learned "
            "per-head mix of each key with the previous position's key, k'_j = s k_j + (1 - s) k_{j-1}. "
            "Export only the vanilla control runs, or analyse smeared-key runs with icl_core.metrics.")
    pos = {"learned": "standard", "none": "standard", "shortformer": "shortformer", "rope": "rotary"}
    if cfg.positional not in pos:
        raise NotImplementedError(f"model.positional={cfg.positional!r} has no TransformerLens equivalent")
    kw = dict(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
        n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab, d_vocab_out=cfg.d_vocab,
        attn_only=cfg.attn_only, d_mlp=None if cfg.attn_only else cfg.d_mlp,
        act_fn="gelu",  # exact erf GELU (F.gelu), as ours
        normalization_type="LN" if cfg.layer_norm else None, eps=1e-5,
        positional_embedding_type=pos[cfg.positional],
        use_attn_scale=True, attn_scale=cfg.d_head ** 0.5, attention_dir="causal",
        default_prepend_bos=False,  # our sequences carry their own BOS (= EOS id 0) already
        init_weights=False,  # every weight is overwritten
        device=device, dtype=dtype, model_name="icl_core",
    )
    if cfg.positional == "rope":
        kw.update(rotary_dim=cfg.d_head, rotary_base=10000, rotary_adjacent_pairs=True)
    return tl.HookedTransformerConfig(**kw)


def tl_state_dict(model: Transformer, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under TransformerLens' names; ``template`` supplies everything we lack (zeroed
    biases, TransformerLens' buffers such as its rotary tables)."""
    cfg = model.cfg
    sd = {k: v.clone() for k, v in template.items()}

    def put(name, value):
        if name not in sd:
            raise KeyError(f"TransformerLens model has no parameter {name!r}")
        if sd[name].shape != value.shape:
            raise ValueError(f"{name}: TransformerLens shape {tuple(sd[name].shape)} != ours {tuple(value.shape)}")
        sd[name] = value.detach().to(sd[name].dtype).clone()

    put("embed.W_E", model.W_E)
    if cfg.positional in ("learned", "shortformer"):
        put("pos_embed.W_pos", model.W_pos)
    elif "pos_embed.W_pos" in sd:  # positional none: a zero table
        put("pos_embed.W_pos", torch.zeros_like(sd["pos_embed.W_pos"]))
    for l, block in enumerate(model.blocks):
        p = f"blocks.{l}"
        a = block.attn
        for n, w in (("W_Q", a.W_Q), ("W_K", a.W_K), ("W_V", a.W_V), ("W_O", a.W_O)):
            put(f"{p}.attn.{n}", w)
        for n in ("b_Q", "b_K", "b_V", "b_O"):
            put(f"{p}.attn.{n}", getattr(a, n) if cfg.attn_bias else torch.zeros_like(sd[f"{p}.attn.{n}"]))
        lns = [("ln1", block.ln1)] + ([] if cfg.attn_only else [("ln2", block.ln2)])
        if cfg.layer_norm:
            for n, ln in lns:
                put(f"{p}.{n}.w", ln.w)
                put(f"{p}.{n}.b", ln.b)
        if not cfg.attn_only:
            for n in ("W_in", "b_in", "W_out", "b_out"):
                put(f"{p}.mlp.{n}", getattr(block.mlp, n))
    if cfg.layer_norm:
        put("ln_final.w", model.ln_final.w)
        put("ln_final.b", model.ln_final.b)
    put("unembed.W_U", model.W_U)
    put("unembed.b_U", torch.zeros_like(sd["unembed.b_U"]))
    return sd


@torch.no_grad()
def export_to_transformer_lens(run_or_model, step: int | None = None, device: str | None = None,
                               tokenizer=None, check: bool = True):
    """A ``HookedTransformer`` computing the same function as a run's snapshot (or a Transformer).

    ``run_or_model``: a :class:`icl_core.runs.Run`, a run folder, or a :class:`Transformer`;
    ``step``: the snapshot (default: the last). The weights are copied exactly: no LayerNorm
    folding, centring or other ``from_pretrained`` processing, so ``W_Q``, ``W_K``, ... read the
    same in both libraries. Token tensors go in as they are (our sequences already begin with
    BOS = ``<|endoftext|>``, id 0). ``tokenizer``: ``True`` attaches the run's own tokenizer (this
    loads, or builds, the run's corpus cache), or pass a ``tokenizers.Tokenizer`` / Hugging Face
    tokenizer; then ``to_tokens(text)`` prepends BOS as our evaluation windows do, and
    ``to_str_tokens``, ``generate`` work. Default: no tokenizer. ``check`` runs one small batch
    through both models and raises if their logits disagree (a guard against the two libraries'
    conventions drifting apart).
    """
    tl = _require_transformer_lens()
    run, model = _as_run_and_model(run_or_model, step)
    p = next(model.parameters())
    device = device or p.device.type
    cfg = tl_config(model.cfg, device=device, dtype=p.dtype)
    with warnings.catch_warnings():  # 3.x warns that HookedTransformer will be removed in 4.0
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*HookedTransformer.*")
        tl_model = tl.HookedTransformer(cfg, move_to_device=False)
    tl_model.load_state_dict(tl_state_dict(model, tl_model.state_dict()), strict=True)
    tl_model = tl_model.to(device, print_details=False).eval()
    if check:
        _check_export(model, tl_model)
    if tokenizer is True:
        if run is None:
            raise ValueError("tokenizer=True needs a run; for a bare Transformer pass the tokenizer itself")
        tokenizer = run.corpus.tokenizer
    if tokenizer is not None:
        # set directly: set_tokenizer would reload the tokenizer by name to force add_bos_token
        tok = hf_tokenizer(tokenizer)
        tok.padding_side = "right"
        tl_model.tokenizer, tl_model.cfg.tokenizer_prepends_bos = tok, False
        tl_model.cfg.default_prepend_bos = True
    return tl_model


@torch.no_grad()
def _check_export(model: Transformer, tl_model, tol: float = 1e-3) -> None:
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.d_vocab, (2, min(cfg.n_ctx, 32)), generator=g)
    ours = model(tokens.to(next(model.parameters()).device)).float().cpu()
    theirs = tl_model(tokens.to(tl_model.cfg.device)).float().cpu()
    err = float((ours - theirs).abs().max())
    if not err <= tol * (1 + float(ours.abs().max())):
        hint = ""
        if cfg.positional == "shortformer" and cfg.layer_norm:
            hint = (" TransformerLens' shortformer attention reads LN(resid) + W_pos for queries and "
                    "keys; a model whose queries and keys read LN(resid + W_pos) cannot be expressed "
                    "in TransformerLens.")
        raise RuntimeError(
            f"the exported TransformerLens model disagrees with ours (max |logit difference| {err:.3g}) "
            f"for positional={cfg.positional!r}, layer_norm={cfg.layer_norm}, attn_only={cfg.attn_only}: "
            f"icl_core.model and TransformerLens no longer compute the same function.{hint}")


# --- head detection through TransformerLens ---------------------------------------------------

def tl_induction_factor(seq_len: int, repeats: int) -> float:
    """TL ``induction_head`` score / our prefix-matching score on BOS + ``repeats`` copies."""
    T = 1 + seq_len * repeats
    return (T - 1 - seq_len) / T


def tl_previous_token_factor(T: int) -> float:
    """TL ``previous_token_head`` score / our previous-token score on sequences of length T."""
    return (T - 1) / T


def id_tokenizer(d_vocab: int):
    """A Hugging Face tokenizer whose text ``"t5 t17 t3"`` is exactly the ids [5, 17, 3]: lets
    TransformerLens' string-only helpers (``detect_head``) run on our token ids unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(d_vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0", pad_token="t0")


def ids_to_text(tokens: torch.Tensor) -> list[str]:
    """(B, T) ids -> B strings for :func:`id_tokenizer`."""
    return [" ".join(f"t{int(i)}" for i in row) for row in tokens]


@contextlib.contextmanager
def _with_tokenizer(tl_model, tokenizer):
    old_tok, old_bos = tl_model.tokenizer, tl_model.cfg.tokenizer_prepends_bos
    old_prepend = tl_model.cfg.default_prepend_bos
    try:
        # set directly: set_tokenizer would reload the tokenizer by name to force add_bos_token
        tokenizer.padding_side = "right"
        tl_model.tokenizer, tl_model.cfg.tokenizer_prepends_bos = tokenizer, False
        tl_model.cfg.default_prepend_bos = False
        yield tl_model
    finally:
        tl_model.tokenizer, tl_model.cfg.tokenizer_prepends_bos = old_tok, old_bos
        tl_model.cfg.default_prepend_bos = old_prepend


@torch.no_grad()
def tl_head_detection_scores(tl_model, tokens: torch.Tensor, head: str, **kw) -> torch.Tensor:
    """TransformerLens' ``detect_head(model, seqs, head, **kw)`` on (B, T) token ids -> (L, H).

    ``head``: ``"induction_head"``, ``"previous_token_head"`` or ``"duplicate_token_head"``. The
    model's tokenizer is swapped for :func:`id_tokenizer` during the call and restored after.
    ``detect_head`` needs T < n_ctx (strictly). See the module docstring for how the scores relate
    to :func:`icl_core.metrics.prefix_matching_scores` and ``previous_token_scores``.
    """
    _require_transformer_lens()
    from transformer_lens.head_detector import detect_head

    if tokens.shape[1] >= tl_model.cfg.n_ctx:
        raise ValueError(f"detect_head needs sequences shorter than n_ctx={tl_model.cfg.n_ctx}; got {tokens.shape[1]}")
    with _with_tokenizer(tl_model, id_tokenizer(tl_model.cfg.d_vocab)):
        return detect_head(tl_model, ids_to_text(tokens), head, **kw)

"""TransformerLens interoperability (icl_core.interop) and the Hugging Face corpus path.

Needs the optional extra (requirements-extras.txt); skipped cleanly without it.
"""
import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch

tl = pytest.importorskip("transformer_lens")
pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
datasets = pytest.importorskip("datasets")

from icl_core import data as D  # noqa: E402
from icl_core import interop  # noqa: E402
from icl_core import metrics as M  # noqa: E402
from icl_core.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from icl_core.model import Transformer  # noqa: E402

VOCAB = 300
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there one all we their can has been if more when "
         "will would who so no head token copy attention layer model induction prefix match").split()


def _documents(n=60, seed=0):
    """Seeded word salad with some repeated phrases (text the tokenizer has not seen before)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(60, 120))]
        phrase = " ".join(words[:6])
        docs.append(" ".join(words) + ". " + phrase.capitalize() + ", again: " + phrase + ".\n")
    return docs


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face dataset saved locally (no download), in the layout hf_documents reads."""
    root = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_dict({"text": _documents()})
    path = root / "tiny_stories_like"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


def _data_cfg(hf_dir, **kw):
    return DataConfig(sources=(f"hf:{hf_dir}",), vocab_size=VOCAB, val_fraction=0.3, **kw)


@pytest.fixture(scope="module")
def corpus(hf_dir, tmp_path_factory):
    return D.Corpus(_data_cfg(hf_dir), tmp_path_factory.mktemp("cache"))


def _random_model(cfg: ModelConfig, seed=0) -> Transformer:
    """Random weights large enough that attention is peaked and logits are O(1-10): a wrong
    convention anywhere then shows up far above the 1e-4 tolerance."""
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(getattr(mod, "w", None), torch.nn.Parameter):  # LayerNorm gains/biases
                mod.w.add_(0.3 * torch.randn_like(mod.w))
                mod.b.add_(0.3 * torch.randn_like(mod.b))
            if hasattr(mod, "b_qkv"):  # attention biases, when the config has them
                mod.b_qkv.add_(0.3 * torch.randn_like(mod.b_qkv))
                mod.b_O.add_(0.3 * torch.randn_like(mod.b_O))
            if hasattr(mod, "b_in"):
                mod.b_in.add_(0.3 * torch.randn_like(mod.b_in))
                mod.b_out.add_(0.3 * torch.randn_like(mod.b_out))
    return m


def _cfg(**kw):
    base = dict(n_layers=2, d_model=32, n_heads=4, n_ctx=64, d_vocab=VOCAB, init_std=0.3)
    return ModelConfig(**{**base, **kw})


ARCHS = list(itertools.product(("learned", "shortformer", "none", "rope"), (True, False), (True, False)))


# --- the Hugging Face corpus path ---------------------------------------------------------------

def test_hf_dataset_corpus_round_trips(corpus, hf_dir):
    texts = _documents()
    assert corpus.vocab_size == VOCAB
    n = corpus.manifest["n_docs"]
    assert n["train"] > 0 and n["val"] > 0 and n["train"] + n["val"] == len(texts)
    # validation documents decode back to their text exactly
    for doc_id in corpus.val_ids:
        i = int(doc_id.rsplit("/", 1)[1])
        assert doc_id == f"hf/{hf_dir}/{i}"
        toks = corpus.val_document(doc_id)
        assert toks[0] == D.EOS_ID
        assert corpus.decode(toks[1:]) == texts[i]
    # the packed training stream is the training documents, in order, each after an EOS
    val = {int(d.rsplit("/", 1)[1]) for d in corpus.val_ids}
    train_texts = [t for i, t in enumerate(texts) if i not in val]
    train = np.asarray(corpus.train)
    starts = np.flatnonzero(train == D.EOS_ID)
    assert len(starts) == len(train_texts)
    pieces = np.split(train, starts[1:])
    assert [corpus.decode(p[1:]) for p in pieces] == train_texts


# --- weight-exact export -------------------------------------------------------------------------

@pytest.mark.parametrize("positional,layer_norm,attn_only", ARCHS)
def test_exported_logits_match(corpus, positional, layer_norm, attn_only):
    model = _random_model(_cfg(positional=positional, layer_norm=layer_norm, attn_only=attn_only))
    tl_model = interop.export_to_transformer_lens(model, check=False)  # the test is the check
    assert isinstance(tl_model, tl.HookedTransformer)
    tokens = D.train_batch(corpus, 4, 64, seed=0, step=0)  # real text windows
    with torch.no_grad():
        ours, theirs = model(tokens), tl_model(tokens)
    assert ours.abs().max() > 1.0  # not a vacuous comparison
    diff = float((ours - theirs).abs().max())
    assert diff < 1e-4, (f"max |logit difference| {diff:.3g}: for shortformer + LayerNorm, TransformerLens "
                         "computes queries and keys from LN(resid) + W_pos (icl_core.interop docstring)")
    # the same weights under the same names
    torch.testing.assert_close(tl_model.blocks[1].attn.W_K, model.blocks[1].attn.W_K, rtol=0, atol=0)


@pytest.mark.parametrize("positional", ["rope", "shortformer"])
def test_exported_attention_biases_match(corpus, positional):
    model = _random_model(_cfg(positional=positional, attn_bias=True))
    tl_model = interop.export_to_transformer_lens(model, check=False)
    tokens = D.train_batch(corpus, 4, 64, seed=0, step=0)
    with torch.no_grad():
        ours, theirs = model(tokens), tl_model(tokens)
        diff = float((ours - theirs).abs().max())
        # the biases matter: the same weights without them give other logits
        a = model.blocks[0].attn
        a.b_qkv.zero_(); a.b_O.zero_()
        off = float((model(tokens) - theirs).abs().max())
    assert diff < 1e-4 and off > 1e-2, (diff, off)
    torch.testing.assert_close(tl_model.blocks[1].attn.b_K, model.blocks[1].attn.b_K, rtol=0, atol=0)


@pytest.mark.parametrize("positional,wrong", [("rope", dict(rotary_adjacent_pairs=False)),
                                              ("shortformer", dict(positional_embedding_type="standard"))])
def test_logit_check_catches_a_wrong_convention(corpus, positional, wrong):
    """The 1e-4 test has teeth: TransformerLens' other rotary pairing (GPT-NeoX halves) or learned
    positions in the residual instead of Shortformer's give clearly different logits."""
    model = _random_model(_cfg(positional=positional))
    cfg = dataclasses.replace(interop.tl_config(model.cfg), **wrong)
    bad = tl.HookedTransformer(cfg, move_to_device=False)
    bad.load_state_dict(interop.tl_state_dict(model, bad.state_dict()))
    tokens = D.train_batch(corpus, 4, 64, seed=0, step=0)
    with torch.no_grad():
        assert (model(tokens) - bad(tokens)).abs().max() > 1e-2


def test_smeared_keys_raise():
    model = Transformer(_cfg(smeared_keys=True))
    with pytest.raises(NotImplementedError, match="smeared_keys"):
        interop.export_to_transformer_lens(model)


def test_missing_extra_has_a_clear_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformer_lens", None)
    with pytest.raises(ImportError, match="requirements-extras.txt"):
        interop.export_to_transformer_lens(Transformer(_cfg()))


def test_export_a_trained_run_on_the_hf_corpus(hf_dir, tmp_path):
    """End to end: train a tiny run on the local HF dataset, export two of its snapshots."""
    from icl_core.runs import Run, get_or_train

    cfg = RunConfig(name="hf_tiny",
                    model=_cfg(n_layers=1, n_heads=2, init_std=0.02, positional="learned"),
                    data=_data_cfg(hf_dir, n_eval=4, n_prefix_seqs=2, prefix_seq_len=10, prefix_repeats=4),
                    train=TrainConfig(batch_size=2, total_tokens=2 * 64 * 30, n_snapshots=2, warmup_steps=0,
                               lr=0.01, precision="fp32", threads=1))
    run = get_or_train(cfg, root=tmp_path / "runs", progress=False)
    tokens = run.eval_data.tokens
    for step in (run.steps[0], None):
        tl_model = interop.export_to_transformer_lens(run if step is not None else str(run.path), step)
        with torch.no_grad():
            ours = run.load(step)(tokens)
            diff = (ours - tl_model(tokens)).abs().max()
        assert diff < 1e-4
    assert ours.abs().max() > 1.0  # trained: the last comparison is not vacuous
    # with the run's own tokenizer attached, text goes in as our evaluation windows do: BOS first
    tl_model = interop.export_to_transformer_lens(Run(run.path), tokenizer=True)
    text = _documents()[0][:80]
    assert tl_model.to_tokens(text)[0].tolist() == [D.EOS_ID] + run.corpus.encode(text)
    assert "".join(tl_model.to_str_tokens(text)[1:]) == text


# --- head scores agree with TransformerLens' head detector ---------------------------------------

@pytest.fixture(scope="module")
def pair():
    model = _random_model(_cfg(positional="learned", n_heads=4), seed=3)
    return model, interop.export_to_transformer_lens(model)


def test_prefix_matching_equals_tl_induction_detection(pair, corpus):
    """detect_head(..., "induction_head") = prefix-matching score x (T - 1 - seq_len) / T: the same
    stripe (key k with token[k-1] == token[q]), averaged over all T queries instead of repeats 2..R."""
    model, tl_model = pair
    seq_len, repeats = 10, 4
    rep = D.repeated_random_tokens(D.prefix_token_pool(corpus.counts), 6, seq_len, repeats, seed=0)
    ours = M.prefix_matching_scores(model, rep, seq_len)
    theirs = interop.tl_head_detection_scores(tl_model, rep, "induction_head")
    assert ours.shape == theirs.shape == (2, 4)
    assert ours.std() > 1e-3  # heads differ: a real comparison
    factor = interop.tl_induction_factor(seq_len, repeats)
    assert factor == pytest.approx(30 / 41)
    torch.testing.assert_close(theirs, ours * factor, rtol=0, atol=1e-5)
    assert tl_model.tokenizer is None  # the helper restored the model


def test_previous_token_equals_tl_previous_token_detection(pair, corpus):
    """detect_head(..., "previous_token_head") = previous-token score x (T - 1) / T on real text."""
    model, tl_model = pair
    tokens = D.train_batch(corpus, 6, 48, seed=1, step=0)
    ours = M.previous_token_scores(model, tokens)
    theirs = interop.tl_head_detection_scores(tl_model, tokens, "previous_token_head")
    assert ours.std() > 1e-3
    torch.testing.assert_close(theirs, ours * interop.tl_previous_token_factor(48), rtol=0, atol=1e-5)


def test_detection_needs_sequences_shorter_than_n_ctx(pair):
    _, tl_model = pair
    with pytest.raises(ValueError, match="n_ctx"):
        interop.tl_head_detection_scores(tl_model, torch.zeros(1, 64, dtype=torch.long), "induction_head")

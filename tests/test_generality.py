"""Known-answer tests of chapter 4's measurements (icl_core.generality)."""
import numpy as np
import pytest
import torch

from icl_core import generality as G
from icl_core import logit_attribution as LA
from icl_core import parallel_text as PX
from icl_core import pattern_task as PT
from icl_core import stats as S
from icl_core.config import ModelConfig
from icl_core.model import Transformer


class CharTok:
    """A stand-in tokenizer: one token per character (ids = code points), with offsets."""

    class Enc:
        def __init__(self, text):
            self.ids = [ord(c) % 64 + 1 for c in text]
            self.offsets = [(i, i + 1) for i in range(len(text))]

    def encode(self, text):
        return self.Enc(text)


class CharCorpus:
    tokenizer = CharTok()

    def encode(self, text):
        return self.tokenizer.encode(text).ids


def test_bootstrap_ci_brackets_mean_and_narrows():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, 20)
    big = rng.normal(1.0, 1.0, 2000)
    m, lo, hi = S.bootstrap_ci(small)
    assert lo < m < hi
    m2, lo2, hi2 = S.bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo
    assert lo2 < 1.0 < hi2


def test_verdict():
    """Known answers of icl_core.verdicts.measurement on both sides of the share margin."""
    from icl_core import verdicts as V
    m = V.SHARE_MARGIN
    assert V.measurement(0.25 + m + 0.01, 0.25 + m / 2, 0.5, 0.25, m) == "above chance"
    assert V.measurement(0.25 + m - 0.01, 0.25 + 0.001, 0.5, 0.25, m) == V.NULL  # interval clears, effect too small
    assert V.measurement(0.3, 0.2, 0.5, 0.25, m) == V.NULL  # interval contains chance
    assert V.measurement(0.15, 0.1, 0.2, 0.25, m) == "below chance"
    assert V.measurement(0.15, 0.1, 0.2, 0.25, m, higher_is_better=False) == "above chance"
    assert V.measurement(0.3, float("nan"), 0.2, 0.25, m) == "undetermined"


def test_align_words_rules():
    a = "and god said let there be light".split()
    assert PX.align_words(a, a) == [(i, i) for i in range(len(a))]
    b = "then god said let light be".split()
    pairs = PX.align_words(a, b)
    assert (1, 1) in pairs and (2, 2) in pairs and (3, 3) in pairs
    assert all(a[i] == b[j] for i, j in pairs)
    assert [i for i, _ in pairs] == sorted(i for i, _ in pairs)  # monotone
    assert PX.align_words(a, b, "position") == [(i, i) for i in range(len(b))]
    with pytest.raises(ValueError):
        PX.align_words(a, b, "bogus")


def test_case_variants_and_words():
    t = "And God said, let there be light."
    assert PX.title_case(t) == "And God Said, Let There Be Light."
    assert [w for *_, w in PX.words(PX.upper_case(t))] == [w for *_, w in PX.words(t)]


def test_paired_example_targets_are_the_aligned_words():
    corpus = CharCorpus()
    a = "ab cd ef"
    ex = G.paired_example(corpus, a, a, list(range(1, 40)), n_ctx=64, rule="position")
    # tokens: BOS + 'ab cd ef' (8) + ' ab cd ef' (9); B starts at 9
    assert ex.b_start == 9
    toks = ex.tokens.tolist()
    for q, t in zip(ex.queries, ex.targets):
        # the query is the token before a B word's first letter; the target is that word in A
        assert toks[q + 1] == toks[t]
        assert t < ex.b_start <= q
    assert len(ex.queries) == 2  # words 'cd' and 'ef' of B (the first word follows A directly)
    assert ex.control[ex.b_start:].tolist() == toks[ex.b_start:]
    assert ex.control[1:ex.b_start].tolist() == list(range(1, 9))


def test_direct_logit_attribution_sums_to_logits_without_layernorm():
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=12, d_vocab=20, layer_norm=False,
                      positional="shortformer", init_std=0.3)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    x = torch.randint(0, 20, (3, 12))
    dla = LA.direct_logit_attribution(m, x)  # (B, L, H, T-1)
    logits = m(x)
    centred = logits - logits.mean(-1, keepdim=True)
    direct = m.W_E[x] @ m.W_U
    direct = direct - direct.mean(-1, keepdim=True)
    target = (centred - direct)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # heads' total share
    assert torch.allclose(dla.sum((1, 2)), target, atol=1e-4)


def _fake_task():
    # items: spans of 4 tokens; labels as given; ':' at span start + 2, label at + 3
    labels = np.array([0, 1, 0, 2])
    span = np.array([[1 + 4 * k, 5 + 4 * k] for k in range(4)])
    colon = span[:, 0] + 2
    lpos = span[:, 0] + 3
    return {"colon": colon, "labels": labels, "item_span": span, "label_pos": lpos}


def test_same_label_shares_uniform_is_chance_and_focused_is_one():
    row = _fake_task()
    T = 17
    uniform = np.tril(np.ones((T, T)))
    uniform /= uniform.sum(1, keepdims=True)
    s, c, ls, lc = PT.same_label_shares(uniform, row)
    assert np.allclose(s, c) and np.allclose(ls, lc)
    # item 2 (label 0) looks only at item 0's label token: share 1 on both measures
    focused = uniform.copy()
    q = row["colon"][2]
    focused[q] = 0
    focused[q, row["label_pos"][0]] = 1
    s, c, ls, lc = PT.same_label_shares(focused, row)
    assert s[1] == 1 and ls[1] == 1
    assert c[1] == pytest.approx(0.5) and lc[1] == pytest.approx(0.5)


def test_behaviour_status_and_sentences():
    import pandas as pd

    from icl_core import verdicts as V

    t = pd.DataFrame([
        {"model": "m", "behaviour": "literal copying", "verdict": "above chance"},
        {"model": "m", "behaviour": "literal copying", "verdict": "above chance"},
        {"model": "m", "behaviour": "fuzzy copying", "verdict": "above chance"},
        {"model": "m", "behaviour": "fuzzy copying", "verdict": V.NULL},
        {"model": "m", "behaviour": "abstract pattern matching", "verdict": V.NULL},
    ]).assign(induction_head=True)
    st = S.behaviour_status(t).set_index("behaviour")["status"]
    assert st["literal copying"] == S.SHOWN
    assert st["fuzzy copying"] == S.IN_PART
    assert st["abstract pattern matching"] == V.NULL
    text = S.behaviour_sentences(S.behaviour_status(t))
    assert "**not distinguishable from chance** (0 of 1" in text
    assert "**partly** (1 of 1 models with an induction head; reproduced needs ≥ 3)" in text

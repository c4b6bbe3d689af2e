import random
import string

import pytest
import torch

from icl_core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from icl_core.model import Transformer


def make_text_folder(root, n_docs=40, words_per_doc=400, seed=0):
    """A small synthetic corpus of 'documents' with repeated phrases (enough for a tokenizer)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(300)]
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        words = [rng.choice(vocab) for _ in range(words_per_doc)]
        (root / f"doc{d:03d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session", autouse=True)
def shared_corpus_cache(tmp_path_factory):
    """One corpus/tokenizer cache for the whole session (tests of the cache itself pass their own)."""
    import os
    d = tmp_path_factory.mktemp("corpus_cache")
    old = os.environ.get("ICL_CACHE_DIR")
    os.environ["ICL_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("ICL_CACHE_DIR", None)
    else:
        os.environ["ICL_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def resume_at_every_save_point():
    """Tests count on resume states at every snapshot and RESUME_EVERY steps: no time floor, for
    module-scoped fixtures too (test_train checks the floor itself)."""
    import icl_core.train as T
    old, T.RESUME_MIN_SECONDS = T.RESUME_MIN_SECONDS, 0.0
    yield
    T.RESUME_MIN_SECONDS = old


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory):
    return make_text_folder(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_run_cfg(text_folder):
    return RunConfig(
        name="tiny",
        model=ModelConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=128, d_vocab=300),
        data=DataConfig(sources=(f"folder:{text_folder}",), vocab_size=300, val_fraction=0.2,
                        n_eval=8, n_prefix_seqs=4),
        train=TrainConfig(batch_size=4, total_tokens=4 * 128 * 20, n_snapshots=6, warmup_steps=5, threads=1),
    )


def tiny_model(**kw) -> Transformer:
    cfg = dict(n_layers=2, d_model=32, n_heads=2, n_ctx=64, d_vocab=50)
    cfg.update(kw)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Transformer(ModelConfig(**cfg)).eval()

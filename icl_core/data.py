"""Corpora, tokenizer, cached token arrays, the fixed evaluation set and repeated random tokens.

The embedded default corpus needs no network: English prose from the public-domain Bible
translations shipped in ``pythonbible-*`` wheels (parallel versions of the same verses), and Python
source of pure-Python packages pinned in requirements.txt (sympy, networkx). The interpreter's own
stdlib is not used: it differs between Python versions, and the book's figures must not.

Documents stay documents: the train/validation split is by document (parallel versions of one
Bible chapter always fall on the same side), and evaluation windows never cross a document.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .io import atomic_write_bytes, atomic_write_json, file_sha256, read_json_checked, CorruptFileError, FileLock

EOS = "<|endoftext|>"
EOS_ID = 0
BIBLE_VERSIONS = ("kjv", "asv", "bbe", "web", "akjv", "ylt", "dr", "wbs", "rwebster", "nheb")


@dataclass(frozen=True)
class Document:
    id: str  # e.g. bible/kjv/01001 or code/sympy/core/add.py
    split_key: str  # documents with the same key fall on the same side of the split
    text: str


# --- sources -------------------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ConfigError(f"corpus package {package!r} is not installed (pip install -r requirements.txt)")
    locs = list(spec.submodule_search_locations or [])
    if not locs:
        raise ConfigError(f"corpus package {package!r} is not a package directory")
    return Path(locs[0])


_VERSE_NUM = re.compile(r"^\s*\d+\.\s*")


def bible_verses(version: str) -> dict[int, str]:
    """{verse_id: text} for one translation (verse_id = book*10**6 + chapter*10**3 + verse).

    Parsed with ``ast`` from the wheel's generated ``plain_text_bible.py`` (no import, no pickle).
    """
    pkg = _package_dir(f"pythonbible_{version}")
    src = (pkg / "plain_text_bible.py").read_text(encoding="utf-8")
    call = ast.parse(src).body[-1].value
    text = call.args[1].value
    starts, ends = call.args[2], call.args[3]
    start = {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(starts.keys, starts.values)}
    end = {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(ends.keys, ends.values)}
    out = {}
    for vid, a in start.items():
        t = _VERSE_NUM.sub("", text[a:end[vid]]).replace("[", "").replace("]", "").strip()
        out[vid] = re.sub(r"\s+", " ", t)
    return out


@functools.lru_cache(maxsize=16)
def bible_verses_cached(version: str) -> dict[int, str]:
    """:func:`bible_verses`, parsed once per process (do not modify the returned dict)."""
    return bible_verses(version)


def bible_documents(versions, max_chars: int = 0) -> list[Document]:
    docs = []
    for version in versions:
        verses = bible_verses(version)
        chapters: dict[int, list[str]] = {}
        for vid in sorted(verses):
            chapters.setdefault(vid // 1000, []).append(verses[vid])
        docs += up_to_chars((Document(f"bible/{version}/{ch:05d}", f"bible/{ch:05d}", " ".join(vs))
                             for ch, vs in chapters.items()), max_chars)
    return docs


def up_to_chars(docs, max_chars: int = 0) -> list[Document]:
    """The documents, in order, until their texts hold ``max_chars`` characters (0: all of them);
    the document that reaches the limit is the last one kept. ``docs`` is read lazily."""
    out, n = [], 0
    for doc in docs:
        out.append(doc)
        n += len(doc.text)
        if max_chars and n >= max_chars:
            break
    return out


def _package_files(root: Path):
    """Documents of the non-blank ``.py`` files under ``root``, in path order."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"corpus file {str(path)!r} is not UTF-8: {e}") from None
        if text.strip():
            yield Document(f"code/{rel}", f"code/{rel}", text)


def code_documents(packages, max_chars: int = 0) -> list[Document]:
    docs = []
    for package in packages:
        docs += up_to_chars(_package_files(_package_dir(package)), max_chars)
    return docs


def folder_documents(folder: str, max_chars: int = 0) -> list[Document]:
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"data.sources folder {folder!r} does not exist or is not a directory")

    def files():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"data.sources folder {folder!r}: corpus file {str(path)!r} is not valid "
                                  f"UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
            if text.strip():
                rel = path.relative_to(root).as_posix()
                yield Document(f"folder/{rel}", f"folder/{rel}", text)

    docs = up_to_chars(files(), max_chars)
    if not docs:
        raise ConfigError(f"data.sources folder {folder!r} has no non-empty text files")
    return docs


def hf_documents(spec: str, max_chars: int = 0, loader=None) -> list[Document]:
    """``hf:name[:split[:column]]`` via the optional ``datasets`` package (needs network).

    ``loader`` (for tests) replaces ``datasets.load_dataset``; it may also return a local Dataset.
    """
    parts = spec.split(":")
    name = parts[1]
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    column = parts[3] if len(parts) > 3 else "text"
    if loader is None:
        try:
            import datasets  # optional extra: requirements-extras.txt
        except ImportError:
            raise ConfigError(f"data source {spec!r} needs the optional 'datasets' package "
                              "(pip install -r requirements-extras.txt)") from None
        if os.path.isdir(name):
            def loader(n, split):
                ds = datasets.load_from_disk(n)
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            loader = lambda n, split: datasets.load_dataset(n, split=split)
    ds = loader(name, split)
    if column not in ds.column_names:
        raise ConfigError(f"dataset {name!r} has no column {column!r} (has {ds.column_names})")
    return up_to_chars((Document(f"hf/{name}/{i}", f"hf/{name}/{i}", text) for i, text in enumerate(ds[column])
                        if text and text.strip()), max_chars)


def load_documents(cfg: DataConfig) -> list[Document]:
    docs: list[Document] = []
    for s in cfg.sources:
        if s == "bible":
            for v in cfg.bible_versions:
                if v not in BIBLE_VERSIONS:
                    raise ConfigError(f"data.bible_versions has unknown version {v!r} (known: {BIBLE_VERSIONS})")
            docs += bible_documents(cfg.bible_versions, cfg.max_chars_per_source)
        elif s == "code":
            docs += code_documents(cfg.code_packages, cfg.max_chars_per_source)
        elif s.startswith("folder:"):
            docs += folder_documents(s[len("folder:"):], cfg.max_chars_per_source)
        elif s.startswith("hf:"):
            docs += hf_documents(s, cfg.max_chars_per_source)
    if not docs:
        raise ConfigError(f"data.sources={list(cfg.sources)} produced no documents")
    return docs


def is_validation(split_key: str, cfg: DataConfig) -> bool:
    h = hashlib.sha256(f"{cfg.split_seed}:{split_key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < cfg.val_fraction


def source_versions(cfg: DataConfig) -> dict[str, str]:
    """Versions of the packages the corpus comes from (part of the cache key)."""
    names = []
    if "bible" in cfg.sources:
        names += [f"pythonbible-{v}" for v in cfg.bible_versions]
    if "code" in cfg.sources:
        names += list(cfg.code_packages)
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "missing"
    return out


def corpus_key(cfg: DataConfig, versions: dict | None = None) -> str:
    """The corpus cache key: the data fields that shape the corpus and the installed versions of
    its source packages (or ``versions``, e.g. those a prebuilt corpus's manifest records)."""
    keep = {k: v for k, v in asdict(cfg).items()
            if k in ("sources", "bible_versions", "code_packages", "max_chars_per_source", "vocab_size",
                     "val_fraction", "split_seed")}
    keep["versions"] = source_versions(cfg) if versions is None else versions
    keep["format"] = 1
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


# --- tokenizer and token cache -----------------------------------------------------------------

def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (HF ``tokenizers``), ``<|endoftext|>`` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class Corpus:
    """Tokenizer + token arrays of one DataConfig, cached on disk under ``cache_dir/corpus-<key>``.

    Files: tokenizer.json, train.npy / val.npy (uint16 tokens, documents separated by EOS),
    val_offsets.npy (document boundaries), documents.json; manifest.json holds their sha256 and
    is checked on every load (a corrupt file is rebuilt, never used).
    """

    def __init__(self, cfg: DataConfig, cache_dir: str | Path):
        self.cfg = cfg
        self.key = corpus_key(cfg)
        self.dir = Path(cache_dir) / f"corpus-{self.key}"
        self._load_or_build()

    FILES = ("tokenizer.json", "train.npy", "val.npy", "val_offsets.npy", "val_ids.json", "counts.npy")

    @classmethod
    def from_folder(cls, folder: str | Path, cfg: DataConfig) -> "Corpus":
        """A prebuilt ``corpus-<key>`` folder, used as it is and never rebuilt: for a machine that
        lacks the corpus's source packages (a lent GPU, where only the folder can travel). Its
        manifest must verify, and its key must be ``cfg``'s key under the source versions the
        manifest records (the same text, whichever versions are installed here)."""
        self = cls.__new__(cls)
        self.cfg, self.dir = cfg, Path(folder)
        if not self._valid():
            raise CorruptFileError(f"{self.dir} is not a complete corpus folder (its manifest or a file "
                                   "is missing or fails its checksum)")
        versions = read_json_checked(self.dir / "manifest.json").get("versions", {})
        self.key = corpus_key(cfg, versions)
        if self.dir.name != f"corpus-{self.key}":
            raise ConfigError(f"{self.dir} holds another corpus than this data config's "
                              f"(corpus-{self.key} with the source versions it records)")
        self._load()
        return self

    def _valid(self) -> bool:
        man = self.dir / "manifest.json"
        if not man.exists():
            return False
        try:
            m = read_json_checked(man)
        except CorruptFileError:
            return False
        for f in self.FILES:
            p = self.dir / f
            if not p.exists() or m.get("sha256", {}).get(f) != file_sha256(p):
                return False
        return True

    def _load_or_build(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.dir / ".lock"):
            if not self._valid():
                if (self.dir / "manifest.json").exists():
                    print(f"corpus cache {self.dir} failed its checksum: rebuilding")
                for tmp in self.dir.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)  # partial writes of a killed build (we hold the lock)
                self._build()
        self._load()

    def _load(self):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.train = np.load(self.dir / "train.npy", mmap_mode="r")
        self.val = np.load(self.dir / "val.npy", mmap_mode="r")
        self.val_offsets = np.load(self.dir / "val_offsets.npy")
        self.val_ids = json.loads((self.dir / "val_ids.json").read_text())
        self.counts = np.load(self.dir / "counts.npy")
        self.manifest = read_json_checked(self.dir / "manifest.json")

    def _build(self):
        import io

        docs = load_documents(self.cfg)
        train_docs = [d for d in docs if not is_validation(d.split_key, self.cfg)]
        val_docs = [d for d in docs if is_validation(d.split_key, self.cfg)]
        if not train_docs or not val_docs:
            raise ConfigError(f"data split left {len(train_docs)} train and {len(val_docs)} validation "
                              f"documents; need both (corpus has {len(docs)} documents; "
                              f"data.val_fraction={self.cfg.val_fraction})")
        tok = train_tokenizer((d.text for d in train_docs), self.cfg.vocab_size)
        if tok.get_vocab_size() > 65535:
            raise ConfigError("vocab too large for uint16 token arrays")

        def encode(ds):
            ids = tok.encode_batch([d.text for d in ds])
            arrs, offsets = [], [0]
            for e in ids:
                a = np.asarray([EOS_ID] + e.ids, dtype=np.uint16)
                arrs.append(a)
                offsets.append(offsets[-1] + len(a))
            return np.concatenate(arrs), np.asarray(offsets, dtype=np.int64)

        train, _ = encode(train_docs)
        val, val_off = encode(val_docs)
        counts = np.bincount(train, minlength=tok.get_vocab_size()).astype(np.int64)
        blobs = {"tokenizer.json": tok.to_str().encode()}
        for name, arr in (("train.npy", train), ("val.npy", val), ("val_offsets.npy", val_off),
                          ("counts.npy", counts)):
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            blobs[name] = buf.getvalue()
        blobs["val_ids.json"] = json.dumps([d.id for d in val_docs]).encode()
        for name, b in blobs.items():
            atomic_write_bytes(self.dir / name, b)
        atomic_write_json(self.dir / "manifest.json", {
            "key": self.key, "config": asdict(self.cfg), "versions": source_versions(self.cfg),
            "n_docs": {"train": len(train_docs), "val": len(val_docs)},
            "n_tokens": {"train": int(len(train)), "val": int(len(val))},
            "n_chars": {"train": sum(len(d.text) for d in train_docs), "val": sum(len(d.text) for d in val_docs)},
            "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()},
        })

    # --- helpers --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def token_str(self, i: int) -> str:
        return self.decode([i])

    def val_document(self, doc_id: str) -> np.ndarray:
        i = self.val_ids.index(doc_id)
        return np.asarray(self.val[self.val_offsets[i]:self.val_offsets[i + 1]])


def train_batch(corpus: Corpus, batch_size: int, n_ctx: int, seed: int, step: int,
                repeat_fraction: float = 0.0, span_max: int | None = None) -> torch.Tensor:
    """Training batch for ``step``: a pure function of (seed, step), so a resumed run sees the same data.

    Random windows of the packed training stream. With ``repeat_fraction`` > 0 (a labelled
    deviation from the paper: data where in-context copying pays off sooner) that fraction of rows
    gets one span of 8-48 (or 8-``span_max``) of its own tokens copied to a random later place, so the
    distance between the copies varies and only a content-based (induction) mechanism can exploit it.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = len(corpus.train) - n_ctx
    starts = torch.randint(0, n, (batch_size,), generator=g).numpy()
    rows = np.stack([corpus.train[s:s + n_ctx] for s in starts]).astype(np.int64)
    k = int(round(repeat_fraction * batch_size))
    hi = min(48, n_ctx // 3) if span_max is None else min(span_max, (n_ctx - 2) // 2)
    for r in range(k):
        ln = int(torch.randint(8, hi + 1, (1,), generator=g))
        a = int(torch.randint(1, n_ctx - 2 * ln, (1,), generator=g))
        b = int(torch.randint(a + ln, n_ctx - ln + 1, (1,), generator=g))
        rows[r, b:b + ln] = rows[r, a:a + ln]
    return torch.from_numpy(rows)


def eval_window_sources(corpus: Corpus, n: int, n_ctx: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation document index, start offset in ``corpus.val``) of each of :func:`eval_windows`'
    ``n`` windows, drawn per document and balanced between sources (issue 22).

    Each validation document (its leading EOS included) is cut into consecutive non-overlapping
    windows of ``n_ctx`` tokens from its start, so a document's first window begins with its EOS
    exactly as in training and no BOS is put before mid-document text. Documents are grouped by
    kind (the first part of their id: ``bible``, ``code``, ...); each group gets an equal share of
    the ``n`` windows (a group with fewer windows gives its shortfall to the others). Inside a group
    the documents are shuffled and dealt round-robin: every document's first window, then every
    second window, ... -- so each document counts, not each token. The final order is shuffled, so
    any prefix of the set keeps the mix."""
    off = corpus.val_offsets
    n_chunks = (np.diff(off) // n_ctx).astype(np.int64)
    groups: dict[str, list[int]] = {}
    for i, doc_id in enumerate(corpus.val_ids):
        if n_chunks[i] > 0:
            groups.setdefault(doc_id.split("/")[0], []).append(i)
    available = {k: int(n_chunks[v].sum()) for k, v in groups.items()}
    if sum(available.values()) < n:
        raise ConfigError(f"the validation documents hold only {sum(available.values())} windows of {n_ctx} tokens; "
                          f"lower data.n_eval={n} or model.n_ctx={n_ctx}, or use a larger corpus")
    g = np.random.default_rng(seed)
    quota, left, open_ = {k: 0 for k in groups}, n, sorted(groups)
    while left:  # equal shares; a group that runs out passes the rest on
        share = [left // len(open_) + (j < left % len(open_)) for j in range(len(open_))]
        for k, q in zip(list(open_), share):
            take = min(q, available[k] - quota[k])
            quota[k] += take
            left -= take
            if quota[k] == available[k]:
                open_.remove(k)
    picked = []
    for k in sorted(groups):
        docs = np.asarray(groups[k])[g.permutation(len(groups[k]))]
        deal = [(int(d), int(off[d]) + j * n_ctx) for j in range(int(n_chunks[docs].max()))
                for d in docs if j < n_chunks[d]]
        picked += deal[:quota[k]]
    order = g.permutation(len(picked))
    docs = np.asarray([picked[i][0] for i in order], dtype=np.int64)
    starts = np.asarray([picked[i][1] for i in order], dtype=np.int64)
    return docs, starts


def eval_windows(corpus: Corpus, n: int, n_ctx: int, seed: int) -> torch.Tensor:
    """The fixed evaluation set: ``n`` windows of ``n_ctx`` consecutive tokens of one validation
    document each (:func:`eval_window_sources`: a document's first window starts with its EOS, the
    others with mid-document text and no BOS, as training sees them). Same for every model and snapshot."""
    _, starts = eval_window_sources(corpus, n, n_ctx, seed)
    out = np.stack([np.asarray(corpus.val[s:s + n_ctx]) for s in starts]).astype(np.int64)
    return torch.from_numpy(out)


def prefix_token_pool(counts: np.ndarray, drop_top: float = 0.02, drop_bottom: float = 0.2) -> np.ndarray:
    """Token ids for random sequences, excluding the most and least frequent (paper, head scores).

    [book choice] drop the top 2% and the bottom 20% of tokens by training frequency (and EOS).
    """
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    n = len(order)
    pool = order[int(drop_top * n): max(int(drop_top * n) + 1, int((1 - drop_bottom) * n))]
    pool = pool[pool != EOS_ID]
    return np.sort(pool)


def repeated_random_tokens(pool: np.ndarray, n_seqs: int, seq_len: int, repeats: int, seed: int) -> torch.Tensor:
    """(n_seqs, 1 + seq_len*repeats): BOS then ``seq_len`` distinct random tokens repeated ``repeats`` times."""
    if len(pool) < seq_len:
        raise ConfigError(f"token pool has {len(pool)} tokens, fewer than prefix_seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_seqs):
        idx = torch.randperm(len(pool), generator=g)[:seq_len]
        seq = torch.as_tensor(pool)[idx].long()
        rows.append(torch.cat([torch.tensor([EOS_ID]), seq.repeat(repeats)]))
    return torch.stack(rows)


def verse_similarities(version_a: str, version_b: str, n: int = 300, seed: int = 0, sampler: str = "numpy",
                       autojunk: bool = False) -> tuple[list[int], list[float]]:
    """(verse ids, similarities): ``n`` random verse ids shared by two translations and, for each,
    the word-level similarity of the two texts (``difflib`` ratio of lower-cased words, A against
    B): close to 1 for near-identical versions, near 0 when the verse ids of the two versions do
    not refer to the same text (a broken verse index).

    ``sampler`` draws the ids with ``numpy`` (``np.random.default_rng(seed).choice``, used by
    Argument 4) or ``python`` (``random.Random(seed).sample``, used by the methods appendix), and
    ``autojunk`` is difflib's heuristic (off for Argument 4, on for the appendix): the two callers'
    historical settings, kept so that their published numbers do not change."""
    import difflib
    import random

    va = bible_verses_cached(version_a)
    vb = va if version_b == version_a else bible_verses_cached(version_b)
    ids = sorted(set(va) & set(vb))
    if sampler == "numpy":
        pick = [ids[i] for i in np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)]
    elif sampler == "python":
        pick = random.Random(seed).sample(ids, min(n, len(ids)))
    else:
        raise ValueError(f"sampler={sampler!r} is not numpy or python")
    return pick, [difflib.SequenceMatcher(None, va[i].lower().split(), vb[i].lower().split(),
                                          autojunk=autojunk).ratio() for i in pick]


def version_alignment(versions, reference: str = "kjv", n: int = 400, seed: int = 0):
    """How well each translation's verse index lines up with the reference translation's: the
    median :func:`verse_similarities` of ``n`` random shared verses, and the share of those verses
    starting mid-word (lower-case first letter). A misaligned index (a wheel whose verse offsets
    drift) shows as a similarity near that of unrelated verses."""
    import pandas as pd

    rows = []
    for v in versions:
        vv = bible_verses_cached(v)
        sample, sims = verse_similarities(v, reference, n, seed, sampler="python", autojunk=True)
        rows.append({"version": v, "verses": len(vv), "median similarity to " + reference: float(np.median(sims)),
                     "starts mid-word": float(np.mean([vv[i][:1].islower() for i in sample]))})
    return pd.DataFrame(rows).set_index("version")


class EvalData:
    """What the cheap in-training metrics use: fixed eval windows and repeated random tokens, for a
    run config (``cfg``: a :class:`icl_core.config.RunConfig`) and its corpus."""

    def __init__(self, cfg, corpus: Corpus, n_eval: int | None = None):
        d = cfg.data
        self.tokens = eval_windows(corpus, d.n_eval if n_eval is None else n_eval, cfg.model.n_ctx, d.eval_seed)
        pool = prefix_token_pool(corpus.counts)
        self.rep = repeated_random_tokens(pool, d.n_prefix_seqs, d.prefix_seq_len, d.prefix_repeats, d.eval_seed)

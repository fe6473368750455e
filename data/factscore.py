"""FactScore on `bios`: parse the attributes a generated biography states and check them against kb.json.

A stated fact is (attribute, value, char span). Parsing, per sentence of the generated text:
1. the bios templates (data/bios.py TEMPLATES) as regexes, subject = anything; when several match, the
   shortest captured value wins ("born in the city of {v}" beats "born in {v}");
2. otherwise, a search of the attribute's value pool (every value any person has): a pool value found
   in the sentence (whole words) is a stated fact. Cities are one domain shared by birth_city and
   employer_city, so a city counts only when the sentence has a cue ("born"/"native" -> birth_city, "work"/"office"/
   "moved"/"commut" -> employer_city).
A stated fact is correct iff its value equals the person's value. One fact per distinct (attribute,
value) per text. FactScore = correct / stated. A wrong fact is "leaked" when its value span lies
outside every delegated span (the SLM stated it itself instead of calling).
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass

from model.errors import DataError

from data import bios as bios_mod

_CITY_CUES = {"birth_city": re.compile(r"\b(born|native|birth)\b", re.I),
              "employer_city": re.compile(r"\b(work\w*|office|moved|commut\w*|job)\b", re.I)}


@dataclass
class Fact:
    attribute: str
    value: str
    start: int
    end: int
    correct: bool
    delegated: bool = False


def load_kb(path: str) -> dict:
    """The bios knowledge base (kb.json); DataError naming the file when it is missing or damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            kb = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no bios knowledge base (prepare the `bios` corpus with `memlm prepare`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: unreadable bios knowledge base ({e}); prepare the data again") from e
    if not isinstance(kb, dict) or not isinstance(kb.get("people"), list):
        raise DataError(f"{path}: not a bios kb.json (no 'people' list)")
    return kb


def _template_regex(template: str) -> re.Pattern:
    pat = re.escape(template).replace(re.escape("{n}"), r"(?P<n>.+?)").replace(re.escape("{v}"), r"(?P<v>.+?)")
    return re.compile(pat + "$")  # the final "." is required: a cut-off sentence is left to the pools


class FactParser:
    def __init__(self, kb: dict):
        self.attributes = kb.get("attributes", bios_mod.ATTRIBUTES)
        self.people = {p["name"]: p for p in kb["people"]}
        self.pools = {a: sorted({str(p[a]) for p in kb["people"]}, key=len, reverse=True) for a in self.attributes}
        self.templates = [(a, _template_regex(t)) for a in self.attributes for t in bios_mod.TEMPLATES.get(a, [])]
        # attributes whose pools overlap (birth_city / employer_city) share one value domain (the union),
        # and a value of that domain is attributed only by a cue word in its sentence
        self.needs_cue = set()
        for a in self.attributes:
            group = [b for b in self.attributes if set(self.pools[a]) & set(self.pools[b])]
            if len(group) > 1:
                self.needs_cue.add(a)
                self.pools[a] = sorted({v for b in group for v in self.pools[b]}, key=len, reverse=True)
        self.pool_re = {a: [(v, re.compile(r"(?<!\w)" + re.escape(v) + r"(?!\w)")) for v in vals]
                        for a, vals in self.pools.items()}

    def facts(self, text: str, person: dict, start: int = 0, spans=()) -> list[Fact]:
        """Facts whose value lies in text[start:] (the prompt's sentence is parsed whole, so its subject
        counts for the templates), with char offsets into `text`; `spans` = delegated spans."""
        out, seen = [], set()
        for m in re.finditer(r"[^.!?]*(?:[.!?]|$)", text):
            sent = m.group(0)
            if not sent.strip() or m.end() <= start:
                continue
            off = m.start()
            lead = len(sent) - len(sent.lstrip())
            tf = self._from_templates(sent.strip())  # offsets into the stripped sentence
            found = [(a, v, s + lead, e + lead) for a, v, s, e in tf] if tf else self._from_pools(sent)
            for a, v, s, e in found:
                if (a, v) in seen or s + off < start:
                    continue
                seen.add((a, v))
                s, e = s + off, e + off
                deleg = any(ds < e and s < de for ds, de in spans)
                out.append(Fact(a, v, s, e, v == str(person.get(a)), deleg))
        return out

    def _from_templates(self, sent: str):
        best = None
        for a, rx in self.templates:
            m = rx.match(sent)
            if m and m.group("v").strip():
                v = m.group("v")
                if best is None or len(v) < len(best[1]):
                    best = (a, v, m.start("v"), m.end("v"))
        return [best] if best else []

    def _from_pools(self, sent: str):
        found, taken = [], []
        for a, rxs in self.pool_re.items():
            for v, rx in rxs:
                for m in rx.finditer(sent):
                    if any(s < m.end() and m.start() < e for s, e in taken):
                        continue  # part of a longer value already found
                    if a in self.needs_cue and not (a in _CITY_CUES and _CITY_CUES[a].search(sent)):
                        continue
                    found.append((a, v, m.start(), m.end()))
                    taken.append((m.start(), m.end()))
        return found


def person_buckets(kb: dict, probes: list[dict] | None) -> dict[int, int]:
    """Frequency bucket per person id: the bucket of the mean training count of the person's probe answers
    (probes.jsonl); without probes, of the person's document count."""
    edges = tuple(kb.get("bucket_edges", bios_mod.BUCKET_EDGES))
    bucket = lambda c: sum(c >= e for e in edges)  # noqa: E731
    if probes:
        counts: dict[int, list[int]] = {}
        for p in probes:
            counts.setdefault(p["person"], []).append(p["count"])
        return {pid: bucket(sum(c) / len(c)) for pid, c in counts.items()}
    return {p["id"]: bucket(p.get("n_docs", 1)) for p in kb["people"]}


def sample_people(kb: dict, buckets: dict[int, int], per_bucket: int, seed: int = 0) -> list[tuple[dict, int]]:
    """Up to per_bucket people from each bucket (seeded), as (person, bucket)."""
    rng = random.Random(f"factscore-{seed}")
    by_id = {p["id"]: p for p in kb["people"]}
    out = []
    for b in sorted(set(buckets.values())):
        ids = sorted(pid for pid, bb in buckets.items() if bb == b and pid in by_id)
        for pid in sorted(rng.sample(ids, min(per_bucket, len(ids)))):
            out.append((by_id[pid], b))
    return out


def summarize(rows: list[dict]) -> dict:
    """rows: one per bio with 'facts' (list of Fact dicts), 'calls', 'slm_tokens', 'bucket'."""
    def agg(rs):
        facts = [f for r in rs for f in r["facts"]]
        n, ok = len(facts), sum(f["correct"] for f in facts)
        leaked = sum((not f["correct"]) and not f["delegated"] for f in facts)
        deleg = [f for f in facts if f["delegated"]]
        calls, toks = sum(r["calls"] for r in rs), sum(r["slm_tokens"] for r in rs)
        return {"bios": len(rs), "facts": n, "correct": ok,
                "factscore": ok / n if n else None,
                "facts_per_bio": n / max(len(rs), 1),
                "call_rate": r0 if (r0 := _forced_rate(rs)) is not None else calls / max(calls + toks, 1),
                "calls_per_bio": calls / max(len(rs), 1),
                "leaked": leaked, "leakage": leaked / n if n else None,
                "leaked_per_bio": leaked / max(len(rs), 1),
                "delegated_facts": len(deleg),
                "delegated_precision": (sum(f["correct"] for f in deleg) / len(deleg)) if deleg else None}
    out = agg(rows)
    out["by_bucket"] = {str(b): agg([r for r in rows if r["bucket"] == b]) for b in sorted({r["bucket"] for r in rows})}
    return out


def _forced_rate(rows):
    rates = {r.get("forced_call_rate") for r in rows}
    return rates.pop() if len(rates) == 1 and None not in rates else None


def fact_dicts(facts: list[Fact]) -> list[dict]:
    return [asdict(f) for f in facts]


def bios_paths(data_dir: str) -> tuple[str, str]:
    d = os.path.join(data_dir, "bios")
    return os.path.join(d, "kb.json"), os.path.join(d, "probes.jsonl")

"""The cascade on real text (wiki-leads): exact facts of held-out leads, fluency, what each rule delegates.

- `build_facts(data_dir, split)`: the exact facts (years, dates, countries, places, nationalities,
  occupations; data/wiki_facts.py, spaCy) of the leads of a split of a prepared wiki-leads data dir.
- `clozes(facts, ...)`: cloze prompts = the lead up to a fact (so the subject is in the prompt); a
  cascade's completion is *exact* when it starts with the answer as a whole word.
- `fluency(judge, texts, starts, spans)`: negative log-likelihood per token, under a judge LM, of the
  completion text the SLM wrote itself (delegated spans left out).
- `call_sites(...)`: held-out positions a rule's selection delegates, factual or not, with the true next
  word, the SLM's own word and the large model's word there (does a call buy anything at that position?).
"""
from __future__ import annotations

import json
import os
import random
from typing import Sequence

import numpy as np
import torch

from train.lacy.large import word_end


def split_leads(data_dir: str, split: str = "val") -> dict[str, str]:
    """{title: lead text} of the documents of `split` in a data dir prepared from wiki-leads."""
    from data.corpora import load_corpus
    from data.selection import shards_of
    from data.shards import open_data

    ids = {d["doc_id"] for sh in shards_of(open_data(data_dir), split) for d in sh.docs}
    return {doc.id: doc.text for doc in load_corpus("wiki-leads") if doc.id in ids}


def facts_path(data_dir: str, split: str = "val") -> str:
    return os.path.join(data_dir, "wiki_facts", f"{split}.jsonl")


def build_facts(data_dir: str, split: str = "val", log=print) -> str:
    """Write DATA/wiki_facts/<split>.jsonl (data.wiki_facts) for the split's leads; returns the path."""
    from data.corpora import wiki_leads_path
    from data.wiki_facts import country_names, facts_from_leads, write_facts

    leads = split_leads(data_dir, split)
    with open(wiki_leads_path(), encoding="utf-8") as f:
        countries = country_names(json.load(f).values())
    facts = list(facts_from_leads(sorted(leads.items()), countries=countries))
    path = facts_path(data_dir, split)
    write_facts(path, facts)
    log(f"{len(facts)} facts from {len(leads)} {split} leads -> {path}")
    return path


def clozes(facts: list[dict], leads: dict[str, str], kinds: Sequence[str], max_leads: int, per_lead: int,
           max_prompt_chars: int, seed: int = 0) -> list[dict]:
    """Up to `per_lead` facts (first in text order) of up to `max_leads` leads (seeded sample), of the
    given kinds, whose start lies within `max_prompt_chars` of the lead; prompt = lead[:start].rstrip()."""
    by_lead: dict[str, list[dict]] = {}
    for f in facts:
        if f["kind"] in kinds and f["start"] <= max_prompt_chars and f["title"] in leads:
            by_lead.setdefault(f["title"], []).append(f)
    titles = sorted(by_lead)
    titles = sorted(random.Random(f"wiki-clozes-{seed}").sample(titles, min(max_leads, len(titles))))
    out = []
    for t in titles:
        for f in sorted(by_lead[t], key=lambda f: f["start"])[:per_lead]:
            out.append({**f, "cloze_prompt": leads[t][:f["start"]].rstrip()})
    return out


def exact(completion: str, answer: str) -> bool:
    """The completion states `answer` first, as whole words ("1879" is not "18790")."""
    c = completion.lstrip()
    return c.startswith(answer) and not (len(c) > len(answer) and (c[len(answer)].isalnum()))


def first_word(text: str) -> str:
    end = word_end(text + " ")
    return (text if end is None else text[:end]).strip()


@torch.no_grad()
def fluency(model, tokenizer, texts: Sequence[str], starts: Sequence[int], spans: Sequence[list],
            device="cpu", batch_size: int = 16, context_tokens: int = 32) -> list[tuple[float, int]]:
    """(sum of NLL in nats, tokens) under a transformers causal LM for the tokens of text[start:] that lie
    outside every delegated span, per text; the judge reads `context_tokens` tokens before the completion
    (fluency is local, and the judge's cost grows with what it reads). Identical inputs (one prompt at
    several τ often writes the same text) are scored once."""
    keys = [(t, s, tuple(map(tuple, sp))) for t, s, sp in zip(texts, starts, spans)]
    uniq = list(dict.fromkeys(keys))
    if len(uniq) < len(keys):
        got = dict(zip(uniq, fluency(model, tokenizer, [u[0] for u in uniq], [u[1] for u in uniq],
                                     [list(u[2]) for u in uniq], device, batch_size, context_tokens)))
        return [got[k] for k in keys]
    rows = []  # (ids of the window, offsets, index of the first completion token in the window)
    for t, start in zip(texts, starts):
        e = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
        first = next((j for j, (a, _) in enumerate(e["offset_mapping"]) if a >= start), len(e["input_ids"]))
        lo = max(0, first - context_tokens)
        rows.append((e["input_ids"][lo:], e["offset_mapping"][lo:], first - lo))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths pad less
    out: list = [None] * len(rows)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        L = max(len(rows[i][0]) for i in idx)
        K = max(max(len(rows[i][0]) - rows[i][2] + 1, 1) for i in idx)  # logits needed at the end
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            w = rows[i][0]
            if w:
                ids[r, L - len(w):], mask[r, L - len(w):] = torch.tensor(w), 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                     logits_to_keep=K).logits.float().log_softmax(-1).cpu()
        for r, i in enumerate(idx):
            w, offs, first = rows[i]
            start, sp = starts[i], spans[i]
            nll, n = 0.0, 0
            for t in range(max(first, 1), len(w)):
                s, en = offs[t]
                if s < start or en <= s or any(a < en and s < z for a, z in sp):
                    continue
                nll -= float(logp[r, K - 1 - (len(w) - t), w[t]])  # the logit at window position t - 1
                n += 1
            out[i] = (nll, n)
    return out


def call_sites(data_dir: str, rule_array: str, tokenizer, n: int, split: str = "val", seed: int = 0,
               context_tokens: int = 96) -> list[dict]:
    """Up to n factual and n non-factual positions of `split` that `rule_array` delegates: the text before
    the position (last `context_tokens` tokens of its window) and the true next word."""
    from data.selection import read_array, shards_of
    from data.shards import open_data

    found = {True: [], False: []}
    for sh in shards_of(open_data(data_dir), split):
        calls = read_array(sh, rule_array, required=False)
        if calls is None:
            return []
        fact = read_array(sh, "factual").astype(bool)
        w = np.asarray(sh.windows)
        for pos in np.flatnonzero(calls):
            wi = int(np.searchsorted(w, pos, side="right")) - 1
            found[bool(fact[pos])].append((sh, int(w[wi]), int(pos), int(w[wi + 1])))
    rng = random.Random(f"call-sites-{rule_array}-{seed}")
    out = []
    for factual, items in found.items():
        for sh, ws, pos, we in sorted(rng.sample(items, min(n, len(items))), key=lambda x: (x[0].name, x[2])):
            toks = np.asarray(sh.tokens[max(ws, pos - context_tokens):min(we, pos + 8)], dtype=np.int64).tolist()
            k = pos - max(ws, pos - context_tokens)
            prefix = tokenizer.decode(toks[:k], clean_up_tokenization_spaces=False)
            rest = tokenizer.decode(toks, clean_up_tokenization_spaces=False)[len(prefix):]
            out.append({"factual": factual, "prefix": prefix, "true": first_word(rest)})
    return out


def judge_sites(sites: list[dict], slm_alone, large, batch_size: int = 64) -> dict:
    """Fill each site's SLM word (the SLM alone, greedy) and large-model word; agreement with the true
    word on factual and non-factual sites."""
    prefixes = [s["prefix"] for s in sites]
    if not prefixes:
        return {}
    slm_out = slm_alone.generate_batch(prefixes, max_new_tokens=6, batch_size=batch_size)
    large_out = large.continue_words(prefixes)
    for s, (o,), (w, _) in zip(sites, slm_out, large_out):
        s["slm"], s["large"] = first_word(o.completion), first_word(w)
    res = {}
    for name, fac in (("factual", True), ("non_factual", False)):
        xs = [s for s in sites if s["factual"] == fac]
        if xs:
            res[name] = {"n": len(xs), "slm_right": float(np.mean([s["slm"] == s["true"] for s in xs])),
                         "large_right": float(np.mean([s["large"] == s["true"] for s in xs])),
                         "same_word": float(np.mean([s["slm"] == s["large"] for s in xs])),
                         "examples": [{k: (v[-60:] if k == "prefix" else v) for k, v in s.items()} for s in xs[:6]]}
    return res


def factual_share_of_calls(texts: Sequence[str], spans: Sequence[list], nlp) -> dict:
    """Share of the delegated spans (generation time) that overlap a spaCy-flagged (factual) word."""
    from data.tagging import word_spans

    hit = total = 0
    for doc, sp in zip(nlp.pipe(texts, batch_size=64), spans):
        flagged, _ = word_spans(doc)
        for a, z in sp:
            total += 1
            hit += any(s < z and a < e for s, e in flagged)
    return {"calls": total, "factual_share": hit / total if total else None}


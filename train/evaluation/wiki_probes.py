"""Knowledge probes on real text: exact-answer clozes from the wiki-leads articles of a data dir, as
lm-evaluation-harness multiple-choice tasks.

For a data dir prepared from `wiki-leads` (document id = article title), every lead of the train split
("seen": its facts were in training) and of the val split ("held-out") is parsed by
`data.wiki_facts`; each fact becomes a probe: the cloze prompt, the answer and `n_choices - 1`
distractors of the same kind whose training counts are closest to the answer's (so that a model
preferring frequent strings gains nothing), with the answer's count in the training leads. The
harness scores the choices by log-probability (acc = the answer has the highest).

Writes OUT/wiki_seen.jsonl, OUT/wiki_heldout.jsonl and one task file per set
(OUT/memlm_wiki_seen.yaml, OUT/memlm_wiki_heldout.yaml) for `lm-eval --include_path OUT`.
"""
from __future__ import annotations

import json
import os
import random

from model.atomic import atomic_write
from model.errors import ConfigError, DataError

TASKS = {"seen": "memlm_wiki_seen", "heldout": "memlm_wiki_heldout"}

# lm-eval task config of one probe set; `task_yaml` fills in the task name and the data file's path.
TASK_CONFIG = {
    "output_type": "multiple_choice",
    "test_split": "test",
    "doc_to_text": "{{prompt}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "label",
    "target_delimiter": " ",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def task_yaml(task: str, path: str) -> str:
    """The task file of `task` reading the probes at `path`. Dumped by yaml, so a path with spaces, '#',
    ':' or quotes stays one string (written by hand, '#' would start a YAML comment); glob-escaped, since
    `datasets` reads data_files as patterns ('[', '*', '?' in a directory name would match nothing)."""
    import glob

    import yaml

    files = {"data_files": {"test": glob.escape(path)}}
    cfg = {"task": task, "dataset_path": "json", "dataset_kwargs": files, **TASK_CONFIG}
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def _split_titles(data) -> dict[str, list[str]]:
    out = {}
    for split in ("train", "val"):
        seen, titles = set(), []
        for sh in data.shards(split) if split in data.manifest["splits"] else []:
            for d in sh.docs:
                if d["doc_id"] not in seen:
                    seen.add(d["doc_id"])
                    titles.append(d["doc_id"])
        out[split] = titles
    return out


def distractors(answer: str, kind: str, pool: dict[str, list[tuple[int, str]]], n: int, prompt: str) -> list[str]:
    """The n answers of the same kind with training counts closest to `answer`'s (ties broken by a hash of
    the pair: deterministic, not alphabetical), never the answer itself nor a string already in the prompt.
    pool[kind] = sorted [(count, answer)]."""
    import hashlib

    def tie(a: str) -> str:
        return hashlib.blake2b(f"{answer}\x00{a}".encode(), digest_size=8).hexdigest()

    items = pool[kind]
    count = next(c for c, a in items if a == answer)
    cands = sorted((abs(c - count), tie(a), a) for c, a in items if a != answer and a not in prompt)
    return [a for _, _, a in cands[:n]]


def build_wiki_probes(data, out: str, n_choices: int = 4, max_per_set: int | None = None, seed: int = 0,
                      nlp=None, progress=None, final_dir: str | None = None) -> dict:
    """Write the probe sets and task files of data dir `data` (an opened DataDir) into `out`; the task files
    name the probe files under `final_dir` (default `out`: where `out` will be renamed to, when it is a
    temporary directory).
    Returns {"seen": n, "heldout": n, "kinds": {...}}. Raises DataError if the data is not wiki-leads."""
    from data.corpora import wiki_leads_path
    from data.wiki_facts import answer_counts, country_names, facts_from_leads

    if data.manifest.get("source") != "wiki-leads":
        raise DataError(f"{data.path}: prepared from {data.manifest.get('source')!r}, not wiki-leads; wiki probes "
                        "need the article titles as document ids")
    with open(wiki_leads_path(), encoding="utf-8") as f:
        records = json.load(f)
    by_title = {(r.get("title") or k): (r.get("extract") or "") for k, r in records.items()}
    titles = _split_titles(data)
    countries = country_names(records.values())
    facts = {}
    for name, split in (("seen", "train"), ("heldout", "val")):
        leads = [(t, by_title[t]) for t in titles[split] if t in by_title]
        facts[name] = [f for f in facts_from_leads(leads, nlp, countries, progress=progress)
                       if f.continuation.startswith(" ")]  # the harness joins prompt and choice with " "
    counts = answer_counts({f.answer for fs in facts.values() for f in fs}, (by_title[t] for t in titles["train"]))
    pool: dict[str, list[tuple[int, str]]] = {}
    for f in facts["seen"] + facts["heldout"]:
        pool.setdefault(f.kind, set()).add((counts[f.answer], f.answer))
    pool = {k: sorted(v) for k, v in pool.items()}
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    summary = {}
    for name, fs in facts.items():
        rows = []
        for i, f in enumerate(fs):
            wrong = distractors(f.answer, f.kind, pool, n_choices - 1, f.prompt)
            if len(wrong) < n_choices - 1:
                continue
            choices = wrong + [f.answer]
            rng.shuffle(choices)
            rows.append({"id": f"{name}-{i}", "title": f.title, "kind": f.kind, "prompt": f.prompt,
                         "answer": f.answer, "choices": choices, "label": choices.index(f.answer),
                         "count": counts[f.answer], "split": name})
        if fs and not rows:  # no answer kind has that many distinct values: an empty task is no evaluation
            raise ConfigError(f"--choices {n_choices}: none of the {len(fs)} {name} facts has {n_choices - 1} "
                              "distinct wrong answers of its kind to choose from; give fewer --choices (e.g. 4)")
        if max_per_set is not None and len(rows) > max_per_set:
            rows = sorted(random.Random(seed).sample(rows, max_per_set), key=lambda r: int(r["id"].split("-")[1]))
        path = os.path.join(out, f"wiki_{name}.jsonl")
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        final = os.path.abspath(os.path.join(final_dir or out, f"wiki_{name}.jsonl"))
        atomic_write(os.path.join(out, f"{TASKS[name]}.yaml"), task_yaml(TASKS[name], final))
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        summary[name] = {"n": len(rows), "kinds": kinds}
    return summary


def harness_items(results: dict, task: str) -> dict[str, dict]:
    """{probe id: {"acc", "count", "kind"}} from an lm-eval results dict made with log_samples=True."""
    out = {}
    for s in results.get("samples", {}).get(task, []):
        doc = s["doc"]
        out[doc["id"]] = {"acc": float(s["acc"]), "count": doc.get("count"), "kind": doc.get("kind")}
    return out

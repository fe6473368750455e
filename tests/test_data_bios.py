"""bios generator: determinism, value pools, Zipf frequencies, exact probe counts in the training split."""
import hashlib
import os

import numpy as np

from data import bios
from data.shards import open_data, prepare


def _digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


def test_same_seed_byte_identical(tmp_path):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = bios.BiosConfig(n_people=120, seed=seed, top_docs=40)
        people, docs = bios.generate(cfg)
        probes = bios.probes_from_docs(people, [(i, t) for i, _, t in docs])
        bios.write_kb(str(tmp_path / name), cfg, people, probes, docs)
        outs.append(_digest(tmp_path / name))
    assert outs[0] == outs[1]
    assert outs[0]["docs.jsonl"] != outs[2]["docs.jsonl"]


def test_pools_and_frequencies():
    vals = [v for pool in (bios.CITIES, bios.UNIVERSITIES, bios.FIELDS, bios.COMPANIES, bios.HOBBIES) for v in pool]
    # no answer is a substring of another answer, so answer counts are exact
    assert not [(a, b) for a in vals for b in vals if a != b and a in b]
    words = bios.FIRST_F + bios.FIRST_M + bios.LAST + [t for ts in bios.TEMPLATES.values() for t in ts]
    assert not [(a, w) for a in vals for w in words if a in w]
    assert len(bios.FIRST_F) + len(bios.FIRST_M) >= 100 and len(bios.LAST) >= 150
    people, docs = bios.generate(n_people=2000)
    assert len({p["name"] for p in people}) == 2000
    n = np.array([p["n_docs"] for p in people])
    assert n.max() >= 300 and np.median(n) <= 5 and n.min() >= 1
    assert 8_000 < len(docs) < 30_000  # default size: a CPU demo


def test_probe_counts_match_training_docs(tmp_path):
    out = tmp_path / "data"
    prepare("bios", str(out), vocab_size=400, val_fraction=0.15, window_tokens=40, progress=False,
            log=lambda *a: None, n_people=100, top_docs=50)
    data = open_data(str(out))
    tok = data.tokenizer()
    # rebuild each person's TRAINING text from the shards (decode), then count answers
    train_text = {}
    for sh in data.shards("train"):
        off = sh.windows
        for i, d in enumerate(sh.docs):
            train_text.setdefault(d["doc_id"], []).append(sh.tokens[off[i]:off[i + 1]])
    person_text = {}
    for doc_id, chunks in train_text.items():
        text = tok.decode(np.concatenate(chunks).tolist(), skip_special_tokens=True)
        person_text.setdefault(bios.person_of(doc_id), []).append(text)
    val_ids = {d["doc_id"] for sh in data.shards("val") for d in sh.docs}
    assert val_ids and not (val_ids & set(train_text))
    probes = bios.load_probes(str(out / "bios" / "probes.jsonl"))
    assert probes and {p["bucket"] for p in probes} >= {0, 1, 2}
    for p in probes:
        got = sum(t.count(p["answer"].strip()) for t in person_text.get(p["person"], []))
        assert got == p["count"] > 0, p
        assert p["bucket"] == bios.bucket_of(p["count"])
        assert p["prompt"].startswith(p["name"]) and p["answer"].startswith(" ")
    # the probe phrasing is also a training phrasing (prompt + answer occurs in the corpus templates)
    assert any(f"{p['prompt']}{p['answer']}." in " ".join(person_text[p["person"]]) for p in probes)

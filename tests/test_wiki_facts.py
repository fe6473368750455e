"""data/wiki_facts.py: exact facts from hand-written leads, answer counts, file round trip."""
import pytest

from data.wiki_facts import (Fact, answer_counts, country_names, extract_facts, facts_from_leads,
                             load_pipeline, read_facts, write_facts)
from model.errors import DataError

LEADS = [
    ("Albert Einstein",
     "Albert Einstein (14 March 1879 – 18 April 1955) was a German-born theoretical physicist who is best "
     "known for developing the theory of relativity. Born in Ulm, he moved to Switzerland in 1895 and "
     "became a Swiss citizen."),
    ("Action figure",
     "An action figure is a poseable character model figure made most commonly of plastic. The term was "
     "coined by Hasbro in 1964 to market G.I. Joe to boys."),
    ("Lake Geneva",
     "Lake Geneva is a deep lake on the north side of the Alps, shared between Switzerland and France. "
     "It is one of the largest lakes in Western Europe."),
]

# (title, kind, answer, continuation) in text order; offsets are checked against the lead text.
EXPECTED = [
    ("Albert Einstein", "date", "14 March 1879", "14 March 1879"),
    ("Albert Einstein", "date", "18 April 1955", " 18 April 1955"),
    ("Albert Einstein", "nationality", "German", " German"),
    ("Albert Einstein", "occupation", "physicist", " physicist"),
    ("Albert Einstein", "country", "Switzerland", " Switzerland"),
    ("Albert Einstein", "year", "1895", " 1895"),
    ("Albert Einstein", "nationality", "Swiss", " Swiss"),
    ("Action figure", "year", "1964", " 1964"),
    ("Lake Geneva", "place", "Alps", " Alps"),
    ("Lake Geneva", "country", "Switzerland", " Switzerland"),
    ("Lake Geneva", "country", "France", " France"),
    ("Lake Geneva", "place", "Western Europe", " Western Europe"),
]


@pytest.fixture(scope="module")
def nlp():
    return load_pipeline()


@pytest.fixture(scope="module")
def facts(nlp):
    return list(facts_from_leads(LEADS, nlp, countries={"Switzerland", "France"}))


def test_exact_facts_on_hand_written_leads(facts):
    assert [(f.title, f.kind, f.answer, f.continuation) for f in facts] == EXPECTED
    leads = dict(LEADS)
    for f in facts:
        lead = leads[f.title]
        assert lead[f.start:f.end] == f.answer
        assert lead[f.sent_start:f.end] == f.prompt + f.continuation
        assert f.answer not in f.prompt and len(f.prompt.split()) >= 3


def test_prompts_are_sentence_prefixes(facts):
    by = {(f.title, f.answer): f for f in facts}
    assert by[("Albert Einstein", "1895")].prompt == "Born in Ulm, he moved to Switzerland in"
    assert by[("Action figure", "1964")].prompt == "The term was coined by Hasbro in"
    # "Ulm" is dropped: its prompt "Born in" has fewer than 3 words.
    assert ("Albert Einstein", "Ulm") not in by


def test_occupation_only_for_person_leads(nlp):
    doc = nlp("Ada Lovelace was an English mathematician and writer.")
    occ = [f for f in extract_facts(doc, "Ada Lovelace") if f.kind == "occupation"]
    assert [(f.answer, f.prompt) for f in occ] == [("mathematician", "Ada Lovelace was an English")]
    doc = nlp("The violin is a wooden string instrument in the violin family.")
    assert [f for f in extract_facts(doc, "Violin") if f.kind == "occupation"] == []


def test_deterministic(nlp, facts):
    assert list(facts_from_leads(LEADS, nlp, countries={"Switzerland", "France"})) == facts


def test_country_names():
    recs = [{"title": "France", "description": "Country in Western Europe"},
            {"title": "Georgia (country)", "description": "Sovereign state in the Caucasus"},
            {"title": "Paris", "description": "Capital of France"}, {"title": "X", "description": None}]
    assert country_names(recs) == frozenset({"France", "Georgia"})


def test_answer_counts_respect_word_boundaries():
    texts = ["Born 14 March 1879 in Ulm.", "In 1879 and 18790, Ulm grew.", "Ulmer Ulm"]
    got = answer_counts(["1879", "14 March 1879", "Ulm", "Paris"], texts)
    assert got == {"1879": 2, "14 March 1879": 1, "Ulm": 3, "Paris": 0}


def test_write_read_round_trip(tmp_path, facts):
    path = str(tmp_path / "facts.jsonl")
    write_facts(path, facts[:2] + [dict(facts[2].to_dict(), count=7)])
    rows = read_facts(path)
    assert [Fact(**{k: r[k] for k in Fact.__dataclass_fields__}) for r in rows] == facts[:3]
    assert rows[2]["count"] == 7


def test_read_facts_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_facts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(DataError, match="line 1: fact lacks"):
        read_facts(str(bad))


def test_build_wiki_probes(tmp_path, nlp):
    """Probes from a small wiki-leads data dir: seen = train articles, held-out = val articles; the answer is
    among the choices at `label`, distractors are answers of the same kind, counts are training counts."""
    import json

    from data.corpora import wiki_leads_path
    from data.shards import open_data, prepare
    from data.wiki_facts import answer_counts
    from train.evaluation.wiki_probes import build_wiki_probes

    data = str(tmp_path / "wiki")
    prepare("wiki-leads", data, vocab_size=400, val_fraction=0.3, window_tokens=256, max_docs=40, progress=False,
            log=lambda *a, **k: None)
    dd = open_data(data)
    summary = build_wiki_probes(dd, str(tmp_path / "probes"), n_choices=3, nlp=nlp)
    assert summary["seen"]["n"] > 10 and summary["heldout"]["n"] > 0
    split_titles = {s: {d["doc_id"] for sh in dd.shards(s) for d in sh.docs} for s in ("train", "val")}
    leads = {(r.get("title") or k): r["extract"] for k, r in json.load(open(wiki_leads_path())).items()}
    rows = {}
    for name, split in (("seen", "train"), ("heldout", "val")):
        rows[name] = [json.loads(x) for x in open(tmp_path / "probes" / f"wiki_{name}.jsonl")]
        assert len(rows[name]) == summary[name]["n"]
        assert {r["title"] for r in rows[name]} <= split_titles[split]
        yaml = (tmp_path / "probes" / f"memlm_wiki_{name}.yaml").read_text()
        assert f"task: memlm_wiki_{name}" in yaml and str(tmp_path / "probes" / f"wiki_{name}.jsonl") in yaml
    kinds = {}
    for r in rows["seen"] + rows["heldout"]:
        kinds.setdefault(r["kind"], set()).add(r["answer"])
    counts = answer_counts(kinds and {r["answer"] for v in rows.values() for r in v},
                           [leads[t] for t in split_titles["train"]])
    for r in rows["seen"] + rows["heldout"]:
        assert r["choices"][r["label"]] == r["answer"] and len(set(r["choices"])) == 3
        assert all(c in kinds[r["kind"]] or c != r["answer"] for c in r["choices"])
        assert r["count"] == counts[r["answer"]]
        assert r["answer"] in leads[r["title"]] and leads[r["title"]].count(r["prompt"]) >= 1
    # every seen answer occurs in its own (training) lead
    assert all(r["count"] >= 1 for r in rows["seen"])
    # more choices than any kind has answers: an error, not empty tasks
    from model.errors import ConfigError
    with pytest.raises(ConfigError, match=r"--choices 1000: .*fewer --choices"):
        build_wiki_probes(dd, str(tmp_path / "probes-1000"), n_choices=1000, nlp=nlp)


def test_distractors_closest_counts_hash_ties():
    from train.evaluation.wiki_probes import distractors

    pool = {"year": sorted([(1, "1900"), (2, "1901"), (2, "1902"), (2, "1903"), (9, "1999"), (3, "1950")])}
    got = distractors("1950", "year", pool, 3, "born in")
    assert sorted(got) == ["1901", "1902", "1903"]  # counts 2 are the closest to 3
    assert distractors("1950", "year", pool, 3, "born in") == got  # deterministic
    assert "1901" not in distractors("1950", "year", pool, 3, "between 1901 and")  # never a string of the prompt

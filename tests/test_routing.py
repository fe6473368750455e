"""Keyed trees, routing diagnostics and bios configurations (no MiniLM: synthetic vectors)."""
from collections import Counter

import numpy as np
import pytest

from memory.keyed import KeyRouter, balance_keys, leaf_to_path, path_to_leaf, router_from_paths, top_leaves
from memory.router import Router
from train.evaluation.routing import consistency, hit_rates, majority_leaf, oracle_paths


def test_leaf_path_round_trip():
    leaf = np.arange(27)
    p = leaf_to_path(leaf, 3, 3)
    assert p.dtype == np.int32 and p[5].tolist() == [0, 1, 2] and p[26].tolist() == [2, 2, 2]
    np.testing.assert_array_equal(path_to_leaf(p, 3), leaf)


def test_balance_keys_is_balanced_and_deterministic():
    keys = ["a"] * 10 + ["b"] * 6 + ["c"] * 5 + ["d"] * 4 + ["e"]
    table = balance_keys(keys, 2, 1)
    # largest first to the least-loaded leaf: a->0 (10), b->1 (6), c->1 (11), d->0 (14), e->1 (12)
    assert table == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    loads = Counter()
    for key in keys:
        loads[table[key]] += 1
    assert loads == {0: 14, 1: 12}
    assert balance_keys(list(reversed(keys)), 2, 1) == table


def test_router_from_paths_centroids_and_routing():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 8, dtype=np.float32)
    x = np.concatenate([c + 0.01 * rng.standard_normal((5, 8)) for c in centers]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = leaf_to_path(np.repeat([3, 0, 2, 1], 5), 2, 2)
    r = router_from_paths(x, paths, 2, {"paths_from": "id"})
    assert r.levels == 2 and r.centroids[1].shape == (4, 8)
    np.testing.assert_array_equal(r.assign(x), paths)  # each group goes back to its own leaf
    want = x[:5].mean(0)
    np.testing.assert_allclose(r.centroids[1][3], want / np.linalg.norm(want), atol=1e-6)
    # top-2 candidates: the assigned leaf first
    cand = top_leaves(r, x[:1], 2)
    assert cand.shape == (1, 2, 2) and cand[0, 0].tolist() == paths[0].tolist()


def test_key_router_uses_table_then_centroids():
    cents = [np.eye(2, 3, dtype=np.float32)]
    base = Router(cents, 2)
    base.route = lambda texts, batch_size=64: np.zeros((len(texts), 1), dtype=np.int32)  # centroid fallback
    kr = KeyRouter(base, {"Ada Baker": 1}, lambda texts: [["Oslo", "Ada Baker"] if "Ada" in t else ["X"] for t in texts])
    assert kr.route(["Ada Baker was born in", "Nobody"]).tolist() == [[1], [0]]


def test_majority_consistency_oracle_hit_rates():
    leaves = {"p": Counter({3: 5, 1: 5, 0: 2}), "q": Counter({2: 4})}
    assert majority_leaf(leaves["p"]) == 1  # ties: lowest leaf
    assert consistency(leaves) == pytest.approx((5 / 12 + 1.0) / 2)
    orc = oracle_paths(["p", "q", "unknown"], leaves, 2, 2)
    assert orc.tolist() == [[0, 1], [1, 0], [0, 0]]
    routed = np.array([[0, 1], [1, 1], [0, 0]])
    h = hit_rates([0, 0, 1], routed, orc)
    assert h["bucket_0"]["share"] == 0.5 and h["bucket_1"]["share"] == 1.0
    assert h["all"]["share"] == pytest.approx(2 / 3) and h["all"]["n"] == 3
    assert h["bucket_0"]["lo"] <= 0.5 <= h["bucket_0"]["hi"]


def test_bios_presets_and_knowledge_bits():
    import math

    from data.bios import BIOS_PRESETS, attribute_values, config_from_kw, generate, knowledge_bits

    cfg = config_from_kw({"bios_preset": "uniform", "n_people": 30})
    people, docs = generate(cfg)
    assert {p["n_docs"] for p in people} == {12} and len(docs) == 360
    cap = config_from_kw({"bios_preset": "capacity", "n_people": 200})
    people, _ = generate(cap)
    n = sorted(p["n_docs"] for p in people)
    assert n[0] == 12 and n[-1] == 240 and cap.bucket_edges == BIOS_PRESETS["capacity"]["bucket_edges"]
    assert knowledge_bits(2) == pytest.approx(2 * sum(math.log2(v) for v in attribute_values().values()))
    assert 45 < knowledge_bits(1) < 48
    from model.errors import ConfigError

    with pytest.raises(ConfigError, match="--bios-preset 'nope': unknown"):
        config_from_kw({"bios_preset": "nope"})
    with pytest.raises(ConfigError, match="min_docs"):
        config_from_kw({"min_docs": 0})


def test_document_hit_rates_on_a_fake_data_dir():
    from train.evaluation.routing import document_hit_rates, key_leaves

    class Shard:
        paths = np.array([[0], [0], [1], [1], [1]], dtype=np.int32)
        docs = [{"doc_id": t} for t in ("A", "A", "A", "B", "B")]

    class Data:
        manifest = {"router": {"k": 2}}

        def shards(self, split):
            return [Shard()]

    class R:
        k, levels, meta = 2, 1, {}

    assert key_leaves(Data(), lambda d: d) == {"A": Counter({0: 2, 1: 1}), "B": Counter({1: 2})}
    probes = [{"title": "A", "prompt": "a", "kind": "year"}, {"title": "B", "prompt": "b", "kind": "year"},
              {"title": "B", "prompt": "c", "kind": "place"}]
    routed = lambda texts: np.array([[0], [0], [1]], dtype=np.int32)  # noqa: E731
    r = document_hit_rates(Data(), R(), probes, route=routed)
    assert r["consistency"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["hit"]["all"]["share"] == pytest.approx(2 / 3) and r["hit"]["year"]["share"] == 0.5
    assert r["hit"]["place"]["share"] == 1.0
    assert r["hits"] == [1, 0, 1]  # per probe, in probe order


def test_gain_by_hit_splits_paired_differences():
    """The memory's gain on router hits and on misses: paired means on each subset, None for an empty one."""
    from train.experiments.memory_report import gain_by_hit, gain_cells

    g = gain_by_hit([1, 1, 0, 1, 1], [0, 1, 0, 1, 0], [1, 1, 0, 0, 0])
    assert g["hits"]["diff"] == pytest.approx(0.5) and g["hits"]["n"] == 2
    assert g["misses"]["diff"] == pytest.approx(1 / 3) and g["misses"]["n"] == 3
    assert g["hits"]["lo"] <= 0.5 <= g["hits"]["hi"]
    g = gain_by_hit([1, 0], [0, 0], [1, 1])
    assert g["misses"] is None and gain_cells(g)[1] == "—" and gain_cells(g)[0].startswith("+0.500")

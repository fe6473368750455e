"""Trees whose leaves come from document keys (`memlm cluster --paths-from`), and routing helpers.

A keyed tree puts every window of a document in the leaf of the document's key (a person, an article, a
named entity), spreading keys over the leaves so that they hold about as many windows. Its Router has
the mean embeddings of each node's windows as centroids, so any text can still be routed by similarity;
`KeyRouter` routes by a key found in the text first. `top_leaves` lists a text's nearest leaves (for
routing among several candidates, e.g. by the prompt's loss under each leaf's memory).
"""
from __future__ import annotations

import numpy as np

from memory.router import Router, _normalize


def leaf_to_path(leaf: np.ndarray, k: int, levels: int) -> np.ndarray:
    """int32 paths [n, levels] of leaf indices [n] in 0 .. k**levels-1 (base-k digits, root first)."""
    leaf = np.asarray(leaf, dtype=np.int64)
    return np.stack([(leaf // k ** (levels - 1 - l)) % k for l in range(levels)], 1).astype(np.int32)


def path_to_leaf(paths: np.ndarray, k: int) -> np.ndarray:
    """int64 leaf indices [n] of paths [n, levels] (inverse of leaf_to_path)."""
    leaf = np.zeros(len(paths), dtype=np.int64)
    for l in range(np.asarray(paths).shape[1]):
        leaf = leaf * k + np.asarray(paths)[:, l]
    return leaf


def balance_keys(keys: list[str], k: int, levels: int) -> dict[str, int]:
    """Leaf of each distinct key so that leaves hold about as many windows each: keys sorted by window
    count (largest first, ties by key) go to the least-loaded leaf (lowest index on ties). `keys` has one
    entry per window. Deterministic: the same keys give the same leaves."""
    import heapq
    from collections import Counter

    counts = Counter(keys)
    heap = [(0, leaf) for leaf in range(k ** levels)]
    out = {}
    for key, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        load, leaf = heapq.heappop(heap)
        out[key] = leaf
        heapq.heappush(heap, (load + c, leaf))
    return out


def router_from_paths(x: np.ndarray, paths: np.ndarray, k: int, meta: dict | None = None) -> Router:
    """A Router whose node centroids are the L2-normalised means of the vectors x [n, dim] assigned to
    them by `paths` [n, levels]; a node without vectors takes its parent's centroid. Greedy descent with
    it routes a new text to the node whose windows it resembles most (used for keyed trees, whose
    leaves come from document keys rather than from k-means)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    paths = np.asarray(paths, dtype=np.int64)
    levels = paths.shape[1]
    parent = _normalize(x.mean(0, keepdims=True))
    cents, node = [], np.zeros(len(x), dtype=np.int64)
    for l in range(levels):
        node = node * k + paths[:, l]
        n_nodes = k ** (l + 1)
        sums = np.zeros((n_nodes, x.shape[1]), dtype=np.float64)
        np.add.at(sums, node, x)
        counts = np.bincount(node, minlength=n_nodes)
        c = np.where(counts[:, None] > 0, _normalize(sums.astype(np.float32)),
                     np.repeat(parent, k, 0) if l else np.repeat(parent, n_nodes, 0))
        cents.append(c.astype(np.float32))
        parent = cents[-1]
    return Router(cents, k, meta)


class KeyRouter:
    """Routes a text by a key found in it (e.g. a named entity) through a key -> leaf table, and falls
    back to a centroid Router when the text has no known key. `key_fn(texts) -> list[list[str]]` gives
    each text's candidate keys in order of preference; the first known one wins."""

    def __init__(self, router: Router, table: dict[str, int], key_fn):
        self.router, self.table, self.key_fn = router, dict(table), key_fn
        self.k, self.levels = router.k, router.levels

    def route(self, texts: list[str] | str, batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = self.router.route(texts, batch_size)
        for i, cands in enumerate(self.key_fn(list(texts))):
            hit = next((c for c in cands if c in self.table), None)
            if hit is not None:
                out[i] = leaf_to_path(np.array([self.table[hit]]), self.k, self.levels)[0]
        return out


def top_leaves(router: Router, x: np.ndarray, m: int) -> np.ndarray:
    """int32 candidate paths [n, m, levels]: greedy descent to the last level's parent, then the m
    children nearest to each vector (best first). m is capped at k."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m = min(int(m), router.k)
    base = router.assign(x)
    out = np.repeat(base[:, None, :], m, 1)
    cents = router.centroids[-1]
    parent = path_to_leaf(base[:, :-1], router.k) if router.levels > 1 else np.zeros(len(x), dtype=np.int64)
    for i in range(len(x)):
        kids = cents[parent[i] * router.k:(parent[i] + 1) * router.k]
        out[i, :, -1] = np.argsort(-(kids @ x[i]), kind="stable")[:m]
    return out

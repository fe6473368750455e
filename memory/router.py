"""Router: MiniLM embeddings + a hierarchical spherical k-means tree, greedy descent to a path.

Embedding: all-MiniLM-L6-v2, see memory/embed.py (texts truncated to their first 256 word pieces).

Tree. Level l has k**l centroids; the children of node j (level l) are nodes j*k .. j*k+k-1 of level
l+1 (same numbering as the bank, see memory/bank.py). Fitting is top-down: at each node, FAISS
spherical k-means (all points used, no subsampling) on the points assigned to it, then the
balancing rule: no child may hold more than `max_share` of its parent's points (default 1.5/k =
9.4% for k=16, the paper's bound). Points of a child above that cap are moved, least similar first,
to their next-nearest child that still has room (capacity-constrained assignment); centroids are then
recomputed as the normalised means of the balanced clusters. Nodes with fewer than k points (or none)
do not crash: their children reuse the points / the parent's centroid (duplicates are harmless: greedy
descent picks the first of equal centroids).

Assignment (`assign`, `route`): greedy nearest-centroid descent (max inner product), level by level,
batched per level (`assign`; the plain descent `assign_reference` is its specification: same paths).
The bound holds for the fit-time partition; greedy descent of new points follows it closely.
Saved as `router.safetensors` (centroids.level{l} [k**l, dim] float32) + `router.json` (k, levels,
dim, encoder, max_share, seed, fit statistics).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from memory.embed import ENCODER, MAX_TOKENS, MiniLM
from model.atomic import atomic_path, atomic_write_json
from model.errors import CheckpointError, ConfigError, DataError

SMALL_NODE = 20_000  # nodes with fewer points run k-means on one thread
_ROWS = 128  # rows per assignment matmul (see Router.assign)


# ---------------------------------------------------------------------------------------------
# Balanced k-means per node
# ---------------------------------------------------------------------------------------------
def _one_blas_thread():
    """Limit BLAS to one thread if threadpoolctl is available (it comes with scikit-learn); no-op otherwise."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def capacity(n: int, k: int, max_share: float) -> int:
    """Most points one child may hold: floor(max_share * n), never below ceil(n / k) (always feasible)."""
    return max(int(np.floor(max_share * n)), -(-n // k))


def balanced_assign(sims: np.ndarray, cap: int) -> np.ndarray:
    """Assign each row of sims [n, k] to a column, no column above cap. Each point goes to its best
    column with room; when a column is over-subscribed it keeps its most similar points and the rest
    try their next choice (rounds over ranks 0..k-1)."""
    n, k = sims.shape
    order = np.argsort(-sims, axis=1, kind="stable")
    assign = np.full(n, -1, dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    pending = np.arange(n)
    for rank in range(k):
        if pending.size == 0:
            break
        choice = order[pending, rank]
        for c in np.unique(choice):
            room = cap - counts[c]
            if room <= 0:
                continue
            cand = pending[choice == c]
            if cand.size > room:  # keep the most similar
                cand = cand[np.argsort(-sims[cand, c], kind="stable")[:room]]
            assign[cand] = c
            counts[c] += cand.size
        pending = pending[assign[pending] < 0]
    assert pending.size == 0, "balanced_assign: capacity too small"  # cap * k >= n by construction
    return assign


def fit_node(x: np.ndarray, k: int, parent: np.ndarray, seed: int, niter: int, max_share: float):
    """k child centroids [k, dim] and the balanced assignment [n] of the node's points x [n, dim]."""
    import faiss

    n, dim = x.shape
    if n == 0:  # empty node: every child is the parent (greedy descent then picks child 0)
        return np.repeat(parent[None], k, 0).astype(np.float32), np.zeros(0, dtype=np.int64)
    if n < k:  # too few points for k-means: the points themselves, then copies of the parent
        cents = np.concatenate([x, np.repeat(parent[None], k - n, 0)], 0).astype(np.float32)
        return _normalize(cents), np.arange(n, dtype=np.int64)
    km = faiss.Kmeans(dim, k, niter=niter, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=-(-n // k) + 1, min_points_per_centroid=1)
    # Small nodes (most of them, deeper in the tree) run single-threaded: OpenMP start-up and
    # synchronisation cost more than the work (4.6x faster on a busy 2-core machine).
    threads = faiss.omp_get_max_threads()
    if n < SMALL_NODE:
        faiss.omp_set_num_threads(1)
    try:
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    cents = _normalize(km.centroids)
    sims = x @ cents.T
    assign = balanced_assign(sims, capacity(n, k, max_share))
    # Recompute centroids from the balanced clusters (an empty cluster keeps its k-means centroid).
    onehot = np.zeros((k, n), dtype=np.float32)
    onehot[assign, np.arange(n)] = 1.0
    sums = onehot @ x  # per-cluster sums as one matmul (fast, unlike np.add.at)
    counts = np.bincount(assign, minlength=k)
    cents = np.where(counts[:, None] > 0, _normalize(sums), cents)
    return cents.astype(np.float32), assign


def _gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a [m, d] @ b [d, k] float32 through BLAS GEMM, also for m == 1. For rows @ [d, k] OpenBLAS's GEMM
    sums each product in dimension order in one FMA chain, whatever m and the row's position (tested
    bitwise), but numpy sends a single row to GEMV, whose sums differ in the last bits: a point's path
    would then depend on its batch."""
    if a.shape[0] != 1:
        return np.matmul(a, b, out=out)
    res = np.matmul(np.repeat(a, 2, axis=0), b)[:1]
    if out is None:
        return res
    out[...] = res
    return out


def _gemm_chunks(rows: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = rows @ b in chunks of at most _ROWS rows (OpenBLAS's small-matrix kernel: no packing copy;
    1M x 384 against 16 centroids in 0.20 s instead of 0.29 s), none of a single row (see _gemm)."""
    m, c = rows.shape[0], 0
    while c < m:
        e = min(c + _ROWS, m)
        if m - e == 1:
            e -= 1
        _gemm(rows[c:e], b, out=out[c:e])
        c = e


def _small_uint(a: np.ndarray, bound: int) -> np.ndarray:
    """a (values in [0, bound)) as the smallest unsigned dtype that holds them: numpy's stable argsort
    is a radix sort for 8/16-bit integers (1M level-1 nodes: 3 ms instead of 35 ms as int64)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if bound <= np.iinfo(dtype).max + 1:
            return a.astype(dtype)
    return a


# ---------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------
class Router:
    def __init__(self, centroids: list[np.ndarray], k: int, meta: dict | None = None):
        self.k = int(k)
        self.centroids = [np.ascontiguousarray(c, dtype=np.float32) for c in centroids]
        self.levels = len(self.centroids)
        self.dim = int(self.centroids[0].shape[1]) if self.centroids else 0
        for l, c in enumerate(self.centroids):
            if c.shape != (self.k ** (l + 1), self.dim):
                raise CheckpointError(f"router: level {l + 1} centroids have shape {c.shape}, expected "
                                 f"({self.k ** (l + 1)}, {self.dim}) for k={self.k}")
        self.meta = dict(meta or {})
        self._encoder: MiniLM | None = None

    # ---- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, x: np.ndarray, k: int = 16, levels: int = 3, seed: int = 0, niter: int = 20,
            max_share: float | None = None, progress: bool = False) -> "Router":
        """Fit the tree top-down on L2-normalised vectors x [n, dim]. Stores the fit-time partition's
        paths in `self.fit_paths` [n, levels] and per-level statistics in meta["fit"]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, dim = x.shape
        max_share = 1.5 / k if max_share is None else float(max_share)
        t0 = time.time()
        centroids = []
        paths = np.zeros((n, levels), dtype=np.int32)
        node = np.zeros(n, dtype=np.int64)          # node id at the current level (root = 0)
        parents = _normalize(x.mean(0, keepdims=True)) if n else np.zeros((1, dim), np.float32)
        stats = []
        for l in range(levels):
            n_parent = k ** l
            cents = np.zeros((n_parent * k, dim), dtype=np.float32)
            child = np.zeros(n, dtype=np.int64)
            order = np.argsort(node, kind="stable")
            bounds = np.searchsorted(node[order], np.arange(n_parent + 1))
            worst = 0.0
            it = range(n_parent)
            if progress:
                from tqdm import tqdm
                it = tqdm(it, desc=f"fit level {l + 1}/{levels}", unit="node", leave=False)
            for j in it:
                idx = order[bounds[j]:bounds[j + 1]]
                c, a = fit_node(x[idx], k, parents[j], seed + j + l * 1_000_003, niter, max_share)
                cents[j * k:(j + 1) * k] = c
                child[idx] = a
                if idx.size >= k:
                    worst = max(worst, np.bincount(a, minlength=k).max() / idx.size)
            paths[:, l] = child
            node = node * k + child
            centroids.append(cents)
            parents = cents
            stats.append({"level": l + 1, "nodes": n_parent * k, "max_share": round(float(worst), 5),
                          "empty_nodes": int(n_parent * k - np.unique(node).size)})
        meta = {"encoder": ENCODER, "max_tokens": MAX_TOKENS, "max_share": max_share, "seed": seed,
                "niter": niter, "n_fit": int(n), "fit_seconds": round(time.time() - t0, 2), "fit": stats}
        router = cls(centroids, k, meta)
        router.fit_paths = paths
        return router

    # ---- assignment ---------------------------------------------------------------------------
    def assign(self, x: np.ndarray, batch_size: int = 2048, workers: int | None = None) -> np.ndarray:
        """Greedy descent: int32 paths [n, levels] for float32 vectors x [n, dim] (max inner product with
        the children of the node chosen one level up; the first of equal scores wins).

        Batched per level, so every matmul is a group of points against the k children of their common
        parent, on rows that sit in cache:
        1. level 1 for all points (x streamed once);
        2. the points ordered by level-1 node (one stable argsort), then taken `batch_size` at a time in
           that order: a batch has one or two level-1 parents, and at each deeper level its rows are
           grouped by parent (stable argsort + row gather into a reused buffer; none when already
           grouped) and scored, into one score array whose argmax gives every row's child.
        Matmuls run on at most `_ROWS` rows (see `_gemm_chunks`), always as GEMM (`_gemm`), so every
        score is the same float32 sum as in `assign_reference`, whatever the batch. Batches run on
        `workers` threads (default min(2, CPUs)); BLAS stays single-threaded. The products are those of
        `assign_reference`, so are the paths (tested). Raises DataError for vectors of the wrong shape.
        """
        x = self._check_vectors(x)
        n = x.shape[0]
        out = np.zeros((n, self.levels), dtype=np.int32)
        if n == 0 or self.levels == 0:
            return out
        # [n_parent, dim, k]: the k children of each parent as one contiguous right-hand side
        cts = [np.ascontiguousarray(c.reshape(-1, self.k, self.dim).transpose(0, 2, 1)) for c in self.centroids]
        workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
        top = np.empty(n, dtype=np.int64)
        local = threading.local()

        def buffers() -> list[np.ndarray]:
            if getattr(local, "bufs", None) is None:  # per thread, reused: fresh arrays page-fault
                local.bufs = [np.empty((batch_size, self.dim), np.float32) for _ in range(2)]
            return local.bufs

        def level1(s: int) -> None:
            top[s:s + batch_size] = self._children(x[s:s + batch_size], None, cts[0], None)

        def deeper(s: int) -> None:
            idx = order[s:s + batch_size]
            rows_buf, scratch = buffers()
            rows = np.take(x, idx, axis=0, out=rows_buf[:len(idx)], mode="clip")  # indices are valid
            node = top[idx]
            for l in range(1, self.levels):
                child = self._children(rows, node, cts[l], scratch[:len(idx)])
                out[idx, l] = child
                node = node * self.k + child

        with _one_blas_thread(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(level1, range(0, n, batch_size)))
            out[:, 0] = top
            if self.levels > 1:
                order = np.argsort(_small_uint(top, self.k), kind="stable")
                list(pool.map(deeper, range(0, n, batch_size)))
        return out

    @staticmethod
    def _children(rows: np.ndarray, parent: np.ndarray | None, ct: np.ndarray, buf: np.ndarray | None) -> np.ndarray:
        """Best child [b] of each row: rows [b, dim] float32, parent [b] int64 (None: all parent 0),
        ct [n_parent, dim, k]; buf [b, dim] float32 scratch for the rows grouped by parent."""
        b = rows.shape[0]
        order = None
        if parent is None:
            parent = np.zeros(b, dtype=np.int64)
        elif (parent[1:] < parent[:-1]).any():  # group the rows by parent
            order = np.argsort(parent, kind="stable")
            rows, parent = np.take(rows, order, axis=0, out=buf, mode="clip"), parent[order]
        first = np.flatnonzero(np.r_[True, parent[1:] != parent[:-1]])
        last = np.r_[first[1:], b]
        scores = np.empty((b, ct.shape[2]), dtype=np.float32)
        for a, e, j in zip(first.tolist(), last.tolist(), parent[first].tolist()):
            _gemm_chunks(rows[a:e], ct[j], scores[a:e])
        best = np.argmax(scores, axis=1)
        if order is None:
            return best
        child = np.empty(b, dtype=np.int64)
        child[order] = best
        return child

    def assign_reference(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """The plain greedy descent `assign` must match: per batch and level, sort by parent, one matmul
        per parent on a gathered copy (GEMM also for a lone row, see `_gemm`: paths do not depend on the
        batch). Kept as the specification (tests, scripts/bench_memory.py)."""
        x = self._check_vectors(x)
        out = np.zeros((x.shape[0], self.levels), dtype=np.int32)
        k = self.k
        with _one_blas_thread():
            for s in range(0, x.shape[0], batch_size):
                xb = x[s:s + batch_size]
                node = np.zeros(xb.shape[0], dtype=np.int64)
                for l, cents in enumerate(self.centroids):
                    if l == 0:
                        child = np.argmax(_gemm(xb, cents.T), axis=1)
                    else:
                        order = np.argsort(node, kind="stable")
                        sorted_nodes, xs = node[order], xb[order]
                        starts = np.flatnonzero(np.r_[True, sorted_nodes[1:] != sorted_nodes[:-1]])
                        ends = np.r_[starts[1:], sorted_nodes.size]
                        child_sorted = np.zeros(xb.shape[0], dtype=np.int64)
                        for a, b in zip(starts, ends):
                            j = sorted_nodes[a]
                            child_sorted[a:b] = np.argmax(_gemm(xs[a:b], cents[j * k:(j + 1) * k].T), axis=1)
                        child = np.empty_like(child_sorted)
                        child[order] = child_sorted
                    out[s:s + xb.shape[0], l] = child
                    node = node * k + child
        return out

    def _check_vectors(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(f"router: vectors of shape {x.shape}, expected [n, {self.dim}]")
        return x

    def encoder(self) -> MiniLM:
        if self._encoder is None:
            self._encoder = MiniLM(max_tokens=int(self.meta.get("max_tokens", MAX_TOKENS)))
        return self._encoder

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.encoder().encode(list(texts), batch_size=batch_size)

    def route(self, texts: list[str] | str, batch_size: int = 64) -> np.ndarray:
        """Paths int32 [n, levels] for raw texts (a single string -> [1, levels])."""
        if isinstance(texts, str):
            texts = [texts]
        return self.assign(self.embed(texts, batch_size))

    # ---- consistency --------------------------------------------------------------------------
    def check_bank(self, mem_cfg) -> None:
        """Raise if this tree cannot address the bank of `mem_cfg` (depth and branching must match)."""
        if self.levels != len(mem_cfg.widths) or self.k != mem_cfg.k:
            raise ConfigError(f"router has {self.levels} levels with k={self.k}, but the memory bank has "
                             f"{len(mem_cfg.widths)} levels (widths={tuple(mem_cfg.widths)}) with k={mem_cfg.k}")

    def same_tree(self, other: "Router") -> bool:
        """Whether `other` routes exactly as this tree: same k and depth, identical centroids, the same
        leaf source (`paths_from`, its key table) and window text. A run's checkpoint carries a copy of its
        data's router; data clustered again (another seed, --paths-from) has another tree, and its stored
        paths then address other memories."""
        same_meta = all(self.meta.get(key) == other.meta.get(key) for key in ("paths_from", "key_table", "embed_text"))
        return (self.k, self.levels) == (other.k, other.levels) and same_meta and \
            all(np.array_equal(a, b) for a, b in zip(self.centroids, other.centroids))

    # ---- save / load --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"centroids.level{l + 1}": c for l, c in enumerate(self.centroids)}
        with atomic_path(str(d / "router.safetensors")) as tmp:
            save_file(tensors, tmp)
        info = {"version": 1, "k": self.k, "levels": self.levels, "dim": self.dim, **self.meta}
        atomic_write_json(str(d / "router.json"), info, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Router":
        from safetensors.numpy import load_file

        d = Path(directory)
        jp, sp = d / "router.json", d / "router.safetensors"
        refit = ("use an older checkpoint (checkpoint.resume=RUN/checkpoints/step-...)" if (d / "meta.json").exists()
                 else f"run `memlm cluster {d} --refit` again")  # a checkpoint's router is a copy: not refit
        for p in (jp, sp):
            if not p.exists():
                raise DataError(f"router: {p} not found (run `memlm cluster` on the data to fit a router)")
        try:
            info = json.loads(jp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"router: {jp}: unreadable ({e}); {refit}") from None
        for key in ("k", "levels"):
            if not isinstance(info, dict) or key not in info:
                raise CheckpointError(f"router: {jp}: missing key {key!r}; {refit}")
        try:
            tensors = load_file(str(sp))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise CheckpointError(f"router: {sp}: damaged ({' '.join(str(e).split())[:200]}); {refit}") from None
        cents = []
        for l in range(info["levels"]):
            name = f"centroids.level{l + 1}"
            if name not in tensors:
                raise CheckpointError(f"router: {sp}: missing tensor {name!r} (router.json says {info['levels']} levels)")
            cents.append(tensors[name])
        meta = {k: v for k, v in info.items() if k not in ("version", "k", "levels", "dim")}
        return cls(cents, info["k"], meta)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        d = Path(directory)
        return (d / "router.json").exists() and (d / "router.safetensors").exists()

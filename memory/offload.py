"""Offloaded banks: rows in host memory or memory-mapped safetensors files; only fetched rows move.

`OffloadedBank` implements the `memory.bank.Bank` interface over per-level row tables that live outside
the device (`memory.row_store.LevelStore`: storage "host" or "mmap", lazily initialised rows, each with
its AdamW state), and is trained by `memory.sparse_adam.SparseBankOptimizer` (`sparse = True`).

Per step: `gather` takes the unique node ids of each level, reads those rows (numpy fancy indexing on
the store, into pinned buffers when CUDA is present), moves them to the device as leaf tensors with
`requires_grad`, and builds the blocks from the leaves, so autograd leaves one gradient per fetched
row (`row_grads`). `prefetch(mem_path)` (the loader knows the next batch) gathers the next batch's rows
and their optimizer state on a background thread while the current step runs (`memory.prefetch`).
`copy_from(resident_bank)` materialises every row from a ResidentBank.

Multiple processes (cluster-affine ownership, `memory.row_store.owner_of`): a rank stores only the rows
of the subtrees it owns (~1/world of the bank), fetches and trains only those, and the data loader gives
every rank rows of its own subtrees (`affine_rows`). The generic block is small and replicated: it is an
ordinary parameter, so DDP all-reduces its gradients with the anchor's. Bank gradients never cross ranks
(no two ranks own a row); `SparseBankOptimizer(grad_divisor=world_size)` scales them to the gradient of
the global mean loss, and the clipping norm is all-reduced. Everything uses torch.distributed collectives.

Checkpoints: `save_checkpoint(bank_dir)` / `load_checkpoint(bank_dir)`, format in memory/bank_io.py
(sharded safetensors + index.json, only shards with rows changed since the previous save rewritten).
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from memory import bank_io
from memory.bank import Bank, node_ids
from memory.config import MemoryConfig
from memory.prefetch import RowPrefetcher
from memory.row_store import LevelStore, owner_of
from model.errors import CheckpointError, ConfigError


class OffloadedBank(Bank):
    """A bank whose rows live in host memory or memory-mapped files (see the module docstring).

    storage: "host" | "mmap" (mmap needs `path`, a directory for the live per-level files).
    seed: lazy-init seed of the rows. rank/world_size: cluster-affine ownership (defaults: the
    torch.distributed process group when initialised, else 0/1). prefetch_workers: 0 disables prefetch.
    """

    sparse = True

    def __init__(self, mem_cfg: MemoryConfig, model_cfg, storage: str = "host", path: str | None = None,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, prefetch_workers: int = 1,
                 shard_bytes: int = 64 << 20):
        super().__init__(mem_cfg, model_cfg)
        if storage not in ("host", "mmap"):
            raise ConfigError(f"OffloadedBank: storage must be 'host' or 'mmap', got {storage!r}")
        if storage == "mmap":
            if not path:
                raise ConfigError("OffloadedBank(storage='mmap') needs path=<directory for the bank files>")
            os.makedirs(path, exist_ok=True)
        if rank is None or world_size is None:  # the process group, else torchrun's env (before DDP starts)
            dist_on = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if dist_on else int(os.environ.get("RANK", 0))
            world_size = dist.get_world_size() if dist_on else int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world_size:
            raise ConfigError(f"OffloadedBank: rank {rank} not in [0, world_size={world_size})")
        self.storage, self.path, self.seed = storage, path, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.owned_tops = [c for c in range(self.k) if owner_of(c, self.world_size) == self.rank]
        self.init_std = float(mem_cfg.init_std)
        self.n_mem = len(self.layer_ids)
        self.shard_bytes = int(shard_bytes)
        self.stores = [LevelStore(self, l + 1, r) for l, r in enumerate(self.widths)]
        # Small and replicated: an ordinary parameter (dense AdamW, DDP all-reduce), init as ResidentBank's.
        self.generic = nn.Parameter(torch.empty(1, self.n_mem, 3, self.R, self.d))
        with torch.no_grad():
            nn.init.normal_(self.generic[:, :, :2], mean=0.0, std=self.init_std)
            self.generic[:, :, 2].zero_()
        self._fetched: list[list] = [[] for _ in self.stores]  # per level: [(rows, leaf)] since clear_grads
        self._pending_tokens = None
        self.prefetcher = RowPrefetcher(self.stores, prefetch_workers, self._buffer, self._pinned)
        self.uid = uuid.uuid4().hex
        self.save_seq = 0
        self.last_checkpoint: str | None = None
        self.stats = self.prefetcher.stats

    # ---- device transfer ---------------------------------------------------------------------------
    def _pinned(self) -> bool:
        return self._device().type == "cuda"

    def _buffer(self, n: int, dim: int) -> np.ndarray:
        if self._pinned():  # page-locked staging buffer: asynchronous host-to-device copy
            return torch.empty((n, dim), dtype=torch.float32, pin_memory=True).numpy()
        return np.empty((n, dim), np.float32)

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        dev = self._device()
        return t.to(dev, non_blocking=True) if dev.type != "cpu" else t

    # ---- prefetch ---------------------------------------------------------------------------------
    def prefetch(self, mem_path: torch.Tensor) -> None:
        """Start reading the rows (and optimizer state) of a future batch on the background thread."""
        if not self.prefetcher.enabled or mem_path is None or mem_path.shape[-1] == 0:
            return
        ids = node_ids(torch.as_tensor(mem_path).reshape(-1, self.n_levels).cpu(), self.k)
        rows = []
        for store, i in zip(self.stores, ids):
            u = np.unique(i.numpy().astype(np.int64))
            u = u[store.owned(u)]
            rows.append(u if store.width > 0 and len(u) else None)
        self.prefetcher.submit(rows)

    # ---- Bank interface -------------------------------------------------------------------------
    def gather(self, ids: list[torch.Tensor]) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        parts = []
        for l, (store, i) in enumerate(zip(self.stores, ids)):
            if store.width == 0:
                continue
            uniq, inv = np.unique(i.detach().cpu().numpy().astype(np.int64), return_inverse=True)
            if len(uniq) == 0:  # every row took the generic block: nothing to read, nothing to train
                parts.append(torch.zeros(0, self.n_mem, 3, store.width, self.d, device=self._device()))
                continue
            rows = self._to_device(self.prefetcher.read(l + 1, "w", uniq, consume=grad))
            leaf = rows.view(len(uniq), self.n_mem, 3, store.width, self.d)
            if grad:
                leaf.requires_grad_(True)
                self._fetched[l].append((uniq, leaf))
            parts.append(leaf.index_select(0, torch.from_numpy(inv.reshape(-1)).to(leaf.device)))
        if not parts:
            return self.generic.new_zeros(ids[0].shape[0], self.n_mem, 3, 0, self.d)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)

    def generic_block(self) -> torch.Tensor:
        return self.generic

    def fetch(self, mem_path, use_generic=None, dtype=None):
        out = super().fetch(mem_path, use_generic, dtype)
        if torch.is_grad_enabled() and mem_path is not None:
            self._pending_tokens = (mem_path.detach().cpu(), out.generic_rows.detach().cpu())
        return out

    def count_tokens(self, n_tokens) -> None:
        """Add the target tokens of the last training fetch to its nodes' counters (generic rows count
        nowhere). n_tokens: int or [B] (e.g. (labels != -100).sum(1))."""
        if self._pending_tokens is None:
            return
        mem_path, generic = self._pending_tokens
        self._pending_tokens = None
        n = torch.as_tensor(n_tokens).reshape(-1).cpu().to(torch.int64).expand(mem_path.shape[0])[~generic].numpy()
        for store, i in zip(self.stores, node_ids(mem_path[~generic], self.k)):
            loc = store.local(i.numpy().astype(np.int64))
            np.add.at(store.arrays["tokens"], loc, n)
            store.dirty[loc] = True

    # ---- gradients (protocol of memory.sparse_adam.SparseBankOptimizer) ---------------------------
    def row_grads(self):
        out = []
        for l, (store, fetched) in enumerate(zip(self.stores, self._fetched)):
            if not fetched:
                continue
            rows = np.unique(np.concatenate([r for r, _ in fetched]))
            dev = fetched[0][1].device
            g = torch.zeros(len(rows), store.row_dim, dtype=torch.float32, device=dev)
            for r, leaf in fetched:  # one add per fetch, in fetch order: deterministic on any device
                if leaf.grad is not None:
                    pos = torch.from_numpy(np.searchsorted(rows, r)).to(dev)
                    g.index_add_(0, pos, leaf.grad.reshape(len(r), store.row_dim).float())
            out.append((f"level{l + 1}", store, rows, g))
        return out

    def clear_grads(self) -> None:
        self._fetched = [[] for _ in self.stores]

    # ---- bookkeeping ----------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes of this rank's row tables (weights + optimizer state + counters), host or mapped."""
        return sum(s.nbytes() for s in self.stores)

    def full_bytes(self) -> int:
        """Bytes the whole bank's tables would take on a single process."""
        return sum(s.nbytes() * self.k // len(s.tops) for s in self.stores) if self.owned_tops else 0

    def touched_rows(self) -> list[int]:
        return [int((s.arrays["step"] > 0).sum()) for s in self.stores]

    @torch.no_grad()
    def copy_from(self, bank: Bank) -> "OffloadedBank":
        """Materialise every owned row (and the generic block) from another bank, e.g. a ResidentBank."""
        for store, w in zip(self.stores, bank.levels()):
            if store.width == 0:
                continue
            for c in store.tops:
                a, b = c * store.block, (c + 1) * store.block
                rows = np.arange(a, b)
                loc = store.local(rows)
                store.arrays["w"][loc] = w[a:b].detach().reshape(b - a, -1).float().cpu().numpy()
                store.arrays["init"][loc] = 1
                store.dirty[loc] = True
        self.generic.copy_(bank.generic_block())
        return self

    def flush(self) -> None:
        """Write the dirty pages of a memory-mapped bank to its files (msync). Not needed for checkpoints
        (they read the rows through the same page cache) nor at close (the live files are scratch)."""
        for s in self.stores:
            if self.storage == "mmap":
                bank_io.flush_mapped(s.arrays)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"k": self.k, "widths": list(self.widths), "layer_ids": list(self.layer_ids), "d": self.d,
                "n_mem_layers": self.n_mem, "seed": self.seed, "init_std": self.init_std, "dtype": "float32",
                "world_size": self.world_size, "uid": self.uid, "save_seq": self.save_seq,
                "layout": "row = [n_mem_layers, 3 (M1, M2, M3^T), r_l, d] flattened"}

    def _prev_dir(self, prev_dir: str | None) -> str | None:
        """The previous checkpoint's bank dir if it is exactly our last save (so `dirty` is relative to it)."""
        cand = prev_dir or self.last_checkpoint
        if cand is None:
            return None
        if not os.path.exists(os.path.join(cand, "index.json")):
            # the loop renamed step-N.tmp -> step-N after we saved into it
            parent, base = os.path.split(os.path.normpath(cand))
            gp, step_dir = os.path.split(parent)
            if step_dir.endswith(".tmp"):
                cand = os.path.join(gp, step_dir[:-4], base)
            if not os.path.exists(os.path.join(cand, "index.json")):
                return None
        meta = bank_io.read_index(cand)["meta"]
        if meta.get("uid") != self.uid or meta.get("save_seq") != self.save_seq:
            return None
        return cand

    def save_checkpoint(self, bank_dir: str, prev_dir: str | None = None) -> dict:
        """Write this rank's shards (+ index.json, by rank 0) into `bank_dir` (inside the step-N.tmp dir).
        Shards without a row changed since the previous save are hard-linked from it. Collective when
        distributed. Returns counts {"written", "linked", "skipped"}."""
        os.makedirs(bank_dir, exist_ok=True)
        prev = self._prev_dir(prev_dir)
        levels, counts = [], {"written": 0, "linked": 0, "skipped": 0}
        for s in self.stores:
            dirty_global = None
            if prev is not None:  # dirty flags in global row ids (rows of other ranks: never dirty here)
                dirty_global = np.zeros(s.n_global, bool)
                for c in s.tops:
                    lo = s.top_pos[c] * s.block
                    dirty_global[c * s.block:(c + 1) * s.block] = s.dirty[lo:lo + s.block]
            entries, cnt = bank_io.save_level_shards(
                bank_dir, s.level, self.k, s.row_dim, s.read_range, s.tops, shard_bytes=self.shard_bytes,
                dirty=dirty_global, prev=bank_io.prev_level_files(prev, s.level))
            for key in counts:
                counts[key] += cnt[key]
            levels.append(entries)
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, levels)
            levels = [sorted((e for g in gathered for e in g[i]), key=lambda e: e["start"]) for i in range(len(self.stores))]
        self.save_seq += 1
        if self.rank == 0:
            idx = {"format": bank_io.FORMAT, "version": bank_io.VERSION, "meta": self._meta(),
                   "levels": [{"level": s.level, "width": s.width, "n_rows": s.n_global, "row_dim": s.row_dim,
                               "shards": e} for s, e in zip(self.stores, levels)]}
            bank_io.write_json(os.path.join(bank_dir, "index.json"), idx)
        if self.world_size > 1:
            dist.barrier()
        for s in self.stores:
            s.dirty[:] = False
        self.last_checkpoint = bank_dir
        return counts

    def load_checkpoint(self, bank_dir: str) -> None:
        """Replace the live rows by a checkpoint's (this rank's subtrees only; any saving world size)."""
        idx = bank_io.read_index(bank_dir)
        meta = idx["meta"]
        for key, mine in (("k", self.k), ("widths", list(self.widths)), ("layer_ids", list(self.layer_ids)),
                          ("d", self.d)):
            if meta.get(key) != mine:
                raise CheckpointError(f"{bank_dir}/index.json: bank {key}={meta.get(key)} but this model's bank has "
                                 f"{key}={mine} (memory config / model config mismatch)")
        self.prefetcher.clear()
        tops = set(self.owned_tops)
        for s, lv in zip(self.stores, idx["levels"]):
            s._allocate()
            for entry, arrays in bank_io.load_level_shards(bank_dir, lv, tops):
                loc = s.local(np.asarray(arrays["rows"]))
                for name in bank_io.ROW_ARRAYS:
                    s.arrays[name][loc] = arrays[name]
            s.dirty[:] = False
        self.seed, self.init_std = int(meta["seed"]), float(meta["init_std"])
        self.uid, self.save_seq = meta["uid"], int(meta["save_seq"])
        self.last_checkpoint = bank_dir

    def has_checkpoint(self, step_dir: str) -> bool:
        return os.path.isfile(os.path.join(self.checkpoint_dir(step_dir), "index.json"))

    def close(self) -> None:
        self.prefetcher.close()


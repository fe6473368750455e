"""Row tables of an offloaded bank: one `LevelStore` per level, in host memory or a memory-mapped file.

Row layout is ResidentBank's: level l has k**l rows, row = [n_mem_layers, 3, r_l, d] (M1, M2, M3^T)
flattened, fp32. Beside the weights `w` every row has its optimizer state `exp_avg`, `exp_avg_sq`
(same shape), `step` (its own AdamW step count), `tokens` (target tokens trained on the node) and
`init` (1 once the row holds materialised values). Storage:

- "host": anonymous zero mappings (untouched pages cost no RSS);
- "mmap": one safetensors file per level (`<path>/level<l>.rank<r>-of-<w>.safetensors`, memory/bank_io.py)
  mapped with MADV_RANDOM, created sparse, so a bank (plus its optimizer state) larger than RAM works and
  costs disk only for rows that were ever updated.

Lazy initialisation: a row that was never written (`init == 0`) reads as M1, M2 ~ N(0, init_std) drawn
from a generator seeded by (seed, level, row id) and M3 = 0, with zero optimizer state. Creating a bank
therefore costs O(1) whatever its size, and it is deterministic (the same seed gives the same rows).

Ownership (multi-process, cluster-affine): top-level cluster c is owned by rank c % world_size; a rank
stores only the rows of its subtrees (level l: rows [c*k^(l-1), (c+1)*k^(l-1)) of each owned c), and a
`LevelStore` addresses rows by *global* node id over compact local storage.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from memory import bank_io
from model.errors import DataError

ROW_FLOATS = ("w", "exp_avg", "exp_avg_sq")  # the per-row fp32 arrays: weights + AdamW moments


def owner_of(top_cluster, world_size: int):
    """Rank that owns top-level cluster(s) `top_cluster` (int or array): c % world_size."""
    return top_cluster % world_size


def affine_rows(mem_path: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Bool [B]: rows of a batch whose path lies in a subtree owned by `rank`."""
    return owner_of(mem_path[:, 0].long(), world_size) == rank


def anon_zeros(shape, dtype) -> np.ndarray:
    """Zeroed host memory that costs RSS only where written, at 4 KiB granularity: an anonymous mapping
    without transparent huge pages (np.zeros asks for huge pages, so one touched 100 KB row would make
    a 2 MB page resident: measured 20x the touched bytes)."""
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    m = mmap.mmap(-1, n)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype).reshape(shape)


def row_seed(seed: int, level: int, row: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + level * 0xC2B2AE3D27D4EB4F + row * 0x165667B19E3779F9) % (2 ** 63 - 1)



class LevelStore:
    """The rows of one level owned by this rank, with their optimizer state (a row store for
    `memory.sparse_adam`). Rows are addressed by *global* node id; local storage is compact."""

    def __init__(self, bank: "OffloadedBank", level: int, width: int):
        self.bank, self.level, self.width = bank, level, width
        k = bank.k
        self.n_global = k ** level
        self.block = bank_io.top_block(k, level)  # rows per top-level cluster
        self.row_dim = bank.n_mem * 3 * width * bank.d
        self.tops = list(bank.owned_tops)
        self.top_pos = np.full(k, -1, np.int64)
        self.top_pos[self.tops] = np.arange(len(self.tops))
        self.n_rows = len(self.tops) * self.block
        self.arrays: dict[str, np.ndarray] = {}
        self.dirty = np.zeros(self.n_rows, bool)  # changed since the last checkpoint (RAM only)
        self._allocate()

    # ---- storage --------------------------------------------------------------------------------
    def _specs(self):
        specs = {}
        for name, (dtype, per_row) in bank_io.ROW_ARRAYS.items():
            specs[name] = (np.dtype(dtype), (self.n_rows, self.row_dim) if per_row else (self.n_rows,))
        return specs

    @property
    def file(self) -> str | None:
        b = self.bank
        if b.storage != "mmap":
            return None
        return os.path.join(b.path, f"level{self.level}.rank{b.rank}-of-{b.world_size}.safetensors")

    def _allocate(self) -> None:
        """Fresh all-zero storage (pristine rows): np.zeros / a new sparse file."""
        self.arrays = {}
        if self.bank.storage == "host":
            for name, (dtype, shape) in self._specs().items():
                self.arrays[name] = anon_zeros(shape, dtype)  # pages cost RSS only once written
        else:
            path = self.file
            if os.path.exists(path):
                os.unlink(path)  # never reuse: a live file is scratch state, checkpoints hold the truth
            bank_io.create_safetensors(path, self._specs(), {"level": self.level, "k": self.bank.k})
            self.arrays, _ = bank_io.open_safetensors(path, "r+", random_access=True)
        self.dirty[:] = False

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())

    # ---- addressing -----------------------------------------------------------------------------
    def local(self, rows: np.ndarray) -> np.ndarray:
        top = rows // self.block
        pos = self.top_pos[top]
        if (pos < 0).any():
            bad = int(rows[pos < 0][0])
            raise DataError(f"OffloadedBank: rank {self.bank.rank}/{self.bank.world_size} fetched level-{self.level} "
                             f"node {bad} of top-level cluster {bad // self.block}, owned by rank "
                             f"{owner_of(bad // self.block, self.bank.world_size)} (cluster-affine loading must give "
                             f"each rank only rows of its own subtrees: memory.row_store.affine_rows)")
        return pos * self.block + (rows - top * self.block)

    def owned(self, rows: np.ndarray) -> np.ndarray:
        return self.top_pos[rows // self.block] >= 0

    # ---- reads (lazy init) -------------------------------------------------------------------------
    def init_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Deterministic fresh values of never-written rows: M1, M2 ~ N(0, std) per (seed, level, row), M3 = 0."""
        b = self.bank
        shape = (b.n_mem, 3, self.width, b.d)
        g = torch.Generator()
        for i, row in enumerate(rows):
            g.manual_seed(row_seed(b.seed, self.level, int(row)))
            x = torch.zeros(shape)
            x[:, :2].normal_(0.0, b.init_std, generator=g)
            out[i] = x.reshape(-1).numpy()

    def read_np(self, name: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows (global ids, sorted) of fp32 array `name` ("w", "exp_avg", "exp_avg_sq") -> [len(rows), row_dim].

        Only materialised rows are read from the store. A never-written row (`init == 0`) holds zeros
        there: its weights are the lazy initialisation and its moments zero, produced without touching
        the store, so a fresh row of a memory-mapped bank costs no page fault (reading a hole of a sparse
        file allocates zero-filled page-cache pages) and no RSS."""
        loc = self.local(rows)
        arr = self.arrays[name]
        if out is None:
            out = np.empty((len(rows), self.row_dim), np.float32)
        fresh = self.arrays["init"][loc] == 0
        if not fresh.any():
            np.take(arr, loc, axis=0, out=out)
            return out
        if not fresh.all():
            out[~fresh] = np.take(arr, loc[~fresh], axis=0)
        if name == "w":
            tmp = np.empty((int(fresh.sum()), self.row_dim), np.float32)
            self.init_rows(rows[fresh], tmp)
            out[fresh] = tmp
        else:
            out[fresh] = 0.0
        return out

    def read_range(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) (global ids inside one owned top cluster) as stored (for checkpoints)."""
        la = int(self.local(np.array([a]))[0])
        return np.asarray(self.arrays[name][la:la + (b - a)])

    # ---- row-store protocol (memory.sparse_adam) ---------------------------------------------------
    def read_rows(self, rows: np.ndarray):
        b = self.bank
        out = [b._to_device(b.prefetcher.read(self.level, name, rows)) for name in ROW_FLOATS]
        step = torch.from_numpy(np.asarray(self.arrays["step"][self.local(rows)]))
        return (*out, step)

    def write_rows(self, rows: np.ndarray, w, m, v, step) -> None:
        loc = self.local(rows)
        for name, t in zip(ROW_FLOATS, (w, m, v)):
            self.arrays[name][loc] = t.detach().to("cpu", torch.float32).numpy()
        self.arrays["step"][loc] = step.cpu().numpy()
        self.arrays["init"][loc] = 1
        self.dirty[loc] = True
        self.bank.prefetcher.mark_stale(self.level, rows)


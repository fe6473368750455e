"""Reading an offloaded bank's rows ahead of time: `RowPrefetcher` (a background thread that reads the
next batch's rows and their optimizer state) and `PrefetchingLoader` (a loader wrapper that tells the
bank which batch comes next).

Consistency: a prefetch job is registered *before* it starts, and every row the optimizer writes
afterwards is recorded as stale in it; a stale row is re-read from the store when the prefetched copy is
used, so a prefetch never serves old values (bit-identical to reading without prefetch).
"""
from __future__ import annotations

import concurrent.futures

import numpy as np

from memory.row_store import ROW_FLOATS, LevelStore

_KEEP_JOBS = 3  # prefetches kept: the next batch's, plus the micro-batches of gradient accumulation


class _Prefetched:
    """Rows of one future batch read on the background thread (per level: sorted ids -> arrays)."""

    def __init__(self, rows: list[np.ndarray | None]):
        self.rows = rows
        self.stale: list[set] = [set() for _ in rows]
        self.future: concurrent.futures.Future | None = None


class RowPrefetcher:
    """Per-level rows read on `workers` background threads, served to the bank's reads.

    stores: the bank's LevelStores (level l is stores[l-1]). buffer(n, dim) -> fp32 array [n, dim] (pinned
    when the bank lives on CUDA); pinned() -> bool. workers=0: no thread, every read goes to the store.
    """

    def __init__(self, stores: list[LevelStore], workers: int, buffer, pinned):
        self.stores, self._buffer, self._pinned = stores, buffer, pinned
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "bank-prefetch") if workers else None
        self._jobs: list[_Prefetched] = []
        self.stats = {"prefetch_hits": 0, "prefetch_misses": 0, "stale_rereads": 0}

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    def submit(self, rows: list[np.ndarray | None]) -> None:
        """rows[l]: sorted unique global row ids of level l+1 owned by this rank (None: nothing to read)."""
        if self._pool is None:
            return
        job = _Prefetched(rows)  # registered before it starts: later writes are recorded as stale
        self._jobs.append(job)
        del self._jobs[:-_KEEP_JOBS]
        job.future = self._pool.submit(self._job, rows)

    def _job(self, rows):
        out = []
        for store, r in zip(self.stores, rows):
            if r is None:
                out.append(None)
                continue
            out.append({name: store.read_np(name, r, self._buffer(len(r), store.row_dim)) for name in ROW_FLOATS})
        return out

    def mark_stale(self, level: int, rows: np.ndarray) -> None:
        """The optimizer wrote `rows` of `level`: prefetched copies of them are out of date."""
        for job in self._jobs:
            job.stale[level - 1].update(rows.tolist())

    def read(self, level: int, name: str, rows: np.ndarray, consume: bool = False) -> np.ndarray:
        """Array `name` of `rows` (sorted global ids) of `level`: from the newest prefetch holding all of them
        (stale rows re-read), else from the store. consume: drop older prefetches (their batches are done)."""
        store = self.stores[level - 1]
        for j in range(len(self._jobs) - 1, -1, -1):
            job = self._jobs[j]
            have = job.rows[level - 1]
            if have is None or not np.isin(rows, have).all():
                continue
            data = job.future.result()[level - 1]
            out = data[name][np.searchsorted(have, rows)]
            if self._pinned():
                buf = self._buffer(len(rows), store.row_dim)
                buf[...] = out
                out = buf
            stale = job.stale[level - 1]
            if stale:
                mask = np.isin(rows, np.fromiter(stale, np.int64, len(stale)))
                if mask.any():
                    out[mask] = store.read_np(name, rows[mask])
                    self.stats["stale_rereads"] += int(mask.sum())
            if consume:
                del self._jobs[:j]  # older prefetches are for batches already trained
            self.stats["prefetch_hits"] += 1
            return out
        self.stats["prefetch_misses"] += 1
        return store.read_np(name, rows, self._buffer(len(rows), store.row_dim))

    def clear(self) -> None:
        """Forget every prefetch (the stores were replaced, e.g. by a checkpoint load)."""
        self._jobs.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class PrefetchingLoader:
    """Iterate a loader one batch ahead and hand the next batch's `mem_path` to `bank.prefetch`, so the
    next step's rows are read from host/disk while the current step computes."""

    def __init__(self, loader, bank):
        self.loader, self.bank = loader, bank

    def __iter__(self):
        it = iter(self.loader)
        try:
            nxt = next(it)
        except StopIteration:
            return
        while True:
            cur = nxt
            try:
                nxt = next(it)
            except StopIteration:
                nxt = None
            if nxt is not None and nxt.get("mem_path") is not None:
                self.bank.prefetch(nxt["mem_path"])
            yield cur
            if nxt is None:
                return

    def __getattr__(self, name):  # state_dict() etc. of the wrapped loader
        return getattr(self.loader, name)

"""Cluster-affine batches for multi-process training with an offloaded bank (memory/row_store.py).

The bank is not replicated: top-level cluster c belongs to rank c % world_size, which stores and trains
only the rows of its subtrees. `AffinePackedDataset` is PackedDataset (by_leaf=True) with one change:
instead of dealing the epoch's rows round-robin to ranks, rank r takes, in the same shuffled plan
order, the rows whose leaf lies under a top-level cluster it owns. Ranks still see disjoint rows (the
union is the epoch), each rank runs its own epoch length (clusters differ in size; an infinite train
stream just rolls over), and resume works as before (the position is this rank's batch count).
"""
from __future__ import annotations

import numpy as np

from model.errors import ConfigError

from data.loader import PackedDataset, collate, too_few_rows_fix


def owner_of(top_cluster, world_size: int):
    """Rank owning top-level cluster(s) c: c % world_size (the same rule as memory.row_store.owner_of)."""
    return top_cluster % world_size


class AffinePackedDataset(PackedDataset):
    def __init__(self, data_dir, split: str = "train", seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                 rank: int = 0, world_size: int = 1, calls: str | None = None, by_leaf: bool = True, **kw):
        if not by_leaf:
            raise ConfigError("AffinePackedDataset needs by_leaf=True (a row must belong to one subtree); "
                             "set data.by_leaf=true")
        # The parent checks its own (round-robin) row count; ours is computed below.
        super().__init__(data_dir, split, seq_len, batch_size, seed, rank, world_size, calls, True, **kw)
        owners = owner_of(self.leaves[:, 0], self.world_size)
        self.owned_group = owners == self.rank
        group_rows = np.bincount(self.w_group, weights=self.w_len, minlength=len(self.leaves)).astype(np.int64) \
            // self.seq_len
        # every rank's row count, not only ours: all ranks reach the same verdict and raise the same error (one
        # rank failing alone leaves the others in a collective, and torchrun buries its line in tracebacks)
        rows = np.bincount(owners, weights=group_rows, minlength=self.world_size).astype(np.int64)
        self.rows_per_rank = int(rows[self.rank])
        self.batches_per_epoch = self.rows_per_rank // self.batch_size
        short = np.flatnonzero(rows < self.batch_size)
        if short.size:
            r = int(short[0])
            tops = sorted({int(t) for t in self.leaves[owners == r, 0]})
            raise ConfigError(f"{self.data.path}: split {split!r}: rank {r}/{world_size} owns top-level clusters "
                              f"{tops}, which pack into {rows[r]} rows of {seq_len} tokens, fewer than "
                              f"batch_size={batch_size}; {too_few_rows_fix(split)}")
        self._mine_epoch, self._mine = None, None

    def _my_rows(self, epoch: int) -> np.ndarray:
        if self._mine_epoch != epoch:
            _, _, row_group, _ = self._epoch_plan(epoch)
            self._mine_epoch, self._mine = epoch, np.flatnonzero(self.owned_group[row_group])
        return self._mine

    def batch(self, epoch: int, k: int) -> dict:
        rows = self._my_rows(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        return collate([self._row(epoch, int(r)) for r in rows])

    def epoch_rows(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "affine": True}

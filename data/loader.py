"""Packed, deterministic, resumable batches from a data dir.

Row plan (per epoch, from the seed): the split's windows are shuffled and concatenated; row r is the
token range [r*T, (r+1)*T) of that stream, so a window longer than what remains of a row continues
in the next row (it then acts as two documents). With `by_leaf=True` the windows are grouped by
their cluster path (`SHARD.paths.npy`), each leaf is packed on its own, and the rows of all leaves
are shuffled: every row holds windows of one leaf. Leftover tokens (< T per stream) are dropped.

Distribution: the epoch's rows are dealt to ranks by global index (row i -> rank i % world_size; every
rank keeps the same number of rows), each rank groups consecutive rows of its own into batches of
`batch_size`, and DataLoader workers take batches round-robin (batch k -> worker k % num_workers),
which is exactly the order in which `DataLoader(batch_size=None)` collects them. So ranks and
workers see disjoint rows whose union is the epoch (minus the dropped remainder, see `epoch_rows`).

Resume: the position is (epoch, batches_done) on this rank. With num_workers=0 the dataset counts
what it yields; with workers, iterate through `PackedLoader` (make_loader), which counts in the main
process, or restore from a count you kept: `ds.load_state_dict(ds.state_at(n_batches_consumed))`.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.errors import CheckpointError, ConfigError, check_range
from model.loss import IGNORE_INDEX

from data.shards import DataDir, ShardError, open_data


def collate(rows: list[dict]) -> dict:
    """Stack B row dicts (numpy, see `PackedDataset._row`) into the batch dict of torch tensors:
    input_ids int64 [B, T], labels int64 [B, T] (IGNORE_INDEX where no target, the <CALL> id where
    delegated), doc_lens int64 [B, max docs per row] (segment lengths in tokens, zero-padded; each row's
    sum is T), mem_path int64 [B, n_levels] (n_levels = 0 before clustering), and row_ids int64 [B]
    when the rows carry them."""
    max_docs = max(len(r["doc_lens"]) for r in rows)
    doc_lens = np.zeros((len(rows), max_docs), dtype=np.int64)
    for i, r in enumerate(rows):
        doc_lens[i, : len(r["doc_lens"])] = r["doc_lens"]
    out = {
        "input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows])),
        "labels": torch.from_numpy(np.stack([r["labels"] for r in rows])),
        "doc_lens": torch.from_numpy(doc_lens),
        "mem_path": torch.from_numpy(np.stack([r["mem_path"] for r in rows])),
    }
    if "row_id" in rows[0]:
        out["row_ids"] = torch.tensor([r["row_id"] for r in rows], dtype=torch.int64)
    return out


def too_few_rows_fix(split: str) -> str:
    """What to change when a split packs into too few rows for a batch on every rank."""
    fix = "lower data.batch_size or data.seq_len, or train with fewer processes"
    return fix + (", or switch validation off with trainer.val_every=0" if split == "val" else
                  ", or prepare more data")


def _router_k(path: str) -> int | None:
    """The branching of the data's router (DATA/router.json), or None without one."""
    try:
        with open(os.path.join(path, "router.json"), encoding="utf-8") as f:
            return int(json.load(f)["k"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PackedDataset(IterableDataset):
    """Stateful iterable of packed batches (dicts of tensors, see CONTRACTS.md "Batches").

    infinite: loop over epochs forever (default for train) or stop after one epoch (val).
    return_row_ids: add `row_ids` [B] (index of each row in the epoch plan), for tests/debugging.
    """

    def __init__(self, data_dir, split: str = "train", seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                 rank: int = 0, world_size: int = 1, calls: str | None = None, by_leaf: bool = False,
                 shuffle: bool = True, infinite: bool | None = None, return_row_ids: bool = False):
        super().__init__()
        self.data = data_dir if isinstance(data_dir, DataDir) else open_data(str(data_dir))
        self.split, self.seq_len, self.batch_size, self.seed = split, int(seq_len), int(batch_size), int(seed)
        self.rank, self.world_size, self.calls, self.by_leaf = int(rank), int(world_size), calls, by_leaf
        self.shuffle, self.return_row_ids = shuffle, return_row_ids
        self.infinite = (split == "train") if infinite is None else infinite
        check_range("seq_len", self.seq_len, min=2)
        check_range("batch_size", self.batch_size, min=1)
        check_range("world_size", self.world_size, min=1)
        check_range("rank", self.rank, min=0, max=self.world_size - 1)
        man = self.data.manifest
        self.call_id = man["special_ids"]["call"]
        self.vocab_size = int(man["vocab_size"])
        self.shards = self.data.shards(split)
        if not self.shards:
            raise ShardError(f"{self.data.path}: split {split!r} has no shards (no documents went to it; "
                             "prepare with a larger --val-fraction or more documents)")
        self.tokens = [s.tokens for s in self.shards]
        # the window index: window w of the split is tokens[w_shard[w]][w_start[w] : w_start[w] + w_len[w]]
        # (w_shard int32, w_start and w_len int64 [n_windows], in tokens), w_path int64 [n_windows, n_levels]
        w_shard, w_start, w_len = [], [], []
        for i, s in enumerate(self.shards):
            off = s.windows
            w_shard.append(np.full(len(off) - 1, i, dtype=np.int32))
            w_start.append(off[:-1])
            w_len.append(np.diff(off))
        self.w_shard, self.w_start, self.w_len = (np.concatenate(a) for a in (w_shard, w_start, w_len))
        n_levels = man.get("n_levels") or 0
        if n_levels and all(s.has_array("paths") for s in self.shards):
            self.w_path = np.concatenate([np.asarray(s.paths, dtype=np.int64) for s in self.shards])
            k = _router_k(self.data.path)
            for s in self.shards:  # a damaged paths.npy would fetch memories that do not exist
                p = np.asarray(s.paths)
                if p.size and (p.min() < 0 or (k and p.max() >= k)):
                    raise ShardError(f"{s.file('paths.npy')}: cluster ids outside 0..{k - 1 if k else '?'} (damaged); "
                                     f"run `memlm cluster {self.data.path} --refit` again")
        else:
            self.w_path = np.zeros((len(self.w_len), 0), dtype=np.int64)
        if by_leaf and self.w_path.shape[1] == 0:
            raise ConfigError(f"{self.data.path}: by_leaf=True needs cluster paths ({split}/*.paths.npy); "
                             "run `memlm cluster` first")
        self.calls_arrays = [s.array(calls) for s in self.shards] if calls else None
        # groups of windows packed together: one per leaf, or everything
        if by_leaf:
            self.leaves, self.w_group = np.unique(self.w_path, axis=0, return_inverse=True)
            self.w_group = self.w_group.reshape(-1)
        else:
            self.leaves = np.zeros((1, self.w_path.shape[1]), dtype=np.int64)
            self.w_group = np.zeros(len(self.w_len), dtype=np.int64)
        group_tokens = np.bincount(self.w_group, weights=self.w_len, minlength=len(self.leaves)).astype(np.int64)
        self.n_rows = int((group_tokens // self.seq_len).sum())  # same every epoch
        self.rows_per_rank = self.n_rows // self.world_size
        self.batches_per_epoch = self.rows_per_rank // self.batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{self.data.path}: split {split!r} packs into {self.n_rows} rows of {seq_len} tokens, "
                             f"fewer than batch_size*world_size = {self.batch_size * self.world_size}; "
                             f"{too_few_rows_fix(split)}")
        self._epoch, self._batch = 0, 0
        self._plan_epoch, self._plan = None, None

    # --- plan -------------------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int):
        """(orders, cums, row_group, row_local) for an epoch; cached for the last epoch asked."""
        if self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        orders, cums, rg, rl = [], [], [], []
        for g in range(len(self.leaves)):
            idx = np.flatnonzero(self.w_group == g)
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            cum = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(self.w_len[idx], out=cum[1:])
            orders.append(idx)
            cums.append(cum)
            n = int(cum[-1] // self.seq_len)
            rg.append(np.full(n, g, dtype=np.int64))
            rl.append(np.arange(n, dtype=np.int64))
        row_group, row_local = np.concatenate(rg), np.concatenate(rl)
        if self.shuffle and len(self.leaves) > 1:
            p = rng.permutation(len(row_group))
            row_group, row_local = row_group[p], row_local[p]
        self._plan_epoch, self._plan = epoch, (orders, cums, row_group, row_local)
        return self._plan

    def epoch_rows(self) -> int:
        """Rows of the plan used per epoch over all ranks (row ids 0..epoch_rows()-1)."""
        return self.batches_per_epoch * self.batch_size * self.world_size

    def row_segments(self, epoch: int, row_id: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(group, [(window, start, end), ...]) of a row: token ranges within windows, in row order."""
        orders, cums, row_group, row_local = self._epoch_plan(epoch)
        g, r = int(row_group[row_id]), int(row_local[row_id])
        cum, order, T = cums[g], orders[g], self.seq_len
        a, b = r * T, (r + 1) * T
        i0 = int(np.searchsorted(cum, a, side="right")) - 1
        i1 = int(np.searchsorted(cum, b, side="left"))
        segs = []
        for i in range(i0, i1):
            c = int(cum[i])
            segs.append((int(order[i]), max(a - c, 0), min(b, int(cum[i + 1])) - c))
        return g, segs

    def _row(self, epoch: int, row_id: int) -> dict:
        """One packed row of T = seq_len tokens: input_ids int64 [T]; labels int64 [T], the next token
        inside each segment, IGNORE_INDEX at a segment's last token (no target across a document or
        window boundary), the <CALL> id where the `calls` array delegates the target token; doc_lens
        int64 [n_segments] (tokens per segment, summing to T); mem_path int64 [n_levels]."""
        g, segs = self.row_segments(epoch, row_id)
        T = self.seq_len
        ids = np.empty(T, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        doc_lens, pos, best, best_w = [], 0, -1, segs[0][0]
        for w, s0, s1 in segs:
            n = s1 - s0
            sh, start = int(self.w_shard[w]), int(self.w_start[w]) + s0
            seg = self.tokens[sh][start:start + n]
            if n and int(seg.max()) >= self.vocab_size:  # a damaged shard (sizes intact): name it, not an IndexError
                raise self.shards[sh]._bad("tokens.bin", f"token id {int(seg.max())} >= the vocabulary's "
                                           f"{self.vocab_size} (the file is damaged)")
            ids[pos:pos + n] = seg
            labels[pos:pos + n - 1] = seg[1:]
            if self.calls_arrays is not None and n > 1:
                delegated = np.asarray(self.calls_arrays[sh][start + 1:start + n]) != 0
                labels[pos:pos + n - 1][delegated] = self.call_id
            doc_lens.append(n)
            if n > best:
                best, best_w = n, w
            pos += n
        assert pos == T, (pos, T)
        # mem_path: the row's leaf (by_leaf), else the path of the window with most tokens in the row
        mem_path = self.leaves[g] if self.by_leaf else self.w_path[best_w]
        row = {"input_ids": ids, "labels": labels, "doc_lens": np.asarray(doc_lens, dtype=np.int64),
               "mem_path": np.asarray(mem_path, dtype=np.int64)}
        if self.return_row_ids:
            row["row_id"] = row_id
        return row

    def batch(self, epoch: int, k: int) -> dict:
        """Batch k (0-based) of this rank in an epoch."""
        first = k * self.batch_size
        rows = [self._row(epoch, self.rank + self.world_size * (first + i)) for i in range(self.batch_size)]
        return collate(rows)

    # --- iteration and state ----------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        n_workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, k = self._epoch, self._batch
        n = 0  # batches since the start position; worker `n % n_workers` yields batch n
        while True:
            while k < self.batches_per_epoch:
                if n % n_workers == wid:
                    b = self.batch(epoch, k)
                    if info is None:  # in-process: count consumption here (workers: PackedLoader counts)
                        self._advance()
                    yield b
                n += 1
                k += 1
            if not self.infinite:
                return
            epoch, k = epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _advance(self) -> None:
        self._batch += 1
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0

    def _fingerprint(self) -> dict:
        return {"split": self.split, "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "by_leaf": self.by_leaf, "n_rows": self.n_rows,
                "tokenizer_hash": self.data.manifest["tokenizer_hash"]}

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._batch, **self._fingerprint()}

    def state_at(self, n_batches: int) -> dict:
        """State after consuming n_batches on this rank from the very start (epoch 0, batch 0)."""
        return {"epoch": n_batches // self.batches_per_epoch, "batches_done": n_batches % self.batches_per_epoch,
                **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mismatch = {k: (state.get(k), v) for k, v in self._fingerprint().items() if k in state and state[k] != v}
        if mismatch:
            raise CheckpointError(f"data state does not match this loader (saved, now): {mismatch}; "
                             "exact resume needs the same data, seq_len, batch_size, seed and world size")
        self._epoch, self._batch = int(state["epoch"]), int(state["batches_done"])
        if not 0 <= self._batch < self.batches_per_epoch:
            raise CheckpointError(f"data state batches_done={self._batch} out of range [0, {self.batches_per_epoch})")


class PackedLoader:
    """DataLoader(batch_size=None) over a PackedDataset that tracks the position in the main process.

    `state_dict()` is exact even with worker processes: it counts the batches handed to the caller.
    """

    def __init__(self, dataset: PackedDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor

    def __iter__(self):
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                        **kw)
        for batch in dl:
            if self.num_workers:
                self.dataset._advance()
            yield batch

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def make_loader(data_dir, split: str = "train", seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                rank: int = 0, world_size: int = 1, num_workers: int = 0, calls: str | None = None,
                by_leaf: bool = False, **kw) -> PackedLoader:
    """A PackedLoader; kw go to PackedDataset (shuffle, infinite, return_row_ids) or the DataLoader."""
    dl_kw = {k: kw.pop(k) for k in ("pin_memory", "prefetch_factor") if k in kw}
    ds = PackedDataset(data_dir, split, seq_len, batch_size, seed, rank, world_size, calls, by_leaf, **kw)
    return PackedLoader(ds, num_workers=num_workers, **dl_kw)

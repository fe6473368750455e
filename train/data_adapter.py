"""The training side of data/loader.py: datasets positioned for exact resume."""
from __future__ import annotations

from torch.utils.data import IterableDataset

from data.loader import PackedDataset


class EndlessBatches(IterableDataset):
    """A train PackedDataset (infinite) seen through an iterable WITHOUT __len__, so Lightning runs one
    endless epoch that max_steps ends (a sized loader would make Lightning restart iteration at its own
    epoch ends). DataLoader workers each get a copy positioned at the same start batch; the dataset
    deals batches to workers round-robin, which is the order DataLoader collects them in."""

    def __init__(self, dataset: PackedDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()


class OnePass(IterableDataset):
    """The val PackedDataset from its first batch on every iteration: the same rows at every validation.
    (With num_workers=0 the dataset counts what it yields in-process, so it must be rewound.)"""

    def __init__(self, dataset: PackedDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        self.dataset.load_state_dict(self.dataset.state_at(0))
        return iter(self.dataset)


def make_dataset(cfg, split: str, rank: int, world_size: int, start_batch: int = 0, state: dict | None = None):
    """Train: endless batches starting after `start_batch` batches of this rank (the resume position).
    Val: one pass over the val split from its start (the same rows every validation)."""
    d = cfg.data
    if not d.path:
        raise SystemExit("memlm pretrain: data.path is not set (a data dir from `memlm prepare`)")
    train = split == "train"
    cls = PackedDataset
    if world_size > 1 and getattr(cfg.memory, "storage", "resident") != "resident":
        # offloaded bank across ranks (issue "scale"): each rank stores and trains only its own subtrees,
        # so it must get rows of those subtrees only (cluster-affine loading, data/affine.py)
        from data.affine import AffinePackedDataset as cls
    by_leaf = d.by_leaf if d.by_leaf is not None else cfg.memory is not None  # null = auto: on with memory (issue 5)
    ds = cls(d.path, split, seq_len=d.seq_len, batch_size=d.batch_size, seed=cfg.seed, rank=rank,
             world_size=world_size, calls=d.calls, by_leaf=by_leaf, shuffle=train, infinite=train)
    if not train:
        return OnePass(ds)
    if start_batch:
        ds.load_state_dict(ds.state_at(start_batch))
    return EndlessBatches(ds)

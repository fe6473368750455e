"""Memory banks: where the per-node FFN blocks live and how a batch's blocks are fetched.

Layout. Levels are numbered l = 1..L; level l has k**l nodes. A row's path (n_1, ..., n_L), each
n_i in [0, k), selects one node per level; the node id at level l is the path prefix read as a
base-k number:

    node_id(l) = sum_{i=1..l} n_i * k**(l - i)        (e.g. k=16: level 2 node of (3, 5) = 3*16 + 5 = 53)

so the children of node j at level l are j*k .. j*k + k-1 at level l+1. One node's block is one "row"
of its level: for every memory layer, M1 and M2 ([r_l, d]) and M3 stored transposed ([r_l, d]):

    level tensor [n_nodes_l, n_mem_layers, 3, r_l, d]     (index 0: M1, 1: M2, 2: M3^T)

A row is contiguous, which is what offloaded / memory-mapped banks (issue "scale") want.

Interface. `Bank` (below) declares every operation the trainer, checkpointing and evaluation call on
a bank, so callers never probe with hasattr. A bank implements two methods and inherits `fetch`:
    gather(node_ids: list[LongTensor [U] per level]) -> Tensor [U, n_mem_layers, 3, R, d]
    generic_block() -> Tensor [1, n_mem_layers, 3, R, d]
`fetch(mem_path, use_generic)` finds the unique paths once, gathers them, appends the generic block
(block U), and returns a `FetchedBlocks`: a list per model layer of `MemoryBlock | None`.
The rest has neutral defaults (a resident bank's rows are ordinary parameters: the dense optimizer
trains them and model.safetensors holds them); `memory.offload.OffloadedBank` overrides them:
    sparse                       True: rows are trained by memory.sparse_adam.SparseBankOptimizer
    row_grads() / clear_grads()  the fetched rows' gradients, for that optimizer
    count_tokens(n_tokens)       target tokens per node of the last training fetch
    prefetch(mem_path)           start reading a future batch's rows
    save_checkpoint(bank_dir) / load_checkpoint(bank_dir) / has_checkpoint(step_dir)
    close()                      stop background work, flush files
"""
from __future__ import annotations

import abc
import os

import torch
from torch import nn

from memory.config import MemoryConfig
from model.errors import ConfigError, DataError
from model.model import MemoryBlock


class FetchedBlocks(list):
    """List (one entry per model layer) of MemoryBlock or None, plus what was fetched.

    unique_paths [U, L] (the paths gathered, in block order; the generic block is block U),
    block_of_row [B] (index into the blocks for each row), generic_rows [B] bool, and `blocks`, the
    gathered tensor [U + 1, n_mem_layers, 3, R, d] the per-layer views were cut from (a sparse
    optimizer of an offloaded bank can read the gradient of what `gather` returned).
    """

    def __init__(self, layers, unique_paths, block_of_row, generic_rows, blocks=None):
        super().__init__(layers)
        self.blocks = blocks
        self.unique_paths = unique_paths
        self.block_of_row = block_of_row
        self.generic_rows = generic_rows


def node_ids(paths: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Per level l (1..L), the node id of each path's prefix of length l: [U] int64 each."""
    ids, acc = [], torch.zeros(paths.shape[0], dtype=torch.long, device=paths.device)
    for l in range(paths.shape[1]):
        acc = acc * k + paths[:, l].long()
        ids.append(acc)
    return ids


CHECKPOINT_SUBDIR = "bank"  # <step dir>/bank/: an offloaded bank's rows (memory/bank_io.py format)


class Bank(nn.Module, abc.ABC):
    """Base class of memory banks: ResidentBank (parameters on one device) and
    memory.offload.OffloadedBank (rows in host memory or memory-mapped files)."""

    sparse: bool = False  # True: the rows are trained by SparseBankOptimizer, not by the dense optimizer

    def __init__(self, mem_cfg: MemoryConfig, model_cfg):
        super().__init__()
        self.mem_cfg = mem_cfg
        self.k = mem_cfg.k
        self.widths = tuple(mem_cfg.widths)
        self.n_levels = len(self.widths)
        self.n_layer = int(model_cfg.n_layer)
        self.d = int(model_cfg.n_embd)
        self.layer_ids = mem_cfg.validate(model_cfg)
        self.R = sum(self.widths)

    # ---- to implement ----------------------------------------------------------------------
    @abc.abstractmethod
    def gather(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """ids[l]: node ids [U] at level l+1 -> blocks [U, n_mem_layers, 3, R, d] (levels concatenated)."""

    @abc.abstractmethod
    def generic_block(self) -> torch.Tensor:
        """The generic block [1, n_mem_layers, 3, R, d]."""

    # ---- training, checkpoints, lifetime: neutral defaults (a resident bank needs none) -------
    def row_grads(self) -> list:
        """Gradients of the rows fetched since `clear_grads`, for SparseBankOptimizer:
        [(key, row store, rows int64 [n] sorted global ids, grads fp32 [n, row_dim])]. [] when `sparse` is False."""
        return []

    def clear_grads(self) -> None:
        """Forget the fetched rows' gradients (after the sparse optimizer step)."""

    def count_tokens(self, n_tokens) -> None:
        """Add the target tokens of the last training fetch to its nodes' counters.
        n_tokens: int or [B] int (e.g. (labels != -100).sum(1))."""

    def prefetch(self, mem_path: torch.Tensor) -> None:
        """Start reading the rows of a future batch (mem_path [B, L] int64) in the background."""

    def save_checkpoint(self, bank_dir: str) -> dict | None:
        """Write the rows that model.safetensors does not hold into `bank_dir` (collective when distributed).
        Returns counts of files written, or None when there is nothing to write (resident bank)."""
        return None

    def load_checkpoint(self, bank_dir: str) -> None:
        """Replace the live rows by those of `bank_dir` (written by `save_checkpoint`)."""

    def has_checkpoint(self, step_dir: str) -> bool:
        """Whether the checkpoint `step_dir` holds rows for `load_checkpoint(step_dir/bank)`."""
        return False

    def close(self) -> None:
        """Stop background work and flush files; the bank is not used afterwards."""

    @staticmethod
    def checkpoint_dir(step_dir: str) -> str:
        """Where a checkpoint step dir keeps the bank's own files."""
        return os.path.join(step_dir, CHECKPOINT_SUBDIR)

    # ---- shared logic ----------------------------------------------------------------------
    def check_paths(self, mem_path: torch.Tensor) -> None:
        if mem_path.dim() != 2:
            raise DataError(f"mem_path must be [B, n_levels], got shape {tuple(mem_path.shape)}")
        if mem_path.shape[1] != self.n_levels:
            hint = " (data not clustered? run `memlm cluster DATA`)" if mem_path.shape[1] == 0 else ""
            raise DataError(f"mem_path has {mem_path.shape[1]} levels but the memory bank has "
                             f"{self.n_levels} (MemoryConfig.widths={self.widths}){hint}")
        if mem_path.numel() and (int(mem_path.min()) < 0 or int(mem_path.max()) >= self.k):
            raise DataError(f"mem_path entries must be in [0, k={self.k}) (the bank's branching), got "
                             f"min {int(mem_path.min())}, max {int(mem_path.max())}")

    def fetch(self, mem_path: torch.Tensor | None, use_generic: torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> FetchedBlocks:
        """Blocks for a batch. mem_path [B, L] int64 (None: every row generic; then `use_generic`
        must give B as a bool [B] tensor). use_generic [B] bool: rows that take the generic block.
        """
        if mem_path is None:
            if use_generic is None:
                raise ConfigError("fetch(None) needs use_generic [B] to know the batch size")
            use_generic = torch.ones_like(use_generic, dtype=torch.bool)
            B, device = use_generic.shape[0], use_generic.device
            mem_path = torch.zeros(B, self.n_levels, dtype=torch.long, device=device)
        else:
            self.check_paths(mem_path)
        B = mem_path.shape[0]
        if use_generic is None:
            use_generic = torch.zeros(B, dtype=torch.bool, device=mem_path.device)
        use_generic = use_generic.to(device=mem_path.device, dtype=torch.bool)

        # The generic block is always appended (as block U) even when no row uses it, and every level
        # is always gathered (even at width 0): every bank parameter is in the graph at every step, so
        # DDP needs no find_unused_parameters. Rows index their block, so the extra one costs nothing.
        keep = ~use_generic
        uniq, inverse = torch.unique(mem_path[keep], dim=0, return_inverse=True)
        block_of_row = torch.full((B,), uniq.shape[0], dtype=torch.long, device=mem_path.device)
        block_of_row[keep] = inverse
        blocks = torch.cat([self.gather(node_ids(uniq, self.k)), self.generic_block()], 0)
        if dtype is not None:
            blocks = blocks.to(dtype)
        return FetchedBlocks(self.split_layers(blocks, block_of_row), uniq, block_of_row, use_generic, blocks)

    def split_layers(self, blocks: torch.Tensor, block_of_row: torch.Tensor) -> list:
        """[U, n_mem, 3, R, d] -> list per model layer of MemoryBlock(m1, m2, m3 [U, d, R], block_of_row)."""
        out: list = [None] * self.n_layer
        block_of_row = block_of_row.to(blocks.device)
        for j, layer in enumerate(self.layer_ids):
            b = blocks[:, j]
            # Contiguous copies of the (small) fetched blocks: kernels want dense strides.
            out[layer] = MemoryBlock(b[:, 0].contiguous(), b[:, 1].contiguous(),
                                     b[:, 2].transpose(1, 2).contiguous(), block_of_row)
        return out

    def dense_extra(self, path) -> list:
        """Weights of one path's block per model layer, for a widened dense model / HF export:
        list per layer of (m1 [R, d], m2 [R, d], m3 [d, R]) or None (layer without memory)."""
        p = torch.as_tensor(path, dtype=torch.long).reshape(1, -1)
        self.check_paths(p)
        blocks = self.gather(node_ids(p.to(self._device()), self.k))[0]
        out: list = [None] * self.n_layer
        for j, layer in enumerate(self.layer_ids):
            out[layer] = (blocks[j, 0], blocks[j, 1], blocks[j, 2].t())
        return out

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def fetched_params(self) -> int:
        return 3 * len(self.layer_ids) * self.d * self.R

    def bank_params(self) -> int:
        return 3 * len(self.layer_ids) * self.d * sum(self.k ** (l + 1) * r for l, r in enumerate(self.widths))


class ResidentBank(Bank):
    """All levels as ordinary parameters on one device (small banks, tests, the CPU demo).

    Gathering with index_select means only the fetched rows get non-zero gradients; a dense
    optimizer still visits every row (weight decay included), which issue "scale" replaces with a
    sparse optimizer for large banks.
    """

    def __init__(self, mem_cfg: MemoryConfig, model_cfg):
        super().__init__(mem_cfg, model_cfg)
        n_mem = len(self.layer_ids)
        for l, r in enumerate(self.widths):
            # Zero-width levels keep an empty tensor so every level has a name (level1, level2, ...).
            self.register_parameter(f"level{l + 1}", nn.Parameter(torch.empty(self.k ** (l + 1), n_mem, 3, r, self.d)))
        self.generic = nn.Parameter(torch.empty(1, n_mem, 3, self.R, self.d))
        self.reset_parameters()

    def levels(self) -> list[nn.Parameter]:
        return [getattr(self, f"level{l + 1}") for l in range(self.n_levels)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.mem_cfg.init_std
        for w in [*self.levels(), self.generic]:
            nn.init.normal_(w[:, :, :2], mean=0.0, std=std)  # M1, M2
            w[:, :, 2].zero_()                               # M3 = 0: a fresh memory changes nothing

    def gather(self, ids: list[torch.Tensor]) -> torch.Tensor:
        parts = [w.index_select(0, i.to(w.device)) for w, i in zip(self.levels(), ids)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)

    def generic_block(self) -> torch.Tensor:
        return self.generic

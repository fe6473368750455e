"""Which bank a memory config asks for: `make_bank` (resident / host / mmap)."""
from __future__ import annotations

import shutil
import tempfile
import weakref

import torch

from memory.bank import Bank, ResidentBank
from memory.config import MemoryConfig
from memory.offload import OffloadedBank
from model.errors import ConfigError

STORAGES = ("resident", "host", "mmap")


def make_bank(mem_cfg: MemoryConfig, model_cfg, live_dir: str | None = None) -> Bank:
    """The bank `mem_cfg.storage` asks for: ResidentBank ("resident"), or an OffloadedBank in host memory
    ("host") or memory-mapped files ("mmap") under `live_dir` (the run's scratch dir for the live rows; a
    private temp dir, removed with the bank, when None, e.g. for inference). Seeded by torch's RNG.
    Raises ConfigError for an unknown storage."""
    storage = mem_cfg.storage
    if storage not in STORAGES:
        raise ConfigError(f"MemoryConfig.storage={storage!r}: expected one of {', '.join(STORAGES)}")
    if storage == "resident":
        return ResidentBank(mem_cfg, model_cfg)
    tmp = None
    if storage == "mmap" and live_dir is None:
        live_dir = tmp = tempfile.mkdtemp(prefix="memlm-bank-")
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # from the caller's seeded RNG: same on every rank
    bank = OffloadedBank(mem_cfg, model_cfg, storage=storage, path=live_dir, seed=seed,
                         prefetch_workers=1 if mem_cfg.prefetch else 0, shard_bytes=int(mem_cfg.shard_mb) << 20)
    if tmp is not None:
        weakref.finalize(bank, shutil.rmtree, tmp, True)
    return bank

"""Shared test setup: hermetic, offline, deterministic."""
import os
import sys
import tempfile

# Offline before anything imports transformers/datasets/wandb (a hub lookup would retry for ~48 s).
_wandb_dir = tempfile.mkdtemp(prefix="memlm-wandb-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": _wandb_dir,
    "WANDB_CACHE_DIR": _wandb_dir,
    "WANDB_CONFIG_DIR": _wandb_dir,
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads; on a loaded 2-core machine 2 threads made steps 15x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""memlm's top-level package names resolve to this installation, whatever the working directory holds.

memlm's packages (`data`, `model`, `memory`, `kernels`, `train`, `scripts`) have common folder and PyPI
names. `python -m train.pretrain` (and every torchrun worker) puts the working directory first on
`sys.path`, so a user's `./data` folder (prepared shards, or a package of their own) or an installed PyPI
`data` would be imported in place of ours. `claim()` puts a finder at the front of `sys.meta_path` that
resolves exactly these names and their submodules to this installation, and drops modules of these names
that an earlier import took from elsewhere; every other import is left alone. `train/__init__.py` and the
entry modules (train.pretrain, train.cli) call it before they import anything else of memlm.

What it cannot cover: `python -m train.pretrain` resolves `train` itself before any memlm code runs, so a
`./train` *package* (a folder with `__init__.py`) in the working directory, or a PyPI package named
`train`, wins; launch `memlm pretrain ...` / `torchrun ... --no-python memlm pretrain ...` from there
(README, "Launching from any directory").
"""
from __future__ import annotations

import importlib.machinery
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("model", "memory", "kernels", "data", "train", "scripts")


class MemlmPackages:
    """Meta-path finder: `data`, `data.tokenizer`, ... come from ROOT, before sys.path is searched."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] not in PACKAGES:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [os.path.join(ROOT, *parts[:-1])])

    @staticmethod
    def invalidate_caches():
        pass


def _is_ours(module, name: str) -> bool:
    spec = module.__spec__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    own = os.path.realpath(os.path.join(ROOT, name))
    return bool(locations) and all(os.path.realpath(p) == own for p in locations)


def claim() -> None:
    """Install the finder (once) and forget foreign modules of memlm's names (not `train`: it is running)."""
    if MemlmPackages not in sys.meta_path:
        sys.meta_path.insert(0, MemlmPackages)
    for name in PACKAGES:
        module = sys.modules.get(name)
        if module is not None and name != "train" and not _is_ours(module, name):
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]

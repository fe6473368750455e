"""memlm's top layer: the training loop, checkpointing, commands, LaCy pipeline, evaluation, experiments.

Importing it also makes memlm's top-level package names resolve to this installation, whatever the
working directory holds. memlm's packages (`data`, `model`, `memory`, `kernels`, `train`, `scripts`) have common folder and PyPI
names. `python -m train.pretrain` (and every torchrun worker) puts the working directory first on
`sys.path`, so a user's `./data` folder (prepared shards, or a package of their own) or an installed PyPI
`data` would be imported in place of ours. `claim()` puts a finder at the front of `sys.meta_path` that
resolves exactly these names and their submodules to this installation, and drops modules of these names
that an earlier import took from elsewhere; every other import is left alone. This module and the
entry modules (train.pretrain, train.cli) call it before they import anything else of memlm.

`python -m train.pretrain` resolves `train` itself before any memlm code runs, so for a `./train` *package*
(a folder with `__init__.py`) in the working directory, or a PyPI package named `train`, the finder must be
in place earlier: `scripts/setup_env.sh` calls `install_pth()`, which writes
`memlm-own-packages.pth` into the environment's site-packages; Python executes it at start-up (before `-m`
resolves its module) and it installs the same finder. A missing repository (moved or deleted) makes it do
nothing.
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
    # by name: the start-up hook loads this file as another module, with its own class object
    if not any(isinstance(f, type) and f.__name__ == MemlmPackages.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, MemlmPackages)
    for name in PACKAGES:
        module = sys.modules.get(name)
        if module is not None and name != "train" and not _is_ours(module, name):
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]


PTH_NAME = "memlm-own-packages.pth"


def pth_line(root: str = ROOT) -> str:
    """The start-up hook: one `import` line (what site.py executes in a .pth file) that loads this file by
    path and calls claim(); silent when the file is gone."""
    path = os.path.join(root, "train", "__init__.py")
    code = (f"import importlib.util as u, os\np = {path!r}\nif os.path.isfile(p):\n"
            "    s = u.spec_from_file_location('memlm_own_packages', p); m = u.module_from_spec(s)\n"
            "    s.loader.exec_module(m); m.claim()\n")
    return f"import sys; exec({code!r})\n"


def install_pth() -> str:
    """Write the start-up hook into this environment's site-packages (atomically); returns its path."""
    import sysconfig

    from model.atomic import atomic_write

    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    atomic_write(path, pth_line())
    return path


claim()

"""The documented launches (`python -m train.pretrain`, `torchrun -m train.pretrain`) work from a directory
that holds folders named like memlm's packages, and with foreign packages of those names importable,
without the repository on PYTHONPATH (memlm is found as installed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")
STEPS = 2


def _foreign(dir_: str, names) -> None:
    """Packages of memlm's names whose import fails loudly: importing one of them is the bug."""
    for name in names:
        os.makedirs(os.path.join(dir_, name), exist_ok=True)
        with open(os.path.join(dir_, name, "__init__.py"), "w") as f:
            f.write(f"raise ImportError('the foreign {name} package was imported instead of memlm\\'s')\n")


@pytest.fixture
def workdir(bios_data, tmp_path):
    """cwd: the user's prepared data in ./data (plus an __init__.py), foreign model/ memory/ kernels/
    scripts/ train/ packages; a 'site' dir of foreign packages (as if installed from PyPI) on PYTHONPATH;
    the repository is not on it. `python -m train.pretrain` then needs the start-up hook that
    scripts/setup_env.sh installs (train/__init__.py)."""
    from train import PTH_NAME

    import sysconfig
    assert os.path.isfile(os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)), \
        f"{PTH_NAME} is not installed in this environment: run `make setup` (scripts/setup_env.sh)"
    cwd = tmp_path / "work"
    shutil.copytree(bios_data, cwd / "data")
    _foreign(str(cwd), ["data", "model", "memory", "kernels", "scripts", "train"])
    site = tmp_path / "site"
    _foreign(str(site), ["data", "model", "memory", "kernels", "train"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return cwd, env


def _args(name: str) -> list[str]:
    kv = {"data.path": "data", "runs_dir": "runs", "name": name, "trainer.max_steps": STEPS, "data.seq_len": 32,
          "data.batch_size": 2, "optim.warmup_steps": 1, "trainer.log_every": 1, "trainer.val_every": 100,
          "checkpoint.every": 100, "logging.logger": "none"}
    return ["--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()]


def _losses(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_pretrain_launch_from_dir_with_package_named_folders(workdir, launcher):
    cwd, env = workdir
    head = [sys.executable, "-m", "train.pretrain"] if launcher == "python" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train.pretrain"]
    res = subprocess.run(head + _args(launcher), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "foreign" not in out
    assert _losses(cwd / "runs" / launcher) == list(range(1, STEPS + 1))
    assert os.path.isdir(cwd / "runs" / launcher / "checkpoints" / f"step-{STEPS:07d}")


def test_foreign_modules_imported_first_are_replaced(tmp_path):
    """A foreign `data` imported before memlm gives way to memlm's on `import train` (the start-up hook's finder
    removed, as in an environment without it); with the hook, `import data` is memlm's from the start."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / "data" / "__init__.py").write_text("FOREIGN = True\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    unhook = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if not str(f).endswith('.MemlmPackages\\'>')]; "
    want = os.path.realpath(os.path.join(ROOT, "data", "tokenizer.py"))
    for code in (unhook + "import data; assert data.FOREIGN; import train, data.tokenizer; print(data.tokenizer.__file__)",
                 "import data, data.tokenizer; assert not hasattr(data, 'FOREIGN'); print(data.tokenizer.__file__)"):
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert os.path.realpath(res.stdout.strip()) == want

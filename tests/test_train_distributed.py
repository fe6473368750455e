"""torchrun --nproc_per_node=2 (gloo, CPU) with batch b per rank == one process with batch 2b."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")
STEPS = 10


def _args(data, runs, name, batch):
    kv = {"data.path": data, "runs_dir": runs, "name": name, "trainer.max_steps": STEPS, "data.seq_len": 64,
          "data.batch_size": batch, "optim.warmup_steps": 3, "trainer.log_every": 1, "trainer.val_every": 5,
          "trainer.val_batches": 1, "checkpoint.every": 5, "logging.logger": "none"}
    return ["--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.distributed
def test_ddp_two_ranks_equals_one_process_double_batch(bios_data, tmp_path):
    runs = str(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "train.pretrain"]
    ddp = subprocess.Popen(torchrun + _args(bios_data, runs, "ddp", 2), cwd=ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([sys.executable, "-m", "train.pretrain", *_args(bios_data, runs, "single", 4)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    out, _ = ddp.communicate(timeout=300)
    assert single.returncode == 0, (single.stdout + single.stderr)[-3000:]
    assert ddp.returncode == 0, out[-4000:]
    assert "world 2" in out
    r1, r2 = _rows(os.path.join(runs, "single")), _rows(os.path.join(runs, "ddp"))
    l1 = {r["step"]: r for r in r1 if "loss" in r}
    l2 = {r["step"]: r for r in r2 if "loss" in r}
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for s in l1:
        assert abs(l1[s]["loss"] - l2[s]["loss"]) <= 1e-5, (s, l1[s]["loss"], l2[s]["loss"])
        assert l1[s]["lr"] == l2[s]["lr"] and l1[s]["tokens"] == l2[s]["tokens"]
    v1 = [r["val_loss"] for r in r1 if "val_loss" in r]
    v2 = [r["val_loss"] for r in r2 if "val_loss" in r]
    assert len(v1) == len(v2) == 2 and all(abs(a - b) <= 1e-5 for a, b in zip(v1, v2))
    # every rank wrote its data state into the shared checkpoint
    step = os.path.join(runs, "ddp", "checkpoints", f"step-{STEPS:07d}")
    for f in ("data_state_rank0.json", "data_state_rank1.json", "rng_rank1.pt", "model.safetensors", "meta.json"):
        assert os.path.exists(os.path.join(step, f)), f

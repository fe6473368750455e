"""Offloaded banks in the real pipeline: cluster-affine loading, `memlm bank-info`, and `train.pretrain`
with memory.storage=mmap (bank/ checkpoints, exact resume)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _bank_crash_worker import save, setup
from _bank_harness import Net, make_optimizers, train
from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")


def _fake_clustered(src: str, dst: str, k: int = 2, levels: int = 2) -> str:
    """A copy of a data dir with random cluster paths and a random router of the same shape (what
    `memlm cluster` stores), no MiniLM needed."""
    from data.shards import open_data
    from memory.router import Router

    shutil.copytree(src, dst)
    dd = open_data(dst)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sh in dd.shards(split):
            n = len(sh.windows) - 1
            sh.write_array("paths", rng.integers(0, k, size=(n, levels)).astype(np.int32))
    dd.update_manifest(n_levels=levels)
    cents = [rng.standard_normal((k ** (l + 1), 384)).astype(np.float32) for l in range(levels)]
    Router(cents, k).save(dst)
    return dst


def test_bank_info_reports_sizes_touched_rows_and_tokens(tmp_path, capsys):
    from train.commands.bank_info import main

    mem, lm, bank = setup(str(tmp_path / "live"))
    dense, dense_opt, bank_opt = make_optimizers(lm, bank)
    train(Net(lm), dense, dense_opt, bank_opt, steps=2, B=4, mem_cfg=mem, accumulate=1)
    save(bank, str(tmp_path / "ckpt"), 2)
    assert main([str(tmp_path / "ckpt" / "step-0000002"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [l["nodes"] for l in info["levels"]] == [4, 16, 64]
    assert [l["rows_touched"] for l in info["levels"]] == bank.touched_rows()
    assert [l["tokens"] for l in info["levels"]] == [int(s.arrays["tokens"].sum()) for s in bank.stores]
    assert info["total"]["params"] == bank.bank_params() and info["total"]["disk_allocated_bytes"] > 0
    assert main([str(tmp_path / "ckpt" / "step-0000002" / "bank")]) == 0  # the table
    assert "rows ever touched" in capsys.readouterr().out
    bank.close()


def test_affine_dataset_gives_each_rank_its_own_subtrees(tmp_path, bios_data):  # noqa: F811
    from data.affine import AffinePackedDataset

    data = _fake_clustered(bios_data, str(tmp_path / "data"), k=2)
    seen = []
    for rank in range(2):
        ds = AffinePackedDataset(data, "train", seq_len=64, batch_size=2, rank=rank, world_size=2, by_leaf=True,
                                 return_row_ids=True)
        rows = []
        for k in range(ds.batches_per_epoch):
            b = ds.batch(0, k)
            assert (b["mem_path"][:, 0] % 2 == rank).all()
            rows += b["row_ids"].tolist()
        seen.append(set(rows))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def _pretrain(data, runs, name, steps, every, rc=0, *extra):
    kv = {"data.path": data, "runs_dir": runs, "name": name, "trainer.max_steps": steps, "data.seq_len": 64,
          "data.batch_size": 4, "data.by_leaf": True, "optim.warmup_steps": 2, "trainer.log_every": 1,
          "trainer.val_every": 0, "checkpoint.every": every, "logging.logger": "none", "trainer.deterministic": True,
          "memory.k": 2, "memory.widths": "[8,4]", "memory.storage": "mmap", "memory.shard_mb": 1}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "train.pretrain", "--config", RECIPE,
                        *[f"{k}={v}" for k, v in kv.items()], *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == rc, p.stdout[-3000:] + p.stderr[-3000:]
    with open(os.path.join(runs, name, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_pretrain_with_mmap_bank_checkpoints_and_resumes_exactly(tmp_path, bios_data):  # noqa: F811
    from memory import bank_io

    data = _fake_clustered(bios_data, str(tmp_path / "data"))
    runs = str(tmp_path / "runs")
    straight = _pretrain(data, runs, "a", 4, 4)
    _pretrain(data, runs, "b", 4, 2)
    # again from the step-2 checkpoint: bank rows + AdamW state come back from step-2/bank/, and step-4
    # (whose bank shards are hard links into step-2's) is replaced by a new one
    resumed = _pretrain(data, runs, "b", 4, 2, 0, f"checkpoint.resume={runs}/b/checkpoints/step-0000002")
    for step in (3, 4):
        assert resumed[step] == straight[step], (step, resumed, straight)
    from model.weights import read_weights

    wa = read_weights(os.path.join(runs, "a", "checkpoints", "step-0000004", "model.safetensors"))
    wb = read_weights(os.path.join(runs, "b", "checkpoints", "step-0000004", "model.safetensors"))
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    bank_a = os.path.join(runs, "a", "checkpoints", "step-0000004", "bank")
    bank_b = os.path.join(runs, "b", "checkpoints", "step-0000004", "bank")
    for lv_a, lv_b in zip(bank_io.read_index(bank_a)["levels"], bank_io.read_index(bank_b)["levels"]):
        a = {e["file"]: arr for e, arr in bank_io.load_level_shards(bank_a, lv_a, None)}
        b = {e["file"]: arr for e, arr in bank_io.load_level_shards(bank_b, lv_b, None)}
        assert a.keys() == b.keys()
        for f in a:
            for name in ("w", "exp_avg_sq", "step", "tokens"):
                assert np.array_equal(a[f][name], b[f][name]), (f, name)
    steps = sum(int(np.asarray(arr["step"]).sum()) for lv in bank_io.read_index(bank_a)["levels"]
                for _, arr in bank_io.load_level_shards(bank_a, lv, None))
    assert steps > 0

"""Bank checkpoints: sharded safetensors + index, incremental (unchanged shards hard-linked), crash-safe."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from _bank_crash_worker import save, setup
from _bank_harness import Net, configs, make_optimizers, train
from memory import bank_io
from memory.bank import node_ids
from memory.offload import OffloadedBank
from model.errors import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))


def _snapshot(bank):
    return [{k: np.array(a) for k, a in s.arrays.items()} for s in bank.stores]


def _assert_same(bank, snap):
    for s, ref in zip(bank.stores, snap):
        for k, a in s.arrays.items():
            assert np.array_equal(np.asarray(a).view(np.uint8), ref[k].view(np.uint8)), (s.level, k)


def test_incremental_checkpoint_rewrites_only_changed_shards(tmp_path):
    mem, lm, bank = setup(str(tmp_path / "live"))
    dense, dense_opt, bank_opt = make_optimizers(lm, bank)
    train(Net(lm), dense, dense_opt, bank_opt, steps=3, B=4, mem_cfg=mem, accumulate=1)
    root = str(tmp_path / "ckpt")
    save(bank, root, 3)
    snap_a = _snapshot(bank)
    a_dir = os.path.join(root, "step-0000003", "bank")
    idx = bank_io.read_index(a_dir)
    files_a = {s["file"] for lv in idx["levels"] for s in lv["shards"]}
    assert len(files_a) > 3  # several shards per level with 8 KiB shards

    train(Net(lm), dense, dense_opt, bank_opt, steps=1, B=1, mem_cfg=mem, accumulate=1, first_step=3)
    tmp = os.path.join(root, "step-0000004.tmp")
    counts = bank.save_checkpoint(os.path.join(tmp, "bank"))  # prev = our last save, found after the rename
    os.replace(tmp, tmp[:-4])
    assert counts["linked"] > 0 and 0 < counts["written"] <= 3, counts  # one path: at most one shard per level
    b_dir = os.path.join(root, "step-0000004", "bank")
    for f in files_a:
        if os.path.exists(os.path.join(b_dir, f)) and os.path.samefile(os.path.join(a_dir, f), os.path.join(b_dir, f)):
            break
    else:
        pytest.fail("no shard was hard-linked from the previous checkpoint")
    snap_b = _snapshot(bank)

    # both checkpoints load back exactly (the older one is untouched by the newer save)
    mc, _ = configs()
    for d, snap in ((a_dir, snap_a), (b_dir, snap_b)):
        fresh = OffloadedBank(mem, mc, storage="host", seed=123)
        fresh.load_checkpoint(d)
        _assert_same(fresh, snap)
        if d == a_dir:  # the live bank has moved on since A
            continue
        with torch.no_grad():  # pristine rows re-initialise from the checkpoint's seed (not 123)
            leaves = torch.arange(mem.k ** mem.n_levels)
            paths = torch.stack([(leaves // mem.k ** (mem.n_levels - 1 - i)) % mem.k for i in range(mem.n_levels)], 1)
            ids = node_ids(paths, mem.k)
            assert torch.equal(fresh.gather(ids), bank.gather(ids))
    # deleting the older checkpoint (keep_last_k) does not break the newer one
    import shutil
    shutil.rmtree(os.path.join(root, "step-0000003"))
    fresh = OffloadedBank(mem, mc, storage="host")
    fresh.load_checkpoint(b_dir)
    _assert_same(fresh, snap_b)
    bank.close()


def test_checkpoint_loads_into_another_world_size(tmp_path):
    mem, lm, bank = setup(str(tmp_path / "live"), storage="host")
    dense, dense_opt, bank_opt = make_optimizers(lm, bank)
    train(Net(lm), dense, dense_opt, bank_opt, steps=2, B=4, mem_cfg=mem, accumulate=1)
    bank.save_checkpoint(str(tmp_path / "bank"))
    mc, _ = configs()
    part = OffloadedBank(mem, mc, storage="host", rank=1, world_size=2)
    part.load_checkpoint(str(tmp_path / "bank"))
    for s_full, s_part in zip(bank.stores, part.stores):
        rows = np.concatenate([np.arange(c * s_full.block, (c + 1) * s_full.block) for c in part.owned_tops])
        for k in ("w", "exp_avg_sq", "step", "tokens"):
            assert np.array_equal(s_part.arrays[k], s_full.arrays[k][s_full.local(rows)])
    with pytest.raises(ValueError, match="widths"):
        other = OffloadedBank(type(mem)(k=4, widths=(8, 4, 4)), mc)
        other.load_checkpoint(str(tmp_path / "bank"))


def test_crash_during_bank_checkpoint_resumes_from_previous(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_bank_crash_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr  # SIGKILL mid-save
    root = tmp_path / "ckpt"
    assert (root / "step-0000005.tmp").exists() and not (root / "step-0000005").exists()
    assert not (root / "step-0000005.tmp" / "bank" / "index.json").exists()
    good = root / "step-0000003" / "bank"

    # replay the same 3 steps here: the surviving checkpoint holds exactly that state
    mem, lm, ref = setup(None, storage="host")
    dense, dense_opt, bank_opt = make_optimizers(lm, ref)
    train(Net(lm), dense, dense_opt, bank_opt, steps=3, B=4, mem_cfg=mem, accumulate=1)
    snap = _snapshot(ref)
    _, lm2, resumed = setup(str(tmp_path / "live2"))
    resumed.load_checkpoint(str(good))
    _assert_same(resumed, snap)
    # and training continues from it (next save links from the loaded checkpoint)
    lm2.anchor.load_state_dict(lm.anchor.state_dict())
    lm2.bank.generic.data.copy_(ref.generic.data)
    d2, o2, b2 = make_optimizers(lm2, resumed)
    train(Net(lm2), d2, o2, b2, steps=1, B=4, mem_cfg=mem, accumulate=1, first_step=3)
    counts = resumed.save_checkpoint(str(tmp_path / "after" / "bank"))
    assert counts["linked"] > 0
    resumed.close()


def test_damaged_bank_files_are_checkpoint_errors(tmp_path):
    """A shard overwritten in place with random bytes (same size), a shard header or an index that decodes
    to nonsense: loading and bank-info raise a CheckpointError naming the file, not a traceback."""
    from train.commands.bank_info import bank_info

    mem, lm, bank = setup(None, storage="host")
    dense, dense_opt, bank_opt = make_optimizers(lm, bank)
    train(Net(lm), dense, dense_opt, bank_opt, steps=1, B=4, mem_cfg=mem, accumulate=1)
    bank_dir = str(tmp_path / "bank")
    bank.save_checkpoint(bank_dir)
    index = os.path.join(bank_dir, "index.json")
    shard = os.path.join(bank_dir, bank_io.read_index(bank_dir)["levels"][0]["shards"][0]["file"])
    with open(shard, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["w"]["shape"] = [1, 2]  # no longer matches its byte range
    nonsense = raw[:8] + json.dumps(header, separators=(",", ":")).encode().ljust(n) + raw[8 + n:]
    with open(index) as f:
        idx = json.load(f)
    idx["levels"][1]["shards"] = "L2"

    mc, _ = configs()
    cases = [(shard, np.random.default_rng(0).bytes(len(raw))), (shard, nonsense), (index, json.dumps(idx).encode())]
    for path, content in cases:
        with open(path, "wb") as f:
            f.write(content)
        assert len(content) == len(raw) or path == index
        for read in (lambda: OffloadedBank(mem, mc, storage="host").load_checkpoint(bank_dir),
                     lambda: bank_info(bank_dir)):
            with pytest.raises(CheckpointError, match=re.escape(path) + ": damaged: .*older checkpoint"):
                read()
        with open(shard, "wb") as f:  # repair the shard for the next case
            f.write(raw)
    bank.close()

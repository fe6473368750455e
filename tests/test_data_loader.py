"""PackedDataset: packing, labels, <CALL> targets, leaves, exact resume in a new process, rank/worker sharding."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.loader import PackedDataset, make_loader
from data.shards import open_data, prepare

T, B = 64, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "data"
    prepare("bios", str(out), vocab_size=400, val_fraction=0.1, shard_tokens=6000, window_tokens=40,
            progress=False, log=lambda *a: None, n_people=120, top_docs=40)
    return str(out)


def _check_labels(batch, call_id=None, called=None):
    ids, labels, lens = batch["input_ids"], batch["labels"], batch["doc_lens"]
    assert ids.dtype == labels.dtype == lens.dtype == torch.int64
    assert (lens.sum(1) == ids.shape[1]).all()
    for b in range(ids.shape[0]):
        pos = 0
        for n in lens[b][lens[b] > 0].tolist():
            seg, lab = ids[b, pos:pos + n], labels[b, pos:pos + n]
            want = seg[1:].clone()
            if called is not None:
                want[called(seg[1:])] = call_id
            assert torch.equal(lab[:-1], want) and lab[-1] == -100
            pos += n


def test_packing_and_labels(data_dir):
    ds = PackedDataset(data_dir, "train", seq_len=T, batch_size=B, seed=0)
    batches = [b for _, b in zip(range(10), ds)]
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == (B, T)
        assert b["mem_path"].shape == (B, 0)
        _check_labels(b)
    # every row of the epoch sums to T; the rows cover the split's tokens but the remainder
    n_tok = open_data(data_dir).n_tokens("train")
    assert ds.n_rows == n_tok // T
    val = PackedDataset(data_dir, "val", seq_len=T, batch_size=1, seed=0)
    assert len(list(val)) == len(val)  # val: one finite epoch
    # same seed -> same batches; other seed -> other order
    again = [b for _, b in zip(range(10), PackedDataset(data_dir, "train", seq_len=T, batch_size=B, seed=0))]
    other = next(iter(PackedDataset(data_dir, "train", seq_len=T, batch_size=B, seed=1)))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    assert not torch.equal(batches[0]["input_ids"], other["input_ids"])


def test_call_targets(data_dir):
    data = open_data(data_dir)
    dot = data.tokenizer().convert_tokens_to_ids(".")
    for sh in data.shards("train"):  # delegate every "." token: a mask we can check from the batch alone
        sh.write_array("calls_test", (np.asarray(sh.tokens) == dot).astype(np.uint8))
    assert open_data(data_dir).manifest["arrays"]["calls_test"]["per"] == "token"
    call_id = data.manifest["special_ids"]["call"]
    ds = PackedDataset(data_dir, "train", seq_len=T, batch_size=B, seed=0, calls="calls_test")
    b = next(iter(ds))
    assert (b["labels"] == call_id).any()
    _check_labels(b, call_id, lambda nxt: nxt == dot)
    with pytest.raises(Exception, match="calls_nope"):
        PackedDataset(data_dir, "train", seq_len=T, batch_size=B, calls="calls_nope")


def test_by_leaf_rows_hold_one_leaf(data_dir, tmp_path):
    import shutil
    d = str(tmp_path / "clustered")
    shutil.copytree(data_dir, d)
    data = open_data(d)
    for split in ("train", "val"):
        for sh in data.shards(split):
            w = np.arange(sh.n_windows)
            sh.write_array("paths", np.stack([w % 2, w % 3], 1).astype(np.int32))
    data.update_manifest(n_levels=2)
    ds = PackedDataset(d, "train", seq_len=T, batch_size=B, seed=0, by_leaf=True, return_row_ids=True)
    for _, b in zip(range(5), ds):
        assert b["mem_path"].shape == (B, 2)
        _check_labels(b)
        for row_id, path in zip(b["row_ids"].tolist(), b["mem_path"].tolist()):
            _, segs = ds.row_segments(0, row_id)
            assert all(ds.w_path[w].tolist() == path for w, _, _ in segs)
    plain = PackedDataset(d, "train", seq_len=T, batch_size=B, seed=0)
    assert next(iter(plain))["mem_path"].shape == (B, 2)


RESUME_SCRIPT = r"""
import json, sys, torch
from data.loader import make_loader
data_dir, state_file, m, out = sys.argv[1:5]
loader = make_loader(data_dir, "train", seq_len=%d, batch_size=%d, seed=7, num_workers=0)
loader.load_state_dict(json.load(open(state_file)))
it = iter(loader)
torch.save([next(it) for _ in range(int(m))], out)
""" % (T, B)


def test_resume_in_new_process(data_dir, tmp_path):
    ref = make_loader(data_dir, "train", seq_len=T, batch_size=B, seed=7)
    nb = len(ref)
    k, m = nb - 2, 4  # the resumed run crosses an epoch boundary
    it = iter(ref)
    expected = [next(it) for _ in range(k + m)][k:]
    # interrupted run, with 2 worker processes: the loader counts in the main process
    run = make_loader(data_dir, "train", seq_len=T, batch_size=B, seed=7, num_workers=2)
    it = iter(run)
    first = [next(it) for _ in range(k)]
    del it
    state = run.state_dict()
    assert (state["epoch"], state["batches_done"]) == (0, k)
    assert state == run.dataset.state_at(k)
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state))
    out = tmp_path / "next.pt"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, data_dir, str(state_file), str(m), str(out)],
                   check=True, env=env, timeout=300)
    got = torch.load(out)
    for x, y in zip(got, expected, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x)
    assert torch.equal(first[0]["input_ids"], next(iter(make_loader(data_dir, "train", seq_len=T, batch_size=B,
                                                                      seed=7)))["input_ids"])
    with pytest.raises(ValueError, match="world_size"):
        make_loader(data_dir, "train", seq_len=T, batch_size=B, seed=7, world_size=2).load_state_dict(state)


def test_ranks_and_workers_disjoint_union_is_epoch(data_dir):
    seen, per_rank = [], []
    for rank in range(2):
        loader = make_loader(data_dir, "train", seq_len=T, batch_size=B, seed=3, rank=rank, world_size=2,
                             num_workers=2, infinite=False, return_row_ids=True)
        in_proc = make_loader(data_dir, "train", seq_len=T, batch_size=B, seed=3, rank=rank, world_size=2,
                              infinite=False, return_row_ids=True)
        batches = list(loader)
        ref = list(in_proc)
        assert len(batches) == len(ref) == len(loader)
        # workers deliver exactly the in-process order
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, ref))
        rows = torch.cat([b["row_ids"] for b in batches]).tolist()
        per_rank.append(len(batches))
        seen += rows
    assert per_rank[0] == per_rank[1]
    assert len(seen) == len(set(seen))
    assert set(seen) == set(range(loader.dataset.epoch_rows()))


def test_too_few_rows_is_the_same_error_on_every_rank_and_names_a_fix(data_dir, tmp_path):
    """Under torchrun a split that leaves one rank short of a batch was raised by that rank only (the others
    died in gloo tracebacks, ~60 lines): every rank computes every rank's row count and raises the same line,
    which names what to change."""
    from data.affine import AffinePackedDataset
    from data.loader import PackedDataset
    from model.errors import ConfigError
    from test_bank_train import _fake_clustered

    data = _fake_clustered(data_dir, str(tmp_path / "data"))  # k=2: top-level clusters 0 and 1
    messages = set()
    for rank in (0, 1, 2):  # of 3: rank 2 owns no top-level cluster
        with pytest.raises(ConfigError) as e:
            AffinePackedDataset(data, "val", seq_len=32, batch_size=2, rank=rank, world_size=3)
        messages.add(str(e.value))
    (msg,) = messages
    assert "rank 2/3 owns top-level clusters [], which pack into 0 rows" in msg and "trainer.val_every=0" in msg
    assert "fewer processes" in msg
    AffinePackedDataset(data, "val", seq_len=32, batch_size=2, rank=1, world_size=2)  # both ranks own one
    with pytest.raises(ConfigError, match=r"fewer than batch_size\*world_size = .*; lower data\.batch_size .*"
                                          r"fewer processes, or switch validation off with trainer\.val_every=0"):
        PackedDataset(data_dir, "val", seq_len=32, batch_size=10**5, rank=1, world_size=2)

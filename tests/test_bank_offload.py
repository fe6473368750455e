"""Offloaded / memory-mapped banks and the sparse (lazy) bank optimizer (issue "scale")."""
import copy
import os

import numpy as np
import pytest
import torch

from _bank_harness import Net, batch, configs, make_optimizers, train
from memory.bank import ResidentBank
from memory.bank import node_ids as bank_node_ids
from memory.model import MemoryLM
from memory.offload import OffloadedBank
from memory.sparse_adam import ResidentSparseAdapter, SparseRowAdamW, TensorRowStore, clip_grad_norm_with_bank
from model.model import Anchor


def _pair(tmp_path, storage="mmap"):
    """A resident model (+ lazy-optimizer adapter) and an offloaded copy with identical weights."""
    mc, mem = configs()
    torch.manual_seed(0)
    res_lm = MemoryLM(Anchor(mc), mem, bank=ResidentBank(mem, mc))
    adapter = ResidentSparseAdapter(res_lm.bank)
    off_bank = OffloadedBank(mem, mc, storage=storage, path=str(tmp_path / "live")).copy_from(res_lm.bank)
    off_lm = MemoryLM(copy.deepcopy(res_lm.anchor), mem, bank=off_bank)
    return mem, (res_lm, adapter), (off_lm, off_bank)


def _rows(bank: OffloadedBank, level: int, name: str) -> np.ndarray:
    s = bank.stores[level]
    return s.read_np(name, np.arange(s.n_global))


def test_offloaded_matches_resident_with_same_lazy_optimizer(tmp_path):
    """10 steps, 2 micro-batches each, clipping active, prefetch on: memory-mapped bank + sparse optimizer
    == resident bank + the same lazy optimizer, bit for bit (losses, rows, optimizer state)."""
    mem, (res_lm, adapter), (off_lm, off_bank) = _pair(tmp_path, "mmap")
    runs = {}
    for name, lm, src in (("resident", res_lm, adapter), ("offloaded", off_lm, off_bank)):
        dense, dense_opt, bank_opt = make_optimizers(lm, src)
        runs[name] = train(Net(lm), dense, dense_opt, bank_opt, steps=10, B=6, mem_cfg=mem)
    assert runs["resident"] == runs["offloaded"], runs  # fp32, same op order: bit-identical losses
    assert off_bank.stats["prefetch_hits"] > 0 and off_bank.stats["stale_rereads"] > 0  # prefetch was exercised
    for l, store in enumerate(adapter.stores):
        N = store.n_rows
        torch.testing.assert_close(torch.from_numpy(_rows(off_bank, l, "w")), store.weight.detach().view(N, -1),
                                   rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(_rows(off_bank, l, "exp_avg_sq")), store.exp_avg_sq, rtol=0, atol=0)
        assert np.array_equal(off_bank.stores[l].arrays["step"], store.step.numpy())
    torch.testing.assert_close(off_lm.anchor.state_dict(), res_lm.anchor.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(off_bank.generic, res_lm.bank.generic, rtol=0, atol=0)
    # some rows were never fetched (the test means something), some many times
    steps = np.concatenate([s.arrays["step"] for s in off_bank.stores])
    assert (steps == 0).any() and steps.max() == 10
    off_bank.close()


def test_untouched_rows_and_state_bit_identical(tmp_path):
    mem, (res_lm, adapter), (off_lm, off_bank) = _pair(tmp_path, "host")
    for lm, src in ((res_lm, adapter), (off_lm, off_bank)):
        dense, dense_opt, bank_opt = make_optimizers(lm, src)
        train(Net(lm), dense, dense_opt, bank_opt, steps=3, B=4, mem_cfg=mem, accumulate=1)
        if src is off_bank:
            before = [{k: np.array(a) for k, a in s.arrays.items()} for s in off_bank.stores]
        else:
            before_res = [(s.weight.detach().clone(), s.exp_avg.clone(), s.exp_avg_sq.clone(), s.step.clone())
                          for s in adapter.stores]
        # one more step on a known batch: record which rows it touches
        x, y, paths, generic = batch(99, 0, 4, mem)
        logits = Net(lm)(x, paths, generic)
        Anchor.loss(logits, y).backward()
        touched = bank_opt.touched_rows()
        dense_opt.step()
        bank_opt.step()
        if src is off_bank:
            for l, s in enumerate(off_bank.stores):
                t = touched.get(f"level{l + 1}", np.zeros(0, np.int64))
                untouched = np.setdiff1d(np.arange(s.n_rows), s.local(t))
                assert len(untouched) > 0 and len(t) > 0
                for k, a in s.arrays.items():
                    assert np.array_equal(a[untouched].view(np.uint8), before[l][k][untouched].view(np.uint8)), (l, k)
                    if k in ("w", "step"):
                        assert not np.array_equal(a[s.local(t)], before[l][k][s.local(t)])
        else:
            for l, (s, b) in enumerate(zip(adapter.stores, before_res)):
                t = torch.from_numpy(touched.get(f"level{l + 1}", np.zeros(0, np.int64)))
                keep = torch.ones(s.n_rows, dtype=torch.bool)
                keep[t] = False
                now = (s.weight.detach(), s.exp_avg, s.exp_avg_sq, s.step)
                for a, c in zip(now, b):
                    assert torch.equal(a[keep].view(torch.uint8) if a.is_floating_point() else a[keep],
                                       c[keep].view(torch.uint8) if c.is_floating_point() else c[keep])
    off_bank.close()


def _bank_state(bank, adapter) -> list[np.ndarray]:
    """Every row of the bank with its optimizer state and counters, as arrays."""
    if adapter is None:
        return [np.array(a) for s in bank.stores for a in s.arrays.values()]
    return [t.detach().clone().numpy() for s in adapter.stores for t in (s.weight, s.exp_avg, s.exp_avg_sq, s.step)]


@pytest.mark.parametrize("storage", ["resident", "host", "mmap"])
def test_step_where_every_row_takes_the_generic_block(tmp_path, storage):
    """A batch whose rows all take the generic block fetches no bank row: the step completes, trains the
    generic block, leaves every row and its optimizer state as they were, and training goes on."""
    mc, mem = configs()
    torch.manual_seed(0)
    if storage == "resident":
        bank = ResidentBank(mem, mc)
        adapter = src = ResidentSparseAdapter(bank)
    else:
        bank = src = OffloadedBank(mem, mc, storage=storage, path=str(tmp_path / "live"))
        adapter = None
    lm = MemoryLM(Anchor(mc), mem, bank=bank)
    dense, dense_opt, bank_opt = make_optimizers(lm, src)
    train(Net(lm), dense, dense_opt, bank_opt, steps=1, B=4, mem_cfg=mem, accumulate=1)  # some rows written
    rows_before, generic_before = _bank_state(bank, adapter), bank.generic.detach().clone()

    x, y, paths, _ = batch(7, 0, 4, mem)
    bank.prefetch(paths)  # the loader prefetched rows this batch then does not use
    Anchor.loss(Net(lm)(x, paths, torch.ones(4, dtype=torch.bool)), y).backward()
    bank.count_tokens(y.shape[1])
    assert bank_opt.touched_rows() == {}
    clip_grad_norm_with_bank(dense, bank_opt, 0.5)
    dense_opt.step()
    bank_opt.step()
    dense_opt.zero_grad(set_to_none=True)
    bank_opt.zero_grad()

    assert not torch.equal(bank.generic.detach(), generic_before)
    for now, before in zip(_bank_state(bank, adapter), rows_before):
        assert np.array_equal(now, before)
    train(Net(lm), dense, dense_opt, bank_opt, steps=1, B=4, mem_cfg=mem, accumulate=1, first_step=8)
    assert not all(np.array_equal(a, b) for a, b in zip(_bank_state(bank, adapter), rows_before))
    bank.close()


def test_lazy_adamw_equals_torch_adamw_when_every_row_is_touched():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3, 7)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    store = TensorRowStore(w0.clone())
    lazy = SparseRowAdamW(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows = np.arange(5)
    for _ in range(20):
        g = torch.randn(5, 3, 7)
        ref.grad = g.clone()
        opt.step()
        w, m, v, s = store.read_rows(rows)
        s = lazy.update(w, m, v, s, g.view(5, -1))
        store.write_rows(rows, w, m, v, s)
    torch.testing.assert_close(store.weight, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(store.exp_avg_sq.view(5, 3, 7), opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_lazy_rows_use_their_own_step_count():
    """A row touched for the first time at global step 5 gets the bias correction of its step 1."""
    lazy = SparseRowAdamW(lr=0.1, betas=(0.9, 0.999), weight_decay=0.0)
    store = TensorRowStore(torch.zeros(2, 4))
    g = torch.ones(1, 4)
    for _ in range(4):
        w, m, v, s = store.read_rows(np.array([0]))
        store.write_rows(np.array([0]), w, m, v, lazy.update(w, m, v, s, g))
    w, m, v, s = store.read_rows(np.array([1]))
    store.write_rows(np.array([1]), w, m, v, lazy.update(w, m, v, s, g))
    assert store.step.tolist() == [4, 1]
    torch.testing.assert_close(store.weight[1], torch.full((4,), -0.1), rtol=1e-6, atol=1e-7)  # first Adam step = -lr


def test_lazy_init_is_deterministic_and_costs_nothing(tmp_path):
    mc, mem = configs(k=8, widths=(8, 8, 8))
    a = OffloadedBank(mem, mc, storage="mmap", path=str(tmp_path / "a"), seed=3)
    b = OffloadedBank(mem, mc, storage="host", seed=3)
    ids = [torch.tensor([5, 1]), torch.tensor([42, 9]), torch.tensor([300, 77])]
    with torch.no_grad():
        ga, gb = a.gather(ids), b.gather(ids)
    assert torch.equal(ga, gb)
    assert float(ga[:, :, :2].std()) == pytest.approx(0.05, rel=0.2)
    assert float(ga[:, :, 2].abs().max()) == 0.0  # M3 starts at zero
    # the memory-mapped files are sparse: nothing but headers allocated yet
    import os
    allocated = sum(os.stat(s.file).st_blocks * 512 for s in a.stores)
    assert allocated < 64 * 1024 < a.resident_bytes()
    a.close()
    b.close()


def test_distributed_ownership_rejects_foreign_rows():
    mc, mem = configs()
    bank = OffloadedBank(mem, mc, rank=1, world_size=2)
    assert bank.owned_tops == [1, 3]
    assert bank.resident_bytes() * 2 == OffloadedBank(mem, mc).resident_bytes()
    with pytest.raises(ValueError, match="owned by rank 0"):
        bank.fetch(torch.tensor([[2, 0, 0]]))
    bank.fetch(torch.tensor([[3, 1, 2]]))


def _mapped_rss_kb(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_fresh_rows_do_not_touch_mapped_files(tmp_path):
    """Reading never-written rows (weights, moments, through the prefetch thread too) maps no file page:
    reading holes of the sparse file would fill page cache and RSS (plus read-around) for zeros."""
    mc, mem = configs(k=8, widths=(8, 8, 8))
    bank = OffloadedBank(mem, mc, storage="mmap", path=str(tmp_path / "live"), seed=3)
    paths = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 0, 1]])
    bank.prefetch(paths)
    with torch.no_grad():
        blocks = bank.gather(bank_node_ids(paths, mem.k))
    for s in bank.stores:
        rows = np.arange(0, s.n_global, 37)
        for name in ("w", "exp_avg", "exp_avg_sq"):
            s.read_np(name, rows)
    assert float(blocks[:, :, :2].abs().sum()) > 0  # lazily initialised values came back
    files = [s.file for s in bank.stores]
    assert sum(_mapped_rss_kb(f) for f in files) <= 16, [_mapped_rss_kb(f) for f in files]  # header pages only
    # written rows are read from the file, and come back bit for bit
    s = bank.stores[2]
    w = torch.randn(2, s.row_dim)
    s.write_rows(np.array([5, 300]), w, torch.zeros_like(w), torch.ones_like(w), torch.tensor([1, 1]))
    assert np.array_equal(s.read_np("w", np.array([5, 300])), w.numpy())
    assert np.array_equal(s.read_np("exp_avg_sq", np.array([4, 5, 300])), np.r_[np.zeros((1, s.row_dim)), np.ones((2, s.row_dim))])
    bank.close()

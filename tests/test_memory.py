"""Memory config accounting, bank fetch, MemoryLM modes, dense equivalence, gradient sparsity."""
import pytest
import torch

from memory.bank import node_ids
from memory.config import MemoryConfig, bank_params, fetched_params
from memory.model import MemoryLM, build_memory_lm
from model.config import ModelConfig
from model.model import Anchor


def tiny_model_cfg(**kw):
    base = dict(vocab_size=97, n_layer=3, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def make(mem_kw=None, model_kw=None, seed=0):
    torch.manual_seed(seed)
    mcfg = tiny_model_cfg(**(model_kw or {}))
    mem = MemoryConfig(**{"k": 3, "widths": (8, 4, 2), **(mem_kw or {})})
    return MemoryLM(Anchor(mcfg), mem)


def randomize_bank(mlm, std=0.1):
    with torch.no_grad():
        for p in mlm.bank.parameters():
            p.normal_(0, std)


# ---- config / accounting --------------------------------------------------------------------
def test_paper_accounting_160m():
    model_cfg = ModelConfig.from_name("160m")
    mem = MemoryConfig.from_name("160m")
    assert (model_cfg.n_layer, model_cfg.n_embd) == (35, 512)
    assert fetched_params(mem, model_cfg) == 3 * 35 * 512 * (256 + 64 + 16)
    assert round(fetched_params(mem, model_cfg) / 1e6, 2) == 18.06
    assert round(bank_params(mem, model_cfg) / 1e9, 2) == 4.62
    assert mem.p_generic == pytest.approx(1 / 17)


def test_tiny_preset_is_about_ten_percent():
    model_cfg = ModelConfig.from_name("tiny")
    mem = MemoryConfig.from_name("tiny")
    anchor = Anchor(model_cfg)
    share = fetched_params(mem, model_cfg) / anchor.num_params("non_embedding")
    assert 0.08 < share < 0.13, share


def test_layer_specs():
    cfg = tiny_model_cfg(n_layer=5)
    assert MemoryConfig(layers="all").validate(cfg) == [0, 1, 2, 3, 4]
    assert MemoryConfig(layers="last:2").validate(cfg) == [3, 4]
    assert MemoryConfig(layers="first:1").validate(cfg) == [0]
    assert MemoryConfig(layers=[4, 1]).validate(cfg) == [1, 4]
    with pytest.raises(ValueError, match=r"layers.*\[7\].*n_layer=5"):
        MemoryConfig(layers=[1, 7]).validate(cfg)
    with pytest.raises(ValueError, match=r"last:9.*n_layer=5"):
        MemoryConfig(layers="last:9").validate(cfg)
    with pytest.raises(ValueError, match="widths"):
        MemoryConfig(widths=(4, -1))
    with pytest.raises(ValueError, match="unknown key"):
        MemoryConfig.from_dict({"k": 4, "width": (1,)})


def test_node_numbering():
    ids = node_ids(torch.tensor([[3, 5, 1], [0, 0, 15]]), 16)
    assert [i.tolist() for i in ids] == [[3, 0], [53, 0], [53 * 16 + 1, 15]]


# ---- equivalences ---------------------------------------------------------------------------
def test_zero_init_modes_identical():
    mlm = make()
    x = torch.randint(0, 97, (4, 10))
    paths = torch.tensor([[0, 1, 2], [2, 2, 2], [0, 1, 2], [1, 0, 0]])
    for training in (False, True):
        mlm.train(training)
        a = mlm(x, mode="anchor")
        assert torch.equal(mlm(x, mem_path=paths, mode="fetched"), a)
        assert torch.equal(mlm(x, mem_path=paths, mode="generic"), a)


@pytest.mark.parametrize("layers", ["all", "last:1", [0, 2]])
def test_dense_equivalence(layers):
    mlm = make({"layers": layers}).eval()
    randomize_bank(mlm)
    x = torch.randint(0, 97, (3, 12))
    paths = torch.tensor([[0, 1, 2], [2, 0, 1], [0, 1, 2]])
    y = mlm(x, mem_path=paths)
    assert not torch.allclose(y, mlm(x, mode="anchor"), atol=1e-4)  # the memory does something
    for b in range(3):
        dense = mlm.to_dense(paths[b].tolist())
        assert dense.config.ffn_hidden == 64 + 14
        torch.testing.assert_close(dense(x[b:b + 1]), y[b:b + 1], rtol=0, atol=1e-6)


def test_generic_mode_matches_dense_generic_block():
    mlm = make().eval()
    randomize_bank(mlm)
    x = torch.randint(0, 97, (2, 8))
    g = mlm.bank.generic[0]
    extra = [(g[j, 0], g[j, 1], g[j, 2].t()) for j in range(3)]
    from memory.model import widen_anchor
    torch.testing.assert_close(widen_anchor(mlm.anchor, extra)(x), mlm(x, mode="generic"), rtol=0, atol=1e-6)


# ---- gradients ------------------------------------------------------------------------------
def test_only_fetched_rows_get_gradients():
    mlm = make({"generic_prob": 0.0}).train()
    randomize_bank(mlm)
    x = torch.randint(0, 97, (4, 10))
    paths = torch.tensor([[0, 1, 2], [2, 2, 2], [0, 1, 2], [0, 1, 0]])
    logits = mlm(x, mem_path=paths)
    mlm.loss(logits, torch.randint(0, 97, (4, 10))).backward()
    fetched = node_ids(torch.unique(paths, dim=0), 3)
    for l, w in enumerate(mlm.bank.levels()):
        nonzero = set((w.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist())
        assert nonzero == set(fetched[l].tolist()), (l, nonzero)
    # Every bank tensor is in the graph (DDP without find_unused_parameters); the unused generic gets zeros.
    assert mlm.bank.generic.grad is not None and not mlm.bank.generic.grad.any()


def test_generic_prob_replaces_rows_reproducibly():
    mlm = make({"generic_prob": 0.5}).train()
    randomize_bank(mlm)
    paths = torch.randint(0, 3, (64, 3))
    torch.manual_seed(123)
    a = mlm.memory(paths)
    torch.manual_seed(123)
    b = mlm.memory(paths)
    assert torch.equal(a.generic_rows, b.generic_rows)
    assert 10 < int(a.generic_rows.sum()) < 54
    assert (a.block_of_row[a.generic_rows] == a.unique_paths.shape[0]).all()
    mlm.eval()
    assert not mlm.memory(paths).generic_rows.any()  # never at evaluation
    mlm.mem_cfg.generic_prob = 1.0
    mlm.train()
    x = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(mlm(x, mem_path=paths[:2]), mlm(x, mode="generic"), rtol=0, atol=0)


def test_freeze_and_param_groups():
    mlm = make()
    groups = {g["name"]: g for g in mlm.param_groups(lr=1e-3, weight_decay=0.1)}
    assert set(groups) == {"anchor", "anchor_no_decay", "memory"}
    assert groups["memory"]["lr"] == 1e-4 and groups["memory"]["weight_decay"] == 1e-3
    mlm.freeze_anchor()
    groups = mlm.param_groups(lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["memory"]
    n_mem = sum(p.numel() for p in groups[0]["params"])
    assert n_mem == mlm.num_params("memory")
    assert mlm.num_params("fetched") == 3 * 3 * 32 * 14


def test_flops_count_fetched_units_not_bank():
    mlm = make()
    base = mlm.flops_per_token(16, mode="anchor")
    assert mlm.flops_per_token(16) - base == pytest.approx(6 * mlm.num_params("fetched"))


def test_generate_with_path_equals_dense():
    mlm = make().eval()
    randomize_bank(mlm, 0.3)
    x = torch.randint(0, 97, (1, 5))
    out = mlm.generate(x, 6, mem_path=[[1, 2, 0]])
    dense = mlm.to_dense([1, 2, 0])
    assert torch.equal(out, dense.generate(x, 6))


# ---- bad input ------------------------------------------------------------------------------
def test_bad_paths_and_mismatches():
    mlm = make()
    x = torch.randint(0, 97, (2, 4))
    with pytest.raises(ValueError, match=r"mem_path has 2 levels but the memory bank has 3"):
        mlm(x, mem_path=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0 levels.*memlm cluster"):
        mlm(x, mem_path=torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k=3"):
        mlm(x, mem_path=torch.full((2, 3), 3))
    with pytest.raises(ValueError, match="unknown mode"):
        mlm(x, mode="dense")
    with pytest.raises(ValueError, match=r"layers.*\[5\].*n_layer=3"):
        make({"layers": [5]})


def test_router_bank_mismatch():
    import numpy as np

    from memory.router import Router

    router = Router([np.eye(4, dtype=np.float32), np.eye(16, 4, dtype=np.float32)], k=4)
    mem = MemoryConfig(k=4, widths=(8, 4, 2))
    with pytest.raises(ValueError, match=r"router has 2 levels with k=4.*bank has 3 levels.*k=4"):
        build_memory_lm(Anchor(tiny_model_cfg()), mem, router=router)
    with pytest.raises(ValueError, match=r"k=4.*k=3"):
        router.check_bank(MemoryConfig(k=3, widths=(8, 4)))


def test_all_generic_batch_and_empty_unique():
    mlm = make().eval()
    fb = mlm.bank.fetch(torch.zeros(3, 3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    assert fb.unique_paths.shape == (0, 3) and fb.block_of_row.tolist() == [0, 0, 0]
    assert fb[0].m1.shape == (1, 14, 32)


def test_zero_width_level():
    mlm = make({"widths": (0, 6, 0)}).eval()
    randomize_bank(mlm)
    x = torch.randint(0, 97, (2, 7))
    paths = torch.tensor([[0, 1, 2], [2, 0, 1]])
    y = mlm(x, mem_path=paths)
    torch.testing.assert_close(mlm.to_dense([0, 1, 2])(x[:1]), y[:1], rtol=0, atol=1e-6)

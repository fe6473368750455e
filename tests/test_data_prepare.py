"""memlm prepare: built-in corpora, round trip, resume, bad input (each error names the file)."""
import json
import os
import random

import numpy as np
import pytest

from data.corpora import CorpusError, load_corpus
from data.shards import ShardError, open_data, prepare
from data.tokenizer import CALL, TokenizerError, load_tokenizer, tokenizer_hash
from train.commands import prepare as cmd_prepare

BIOS_KW = dict(n_people=150, top_docs=60)


def _prep(corpus, out, **kw):
    args = dict(vocab_size=512, val_fraction=0.1, shard_tokens=8000, window_tokens=48, progress=False,
                log=lambda *a: None)
    args.update(kw)
    return prepare(corpus, str(out), **args)


def _docs_from_shards(data, split):
    """doc_id -> token ids (chunks joined, in order)."""
    out = {}
    for sh in data.shards(split):
        off = sh.windows
        for i, d in enumerate(sh.docs):
            out.setdefault(d["doc_id"], []).append((d["chunk"], np.asarray(sh.tokens[off[i]:off[i + 1]])))
    return {k: np.concatenate([t for _, t in sorted(v, key=lambda x: x[0])]) for k, v in out.items()}


@pytest.fixture(scope="module")
def bios_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bios") / "data"
    rc = cmd_prepare.main(["--corpus", "bios", "--out", str(out), "--vocab-size", "512", "--n-people", "150",
                           "--top-docs", "60", "--val-fraction", "0.1", "--shard-tokens", "8000",
                           "--window-tokens", "48", "--no-progress"])
    assert rc == 0
    return out


def test_bios_prepare_counts_and_round_trip(bios_dir):
    data = open_data(str(bios_dir))
    man = data.manifest
    corpus = {d.id: d.text for d in load_corpus("bios", **BIOS_KW)}
    assert man["splits"]["train"]["n_docs"] + man["splits"]["val"]["n_docs"] == len(corpus)
    assert man["splits"]["val"]["n_docs"] > 0 and len(man["splits"]["train"]["shards"]) > 1
    assert man["dtype"] == "uint16" and man["vocab_size"] == 512
    tok = data.tokenizer()
    eos = man["special_ids"]["eos"]
    for split in ("train", "val"):
        docs = _docs_from_shards(data, split)
        for doc_id in random.Random(0).sample(sorted(docs), 20):
            ids = docs[doc_id]
            assert ids[-1] == eos and (ids[:-1] != eos).all()  # one EOS, at the end
            assert tok.decode(ids[:-1].tolist()) == corpus[doc_id]
        for sh in data.shards(split):  # windows never exceed window_tokens
            assert np.diff(sh.windows).max() <= 48
    assert os.path.isfile(bios_dir / "bios" / "kb.json") and os.path.isfile(bios_dir / "bios" / "probes.jsonl")
    # the saved tokenizer loads with plain transformers and has the special tokens
    from transformers import AutoTokenizer
    t2 = AutoTokenizer.from_pretrained(str(bios_dir / "tokenizer"))
    assert {"<|endoftext|>", "<pad>", CALL} <= set(t2.get_vocab())


def test_idempotent_and_resume_after_crash(bios_dir, tmp_path):
    import shutil
    ref = json.loads((bios_dir / "manifest.json").read_text())
    # re-running on a finished dir does nothing
    _prep("bios", bios_dir, **BIOS_KW)
    assert json.loads((bios_dir / "manifest.json").read_text()) == ref
    # simulate a crash: the last train shard was written but not recorded, a .tmp is left behind
    out = tmp_path / "data"
    shutil.copytree(bios_dir, out)
    man = json.loads((out / "manifest.json").read_text())
    lost = man["splits"]["train"]["shards"].pop()
    man["complete"] = False
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "train" / f"{lost['name']}.tokens.bin.tmp").write_bytes(b"junk")
    with pytest.raises(ShardError, match="did not finish"):
        open_data(str(out))
    _prep("bios", out, **BIOS_KW)
    assert json.loads((out / "manifest.json").read_text())["splits"] == ref["splits"]


def test_wiki_leads(tmp_path):
    docs = list(load_corpus("wiki-leads"))
    assert len(docs) == 10033 and len({d.id for d in docs}) == 10033
    assert any(d.id == "2001: A Space Odyssey" for d in docs)
    out = tmp_path / "wiki"
    rc = cmd_prepare.main(["--corpus", "wiki-leads", "--out", str(out), "--vocab-size", "600", "--max-docs", "300",
                           "--val-fraction", "0.05", "--no-progress"])
    assert rc == 0
    data = open_data(str(out))
    m = data.manifest
    assert m["splits"]["train"]["n_docs"] + m["splits"]["val"]["n_docs"] == 300
    text = {d.id: d.text for d in docs[:300]}
    tok = data.tokenizer()
    got = _docs_from_shards(data, "train")
    for doc_id in random.Random(1).sample(sorted(got), 10):
        assert tok.decode(got[doc_id][:-1].tolist()) == text[doc_id]


# --- bad input --------------------------------------------------------------------------------------
def _jsonl(path, recs):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in recs))
    return path


def test_empty_docs_and_invalid_utf8_are_counted(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [{"text": "hello world " * 5}, {"text": ""}, {"text": "   \n"},
                                      b'{"text": "bad \xff\xfe bytes here"}\n', {"text": "more text here"}])
    man = _prep(str(f), tmp_path / "out", vocab_size=300, val_fraction=0.0)
    assert man["stats"]["empty_skipped"] == 2
    assert man["stats"]["invalid_utf8_replaced"] == 1
    assert man["splits"]["train"]["n_docs"] == 3
    docs = list(load_corpus(str(f)))
    assert "\ufffd" in docs[1].text


def test_missing_column_names_file_and_columns(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [{"content": "x", "url": "u"}])
    with pytest.raises(SystemExit) as e:
        cmd_prepare.main(["--corpus", str(f), "--out", str(tmp_path / "o"), "--no-progress"])
    msg = str(e.value)
    assert str(f) in msg and "'text'" in msg and "content" in msg and "url" in msg
    # a configurable column works
    man = _prep(str(f), tmp_path / "o2", vocab_size=260, val_fraction=0.0, text_column="content")
    assert man["splits"]["train"]["n_docs"] == 1


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match="broken.parquet"):
        list(load_corpus(str(bad)))
    js = tmp_path / "broken.jsonl"
    js.write_bytes(b'{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"broken.jsonl: line 2"):
        list(load_corpus(str(js)))
    with pytest.raises(SystemExit, match="nothere.jsonl"):
        cmd_prepare.main(["--corpus", str(tmp_path / "nothere.jsonl"), "--out", str(tmp_path / "o")])


def test_tokenizer_mismatch_names_the_file(bios_dir, tmp_path):
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    # a foreign tokenizer without <CALL>: loading refuses, --tokenizer adds it
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = tmp_path / "foreign"
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(str(foreign))
    with pytest.raises(TokenizerError, match=str(foreign)):
        load_tokenizer(str(foreign))
    assert CALL in load_tokenizer(str(foreign), add_missing=True).get_vocab()
    # the data dir's tokenizer replaced by another one
    out = tmp_path / "data"
    shutil.copytree(bios_dir, out)
    other = load_tokenizer(str(foreign), add_missing=True)
    shutil.rmtree(out / "tokenizer")
    other.save_pretrained(str(out / "tokenizer"))
    assert tokenizer_hash(other) != open_data(str(bios_dir)).manifest["tokenizer_hash"]
    with pytest.raises(TokenizerError, match=r"tokenizer.*does not match"):
        open_data(str(out)).tokenizer()
    # prepare into an existing dir with another --tokenizer
    with pytest.raises(TokenizerError, match=str(foreign)):
        _prep("bios", bios_dir, tokenizer=str(foreign), **BIOS_KW)


def test_truncated_shard_names_the_file(bios_dir, tmp_path):
    import shutil
    out = tmp_path / "data"
    shutil.copytree(bios_dir, out)
    f = out / "train" / "00000.tokens.bin"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 10)
    with pytest.raises(ShardError, match=r"00000\.tokens\.bin: truncated shard"):
        open_data(str(out))


def test_directories_txt_and_mixtures(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first document.\n\nsecond paragraph.")
    (d / "sub" / "b.txt").write_text("another file")
    docs = list(load_corpus(str(d)))
    assert [x.id for x in docs] == ["a.txt", os.path.join("sub", "b.txt")]
    assert len(list(load_corpus(str(d), sample_by="paragraph"))) == 3
    small = _jsonl(tmp_path / "small.jsonl", [{"text": f"s{i}"} for i in range(10)])
    big = _jsonl(tmp_path / "big.jsonl", [{"text": f"b{i}", "id": f"big-{i}"} for i in range(200)])
    mix = list(load_corpus(f"{small}:1,{big}:3", id_column="id"))
    n_small = sum(x.text.startswith("s") for x in mix)
    assert n_small == 10 and 15 < len(mix) - n_small < 80  # stops when the small source runs out
    assert mix == list(load_corpus([(str(small), 1), (str(big), 3)], id_column="id"))  # seeded

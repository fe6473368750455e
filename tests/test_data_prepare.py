"""memlm prepare: built-in corpora, round trip, resume, bad input (each error names the file)."""
import json
import os
import random

import numpy as np
import pytest

from data.corpora import CorpusError, load_corpus
from data.prepare import prepare
from data.shards import ShardError, open_data
from data.tokenizer import CALL, TokenizerError, load_tokenizer, tokenizer_hash
from model.atomic import MARKER, read_marker, write_marker
from model.errors import ConfigError, OutputExistsError
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
    # simulate a kill: the last train shard was written but not recorded, a temporary file is left behind
    out = tmp_path / "data"
    shutil.copytree(bios_dir, out)
    man = json.loads((out / "manifest.json").read_text())
    lost = man["splits"]["train"]["shards"].pop()
    man["complete"] = False
    (out / "manifest.json").write_text(json.dumps(man))
    write_marker(str(out), "data-partial")
    (out / "train" / f".{lost['name']}.tokens.tmp-1-0123abcd.bin").write_bytes(b"junk")
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
    with pytest.raises(CorpusError) as e:
        cmd_prepare.main(["--corpus", str(f), "--out", str(tmp_path / "o"), "--no-progress"])
    msg = str(e.value)
    assert str(f) in msg and "'text'" in msg and "content" in msg and "url" in msg
    assert not (tmp_path / "o").exists()  # a failed first prepare leaves no data dir
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
    with pytest.raises(CorpusError, match="nothere.jsonl: file not found"):
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
    other.save_pretrained(str(out / "tokenizer"))  # no marker: loaded, then refused by its vocab hash
    assert tokenizer_hash(other) != open_data(str(bios_dir)).manifest["tokenizer_hash"]
    with pytest.raises(TokenizerError, match=r"tokenizer.*does not match.*--rebuild"):
        open_data(str(out)).tokenizer()
    # prepare into an existing dir with another --tokenizer
    with pytest.raises(TokenizerError, match=str(foreign)):
        _prep("bios", bios_dir, tokenizer=str(foreign), vocab_size=None, **BIOS_KW)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _shas(out):
    return {s: [sh["sha256"] for sh in m["shards"]]
            for s, m in json.loads((out / "manifest.json").read_text())["splits"].items()}


@pytest.mark.parametrize("damage", ["truncate tokens", "delete windows", "truncate docs"])
def test_damaged_shard_is_named_and_rebuilt_by_prepare(bios_dir, tmp_path, damage):
    out = _copy(bios_dir, tmp_path / "data")
    before = _shas(out)
    shard = out / "train" / "00001"
    arr = np.arange(open_data(str(out)).shards("train")[1].n_tokens, dtype=np.uint8)
    open_data(str(out)).shards("train")[1].write_array("factual", arr)  # a derived array that must survive
    f = {"truncate tokens": "tokens.bin", "delete windows": "windows.npy", "truncate docs": "docs.jsonl"}[damage]
    path = out / "train" / f"00001.{f}"
    if damage.startswith("delete"):
        path.unlink()
    else:
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) - 7)
    with pytest.raises(ShardError) as e:
        open_data(str(out))
    msg = str(e.value)
    assert str(path) in msg and "memlm prepare --corpus bios --out" in msg and "--n-people 150" in msg
    logs = []
    _prep("bios", out, log=logs.append, **BIOS_KW)  # the remedy the message gives
    assert any("rebuilding" in line for line in logs)
    data = open_data(str(out))
    assert _shas(out) == before and data.manifest["complete"] and read_marker(str(out))["kind"] == "data"
    data.verify()
    assert np.array_equal(data.shards("train")[1].array("factual"), arr)  # tokens identical: array kept
    assert shard.with_suffix(".tokens.bin").exists()


def test_damaged_manifest_names_key_and_rebuild_works(bios_dir, tmp_path):
    out = _copy(bios_dir, tmp_path / "data")
    before = _shas(out)
    man = json.loads((out / "manifest.json").read_text())
    del man["dtype"]
    (out / "manifest.json").write_text(json.dumps(man))
    for call in (lambda: open_data(str(out)), lambda: _prep("bios", out, **BIOS_KW)):
        with pytest.raises(ShardError, match=r"manifest\.json: missing key 'dtype'.*--rebuild"):
            call()
    (out / "keep.txt").write_text("a user's file inside the data dir")
    with pytest.raises(OutputExistsError, match=r"keep\.txt.*--rebuild"):  # never deleted: named instead
        _prep("bios", out, rebuild=True, **BIOS_KW)
    assert (out / "keep.txt").read_text() == "a user's file inside the data dir"
    (out / "keep.txt").unlink()
    _prep("bios", out, rebuild=True, **BIOS_KW)
    assert _shas(out) == before and open_data(str(out)).manifest["dtype"] == "uint16"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary leftovers


def test_damaged_tokenizer_names_file_and_needs_rebuild(bios_dir, tmp_path):
    out = _copy(bios_dir, tmp_path / "data")
    f = out / "tokenizer" / "tokenizer.json"
    with open(f, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*truncated.*--rebuild"):
        open_data(str(out)).tokenizer()
    with pytest.raises(TokenizerError, match="--rebuild"):
        _prep("bios", out, **BIOS_KW)
    _prep("bios", out, rebuild=True, **BIOS_KW)
    open_data(str(out)).tokenizer()


def test_other_settings_name_the_key(bios_dir, tmp_path):
    out = _copy(bios_dir, tmp_path / "data")
    with pytest.raises(ConfigError, match=r"window_tokens.*--rebuild"):
        _prep("bios", out, window_tokens=64, **BIOS_KW)
    with pytest.raises(ConfigError, match=r"--vocab-size 600.*512"):
        _prep("bios", out, vocab_size=600, **BIOS_KW)



def test_an_omitted_flag_means_its_default(bios_dir, tmp_path, capsys):
    """Leaving --vocab-size out asks for the default vocabulary: a dir prepared with another one is refused,
    naming both values; giving its own value again is 'nothing to do'."""
    from data.prepare import DEFAULT_VOCAB

    out = _copy(bios_dir, tmp_path / "data")
    with pytest.raises(ConfigError, match=rf"--vocab-size {DEFAULT_VOCAB} \(the default\): .* prepared with "
                                          r"--vocab-size 512"):
        _prep("bios", out, vocab_size=None, **BIOS_KW)
    said = []
    _prep("bios", out, log=said.append, **BIOS_KW)  # the same command as the first one
    assert "nothing to do" in said[-1]


def test_output_dir_memlm_did_not_write_is_refused(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"text": "some words here"}])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="mine"):
        _prep(str(src), user, vocab_size=300, val_fraction=0.0)
    with pytest.raises(OutputExistsError, match="mine"):
        _prep(str(src), user, vocab_size=300, val_fraction=0.0, rebuild=True)
    assert os.listdir(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        _prep(str(src), afile, vocab_size=300, val_fraction=0.0)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine, and stays when the corpus fails
    with pytest.raises(CorpusError):
        _prep(str(tmp_path / "missing.jsonl"), empty, vocab_size=300)
    _prep(str(src), empty, vocab_size=300, val_fraction=0.0)
    assert read_marker(str(empty))["kind"] == "data" and (empty / MARKER).exists()


@pytest.mark.parametrize("name", ["empty.jsonl", "whitespace_only.txt"])
def test_empty_corpus_names_file_and_writes_nothing(tmp_path, name):
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases", name)
    with pytest.raises(CorpusError, match=rf"{name}: no documents"):
        _prep(src, tmp_path / "out", vocab_size=300, val_fraction=0.0)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CorpusError, match="went to the validation split"):
        _prep(str(_jsonl(tmp_path / "one.jsonl", [{"text": "only one document"}])), tmp_path / "o2",
              vocab_size=300, val_fraction=0.99)


def test_library_arguments_are_range_checked(tmp_path):
    from data.bios import BiosConfig, make_people
    from data.selection import SplitSignals, select
    from data.tagging import tag_tokens

    src = str(_jsonl(tmp_path / "c.jsonl", [{"text": "words"}]))
    for kw, key in [({"vocab_size": -5}, "vocab_size"), ({"vocab_size": 100}, "vocab_size"),
                    ({"val_fraction": 1.0}, "val_fraction"), ({"window_tokens": 1}, "window_tokens"),
                    ({"shard_tokens": 0}, "shard_tokens"), ({"workers": 0}, "workers"),
                    ({"max_docs": 0}, "max_docs"), ({"batch_docs": 0}, "batch_docs")]:
        with pytest.raises(ConfigError, match=key):
            prepare(src, str(tmp_path / "o"), progress=False, log=lambda *a: None, **kw)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="n_people"):
        make_people(BiosConfig(n_people=0))
    with pytest.raises(ConfigError, match="max_docs"):
        load_corpus("bios", max_docs=-1)
    with pytest.raises(ConfigError, match="mixture weight"):
        load_corpus("bios:0,wiki-leads:1")
    with pytest.raises(ConfigError, match="call_rate"):
        select("random", SplitSignals(eligible=np.ones(4, bool)), 1.5)
    with pytest.raises(ConfigError, match="batch_size"):
        tag_tokens(np.zeros(2, np.uint16), None, None, None, batch_size=0)


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

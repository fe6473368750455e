"""Text and tokenizer inputs a new user brings, beyond the cases of tests/test_data_text.py: tokenizers
with saved truncation/padding, CSV cells that look like NA or numbers, misspelled id columns, Unicode
whitespace between paragraphs, one-word megabyte documents, lone surrogates, UTF-16 files, JSON records
that are not objects, file names with commas, and a data dir given as --tokenizer."""
import json
import os
import re

import numpy as np
import pytest

from cli_harness import assert_clean_failure, run_memlm_inprocess, tree_hashes
from data.corpora import CorpusError, load_corpus
from data.prepare import prepare
from data.shards import open_data
from data.tokenizer import CALL, EOS, MAX_TRAIN_WORD, _cut_long_words, encode_text, train_tokenizer

QUIET = dict(progress=False, log=lambda *a: None)


def _texts(data_dir, split="train"):
    data = open_data(data_dir)
    tok, eos = data.tokenizer(), data.manifest["special_ids"]["eos"]
    out = []
    for sh in data.shards(split):
        ids = np.asarray(sh.tokens)
        ends = np.flatnonzero(ids == eos)
        starts = np.concatenate([[0], ends[:-1] + 1])
        out += [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]
    return out


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ---- tokenizers ------------------------------------------------------------------------------------
def _tokenizer_with_truncation_and_padding(path):
    """A tokenizer.json that truncates to 8 tokens and pads to 8 (as sentence-transformers ones do: 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["one two three four five six seven eight nine ten hi"] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.enable_truncation(8)
    t.enable_padding(pad_id=0, pad_token="[PAD]", length=8)
    os.makedirs(path, exist_ok=True)
    t.save(os.path.join(path, "tokenizer.json"))
    return str(path)


def test_saved_truncation_and_padding_never_cut_or_pad_documents(tmp_path):
    tok_dir = _tokenizer_with_truncation_and_padding(tmp_path / "tok")
    long = "one two three four five six seven eight nine ten " * 3
    src = _jsonl(tmp_path / "c.jsonl", [{"text": long.strip()}, {"text": "hi"}])
    out = str(tmp_path / "data")
    prepare(src, out, tokenizer=tok_dir, val_fraction=0.0, window_tokens=512, **QUIET)
    assert sorted(_texts(out)) == sorted([long.strip(), "hi"])  # whole, and no [PAD] in "hi"
    # the saved tokenizer has neither setting any more
    saved = json.load(open(os.path.join(out, "tokenizer", "tokenizer.json")))
    assert saved["truncation"] is None and saved["padding"] is None


def test_saved_tokenizers_keep_text_as_text_in_transformers(tmp_path):
    """DATA/tokenizer (and so a run's copy and an export) loaded by AutoTokenizer with no memlm code."""
    from transformers import AutoTokenizer

    src = _jsonl(tmp_path / "c.jsonl", [{"text": "a b c d e f g h"}] * 30)
    out = str(tmp_path / "data")
    prepare(src, out, vocab_size=300, val_fraction=0.0, window_tokens=64, **QUIET)
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    vocab = tok.get_vocab()
    ids = tok("a <|endoftext|> b <CALL>", add_special_tokens=False)["input_ids"]
    assert vocab[EOS] not in ids and vocab[CALL] not in ids
    assert tok.decode(ids) == "a <|endoftext|> b <CALL>"


def test_long_words_are_cut_for_the_trainer_only():
    assert _cut_long_words("short words stay") == "short words stay"
    cut = _cut_long_words("a " + "x" * (2 * MAX_TRAIN_WORD + 5) + " b")
    assert cut.split() == ["a", "x" * MAX_TRAIN_WORD, "x" * MAX_TRAIN_WORD, "xxxxx", "b"]
    # a 100k-character word (quadratic in the BPE trainer before: ~6 s; 5 MB: hours); encoding is exact
    text = "y" * 100_000 + " and a small tail"
    tok = train_tokenizer(iter([text, "small doc"]), 300)
    assert tok.decode(encode_text(tok, text)) == text


# ---- corpora ---------------------------------------------------------------------------------------
def test_csv_cells_are_text_as_written(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("id,text\n1,hello world\n2,NA\n3,null\n4,None\n5,nan\n6,#N/A\n7,2024\n8,\n")
    c = load_corpus(str(csv), id_column="id")
    docs = list(c)
    assert [d.text for d in docs] == ["hello world", "NA", "null", "None", "nan", "#N/A", "2024"]
    assert [d.id for d in docs] == ["1", "2", "3", "4", "5", "6", "7"]
    assert c.stats.empty_skipped == 1  # only the truly empty cell


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_misspelled_id_column_is_an_error(tmp_path, kind):
    path = tmp_path / f"f.{kind}"
    if kind == "jsonl":
        _jsonl(path, [{"content": "x", "url": "u1"}])
    elif kind == "json":
        path.write_text(json.dumps([{"content": "x", "url": "u1"}]))
    else:
        path.write_text("content,url\nx,u1\n")
    with pytest.raises(CorpusError, match=r"f\.%s.*id column 'urlx' not found.*url.*--id-column" % kind):
        list(load_corpus(str(path), text_column="content", id_column="urlx"))
    assert [d.id for d in load_corpus(str(path), text_column="content", id_column="url")] == ["u1"]


def test_unicode_whitespace_lines_separate_paragraphs(tmp_path):
    txt = tmp_path / "n.txt"
    txt.write_bytes("Para one\n\u00a0\nPara two\n\u3000\t\nPara three\n".encode("utf-8"))
    assert [d.text for d in load_corpus(str(txt), sample_by="paragraph")] == ["Para one", "Para two", "Para three"]


def test_lone_surrogates_are_replaced_and_counted(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"id": "\\ud800x", "text": "lone \\ud800 here"}\n{"id": "b", "text": "fine"}\n')
    c = load_corpus(str(src), id_column="id")
    docs = list(c)
    assert [d.text for d in docs] == ["lone \ufffd here", "fine"] and docs[0].id == "\ufffdx"
    assert c.stats.invalid_utf8_replaced == 1
    out = str(tmp_path / "data")
    prepare(str(src), out, vocab_size=300, val_fraction=0.0, window_tokens=64, id_column="id", **QUIET)
    assert sorted(_texts(out)) == ["fine", "lone \ufffd here"]


def test_prompts_with_surrogates_encode(tmp_path):
    tok = train_tokenizer(iter(["café au lait"] * 10), 300)
    # a non-UTF-8 command-line argument arrives as a surrogate escape
    assert tok.decode(encode_text(tok, "caf\udce9")) == "caf\ufffd"


@pytest.mark.parametrize("kind", ["jsonl", "json", "txt", "csv"])
@pytest.mark.parametrize("bom", [True, False])
def test_utf16_files_are_named_as_utf16(tmp_path, kind, bom):
    """With a byte-order mark, or without one (a NUL in every other byte); a binary file with a few NUL
    bytes is not taken for UTF-16 (its reader names the line)."""
    body = {"jsonl": '{"text": "hello"}\n', "json": '[{"text": "hello"}]', "txt": "hello\n",
            "csv": "text\nhello\n"}[kind]
    path = tmp_path / f"u.{kind}"
    path.write_bytes(body.encode("utf-16" if bom else "utf-16-le"))
    with pytest.raises(CorpusError, match=r"u\.%s: is UTF-16.*UTF-8" % kind):
        list(load_corpus(str(path)))


def test_json_records_that_are_not_objects(tmp_path):
    path = tmp_path / "strings.json"
    path.write_text('["a", "b"]')
    with pytest.raises(CorpusError, match=r"strings\.json: record 0: expected an object with a 'text' field, got str"):
        list(load_corpus(str(path)))
    jl = tmp_path / "strings.jsonl"
    jl.write_text('"just a string"\n')
    with pytest.raises(CorpusError, match=r"strings\.jsonl: line 1: expected a JSON object .*got str"):
        list(load_corpus(str(jl)))


def test_an_existing_file_with_a_comma_is_a_file_not_a_mixture(tmp_path):
    path = tmp_path / "notes, part1.txt"
    path.write_text("some notes")
    assert [d.text for d in load_corpus(str(path))] == ["some notes"]


def test_data_dir_as_tokenizer_names_its_tokenizer(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", [{"text": "a b c d e f g h"}] * 30)
    data = tmp_path / "data"
    prepare(src, str(data), vocab_size=300, val_fraction=0.0, window_tokens=64, **QUIET)
    before = tree_hashes(tmp_path)
    r = run_memlm_inprocess(["prepare", "--corpus", src, "--out", tmp_path / "d2", "--tokenizer", data,
                             "--no-progress"], cwd=tmp_path)
    assert_clean_failure(r, names=[str(data), os.path.join(str(data), "tokenizer")], before=before, root=tmp_path)


def test_a_damaged_array_names_the_command_that_writes_it_again(tmp_path):
    from data.shards import ShardError

    src = _jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i} a b c d e f"} for i in range(20)])
    out = str(tmp_path / "data")
    prepare(src, out, vocab_size=300, val_fraction=0.0, window_tokens=16, **QUIET)
    shard = open_data(out).shards("train")[0]
    want = {"paths": f"memlm cluster {out} --refit", "calls_lacy": f"memlm select {out}",
            "factual": f"memlm tag {out} --overwrite", "loss_ref": "--name ref --overwrite"}
    for name, hint in want.items():
        open(shard.file(f"{name}.npy"), "wb").write(b"not an array")
        with pytest.raises(ShardError, match=re.escape(hint)):
            shard.array(name)
    with pytest.raises(ShardError, match="shard file memlm prepare wrote"):
        shard.write_array("windows", np.zeros(shard.n_windows, dtype=np.int64))


def test_mixture_weights_are_finite_and_a_single_weighted_source_is_the_source(tmp_path):
    from model.errors import ConfigError

    src = _jsonl(tmp_path / "c.jsonl", [{"text": "one"}, {"text": "two"}])
    for spec in (f"bios:inf,{src}:1", f"bios:1e308,{src}:1e308", f"{src}:nan"):
        with pytest.raises(ConfigError, match="mixture weight"):
            list(load_corpus(spec, n_people=5))
    assert [d.text for d in load_corpus(f"{src}:1")] == ["one", "two"]
    assert len(list(load_corpus("bios:1", n_people=5))) > 0


def test_a_binary_file_is_not_called_utf16(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CorpusError, match=r"b\.jsonl: line 1"):
        list(load_corpus(str(path)))


def test_a_mixture_source_without_the_id_column_numbers_its_rows(tmp_path):
    ids = _jsonl(tmp_path / "ids.jsonl", [{"text": "a", "id": "x1"}])
    plain = _jsonl(tmp_path / "plain.jsonl", [{"text": "b"}])
    assert {d.id for d in load_corpus(f"{ids}:1,{plain}:1", id_column="id")} <= {"x1", "plain.jsonl:0"}


def test_one_prepare_writes_a_data_dir_at_a_time(tmp_path):
    from data.prepare import _one_writer
    from model.errors import OutputExistsError

    src = _jsonl(tmp_path / "c.jsonl", [{"text": "a b c d e f g h"}] * 30)
    out = str(tmp_path / "data")
    with _one_writer(out):  # another prepare of the same directory is running
        with pytest.raises(OutputExistsError, match=r"another memlm prepare is writing it"):
            prepare(src, out, vocab_size=300, val_fraction=0.0, window_tokens=64, **QUIET)
    prepare(src, out, vocab_size=300, val_fraction=0.0, window_tokens=64, **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "data"]  # the lock file is gone


def test_a_shard_damaged_at_its_size_is_named_and_prepare_repairs_it(tmp_path):
    """Same-size damage passes the size checks: training names the shard (not an IndexError in the
    embedding), and re-running the same prepare compares sha256 and rewrites it byte for byte."""
    from data.loader import PackedDataset
    from data.shards import ShardError

    src = _jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i} a b c d e f g h"} for i in range(40)])
    out = str(tmp_path / "data")
    kw = dict(vocab_size=300, val_fraction=0.0, window_tokens=32, **QUIET)
    prepare(src, out, **kw)
    path = os.path.join(out, "train", "00000.tokens.bin")
    good = open(path, "rb").read()
    open(path, "wb").write(b"\xff" * len(good))  # ids 65535 in a 300-token vocabulary
    ds = PackedDataset(out, "train", seq_len=16, batch_size=2, infinite=False, shuffle=False)
    with pytest.raises(ShardError, match=r"00000\.tokens\.bin: token id 65535 >= .*300.*memlm prepare"):
        next(iter(ds))
    logs = []
    prepare(src, out, **{**kw, "log": logs.append})
    assert open(path, "rb").read() == good and any("rebuilding" in str(x) for x in logs)


def test_resume_refuses_data_prepared_again_with_other_documents(tmp_path):
    """A checkpoint records its data's fingerprint: resuming on other shards under the same path (a
    --rebuild with another seed) would read its saved data position in other documents."""
    from model.errors import ConfigError
    from train.pretrain import main

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "recipes",
                          "tiny-cpu.yaml")
    data = str(tmp_path / "data")
    prepare("bios", data, vocab_size=300, val_fraction=0.1, window_tokens=64, n_people=30, top_docs=10, **QUIET)
    args = ["--config", recipe, f"data.path={data}", f"runs_dir={tmp_path}", "name=r", "data.seq_len=32",
            "data.batch_size=2", "trainer.val_every=0", "logging.logger=none", "optim.warmup_steps=1"]
    assert main(args + ["trainer.max_steps=2"]) == 0
    prepare("bios", data, vocab_size=300, val_fraction=0.1, window_tokens=64, n_people=30, top_docs=10, seed=5,
            rebuild=True, **QUIET)
    with pytest.raises(ConfigError, match=r"data\.path=.*not the ones .*step-0000002 trained on"):
        main(args + ["trainer.max_steps=2"])


def test_a_link_loop_in_a_corpus_directory_is_not_followed(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    _jsonl(d / "a.jsonl", [{"text": f"doc {i}"} for i in range(3)])
    (d / "self").symlink_to(d)
    (d / "up").symlink_to(tmp_path)
    assert [x.text for x in load_corpus(str(d))] == ["doc 0", "doc 1", "doc 2"]


def test_stop_text_matches_as_generated_or_before_trailing_space():
    from train.lacy.cascade import stop_reached

    assert stop_reached("one two ", " ") and stop_reached("a line\n", "\n") and stop_reached("Done. ", ".")
    assert not stop_reached("Done", ".") and not stop_reached("Done.", None)


@pytest.mark.parametrize("env,name", [({"WORLD_SIZE": "0"}, "WORLD_SIZE"), ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
                                      ({"RANK": "1"}, "RANK=1")])
def test_torchrun_environment_is_checked(monkeypatch, env, name):
    from model.errors import ConfigError
    from train.pretrain import _env_world

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=name):
        _env_world()


def test_file_extensions_are_case_insensitive(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "A.JSONL").write_text('{"text": "upper"}\n')
    (d / "b.Txt").write_text("mixed")
    assert sorted(x.text for x in load_corpus(str(d))) == ["mixed", "upper"]
    assert [x.text for x in load_corpus(str(d / "A.JSONL"))] == ["upper"]


def test_a_csv_header_naming_a_column_twice(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,text\na,b\n")
    with pytest.raises(CorpusError, match=r"d\.csv: the header names column\(s\) \['text'\] twice"):
        list(load_corpus(str(csv)))


# ---- compressed files and files of other types ---------------------------------------------------
def test_compressed_files_read_as_their_plain_version(tmp_path, capsys):
    import bz2
    import gzip
    import lzma

    recs = [{"id": f"d{i}", "text": f"document {i}\r\nsecond line"} for i in range(4)]
    plain = "".join(json.dumps(r) + "\n" for r in recs).encode()
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_bytes(plain)
    (d / "b.jsonl.GZ").write_bytes(gzip.compress(plain))
    (d / "c.jsonl.bz2").write_bytes(bz2.compress(plain))
    (d / "d.csv.gz").write_bytes(gzip.compress(b"id,text\nx1,NA\nx2,2024\n"))
    (d / "e.txt.xz").write_bytes(lzma.compress(b"one\r\n\r\ntwo"))
    (d / "f.jsonl.zst").write_bytes(b"not read")
    docs = list(load_corpus(str(d), id_column="id", id_required=False, sample_by="paragraph"))
    texts = [t for _, t in docs]
    assert texts[:4] == texts[4:8] == texts[8:12] == [r["text"] for r in recs]
    assert texts[12:] == ["NA", "2024", "one", "two"]
    err = capsys.readouterr().err
    assert "skipping 1 file(s)" in err and "f.jsonl.zst" in err


@pytest.mark.parametrize("name", ["c.jsonl.gz", "c.csv.gz", "c.csv.xz"])
def test_truncated_compressed_file_is_named(tmp_path, name):
    import gzip
    import lzma

    if ".csv" in name:
        plain = ("id,text\n" + "".join(f"r{i},row {i} " + "word " * 50 + "\n" for i in range(200))).encode()
    else:
        plain = b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200))
    raw = (gzip if name.endswith(".gz") else lzma).compress(plain)
    path = tmp_path / name
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorpusError, match=re.escape(name) + r": damaged \.(gz|xz) file"):
        list(load_corpus(str(path)))


def test_unsupported_compression_refused_with_what_is_read(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(b"x")
    with pytest.raises(CorpusError, match=r"c\.jsonl\.zst: unknown file type .*\.gz"):
        list(load_corpus(str(path)))


def test_tokenizer_of_a_memlm_folder_of_another_kind_loads(tmp_path):
    """An export-hf folder holds the run's tokenizer files beside the weights: `--tokenizer EXPORT` loads it
    (it was refused as "a memlm 'hf-export' directory, expected 'tokenizer'"); a damaged one is named."""
    from model.atomic import write_marker
    from data.tokenizer import TokenizerError, load_tokenizer

    export = tmp_path / "hf"
    train_tokenizer(["one two three four five six seven"] * 20, 300, out_dir=str(export))
    (export / "config.json").write_text("{}")
    write_marker(str(export), "hf-export")
    tok = load_tokenizer(str(export), add_missing=True)
    assert CALL in tok.get_vocab()
    with open(export / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(TokenizerError, match="config.json"):
        load_tokenizer(str(export))

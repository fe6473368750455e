"""Bad inputs to `memlm prepare` and `memlm tag`: each row runs the real command in a subprocess
(tests/cli_harness.py) and asserts a non-zero exit, one error line naming the file/flag/key, no
traceback, and every file that existed before byte-identical afterwards."""
import json
import os
import shutil

import numpy as np
import pytest

from cli_harness import assert_clean_failure, run_memlm, tree_hashes

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases")
FAST = ["--vocab-size", "300", "--val-fraction", "0", "--no-progress"]


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    """A tiny complete data dir (prepared in-process once; rows copy it before damaging it)."""
    from data.prepare import prepare

    root = tmp_path_factory.mktemp("good")
    src = root / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"Ada Lovelace wrote note {i} in London in 1843."}) + "\n"
                           for i in range(40)))
    out = root / "data"
    prepare(str(src), str(out), vocab_size=300, val_fraction=0.0, window_tokens=16, shard_tokens=200,
            progress=False, log=lambda *a: None)
    return out


def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _case(name, tmp):
    return shutil.copy(os.path.join(CASES, name), tmp / name)


def _data(tmp, good):
    return shutil.copytree(good, tmp / "data")


def _truncate(path, n=5):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - n)


# Each row: (id, build(tmp, good) -> (argv, names)). `names` must all appear in the one error line.
def _prepare_file(name, content, extra=(), names=("{f}",)):
    def build(tmp, good):
        f = _write(tmp / name, content)
        return (["prepare", "--corpus", f, "--out", tmp / "out", *FAST, *extra],
                [n.format(f=f) for n in names])
    return build


def _prepare_case(name, names):
    def build(tmp, good):
        f = _case(name, tmp)
        return ["prepare", "--corpus", f, "--out", tmp / "out", *FAST], [n.format(f=f) for n in names]
    return build


def _prepare_flags(flags, names):
    def build(tmp, good):
        f = _write(tmp / "c.jsonl", '{"text": "a few words"}\n')
        return ["prepare", "--corpus", f, "--out", tmp / "out", "--no-progress", *flags], names
    return build


def _damaged_prepare(damage, names, extra=()):
    def build(tmp, good):
        d = _data(tmp, good)
        src = json.loads((d / "manifest.json").read_text())["source"]
        damage(d)
        return (["prepare", "--corpus", src, "--out", d, "--vocab-size", "300", "--val-fraction", "0",
                 "--window-tokens", "16", "--shard-tokens", "200", "--no-progress", *extra],
                [n.format(d=d) for n in names])
    return build


def _drop_dtype(d):
    m = json.loads((d / "manifest.json").read_text())
    del m["dtype"]
    (d / "manifest.json").write_text(json.dumps(m))


def _tag(damage=None, flags=(), names=("{d}",), target=None):
    def build(tmp, good):
        d = _data(tmp, good)
        if damage is not None:
            damage(d)
        t = d if target is None else target(tmp, d)
        return ["tag", t, *flags], [n.format(d=d, t=t) for n in names]
    return build


def _incomplete(d):
    m = json.loads((d / "manifest.json").read_text())
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))


ROWS = [
    # --- prepare: the cases of tests/cases (V4, T2, V1) ---
    ("empty-jsonl", _prepare_case("empty.jsonl", ["{f}", "no documents"])),
    ("whitespace-only-txt", _prepare_case("whitespace_only.txt", ["{f}", "no documents"])),
    ("nonstring-int-text", _prepare_case("nonstring_text.jsonl", ["{f}", "line 2", "int"])),
    ("list-text", _prepare_file("l.jsonl", '{"text": ["a list", "of strings"]}\n', names=("{f}", "line 1", "list"))),
    ("json-record-object-text", _prepare_file("r.json", '[{"text": {"a": 1}}]', names=("{f}", "record 0"))),
    ("vocab-size-negative", _prepare_flags(["--vocab-size", "-5"], ["--vocab-size"])),
    ("vocab-size-below-bytes", _prepare_flags(["--vocab-size", "100"], ["--vocab-size", "259"])),
    ("val-fraction-one", _prepare_flags(["--val-fraction", "1"], ["--val-fraction"])),
    ("val-fraction-nan", _prepare_flags(["--val-fraction", "nan"], ["--val-fraction"])),
    ("window-tokens-one", _prepare_flags(["--window-tokens", "1"], ["--window-tokens"])),
    ("shard-tokens-zero", _prepare_flags(["--shard-tokens", "0"], ["--shard-tokens"])),
    ("workers-zero", _prepare_flags(["--workers", "0"], ["--workers"])),
    ("max-docs-text", _prepare_flags(["--max-docs", "ten"], ["--max-docs"])),
    ("n-people-zero", _prepare_flags(["--n-people", "0"], ["--n-people"])),
    ("sample-by-unknown", _prepare_flags(["--sample-by", "sentence"], ["--sample-by"])),
    ("tokenizer-and-vocab", _prepare_flags(["--tokenizer", "x", "--vocab-size", "300"], ["--vocab-size"])),
    # --- prepare: corpora that cannot be read ---
    ("unknown-corpus", lambda tmp, good: (["prepare", "--corpus", "no-such-corpus", "--out", tmp / "o"],
                                          ["no-such-corpus", "unknown corpus"])),
    ("mixture-zero-weight", lambda tmp, good: (["prepare", "--corpus", "bios:0,wiki-leads:1", "--out", tmp / "o"],
                                               ["bios", "weight"])),
    ("missing-file", lambda tmp, good: (["prepare", "--corpus", tmp / "nothere.jsonl", "--out", tmp / "o"],
                                        [str(tmp / "nothere.jsonl"), "not found"])),
    ("dangling-symlink", lambda tmp, good: (os.symlink(tmp / "gone.jsonl", tmp / "link.jsonl"),
                                            (["prepare", "--corpus", tmp / "link.jsonl", "--out", tmp / "o"],
                                             [str(tmp / "link.jsonl")]))[1]),
    ("directory-without-corpus-files", lambda tmp, good: (os.makedirs(tmp / "dir.jsonl"),
                                                          (["prepare", "--corpus", tmp / "dir.jsonl", "--out", tmp / "o"],
                                                           [str(tmp / "dir.jsonl"), "no"]))[1]),
    ("unknown-extension", _prepare_file("c.tsv", "text\nhello\n", names=("{f}", "unknown file type"))),
    ("binary-jsonl", _prepare_file("b.jsonl", bytes(range(256)) * 4, names=("{f}", "line 1"))),
    ("binary-txt-nul", _prepare_file("b.txt", b"text\x00\x01\x02 more", names=("{f}", "NUL"))),
    ("garbage-parquet", _prepare_file("g.parquet", b"PAR1 this is not parquet", names=("{f}",))),
    ("unknown-column", _prepare_file("c.jsonl", '{"content": "x"}\n', names=("{f}", "'text'", "content"))),
    ("invalid-json-line-3", _prepare_file("c.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n',
                                          names=("{f}", "line 3"))),
    ("json-scalar", _prepare_file("s.json", "42", names=("{f}",))),
    ("tokenizer-missing", _prepare_flags(["--tokenizer", "/nonexistent/tok"], ["/nonexistent/tok"])),
    # --- prepare: the output directory ---
    ("out-is-a-file", lambda tmp, good: (_write(tmp / "afile", "x"),
                                         (["prepare", "--corpus", _write(tmp / "c.jsonl", '{"text": "w"}\n'),
                                           "--out", tmp / "afile", *FAST], [str(tmp / "afile")]))[1]),
    ("out-under-a-file", lambda tmp, good: (_write(tmp / "afile", "x"),
                                            (["prepare", "--corpus", _write(tmp / "c.jsonl", '{"text": "w"}\n'),
                                              "--out", tmp / "afile" / "sub", *FAST], [str(tmp / "afile")]))[1]),
    ("out-holds-user-files", lambda tmp, good: (os.makedirs(tmp / "mine"), _write(tmp / "mine" / "notes.txt", "keep"),
                                                (["prepare", "--corpus", _write(tmp / "c.jsonl", '{"text": "w"}\n'),
                                                  "--out", tmp / "mine", *FAST, "--rebuild"],
                                                 [str(tmp / "mine"), "did not write"]))[2]),
    ("out-other-settings", _damaged_prepare(lambda d: None, ["{d}", "window_tokens", "--rebuild"],
                                            extra=["--window-tokens", "32"])),
    # --- prepare on a damaged data dir (V5) ---
    ("manifest-missing-dtype", _damaged_prepare(_drop_dtype, ["{d}/manifest.json", "'dtype'", "--rebuild"])),
    ("manifest-not-json", _damaged_prepare(lambda d: _write(d / "manifest.json", "{oops"),
                                           ["{d}/manifest.json", "--rebuild"])),
    ("tokenizer-truncated", _damaged_prepare(lambda d: _truncate(d / "tokenizer" / "tokenizer.json", 50),
                                             ["{d}/tokenizer/tokenizer.json", "--rebuild"])),
    # --- tag ---
    ("tag-empty-dir", _tag(target=lambda tmp, d: (os.makedirs(tmp / "empty"), tmp / "empty")[1],
                           names=("{t}/manifest.json", "memlm prepare"))),
    ("tag-a-file", _tag(target=lambda tmp, d: _write(tmp / "f.txt", "x"), names=("{t}",))),
    ("tag-batch-size-zero", _tag(flags=["--batch-size", "0"], names=("--batch-size",))),
    ("tag-processes-negative", _tag(flags=["--processes", "-1"], names=("--processes",))),
    ("tag-unknown-split", _tag(flags=["--splits", "trian"], names=("--splits", "trian"))),
    ("tag-unknown-pos", _tag(flags=["--pos", "PROPN,NOUNZ"], names=("--pos", "NOUNZ"))),
    ("tag-missing-spacy-model", _tag(flags=["--spacy-model", "xx_no_model"], names=("xx_no_model",))),
    ("tag-truncated-shard", _tag(lambda d: _truncate(d / "train" / "00000.tokens.bin", 2),
                                 names=("{d}/train/00000.tokens.bin", "memlm prepare"))),
    ("tag-missing-windows", _tag(lambda d: os.remove(d / "train" / "00001.windows.npy"),
                                 names=("{d}/train/00001.windows.npy", "memlm prepare"))),
    ("tag-incomplete-data", _tag(_incomplete, names=("{d}/manifest.json", "did not finish"))),
    ("tag-damaged-manifest", _tag(_drop_dtype, names=("{d}/manifest.json", "'dtype'"))),
    ("tag-damaged-tokenizer", _tag(lambda d: _truncate(d / "tokenizer" / "tokenizer.json", 50),
                                   names=("{d}/tokenizer/tokenizer.json",))),
]


@pytest.mark.parametrize("build", [b for _, b in ROWS], ids=[i for i, _ in ROWS])
def test_bad_input_fails_cleanly(tmp_path, good_data, build):
    argv, names = build(tmp_path, good_data)
    before = tree_hashes(tmp_path)
    result = run_memlm(argv, cwd=tmp_path)
    assert_clean_failure(result, names=names, before=before, root=tmp_path)


def test_remedy_of_a_damaged_data_dir_works(tmp_path, good_data):
    """The V5 loop through the real command: the error names a command, and that command repairs."""
    d = _data(tmp_path, good_data)
    _truncate(d / "train" / "00000.tokens.bin", 3)
    line = assert_clean_failure(run_memlm(["tag", d], cwd=tmp_path), names=[str(d / "train" / "00000.tokens.bin")])
    remedy = line.split("re-run `", 1)[1].split("`", 1)[0]
    assert remedy.startswith("memlm prepare ")
    fixed = run_memlm(remedy.split()[1:], cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert tree_hashes(d / "train") == tree_hashes(good_data / "train")
    from data.shards import open_data
    open_data(str(d)).verify()
    assert np.array_equal(np.asarray(open_data(str(d)).shards("train")[0].tokens),
                          np.asarray(open_data(str(good_data)).shards("train")[0].tokens))

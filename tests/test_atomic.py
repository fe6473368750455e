"""model/atomic.py and model/errors.py: crash-safe writes, ownership markers, torn log lines, range checks."""
import json
import os

import numpy as np
import pytest

from model.atomic import (MARKER, JsonlAppender, atomic_dir, atomic_path, atomic_write, atomic_write_json,
                          check_output_dir, read_jsonl, read_marker, remove_dir, remove_leftovers, verify_dir)
from model.errors import CheckpointError, ConfigError, DataError, MemlmError, OutputExistsError, check_range


def test_atomic_write_replaces_and_failure_keeps_old(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(str(p), {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(str(p)) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("killed")
    assert json.loads(p.read_text()) == {"x": 1}
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left behind


def test_atomic_path_keeps_suffix_for_np_save(tmp_path):
    p = tmp_path / "arr.npy"
    with atomic_path(str(p)) as tmp:
        np.save(tmp, np.arange(3))  # np.save adds .npy when missing: the temp name must already end in it
    assert np.load(p).tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["arr.npy"]


def test_atomic_dir_marker_last_and_verify(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(str(out), "hf-export") as d:
        open(os.path.join(d, "w.bin"), "wb").write(b"12345")
        os.makedirs(os.path.join(d, "sub"))
        open(os.path.join(d, "sub", "t.txt"), "w").write("hi")
        assert not out.exists()  # nothing at the target until complete
    m = verify_dir(str(out), "hf-export")
    assert m["files"] == {"w.bin": 5, os.path.join("sub", "t.txt"): 2}
    # truncation is detected, naming the file
    with open(out / "w.bin", "wb") as f:
        f.write(b"123")
    with pytest.raises(CheckpointError, match=r"w\.bin: 3 bytes, 5 expected"):
        verify_dir(str(out))
    os.remove(out / MARKER)
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_dir(str(out))


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_dir(str(out), "x") as d:
            open(os.path.join(d, "f"), "w").write("x")
            raise ValueError("boom")
    assert os.listdir(tmp_path) == []


def test_existing_targets(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    for replace in (False, True):
        with pytest.raises(OutputExistsError, match="did not write"):
            with atomic_dir(str(foreign), "hf-export", replace=replace):
                pass
    assert (foreign / "mine.txt").read_text() == "user data"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(str(empty), "hf-export") as d:  # an empty directory is fine
        open(os.path.join(d, "f"), "w").write("x")
    assert read_marker(str(empty))["kind"] == "hf-export"
    with pytest.raises(OutputExistsError, match="--force"):  # our own output needs the flag
        check_output_dir(str(empty), "hf-export")
    assert check_output_dir(str(empty), "hf-export", replace=True)
    with pytest.raises(OutputExistsError, match="'hf-export'"):  # another kind is never replaced
        check_output_dir(str(empty), "demo", replace=True)
    monkeypatch.chdir(empty)
    with pytest.raises(OutputExistsError, match="working directory"):
        check_output_dir(".", "hf-export", replace=True)
    with pytest.raises(OutputExistsError, match="working directory"):
        check_output_dir(str(tmp_path), "hf-export", replace=True)


def test_remove_dir_only_marked(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "f").write_text("x")
    with pytest.raises(OutputExistsError):
        remove_dir(str(a), "ckpt")
    assert (a / "f").exists()
    with atomic_dir(str(tmp_path / "b"), "ckpt") as d:
        open(os.path.join(d, "f"), "w").write("x")
    remove_dir(str(tmp_path / "b"), "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_remove_leftovers_only_ours(tmp_path):
    (tmp_path / ".step-0000004.tmp-123-0123abcd").mkdir()
    (tmp_path / ".x.del-9-deadbeef").write_text("")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "step-0000004.tmp").mkdir()
    removed = remove_leftovers(str(tmp_path))
    assert len(removed) == 2
    assert sorted(os.listdir(tmp_path)) == [".hidden", "step-0000004.tmp"]


def test_jsonl_torn_tail(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(str(p)) == [{"step": 1}, {"step": 2}]
    app = JsonlAppender(str(p))
    app.append({"step": 3})
    assert read_jsonl(str(p)) == [{"step": 1}, {"step": 2}, {"step": 3}]
    p.write_bytes(b'{"step": 1}')  # complete row, newline missing: kept, and the next row goes on a new line
    JsonlAppender(str(p)).append({"step": 2})
    assert read_jsonl(str(p)) == [{"step": 1}, {"step": 2}]
    p.write_bytes(b'{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_jsonl(str(p))
    assert read_jsonl(str(tmp_path / "missing.jsonl")) == []


def test_check_range():
    assert check_range("data.batch_size", 4, min=1) == 4
    with pytest.raises(ConfigError, match=r"^data\.batch_size=-2: must be >= 1$"):
        check_range("data.batch_size", -2, min=1)
    with pytest.raises(ConfigError, match=r"^--call-rate 1.5: must be > 0 and <= 1$"):
        check_range("--call-rate", 1.5, min=0, min_open=True, max=1)
    with pytest.raises(ConfigError):
        check_range("optim.lr", float("nan"), min=0)
    assert issubclass(ConfigError, MemlmError) and issubclass(ConfigError, ValueError)

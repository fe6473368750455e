"""model/atomic.py and model/errors.py: crash-safe writes, ownership markers, torn log lines, range checks."""
import json
import os

import numpy as np
import pytest

from model.atomic import (MARKER, JsonlAppender, add_entries, atomic_dir, atomic_path, atomic_write, atomic_write_json,
                          check_output_dir, claim_work_dir, read_jsonl, read_marker, remove_dir, remove_leftovers,
                          verify_dir, write_marker)
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


def test_replace_and_remove_keep_files_memlm_did_not_write(tmp_path):
    """A file or folder a user puts inside a memlm output is never deleted by --force, --rebuild, removal or
    a redo: the command refuses and names it; files other commands add later to its kind are memlm's."""
    from model.atomic import foreign_entries, remove_work_entry

    out = tmp_path / "hf"
    with atomic_dir(str(out), "hf-export") as d:
        os.makedirs(os.path.join(d, "sub"))
        open(os.path.join(d, "sub", "w.bin"), "w").write("x")
    assert foreign_entries(str(out)) == []
    (out / "NOTES.md").write_text("mine")
    (out / "mine").mkdir()
    assert foreign_entries(str(out)) == ["NOTES.md", "mine"]
    with pytest.raises(OutputExistsError, match=r"NOTES\.md, mine.*--force"):
        check_output_dir(str(out), "hf-export", replace=True)
    with pytest.raises(OutputExistsError, match=r"NOTES\.md"):
        remove_dir(str(out), "hf-export")
    assert (out / "NOTES.md").read_text() == "mine" and (out / "sub" / "w.bin").exists()
    # a data dir: the router and selection reports come later from other commands, and are memlm's
    data = tmp_path / "data"
    with atomic_dir(str(data), "data") as d:
        open(os.path.join(d, "manifest.json"), "w").write("{}")
    (data / "router.json").write_text("{}")
    (data / "selection").mkdir()
    assert foreign_entries(str(data)) == []
    assert check_output_dir(str(data), "data", replace=True)
    # a marked output inside a job's work dir (the demo's data): --redo refuses while a user file is in it
    job = tmp_path / "job"
    claim_work_dir(str(job), "demo")
    with atomic_dir(str(job / "data"), "data") as d:
        open(os.path.join(d, "manifest.json"), "w").write("{}")
    add_entries(str(job), ["data"])
    (job / "data" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"notes\.txt.*redoing"):
        remove_work_entry(str(job), "demo", str(job / "data"))
    assert (job / "data" / "notes.txt").exists()
    (job / "data" / "notes.txt").unlink()
    remove_work_entry(str(job), "demo", str(job / "data"))
    assert not (job / "data").exists()


def test_pruning_keeps_a_checkpoint_holding_a_user_file(tmp_path, capsys):
    from types import SimpleNamespace

    from train.checkpoint import KIND, Checkpointer, step_dir_name

    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        with atomic_dir(str(ckpt / step_dir_name(step)), KIND) as d:
            open(os.path.join(d, "meta.json"), "w").write("{}")
    (ckpt / step_dir_name(1) / "notes.txt").write_text("mine")
    fake = SimpleNamespace(cfg=SimpleNamespace(checkpoint=SimpleNamespace(keep_last_k=2)), ckpt_dir=str(ckpt))
    Checkpointer.prune(fake, 4)
    assert sorted(os.listdir(ckpt)) == [step_dir_name(s) for s in (1, 3, 4)]
    assert (ckpt / step_dir_name(1) / "notes.txt").read_text() == "mine"
    assert "keeping" in capsys.readouterr().err


def test_output_dir_edge_cases(tmp_path):
    """A symlink target is named as one; a path inside a run's checkpoints/ is refused; a damaged marker is
    named as damaged; a killed writer's hidden copy of the same target is removed by the next write."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        check_output_dir(str(tmp_path / "link"), "hf-export")
    ckpts = tmp_path / "run" / "checkpoints"
    with atomic_dir(str(ckpts / "step-0000001"), "checkpoint") as d:
        open(os.path.join(d, "meta.json"), "w").write("{}")
    with pytest.raises(OutputExistsError, match="checkpoints directory"):
        check_output_dir(str(ckpts / "step-0000002"), "hf-export")
    (ckpts / "step-0000001" / MARKER).write_text("{torn")
    with pytest.raises(CheckpointError, match=r"\.memlm\.json: unreadable"):
        verify_dir(str(ckpts / "step-0000001"))
    dead = tmp_path / ".out.tmp-999999999-0123abcd"  # no such process
    dead.mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"  # this process: may still be writing it
    live.mkdir()
    with atomic_dir(str(tmp_path / "out"), "hf-export") as d:
        open(os.path.join(d, "f"), "w").write("x")
    assert not dead.exists() and live.exists()


def test_a_run_directory_has_one_writer(tmp_path):
    from model.errors import ConfigError
    from train.checkpoint import LOCK, check_fresh_run_dir, lock_run_dir

    run = str(tmp_path / "run")
    held = lock_run_dir(run)
    with pytest.raises(ConfigError, match=r"another memlm pretrain is writing this run"):
        lock_run_dir(run)
    held.release()
    lock_run_dir(run).release()  # free again
    assert os.path.exists(os.path.join(run, LOCK))
    check_fresh_run_dir(run)  # a lock file left by a run killed before config.yaml is not a stray


def test_a_resume_never_replaces_a_later_checkpoint_holding_a_user_file(tmp_path):
    from train.checkpoint import KIND, check_later_steps, step_dir_name

    run = tmp_path / "run"
    for step in (4, 8):
        with atomic_dir(str(run / "checkpoints" / step_dir_name(step)), KIND) as d:
            open(os.path.join(d, "meta.json"), "w").write("{}")
    check_later_steps(str(run), 4)
    (run / "checkpoints" / step_dir_name(8) / "NOTES.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"step-0000008: holds NOTES\.txt.*resuming from step 4"):
        check_later_steps(str(run), 4)
    check_later_steps(str(run), 8)  # resuming from the newest rewrites nothing
    os.remove(run / "checkpoints" / step_dir_name(8) / "NOTES.txt")  # an eval an older memlm wrote inside the step
    ev = run / "checkpoints" / step_dir_name(8) / "eval"
    ev.mkdir()
    (ev / "eval.json").write_text("{}")
    write_marker(str(ev), "eval")
    with pytest.raises(OutputExistsError, match=r"step-0000008: holds eval, not part of the checkpoint \(eval: a memlm "
                                                 r"output written inside it by an older memlm\).*resuming from step 4"):
        check_later_steps(str(run), 4)
    # a symbolic link to the checkpoints folder is refused as an output like the folder itself
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ck").symlink_to(run / "checkpoints")
    with pytest.raises(OutputExistsError, match="checkpoints directory"):
        check_output_dir(str(tmp_path / "out" / "ck" / "x"), "hf-export")


def test_memory_bank_dir_is_never_a_data_dir_a_checkpoint_or_a_folder_of_other_files(tmp_path, monkeypatch):
    from model.errors import ConfigError
    from train.build import check_bank_dir

    data = tmp_path / "data"
    with atomic_dir(str(data), "data") as d:
        open(os.path.join(d, "manifest.json"), "w").write("{}")
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    with atomic_dir(str(ckpt), "checkpoint") as d:
        open(os.path.join(d, "meta.json"), "w").write("{}")
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    for bad, why in [(data, "data or checkpoint"), (data / "train", "data or checkpoint"),
                     (ckpt, "data or checkpoint"), (tmp_path / "f.txt", "is a file"), (tmp_path / "mine", "notes.txt")]:
        with pytest.raises(ConfigError, match=r"memory\.bank_dir=.*" + why):
            check_bank_dir(str(bad))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="working directory"):
        check_bank_dir(".")
    live = tmp_path / "live"
    live.mkdir()
    (live / "level1.rank0-of-1.safetensors").write_bytes(b"x")
    check_bank_dir(str(live))  # a previous run's live files: rewritten
    check_bank_dir(str(tmp_path / "new"))

"""Resource failures on writes (break-train items 5, 6): a full disk, a file-size limit, a path that cannot
be created (under a file, a name too long, a FILE named `checkpoints`) end every memlm command in one line
naming the path, the OS reason and the fix, exit code 2, before any training step where they can be
checked; other OS errors keep their traceback (a bug). Tests run as root (chmod does not bite): paths under
a file give ENOTDIR, and monkeypatched writers or RLIMIT_FSIZE give ENOSPC / EFBIG."""
from __future__ import annotations

import errno
import os
import resource
import shutil

import pytest

from cli_harness import assert_clean_failure, run_memlm_inprocess, tree_hashes
from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """In-process runs: one intra-op thread."""


def _args(data, runs, name, steps=2, **over):
    kv = {"data.path": data, "runs_dir": runs, "name": name, "trainer.max_steps": steps, "data.seq_len": 32,
          "data.batch_size": 2, "optim.warmup_steps": 1, "trainer.val_every": 0, "checkpoint.every": 1,
          "checkpoint.keep_last_k": 0,
          "logging.logger": "none"}
    kv.update(over)
    return ["pretrain", "--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()]


def test_run_command_turns_write_errors_into_one_line_and_keeps_bugs():
    from train.cli import run_command

    def fails(exc):
        def main(argv):
            raise exc
        return main

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_command("memlm prepare", fails(OSError(errno.ENOSPC, "No space left on device", "/d/x.npy")), [])
    assert rc == 2
    line = err.getvalue().strip()
    assert "\n" not in line and line.startswith("memlm prepare: cannot write /d/x.npy: No space left on device "
                                                 "[ENOSPC]; free space and re-run")
    # how a Rust writer (safetensors) reports a file-size limit
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_command("memlm export-hf", fails(RuntimeError("I/O error: File too large (os error 27)")), [])
    assert rc == 2 and "File too large [EFBIG]; raise the file-size limit (ulimit -f)" in err.getvalue()
    for bug in (FileNotFoundError(errno.ENOENT, "No such file or directory", "x"), OSError(errno.EBADF, "bad fd"),
                KeyError("x"), RuntimeError("os error 2")):
        with pytest.raises(type(bug)):
            run_command("memlm pretrain", fails(bug), [])


def test_runs_dir_under_a_file_and_a_name_too_long_are_one_line(bios_data, tmp_path):  # noqa: F811
    afile = tmp_path / "afile"
    afile.write_text("hi")
    before = tree_hashes(tmp_path)
    result = run_memlm_inprocess(_args(bios_data, afile, "x"), tmp_path)
    assert_clean_failure(result, names=[str(afile / "x"), "runs_dir= / name=", "Not a directory", "ENOTDIR"],
                         before=before, root=tmp_path)
    result = run_memlm_inprocess(_args(bios_data, tmp_path / "runs", "a" * 300), tmp_path)
    assert_clean_failure(result, names=["a" * 300, "File name too long", "ENAMETOOLONG", "choose a shorter one"])
    assert result.returncode == 2


def test_a_file_named_checkpoints_is_refused_before_training(bios_data, tmp_path):  # noqa: F811
    from train.cli import main

    assert main(_args(bios_data, tmp_path, "c", 1)) == 0  # a run dir with config.yaml
    run = tmp_path / "c"
    for name in os.listdir(run):  # keep only config.yaml (the break-train repro)
        if name != "config.yaml":
            shutil.rmtree(run / name) if (run / name).is_dir() else os.remove(run / name)
    (run / "checkpoints").write_text("")
    before = tree_hashes(tmp_path)
    result = run_memlm_inprocess(_args(bios_data, tmp_path, "c", 2), tmp_path)
    assert_clean_failure(result, names=[str(run / "checkpoints"), "is not a directory"], before=before,
                         root=tmp_path)
    assert not (run / "metrics.jsonl").exists()  # no step was trained


def test_disk_full_during_a_checkpoint_save_is_one_line_and_resumes(bios_data, tmp_path, monkeypatch):  # noqa: F811
    from train import checkpoint
    from train.cli import main

    save_weights = checkpoint.save_weights

    def full(sd, path):
        if "step-0000002" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        save_weights(sd, path)

    monkeypatch.setattr(checkpoint, "save_weights", full)
    result = run_memlm_inprocess(_args(bios_data, tmp_path, "full", 3), tmp_path)
    run = tmp_path / "full"
    line = assert_clean_failure(result, names=[str(run / "checkpoints" / "step-0000002"), "No space left on device",
                                               "ENOSPC", "free space and re-run",
                                               f"resumes from {run / 'checkpoints' / 'step-0000001'}"])
    assert result.returncode == 2 and line.startswith("memlm pretrain: cannot write checkpoint")
    assert sorted(os.listdir(run / "checkpoints")) == ["step-0000001"]  # the partial step-2 is gone
    monkeypatch.undo()
    assert main(_args(bios_data, tmp_path, "full", 3)) == 0  # space freed: it resumes
    assert sorted(os.listdir(run / "checkpoints")) == ["step-0000001", "step-0000002", "step-0000003"]


def test_file_size_limit_is_one_line(bios_data, tmp_path):  # noqa: F811
    """A real RLIMIT_FSIZE (ulimit -f): torch.save's zip writer reports it without an errno, safetensors as
    "os error 27"; both end in one line naming the checkpoint (a subprocess: the limit is per process)."""
    limit = 8 * 1024  # above the config and metrics, below the checkpoint's RNG state and weights

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    import subprocess
    import sys

    from cli_harness import OFFLINE_ENV

    env = dict(os.environ, **OFFLINE_ENV, PYTHONPATH=ROOT)
    env.pop("MEMLM_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "train.cli", *_args(bios_data, tmp_path, "fsz", 1)],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=small_files)
    assert_clean_failure(result, names=[str(tmp_path / "fsz" / "checkpoints" / "step-0000001"), "File too large",
                                        "EFBIG", "ulimit -f", "no checkpoint yet"])
    assert result.returncode == 2
    assert not os.listdir(tmp_path / "fsz" / "checkpoints")


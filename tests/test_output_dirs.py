"""Commands that write a directory never delete what memlm did not create: `memlm export-hf --out`,
`memlm demo --fresh/--redo`, the reproduction scripts' `--fresh`. Every refusal is one line naming the
directory (exit code 2, no traceback), and every file that existed before is byte-identical after."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from fixtures_data import bios_data  # noqa: F401  (pytest fixture)
from model.atomic import MARKER, read_marker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")


def _hashes(root) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest)."""
    out = {}
    for base, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            full = os.path.join(base, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _memlm(argv, capsys) -> tuple[int, str]:
    from train.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err


def _one_line(err: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def tiny_run(bios_data, tmp_path_factory):
    """A 2-step tiny run in <tmp>/runs/tiny (one checkpoint)."""
    from train.pretrain import main

    top = tmp_path_factory.mktemp("export")
    kv = {"data.path": bios_data, "runs_dir": str(top / "runs"), "name": "tiny", "trainer.max_steps": 2,
          "data.seq_len": 32, "data.batch_size": 2, "optim.warmup_steps": 1, "trainer.log_every": 1,
          "trainer.val_every": 100, "checkpoint.every": 100, "logging.logger": "none"}
    assert main(["--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()]) == 0
    return top, str(top / "runs" / "tiny")


def _user_dir(path) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "thesis.tex"), "w") as f:
        f.write("\\section{mine}\n")
    os.makedirs(os.path.join(path, "figs"), exist_ok=True)
    with open(os.path.join(path, "figs", "a.png"), "wb") as f:
        f.write(bytes(range(256)))


# ---- export-hf ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["user_dir", "run", "runs_parent", "cwd", "empty_cwd", "empty_home",
                                    "checkpoint", "in_checkpoint", "file"])
def test_export_refuses_targets_memlm_did_not_create(tiny_run, target, capsys, monkeypatch):
    top, run = tiny_run
    user, empty = top / "user", top / "empty"
    _user_dir(user)
    empty.mkdir(exist_ok=True)
    monkeypatch.chdir(empty if target == "empty_cwd" else user)
    monkeypatch.setenv("HOME", str(empty))  # an empty directory is a valid target, but never the home dir
    out = {"user_dir": str(user), "run": run, "runs_parent": os.path.dirname(run), "cwd": ".", "empty_cwd": ".",
           "empty_home": str(empty), "checkpoint": os.path.join(run, "checkpoints", "step-0000002"),
           "in_checkpoint": os.path.join(run, "checkpoints", "step-0000002", "x"),
           "file": str(user / "thesis.tex")}[target]
    before = _hashes(top)
    for force in ([], ["--force"]):
        rc, err = _memlm(["export-hf", run, "--out", out, *force], capsys)
        assert rc == 2
        _one_line(err, "memlm export-hf:", out)
        assert _hashes(top) == before
    assert not [n for n in os.listdir(os.path.dirname(os.path.abspath(out))) if ".tmp-" in n]


def test_export_new_dir_then_force_replaces_only_own(tiny_run, capsys, monkeypatch, tmp_path):
    top, run = tiny_run
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "hf"
    rc, err = _memlm(["export-hf", run, "--out", out], capsys)
    assert rc == 0, err
    assert read_marker(str(out))["kind"] == "hf-export"
    assert {"config.json", "model.safetensors", MARKER} <= set(os.listdir(out))
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary sibling left
    first = _hashes(out)
    rc, err = _memlm(["export-hf", run, "--out", out], capsys)  # an earlier export: needs --force
    assert rc == 2
    _one_line(err, str(out), "--force")
    assert _hashes(out) == first
    rc, err = _memlm(["export-hf", run, "--out", out, "--force"], capsys)
    assert rc == 0, err
    again = _hashes(out)
    assert {k: v for k, v in again.items() if k != MARKER} == {k: v for k, v in first.items() if k != MARKER}
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _memlm(["export-hf", run, "--out", empty], capsys)  # an empty directory may be used
    assert rc == 0, err
    assert read_marker(str(empty))["kind"] == "hf-export"


def test_export_default_out_inside_run(tiny_run, capsys):
    top, run = tiny_run
    before = _hashes(run)
    rc, err = _memlm(["export-hf", run], capsys)
    assert rc == 0, err
    after = _hashes(run)
    assert {k: v for k, v in after.items() if not k.startswith("hf" + os.sep)} == before
    assert read_marker(os.path.join(run, "hf"))["kind"] == "hf-export"
    rc, err = _memlm(["export-hf", run], capsys)
    _one_line(err, os.path.join(run, "hf"), "--force")
    assert rc == 2


def test_export_llama_refusal_names_the_python_argument(tmp_path):
    """The Python API names its own argument (replace=True); the CLI names --force (tested above)."""
    from model import Anchor, ModelConfig
    from model.errors import OutputExistsError
    from model.hf import export_llama

    m = Anchor(ModelConfig.from_name("tiny", vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                                     ffn_hidden=64, max_seq_len=16)).eval()
    export_llama(m, None, tmp_path / "hf")
    with pytest.raises(OutputExistsError, match=r"pass replace=True to replace it") as e:
        export_llama(m, None, tmp_path / "hf")
    assert "--force" not in str(e.value)
    assert (tmp_path / "hf").is_dir() and export_llama(m, None, tmp_path / "hf", replace=True) == tmp_path / "hf"


def test_step_dir_default_outputs_beside_checkpoints(tiny_run, bios_data, capsys, monkeypatch):
    """A step dir's default outputs go beside checkpoints/ (<run>/NAME-step-XXXXXXX), named from the resolved
    path: a trailing "/" and "." give the same name, and nothing is added inside the checkpoint."""
    top, run = tiny_run
    step = os.path.join(run, "checkpoints", "step-0000002")
    before = _hashes(step)
    rc, err = _memlm(["export-hf", step + os.sep], capsys)
    assert rc == 0, err
    assert read_marker(os.path.join(run, "hf-step-0000002"))["kind"] == "hf-export"
    monkeypatch.chdir(step)
    rc, err = _memlm(["export-hf", "."], capsys)  # the same default: an earlier export, so --force is named
    assert rc == 2
    _one_line(err, os.path.join(os.path.realpath(run), "hf-step-0000002"), "--force")
    rc, err = _memlm(["eval", ".", "--data", bios_data, "--val-batches", 1, "--probes-per-bucket", 0], capsys)
    assert rc == 0, err
    assert read_marker(os.path.join(run, "eval-step-0000002"))["kind"] == "eval"
    assert _hashes(step) == before


def test_export_module_entry_one_line(tiny_run, tmp_path):
    """`python -m train.commands.export_hf` goes through the same error path as `memlm export-hf`."""
    top, run = tiny_run
    _user_dir(tmp_path / "mine")
    before = _hashes(tmp_path)
    res = subprocess.run([sys.executable, "-m", "train.commands.export_hf", run, "--out", str(tmp_path / "mine")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    _one_line(res.stderr, str(tmp_path / "mine"))
    assert _hashes(tmp_path) == before


# ---- demo / reproductions: the job's work directory ----------------------------------------------------
def test_demo_fresh_refuses_a_directory_it_did_not_create(tmp_path, capsys, monkeypatch):
    user = tmp_path / "user"
    _user_dir(user)
    before = _hashes(tmp_path)
    for argv in (["--out", user, "--fresh"], ["--out", user]):
        rc, err = _memlm(["demo", *argv, "--size", "cpu"], capsys)
        assert rc == 2
        _one_line(err, "memlm demo:", str(user))
        assert _hashes(tmp_path) == before
    monkeypatch.chdir(user)
    rc, err = _memlm(["demo", "--out", ".", "--fresh", "--size", "cpu"], capsys)
    assert rc == 2
    _one_line(err, "working directory")
    assert _hashes(tmp_path) == before


def _job(tmp_path, kind="demo"):
    """A job directory as a run of `kind` leaves it: stages created data/ and runs/; the user then added
    notes.txt beside them."""
    from train.experiments.stages import StageRunner

    out = tmp_path / "job"
    runner = StageRunner(str(out))
    runner.start(kind)
    runner.pin({"size": 1})

    def stage():
        _user_dir(out / "data")  # content does not matter: the job made the entry
        os.makedirs(out / "runs" / "anchor")
        return {"ok": 1}

    runner.run("data", stage)
    (out / "notes.txt").write_text("my notes\n")
    return out


def test_fresh_deletes_only_what_the_job_created(tmp_path, capsys):
    from model.errors import OutputExistsError
    from train.experiments.stages import StageRunner

    out = _job(tmp_path)
    assert read_marker(str(out))["entries"] == ["data", "runs", "settings.json", "stages"]
    note = _hashes(out)["notes.txt"]
    StageRunner(str(out)).start("demo", fresh=True)
    assert sorted(os.listdir(out)) == [MARKER, "notes.txt"] and _hashes(out)["notes.txt"] == note
    assert "--fresh kept ['notes.txt']" in capsys.readouterr().out
    with pytest.raises(OutputExistsError, match="'demo' directory"):  # another job's directory is not reused
        StageRunner(str(out)).start("reproduce_lacy", fresh=True)
    assert _hashes(out)["notes.txt"] == note and read_marker(str(out))["kind"] == "demo"


def test_fresh_keeps_user_files_inside_the_jobs_folders(tmp_path, capsys):
    """A file or folder a user adds inside a folder the job created (mech/notes.txt, mech/myexp/, runs/...)
    survives --fresh and is named; one inside a marked memlm output (a data dir) makes --fresh refuse,
    naming it, with nothing deleted; once it is moved out, --fresh deletes the rest."""
    from model.atomic import atomic_dir
    from model.errors import OutputExistsError
    from train.experiments.stages import StageRunner

    out = tmp_path / "job"
    runner = StageRunner(str(out))
    runner.start("reproduce_memory")

    def stage():
        os.makedirs(out / "mech" / "runs" / "anchor")
        (out / "mech" / "runs" / "anchor" / "metrics.jsonl").write_text("{}\n")
        with atomic_dir(str(out / "mech" / "data-minilm"), "data") as d:
            open(os.path.join(d, "manifest.json"), "w").write("{}")
        return {}

    runner.run("mech-data", stage)
    (out / "notes.txt").write_text("top")
    (out / "mech" / "notes.txt").write_text("mine")
    (out / "mech" / "myexp").mkdir()
    (out / "mech" / "myexp" / "results.csv").write_text("important")
    (out / "mech" / "data-minilm" / "mynotes.txt").write_text("mine")
    before = _hashes(out)
    with pytest.raises(OutputExistsError, match=r"mech/data-minilm/mynotes\.txt.*move it out"):
        StageRunner(str(out)).start("reproduce_memory", fresh=True)
    assert _hashes(out) == before  # nothing deleted
    (out / "mech" / "data-minilm" / "mynotes.txt").rename(tmp_path / "mynotes.txt")
    StageRunner(str(out)).start("reproduce_memory", fresh=True)
    assert sorted(_hashes(out)) == [MARKER, "mech/myexp/results.csv", "mech/notes.txt", "notes.txt"]
    assert (out / "mech" / "myexp" / "results.csv").read_text() == "important"
    printed = capsys.readouterr().out
    assert "mech/myexp" in printed and "mech/notes.txt" in printed and "'notes.txt'" in printed
    # a memlm output a killed stage wrote before it could record it is memlm's: deleted, not "kept"
    runner = StageRunner(str(out))
    runner.start("reproduce_memory")
    runner.run("mech-data", stage)
    with atomic_dir(str(out / "mech" / "runs" / "anchor" / "step-0000050"), "checkpoint") as d:
        open(os.path.join(d, "meta.json"), "w").write("{}")
    StageRunner(str(out)).start("reproduce_memory", fresh=True)
    assert sorted(_hashes(out)) == [MARKER, "mech/myexp/results.csv", "mech/notes.txt", "notes.txt"]
    assert "step-0000050" not in capsys.readouterr().out
    # the next run records the folder again; a second --fresh still keeps the user's files
    runner = StageRunner(str(out))
    runner.start("reproduce_memory")
    runner.run("mech-data", stage)
    StageRunner(str(out)).start("reproduce_memory", fresh=True)
    assert sorted(_hashes(out)) == [MARKER, "mech/myexp/results.csv", "mech/notes.txt", "notes.txt"]


def test_demo_redo_keeps_user_files_in_a_run(tmp_path):
    """--redo of a stage whose folder (an unmarked run dir) holds a user's file refuses, naming it."""
    from model.atomic import remove_work_entry
    from model.errors import OutputExistsError

    out = _job(tmp_path)
    (out / "runs" / "anchor" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"runs/anchor/notes\.txt"):
        remove_work_entry(str(out), "demo", str(out / "runs" / "anchor"))
    assert (out / "runs" / "anchor" / "notes.txt").read_text() == "mine"


def test_sigterm_stops_a_job_like_ctrl_c_and_records_the_stage(tmp_path):
    """`timeout`, SLURM and Kubernetes send SIGTERM: the job stops as on Ctrl-C, and the running stage still
    records what it created (so --fresh deletes it rather than keeping it as a user's)."""
    import signal

    from train.experiments.stages import StageRunner

    out = tmp_path / "job"
    runner = StageRunner(str(out))
    runner.start("demo")

    def killed():
        os.makedirs(out / "runs" / "anchor")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives here

    with pytest.raises(KeyboardInterrupt):
        runner.run_plan([("anchor", killed)])
    assert "runs/anchor" in read_marker(str(out))["created"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_failed_stage_records_its_entries(tmp_path):
    from train.experiments.stages import StageRunner

    out = tmp_path / "job"
    runner = StageRunner(str(out))
    runner.start("demo")

    def crash():
        os.makedirs(out / "data")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        runner.run("data", crash)
    assert read_marker(str(out))["entries"] == ["data"]


def test_reproduce_fresh_refuses_foreign_dir(tmp_path, capsys):
    from scripts import reproduce_memory
    from train.cli import run_command

    user = tmp_path / "user"
    _user_dir(user)
    before = _hashes(tmp_path)
    rc = run_command("reproduce_memory", reproduce_memory.main, ["--out", str(user), "--fresh", "--size", "quick"])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line(err, "reproduce_memory:", str(user))
    assert _hashes(tmp_path) == before


def test_redo_removes_only_job_entries(tmp_path):
    from model.atomic import remove_work_entry
    from model.errors import OutputExistsError

    out = _job(tmp_path)
    with pytest.raises(OutputExistsError, match="not created by demo"):
        remove_work_entry(str(out), "demo", str(out / "notes.txt"))
    with pytest.raises(OutputExistsError):
        remove_work_entry(str(out), "demo", str(tmp_path))  # outside the job dir
    remove_work_entry(str(out), "demo", str(out / "runs" / "anchor"))
    assert os.listdir(out / "runs") == [] and (out / "notes.txt").exists()
    assert json.loads((out / "settings.json").read_text()) == {"size": 1}


def test_loss_compare_keep_refuses_foreign_dir(tmp_path, capsys):
    from scripts import loss_compare
    from scripts.golden_recipes import RECIPES

    user = tmp_path / "user"
    _user_dir(user)
    (user / "runs" / next(iter(RECIPES))).mkdir(parents=True)  # named like a recipe's run: still the user's
    before = _hashes(tmp_path)
    rc = loss_compare.main(["--recipe", next(iter(RECIPES)), "--keep", str(user)])
    assert rc == 2
    _one_line(capsys.readouterr().err, str(user), "--keep")
    assert _hashes(tmp_path) == before and (user / "runs" / next(iter(RECIPES))).is_dir()


# ---- commands that write an output directory: eval, factscore, calibrate, wiki-cascade, harness, wiki-probes,
# and pretrain's run dir. Each row: build(tmp, run, data) -> (argv, the path the one error line must name).
def _mine(tmp, name="mine") -> str:
    _user_dir(tmp / name)
    return str(tmp / name)


def _earlier(tmp, kind, name="earlier") -> str:
    """An earlier output of `kind` (memlm's marker), as a finished command leaves it."""
    from model.atomic import write_marker

    os.makedirs(tmp / name)
    (tmp / name / "old.json").write_text("{}\n")
    write_marker(str(tmp / name), kind)
    return str(tmp / name)


def _run_copy(tmp, run, entry=None) -> str:
    """A copy of the tiny run, with a directory of the user's at RUN/`entry` (a command's default --out)."""
    import shutil

    shutil.copytree(run, tmp / "run")
    if entry:
        _user_dir(tmp / "run" / entry)
    return str(tmp / "run")


def _pretrain(tmp, data, *over):
    kv = {"data.path": data, "runs_dir": str(tmp / "runs"), "name": "new", "trainer.max_steps": 1, "data.seq_len": 32,
          "data.batch_size": 2, "trainer.val_every": 0, "logging.logger": "none"}
    return ["pretrain", "--config", RECIPE, *[f"{k}={v}" for k, v in kv.items()], *over]


def _file(path, text) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


OUT_ROWS = [
    ("eval-out-holds-user-files", lambda t, r, d: (["eval", r, "--data", d, "--out", _mine(t)], str(t / "mine"))),
    ("eval-force-on-user-files", lambda t, r, d: (["eval", r, "--data", d, "--out", _mine(t), "--force"],
                                                  str(t / "mine"))),
    ("eval-out-is-the-run", lambda t, r, d: (["eval", r, "--data", d, "--out", r, "--force"], r)),
    ("eval-out-is-the-data", lambda t, r, d: (["eval", r, "--data", d, "--out", d, "--force"], d)),
    ("eval-out-is-the-cwd", lambda t, r, d: (["eval", r, "--data", d, "--out", str(t), "--force"], str(t))),
    ("eval-earlier-eval-without-force", lambda t, r, d: (["eval", r, "--data", d, "--out", _earlier(t, "eval")],
                                                         "--force")),
    ("eval-force-on-an-export", lambda t, r, d: (["eval", r, "--data", d, "--out", _earlier(t, "hf-export"),
                                                  "--force"], str(t / "earlier"))),
    ("eval-default-out-holds-user-files", lambda t, r, d: (["eval", _run_copy(t, r, "eval"), "--data", d],
                                                           str(t / "run" / "eval"))),
    ("factscore-out-holds-user-files", lambda t, r, d: (["factscore", "--slm", r, "--data", d, "--out", _mine(t)],
                                                        str(t / "mine"))),
    ("factscore-out-is-the-data", lambda t, r, d: (["factscore", "--slm", r, "--data", d, "--out", d, "--force"], d)),
    ("factscore-default-out-holds-user-files", lambda t, r, d: (["factscore", "--slm", r, "--data", d],
                                                                _mine(t, "factscore") and "factscore")),
    ("factscore-earlier-calibration-with-force", lambda t, r, d: (
        ["factscore", "--slm", r, "--data", d, "--out", _earlier(t, "calibrate"), "--force"], str(t / "earlier"))),
    ("calibrate-out-holds-user-files", lambda t, r, d: (["calibrate", d, "--slm", r, "--out", _mine(t)],
                                                        str(t / "mine"))),
    ("calibrate-out-is-the-run", lambda t, r, d: (["calibrate", d, "--slm", r, "--out", r, "--force"], r)),
    ("calibrate-default-out-holds-user-files", lambda t, r, d: (["calibrate", d, "--slm", r],
                                                                _mine(t, "calibration") and "calibration")),
    ("wiki-cascade-out-holds-user-files", lambda t, r, d: (["wiki-cascade", d, "--slm", r, "--out", _mine(t),
                                                            "--force"], str(t / "mine"))),
    ("wiki-cascade-earlier-without-force", lambda t, r, d: (["wiki-cascade", d, "--slm", r, "--out",
                                                             _earlier(t, "wiki-cascade")], "--force")),
    ("harness-out-holds-user-files", lambda t, r, d: (["harness", r, "--tasks", "x", "--mode", "anchor", "--out",
                                                       _mine(t)], str(t / "mine"))),
    ("harness-default-out-holds-user-files", lambda t, r, d: (
        ["harness", _run_copy(t, r, "harness-anchor"), "--tasks", "x", "--mode", "anchor"],
        str(t / "run" / "harness-anchor"))),
    ("harness-out-is-the-include-path", lambda t, r, d: (["harness", r, "--tasks", "x", "--mode", "anchor",
                                                          "--include-path", _mine(t), "--out", str(t / "mine"),
                                                          "--force"], str(t / "mine"))),
    ("wiki-probes-out-holds-user-files", lambda t, r, d: (["wiki-probes", d, "--out", _mine(t)], str(t / "mine"))),
    ("wiki-probes-out-is-the-data", lambda t, r, d: (["wiki-probes", d, "--out", d, "--force"], d)),
    ("pretrain-run-dir-holds-user-files", lambda t, r, d: (_pretrain(t, d) if _mine(t / "runs", "new") else None,
                                                           str(t / "runs" / "new"))),
    ("pretrain-config-yaml-not-memlm", lambda t, r, d: (
        _pretrain(t, d) if _file(str(t / "runs" / "new" / "config.yaml"), "thesis: [draft]\n") else None,
        str(t / "runs" / "new" / "config.yaml"))),
    ("pretrain-run-dir-is-a-file", lambda t, r, d: (_pretrain(t, d) if _file(str(t / "runs" / "new"), "x") else None,
                                                    str(t / "runs" / "new"))),
    ("pretrain-resume-another-run-into-user-dir", lambda t, r, d: (
        ["pretrain", "--config", os.path.join(r, "config.yaml"), f"runs_dir={t / 'runs'}", "name=new",
         f"checkpoint.resume={r}"] if _mine(t / "runs", "new") else None, str(t / "runs" / "new"))),
]


@pytest.mark.parametrize("build", [b for _, b in OUT_ROWS], ids=[i for i, _ in OUT_ROWS])
def test_output_dir_refused(tmp_path, tiny_run, bios_data, build, one_thread):
    """Exit 2, one line naming the directory, no traceback, every file (the user's, the run, the data) intact."""
    from cli_harness import assert_clean_failure, run_memlm_inprocess, tree_hashes

    top, run = tiny_run
    argv, name = build(tmp_path, run, bios_data)
    roots = (tmp_path, top, bios_data)
    before = [tree_hashes(p) for p in roots]
    result = run_memlm_inprocess(argv, cwd=tmp_path)
    assert_clean_failure(result, names=[name])
    assert result.returncode == 2
    assert [tree_hashes(p) for p in roots] == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_eval_force_replaces_only_its_own_output(tiny_run, bios_data, tmp_path, capsys, monkeypatch):
    top, run = tiny_run
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ev"
    argv = ["eval", run, "--data", bios_data, "--out", out, "--val-batches", 1, "--probes-per-bucket", 1]
    rc, err = _memlm(argv, capsys)
    assert rc == 0, err
    assert read_marker(str(out))["kind"] == "eval" and {"eval.json", "eval.png", MARKER} == set(os.listdir(out))
    first = json.load(open(out / "eval.json"))
    rc, err = _memlm(argv, capsys)
    assert rc == 2
    _one_line(err, str(out), "--force")
    rc, err = _memlm(argv + ["--force"], capsys)
    assert rc == 0, err
    assert json.load(open(out / "eval.json"))["val"] == first["val"]  # the same numbers, written again
    assert sorted(os.listdir(tmp_path)) == ["ev"]  # no temporary or trash sibling left


def test_factscore_force_replaces_only_its_own_output(tiny_run, bios_data, tmp_path, capsys, monkeypatch):
    top, run = tiny_run
    monkeypatch.chdir(tmp_path)
    _user_dir(tmp_path / "mine")
    mine = _hashes(tmp_path / "mine")
    argv = ["factscore", "--large", run, "--large-alone", "--data", bios_data, "--per-bucket", 1,
            "--max-new-tokens", 2, "--n-boot", 10, "--device", "cpu", "--out", "fs"]
    assert _memlm(argv, capsys)[0] == 0
    assert read_marker(str(tmp_path / "fs"))["kind"] == "factscore"
    assert _memlm(argv, capsys)[0] == 2
    rc, err = _memlm(argv + ["--force"], capsys)
    assert rc == 0, err
    assert {"factscore.json", "samples.jsonl", MARKER} <= set(os.listdir(tmp_path / "fs"))
    assert sorted(os.listdir(tmp_path)) == ["fs", "mine"] and _hashes(tmp_path / "mine") == mine


def test_pretrain_restarts_a_run_killed_before_its_first_checkpoint(tiny_run, bios_data, tmp_path, capsys):
    """Only memlm's config.yaml + metrics.jsonl (and a marked eval dir) in the run dir: a fresh start is fine."""
    from train.config import load_config, save_config

    top, run = tiny_run
    new = tmp_path / "runs" / "new"
    os.makedirs(new)
    save_config(load_config(os.path.join(run, "config.yaml")), str(new / "config.yaml"))
    (new / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    _earlier(new, "eval", "eval")
    rc, err = _memlm(_pretrain(tmp_path, bios_data), capsys)
    assert rc == 0, err
    assert os.listdir(new / "checkpoints") and read_marker(str(new / "eval"))["kind"] == "eval"


def test_wiki_probes_force_replaces_only_its_own_output(bios_data, tmp_path, capsys, monkeypatch):
    """The command's directory handling (the probe builder, which needs wiki-leads data and spaCy, is stubbed):
    the task YAML names the probe file where the directory ends up, not the temporary one."""
    import train.evaluation.wiki_probes as wp

    def fake(data, out, n_choices=4, max_per_set=None, seed=0, final_dir=None):
        with open(os.path.join(out, "memlm_wiki_seen.yaml"), "w") as f:
            f.write(f"path: {os.path.abspath(os.path.join(final_dir, 'wiki_seen.jsonl'))}\n")
        return {"seen": {"n": seed, "kinds": {}}}

    monkeypatch.setattr(wp, "build_wiki_probes", fake)
    monkeypatch.chdir(tmp_path)
    argv = ["wiki-probes", bios_data, "--out", "probes"]
    assert _memlm(argv, capsys)[0] == 0
    assert _memlm(argv + ["--seed", 1], capsys)[0] == 2
    rc, err = _memlm(argv + ["--seed", 1, "--force"], capsys)
    assert rc == 0, err
    assert read_marker(str(tmp_path / "probes"))["kind"] == "wiki-probes"
    assert (tmp_path / "probes" / "memlm_wiki_seen.yaml").read_text() == \
        f"path: {tmp_path / 'probes' / 'wiki_seen.jsonl'}\n"
    assert sorted(os.listdir(tmp_path)) == ["probes"]


def test_calibrate_force_replaces_only_its_own_output(tiny_run, bios_data, tmp_path, capsys, monkeypatch):
    import shutil

    import numpy as np

    from data.shards import open_data

    top, run = tiny_run
    data = str(tmp_path / "data")
    shutil.copytree(bios_data, data)
    for sh in open_data(data).shards("val"):  # as `memlm tag` leaves it (every 3rd token factual)
        sh.write_array("factual", (np.arange(sh.n_tokens) % 3 == 0).astype(np.uint8))
    monkeypatch.chdir(tmp_path)
    argv = ["calibrate", data, "--slm", f"a={run}", "--max-windows", 4, "--n-boot", 5, "--device", "cpu"]
    rc, err = _memlm(argv, capsys)
    assert rc == 0, err
    assert read_marker(str(tmp_path / "calibration"))["kind"] == "calibrate"
    assert _memlm(argv, capsys)[0] == 2
    rc, err = _memlm(argv + ["--force"], capsys)
    assert rc == 0, err
    assert {"calibration.json", "calibration.png", MARKER} == set(os.listdir(tmp_path / "calibration"))
    assert sorted(os.listdir(tmp_path)) == ["calibration", "data"]


def test_an_interrupted_subcommand_interrupts_the_job(tmp_path, monkeypatch):
    """Ctrl-C inside a stage's memlm command (exit 130) ends the job as interrupted, not as a failure to fix."""
    import train.cli
    from model.errors import MemlmError
    from train.experiments.stages import StageRunner

    runner = StageRunner(str(tmp_path / "job"))
    monkeypatch.setattr(train.cli, "main", lambda argv: 130)
    with pytest.raises(KeyboardInterrupt):
        runner.memlm("eval", "RUN")
    monkeypatch.setattr(train.cli, "main", lambda argv: 2)
    with pytest.raises(MemlmError, match="exit code 2"):
        runner.memlm("eval", "RUN")

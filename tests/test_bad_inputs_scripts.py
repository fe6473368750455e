"""Bad inputs for the scripts under scripts/ and `memlm bench-kernels`: numbers out of range (0, negative,
NaN, inf, not a number), unknown names in comma lists, missing or wrong-kind paths.

Each row runs the script's `main` through train/cli.py's `run_command` in this process (tests/cli_harness.py
`run_script_inprocess`; `memlm bench-kernels` through `run_memlm_inprocess`) and asserts a non-zero exit,
exactly one error line `SCRIPT.py: ...` naming the flag (and value or path), no traceback, and that the
row's directory is exactly as before: no file changed, removed or created. Every error here is raised
before the script's real work (no model, corpus or GPU is touched), so the table runs in seconds.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from cli_harness import REPO, assert_clean_failure, run_memlm_inprocess, run_script_inprocess, tree_hashes


def _file(tmp):
    path = tmp / "a-file.txt"
    path.write_text("not a directory\n")
    return str(path)


def _user_dir(tmp):
    path = tmp / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("the user's\n")
    return str(path)


def _data_dir(tmp):
    """A directory carrying memlm's marker of another kind (a data dir)."""
    path = tmp / "data"
    path.mkdir()
    (path / ".memlm.json").write_text('{"kind": "data", "files": {}}\n')
    return str(path)


def _run_dir(tmp):
    """A training run's directory (memlm wrote it, without a marker at its top)."""
    path = tmp / "run"
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text("name: run\n")
    (path / "metrics.jsonl").write_text("")
    return str(path)


def _csv(tmp, header="a,b"):
    path = tmp / "results.csv"
    path.write_text(header + "\n1,2\n")
    return str(path)


# (id, script, argv builder(tmp_path) -> argv, names the error line must contain)
ROWS = [
    ("bench_bank", lambda t: ["--steps", "0"], ["--steps", "'0'"]),
    ("bench_bank", lambda t: ["--warmup", "-1"], ["--warmup"]),
    ("bench_bank", lambda t: ["--rounds", "nan"], ["--rounds"]),
    ("bench_bank", lambda t: ["--batch", "inf"], ["--batch"]),
    ("bench_bank", lambda t: ["--seq-len", "long"], ["--seq-len", "'long'"]),
    ("bench_bank", lambda t: ["--threads", "-2"], ["--threads"]),
    ("bench_bank", lambda t: ["--configs", "10m,nope"], ["--configs", "'nope'"]),
    ("bench_bank", lambda t: ["--configs", ","], ["--configs"]),
    ("bench_bank", lambda t: ["--dir", _file(t)], ["--dir", "a-file.txt"]),
    ("bench_bank", lambda t: ["--csv", str(t)], ["--csv", "is a directory"]),
    ("bench_data", lambda t: ["--vocab-size", "-5"], ["--vocab-size"]),
    ("bench_data", lambda t: ["--batch-size", "0"], ["--batch-size"]),
    ("bench_data", lambda t: ["--batch-docs", "1e3"], ["--batch-docs"]),
    ("bench_data", lambda t: ["--num-workers", "-1"], ["--num-workers"]),
    ("bench_data", lambda t: ["--loader-batches", "inf"], ["--loader-batches"]),
    ("bench_data", lambda t: ["--model-steps", "nan"], ["--model-steps"]),
    ("bench_data", lambda t: ["--corpus", str(t / "missing.jsonl")], ["missing.jsonl"]),
    ("bench_model", lambda t: ["--iters", "0"], ["--iters"]),
    ("bench_model", lambda t: ["--seq", "-1"], ["--seq"]),
    ("bench_model", lambda t: ["--threads", "nan"], ["--threads"]),
    ("bench_model", lambda t: ["--presets", "tiny", "nope"], ["--presets", "'nope'"]),
    ("bench_model", lambda t: ["--presets", "tiny", "small", "--batch", "1", "2", "3"], ["--batch", "3 values"]),
    ("bench_memory", lambda t: ["--k", "1"], ["--k"]),
    ("bench_memory", lambda t: ["--memory-widths", "8,0"], ["--memory-widths", "'0'"]),
    ("bench_memory", lambda t: ["--memory-widths", "8,x"], ["--memory-widths", "'x'"]),
    ("bench_memory", lambda t: ["--steps", "0"], ["--steps"]),
    ("bench_memory", lambda t: ["--embed-words", "5"], ["--embed-words"]),
    ("bench_memory", lambda t: ["--rounds", "inf"], ["--rounds"]),
    ("bench_memory", lambda t: ["--model", "huge"], ["--model", "'huge'"]),
    ("bench_train", lambda t: ["--steps", "0"], ["--steps"]),
    ("bench_train", lambda t: ["--warmup", "-1"], ["--warmup"]),
    ("bench_train", lambda t: ["--steps", "12", "--warmup", "10"], ["--steps 12", "--warmup"]),
    ("bench_train", lambda t: ["--rounds", "nan"], ["--rounds"]),
    ("bench_train", lambda t: ["--presets", "tiny,nope"], ["--presets", "'nope'"]),
    ("bench_train", lambda t: ["--data", str(t / "no-such-data")], ["--data", "no-such-data"]),
    ("bench-kernels", lambda t: ["--tokens", "16384", "0"], ["--tokens", "'0'"]),
    ("bench-kernels", lambda t: ["--seq-len", "-1"], ["--seq-len"]),
    ("bench-kernels", lambda t: ["--paths", "1", "0"], ["--paths", "'all'"]),
    ("bench-kernels", lambda t: ["--paths", "many"], ["--paths", "'many'"]),
    ("bench-kernels", lambda t: ["--shapes", "7B"], ["--shapes", "'7B'"]),
    ("bench-kernels", lambda t: ["--warmup", "nan"], ["--warmup"]),
    ("bench-kernels", lambda t: ["--rep", "inf"], ["--rep"]),
    ("bench-kernels", lambda t: ["--out", str(t)], ["--out", "is a directory"]),
    ("gpu_check", lambda t: ["--budget", "0"], ["--budget"]),
    ("gpu_check", lambda t: ["--budget", "-5"], ["--budget"]),
    ("gpu_check", lambda t: ["--budget", "nan"], ["--budget"]),
    ("gpu_check", lambda t: ["--only", "demo,nope"], ["--only", "'nope'"]),
    ("gpu_check", lambda t: ["--skip", "nope", "--dry-run"], ["--skip", "'nope'"]),
    ("gpu_check", lambda t: ["--only", ","], ["--only"]),
    ("gpu_check", lambda t: ["--work", _user_dir(t), "--out", t / "o"], ["--work", "did not put there"]),
    ("gpu_check", lambda t: ["--out", _file(t), "--work", t / "w"], ["--out", "a-file.txt"]),
    ("gpu_check", lambda t: ["--out", t / "w" / "o", "--work", t / "w"], ["--out", "lies in --work"]),
    ("loss_compare", lambda t: ["--baseline", "a", "--test", "b", "--rtol", "-1"], ["--rtol"]),
    ("loss_compare", lambda t: ["--baseline", "a", "--test", "b", "--atol", "nan"], ["--atol"]),
    ("loss_compare", lambda t: ["--baseline", "a", "--test", "b", "--rtol", "tight"], ["--rtol", "'tight'"]),
    ("loss_compare", lambda t: ["--baseline", str(t / "gone"), "--test", str(t / "gone")], ["gone", "not found"]),
    ("loss_compare", lambda t: ["--recipe", "nope"], ["--recipe nope"]),
    ("loss_compare", lambda t: ["--recipe", "anchor", "--override", "optim.lrr=1"], ["--override", "optim.lrr"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", t / "o", "--parts", "nope"], ["--parts", "'nope'"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", t / "o", "--size", "nope"], ["--size", "'nope'"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", t / "o", "--mech-variants", "keyed"],
     ["--mech-variants", "minilm"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", t / "o", "--mech-variants", "minilm,nope"],
     ["--mech-variants", "'nope'"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", t / "o", "--seed", "-1"], ["--seed"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", t / "o", "--threads", "0"], ["--threads"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", _file(t)], ["--out", "a-file.txt"]),
    # a dry run refuses the --out that the real run refuses, creating nothing
    ("reproduce_memory", lambda t: ["--dry-run", "--out", _user_dir(t)], ["--out", "mine", "did not put there"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", _data_dir(t)], ["--out", "a memlm 'data' directory"]),
    ("reproduce_memory", lambda t: ["--dry-run", "--out", _run_dir(t)], ["--out", "a memlm training run"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", _user_dir(t)], ["--out", "mine", "did not put there"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", _data_dir(t), "--fresh"], ["--out", "'data' directory"]),
    # a single output file: only an earlier file of the same kind is replaced
    ("bench-kernels", lambda t: ["--out", _file(t)], ["--out", "a-file.txt", "not a CSV"]),
    ("bench-kernels", lambda t: ["--out", _csv(t)], ["--out", "results.csv", "not a CSV"]),
    ("bench_bank", lambda t: ["--csv", _file(t)], ["--csv", "a-file.txt", "not a CSV"]),
    # sizes beyond any benchmark: one line at once, not an allocation until the machine kills the process
    ("bench_model", lambda t: ["--presets", "tiny", "--seq", "100000000"], ["--seq", "'100000000'", "<= 32768"]),
    ("bench_model", lambda t: ["--presets", "tiny", "--batch", "4096", "--seq", "4096"], ["--batch 4096", "--seq 4096"]),
    ("bench_bank", lambda t: ["--seq-len", "100000000"], ["--seq-len", "<= 32768"]),
    ("bench_memory", lambda t: ["--batch-size", "100000"], ["--batch-size", "<= 4096"]),
    ("bench_data", lambda t: ["--seq-len", "100000000"], ["--seq-len", "<= 32768"]),
    ("bench_train", lambda t: ["--steps", "1e9"], ["--steps"]),
    ("bench-kernels", lambda t: ["--tokens", "100000000"], ["--tokens", "<= 4194304"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--call-rates", "0,0.1"], ["--call-rates", "'0'"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--call-rates", "0.1,1"], ["--call-rates", "'1'"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--call-rates", "nan"], ["--call-rates"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--rules", "lacy,llm-judge"],
     ["--rules", "'llm-judge'"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--parts", "nope"], ["--parts", "'nope'"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--scale", "0"], ["--scale"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--scale", "inf"], ["--scale"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--seed", "-1"], ["--seed"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", t / "o", "--size", "huge"], ["--size", "'huge'"]),
    ("reproduce_lacy", lambda t: ["--dry-run", "--out", _file(t) + "/sub"], ["--out", "a-file.txt"]),
]
PROG = {"bench-kernels": "memlm bench-kernels"}  # default: SCRIPT.py


@pytest.mark.parametrize("script,build,names", ROWS, ids=[f"{s}{names[0]}-{i}" for i, (s, _, names) in enumerate(ROWS)])
def test_bad_script_input_fails_cleanly(tmp_path, script, build, names, monkeypatch):
    monkeypatch.delenv("MEMLM_DEBUG", raising=False)
    argv = build(tmp_path)
    before = tree_hashes(tmp_path)
    if script == "bench-kernels":
        result = run_memlm_inprocess(["bench-kernels", *argv], cwd=tmp_path)
    else:
        result = run_script_inprocess(script, argv, cwd=tmp_path)
    assert_clean_failure(result, names=names, before=before, root=tmp_path, prog=PROG.get(script, f"{script}.py"))
    assert tree_hashes(tmp_path) == before, "a failed command wrote files"
    assert result.returncode == 2


def test_every_script_is_covered():
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "scripts", "*.py"))}
    library = {"__init__", "golden_recipes", "gpu_check_runner"}  # imported by the scripts, no command line
    covered = {s.replace("bench-kernels", "bench_kernels") for s, _, _ in ROWS}
    assert scripts - library == covered


def test_no_systemexit_in_scripts():
    """Scripts raise typed errors; their `__main__` goes through run_command (one line, exit 2)."""
    hits = []
    for path in glob.glob(os.path.join(REPO, "scripts", "*.py")):
        src = open(path, encoding="utf-8").read()
        hits += [f"{os.path.basename(path)}: {m.group(0)}" for m in re.finditer(r"raise SystemExit.*", src)]
        tail = src.split('if __name__ == "__main__":', 1)
        if len(tail) == 2 and "loss_compare" not in path:  # loss_compare's main returns its documented codes
            assert "run_command(" in tail[1], f"{path}: __main__ does not use train.cli.run_command"
    assert hits == []


@pytest.mark.parametrize("argv,flag", [(["scripts/bench_bank.py", "--configs", "nope"], "--configs"),
                                       (["scripts/gpu_check.py", "--budget", "0"], "--budget")])
def test_script_launch_is_one_line(tmp_path, argv, flag):
    """The real `python scripts/X.py` launch (from another directory): one line, exit 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEMLM_DEBUG", "PYTHONPATH")}
    p = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and flag in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []


def test_bench_bank_labels_ratios_by_the_baseline_used(tmp_path, monkeypatch, capsys):
    """Without 10m among --configs the ratios divide by the first config, and the headings say so; the CSV
    it writes is then recognised as its own (a second run replaces it)."""
    import json as _json

    from scripts import bench_bank

    def fake_run(cmd, **kw):
        name = cmd[cmd.index("--one") + 1]
        res = {"config": name, "storage": "host", "k": 4, "bank_params": 1e8, "state_gib": 1.0, "step_ms_median": 10.0,
               "cpu_ms_step": 12.0, "sys_ms_step": 1.0, "faults_step": 0, "bank_ms_median": 2.0, "peak_rss_mb": 500.0,
               "rss_before_bank_mb": 100.0, "fetched_params": 1000}
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + _json.dumps(res) + "\n", "")

    monkeypatch.setattr(bench_bank.subprocess, "run", fake_run)
    csv_path = str(tmp_path / "bank.csv")
    for _ in range(2):
        assert bench_bank.main(["--configs", "100m", "--steps", "1", "--warmup", "0", "--csv", csv_path]) == 0
        header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| config"))
        assert "x 100m" in header and "RSS x 100m" in header and "10m" not in header.replace("100m", "")

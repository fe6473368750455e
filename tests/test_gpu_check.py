"""scripts/gpu_check.py: the dry run lists every step and every command parses, with the GPU machine's
missing packages (faiss, spaCy, datasets, wandb, MiniLM) hidden; the runner enforces limits and skips."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from gpu_check_runner import Step, run_steps  # noqa: E402

STEPS = ("install", "gpu-tests", "smoke-bf16", "loss-compare", "bench-kernels", "demo", "reproductions")


def test_dry_run_lists_steps_and_every_check_passes(tmp_path):
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    for i, name in enumerate(STEPS, 1):
        assert f"[{i}/{len(STEPS)}] {name}:" in p.stdout
    assert "check FAIL" not in p.stdout and " 0 failed" in p.stdout
    assert "bench-kernels --quick" in p.stdout and "trainer.strategy=fsdp" in p.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_runner_limits_budget_and_skips(tmp_path):
    py = sys.executable
    steps = [
        Step("fast", "ok", [[py, "-c", "print('hi')"]], 30, collect=lambda rec: {"rc": rec["runs"][0]["rc"]}),
        Step("slow", "killed at its limit", [[py, "-c", "import time; time.sleep(60)"]], 2),
        Step("pair", "two at once, one fails", [[py, "-c", "pass"], [py, "-c", "raise SystemExit(3)"]], 30),
        Step("absent", "needs a module", [[py, "-c", "pass"]], 5, needs_modules=("no_such_module_xyz",)),
        Step("big", "does not fit the budget", [[py, "-c", "pass"]], 10_000),
    ]
    recs = {r["name"]: r for r in run_steps(steps, budget_s=60, log_dir=str(tmp_path))}
    assert recs["fast"]["status"] == "ok" and recs["fast"]["figures"] == {"rc": 0}
    assert recs["slow"]["status"] == "timeout" and recs["slow"]["seconds"] < 30
    assert recs["pair"]["status"] == "failed" and [r["rc"] for r in recs["pair"]["runs"]] == [0, 3]
    assert recs["absent"]["status"] == "skipped" and "no_such_module_xyz" in recs["absent"]["reason"]
    assert recs["big"]["status"] == "skipped" and "out of budget" in recs["big"]["reason"]


# ---------------------------------------------------------------------------------------------
# --out and --prepare DIR: resolved against the working directory; new, empty or the script's own marked
# output; everything else refused in one line before any work (no expensive step runs here)

import json  # noqa: E402

import pytest  # noqa: E402

import gpu_check  # noqa: E402
from model.atomic import MARKER, atomic_write_json, read_marker  # noqa: E402
from model.errors import OutputExistsError  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _script(cwd, *args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_prepare_resolves_a_relative_dir_against_the_working_directory(tmp_path):
    p = _script(tmp_path, "--prepare", "data", "--dry-run")
    assert p.returncode == 0, p.stderr
    want = os.path.join(str(tmp_path), "data")
    assert f"--out {want}{os.sep}data " in p.stdout and f"--out {want}{os.sep}demo " in p.stdout
    assert os.path.join(ROOT, "data", "data") not in p.stdout
    assert not (tmp_path / "data").exists()  # a dry run writes nothing
    for name, cmd in gpu_check.prepare_plan(want):  # every path in the plan lies under the absolute DIR
        assert all(not a.startswith(os.sep) or a.startswith(want) or a == sys.executable for a in map(str, cmd)), name


@pytest.mark.parametrize("target", [".", "..", "afile", "foreign", "datadir"])
def test_prepare_and_out_refuse_what_they_did_not_make(tmp_path, target):
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "summary.md").write_text("MINE\n")
    (tmp_path / "datadir").mkdir()
    atomic_write_json(str(tmp_path / "datadir" / MARKER), {"kind": "data", "files": {}})
    before = sorted(os.listdir(tmp_path))
    for args in (["--prepare", target], ["--prepare", target, "--dry-run"],
                 ["--out", target, "--work", str(tmp_path / "w"), "--prepared", str(tmp_path / "none"), "--dry-run"]):
        p = _script(tmp_path, *args)
        assert p.returncode == 2, (args, p.stdout[-2000:], p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("gpu_check.py: --")
        assert "Traceback" not in p.stderr
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "foreign" / "summary.md").read_text() == "MINE\n"


def _fake_versions():
    return {"python": "3", "gpu": "none (test)", "device_missing": []}


def _main(tmp_path, monkeypatch, out, *extra):
    """gpu_check.main with only the cheap loss-compare step selected (skipped: nothing to compare)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpu_check, "versions", _fake_versions)
    return gpu_check.main(["--out", out, "--work", "work", "--prepared", "absent", "--only", "loss-compare", *extra])


def test_out_accepts_new_or_empty_and_its_own_earlier_output(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    assert _main(tmp_path, monkeypatch, "empty") == 0
    out = tmp_path / "empty"
    assert {"summary.md", "results.json", "logs.txt", MARKER} <= set(os.listdir(out))
    assert read_marker(str(out))["kind"] == gpu_check.OUT_KIND
    assert json.loads((out / "results.json").read_text())["steps"][3]["status"] == "skipped"
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != MARKER]  # no temporary leftovers
    # a re-run reuses it: replaces its own files, keeps one the user added, deletes a stale errors file
    (out / "notes.txt").write_text("keep\n")
    (out / "gpu-tests.errors.jsonl").write_text('{"stale": 1}\n')
    (out / "summary.md").write_text("old\n")
    assert _main(tmp_path, monkeypatch, "empty") == 0
    assert (out / "notes.txt").read_text() == "keep\n" and not (out / "gpu-tests.errors.jsonl").exists()
    assert (out / "summary.md").read_text().startswith("# memlm GPU check")
    assert _main(tmp_path, monkeypatch, "new/results") == 0  # a new directory (and its parents) is made
    assert read_marker(str(tmp_path / "new" / "results"))["kind"] == gpu_check.OUT_KIND


def test_out_refusals_happen_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "summary.md").write_text("MINE\n")
    with pytest.raises(OutputExistsError, match="did not write"):
        _main(tmp_path, monkeypatch, "g")
    assert (tmp_path / "g" / "summary.md").read_text() == "MINE\n" and os.listdir(tmp_path / "g") == ["summary.md"]
    assert not (tmp_path / "work").exists()
    (tmp_path / "p").mkdir()
    for out, match in ((".", "working directory"), ("p", "--prepared"), ("work/o", "--work")):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(gpu_check, "versions", _fake_versions)
        with pytest.raises(gpu_check.MemlmError, match=match):
            gpu_check.main(["--out", out, "--work", "work", "--prepared", "p", "--only", "loss-compare"])
    assert not (tmp_path / "work").exists()


def test_prepare_runs_in_its_dir_cleans_only_its_caches_and_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.window_minilm.npy").write_bytes(b"user's own cache")
    py = sys.executable

    def plan(d):
        code = (f"import os; os.makedirs({os.path.join(d, 'data', 's')!r}, exist_ok=True); "
                f"open({os.path.join(d, 'data', 's', 'a.window_minilm.npy')!r}, 'w').write('x'); "
                f"open({os.path.join(d, 'data', 'router.json')!r}, 'w').write('{{}}'); print('made')")
        return [("make", [py, "-c", code])]

    assert gpu_check.prepare("prep", plan=plan) == 0
    prep = tmp_path / "prep"
    assert (prep / "data" / "router.json").exists() and not (prep / "data" / "s" / "a.window_minilm.npy").exists()
    assert (tmp_path / "data" / "x.window_minilm.npy").exists()  # the user's ./data is not touched
    assert (prep / "logs" / "make.log").read_text() == "made\n"
    assert read_marker(str(prep))["kind"] == gpu_check.PREPARED_KIND
    assert gpu_check.prepare("prep", plan=plan) == 0  # an earlier --prepare DIR is reused

    def failing(d):
        return [("boom", [py, "-c", "import sys; print('memlm x: bad input'); sys.exit(2)"])]

    with pytest.raises(gpu_check.PrepareError) as e:
        gpu_check.prepare("prep", plan=failing)
    log = str(prep / "logs" / "boom.log")
    assert "step boom failed (exit 2): memlm x: bad input" in str(e.value) and log in str(e.value)
    with pytest.raises(OutputExistsError):  # the user's ./data (and the cwd) are never a --prepare DIR
        gpu_check.prepare("data", plan=plan)
    with pytest.raises(OutputExistsError):
        gpu_check.prepare(".", plan=plan)


def _demo_settings(cmd: list[str]) -> dict:
    """The demo settings a `memlm demo` command line pins (size, seed, steps-scale; defaults filled in)."""
    args = cmd[cmd.index("demo") + 1:]
    value = {"--size": "auto", "--seed": "0", "--steps-scale": "1.0"}
    for flag in value:
        if flag in args:
            value[flag] = str(args[args.index(flag) + 1])
    return value


def test_prepared_demo_matches_the_timed_demo(tmp_path):
    """--prepare runs the demo's data and cluster stages with the settings of the timed demo step: the demo
    refuses a directory whose stages were made with other settings."""
    import gpu_check

    demo_cmds = [cmd for _, cmd in gpu_check.prepare_plan(str(tmp_path)) if "demo" in cmd and "--until" in cmd]
    steps = gpu_check.build_steps(str(tmp_path / "prep"), str(tmp_path / "out"), str(tmp_path / "work"))
    timed = [list(map(str, c)) for s in steps if s.name == "demo" for c in s.cmds if "demo" in map(str, c)]
    assert demo_cmds and timed
    want = _demo_settings(timed[0])
    assert all(_demo_settings(list(map(str, c))) == want for c in demo_cmds)

"""Golden loss curves (scripts/loss_compare.py): each recipe, trained through the public entry points
(`python -m train.pretrain`, `torchrun ... -m train.pretrain`), equals its stored curve in tests/golden/:
bit for bit on the CPU kind that recorded it, within the stated fallback tolerances on another (the mode
is printed). Plus the comparison and the command line without training."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import loss_compare as lc  # noqa: E402
from golden_recipes import RECIPES, Workspace, command  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One data dir for every recipe; the anchor run is shared with the memory phase that starts from it."""
    return Workspace(str(tmp_path_factory.mktemp("golden")), log=lambda *a: None)


def _check(ws: Workspace, name: str, capsys) -> None:
    golden = lc.load_golden(lc.golden_path(name))
    fp = ws.prepare()
    assert (fp["tokenizer_hash"], fp["sha256"]) == (golden["data"]["tokenizer_hash"], golden["data"]["sha256"]), \
        "the recipes' data build changed (data/ or scripts/golden_recipes.py): the curves cannot be compared"
    tols, why = lc.recipe_tolerance(golden)
    with capsys.disabled():
        print(f"\n[golden] {name}: {lc.describe(tols)} ({why})")
    rows = lc.compare(lc.read_curve(lc.golden_path(name)), lc.read_curve(ws.run(name)), tols)
    n_val = len(golden["val"])
    assert len(rows) == 3 * RECIPES[name].steps + n_val, lc.summary(rows)
    bad = [r for r in rows if not r[5]]
    assert not bad, f"{name}: {lc.summary(rows)} ({lc.describe(tols)}); first (metric, step, golden, now): " \
                    f"{[r[:4] for r in bad[:3]]}. A legitimate change re-records: scripts/loss_compare.py " \
                    f"--recipe {name} --record --reason TEXT"


@pytest.mark.parametrize("name", [n for n, r in RECIPES.items() if r.nproc == 1])
def test_recipe_matches_golden_curve(workspace, name, capsys):
    _check(workspace, name, capsys)


@pytest.mark.distributed
def test_ddp_recipe_matches_golden_curve(workspace, capsys):
    _check(workspace, "ddp", capsys)


# ---- the stored files and the comparison (no training) -----------------------------------------------
@pytest.mark.parametrize("name", list(RECIPES))
def test_golden_file_matches_its_recipe(name):
    g = lc.load_golden(lc.golden_path(name))
    assert g["command"] == command(RECIPES[name]), "recipe edited without re-recording its curve"
    assert g["reason"].strip() and g["cpu"]["torch"] and g["data"]["sha256"]
    steps = [r["step"] for r in g["train"]]
    assert steps == list(range(1, RECIPES[name].steps + 1))
    assert all(isinstance(r[k], float) and math.isfinite(r[k]) for r in g["train"] for k in lc.TRAIN_KEYS)
    assert all(r["grad_norm"] > 0 for r in g["train"])
    # a curve that trains, not a constant (the frozen-anchor phase moves little: judged on validation)
    val = [r["val_loss"] for r in g["val"]]
    loss = [r["loss"] for r in g["train"]]
    assert val[-1] < val[0] if len(val) > 1 else sum(loss[-5:]) < sum(loss[:5])


def test_compare_exact_sees_one_ulp_and_fallback_does_not():
    base = lc.read_curve(lc.golden_path("anchor"))
    test = {m: dict(c) for m, c in base.items()}
    assert lc.summary(lc.compare(base, test, lc.uniform(lc.EXACT))) == "match"
    test["loss"][7] = math.nextafter(test["loss"][7], math.inf)
    rows = lc.compare(base, test, lc.uniform(lc.EXACT))
    assert lc.summary(rows) == f"1 of {len(rows)} values differ, first at step 7 (loss)"
    assert lc.summary(lc.compare(base, test, lc.FALLBACK)) == "match"
    test["loss"][7] *= 1 + 1e-4  # beyond the fallback's rtol
    assert lc.summary(lc.compare(base, test, lc.FALLBACK)) != "match"
    del test["lr"][30]  # a missing step is a mismatch in any mode
    assert any(r[0] == "lr" and r[1] == 30 and not r[5] for r in lc.compare(base, test, lc.FALLBACK))


def _metrics(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_cli_baseline_test_exit_codes(tmp_path, capsys):
    g = lc.load_golden(lc.golden_path("calls"))
    a = _metrics(tmp_path / "a", g["train"])
    assert lc.main(["--baseline", a, "--test", lc.golden_path("calls")]) == 0
    out = capsys.readouterr().out
    assert "loss_compare: MATCH" in out and "step" in out and "abs diff" in out
    rows = [dict(r) for r in g["train"]]
    rows[4]["grad_norm"] += 1e-3
    b = _metrics(tmp_path / "b", rows)
    assert lc.main(["--baseline", a, "--test", b]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: 1 of 60 values differ, first at step 5 (grad_norm)" in out and "<-- differs" in out
    assert lc.main(["--baseline", a, "--test", b, "--rtol", "1e-2"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope"], "--recipe nope: unknown"),
    (["--baseline", "no/such/run", "--test", "no/such/run"], "no/such/run: not found"),
    (["--baseline", "x"], "--baseline and --test go together"),
    ([], "give --recipe NAME / --all"),
    (["--all", "--record"], "needs --reason"),
    (["--all", "--exact", "--rtol", "1e-3"], "--exact and --rtol/--atol exclude each other"),
    (["--all", "--record", "--reason", "x", "--override", "optim.lr=1"], "--override cannot be recorded"),
    (["--all", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert lc.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert err.startswith("loss_compare.py: "), err  # the format of every script's error (README)


def test_cli_curves_of_different_lengths_say_so(tmp_path, capsys):
    g = lc.load_golden(lc.golden_path("calls"))
    a = _metrics(tmp_path / "a", g["train"])
    b = _metrics(tmp_path / "b", g["train"][:-2])
    assert lc.main(["--baseline", a, "--test", b]) == 1
    out = capsys.readouterr().out
    assert "nan" not in out and "2 steps missing in test (the curves have different lengths)" in out


def test_cli_bad_metrics_file_and_no_traceback(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "loss_compare.py"), "--baseline", str(bad),
                        "--test", str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not JSON" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1

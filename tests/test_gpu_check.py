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

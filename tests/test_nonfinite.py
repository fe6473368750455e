"""The non-finite guard of train/loop.py: a nan/inf loss, gradient norm or weights stops the run with one
TrainingError line (exit code 2 through the CLI) BEFORE the update is applied or a checkpoint saved, so
every checkpoint holds finite weights; the message names the step, what was non-finite, the last
checkpoint, and a remedy that works (a new run with init_from=<it>; resuming with another schedule is
refused). The guard's verdict is the same on every DDP rank. Tiny preset, seq_len 32, batch 2, CPU."""
from __future__ import annotations

import os
import re

import pytest
import torch

from cli_harness import error_lines, run_memlm_inprocess
from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny shapes: one intra-op thread."""


def _args(data, runs, name, steps, **over):
    kv = {"data.path": data, "runs_dir": runs, "name": name, "trainer.max_steps": steps, "data.seq_len": 32,
          "data.batch_size": 2, "optim.warmup_steps": 2, "trainer.log_every": 1, "trainer.val_every": 0,
          "checkpoint.every": 1, "checkpoint.keep_last_k": 0, "logging.logger": "none"}
    kv.update(over)
    return ["--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()]


def _step_dirs(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(os.path.join(d, n) for n in os.listdir(d)) if os.path.isdir(d) else []


def _assert_all_finite(run_dir):
    """Every tensor of every checkpoint's model.safetensors is finite; returns the step dirs."""
    from safetensors.torch import load_file

    dirs = _step_dirs(run_dir)
    for d in dirs:
        for k, v in load_file(os.path.join(d, "model.safetensors")).items():
            assert torch.isfinite(v).all(), f"{d}: {k} holds nan/inf"
    return dirs


def _fails(result):
    """The one error line of a failed `memlm pretrain` (exit 2, no traceback)."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "done, step" not in out, out[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def test_huge_lr_on_the_last_step_exits_2_without_a_checkpoint(bios_data, tmp_path):
    """The tester's case: lr 1e30, 2 steps, a checkpoint only at the end. The step-2 gradient norm is nan
    (its loss is finite): the run fails before the update, and the nan weights are never saved."""
    r = run_memlm_inprocess(["pretrain", *_args(bios_data, str(tmp_path), "v2", 2, **{
        "optim.lr": 1e30, "checkpoint.every": 0, "optim.warmup_steps": 20, "trainer.val_every": 1})], tmp_path)
    line = _fails(r)
    assert re.search(r"non-finite (gradient norm|loss).* at step [12]\b", line), line
    assert "no checkpoint was written" in line and "optim.lr" in line
    assert _step_dirs(str(tmp_path / "v2")) == []
    assert "val_loss nan" not in r.stdout


def test_huge_lr_keeps_every_checkpoint_finite_and_names_the_last(bios_data, tmp_path):
    """lr 1e30 with a checkpoint every step: it stops at the first step with a nan/inf gradient norm;
    every checkpoint left is finite, and the message names the newest one and the init_from remedy."""
    r = run_memlm_inprocess(["pretrain", *_args(bios_data, str(tmp_path), "nanr", 6, **{"optim.lr": 1e30})],
                            tmp_path)
    line = _fails(r)
    m = re.search(r"non-finite (gradient norm|loss) \(nan/inf\) at step (\d+)", line)
    assert m, line
    step = int(m.group(2))
    dirs = _assert_all_finite(str(tmp_path / "nanr"))
    assert [os.path.basename(d) for d in dirs] == [f"step-{s:07d}" for s in range(1, step)]
    if dirs:
        assert f"the last good checkpoint is {dirs[-1]}" in line and f"init_from={dirs[-1]}" in line, line
        assert "another name=" in line


def test_nan_gradient_with_finite_loss_stops_before_the_update_and_init_from_remedy_trains(
        bios_data, tmp_path, monkeypatch):
    """A nan gradient (finite loss) at step 4, checkpoints every 3: the run stops at step 4 naming the
    gradient norm and step-0000003 (finite); following the message (a new run, init_from=that checkpoint,
    a lower lr and a longer warmup) trains to the end with finite checkpoints."""
    from model.errors import TrainingError
    from train import loop
    from train.pretrain import main

    real, calls = loop.clip_gradients, [0]

    def nan_grad_at_4(fabric, model, optimizers, max_norm):
        calls[0] += 1
        if calls[0] == 4:
            optimizers.params()[0].grad.fill_(float("nan"))
        return real(fabric, model, optimizers, max_norm)

    runs = str(tmp_path)
    monkeypatch.setattr(loop, "clip_gradients", nan_grad_at_4)
    with pytest.raises(TrainingError) as e:
        main(_args(bios_data, runs, "boom", 8, **{"checkpoint.every": 3}))
    msg = str(e.value)
    assert "non-finite gradient norm (nan/inf) at step 4 (its loss was finite)" in msg, msg
    good = os.path.join(runs, "boom", "checkpoints", "step-0000003")
    assert f"the last good checkpoint is {good}" in msg and f"init_from={good}" in msg, msg
    assert [os.path.basename(d) for d in _assert_all_finite(os.path.join(runs, "boom"))] == ["step-0000003"]
    monkeypatch.setattr(loop, "clip_gradients", real)

    # the advice of the message: a new run from the checkpoint with another schedule (resume would refuse it)
    init = re.search(r"init_from=(\S+)", msg).group(1)
    fix = {"init_from": init, "optim.lr": 1e-3, "optim.warmup_steps": 4}
    assert main(_args(bios_data, runs, "boom2", 4, **fix)) == 0
    assert [os.path.basename(d) for d in _assert_all_finite(os.path.join(runs, "boom2"))] == \
        [f"step-{s:07d}" for s in range(1, 5)]


def test_nonfinite_weights_are_never_saved(bios_data, tmp_path, monkeypatch):
    """An update that leaves a weight inf although loss and gradient norm were finite (an overflow):
    the checkpoint of that step is refused, naming the step; the older checkpoints stay."""
    from model.errors import TrainingError
    from train import build
    from train.pretrain import main

    real, calls = build.Optimizers.step, [0]

    def inf_weight_at_2(self):
        real(self)
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                self.params()[0].view(-1)[0] = float("inf")

    monkeypatch.setattr(build.Optimizers, "step", inf_weight_at_2)
    with pytest.raises(TrainingError, match=r"non-finite weights \(nan/inf\) after the update of step 2") as e:
        main(_args(bios_data, str(tmp_path), "w", 4))
    assert "step-0000001" in str(e.value)
    assert [os.path.basename(d) for d in _assert_all_finite(str(tmp_path / "w"))] == ["step-0000001"]


# ---------------------------------------------------------------------------------------------
# two ranks (gloo): the guard's verdict is the same on every rank

def _guard_worker(rank, init_file, run_dir, q):
    import torch.distributed as dist

    from model.errors import TrainingError
    from train.loop import _Guard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        class _Ckpt:
            class cfg:
                pass
        _Ckpt.cfg.run_dir = run_dir
        guard = _Guard(_Ckpt(), 0, torch.device("cpu"))
        got = []
        # step 1: rank 1's loss is nan; step 2: only rank 0 sees a non-finite norm; step 3: all finite
        cases = [(float("nan") if rank == 1 else 1.0, 1.0), (1.0, float("inf") if rank == 0 else 1.0), (1.0, 1.0)]
        for step, (loss, norm) in enumerate(cases, 1):
            try:
                guard.check_step(step, torch.tensor([loss]), torch.tensor(norm))
                got.append("ok")
            except TrainingError as e:
                got.append(str(e).split(";")[0])
        q.put((rank, got))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_guard_agrees_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_guard_worker, args=(r, str(tmp_path / "init"), str(tmp_path / "run"), q))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want = ["non-finite loss (nan/inf) at step 1", "non-finite gradient norm (nan/inf) at step 2 (its loss was finite)",
            "ok"]
    assert results[0] == results[1] == want

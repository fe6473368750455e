"""Crash safety of run checkpoints (train/checkpoint.py; cases E2, E3, E4, V3):

- a checkpoint is complete only by its marker: SIGKILL at any moment (mid-write, while replacing a newer
  step dir, while pruning) never leaves a step dir that looks complete but is not, `resume=auto` always
  continues, and the final weights equal an uninterrupted run's (deterministic kill points + random
  ones: 6 in CI, 50 in the slow test);
- a truncated model.safetensors is named in the error; `resume=auto` falls back to an intact one;
- a torn last line of metrics.jsonl does not stop a resume;
- resuming with a changed schedule key is refused with a message naming the key.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")
STEPS = 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """In-process runs compare bits: one intra-op thread (several may split sums differently under load)."""


def _args(data, runs, name, steps=STEPS, **over):
    kv = {"data.path": data, "runs_dir": runs, "name": name, "trainer.max_steps": steps, "data.seq_len": 64,
          "data.batch_size": 4, "optim.warmup_steps": 3, "trainer.log_every": 1, "trainer.val_every": 6,
          "trainer.val_batches": 1, "checkpoint.every": 1, "checkpoint.keep_last_k": 2, "logging.logger": "none",
          "trainer.deterministic": True}
    kv.update(over)
    return ["--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)


def _final_weights(run_dir: str, step: int = STEPS) -> dict:
    from model.weights import read_weights

    return read_weights(os.path.join(run_dir, "checkpoints", f"step-{step:07d}", "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_no_false_complete(run_dir: str) -> None:
    """Every visible step-N dir is whole (marker + every file at its recorded size)."""
    from train.checkpoint import check_step_dir, step_dirs

    bad = [(p, why) for _, p in step_dirs(os.path.join(run_dir, "checkpoints")) if (why := check_step_dir(p))]
    assert not bad, bad


@pytest.fixture(scope="module")
def reference(bios_data, tmp_path_factory):  # noqa: F811
    """An uninterrupted run (a subprocess, like the victims) and how long it takes from the start of training."""
    runs = str(tmp_path_factory.mktemp("ref"))
    victim = _Victim(_args(bios_data, runs, "ref"))
    victim.started.wait(timeout=300)
    t = time.time()
    assert victim.p.wait(timeout=600) == 0, "".join(victim.out)[-3000:]
    return {"weights": _final_weights(os.path.join(runs, "ref")), "seconds": time.time() - t, "data": bios_data}


# ---- deterministic kill points ----------------------------------------------------------------
def _worker(point: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_kill_worker.py"), point, str(n), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _finish(args: list[str]) -> str:
    p = subprocess.run([sys.executable, "-m", "train.pretrain", *args, "checkpoint.resume=auto"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


@pytest.mark.parametrize("point,n", [("marker", 5), ("prune", 3)])
def test_kill_while_writing_or_pruning(reference, tmp_path, point, n):
    runs = str(tmp_path)
    args = _args(reference["data"], runs, "k")
    p = _worker(point, n, args)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    _assert_no_false_complete(os.path.join(runs, "k"))
    _finish(args)
    _assert_no_false_complete(os.path.join(runs, "k"))
    assert _same(_final_weights(os.path.join(runs, "k")), reference["weights"])
    assert not [n for n in os.listdir(os.path.join(runs, "k", "checkpoints")) if n.startswith(".") or n.endswith(".tmp")]


@pytest.mark.parametrize("point", ["publish", "swapped"])
def test_case_e2_kill_while_replacing_a_newer_checkpoint(reference, tmp_path, point):
    """Finish a run, resume it from an older step, SIGKILL it while it replaces the existing newer step dir:
    today's checkpoints stay whole and resume=auto continues to the same final weights."""
    runs = str(tmp_path)
    args = _args(reference["data"], runs, "r", **{"checkpoint.keep_last_k": 0})
    _finish(args)
    run = os.path.join(runs, "r")
    p = _worker(point, 2, args + [f"checkpoint.resume={run}/checkpoints/step-0000010"])
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    _assert_no_false_complete(run)
    _finish(args)
    assert _same(_final_weights(run), reference["weights"])


# ---- random kill points -----------------------------------------------------------------------
def _state(run: str) -> str:
    """What a kill left: the newest checkpoint and any leftovers of the interrupted save."""
    d = os.path.join(run, "checkpoints")
    names = sorted(os.listdir(d)) if os.path.isdir(d) else []
    steps = [n for n in names if n.startswith("step-") and not n.endswith(".tmp")]
    extra = [n.split("-")[0] if n.startswith(".") else n for n in names if n.startswith(".") or n.endswith(".tmp")]
    return f"newest {steps[-1] if steps else None}, leftovers {extra}"


class _Victim:
    """A training subprocess killed with SIGKILL `delay` seconds after it starts training."""

    def __init__(self, args: list[str]):
        self.p = subprocess.Popen([sys.executable, "-m", "train.pretrain", *args], cwd=ROOT, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.started = threading.Event()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.out.append(line)
            if line.startswith("memlm pretrain: run "):
                self.started.set()

    def kill_after(self, delay: float) -> bool:
        """True when the SIGKILL hit a running process (a kill point), False when it had finished."""
        self.started.wait(timeout=300)
        time.sleep(delay)
        killed = self.p.poll() is None
        if killed:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=300)
        assert killed or self.p.returncode == 0, "".join(self.out)[-3000:]
        return killed and self.p.returncode == -signal.SIGKILL


def kill_sweep(reference, root: str, n_kills: int, seed: int) -> dict:
    """Phase 1: a run relaunched with resume=auto after each random SIGKILL until it finishes. Phase 2: the
    finished run resumed from an older step (so every checkpoint it writes replaces an existing one) and
    killed at random, then continued with resume=auto. After every kill no step dir is falsely complete;
    every continuation ends with the reference's final weights. Returns the counts."""
    rng = random.Random(seed)
    span = reference["seconds"]  # from the start of training to the exit
    args = _args(reference["data"], root, "v", **{"checkpoint.keep_last_k": 0})
    run = os.path.join(root, "v")
    tried = survived = 0
    phase1 = n_kills // 2
    while tried < phase1:
        delay = rng.uniform(0, span)
        if _Victim(args).kill_after(delay):
            tried += 1
            _assert_no_false_complete(run)
            survived += 1
            print(f"[kill {tried}] {delay:.2f}s into training: {_state(run)}", flush=True)
    _finish(args)
    assert _same(_final_weights(run), reference["weights"])
    while tried < n_kills:
        start = rng.choice([2, 6, 12])
        delay = rng.uniform(0, span)
        if _Victim(args + [f"checkpoint.resume={run}/checkpoints/step-{start:07d}"]).kill_after(delay):
            tried += 1
            _assert_no_false_complete(run)
            state = _state(run)
            _finish(args)  # resume=auto continues from the newest intact checkpoint
            assert _same(_final_weights(run), reference["weights"])
            survived += 1
            print(f"[kill {tried}] resumed from step {start}, {delay:.2f}s into training: {state}", flush=True)
    return {"tried": tried, "survived": survived}


def test_random_kill_points_ci(reference, tmp_path):
    res = kill_sweep(reference, str(tmp_path), 2, seed=1)
    print(f"\n[kill points] tried {res['tried']}, survived {res['survived']}")
    assert res == {"tried": 2, "survived": 2}


@pytest.mark.slow
def test_random_kill_points_sweep(reference, tmp_path):
    res = kill_sweep(reference, str(tmp_path), 50, seed=2)
    print(f"\n[kill points] tried {res['tried']}, survived {res['survived']}")
    assert res == {"tried": 50, "survived": 50}


# ---- E3, E4: damaged files ----------------------------------------------------------------------
@pytest.fixture()
def short_run(bios_data, tmp_path):  # noqa: F811
    from train.pretrain import main

    args = _args(bios_data, str(tmp_path), "s", 6, **{"checkpoint.every": 2, "checkpoint.keep_last_k": 0,
                                                       "trainer.val_every": 0})
    assert main(args) == 0
    return {"args": args, "run": os.path.join(str(tmp_path), "s")}


def test_case_e3_truncated_weights_named_and_resume_falls_back(short_run, capsys):
    from model.errors import CheckpointError
    from train.checkpoint import find_step_dir, load_run
    from train.cli import main as memlm
    from train.pretrain import main

    run = short_run["run"]
    want = {k: v.clone() for k, v in _final_weights(run, 6).items()}  # safetensors maps the file: copy it
    path = os.path.join(run, "checkpoints", "step-0000006", "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    for call in (lambda: find_step_dir(run), lambda: load_run(run),
                 lambda: load_run(os.path.dirname(path))):
        with pytest.raises(CheckpointError, match=r"step-0000006/model\.safetensors: \d+ bytes"):
            call()
    capsys.readouterr()
    assert memlm(["export-hf", run, "--out", os.path.join(run, "..", "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-0000006/model.safetensors" in err[0] and "Traceback" not in err[0]
    assert main(short_run["args"]) == 0
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "model.safetensors" in out and "(step 4)" in out
    assert _same(_final_weights(run, 6), want)


def test_flipped_byte_at_the_same_size_named_and_resume_falls_back(short_run, capsys):
    """A byte flipped inside the weights keeps the safetensors format readable (it would load as a wrong
    weight): the sha256 in the marker names the file, and resume=auto continues from the older checkpoint."""
    from model.errors import CheckpointError
    from train.checkpoint import load_run
    from train.cli import main as memlm
    from train.pretrain import main

    run = short_run["run"]
    want = {k: v.clone() for k, v in _final_weights(run, 6).items()}
    path = os.path.join(run, "checkpoints", "step-0000006", "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 3)  # inside the last tensor's data, past the header
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0x40]))
    load_run(path[: -len("model.safetensors") - 1].replace("0000006", "0000004"))  # the older one loads
    with pytest.raises(CheckpointError, match=r"step-0000006/model\.safetensors: its bytes differ from the sha256"):
        load_run(run)
    capsys.readouterr()
    hf = os.path.join(run, "..", "hf")
    assert memlm(["export-hf", run, "--out", hf]) == 2 and not os.path.exists(hf)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-0000006/model.safetensors" in err[0]
    assert main(short_run["args"]) == 0
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "sha256" in out and "(step 4)" in out
    assert _same(_final_weights(run, 6), want)


def test_case_e4_torn_metrics_line(short_run, capsys):
    from model.atomic import read_jsonl
    from train.pretrain import main

    run = short_run["run"]
    shutil.rmtree(os.path.join(run, "checkpoints", "step-0000006"))  # as if killed after step 6's log row
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss": 3.1')  # torn by a kill mid-write
    assert main(short_run["args"]) == 0
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert all(json.loads(line) for line in f)


# ---- V3: a changed schedule is refused, naming the key ------------------------------------------
@pytest.mark.parametrize("key,value", [("trainer.max_steps", 12), ("optim.lr", 0.001), ("optim.warmup_steps", 1),
                                       ("optim.min_lr", 0.0001)])
def test_case_v3_changed_schedule_is_refused(short_run, key, value):
    from model.errors import ConfigError
    from train.pretrain import main

    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}={value} but the checkpoint .*step-0000006 "
                                          rf"was trained with {key.replace('.', '[.]')}="):
        main(short_run["args"] + [f"{key}={value}"])
    assert main(short_run["args"]) == 0  # the saved value resumes (nothing to do: the run is finished)


def test_case_v3_changed_memory_lr_is_refused(bios_data, tmp_path):  # noqa: F811
    from model.errors import ConfigError
    from test_bank_train import _fake_clustered
    from train.pretrain import main

    data = _fake_clustered(bios_data, str(tmp_path / "data"))
    args = _args(data, str(tmp_path), "m", 2, **{"trainer.val_every": 0, "memory.k": 2, "memory.widths": "[8,4]",
                                                   "memory.lr": 0.01, "memory.min_lr": 0.001})
    assert main(args) == 0
    with pytest.raises(ConfigError, match=r"memory\.lr=0\.02 but the checkpoint .* memory\.lr=0\.01"):
        main(args + ["memory.lr=0.02"])


def test_changed_bank_layout_or_phase_is_refused_naming_the_key(bios_data, tmp_path):  # noqa: F811
    """memory.freeze_anchor changes the optimizer's parameter groups (it ended in torch's "different number
    of parameter groups" traceback); widths / layers change the bank's shapes: each is named with both values."""
    from model.errors import ConfigError
    from test_bank_train import _fake_clustered
    from train.pretrain import main

    data = _fake_clustered(bios_data, str(tmp_path / "data"))
    args = _args(data, str(tmp_path), "m", 2, **{"trainer.val_every": 0, "memory.k": 2, "memory.widths": "[8,4]"})
    assert main(args) == 0
    for over, match in [("memory.freeze_anchor=true", r"memory\.freeze_anchor=True but the checkpoint .* "
                                                      r"memory\.freeze_anchor=False"),
                        ("memory.widths=[8,8]", r"memory\.widths=\(8, 8\) but .* memory\.widths=\(8, 4\)"),
                        ("memory.layers=last:1", r"memory\.layers=\[3\] but .* memory\.layers=\[0, 1, 2, 3\]")]:
        with pytest.raises(ConfigError, match=match):
            main(args + [over])
    assert main(args + ["memory.layers=[0,1,2,3]"]) == 0  # the same layers ("all"), spelled otherwise


def test_changed_world_size_is_refused(short_run, monkeypatch):
    """Each rank's data position and the global batch follow the world size: resuming a 1-process run with
    2 (or a 2-process one with 1) would skip or repeat rows and miscount tokens_seen."""
    from model.errors import ConfigError
    from train.checkpoint import check_resume, read_run_config
    from train.pretrain import main

    step6 = os.path.join(short_run["run"], "checkpoints", "step-0000006")
    # accepted, it would wait for a second process in Fabric's process group: fail instead of hanging
    monkeypatch.setattr("train.pretrain._train", lambda *a, **k: pytest.fail("resumed with another world size"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"world size 2 .* but the checkpoint .*step-0000006 was trained with world "
                                          r"size 1; .* resume with 1 process\(es\), or start a new run .*init_from="):
        main(short_run["args"])
    cfg = read_run_config(step6)
    with pytest.raises(ConfigError, match=r"world size 3 .* trained with world size 1"):
        check_resume(cfg, cfg, step6, world_size=3)
    check_resume(cfg, cfg, step6, world_size=1)


def test_auto_resume_never_continues_an_abandoned_trajectory(short_run, monkeypatch, capsys):
    """A resume from an older step (2, with an allowed change) killed before its next save: resume=auto
    took the abandoned attempt's step-6 (grad_clip 1.0, its metrics rows already cut) and called the run
    done. The trajectory record sends it back to step 2; the newer step dirs are named, and kept."""
    from train import checkpoint
    from train.pretrain import main

    run = short_run["run"]
    step = lambda s: os.path.join(run, "checkpoints", f"step-{s:07d}")  # noqa: E731
    assert checkpoint.read_trajectory(run)["steps"] == [2, 4, 6]

    class Killed(Exception):
        pass

    def killed(self, *a, **kw):
        raise Killed

    monkeypatch.setattr(checkpoint.Checkpointer, "save", killed)
    with pytest.raises(Killed):
        main(short_run["args"] + [f"checkpoint.resume={step(2)}", "optim.grad_clip=0.5"])
    monkeypatch.undo()
    assert checkpoint.read_trajectory(run)["steps"] == [2]
    assert checkpoint.choose_resume(checkpoint.load_config(os.path.join(run, "config.yaml")), print) == step(2)
    capsys.readouterr()
    assert main(short_run["args"] + ["optim.grad_clip=0.5"]) == 0
    out = capsys.readouterr().out
    assert f"ignoring {step(6)}: not a checkpoint of this run's current attempt" in out and f"ignoring {step(4)}" in out
    assert f"resuming from {step(2)} (step 2)" in out
    for s in (4, 6):  # rewritten by this trajectory
        assert checkpoint.read_run_config(step(s)).optim.grad_clip == 0.5
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.read_trajectory(run)["steps"] == [2, 4, 6]


def test_abandoned_checkpoints_below_the_last_save_are_never_resumed(short_run, monkeypatch, capsys):
    """Resumed from step 2 with checkpoint.every=3, the attempt saves 3 and is killed saving 6: the
    abandoned step-4 lies between. With step-3 damaged, resume=auto goes back to step 2, never to the abandoned step-4;
    a run started from another run's checkpoint and killed before its first save continues from that
    checkpoint; a run with only an abandoned attempt's checkpoints is an error, never a fresh start."""
    from model.errors import CheckpointError
    from train import checkpoint
    from train.pretrain import main

    run = short_run["run"]
    step = lambda s: os.path.join(run, "checkpoints", f"step-{s:07d}")  # noqa: E731

    class Killed(Exception):
        pass

    real_save = checkpoint.Checkpointer.save

    def save_once(self, n, *a, **kw):
        if n > 3:
            raise Killed
        return real_save(self, n, *a, **kw)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_once)
    with pytest.raises(Killed):
        main(short_run["args"] + [f"checkpoint.resume={step(2)}", "checkpoint.every=3"])
    monkeypatch.undo()
    assert checkpoint.read_trajectory(run)["steps"] == [2, 3]
    assert checkpoint.abandoned(run) == [step(4), step(6)]
    with open(os.path.join(step(3), "model.safetensors"), "r+b") as f:
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 1]))
    import dataclasses

    def auto(path):  # the run's config, as `resume=auto` reads it (the killed attempts recorded a resume path)
        cfg = checkpoint.load_config(os.path.join(path, "config.yaml"))
        return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))

    cfg = auto(run)
    logged = []
    assert checkpoint.choose_resume(cfg, logged.append) == step(2)
    assert any(f"ignoring {step(4)}" in m for m in logged) and any("skipping damaged" in m and "step-0000003" in m
                                                                  for m in logged)

    other = os.path.join(os.path.dirname(run), "other")
    monkeypatch.setattr(checkpoint.Checkpointer, "save", lambda *a, **kw: (_ for _ in ()).throw(Killed()))
    args = [a for a in short_run["args"] if not a.startswith("name=")]
    with pytest.raises(Killed):
        main(args + ["name=other", f"checkpoint.resume={step(2)}"])
    monkeypatch.undo()
    assert checkpoint.read_trajectory(other) == {"steps": [], "from": step(2)}
    assert checkpoint.choose_resume(auto(other), print) == step(2)

    checkpoint.write_trajectory(run, [1])  # an attempt none of whose checkpoints exist
    with pytest.raises(CheckpointError, match=r"no checkpoint of this run's current attempt, and .*step-0000002"):
        checkpoint.choose_resume(cfg, print)
    with open(os.path.join(run, checkpoint.TRAJECTORY), "w") as f:
        f.write('{"steps": [4.7]}')
    with pytest.raises(CheckpointError, match=r"trajectory\.json: damaged .*delete it"):
        checkpoint.choose_resume(cfg, print)


def test_only_damaged_checkpoints_is_an_error_not_a_restart(short_run):
    """A run whose checkpoints are all damaged (or written before the marker existed) is not silently
    restarted over them."""
    from model.errors import CheckpointError
    from train.pretrain import main

    ckpts = os.path.join(short_run["run"], "checkpoints")
    for name in os.listdir(ckpts):
        os.remove(os.path.join(ckpts, name, ".memlm.json"))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from .*step-0000006: incomplete"):
        main(short_run["args"])
    assert sorted(os.listdir(ckpts)) == ["step-0000002", "step-0000004", "step-0000006"]

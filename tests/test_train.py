"""The training loop (train/pretrain.py + train/loop.py): smoke run, exact resume from an older checkpoint
(replacing the newer ones), config errors, NaN guard, wandb, load_run, export-hf. Tiny preset, seq_len 64,
batch 4, on CPU. Crash safety and kill points: tests/test_checkpoint.py."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """In-process runs compare bits: one intra-op thread (several may split sums differently under load)."""


def _args(data, runs, name, steps, **over):
    kv = {"data.path": data, "runs_dir": runs, "name": name, "trainer.max_steps": steps, "data.seq_len": 64,
          "data.batch_size": 4, "optim.warmup_steps": 5, "trainer.log_every": 1, "trainer.val_every": 0,
          "checkpoint.every": 10, "logging.logger": "none", "trainer.deterministic": True}
    kv.update(over)
    return ["--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}, [r for r in rows if "val_loss" in r]


def _ckpts(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ---------------------------------------------------------------------------------------------
# config (no training)

def test_config_overrides_and_unknown_key():
    from train.config import ConfigError, load_config

    cfg = load_config(RECIPE, ["optim.lr=3e-4", "model.n_layer=2", "data.calls=calls_lacy", "trainer.compile=true"])
    assert cfg.optim.lr == 3e-4 and cfg.model.n_layer == 2 and cfg.model.n_embd == 128  # preset tiny + override
    assert cfg.data.calls == "calls_lacy" and cfg.trainer.compile is True
    for bad, key in [("optim.lrr=1", "optim.lrr"), ("model.n_layers=2", "model.n_layers"), ("foo=1", "foo"),
                     ("trainer.max_steps=abc", "trainer.max_steps")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(RECIPE, [bad])
    from train.pretrain import main

    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        main(["--config", RECIPE, "optim.lrr=1"])


def test_config_yaml_round_trip(tmp_path):
    from train.config import load_config, save_config

    cfg = load_config(RECIPE, ["model.preset=tiny-2x", "optim.betas=[0.9,0.99]"])
    save_config(cfg, str(tmp_path / "c.yaml"))
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.to_dict() == cfg.to_dict()
    assert again.model_preset == "tiny-2x" and again.optim.betas == (0.9, 0.99)


def test_lr_schedule_shape():
    from train.build import lr_factor

    f = [lr_factor(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


# ---------------------------------------------------------------------------------------------
# training runs

@pytest.fixture(scope="module")
def smoke_run(bios_data, tmp_path_factory):
    """20 steps in-process (the smoke test), checkpoint every 10, val every 10."""
    from train.pretrain import main

    runs = str(tmp_path_factory.mktemp("runs"))
    rc = main(_args(bios_data, runs, "smoke", 20, **{"trainer.val_every": 10, "trainer.log_every": 2,
                                                    "checkpoint.keep_last_k": 1}))
    return {"rc": rc, "run_dir": os.path.join(runs, "smoke"), "data": bios_data}


def test_smoke_20_steps(smoke_run):
    # No wall-clock bound here (it fails under load): speed is measured by the benchmark scripts.
    assert smoke_run["rc"] == 0
    run_dir = smoke_run["run_dir"]
    train, val = _metrics(run_dir)
    assert sorted(train) == list(range(2, 21, 2))
    assert train[20]["loss"] < train[2]["loss"] - 0.5  # loss falls
    assert all(math.isfinite(v["loss"]) and math.isfinite(v["grad_norm"]) for v in train.values())
    for key in ("lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "time"):
        assert key in train[20]
    assert train[20]["tokens"] == 20 * 4 * 64
    # the lr logged for step s is the one its update used: lr_factor(s - 1) (0-based), not the next step's
    from train.build import lr_factor

    for s, row in train.items():
        assert row["lr"] == pytest.approx(3e-3 * lr_factor(s - 1, 3e-3, 3e-4, 5, 20), rel=1e-6), s
    assert train[2]["lr"] == pytest.approx(3e-3 * 2 / 5) and train[20]["lr"] > 3e-4  # no step used min_lr itself
    assert [v["step"] for v in val] == [10, 20] and val[-1]["val_bpb"] > 0
    assert val[0]["val_tokens"] == val[1]["val_tokens"]  # every validation sees the same val rows
    assert _ckpts(run_dir) == ["step-0000020"]  # keep_last_k=1 pruned step 10
    step = os.path.join(run_dir, "checkpoints", "step-0000020")
    for f in ("model.safetensors", "optimizer.pt", "data_state_rank0.json", "rng_rank0.pt", "config.yaml",
              "meta.json", "tokenizer", ".memlm.json"):
        assert os.path.exists(os.path.join(step, f)), f
    marker = json.load(open(os.path.join(step, ".memlm.json")))
    assert marker["kind"] == "checkpoint" and marker["files"]["model.safetensors"] > 0
    meta = json.load(open(os.path.join(step, "meta.json")))
    assert meta["step"] == 20 and meta["tokens_seen"] == 20 * 256 and "torch" in meta["versions"]
    assert meta["val_loss"] == val[-1]["val_loss"]  # validation runs before the checkpoint of its step
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))


def test_load_run(smoke_run):
    from train.checkpoint import load_run

    model, tok, cfg, router = load_run(smoke_run["run_dir"])
    assert router is None and cfg.model.vocab_size == 512 and tok is not None
    ids = torch.tensor([tok.encode("Alice was born in")])
    out = model.generate(ids, max_new_tokens=4)
    assert out.shape == (1, ids.shape[1] + 4)


def test_export_hf_matches_logits(smoke_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.checkpoint import load_run
    from train.commands.export_hf import main as export_main

    out = str(tmp_path / "hf")
    assert export_main([smoke_run["run_dir"], "--out", out]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tok, _, _ = load_run(smoke_run["run_dir"])
    ids = torch.tensor([tok.encode("Bob Smith studied at the University of")])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max() / ours.abs().max() < 1e-5


def test_resume_nonexistent_path_errors(bios_data, tmp_path):
    from train.pretrain import main

    from model.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no-such-ckpt"):
        main(_args(bios_data, str(tmp_path), "r", 5, **{"checkpoint.resume": str(tmp_path / "no-such-ckpt")}))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(bios_data, tmp_path, monkeypatch):
    """A nan loss at step 5 (injected into the loss of the 5th micro-batch): the run stops at the next log
    step with a message naming step 5 and the last good checkpoint; nothing is written after the nan."""
    from model.errors import TrainingError
    from train import loop
    from train.pretrain import main

    real, calls = loop.training_loss, [0]

    def nan_at_5(model, batch, world_size):
        calls[0] += 1
        share = real(model, batch, world_size)
        return share * float("nan") if calls[0] == 5 else share

    monkeypatch.setattr(loop, "training_loss", nan_at_5)
    with pytest.raises(TrainingError, match="step 5") as e:
        main(_args(bios_data, str(tmp_path), "nan", 12, **{"checkpoint.every": 3, "trainer.log_every": 4}))
    assert "step-0000003" in str(e.value)
    assert _ckpts(os.path.join(str(tmp_path), "nan")) == ["step-0000003"]  # nothing after the nan


def test_exact_resume_from_an_older_checkpoint(bios_data, tmp_path, capsys):
    """A: 40 steps, a checkpoint every 10, all kept. Then A again from its step-20 checkpoint
    (checkpoint.resume=PATH): steps 21..40 replay bit for bit (loss, lr, grad norm, final weights), and
    the newer step-30 / step-40 are replaced by whole new ones."""
    from model.weights import read_weights
    from train.pretrain import main

    runs = str(tmp_path)
    args = _args(bios_data, runs, "A", 40, **{"checkpoint.keep_last_k": 0, "trainer.val_every": 10,
                                              "trainer.val_batches": 1})
    assert main(args) == 0
    run = os.path.join(runs, "A")
    first, first_val = _metrics(run)
    w40 = read_weights(os.path.join(run, "checkpoints", "step-0000040", "model.safetensors"))
    inode = os.stat(os.path.join(run, "checkpoints", "step-0000040", "model.safetensors")).st_ino
    capsys.readouterr()
    assert main(args + [f"checkpoint.resume={run}/checkpoints/step-0000020"]) == 0
    assert "resuming from" in capsys.readouterr().out
    again, again_val = _metrics(run)
    assert sorted(again) == list(range(1, 41))
    for s in range(21, 41):
        assert (again[s]["loss"], again[s]["lr"], again[s]["grad_norm"]) == \
            (first[s]["loss"], first[s]["lr"], first[s]["grad_norm"]), s
    assert [v["val_loss"] for v in again_val] == [v["val_loss"] for v in first_val]
    path = os.path.join(run, "checkpoints", "step-0000040", "model.safetensors")
    assert os.stat(path).st_ino != inode  # a new checkpoint took the old one's place
    w = read_weights(path)
    assert w.keys() == w40.keys() and all(torch.equal(w[k], w40[k]) for k in w)
    assert _ckpts(run) == [f"step-{s:07d}" for s in (10, 20, 30, 40)]


def test_checkpoints_carry_the_tokenizer_and_fingerprint_the_run_started_with(bios_data, tmp_path, monkeypatch):
    """`memlm prepare --rebuild` of data.path under a running training: its later checkpoints copied the NEW
    tokenizer from the data dir at save time, and meta.json's fingerprint was read at the first save."""
    import shutil

    from train import checkpoint
    from train.pretrain import main

    data = str(tmp_path / "data")
    shutil.copytree(bios_data, data)
    tok = os.path.join(data, "tokenizer", "tokenizer.json")
    with open(tok, "rb") as f:
        before = f.read()
    fp = checkpoint.DataSnapshot.take(data).fingerprint
    save = checkpoint.Checkpointer.save

    def save_after_rebuild(self, step, val=None):  # the data dir is prepared again before every save
        with open(tok, "w") as f:
            f.write('{"rebuilt": %d}' % step)
        manifest = os.path.join(data, "manifest.json")
        m = json.load(open(manifest))
        m["tokenizer_hash"] = f"rebuilt-{step}"
        json.dump(m, open(manifest, "w"))
        return save(self, step, val)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_after_rebuild)
    assert main(_args(data, str(tmp_path), "r", 4, **{"checkpoint.every": 2, "checkpoint.keep_last_k": 0})) == 0
    for s in (2, 4):
        step = os.path.join(str(tmp_path), "r", "checkpoints", f"step-{s:07d}")
        with open(os.path.join(step, "tokenizer", "tokenizer.json"), "rb") as f:
            assert f.read() == before, s
        assert json.load(open(os.path.join(step, "meta.json")))["data_fingerprint"] == fp


def test_wandb_offline_logger(bios_data, tmp_path):
    """logging.logger=wandb in offline mode (the default): never needs a network, writes beside the run."""
    import glob

    pytest.importorskip("wandb")
    from train.pretrain import main

    assert main(_args(bios_data, str(tmp_path), "wb", 2, **{"logging.logger": "wandb",
                                                            "logging.wandb_mode": "offline"})) == 0
    assert glob.glob(os.path.join(str(tmp_path), "wb", "wandb", "offline-run-*"))
    train, _ = _metrics(os.path.join(str(tmp_path), "wb"))
    assert sorted(train) == [1, 2]  # metrics.jsonl is written whatever the logger


def test_cpu_peak_remeasure_keeps_the_best():
    """A CPU peak measured while other jobs loaded the cores (MFU > 100% later) is replaced on refresh."""
    import torch

    from train import flops

    key = f"{torch.float32}-256-{torch.get_num_threads()}"
    flops._cpu_peak_cache[key] = 1.0  # as if measured on a saturated machine
    assert flops.measure_cpu_peak(n=256) == 1.0  # cached
    fresh = flops.measure_cpu_peak(n=256, refresh=True)
    assert fresh > 1e6
    flops._cpu_peak_cache[key] = 1e18  # a higher earlier measurement is kept
    assert flops.measure_cpu_peak(n=256, refresh=True) == 1e18
    del flops._cpu_peak_cache[key]

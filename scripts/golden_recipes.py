"""The golden recipes of scripts/loss_compare.py: how their data is built and how they train.

Every input comes from the repository alone: `memlm prepare`'s seeded `bios` corpus plus synthetic cluster
paths, a router and a per-token calls array (no MiniLM, FAISS or spaCy), so any later version of the code
regenerates the identical data (its fingerprint is stored with each curve). Training goes through the
public entry point only, `python -m train.pretrain` / `torchrun ... -m train.pretrain` with dotted overrides,
one thread per process, deterministic.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model.atomic import add_entries, claim_work_dir, remove_work_entry  # noqa: E402
BIOS = dict(vocab_size=512, val_fraction=0.1, window_tokens=256, n_people=150, top_docs=60)
K, LEVELS, CALLS = 2, 2, "calls_golden"


class RunFailed(Exception):
    """A recipe's training command failed (the code under test broke)."""


# ---- data: rebuilt bit for bit from the repository ------------------------------------------------
def build_data(out: str) -> dict:
    """Prepare `bios` into `out` and add synthetic cluster paths [n_windows, 2] (k=2), a router and a
    per-token calls array; returns the data fingerprint (tokenizer hash, sha256 of tokens and arrays)."""
    import hashlib

    import numpy as np

    from data.shards import open_data, prepare

    prepare("bios", out, progress=False, log=lambda *a, **k: None, **BIOS)
    dd = open_data(out)
    tok = dd.tokenizer()
    # tokens containing a digit (years, counts) or starting upper-case: a spaCy-free stand-in for LaCy's flags
    text = [tok.decode([i]) for i in range(len(tok))]
    factual = np.array([any(c.isdigit() for c in t) or t.strip()[:1].isupper() for t in text], dtype=bool)
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for sh in dd.shards(split):
            n = len(sh.windows) - 1
            # a fixed integer hash of the window index, not an RNG stream (those may change across numpy versions)
            h = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
            paths = np.stack([(h >> np.uint64(7 + 5 * l)) % np.uint64(K) for l in range(LEVELS)], 1).astype(np.int32)
            sh.write_array("paths", paths)
            toks = np.asarray(sh.tokens).astype(np.int64)
            sh.write_array(CALLS, (factual[toks] & (np.arange(toks.size) % 3 == 0)).astype(np.uint8))
            for arr in (np.asarray(sh.tokens), paths, np.asarray(sh.array(CALLS))):
                digest.update(np.ascontiguousarray(arr).tobytes())
    dd.update_manifest(n_levels=LEVELS)
    _write_router(out)
    return {"tokenizer_hash": dd.manifest["tokenizer_hash"], "sha256": digest.hexdigest(),
            "train_tokens": dd.n_tokens("train"), "val_tokens": dd.n_tokens("val")}


def _write_router(out: str) -> None:
    """router.json + router.safetensors as `memlm cluster` writes them, with fixed centroids: training only
    checks its shape and copies it into checkpoints. Written from the file format, not memory/'s classes."""
    import numpy as np
    from safetensors.numpy import save_file

    cents = {f"centroids.level{l + 1}": np.sin(np.arange(K ** (l + 1) * 384, dtype=np.float32)).reshape(-1, 384)
             for l in range(LEVELS)}
    save_file(cents, os.path.join(out, "router.safetensors"))
    write_text(os.path.join(out, "router.json"), json.dumps({"version": 1, "k": K, "levels": LEVELS, "dim": 384}))


def write_text(path: str, text: str) -> None:
    from model.atomic import atomic_write

    atomic_write(path, text)


# ---- recipes ----------------------------------------------------------------------------------------
BASE = {"model.preset": "tiny", "seed": 1337, "data.seq_len": 64, "data.batch_size": 4, "optim.lr": 3e-3,
        "optim.min_lr": 3e-4, "optim.warmup_steps": 5, "optim.weight_decay": 0.1, "optim.grad_clip": 1.0,
        "optim.accumulate": 1, "trainer.precision": "32-true", "trainer.deterministic": "true",
        "trainer.log_every": 1, "trainer.val_every": 0, "logging.logger": "none", "checkpoint.every": 0,
        "checkpoint.keep_last_k": 1}
# generic_prob keeps its default (1/(k+1)): the generic-block draws are part of what the curves pin down
# (they come from the seeded global RNG, which nothing load-dependent touches: flops.measure_cpu_peak uses
# its own generator).
MEMORY = {"memory.k": K, "memory.widths": "[16,8]", "memory.layers": "last:2", "memory.lr": 1e-3,
          "memory.min_lr": 1e-4, "memory.weight_decay": 1e-3}


@dataclass
class Recipe:
    name: str
    doc: str
    overrides: dict
    nproc: int = 1
    needs: str | None = None  # a recipe whose run this one starts from (init_from)
    steps: int = field(init=False)

    def __post_init__(self):
        self.overrides = {**BASE, **self.overrides}
        self.steps = int(self.overrides["trainer.max_steps"])


RECIPES = {r.name: r for r in [
    Recipe("anchor", "tiny anchor pretraining from scratch; validation every 10 steps",
           {"trainer.max_steps": 30, "trainer.val_every": 10, "trainer.val_batches": 2}),
    Recipe("memory-resident", "memory phase 2: init_from the anchor run, anchor frozen, resident bank (dense "
           "AdamW), rows take the generic block with the default probability; validation every 10 steps",
           {"trainer.max_steps": 20, "trainer.val_every": 10, "trainer.val_batches": 2, "init_from": "{runs}/anchor",
            "memory.freeze_anchor": "true", "memory.storage": "resident", **MEMORY}, needs="anchor"),
    Recipe("memory-host", "anchor + memories from scratch (co-training), host-offloaded bank + sparse "
           "AdamW, generic-block draws, gradient accumulation 2",
           {"trainer.max_steps": 20, "optim.accumulate": 2, "memory.storage": "host", "memory.freeze_anchor": "false",
            **MEMORY}),
    Recipe("calls", "<CALL> training: targets replaced by <CALL> where the calls_golden array is set",
           {"trainer.max_steps": 20, "data.calls": CALLS}),
    Recipe("ddp", "torchrun 2 ranks (gloo), batch 2 per rank, gradient accumulation 2, validation every 10",
           {"trainer.max_steps": 20, "data.batch_size": 2, "optim.accumulate": 2, "trainer.val_every": 10,
            "trainer.val_batches": 1}, nproc=2),
]}


def overrides(r: Recipe, data: str, runs: str, extra: list[str] = ()) -> list[str]:
    kv = {"data.path": data, "runs_dir": runs, "name": r.name, **r.overrides}
    return [f"{k}={v}".replace("{runs}", runs) for k, v in kv.items()] + list(extra)


def launcher(r: Recipe, python: str = "python") -> list[str]:
    if r.nproc == 1:
        return [python, "-m", "train.pretrain"]
    run = ["torchrun"] if python == "python" else [python, "-m", "torch.distributed.run"]  # torchrun of this env
    return run + ["--standalone", f"--nproc_per_node={r.nproc}", "-m", "train.pretrain"]


def command(r: Recipe) -> str:
    """The recipe's command line as stored in its golden file ({data}, {runs}: the workspace's dirs)."""
    return " ".join(launcher(r) + overrides(r, "{data}", "{runs}"))


def cpu_info() -> dict:
    """What selects the CPU kernels (and so the last bits of fp32 results)."""
    import platform

    import torch

    info = {"machine": platform.machine(), "vendor": "", "model": "", "flags": ""}
    try:
        with open("/proc/cpuinfo") as f:
            lines = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        lines = {k.strip(): v.strip() for k, v in lines.items()}
        isa = sorted(f for f in lines.get("flags", "").split() if f.startswith(("avx", "amx", "fma")))
        info.update(vendor=lines.get("vendor_id", ""), model=lines.get("model name", ""), flags=" ".join(isa))
    except OSError:
        info["model"] = platform.processor()
    info.update(capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__)
    return info


class Workspace:
    """One data dir and the recipe runs of one invocation (a run another recipe needs is trained once).
    `path` is memlm's work directory (new, empty, or an earlier workspace: model.atomic.claim_work_dir);
    a recipe's old run is deleted only from there."""

    KIND = "loss-compare"

    def __init__(self, path: str, extra: list[str] = (), log=print):
        claim_work_dir(path, self.KIND, option="--keep")
        self.path, self.extra, self.log = path, list(extra), log
        self.data, self.runs = os.path.join(path, "data"), os.path.join(path, "runs")
        self.fingerprint = None
        self.done: dict[str, str] = {}

    def prepare(self) -> dict:
        if self.fingerprint is None:
            add_entries(self.path, ["data"])
            self.fingerprint = build_data(self.data)
        return self.fingerprint

    def run(self, name: str) -> str:
        """Train recipe `name` (and what it needs) from a clean run dir; returns the run dir."""
        r = RECIPES[name]
        if name in self.done:
            return self.done[name]
        if r.needs:
            self.run(r.needs)
        self.prepare()
        run_dir = os.path.join(self.runs, name)
        add_entries(self.path, ["runs"])
        if os.path.lexists(run_dir):  # never resume=auto from an older run of this workspace
            remove_work_entry(self.path, self.KIND, run_dir)
        os.makedirs(self.runs, exist_ok=True)
        argv = launcher(r, sys.executable) + overrides(r, self.data, self.runs, self.extra)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_DYNAMIC="FALSE", PYTHONHASHSEED="0",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log(f"[loss_compare] {name}: training {r.steps} steps ({r.nproc} process(es))")
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        log_path = os.path.join(self.runs, f"{name}.log")
        write_text(log_path, p.stdout + p.stderr)
        if p.returncode != 0:
            tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
            raise RunFailed(f"recipe {name}: training exited with {p.returncode} (log {log_path}):\n{tail}")
        self.done[name] = run_dir
        return run_dir

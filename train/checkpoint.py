"""Run checkpoints: one `Checkpointer` owns every piece of state a run resumes from, keyed by component
(torchtitan's checkpointer habit), and `load_run` loads a checkpoint for inference.

    runs/<name>/checkpoints/step-0000020/
        model.safetensors        "model"      weights (model/weights.py; tied tensors stored once)
        optimizer.pt             "optimizer"  dense AdamW, LR schedule, sparse bank optimizer, step
        bank/                    "bank"       an offloaded bank's rows + AdamW state (memory/bank_io.py)
        data_state_rank{r}.json  "data"       rank r's position: micro-batches consumed
        rng_rank{r}.pt           "rng"        rank r's torch / numpy / python (/ CUDA) RNG states
        config.yaml tokenizer/   "run files"  the resolved config, the data's tokenizer,
        router.*                              and for memory runs the router (routes prompts at inference)
        meta.json                             step, tokens seen, validation, versions
        .memlm.json                           the marker, written last (model/atomic.py)

Crash safety. A checkpoint is complete iff its marker exists and every file has the size the marker
records (`model.atomic.verify_dir`); a truncated or half-deleted directory never counts. The marker also
records every file's sha256, checked when a checkpoint is loaded (resume, init_from, eval, export, ...):
bytes damaged at the same size are named too, and `resume=auto` falls back past them. It is written
as `step-N.tmp` (every rank writes its own files into it), the marker goes in last, and it is renamed
to `step-N`. An existing `step-N` (a newer checkpoint of a run resumed from an older step) is renamed
away before the new one takes its name, and old checkpoints are pruned by renaming them away first,
so a kill at any moment leaves each `step-N` either whole or absent. `resume=auto` takes the newest
intact checkpoint and names any newer damaged one it skips.

Resume is exact, and refuses a config that would continue another run: the model section, and the keys
the optimizer state, the schedule and the data position were built from (RESUME_KEYS), must equal the
checkpoint's; the error names the key. This module does not import Lightning.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import random
import re
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from model.atomic import (atomic_write_json, foreign_entries, is_leftover, publish_dir, read_marker, remove_dir,
                          remove_leftovers, verify_dir, write_marker)
from model.errors import (CheckpointError, ConfigError, MemlmError, OutputExistsError, StorageError,
                          describe_os_error, os_error_of)
from model.weights import load_weights, read_weights, save_weights
from train.config import RunConfig, get_key, load_config, save_config

KIND = "checkpoint"  # the marker's kind
STEP_RE = re.compile(r"^step-(\d{7,})$")
TMP_RE = re.compile(r"^step-(\d{7,})\.tmp$")

# What a checkpoint's optimizer state, schedule and data position were built from: resuming with another
# value would silently continue another run (e.g. max_steps: the cosine would jump), so it is refused.
RESUME_KEYS = ("seed", "trainer.max_steps", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay",
               "optim.betas", "optim.eps", "optim.accumulate", "data.seq_len", "data.batch_size", "data.calls",
               "data.by_leaf", "memory.lr", "memory.min_lr", "memory.weight_decay", "memory.storage",
               # the optimizer's parameter groups and the bank's shapes (a change would fail deep in torch)
               "memory.freeze_anchor", "memory.k", "memory.widths", "memory.layers")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# ---------------------------------------------------------------------------------------------
# finding checkpoints

def step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of every `step-N` directory (complete or not), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir) if (m := STEP_RE.match(n))]
    return sorted(found)


def check_step_dir(path: str, deep: bool = True) -> str | None:
    """None when `path` is a complete checkpoint, else why not (names the file). `deep`: also compare
    every file's sha256 with the marker's (reads the whole checkpoint once per process)."""
    try:
        verify_dir(path, KIND, deep=deep)
    except CheckpointError as e:
        return str(e)
    return None


# The checkpoints of the run's current attempt ("steps", updated at each save) and the checkpoint of another
# run it started from ("from"), written before training starts: after a resume from an older step, the
# other step dirs are an abandoned attempt's (another config, a curve metrics.jsonl no longer holds), and
# resume=auto / a command given the run dir must never pick them, nor pruning count or delete them.
TRAJECTORY = "trajectory.json"


def read_trajectory(run_dir: str) -> dict | None:
    """RUN/trajectory.json ({"steps": [int], "from": step dir or None}), or None (no record: a run written
    before memlm kept it, whose step dirs all count)."""
    path = os.path.join(run_dir, TRAJECTORY)
    if not os.path.isfile(path):
        return None
    try:
        rec = _json(path)
        steps = rec["steps"]
        if not (isinstance(steps, list) and all(type(x) is int for x in steps)):
            raise ValueError("'steps' is not a list of step numbers")
        if not isinstance(rec.get("from"), (str, type(None))):
            raise ValueError("'from' is not a path")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged ({type(e).__name__}: {e}); delete it: the run's step dirs then all "
                              "count again (it only sets aside an abandoned attempt's checkpoints)") from None
    return rec


def write_trajectory(run_dir: str, steps: list[int], start: str | None = None) -> None:
    atomic_write_json(os.path.join(run_dir, TRAJECTORY), {"steps": sorted(set(steps)), "from": start})


def start_trajectory(run_dir: str, resume_dir: str | None, step: int | None) -> None:
    """Record the attempt that starts now: from scratch, from a checkpoint of this run (its own earlier
    checkpoints at or below that step stay part of it), or from another run's checkpoint."""
    if resume_dir is None:
        return write_trajectory(run_dir, [])
    if os.path.realpath(os.path.dirname(resume_dir)) != os.path.realpath(os.path.join(run_dir, "checkpoints")):
        return write_trajectory(run_dir, [], os.path.abspath(resume_dir))
    old = read_trajectory(run_dir)
    if old is None:  # no record: every step dir up to the resumed one is this run's
        steps = [s for s, _ in step_dirs(os.path.join(run_dir, "checkpoints")) if s <= step]
    elif step in old["steps"]:
        steps = [s for s in old["steps"] if s <= step]
    else:  # an abandoned attempt's checkpoint, chosen by hand: its own older ones are unknown
        steps = [step]
    write_trajectory(run_dir, steps + [step], None if old is None else old.get("from"))


def abandoned(run_dir: str) -> list[str]:
    """The step dirs of a run that are not its current attempt's (per RUN/trajectory.json)."""
    rec = read_trajectory(run_dir)
    if rec is None:
        return []
    return [p for s, p in step_dirs(os.path.join(run_dir, "checkpoints")) if s not in rec["steps"]]


def newest_intact(run_dir: str, log: Callable[[str], None] | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest complete checkpoint of a run's current attempt or None, [(newer damaged step dir, why)]).
    Step dirs of an abandoned attempt (see TRAJECTORY) are left alone and named to `log`."""
    skipped, rec = [], read_trajectory(run_dir)
    for s, path in reversed(step_dirs(os.path.join(run_dir, "checkpoints"))):
        if rec is not None and s not in rec["steps"]:
            if log is not None:
                log(f"ignoring {path}: not a checkpoint of this run's current attempt "
                    f"({os.path.join(run_dir, TRAJECTORY)}: an earlier resume went back to an older step)")
            continue
        why = check_step_dir(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def find_step_dir(path: str, fall_back: bool = False, log: Callable[[str], None] | None = None) -> str:
    """A complete step dir from a step dir, a run dir or a run's checkpoints/ dir (the newest). A damaged
    newest checkpoint is a CheckpointError naming its file, unless `fall_back` (then the next intact one,
    and `log` says which it skipped)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if STEP_RE.match(os.path.basename(os.path.normpath(path))) or read_marker(path) is not None:
        why = check_step_dir(path)
        if why:
            raise CheckpointError(why)
        return path
    run_dir = os.path.dirname(os.path.normpath(path)) if os.path.basename(os.path.normpath(path)) == "checkpoints" \
        else path
    found, skipped = newest_intact(run_dir, log or (lambda msg: print(msg, file=sys.stderr)))
    if skipped and not fall_back:
        raise CheckpointError(f"{skipped[0][1]} (or give an older checkpoint: {run_dir}/checkpoints/step-...)")
    for bad, why in skipped:
        if log is not None:
            log(f"skipping damaged checkpoint {bad}: {why}")
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (checkpoints/step-XXXXXXX with its marker)")
    return found


def default_output(run: str, step_dir: str, name: str) -> str:
    """The default output directory NAME of a command reading `run` (resolved to `step_dir` by
    find_step_dir): RUN/NAME for a run dir, <run>/NAME-step-XXXXXXX beside the checkpoints for a step dir
    (never inside checkpoints/, where an extra entry would block a later resume). Built from the resolved
    path, so "." or a trailing "/" gives the same name."""
    step = os.path.realpath(step_dir)
    parent = os.path.dirname(step)
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None
    if os.path.realpath(run) == step:  # a step dir given: beside the run's checkpoints/ (or beside the step dir)
        return os.path.join(run_dir or parent, f"{name}-{os.path.basename(step)}")
    return os.path.join(run_dir or os.path.realpath(run), name)


def choose_resume(cfg: RunConfig, log: Callable[[str], None]) -> str | None:
    """The step dir a run continues from per checkpoint.resume, or None for a fresh start: "auto" takes
    the newest intact checkpoint (saying which damaged ones it skips; none intact but some damaged is an
    error, so a run is never silently restarted over them), "none" refuses a run that has one, a path
    must be an intact checkpoint or a run with one."""
    r = cfg.checkpoint.resume
    if r not in ("auto", "none"):
        return find_step_dir(r, fall_back=True, log=log)
    found, skipped = newest_intact(cfg.run_dir, log)
    if r == "none":
        if found:
            raise ConfigError(f"checkpoint.resume=none but {cfg.run_dir} has checkpoints ({found}); continue it "
                              "with checkpoint.resume=auto, or choose another name=")
        return None
    if skipped and found is None:  # never start over a run whose checkpoints are all damaged
        raise CheckpointError(f"{cfg.run_dir}: no intact checkpoint to resume from ({skipped[0][1]}); move the "
                              "damaged step dirs away, or start another run (name=...)")
    rec = read_trajectory(cfg.run_dir)
    if found is None and rec is not None and rec.get("from"):  # started from another run's checkpoint
        found = find_step_dir(rec["from"], fall_back=True, log=log)
    other = abandoned(cfg.run_dir)
    if found is None and other:  # never start over checkpoints, even an abandoned attempt's
        raise CheckpointError(f"{cfg.run_dir}: no checkpoint of this run's current attempt, and {', '.join(other)} "
                              f"are an abandoned attempt's ({TRAJECTORY}); continue one of them with "
                              "checkpoint.resume=PATH, or start another run (name=...)")
    for bad, why in skipped:
        log(f"skipping damaged checkpoint {bad} ({why}); resuming from {found}")
    return found


def check_same_data(step_dir: str, data) -> None:
    """ConfigError when `data` (a DataDir) is not the data the checkpoint trained on (its manifest's
    shards differ: prepared again with other documents or settings): the saved data position would point
    into other documents. Checkpoints written before memlm recorded the fingerprint are not checked."""
    saved = read_file(os.path.join(step_dir, "meta.json"), _json).get("data_fingerprint")
    if saved is not None and saved != data.fingerprint():
        raise ConfigError(f"data.path={data.path}: its shards are not the ones {step_dir} trained on (prepared "
                          "again since?); the saved data position would point into other documents: resume on "
                          "the data it was trained with, or start a new run (another name=) with init_from=it")


def check_later_steps(run_dir: str, step: int) -> None:
    """Before a run resumes from `step`: OutputExistsError when a later checkpoint it may rewrite holds
    files memlm did not write (they would be deleted with it)."""
    for s, path in step_dirs(os.path.join(run_dir, "checkpoints")):
        foreign = foreign_entries(path) if s > step else []
        if foreign:
            outputs = [n for n in foreign if read_marker(os.path.join(path, n))]  # e.g. an older memlm's eval/
            what = (f"holds {', '.join(foreign)}, not part of the checkpoint"
                    + (f" ({', '.join(outputs)}: a memlm output written inside it by an older memlm)" if outputs else
                       ", which memlm did not write there"))
            raise OutputExistsError(f"{path}: {what}; resuming from step {step} may replace this later checkpoint: "
                                    f"move it out first (e.g. beside {run_dir}/checkpoints)")


# What a fresh start may find in its run dir: what an earlier start of the run wrote before it was killed
# (before its first checkpoint), logger output, and directories memlm marked as its own (eval, hf exports).
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "checkpoints", "bank_live", "wandb", "lightning_logs", ".lock",
               TRAJECTORY}
LOCK = ".lock"  # held (flock) by the process writing the run: a second `memlm pretrain` of it is refused
RUN_DIRS = ("checkpoints", "bank_live", "wandb", "lightning_logs")  # the rest of RUN_ENTRIES are files


def check_run_entries(run_dir: str) -> None:
    """ConfigError for an entry memlm writes into that has the wrong type (a FILE named checkpoints would
    fail only at the first save, after the training steps are spent), before anything is built."""
    for name in sorted(RUN_ENTRIES):
        path = os.path.join(run_dir, name)
        if os.path.lexists(path) and os.path.isdir(path) != (name in RUN_DIRS):
            want = "a directory" if name in RUN_DIRS else "a file"
            raise ConfigError(f"{path}: is not {want}, but memlm pretrain writes {want} there; move it away, or "
                              "choose another name= or runs_dir=")


def lock_run_dir(run_dir: str):
    """Take the run directory's lock for this process (rank 0), or raise ConfigError naming the run when
    another process holds it (two trainings of one run would interleave their checkpoints and metrics).
    Returns the held `filelock.FileLock`; the OS releases it if the process dies."""
    from filelock import FileLock, Timeout

    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = FileLock(os.path.join(run_dir, LOCK))
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"{run_dir} (runs_dir/name): another memlm pretrain is writing this run (it holds "
                          f"{os.path.join(run_dir, LOCK)}); wait for it to finish, or choose another name=") from None
    except OSError as e:  # read-only, under a file, a name too long: before anything is built
        if os_error_of(e) is None:
            raise
        raise StorageError(describe_os_error(e, f"the run directory {run_dir} (runs_dir= / name=)")) from None
    return lock


def check_fresh_run_dir(run_dir: str) -> None:
    """Refuse to start a new run in `run_dir` unless it is new, empty, or holds only what memlm's own runs
    write there (RUN_ENTRIES with a memlm config.yaml, memlm-marked directories, leftovers of atomic writes):
    a fresh start rewrites config.yaml and metrics.jsonl. ConfigError naming the directory otherwise."""
    if not os.path.lexists(run_dir):
        return
    where = f"{run_dir} (runs_dir/name)"
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{where}: exists and is not a directory; choose another name= or runs_dir=")
    foreign = sorted(n for n in os.listdir(run_dir) if n not in RUN_ENTRIES and not is_leftover(n)
                     and not (os.path.isdir(os.path.join(run_dir, n)) and read_marker(os.path.join(run_dir, n))))
    if foreign:
        raise ConfigError(f"{where}: holds files that are not a memlm run's ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); a new run would overwrite config.yaml and "
                          "metrics.jsonl there: choose another name= or runs_dir=")
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.lexists(config):  # a run writes config.yaml before anything else: these are not a run's
        strays = sorted(n for n in os.listdir(run_dir) if n in RUN_ENTRIES and n not in (LOCK, TRAJECTORY))
        if strays:
            raise ConfigError(f"{where}: holds {', '.join(strays)} but no config.yaml, so not a memlm run's files; "
                              "a new run would overwrite them: choose another name= or runs_dir=")
    else:
        try:
            load_config(config)
        except (MemlmError, OSError, ValueError) as e:
            raise ConfigError(f"{config}: not a memlm run config ({str(e).splitlines()[0][:80]}); a new run would "
                              "overwrite it: choose another name= or runs_dir=") from None


def read_run_config(step_dir: str) -> RunConfig:
    path = os.path.join(step_dir, "config.yaml")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_config(path)
    except ConfigError as e:  # memlm wrote it: unreadable now means damaged
        raise CheckpointError(f"{e} (the checkpoint is damaged); use an older checkpoint "
                              "(checkpoint.resume=RUN/checkpoints/step-...)") from None


def read_file(path: str, read: Callable[[str], Any]) -> Any:
    """`read(path)`, with a file damaged at its recorded size (so the marker check passed) turned into a
    CheckpointError naming it: the unpickling, JSON, zip and key errors a reader raises on garbage."""
    try:
        return read(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, use another one") from None
    except Exception as e:  # noqa: BLE001 - torch.load and json raise many types on damaged bytes
        raise CheckpointError(f"{path}: damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}); resume from "
                              "an older checkpoint (checkpoint.resume=RUN/checkpoints/step-...)") from None


def _json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_step(step_dir: str) -> int:
    return read_file(os.path.join(step_dir, "meta.json"), lambda p: int(_json(p)["step"]))


def check_resume(saved: RunConfig, now: RunConfig, step_dir: str, world_size: int | None = None) -> None:
    """ConfigError naming the first key whose change would make the resumed run another one, or (when
    `world_size` is given) another number of processes than the checkpoint was trained with."""
    diff = saved.model.differences(now.model, ignore=("name",))
    if diff:
        k, a, b = diff[0]
        raise ConfigError(f"model.{k}={b} but the checkpoint {step_dir} has {a}; resume with the same model "
                          "settings, or start a new run (another name=) with init_from=" + step_dir)
    if (saved.memory is None) != (now.memory is None):
        raise ConfigError(f"memory: the checkpoint {step_dir} was {'a memory' if saved.memory else 'an anchor'} "
                          "run; resume it with the same memory section, or start a new run with init_from")
    for key in RESUME_KEYS:
        if key.startswith("memory.") and now.memory is None:
            continue
        a, b = get_key(saved, key), get_key(now, key)
        if key == "memory.layers":  # "last:2" and [2, 3] are the same layers
            a, b = (m.layer_ids(saved.model.n_layer) for m in (saved.memory, now.memory))
        if a != b:
            raise ConfigError(f"{key}={b} but the checkpoint {step_dir} was trained with {key}={a}; the optimizer "
                              f"state, LR schedule and data position follow the saved value: resume with "
                              f"{key}={a}, or start a new run (another name=) with init_from={step_dir}")
    if world_size is not None:
        # each rank's data position and the global batch follow the world size: another one would skip or
        # repeat rows and miscount tokens (checkpoints from before meta.json recorded it are not checked)
        saved_world = read_file(os.path.join(step_dir, "meta.json"), _json).get("world_size")
        if saved_world is not None and int(saved_world) != world_size:
            raise ConfigError(f"world size {world_size} (WORLD_SIZE, torchrun --nproc_per_node x nodes) but the "
                              f"checkpoint {step_dir} was trained with world size {saved_world}; each rank's data "
                              f"position and the global batch follow it: resume with {saved_world} process(es), or "
                              f"start a new run (another name=) with init_from={step_dir}")


# ---------------------------------------------------------------------------------------------
# RNG (saved as tensors and ints, so torch.load(weights_only=True) reads them)

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj, path: str) -> None:
    """torch.save, with a failed write (disk full, file-size limit) raised as its OSError: torch's zip writer
    reports it as a RuntimeError without the errno, so on failure the bytes are written once more by Python."""
    try:
        torch.save(obj, path)
    except RuntimeError:
        buf = io.BytesIO()
        torch.save(obj, buf)  # a genuine error (an object torch cannot save) raises here again
        with open(path, "wb") as f:
            f.write(buf.getbuffer())


# ---------------------------------------------------------------------------------------------
# the checkpointer

class DataSnapshot(NamedTuple):
    """What every checkpoint of a run carries from its data dir, taken when the run starts: a data dir
    prepared again (--rebuild) under a running training must not give its later checkpoints another
    tokenizer or fingerprint than the one it trained with."""
    fingerprint: str
    tokenizer: dict[str, bytes]  # path relative to DATA/tokenizer -> the file's bytes (a few MB at most)

    @classmethod
    def take(cls, data) -> "DataSnapshot":
        """From a data.shards.DataDir (the one the run opened) or a data dir path."""
        if isinstance(data, str):
            from data.shards import DataDir

            data = DataDir(data)
        files, src = {}, os.path.join(data.path, "tokenizer")
        for root, _, names in os.walk(src):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, src)] = f.read()
        return cls(data.fingerprint(), files)

    def write_tokenizer(self, dst: str) -> None:
        for rel, blob in self.tokenizer.items():
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            with open(os.path.join(dst, rel), "wb") as f:
                f.write(blob)

class Checkpointer:
    """Saves and restores a training run's state by component (see the module docstring). Every rank
    calls `save` and `load` (collectives inside); rank 0 writes the shared files.

    model: the LanguageModel (unwrapped); optimizers: train.build.Optimizers; barrier: the process group's
    barrier (a no-op for one process); state_dicts: () -> (model state dict, optimizer state dict), called
    on every rank (full tensors on rank 0: FSDP gathers them); load_state(step_dir, optimizer state dict)
    restores the model weights and the optimizers."""

    def __init__(self, cfg: RunConfig, model, optimizers, rank: int, world_size: int, barrier: Callable[[], None],
                 state_dicts: Callable[[], tuple[dict, dict]], load_state: Callable[[str, dict], None],
                 data: "DataSnapshot | None" = None):
        self.cfg, self.model, self.optimizers = cfg, model, optimizers
        self.data = data or DataSnapshot.take(cfg.data.path)
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.state_dicts, self.load_state = state_dicts, load_state
        self.ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.accumulate * world_size

    def remove_leftovers(self) -> None:
        """Delete what a killed save left (rank 0, before any rank writes): `step-N.tmp` dirs and the hidden
        temporary / renamed-away siblings of model/atomic.py."""
        if self.rank != 0 or not os.path.isdir(self.ckpt_dir):
            return
        for name in os.listdir(self.ckpt_dir):
            if TMP_RE.match(name):
                shutil.rmtree(os.path.join(self.ckpt_dir, name), ignore_errors=True)
        remove_leftovers(self.ckpt_dir)

    # ---- save ---------------------------------------------------------------------------------
    def save(self, step: int, val: dict | None = None) -> str:
        """Write checkpoint `step` (all ranks), publish it, prune old ones; returns its path. A full disk,
        a file-size limit or an unwritable path is a StorageError naming the checkpoint, the OS reason and
        the checkpoint a re-run resumes from (the partial step dir is deleted: it frees the space)."""
        final = os.path.join(self.ckpt_dir, step_dir_name(step))
        tmp = final + ".tmp"
        try:
            return self._save(step, val, final, tmp)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            os_error = os_error_of(e)
            if os_error is None:
                raise
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            last = newest_intact(self.cfg.run_dir)[0]
            then = f"a re-run resumes from {last}" if last else "no checkpoint yet: a re-run starts afresh"
            raise StorageError(describe_os_error(os_error, f"checkpoint {final}", then)) from None

    def _save(self, step: int, val: dict | None, final: str, tmp: str) -> str:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.barrier()
        model_sd, optim_sd = self.state_dicts()
        # every rank: its own files, and the bank's shards of the subtrees it owns (collective)
        atomic_write_json(os.path.join(tmp, f"data_state_rank{self.rank}.json"), {
            "rank": self.rank, "world_size": self.world_size, "step": step,
            "batches": step * self.cfg.optim.accumulate})
        _torch_save(rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        if self.model.has_memory:
            self.model.bank.save_checkpoint(self.model.bank.checkpoint_dir(tmp))
        if self.rank == 0:
            save_weights(model_sd, os.path.join(tmp, "model.safetensors"))
            _torch_save({"step": step, **optim_sd}, os.path.join(tmp, "optimizer.pt"))
            save_config(self.cfg, os.path.join(tmp, "config.yaml"))
            self.data.write_tokenizer(os.path.join(tmp, "tokenizer"))
            if self.model.has_memory and self.model.router is not None:
                self.model.router.save(tmp)
            atomic_write_json(os.path.join(tmp, "meta.json"), self._meta(step, val or {}))
        self.barrier()  # every rank's files are in
        if self.rank == 0:
            write_marker(tmp, KIND, {"step": step}, checksums=True)
            foreign = foreign_entries(final) if os.path.isdir(final) else []
            if foreign:  # a resumed run rewriting a later step
                shutil.rmtree(tmp, ignore_errors=True)
                raise OutputExistsError(f"{final}: holds {', '.join(foreign)}, which memlm did not "
                                        "write there; this run would replace it: move it out and resume")
            publish_dir(tmp, final)
            # before pruning: a kill in between resumes from the previous step, which pruning may remove
            rec = read_trajectory(self.cfg.run_dir) or {"steps": [], "from": None}
            write_trajectory(self.cfg.run_dir, rec["steps"] + [step], rec.get("from"))
            self.prune(step)
        self.barrier()
        return final

    def prune(self, step: int) -> None:
        """Keep the newest checkpoint.keep_last_k complete checkpoints of this attempt up to `step` (0 keeps
        all); an abandoned attempt's are neither counted nor deleted."""
        k = self.cfg.checkpoint.keep_last_k
        rec = read_trajectory(os.path.dirname(self.ckpt_dir))  # None: no record, every step dir counts
        intact = [p for s, p in step_dirs(self.ckpt_dir)
                  if s <= step and (rec is None or s in rec["steps"]) and check_step_dir(p, deep=False) is None]
        for old in intact[:-k] if k > 0 else []:
            foreign = foreign_entries(old)
            if foreign:  # a file someone put in it: keep the whole checkpoint, say so
                print(f"checkpoint: keeping {old} (it holds {', '.join(foreign)}, which memlm did "
                      "not write); delete it yourself", file=sys.stderr)
                continue
            remove_dir(old, KIND)

    def _meta(self, step: int, val: dict) -> dict:
        import lightning

        try:
            from importlib.metadata import version

            memlm_version = version("memlm")
        except Exception:  # noqa: BLE001  (not installed: running from a checkout)
            memlm_version = None
        return {"step": step, "data_fingerprint": self.data.fingerprint,
                "tokens_seen": step * self.tokens_per_step, "val_loss": val.get("val_loss"),
                "val_bpb": val.get("val_bpb"), "world_size": self.world_size, "time": time.time(),
                "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "memlm": memlm_version}}

    # ---- load ---------------------------------------------------------------------------------
    def load(self, step_dir: str) -> tuple[int, int]:
        """Restore every component from `step_dir` (all ranks); returns (step, micro-batches this rank
        consumed). Call it last before training: it also restores this rank's RNG."""
        check_resume(read_run_config(step_dir), self.cfg, step_dir, self.world_size)
        sd = read_file(os.path.join(step_dir, "optimizer.pt"),
                       lambda p: torch.load(p, map_location="cpu", weights_only=True))
        self.load_state(step_dir, sd)
        if self.model.has_memory and self.model.bank.has_checkpoint(step_dir):
            self.model.bank.load_checkpoint(self.model.bank.checkpoint_dir(step_dir))
        step = int(sd["step"])
        batches = step * self.cfg.optim.accumulate
        path = os.path.join(step_dir, f"data_state_rank{self.rank}.json")
        if os.path.isfile(path):
            batches = read_file(path, lambda p: int(_json(p)["batches"]))
        rng = os.path.join(step_dir, f"rng_rank{self.rank}.pt")
        if os.path.isfile(rng):  # another world size: rank r may have none (nothing random to replay then)
            read_file(rng, lambda p: set_rng_state(torch.load(p, weights_only=True)))
        return step, batches


# ---------------------------------------------------------------------------------------------
# inference

class LoadedRun(NamedTuple):
    model: Any           # model.interface.LanguageModel (Anchor or MemoryLM), eval mode
    tokenizer: Any       # the run's tokenizer (None if the checkpoint has none)
    config: RunConfig
    router: Any          # memory runs: memory.router.Router (also model.router); else None


def load_run(path: str, device: str | torch.device = "cpu") -> LoadedRun:
    """The model of a run dir (its newest checkpoint) or a step dir, ready for inference on `device`.
    CheckpointError naming the file when the checkpoint is damaged or incomplete."""
    from model.model import Anchor

    step_dir = find_step_dir(path)
    cfg = read_run_config(step_dir)
    anchor = Anchor(cfg.model)
    router = None
    if cfg.memory is None:
        model = anchor
    else:
        from memory.model import MemoryLM
        from memory.storage import make_bank
        from memory.router import Router

        model = MemoryLM(anchor, cfg.memory, bank=make_bank(cfg.memory, anchor.config, None))
        if not Router.exists(step_dir):
            raise CheckpointError(f"{step_dir}: memory checkpoint without its router (router.json + "
                                  "router.safetensors); copy DATA/router.* of the data it was trained on here")
        router = Router.load(step_dir)
        router.check_bank(cfg.memory)
        model.router = router
    load_weights(model, os.path.join(step_dir, "model.safetensors"))
    if model.has_memory and model.bank.has_checkpoint(step_dir):
        model.bank.load_checkpoint(model.bank.checkpoint_dir(step_dir))
    tokenizer = None
    if os.path.isdir(os.path.join(step_dir, "tokenizer")):
        from data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(os.path.join(step_dir, "tokenizer"))
    return LoadedRun(model.to(device).eval(), tokenizer, cfg, router)


__all__ = ["Checkpointer", "LoadedRun", "load_run", "find_step_dir", "newest_intact", "read_run_config",
           "read_weights", "save_weights", "check_resume", "step_dir_name"]

"""Run checkpoints on disk, and loading a run for inference.

    runs/<name>/checkpoints/step-0000020/
        model.safetensors       weights (tied tensors stored once; metadata "tied" names the aliases)
        optimizer.pt            Lightning's checkpoint without the weights: optimizer, LR scheduler, loop state
        data_state_rank{r}.json per-rank data position (batches consumed) + the dataset's own state
        rng_rank{r}.pt          torch / numpy / python RNG states of rank r
        config.yaml meta.json tokenizer/   (+ router.*, bank/ written by the memory code)

A step dir is written as `step-XXXXXXX.tmp` and renamed when complete, so a crash mid-write leaves
the previous checkpoint as the newest complete one. This module does not import Lightning.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete step dirs (no .tmp), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    ckpts = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    return ckpts[-1] if ckpts else None


def find_step_dir(path: str) -> str:
    """A step dir from a step dir, a run dir (newest checkpoint) or a run's checkpoints/ dir."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    for ckpt_dir in (os.path.join(path, "checkpoints"), path):
        ckpts = list_checkpoints(ckpt_dir)
        if ckpts:
            return ckpts[-1]
    raise FileNotFoundError(f"{path}: no complete checkpoint (step-XXXXXXX/ with meta.json) found")


def read_run_config(step_dir: str):
    from train.config import load_config

    path = os.path.join(step_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{step_dir}: config.yaml missing")
    return load_config(path)


# ---------------------------------------------------------------------------------------------
# weights

def save_weights(state_dict: dict, path: str) -> None:
    """safetensors refuses shared tensors: store each storage once, record aliases in metadata."""
    tensors, tied, seen = {}, {}, {}
    for k, v in state_dict.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.untyped_storage().nbytes()) if v.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().to("cpu").contiguous()
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", "tied": json.dumps(tied)})
    os.replace(tmp, path)


def read_weights(path: str) -> dict:
    out = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k)
    for alias, src in json.loads(meta.get("tied", "{}")).items():
        out[alias] = out[src]
    return out


def load_weights(module: torch.nn.Module, path: str, strict: bool = True) -> None:
    sd = read_weights(path)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---------------------------------------------------------------------------------------------
# RNG and data state

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def read_data_state(step_dir: str, rank: int) -> dict | None:
    path = os.path.join(step_dir, f"data_state_rank{rank}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def prune(ckpt_dir: str, keep_last_k: int) -> None:
    """Delete all but the newest keep_last_k complete checkpoints (0 keeps all)."""
    if keep_last_k <= 0:
        return
    for old in list_checkpoints(ckpt_dir)[:-keep_last_k]:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer(src_data_dir: str | None, dst: str) -> None:
    if not src_data_dir:
        return
    src = os.path.join(src_data_dir, "tokenizer")
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------
# inference

def load_run(path: str, device: str | torch.device = "cpu"):
    """(model, tokenizer, config, router|None) from a run dir or a step dir. The model is an Anchor, or
    the memory model when the run trained memory; eval mode, on `device`."""
    from train.build import build_memory_model
    from model.model import Anchor

    step_dir = find_step_dir(path)
    cfg = read_run_config(step_dir)
    anchor = Anchor(cfg.model)
    router = None
    if cfg.memory is None:
        load_weights(anchor, os.path.join(step_dir, "model.safetensors"))
        model = anchor
    else:  # memory runs: the memory code restores its bank / router (hook)
        model = build_memory_model(anchor, cfg)
        if hasattr(model, "load_checkpoint_files"):
            model.load_checkpoint_files(step_dir)
        else:
            load_weights(model, os.path.join(step_dir, "model.safetensors"))
        bank = getattr(model, "bank", None)
        if hasattr(bank, "load_checkpoint") and os.path.isfile(os.path.join(step_dir, "bank", "index.json")):
            bank.load_checkpoint(os.path.join(step_dir, "bank"))  # offloaded bank rows (memory/offload.py)
        # issue 5: a memory checkpoint must carry its router (routes prompts at inference); check it fits the bank
        from memory.router import Router

        if not Router.exists(step_dir):
            raise FileNotFoundError(f"{step_dir}: memory checkpoint without its router (router.json + "
                                    "router.safetensors); copy DATA/router.* of the data it was trained on here")
        router = Router.load(step_dir)
        router.check_bank(cfg.memory)
        model.router = router
    tokenizer = None
    tok_dir = os.path.join(step_dir, "tokenizer")
    if os.path.isdir(tok_dir):
        from data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    return model.to(device).eval(), tokenizer, cfg, router

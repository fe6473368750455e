"""Model construction and optimizer parameter groups, shared by training and inference commands.

No Lightning here (inference commands import this). The memory helper extends `build_model` /
`param_groups` for `cfg.memory` (MemoryLM around the anchor, its own LR/WD group).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.model import Anchor


def is_hf_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        return json.load(f).get("model_type") is not None


def resolve_init_from(cfg) -> tuple[ModelConfig, str]:
    """The model config an `init_from` source dictates, and its kind ("hf" or "anchor")."""
    src = cfg.init_from
    if not os.path.exists(src):
        raise SystemExit(f"memlm pretrain: init_from {src}: no such file or directory")
    if is_hf_dir(src):
        from transformers import AutoConfig

        from model.hf import config_from_llama

        mc = config_from_llama(AutoConfig.from_pretrained(src), os.path.basename(os.path.normpath(src)))
        return mc, "hf"
    from train.checkpoint import find_step_dir, read_run_config

    step_dir = find_step_dir(src)
    return read_run_config(step_dir).model, "anchor"


def build_model(cfg) -> nn.Module:
    """The nn.Module trained by `cfg`: an Anchor (from scratch or `init_from`), or, with `cfg.memory`,
    the memory model wrapping it (hook for the memory helper)."""
    torch.manual_seed(cfg.seed)  # identical init on every rank and every relaunch
    kind, init_sd = None, {}
    if cfg.init_from:
        _, kind = resolve_init_from(cfg)
        if kind == "hf":
            from model.hf import import_llama

            anchor, _ = import_llama(cfg.init_from)
        else:
            anchor = Anchor(cfg.model)
            init_sd = _init_weights(cfg, anchor)  # memory runs as source: anchor part now, bank below (issue 5)
    else:
        anchor = Anchor(cfg.model)
    if cfg.memory is not None:
        # live files of an offloaded mmap bank (issue "scale"): the run's scratch dir, per rank
        live = getattr(cfg.memory, "bank_dir", None) or os.path.join(cfg.run_dir, "bank_live")
        model = build_memory_model(anchor, cfg, live_dir=live)
        if cfg.init_from and kind == "anchor" and init_sd.get("bank"):
            _load_init_bank(cfg, model, init_sd["bank"])
        if getattr(cfg.memory, "freeze_anchor", False):  # phase 2: only the memories train
            model.freeze_anchor(True)
        return model
    return anchor


def _init_weights(cfg, anchor: Anchor) -> dict:
    """Load init_from's anchor weights into `anchor` (issue 5). The source may be an anchor run or a memory
    run (phase 3, co-training after phase 2): its state then has 'anchor.*' and 'bank.*' keys. Returns
    {"bank": bank state dict or {}}."""
    from train.checkpoint import find_step_dir, read_weights

    path = os.path.join(find_step_dir(cfg.init_from), "model.safetensors")
    sd = read_weights(path)
    bank = {}
    if any(k.startswith("anchor.") for k in sd):
        bank = {k[len("bank."):]: v for k, v in sd.items() if k.startswith("bank.")}
        sd = {k[len("anchor."):]: v for k, v in sd.items() if k.startswith("anchor.")}
    missing, unexpected = anchor.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SystemExit(f"memlm pretrain: init_from {path}: weights do not match the model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return {"bank": bank}


def _load_init_bank(cfg, model, bank_sd: dict) -> None:
    """Bank weights of an init_from memory run; its memory shape must match this run's memory config."""
    bank = model.bank
    if not hasattr(bank, "load_state_dict") or getattr(cfg.memory, "storage", "resident") != "resident":
        raise SystemExit(f"memlm pretrain: init_from {cfg.init_from}: continuing a memory run into an "
                         "offloaded bank is not supported; use memory.storage=resident")
    want = {k: tuple(v.shape) for k, v in bank.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in bank_sd.items()}
    if want != have:
        raise SystemExit(f"memlm pretrain: init_from {cfg.init_from}: its memory bank {have} does not match "
                         f"this run's memory config (k={cfg.memory.k}, widths={list(cfg.memory.widths)}, "
                         f"layers={cfg.memory.layers}): {want}")
    bank.load_state_dict(bank_sd)


def build_memory_model(anchor: Anchor, cfg, live_dir: str | None = None) -> nn.Module:
    """Hook: wrap the anchor with its memory (memory helper). The bank follows cfg.memory.storage
    (resident / host / mmap, memory.storage.make_bank); live_dir: where an mmap bank keeps its live rows
    (None: a private temp dir, as for inference)."""
    from memory.model import MemoryLM
    from memory.storage import make_bank

    return MemoryLM(anchor, cfg.memory, bank=make_bank(cfg.memory, anchor.config, live_dir))


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """AdamW groups, nanoGPT rule: 2D+ weights decay, 1D tensors (norms) don't. The tied embedding
    is a 2D weight and decays like in nanoGPT. Parameters with requires_grad=False are left out.
    A group may carry its own "min_lr" (the cosine floor); the scheduler honours it per group."""
    if cfg.memory is not None:
        return memory_param_groups(model, cfg)
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # dedups tied weights
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def model_config_for_data(cfg, vocab_size: int):
    """Fit model.vocab_size to the data's tokenizer: the model must cover every token id."""
    if cfg.init_from:
        mc, _ = resolve_init_from(cfg)
        if mc.vocab_size < vocab_size:
            raise SystemExit(f"memlm pretrain: init_from {cfg.init_from}: vocab_size {mc.vocab_size} is smaller "
                             f"than the data tokenizer's {vocab_size}")
        return dataclasses.replace(cfg, model=mc)
    if cfg.model.vocab_size != vocab_size:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    return cfg


def memory_param_groups(model: nn.Module, cfg) -> list[dict]:
    """Hook (memory helper): anchor groups + memory groups with their own lr / weight_decay / min_lr."""
    return model.param_groups(anchor_lr=cfg.optim.lr, anchor_wd=cfg.optim.weight_decay,
                              memory_lr=cfg.memory.lr)

"""What a training run is built from: its data, the model (fresh or `init_from`), the optimizers and
their schedule, and the data loaders. No Lightning here (inference and evaluation import it too).

    data = open_training_data(cfg)
    cfg, init, router = resolve_run(cfg, data)        # vocab, by_leaf, init_from and memory checks
    model = build_model(cfg, init)                    # a model.interface.LanguageModel
    opt = Optimizers(model, cfg, world_size)          # dense AdamW + schedule (+ sparse bank AdamW)
    loader = make_loader(cfg, "train", rank, world_size, start_batch=0)

Every inconsistency between the config, the data and an init_from source is a ConfigError / DataError
that names both sides, raised before any training starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from memory.config import MemoryConfig
from model.config import ModelConfig, matching_preset
from model.errors import CheckpointError, ConfigError, DataError, MemlmError
from model.interface import LanguageModel
from model.model import Anchor
from model.weights import read_weights
from train.config import RunConfig


# ---------------------------------------------------------------------------------------------
# data

def open_training_data(cfg: RunConfig):
    """The data dir of `data.path` (data.shards.DataDir); errors name the key and the directory."""
    from data.shards import open_data

    if not cfg.data.path:
        raise ConfigError("data.path is not set: give a data directory written by `memlm prepare` (data.path=DIR)")
    try:
        return open_data(cfg.data.path)
    except MemlmError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.path={cfg.data.path}: {e}") from None


def check_cluster_paths(data, mem_cfg: MemoryConfig) -> int:
    """The data's number of cluster levels; DataError when the shards lack cluster paths or their depth
    differs from the bank's (memory.widths)."""
    widths = tuple(mem_cfg.widths)
    cluster_cmd = f"memlm cluster {data.path} --levels {len(widths)} --k {mem_cfg.k}"
    missing = [f"{split}/{sh.name}" for split in ("train", "val") if split in data.manifest["splits"]
               for sh in data.shards(split) if not sh.has_array("paths")]
    n_levels = data.n_levels or 0
    if not n_levels or missing:
        what = f"shards {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} have" if missing else \
            "the manifest has"
        raise DataError(f"{data.path}: memory is on but {what} no cluster paths (*.paths.npy / n_levels); "
                        f"run `{cluster_cmd}` first")
    if n_levels != len(widths):
        raise DataError(f"{data.manifest_path}: the data is clustered into n_levels={n_levels} but "
                        f"memory.widths={list(widths)} has {len(widths)} levels; give memory.widths {n_levels} "
                        f"entries, or re-cluster with `{cluster_cmd} --refit`")
    return n_levels


def load_data_router(data, mem_cfg: MemoryConfig):
    """The data's router (DATA/router.*), checked against the bank's depth and branching."""
    from memory.router import Router

    where = os.path.join(data.path, "router.json")
    if not Router.exists(data.path):
        raise DataError(f"{where}: not found; memory runs need the data's router (it is copied into every "
                        f"checkpoint): run `memlm cluster {data.path}`")
    router = Router.load(data.path)
    if router.k != mem_cfg.k:  # the bank's branching must be the data's: say which key and value fit
        raise ConfigError(f"memory.k={mem_cfg.k} but the data's clusters ({where}) have k={router.k}: set "
                          f"memory.k={router.k}, or re-cluster the data with k={mem_cfg.k} "
                          f"(`memlm cluster {data.path} --k {mem_cfg.k} --refit`)")
    try:
        router.check_bank(mem_cfg)
    except ValueError as e:
        raise ConfigError(f"{where} vs the memory config: {e}") from None
    return router


# ---------------------------------------------------------------------------------------------
# the run's model config: from the data's vocabulary, or from init_from

@dataclass
class InitSource:
    """Where `init_from` points: kind "hf" (a transformers Llama directory) or "run" (a memlm step dir)."""
    kind: str
    path: str
    model: ModelConfig
    tokenizer_dir: str | None
    step_dir: str | None = None
    grown: str | None = None
    """resolve_run: set (one log line) when the data's tokenizer extends the source's and the run's model
    grows the source's embedding and output rows to the data's vocabulary."""


def is_hf_dir(path: str) -> bool:
    """True for a transformers model directory (config.json with a model_type); ConfigError naming the file
    when config.json is there but unreadable."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"init_from={path}: {cfg} is not valid JSON ({e}); give a transformers model "
                          "directory or a memlm run") from None
    return isinstance(obj, dict) and obj.get("model_type") is not None


def resolve_init_from(path: str) -> InitSource:
    """The model an `init_from` path holds; CheckpointError/ConfigError naming the path otherwise."""
    if not os.path.exists(path):
        raise ConfigError(f"init_from={path}: no such file or directory")
    if is_hf_dir(path):
        from transformers import AutoConfig

        from model.hf import config_from_llama

        try:
            mc = config_from_llama(AutoConfig.from_pretrained(path, local_files_only=True),
                                   os.path.basename(os.path.normpath(path)))
        except (OSError, ValueError, KeyError) as e:  # unreadable config.json, or not a Llama model
            raise ConfigError(f"init_from={path}: not a transformers Llama model memlm can start from "
                              f"({' '.join(str(e).split())[:200]})") from None
        has_tok = any(os.path.exists(os.path.join(path, f))
                      for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return InitSource("hf", path, mc, path if has_tok else None)
    from train.checkpoint import find_step_dir, read_run_config

    step_dir = find_step_dir(path)
    tok = os.path.join(step_dir, "tokenizer")
    return InitSource("run", path, read_run_config(step_dir).model, tok if os.path.isdir(tok) else None, step_dir)


def _check_init_model(cfg: RunConfig, src: InitSource) -> None:
    """The config's model section must describe the source's model (its preset or the same fields)."""
    diff = cfg.model.differences(src.model)
    if diff:
        pairs = "; ".join(f"model.{k}={a} here, {b} in the source" for k, a, b in diff[:4])
        match = matching_preset(src.model)  # suggest only a preset that exists and describes the source
        preset = f"set model.preset={match}, or " if match is not None and match != cfg.model.name else ""
        raise ConfigError(f"init_from={src.path}: the model section differs from the model it starts from "
                          f"({pairs}); {preset}give the source's values "
                          f"({' '.join(f'model.{k}={b}' for k, _, b in diff)}) or drop the model.* keys that differ")


def _check_init_tokenizer(data, src: InitSource, vocab: int) -> str | None:
    """Every token of the source's vocabulary must have the same id in the data's tokenizer. When the data's
    vocabulary is larger than the source model's (`vocab` > V, e.g. `memlm prepare --tokenizer` added
    <pad> and <CALL>), the data's tokenizer must also EXTEND the source's: ids 0..V-1 are the source's tokens
    and only ids >= V are new. Returns the log line of that growth, or None; ConfigError naming both sides
    otherwise."""
    have = src.model.vocab_size
    if src.tokenizer_dir is None:
        if vocab > have:
            raise ConfigError(f"init_from={src.path}: its vocab_size {have} is smaller than the data tokenizer's "
                              f"{vocab} ({data.tokenizer_dir}), and it has no tokenizer to check that the data's "
                              "tokenizer extends it; give a source with its tokenizer files")
        return None
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(src.tokenizer_dir).get_vocab()
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the path is what the user needs
        raise ConfigError(f"init_from={src.path}: cannot load its tokenizer ({src.tokenizer_dir}): "
                          f"{' '.join(str(e).split())[:200]}") from None
    ours = data.tokenizer().get_vocab()
    bad = sorted((i, t) for t, i in theirs.items() if ours.get(t) != i)
    if vocab > have:  # growing: no data token may sit on one of the source's rows unless it is the source's
        bad += sorted((i, t) for t, i in ours.items() if i < have and theirs.get(t) != i)
    if bad:
        i, t = min(bad)
        theirs_at = {v: k for k, v in theirs.items()}.get(i)
        ours_at = {v: k for k, v in ours.items()}.get(i)
        raise ConfigError(f"init_from={src.path}: its tokenizer ({src.tokenizer_dir}) differs from the data's "
                          f"({data.tokenizer_dir}): {len({t for _, t in bad})} tokens have another id (e.g. id {i} is "
                          f"{theirs_at!r} in the source, {ours_at!r} in the data); prepare the data with the "
                          "source's tokenizer (memlm prepare --tokenizer DIR)")
    if vocab <= have:
        return None
    new = [t for t, i in sorted(ours.items(), key=lambda kv: kv[1]) if i >= have]
    shown = ", ".join(new[:4]) + (f", ... ({len(new)} tokens)" if len(new) > 4 else "")
    return (f"init_from={src.path}: the data's tokenizer extends the source's by {vocab - have} token(s) "
            f"({shown}): embedding{'' if src.model.tie_embeddings else ' and output'} rows grow from "
            f"{have} to {vocab}, the new rows set to the mean of the source's rows (transformers' "
            "resize_token_embeddings)")


def resolve_run(cfg: RunConfig, data) -> tuple[RunConfig, InitSource | None, object]:
    """(cfg with model.vocab_size and data.by_leaf resolved, the init_from source or None, the data's router
    for memory runs or None). The model covers the data's vocabulary; memory runs need cluster paths of
    the bank's depth and the data's router."""
    vocab = int(data.vocab_size)
    init = None
    if cfg.init_from:
        init = resolve_init_from(cfg.init_from)
        _check_init_model(cfg, init)
        init.grown = _check_init_tokenizer(data, init, vocab)
        model = init.model.replace(vocab_size=vocab) if init.grown else init.model
        cfg = dataclasses.replace(cfg, model=model)
    elif cfg.model.vocab_size != vocab:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if cfg.data.by_leaf is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, by_leaf=cfg.memory is not None))
    router = None
    if cfg.memory is not None:
        try:
            cfg.memory.validate(cfg.model)
        except ValueError as e:
            raise ConfigError(f"memory config vs model: {e}") from None
        check_cluster_paths(data, cfg.memory)
        router = load_data_router(data, cfg.memory)
        _check_init_router(init, router, data)
        if cfg.memory.bank_dir:
            check_bank_dir(cfg.memory.bank_dir)
    check_size(cfg)
    return cfg, init, router


_BANK_FILE = re.compile(r"^level\d+\.rank\d+-of-\d+\.safetensors$")  # memory/row_store.py's live files


def check_bank_dir(path: str) -> None:
    """ConfigError naming memory.bank_dir unless it is new, empty, or holds only an mmap bank's live files
    (which a run rewrites): never a file, the working/home/root directory or a parent, a memlm output (a
    data dir, a checkpoint) or a folder of other files."""
    from model.atomic import protected_reason, read_marker

    key = f"memory.bank_dir={path}"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: is a file; give a directory for the live bank files")
    why = protected_reason(path)
    if why:
        raise ConfigError(f"{key}: {why}; give a new directory")
    p = os.path.realpath(path)
    while p != os.path.dirname(p):  # the directory and every parent: not inside a data dir or checkpoints
        kind = (read_marker(p) or {}).get("kind") if os.path.isdir(p) else None
        if kind in ("data", "data-partial", "checkpoint") or os.path.basename(p) == "checkpoints" or \
                os.path.isfile(os.path.join(p, "manifest.json")):
            raise ConfigError(f"{key}: lies in {p}, a memlm data or checkpoint directory; give a new directory "
                              "for the live bank files")
        p = os.path.dirname(p)
    other = [n for n in (os.listdir(path) if os.path.isdir(path) else []) if not _BANK_FILE.match(n)]
    if other:
        raise ConfigError(f"{key}: holds {', '.join(sorted(other)[:3])}, which are not live bank files (a run "
                          "rewrites that directory); give a new or empty directory")


def check_same_router(router, data_dir: str, run: str, flag: str = "--data") -> None:
    """DataError when the data dir was clustered by another tree than a memory run's router (the copy in
    its checkpoint): the data's stored paths would send rows to memories trained on other clusters."""
    from memory.router import Router

    if router is not None and not Router.exists(data_dir):
        raise DataError(f"{flag} {data_dir}: not clustered (no router.json), so its windows have no cluster paths; "
                        f"use the data the run was trained with ({run} was trained on data clustered by memlm "
                        "cluster)")
    if router is not None and not router.same_tree(Router.load(data_dir)):
        raise DataError(f"{flag} {data_dir}: clustered by another router than the run's ({run}/router.json): its "
                        "paths address other memories (or the run's router file is damaged); use the data the run "
                        "was trained with (clustered by the same memlm cluster command and seed)")


def check_same_tokenizer(tokenizer, data, who: str, flag: str = "--data") -> None:
    """DataError when the data dir (opened, `data.shards.open_data`) was prepared with another tokenizer
    than the model `who` (e.g. "the run runs/x", "--slm lacy=runs/x"), compared by the tokenizer hash its
    manifest records: its token ids would be read as other text. A model without a tokenizer (None) is not
    checked."""
    from data.tokenizer import tokenizer_hash

    if tokenizer is not None and tokenizer_hash(tokenizer) != data.manifest["tokenizer_hash"]:
        raise DataError(f"{flag} {data.path}: prepared with another tokenizer than {who} (the hash its manifest "
                        "records differs), so its token ids mean other text to the model; use the data the model "
                        "was trained with, or data prepared with the same tokenizer")


def check_run_tokenizer(run: str, data, who: str, flag: str = "--data") -> None:
    """check_same_tokenizer for a memlm run given by its path, before the model loads (only its checkpoint's
    tokenizer/ is read; a run without one is left to the loader, which names it)."""
    from data.tokenizer import load_tokenizer
    from train.checkpoint import find_step_dir

    tok_dir = os.path.join(find_step_dir(run), "tokenizer")
    if os.path.isdir(tok_dir):
        check_same_tokenizer(load_tokenizer(tok_dir), data, who, flag)


def _check_init_router(init: InitSource | None, router, data) -> None:
    """DataError when init_from is a memory run whose router is not the data's: its memories were trained
    on other clusters, and the data's paths would fetch the wrong ones."""
    from memory.router import Router

    if init is None or init.kind != "run" or not Router.exists(init.step_dir):
        return
    if not router.same_tree(Router.load(init.step_dir)):
        raise DataError(f"init_from={init.path}: its memories were trained with another clustering than "
                        f"{data.path}'s router (re-clustered with another seed or --paths-from?); train on the data "
                        "it was trained with, or start the memories afresh from an anchor run")


# ---------------------------------------------------------------------------------------------
# will it fit: a closed-form size check before anything is allocated

GIB = 2**30


def machine_memory() -> tuple[int, int | None]:
    """(physical RAM in bytes, the CUDA device's total memory in bytes or None without CUDA)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if torch.cuda.is_available() else None
    return ram, gpu


def size_estimate(cfg: RunConfig) -> dict:
    """What the run needs at least (activations not counted): {"params", "device", "host", "build",
    "keys"}. device: bytes on the training device; trained parameters cost 16 (fp32 weights, gradients,
    two AdamW moments; mixed precision keeps fp32 masters), frozen ones 4. host: an offloaded bank's weights
    and moments (12 bytes a parameter) in host memory ("host"; "mmap" keeps them in files, not counted).
    build: host bytes while the model is built in fp32 before it moves to a GPU. keys: the config keys of
    the largest part of the model."""
    m, mem = cfg.model, cfg.memory
    counts = m.param_counts()
    anchor = sum(counts.values())
    rope = 2 * m.max_seq_len * m.head_dim * 4  # the RoPE cos/sin buffers
    bank = generic = 0
    if mem is not None:
        from memory.config import bank_params, generic_params

        bank, generic = bank_params(mem, m), generic_params(mem, m)
    dense = anchor + generic + (bank if mem is not None and mem.storage == "resident" else 0)
    frozen = anchor if mem is not None and mem.freeze_anchor else 0
    device = 16 * dense - 12 * frozen + rope
    if cfg.trainer.strategy == "fsdp":  # FSDP shards weights, gradients and optimizer state over the ranks
        device //= int(os.environ.get("WORLD_SIZE", "1"))
    host = 12 * bank if mem is not None and mem.storage == "host" else 0
    parts = {"model.vocab_size model.n_embd": counts["embedding"],
             "model.n_layer model.n_embd model.n_head model.head_dim model.n_kv_head": counts["attention"],
             "model.n_layer model.n_embd model.ffn_hidden": counts["ffn"],
             "model.max_seq_len model.head_dim": m.max_seq_len * m.head_dim,
             "memory.k memory.widths memory.layers": bank}
    return {"params": anchor + generic + bank, "device": device, "host": host, "build": 4 * dense + rope + host,
            "keys": max(parts, key=parts.get).split()}


def check_size(cfg: RunConfig, memory: tuple[int, int | None] | None = None) -> None:
    """ConfigError naming the model's size keys when the run cannot fit in this machine's memory (RAM, or
    the GPU's memory when training on CUDA), before anything is allocated: a typo such as
    model.n_embd=1048576 would otherwise hang allocating or end in a RuntimeError. memory: (RAM, GPU) bytes,
    default machine_memory()."""
    ram, gpu = machine_memory() if memory is None else memory
    need = size_estimate(cfg)
    if gpu is None:
        checks = [(need["device"] + need["host"], ram, "RAM")]
    else:
        checks = [(need["device"], gpu, "GPU memory"), (need["build"], ram, "RAM")]
    for needed, has, what in checks:
        if needed > has:
            values = " ".join(f"{k}={_key_value(cfg, k)}" for k in need["keys"])
            raise ConfigError(f"{values}: the model is too large for this machine: {need['params']:,} parameters "
                              f"need ~{needed / GIB:,.1f} GiB (weights, gradients and AdamW state; activations "
                              f"not counted) but it has {has / GIB:,.1f} GiB of {what}; make these values smaller")


def _key_value(cfg: RunConfig, key: str):
    from train.config import get_key

    value = get_key(cfg, key)
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------
# the model

def build_model(cfg: RunConfig, init: InitSource | None = None, live_dir: str | None = None) -> LanguageModel:
    """The model `cfg` trains: an Anchor, or with `cfg.memory` a MemoryLM around it; weights from `init`
    when given (an anchor run, a memory run: anchor and bank, or a HF Llama). Seeded by cfg.seed, so every
    rank and every relaunch builds the same initial weights. live_dir: where an mmap bank keeps its rows."""
    torch.manual_seed(cfg.seed)
    bank_sd = {}
    if init is not None and init.kind == "hf":
        from model.hf import import_llama

        anchor, _ = import_llama(init.path, load_tokenizer=False)
    elif init is not None:
        anchor = Anchor(init.model)  # the source's shape; grown below when the data's tokenizer extends it
        bank_sd = _load_init_anchor(anchor, os.path.join(init.step_dir, "model.safetensors"))
    else:
        anchor = Anchor(cfg.model)
    if anchor.config.vocab_size < cfg.model.vocab_size:  # resolve_run checked that the tokenizer extends
        anchor.grow_vocab(cfg.model.vocab_size)
    if cfg.memory is None:
        return anchor
    from memory.model import MemoryLM
    from memory.storage import make_bank

    model = MemoryLM(anchor, cfg.memory, bank=make_bank(cfg.memory, anchor.config, live_dir))
    if bank_sd:
        _load_init_bank(cfg, model, bank_sd)
    model.freeze_anchor(cfg.memory.freeze_anchor)  # phase 2 of the paper: only the memories train
    return model


def _load_init_anchor(anchor: Anchor, path: str) -> dict:
    """Load the anchor weights of an init_from checkpoint; a memory run's file also holds 'bank.*' keys,
    returned (prefix removed) for the bank."""
    sd = read_weights(path)
    bank = {}
    if any(k.startswith("anchor.") for k in sd):
        bank = {k[len("bank."):]: v for k, v in sd.items() if k.startswith("bank.")}
        sd = {k[len("anchor."):]: v for k, v in sd.items() if k.startswith("anchor.")}
    missing, unexpected = anchor.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"init_from {path}: weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return bank


def _load_init_bank(cfg: RunConfig, model, bank_sd: dict) -> None:
    """Bank weights of an init_from memory run; its shape must match this run's memory config."""
    if cfg.memory.storage != "resident":
        raise ConfigError(f"init_from={cfg.init_from}: continuing a memory run into an offloaded bank is not "
                          "supported; use memory.storage=resident")
    want = {k: tuple(v.shape) for k, v in model.bank.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in bank_sd.items()}
    if want != have:
        raise ConfigError(f"init_from={cfg.init_from}: its memory bank {have} does not match this run's memory "
                          f"config (k={cfg.memory.k}, widths={list(cfg.memory.widths)}, "
                          f"layers={cfg.memory.layers}): {want}")
    model.bank.load_state_dict(bank_sd)


# ---------------------------------------------------------------------------------------------
# optimizers and schedule

def lr_factor(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Multiplier of `lr` at optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if lr <= 0:
        return 1.0
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GroupSchedule:
    """The LR multiplier of one parameter group (a callable object: LambdaLR saves its fields)."""

    def __init__(self, lr: float, min_lr: float, warmup: int, max_steps: int):
        self.lr, self.min_lr, self.warmup, self.max_steps = lr, min_lr, warmup, max_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.lr, self.min_lr, self.warmup, self.max_steps)


class Optimizers:
    """The dense AdamW (fused) with its per-group schedule, and for a sparse (offloaded) bank the lazy
    AdamW over its fetched rows (memory/sparse_adam.py), stepped together. A group's cosine floor is its
    own "min_lr" (memory) or optim.min_lr scaled to the group's lr."""

    def __init__(self, model: LanguageModel, cfg: RunConfig, world_size: int = 1, wrap=None):
        """wrap: Fabric's setup_optimizers (its step applies the precision plugin, e.g. the 16-bit loss
        scale); None steps the optimizer directly."""
        o = cfg.optim
        groups = model.param_groups(o.lr, o.weight_decay)
        # fused AdamW: CUDA, and CPU too (torch >= 2.4; the per-tensor loop costs ~40% of a tiny step)
        self.dense = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                       fused=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.dense, [
            GroupSchedule(g["lr"], g.get("min_lr", o.min_lr * g["lr"] / o.lr if o.lr else o.min_lr),
                          o.warmup_steps, cfg.trainer.max_steps) for g in self.dense.param_groups])
        self._dense_step = (wrap(self.dense) if wrap is not None else self.dense).step
        self.bank = None
        if model.has_memory and model.bank.sparse:
            from memory.sparse_adam import SparseBankOptimizer

            m = cfg.memory
            # each rank owns its rows: divide by world size as DDP averages the dense gradients
            self.bank = SparseBankOptimizer(model.bank, lr=m.lr, betas=tuple(o.betas), eps=o.eps,
                                            weight_decay=m.weight_decay, grad_divisor=world_size)

    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.dense.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        """The first group's current learning rate (what the progress line shows)."""
        return self.dense.param_groups[0]["lr"]

    def step(self) -> None:
        """Dense step, then the bank rows at the memory group's scheduled lr, then the schedule."""
        self._dense_step()
        if self.bank is not None:
            # looked up each step: load_state_dict replaces the optimizer's group dicts
            memory = [g for g in self.dense.param_groups if g["name"] == "memory"]
            if memory:
                self.bank.param_groups[0]["lr"] = memory[0]["lr"]
            self.bank.step()
        self.schedule.step()
        self.dense.zero_grad(set_to_none=True)

    def state_dict(self, dense: dict | None = None) -> dict:
        """{"dense", "schedule", "bank"}; `dense` replaces the dense optimizer's own (FSDP: a gathered one)."""
        return {"dense": self.dense.state_dict() if dense is None else dense, "schedule": self.schedule.state_dict(),
                "bank": None if self.bank is None else self.bank.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.dense.load_state_dict(sd["dense"])
        self.schedule.load_state_dict(sd["schedule"])
        if self.bank is not None and sd.get("bank") is not None:
            self.bank.load_state_dict(sd["bank"])


# ---------------------------------------------------------------------------------------------
# data loaders

def make_loader(cfg: RunConfig, split: str, rank: int, world_size: int, start_batch: int = 0, bank=None):
    """Train: endless batches of this rank after `start_batch` micro-batches (the resume position).
    Val: one pass from the split's start (the same rows at every validation). With a sparse bank the train
    loader hands the next batch's cluster paths to `bank.prefetch` one batch ahead. Batches are dicts of
    CPU tensors (data/loader.py: input_ids/labels [B, T] int64, doc_lens [B, D], mem_path [B, L])."""
    from torch.utils.data import DataLoader

    from data.loader import PackedDataset

    d, train = cfg.data, split == "train"
    cls = PackedDataset
    if world_size > 1 and cfg.memory is not None and cfg.memory.storage != "resident":
        # offloaded banks are not replicated: each rank gets rows of the subtrees it stores (data/affine.py)
        from data.affine import AffinePackedDataset as cls
    try:
        ds = cls(d.path, split, seq_len=d.seq_len, batch_size=d.batch_size, seed=cfg.seed, rank=rank,
                 world_size=world_size, calls=d.calls, by_leaf=d.by_leaf, shuffle=train, infinite=train)
    except MemlmError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.path={d.path}: {e}") from None
    if start_batch:
        ds.load_state_dict(ds.state_at(start_batch))
    # a private generator: creating a DataLoader iterator must not draw from the global RNG (the
    # generic-block draws use it, and exact resume restores it)
    loader = DataLoader(ds, batch_size=None, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(cfg.seed + rank))
    if train and bank is not None and bank.sparse:
        from memory.prefetch import PrefetchingLoader

        loader = PrefetchingLoader(loader, bank)
    return loader

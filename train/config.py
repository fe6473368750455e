"""Run configuration: typed dataclasses are the source of truth; YAML recipes + dotted overrides on top.

    cfg = load_config("train/recipes/tiny-cpu.yaml", ["optim.lr=3e-4", "trainer.max_steps=20"])

Unknown keys are an error that names the full dotted key (`optim.lrr`); so is every value out of its
range (`data.batch_size=-2`), checked when the config is loaded, before any work starts (`RANGES`). The
`model` section is a `model.config.ModelConfig`: `model.preset=<name>` picks a named preset, other
`model.*` keys override its fields; `memory` likewise (`memory.config.MemoryConfig`, `memory.preset`).
The resolved config (every field, presets expanded) is saved as `runs/<name>/config.yaml` and in every
checkpoint. This module never imports Lightning (inference commands read configs too).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from memory.config import MemoryConfig
from model.atomic import atomic_write
from model.config import FIELD_RANGES as MODEL_RANGES
from model.config import ModelConfig, load_yaml
from model.errors import ConfigError, check_range

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass
class DataConfig:
    """The training data and how it is packed into rows (data/loader.py)."""

    path: Optional[str] = None
    """A data directory written by `memlm prepare` (required to train)."""
    seq_len: int = 256
    """Tokens per packed row."""
    batch_size: int = 8
    """Rows per micro-batch on each rank."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: batches are built in the training process)."""
    calls: Optional[str] = None
    """Per-token selection array (e.g. "calls_lacy" from `memlm select`): those targets become <CALL>."""
    by_leaf: Optional[bool] = None
    """Pack each row from windows of one cluster leaf; null = on exactly when the run has memory."""


@dataclass
class OptimConfig:
    """AdamW and its schedule: linear warmup, then cosine decay to min_lr."""

    lr: float = 3e-4
    """Peak learning rate of the anchor."""
    min_lr: float = 3e-5
    """Floor of the cosine decay (reached at trainer.max_steps)."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay of 2-D weights (norms never decay)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment coefficients, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: never clip; the norm is still measured and logged)."""
    accumulate: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""


@dataclass
class TrainerConfig:
    """Length, precision and parallelism of the run."""

    max_steps: int = 1000
    """Optimizer steps of the whole run (the cosine schedule ends here)."""
    precision: str = "auto"
    """auto (bf16-mixed on GPU, 32-true on CPU) or a Lightning precision: 32-true, bf16-mixed, 16-mixed, ..."""
    strategy: str = "auto"
    """auto (DDP when torchrun starts several processes), ddp or fsdp."""
    compile: bool = False
    """torch.compile the model."""
    val_every: int = 0
    """Optimizer steps between validations (0: never)."""
    val_batches: int = 8
    """Validation micro-batches per rank at each validation (the same rows every time)."""
    log_every: int = 10
    """Optimizer steps between metrics rows and progress lines."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bit-exact runs and resumes (on the same machine kind)."""


@dataclass
class LoggingConfig:
    """Where metrics go besides runs/<name>/metrics.jsonl (always written)."""

    logger: str = "wandb"
    """wandb or none."""
    wandb_mode: str = "offline"
    """offline (sync later), online or disabled."""
    project: str = "memlm"
    """wandb project name."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which one a run resumes from."""

    every: int = 500
    """Optimizer steps between checkpoints (0: only the final one)."""
    keep_last_k: int = 3
    """Keep the newest k checkpoints (0 keeps all)."""
    resume: str = "auto"
    """auto (the newest intact checkpoint of this run, if any), none (refuse if there is one), or a path."""


@dataclass
class RunConfig:
    """Everything one training run needs; saved as runs/<name>/config.yaml."""

    name: str = "run"
    """Run name: the run lives in runs_dir/name."""
    runs_dir: str = "runs"
    """Parent directory of runs."""
    seed: int = 1337
    """Seed of the model init, the data order and the generic-block draws."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The anchor's architecture (model.preset + field overrides); vocab_size follows the data."""
    model_preset: Optional[str] = None
    """The preset the model section started from (informative; saved as model.preset)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Run length, precision, parallelism."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Loggers."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    init_from: Optional[str] = None
    """Start from these weights: a memlm run or step dir (anchor or memory run) or a HF Llama directory;
    the model section must then describe that model."""
    memory: Optional[MemoryConfig] = None
    """Hierarchical memories (memory.preset + overrides); null trains a plain anchor."""

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.name)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "model_preset":
                continue
            if f.name == "model":
                v = {"preset": self.model_preset, **_plain(v.to_dict())}
            elif dataclasses.is_dataclass(v):
                v = _plain(dataclasses.asdict(v))
            out[f.name] = v
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# The sections of a run config, each with an example key for error messages (`optim=3` is a mistake).
SECTIONS: dict[str, tuple[type, str]] = {
    "model": (ModelConfig, "model.n_layer=4"), "data": (DataConfig, "data.seq_len=256"),
    "optim": (OptimConfig, "optim.lr=3e-4"), "trainer": (TrainerConfig, "trainer.max_steps=1000"),
    "logging": (LoggingConfig, "logging.logger=none"), "checkpoint": (CheckpointConfig, "checkpoint.every=500"),
    "memory": (MemoryConfig, "memory.preset=tiny"),
}


# ---------------------------------------------------------------------------------------------
# value checks: every numeric key has a range (tests/test_config.py checks that none is missing)

STEPS = 2**31  # upper bound of step counts: far beyond any run, but a typo such as 1e30 fails at load
# Upper bounds of the benchmark scripts' size flags (scripts/bench_*.py, memlm bench-kernels): far beyond a
# useful benchmark on one machine, so that a typo (--seq 100000000) is a one-line error at once instead of
# allocating until the machine kills the process. TOKENS bounds batch x sequence length of one step.
BENCH_BATCH, BENCH_SEQ, BENCH_TOKENS, BENCH_STEPS, BENCH_THREADS = 4096, 32768, 2**22, 10**6, 1024
# Upper bounds of the model's sizes (a config's sanity limits; ModelConfig itself, e.g. an HF import, has
# none). Sizes below them can still be too large for the machine: train/build.py:check_size says so.
MODEL_LIMITS = {"vocab_size": 2**24, "n_layer": 4096, "n_embd": 2**20, "n_head": 4096, "n_kv_head": 4096,
                "head_dim": 2**20, "ffn_hidden": 2**24, "max_seq_len": 2**20}

RANGES: dict[str, dict] = {
    "seed": dict(min=0, max=2**32 - 1),
    "data.seq_len": dict(min=1, max=2**20), "data.batch_size": dict(min=1, max=2**20),
    "data.num_workers": dict(min=0, max=1024),
    "optim.lr": dict(min=0.0), "optim.min_lr": dict(min=0.0), "optim.warmup_steps": dict(min=0, max=STEPS),
    "optim.weight_decay": dict(min=0.0), "optim.betas": dict(min=0.0, max=1.0, max_open=True),
    "optim.eps": dict(min=0.0, min_open=True), "optim.grad_clip": dict(min=0.0),
    "optim.accumulate": dict(min=1, max=2**20),
    "trainer.max_steps": dict(min=1, max=STEPS), "trainer.val_every": dict(min=0, max=STEPS),
    "trainer.val_batches": dict(min=1, max=STEPS), "trainer.log_every": dict(min=1, max=STEPS),
    "checkpoint.every": dict(min=0, max=STEPS), "checkpoint.keep_last_k": dict(min=0, max=STEPS),
    "memory.k": dict(min=2, max=2**20), "memory.widths": dict(min=0, max=2**24),
    "memory.generic_prob": dict(min=0.0, max=1.0),
    "memory.init_std": dict(min=0.0), "memory.lr": dict(min=0.0), "memory.min_lr": dict(min=0.0),
    "memory.weight_decay": dict(min=0.0), "memory.shard_mb": dict(min=1, max=2**20),
    **{f"model.{k}": dict(v, **({"max": MODEL_LIMITS[k]} if k in MODEL_LIMITS else {}))
       for k, v in MODEL_RANGES.items()},
}
CHOICES: dict[str, tuple] = {
    "trainer.precision": PRECISIONS, "trainer.strategy": ("auto", "ddp", "fsdp"),
    "logging.logger": ("wandb", "none"), "logging.wandb_mode": ("offline", "online", "disabled"),
    "memory.storage": ("resident", "host", "mmap"),
}


def get_key(cfg: RunConfig, key: str):
    """The value of a dotted key, e.g. get_key(cfg, "optim.lr")."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_value(key: str, value) -> None:
    bounds = RANGES[key]
    lower = {k: v for k, v in bounds.items() if k.startswith("min")}
    for v in value if isinstance(value, tuple) else (value,):
        if v is not None:
            check_range(key, v, **lower)  # below the minimum: only it is named (data.batch_size=-2: must be >= 1)
            check_range(key, v, **bounds)


def check(cfg: RunConfig) -> RunConfig:
    """Raise ConfigError naming the dotted key of the first value out of range (RANGES, CHOICES, and
    min_lr <= lr); return cfg."""
    if cfg.name in ("", ".", "..") or "/" in cfg.name or os.sep in cfg.name:
        raise ConfigError(f"name={cfg.name!r}: a run name is one directory name (no '/', not '.' or '..'); the "
                          "run lives in runs_dir/name")
    for key in RANGES:
        if not (key.startswith("memory.") and cfg.memory is None):
            _check_value(key, get_key(cfg, key))
    for key, allowed in CHOICES.items():
        if not (key.startswith("memory.") and cfg.memory is None) and get_key(cfg, key) not in allowed:
            raise ConfigError(f"{key}={get_key(cfg, key)!r}: expected one of {', '.join(allowed)}")
    for section in ("optim", "memory"):
        s = getattr(cfg, section)
        if s is not None and s.min_lr > s.lr:
            raise ConfigError(f"{section}.min_lr={s.min_lr} is above {section}.lr={s.lr}: the cosine decay "
                              f"would rise; give {section}.min_lr <= {section}.lr")
    return cfg


def config_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are valid but most likely not meant (memlm pretrain prints them as warnings)."""
    out = []
    if cfg.optim.warmup_steps > cfg.trainer.max_steps:
        out.append(f"optim.warmup_steps={cfg.optim.warmup_steps} is more than trainer.max_steps="
                   f"{cfg.trainer.max_steps}: the learning rate never reaches optim.lr; lower optim.warmup_steps")
    return out


# ---------------------------------------------------------------------------------------------
# parsing

def _plain(obj):
    """Tuples -> lists so that yaml.safe_dump writes plain YAML."""
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return {k: _plain(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


def parse_value(text: str):
    """A command-line value: int, float (3e-4 too, which YAML 1.1 reads as a string), bool, null, list, str."""
    low = text.strip().lower()
    if low in ("null", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _coerce(value, tp, key: str):
    """Check/convert `value` to annotation `tp`; the error names the key."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return value
        return _coerce(value, inner[0], key)
    if value is None:
        raise ConfigError(f"{key}: null is not allowed here")
    if tp is bool:
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false", "yes", "no")):
            return value if isinstance(value, bool) else value.lower() in ("true", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # "3e-4": YAML 1.1 reads it as a string
            value = parse_value(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if math.isinf(value):
            raise ConfigError(f"{key}={value}: expected a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if args:
            if len(value) != len(args):
                raise ConfigError(f"{key}={list(value)}: expected {len(args)} values")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return tuple(value)
    return value


def known_keys() -> list[str]:
    """Every dotted key a run config accepts (model.preset and memory.preset too)."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS and f.name != "model_preset"]
    for name, (cls, _) in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
        if name in ("model", "memory"):
            keys.append(f"{name}.preset")
    return keys


def _unknown_key(full: str, prefix: str, names) -> ConfigError:
    """The error of an unknown key, with the closest known key when there is one (`optim.max_steps` ->
    trainer.max_steps, `optim.lrr` -> optim.lr, `model_preset` -> model.preset), else its section's keys."""
    keys, leaf = known_keys(), full.split(".")[-1]
    here = sorted(k[len(prefix) + 1:] for k in keys if k.startswith(prefix + ".")) if prefix else sorted(names)
    close = [k for k in keys if k.split(".")[-1] == leaf]  # the same name in another section
    if not close:
        close = [f"{prefix}.{k}" for k in difflib.get_close_matches(leaf, here, n=1)] if prefix else \
            difflib.get_close_matches(full, keys, n=1)
    hint = f"did you mean {' or '.join(close)}?" if close else \
        f"known under {prefix or 'the top level'}: {', '.join(here)}"
    return ConfigError(f"unknown config key {full!r}; {hint}")


def _show(value) -> str:
    """A value as the user typed it (3, true, [1], foo)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _not_a_section(name: str, value) -> ConfigError:
    example = SECTIONS[name][1]
    key = example.split("=")[0]
    off = ", or memory=null for no memory" if name == "memory" else ""
    return ConfigError(f"{name}={_show(value)}: `{name}` is a section (a mapping of keys such as {key}); set its "
                       f"keys, e.g. {example}{off}")


def _fill_dataclass(cls, values: dict, prefix: str, base=None):
    """Build `cls` from a dict, starting from `base` (or defaults); unknown keys -> ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {values!r}")
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    # model_preset is derived from model.preset (saved under that name), never a key of its own
    names = {f.name for f in dataclasses.fields(cls)} - {"model_preset"}
    updates = {}
    for k, v in values.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise _unknown_key(full, prefix, names)
        sub = getattr(obj, k)
        if not prefix and k in SECTIONS and not isinstance(v, dict):
            raise _not_a_section(k, v)
        if dataclasses.is_dataclass(sub) and isinstance(v, dict):
            updates[k] = _fill_dataclass(type(sub), v, full, base=sub)
        else:
            updates[k] = _coerce(v, hints.get(k, Any), full)
            if full in RANGES:  # before the dataclass derives anything from it (e.g. k**level)
                _check_value(full, v if type(v) in (int, float) else updates[k])  # 1e30 as typed
    return dataclasses.replace(obj, **updates)


def _section(cls, section, name: str):
    """A `model` / `memory` section -> (dataclass, preset name): the preset first, then field overrides.
    The dataclass's own checks (e.g. divisibility) become ConfigErrors naming the section."""
    if section is not None and not isinstance(section, dict):
        raise _not_a_section(name, section)
    section = dict(section or {})
    preset = section.pop("preset", None)
    try:
        base = cls.from_name(str(preset)) if preset is not None else cls()
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{name}.preset: {e}") from None
    try:
        return _fill_dataclass(cls, section, name, base=base), preset
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # messages that name their key (memory.layers=...) stand alone
        raise ConfigError(str(e) if str(e).startswith(f"{name}.") else f"{name}: {e}") from None


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        nxt = node[p]
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _expand_dotted(tree: dict) -> dict:
    """A YAML mapping with dotted keys (`optim.lr: 3e-4`, as on the command line) as nested sections;
    a dotted key wins over the same key in a section written out, as a later override would."""
    plain = {k: (_expand_dotted(v) if isinstance(v, dict) else v) for k, v in tree.items()
             if not (isinstance(k, str) and "." in k)}
    dotted: dict = {}
    for k, v in tree.items():
        if isinstance(k, str) and "." in k:
            _set_dotted(dotted, k, v)
    return _merge(plain, dotted)


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), parse_value(value))
    return tree


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(raw: dict) -> RunConfig:
    """A checked RunConfig from a nested dict (a parsed YAML recipe with overrides merged in)."""
    raw = dict(raw or {})
    model_section, memory_section = raw.pop("model", None), raw.pop("memory", None)
    if isinstance(memory_section, str) and memory_section.lower() in ("null", "none"):
        memory_section = None  # memory=none reads as the string "none": no memory, as memory=null
    cfg = _fill_dataclass(RunConfig, raw, "")
    model_cfg, preset = _section(ModelConfig, model_section, "model")
    memory_cfg = None if memory_section is None else _section(MemoryConfig, memory_section, "memory")[0]
    return check(dataclasses.replace(cfg, model=model_cfg, model_preset=preset, memory=memory_cfg))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML recipe (optional) + dotted overrides -> a checked RunConfig; ConfigError names the file and key."""
    raw: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                raw = load_yaml(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as e:  # a directory, no permission, ...
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        try:
            raw = _expand_dotted(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    try:
        return from_dict(_merge(raw, parse_overrides(overrides or [])))
    except ConfigError as e:
        in_file = bool(path)
        if path and overrides:  # name the file only when the file alone is at fault, not a key=value given
            try:
                from_dict(raw)
                in_file = False
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {e}" if in_file else str(e)) from None


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write(path, cfg.to_yaml())

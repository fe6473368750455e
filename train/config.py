"""Run configuration: typed dataclasses are the source of truth; YAML recipes + dotted overrides on top.

    cfg = load_config("train/recipes/tiny-cpu.yaml", ["optim.lr=3e-4", "trainer.max_steps=20"])

Unknown keys are an error that names the full dotted key (`optim.lrr`). The `model` section is a
`model.config.ModelConfig`: `model.preset=<name>` picks a named preset, other `model.*` keys override
its fields. The resolved config (every field, preset expanded) is saved as `runs/<name>/config.yaml`.
This module never imports Lightning (inference commands read configs too).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


@dataclass
class DataConfig:
    path: Optional[str] = None  # a data dir written by `memlm prepare`
    seq_len: int = 256
    batch_size: int = 8  # per rank, per micro-step
    num_workers: int = 0
    calls: Optional[str] = None  # name of a per-token calls array (e.g. "calls_lacy") -> <CALL> targets
    # pack rows from windows of one cluster leaf; null = auto: on when the run has memory (issue 5)
    by_leaf: Optional[bool] = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # floor of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to 2D weights only (nanoGPT); norms/biases/1D never decay
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured)
    accumulate: int = 1  # micro-batches per optimizer step


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU; or any Lightning precision
    strategy: str = "auto"  # auto: ddp when world > 1; "ddp" | "fsdp"
    compile: bool = False  # torch.compile the model
    val_every: int = 0  # optimizer steps between validations (0: never)
    val_batches: int = 8
    log_every: int = 10
    deterministic: bool = False  # bit-exact CPU runs (torch.use_deterministic_algorithms)


@dataclass
class LoggingConfig:
    logger: str = "wandb"  # wandb | none   (metrics.jsonl is always written)
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "memlm"


@dataclass
class CheckpointConfig:
    every: int = 500  # optimizer steps between checkpoints (0: only the final one)
    keep_last_k: int = 3  # 0 keeps all
    resume: str = "auto"  # auto (newest complete checkpoint of this run, if any) | none | PATH


@dataclass
class RunConfig:
    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 1337
    model: Any = None  # model.config.ModelConfig (filled from `preset` + overrides)
    model_preset: Optional[str] = None  # the preset the model section started from (informative)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init_from: Optional[str] = None  # anchor run/checkpoint dir or a HF Llama dir
    # Hook for the memory section (memory.config.MemoryConfig); None trains a plain anchor.
    memory: Any = None

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
                v = {"preset": self.model_preset, **_model_to_dict(v)}
            elif dataclasses.is_dataclass(v):
                v = _plain(dataclasses.asdict(v))
            out[f.name] = v
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# parsing

def _plain(obj):
    """Tuples -> lists so that yaml.safe_dump writes plain YAML."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _model_to_dict(mc) -> dict:
    if mc is None:
        return {}
    if hasattr(mc, "to_dict"):
        return _plain(mc.to_dict())
    return _plain(dataclasses.asdict(mc))


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
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value, tp, key: str):
    """Check/convert `value` to annotation `tp`; error names the key."""
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
        raise ConfigError(f"config key {key!r}: null is not allowed here")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if tp is tuple:  # untyped tuples here are float pairs (betas)
            return tuple(_coerce(v, float, key) for v in value)
        return tuple(value)
    return value


def _fill_dataclass(cls, values: dict, prefix: str, base=None):
    """Build `cls` from a dict, starting from `base` (or defaults); unknown keys -> ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix!r}: expected a mapping, got {values!r}")
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    updates = {}
    for k, v in values.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {full!r} (known under {prefix or 'top level'}: "
                              f"{', '.join(sorted(names))})")
        sub = getattr(obj, k)
        if dataclasses.is_dataclass(sub) and isinstance(v, dict):
            updates[k] = _fill_dataclass(type(sub), v, full, base=sub)
        else:
            updates[k] = _coerce(v, hints.get(k, Any), full)
    return dataclasses.replace(obj, **updates)


def _build_model_config(section: dict | None, prefix: str = "model"):
    """`model` section -> (ModelConfig, preset). preset first, then field overrides."""
    from model.config import ModelConfig

    section = dict(section or {})
    preset = section.pop("preset", None)
    if preset is not None:
        try:
            base = ModelConfig.from_name(preset)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"config key 'model.preset': {e}") from None
    else:
        base = ModelConfig()
    return _fill_dataclass(ModelConfig, section, prefix, base=base), preset


def _build_memory_config(section):
    """Hook: the memory section becomes memory.config.MemoryConfig (unknown keys -> error)."""
    if section is None:
        return None
    from memory.config import MemoryConfig  # the memory helper's dataclass

    if dataclasses.is_dataclass(section):
        return section
    # memory.preset=<name> starts from a named MemoryConfig preset; other memory.* keys override it (issue 5)
    section = dict(section)
    preset = section.pop("preset", None)
    base = None
    if preset is not None:
        try:
            base = MemoryConfig.from_name(str(preset))
        except ValueError as e:
            raise ConfigError(f"config key 'memory.preset': {e}") from None
    try:
        return _fill_dataclass(MemoryConfig, section, "memory", base=base)
    except ValueError as e:  # MemoryConfig.__post_init__ (e.g. a negative width)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config section 'memory': {e}") from None


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


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
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(raw: dict) -> RunConfig:
    raw = dict(raw or {})
    model_section = raw.pop("model", None)
    memory_section = raw.pop("memory", None)
    raw.pop("model_preset", None)
    cfg = _fill_dataclass(RunConfig, raw, "")
    model_cfg, preset = _build_model_config(model_section)
    return dataclasses.replace(cfg, model=model_cfg, model_preset=preset,
                               memory=_build_memory_config(memory_section))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML recipe (optional) + dotted overrides -> RunConfig."""
    raw: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_config(cfg: RunConfig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(cfg.to_yaml())
    os.replace(tmp, path)

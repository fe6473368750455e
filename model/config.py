"""Anchor model configuration: one dataclass, named presets, YAML round trip.

Parameter counts of the presets (``Anchor(cfg).num_params()``):

=============  =======  =====================================================
name           params   notes
=============  =======  =====================================================
tiny           ~1.3M    CPU tests / demo (vocab 4096)
tiny-2x        ~2.1M    ~2x tiny's non-embedding params (dense baseline)
small          ~15M     CPU experiments
160m           162.8M   paper anchor: 35 x d512, 12 heads of 32, FFN 2048, tied
410m           409.0M   paper: 24 x d1024, 16x64, FFN 2816 (= open_lm 411m)
1.4b           1.401B   paper: 24 x d2048, 16x128, FFN 5632 (= open_lm 1b)
smollm2-135m   134.5M   SmolLM2-135M architecture (HF Llama compatible)
=============  =======  =====================================================
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import yaml

from model.atomic import atomic_write
from model.errors import ConfigError, check_range


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last value silently, so a recipe listing ``lr`` twice would train with whichever came last."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by later keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(stream):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (raises ``yaml.YAMLError``)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)

# Allowed values of every numeric field (checked before anything derives from them, so n_head=0 is a
# ConfigError naming `model.n_head`, not a ZeroDivisionError).
FIELD_RANGES: dict[str, dict] = {
    "vocab_size": dict(min=1), "n_layer": dict(min=1), "n_embd": dict(min=1), "n_head": dict(min=1),
    "n_kv_head": dict(min=1), "head_dim": dict(min=2), "ffn_hidden": dict(min=1),
    "rope_base": dict(min=1.0, min_open=True), "norm_eps": dict(min=0.0, min_open=True),
    "max_seq_len": dict(min=1), "init_std": dict(min=0.0),
}
# Fields that do not change what the weights mean: the rest must agree between a checkpoint and a config
# that loads it (ModelConfig.differences).
NON_ARCHITECTURE = ("name", "vocab_size", "init_std")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (plain multi-head attention)
    head_dim: int | None = None  # None -> n_embd // n_head; n_head*head_dim may differ from n_embd
    ffn_hidden: int = 384
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 256
    init_std: float = 0.02
    name: str = field(default="custom")

    def __post_init__(self):
        for key, bounds in FIELD_RANGES.items():
            value = getattr(self, key)
            if value is not None:
                check_range(f"model.{key}", value, **bounds)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                                  "set model.head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    def param_counts(self) -> dict[str, int]:
        """Parameters of Anchor(self) by part, in closed form (a tied head counted once), without building
        the model: "embedding" (+ an untied head), "attention", "ffn", "norms". A run's size check uses it
        before anything is allocated."""
        d, q, kv = self.n_embd, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        return {"embedding": self.vocab_size * d * (1 if self.tie_embeddings else 2),
                "attention": self.n_layer * (2 * d * q + 2 * d * kv),  # wq, wo; wk, wv
                "ffn": self.n_layer * 3 * d * self.ffn_hidden,
                "norms": self.n_layer * (2 * d + (2 * self.head_dim if self.qk_norm else 0)) + d}

    def num_params(self) -> int:
        """Anchor(self).num_params(), computed from the config alone."""
        return sum(self.param_counts().values())

    # ---- lookup ----
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(presets)}")
        return presets[name].replace(**overrides)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; derived fields (head_dim = n_embd // n_head, n_kv_head = n_head) are
        re-derived when their inputs change, unless given explicitly."""
        _check_keys(changes)
        if "head_dim" not in changes and self.head_dim == self.n_embd // self.n_head and (
                "n_embd" in changes or "n_head" in changes):
            changes["head_dim"] = None
        if "n_kv_head" not in changes and self.n_kv_head == self.n_head and "n_head" in changes:
            changes["n_kv_head"] = None
        return dataclasses.replace(self, **changes)

    def differences(self, other: "ModelConfig", ignore=NON_ARCHITECTURE) -> list[tuple[str, object, object]]:
        """[(field, self's value, other's value)] for every architecture field that differs. Float fields
        (norm_eps, rope_base) compare equal within float32 rounding (same_float): a HF config.json often
        stores 1e-5 as 9.999999747378752e-06, the float32 value read back as a double."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if f.name not in ignore and not _same_value(getattr(self, f.name), getattr(other, f.name))]

    # ---- (de)serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        _check_keys(d)
        # A dict may name a preset and override some of its fields.
        base = d.pop("preset", None)
        if base is not None:
            return cls.from_name(base, **d)
        return cls(**d)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write(str(path), text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> "ModelConfig":
        s = str(path_or_text)
        if os.path.exists(s):
            with open(s) as f:
                d = load_yaml(f)
        else:
            d = load_yaml(s)
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig.from_yaml: {s[:80]!r}: expected a mapping of config keys")
        return cls.from_dict(d)


FLOAT32_RTOL = 2.0 ** -23  # float32's relative spacing at most: covers one rounding of either value


def same_float(a: float, b: float) -> bool:
    """a == b up to float32 rounding (|a - b| <= 2^-23 max(|a|, |b|)): 1e-5 and 9.999999747378752e-06 match,
    1e-5 and 1e-6 do not."""
    return math.isclose(float(a), float(b), rel_tol=FLOAT32_RTOL, abs_tol=0.0)


def _same_value(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and not isinstance(b, bool):
            return same_float(a, b)
    return a == b


def matching_preset(cfg: "ModelConfig") -> str | None:
    """The name of a preset whose architecture is `cfg`'s (ModelConfig.differences empty), or None."""
    for name, preset in presets.items():
        if not preset.differences(cfg):
            return name
    return None


def _check_keys(d: dict) -> None:
    valid = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}
    for key in d:
        if key not in valid:
            raise ValueError(f"ModelConfig: unknown key {key!r}; valid keys: {', '.join(sorted(valid))}")


# Vocabulary of the paper presets. The paper's 410M and 1.4B anchors are exactly open_lm's 411m / 1b
# (DCLM lineage); the 160M anchor is its own shape. The real vocabulary is set by the tokenizer of the
# data at train time (train/ overrides vocab_size), so these values only fix the nominal size:
# - 160m, 410m: 49,152, the SmolLM2 / StarCoder BPE (the tokenizer of our smollm2-135m preset and cascade):
#   160m tied = 162.8M (+1.8%), 410m untied = 409.0M (-0.2%).
# - 1.4b: 40,960 (a 40k BPE padded to a multiple of 1024): untied = 1.401B (+0.1%). With GPT-NeoX's 50,432
#   (open_lm) it is 1.440B (+2.8%), with Llama-2's 32,000 1.364B (-2.6%), both outside the 2% we test.
PAPER_VOCAB = 49152

presets: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(name="tiny", vocab_size=4096, n_layer=4, n_embd=128, n_head=4, n_kv_head=2,
                    ffn_hidden=384, max_seq_len=256),
        # ~2x tiny's non-embedding parameters (1.98x): same depth, wider (d 176, FFN 560).
        ModelConfig(name="tiny-2x", vocab_size=4096, n_layer=4, n_embd=176, n_head=4, n_kv_head=2,
                    ffn_hidden=560, max_seq_len=256),
        ModelConfig(name="small", vocab_size=8192, n_layer=8, n_embd=384, n_head=6, n_kv_head=2,
                    ffn_hidden=1024, max_seq_len=512),
        ModelConfig(name="160m", vocab_size=PAPER_VOCAB, n_layer=35, n_embd=512, n_head=12, head_dim=32,
                    ffn_hidden=2048, rope_base=1e5, tie_embeddings=True, max_seq_len=2048),
        ModelConfig(name="410m", vocab_size=PAPER_VOCAB, n_layer=24, n_embd=1024, n_head=16, head_dim=64,
                    ffn_hidden=2816, rope_base=1e5, tie_embeddings=False, max_seq_len=2048),
        ModelConfig(name="1.4b", vocab_size=40960, n_layer=24, n_embd=2048, n_head=16, head_dim=128,
                    ffn_hidden=5632, rope_base=1e5, tie_embeddings=False, max_seq_len=2048),
        # HuggingFaceTB/SmolLM2-135M(-Instruct): a LlamaForCausalLM.
        ModelConfig(name="smollm2-135m", vocab_size=49152, n_layer=30, n_embd=576, n_head=9, n_kv_head=3,
                    ffn_hidden=1536, rope_base=1e5, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
                    init_std=0.041666666666666664),
    ]
}

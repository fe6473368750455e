"""Memory configuration: tree shape, per-level widths, which layers carry memory, optimizer settings.

A bank is a tree with branching `k` and `len(widths)` levels (level l has k**l nodes, l = 1..L).
Every node at level l holds, for each memory layer, an extra SwiGLU block of `widths[l-1]` hidden
units (M1, M2 in [r_l, d], M3 in [d, r_l]). A context fetches the blocks on its path, R = sum(r_l)
units per memory layer. Accounting (paper, 160M anchor, widths (256, 64, 16), k=16, all 35 layers):

    fetched = 3 * L_mem * d * sum(r_l)          = 18.06M
    bank    = 3 * L_mem * d * sum(k**l * r_l)   = 4.62B
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class MemoryConfig:
    k: int = 16                                   # branching factor of the cluster tree
    widths: tuple[int, ...] = (256, 64, 16)       # r_l per level (0 allowed); levels = len(widths)
    layers: Any = "all"                           # "all" | "last:N" | "first:N" | list of layer indices
    generic_prob: float | None = None             # P(row uses the generic block) in training; None -> 1/(k+1)
    init_std: float = 0.02                        # std of M1, M2 (M3 starts at zero)
    lr: float = 1e-4                              # memory peak LR (cosine to min_lr)
    min_lr: float = 1e-5
    weight_decay: float = 1e-3
    # Training phase: True = phase 2 of the paper (anchor frozen, only the memories train);
    # False = co-training (anchor and memories train together; phase 3, or memories from scratch).
    freeze_anchor: bool = False
    # Bank storage (issue "scale", memory/offload.py): "resident" = parameters on the device with dense AdamW;
    # "host" (host memory) / "mmap" (memory-mapped files) = offloaded rows trained by the sparse lazy AdamW.
    storage: str = "resident"
    bank_dir: str | None = None                   # live files of an mmap bank (default: runs/<name>/bank_live)
    shard_mb: int = 64                            # bank checkpoint shard size (MB of weights + AdamW state)
    prefetch: bool = True                         # read the next batch's rows on a background thread

    def __post_init__(self):
        if self.storage not in ("resident", "host", "mmap"):
            raise ValueError(f"memory.storage={self.storage!r}: expected resident, host or mmap")
        self.widths = tuple(int(w) for w in self.widths)
        if isinstance(self.layers, (list, tuple)):
            # int() would quietly turn 0.5 into layer 0: only whole numbers are layer indices
            bad = [i for i in self.layers if isinstance(i, bool)
                   or not (isinstance(i, int) or isinstance(i, float) and i.is_integer())]
            if bad:
                raise ValueError(f"memory.layers={list(self.layers)}: {bad[0]!r} is not a layer index; give "
                                 "integers, e.g. memory.layers=[0,3]")
            self.layers = [int(i) for i in self.layers]
        elif not isinstance(self.layers, str):
            raise ValueError(f"memory.layers={self.layers!r}: expected all, last:N, first:N or a list of layer "
                             "indices, e.g. memory.layers=[0,3]")
        if self.k < 1:
            raise ValueError(f"memory.k={self.k}: must be >= 1")
        if not self.widths:
            raise ValueError("memory.widths=[]: name at least one level, e.g. memory.widths=[40,16]")
        if any(w < 0 for w in self.widths):
            raise ValueError(f"memory.widths={list(self.widths)}: every width must be >= 0")
        p = self.generic_prob
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"memory.generic_prob={p}: must be in [0, 1]")

    # ---- derived quantities ---------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.widths)

    @property
    def total_width(self) -> int:
        """R: hidden units fetched per memory layer (one node per level)."""
        return sum(self.widths)

    @property
    def p_generic(self) -> float:
        return 1.0 / (self.k + 1) if self.generic_prob is None else float(self.generic_prob)

    def nodes_per_level(self) -> list[int]:
        return [self.k ** (l + 1) for l in range(self.n_levels)]

    def layer_ids(self, n_layer: int) -> list[int]:
        """Resolve `layers` to a sorted list of model layer indices (raises on a bad spec)."""
        spec = self.layers
        if isinstance(spec, str):
            s = spec.strip().lower()
            if s == "all":
                return list(range(n_layer))
            if s == "none":
                return []
            for kind in ("last", "first"):
                if s.startswith(kind + ":"):
                    try:
                        n = int(s.split(":", 1)[1])
                    except ValueError:
                        raise ValueError(f"memory.layers={spec}: expected {kind}:N with an integer N") from None
                    if not 0 <= n <= n_layer:
                        raise ValueError(f"memory.layers={spec} asks for {n} layers but the model has "
                                         f"model.n_layer={n_layer}; give N in 0..{n_layer}")
                    return list(range(n_layer - n, n_layer)) if kind == "last" else list(range(n))
            raise ValueError(f"memory.layers={spec}: expected all, last:N, first:N or a list of layer indices")
        ids = sorted(set(int(i) for i in spec))
        bad = [i for i in ids if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"memory.layers={list(spec)}: indices {bad} are out of range; the model has "
                             f"model.n_layer={n_layer} layers, valid 0..{n_layer - 1}")
        return ids

    def validate(self, model_cfg) -> list[int]:
        """Check this memory config against a ModelConfig; return the memory layer ids."""
        n_layer = int(model_cfg.n_layer)
        bad = [w for w in self.widths if w < 0]
        if bad:
            raise ValueError(f"memory.widths={list(self.widths)}: every width must be >= 0")
        ids = self.layer_ids(n_layer)
        if not ids or not any(self.widths):  # a memory run without a memory unit trains the anchor, silently
            raise ValueError(f"memory.layers={list(ids)} memory.widths={list(self.widths)}: no layer gets a memory "
                             "unit; give at least one layer and one width > 0, or memory=null for no memory")
        return ids

    # ---- accounting -----------------------------------------------------------------------
    def fetched_params(self, model_cfg) -> int:
        return fetched_params(self, model_cfg)

    def bank_params(self, model_cfg) -> int:
        return bank_params(self, model_cfg)

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"MemoryConfig: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "MemoryConfig":
        if name not in presets:
            raise ValueError(f"unknown memory preset {name!r}; choose from {sorted(presets)}")
        d = presets[name].to_dict()
        d.update(overrides)
        return cls.from_dict(d)


def fetched_params(mem_cfg: MemoryConfig, model_cfg) -> int:
    """Parameters fetched per context: 3 * L_mem * d * sum(r_l)."""
    n_mem = len(mem_cfg.layer_ids(model_cfg.n_layer))
    return 3 * n_mem * model_cfg.n_embd * mem_cfg.total_width


def bank_params(mem_cfg: MemoryConfig, model_cfg) -> int:
    """Parameters in the whole bank: 3 * L_mem * d * sum(k**l * r_l) (the generic block not counted)."""
    n_mem = len(mem_cfg.layer_ids(model_cfg.n_layer))
    units = sum(n * r for n, r in zip(mem_cfg.nodes_per_level(), mem_cfg.widths))
    return 3 * n_mem * model_cfg.n_embd * units


def generic_params(mem_cfg: MemoryConfig, model_cfg) -> int:
    """The generic block has the same size as one fetched block."""
    return fetched_params(mem_cfg, model_cfg)


# Presets. "160m" is the paper's configuration (18.06M fetched / 4.62B bank on the 160M anchor).
# "410m" and "1.4b" are not from a table of the paper: widths chosen so that the fetched block is
# ~10% of the anchor's non-embedding parameters, as for 160M (410M: 31.0M / 7.93B; 1.4B: 123.9M / 31.7B).
# Tiny presets are for CPU tests and demos (fetched ~10% of the tiny anchor's non-embedding params).
presets: dict[str, MemoryConfig] = {
    "160m": MemoryConfig(k=16, widths=(256, 64, 16)),
    "410m": MemoryConfig(k=16, widths=(320, 80, 20)),
    "1.4b": MemoryConfig(k=16, widths=(640, 160, 40)),
    # "tiny": 2 levels (the CPU demo clusters with --levels 2 --k 4); R = 56 as the 3-level "tiny-l3".
    "tiny": MemoryConfig(k=4, widths=(40, 16), init_std=0.02, lr=1e-3, min_lr=1e-4),
    "tiny-l3": MemoryConfig(k=4, widths=(32, 16, 8), init_std=0.02, lr=1e-3, min_lr=1e-4),
    "tiny-l2": MemoryConfig(k=4, widths=(48, 8), init_std=0.02, lr=1e-3, min_lr=1e-4),
    # "small" (model preset "small": 8 layers, d=384): fetched 1.25M = ~10% of 12.6M non-embedding params.
    "small": MemoryConfig(k=8, widths=(96, 40), init_std=0.02, lr=1e-3, min_lr=1e-4),
}

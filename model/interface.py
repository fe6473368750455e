"""The one model interface: what training, checkpoints, evaluation and inference call on a memlm model.

Two models implement it: `model.model.Anchor` (the plain decoder) and `memory.model.MemoryLM` (an anchor
plus a hierarchical memory bank). Callers never ask which one they hold with hasattr: they read
`has_memory` / `modes` and call the methods below, which both models accept with the same signature.

    logits = model(input_ids, doc_lens=doc_lens, mem_path=mem_path)      # [B, T, V] float32
    loss = model.loss(logits, labels)                                     # model/loss.py, the one loss
    out = model.generate(ids, 20, mem_path=path, mode="fetched")         # anchor: mem_path is ignored
"""
from __future__ import annotations

import abc

import torch
from torch import nn

from .loss import lm_loss


class LanguageModel(nn.Module, abc.ABC):
    """Base of memlm's language models. Inputs use the data contract of data/loader.py: `input_ids`
    [B, T] int64, `doc_lens` [B, max_docs] int64 (packed documents, zero padded), `mem_path` [B, n_levels]
    int64 (the row's cluster path; models without memory ignore it)."""

    has_memory: bool = False
    """True when the model fetches memory blocks (MemoryLM): it then also has `anchor`, `bank`, `mem_cfg`."""

    modes: tuple[str, ...] = ("anchor",)
    """Valid values of `mode`: "anchor" (no memory), and for memory models "fetched" and "generic"."""

    default_mode: str = "anchor"
    """The mode used when a caller passes mode=None."""

    router = None
    """Memory models: the router that maps a prompt to its cluster path (None without one)."""

    loss = staticmethod(lm_loss)

    def resolve_mode(self, mode: str | None) -> str:
        """`mode`, or the default when None; ValueError naming the valid modes otherwise."""
        mode = self.default_mode if mode is None else mode
        if mode not in self.modes:
            raise ValueError(f"{type(self).__name__}: unknown mode {mode!r}; valid: {', '.join(self.modes)}")
        return mode

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, doc_lens: torch.Tensor | None = None,
                mem_path: torch.Tensor | None = None, mode: str | None = None, kv_cache=None,
                start_pos: int = 0, memory=None) -> torch.Tensor:
        """Logits [B, T, V] float32. doc_lens: block-causal packing (None = one document per row);
        mem_path/mode: which memory a memory model adds; kv_cache/start_pos: incremental decoding;
        memory: an already fetched per-layer memory list (overrides mem_path/mode)."""

    @abc.abstractmethod
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None, *,
                 mem_path=None, mode: str | None = None, texts: list[str] | None = None, memory=None,
                 kv_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue input_ids [B, T0] (equal-length rows) by up to max_new_tokens: [B, T0 + n] int64.
        temperature 0 = greedy, else sampling with optional top_k / top_p; rows stop at eos_id. Memory
        models: mem_path [B, L], or texts routed by `router` (models without memory ignore both).
        ValueError naming the argument for an empty input_ids, max_new_tokens < 0, temperature < 0,
        top_k < 1 or top_p outside (0, 1] (model.model.check_generate_args)."""

    @abc.abstractmethod
    def flops_per_token(self, seq_len: int, mode: str | None = None) -> float:
        """Training FLOPs (forward + backward) per token at `seq_len`, counting fetched memory units
        only (never a whole bank)."""

    @abc.abstractmethod
    def num_params(self, group: str = "all") -> int:
        """Parameter count of `group` ("all", "embedding", "non_embedding"; memory models have more)."""

    @abc.abstractmethod
    def param_groups(self, lr: float, weight_decay: float, memory_lr: float | None = None,
                     memory_wd: float | None = None) -> list[dict]:
        """AdamW groups of the trainable parameters, each with "name", "lr", "weight_decay" (and
        "min_lr" where a group has its own cosine floor). 2-D+ weights decay, 1-D tensors do not."""

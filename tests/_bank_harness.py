"""A tiny, deterministic training loop over anchor + bank for the bank tests (and the torchrun worker).

Uses only the components a real loop uses: MemoryLM, a bank (resident + ResidentSparseAdapter, or
OffloadedBank), torch AdamW for the dense parameters (anchor + generic block), SparseBankOptimizer for
the bank rows, clip_grad_norm_with_bank for the global norm. Gradient accumulation over micro-batches.
"""
from __future__ import annotations

import torch
from torch import nn

from memory.config import MemoryConfig
from memory.model import MemoryLM
from memory.sparse_adam import SparseBankOptimizer, clip_grad_norm_with_bank
from model.config import ModelConfig
from model.model import Anchor

VOCAB, T = 64, 16


def configs(k: int = 4, widths=(8, 4, 2)):
    mc = ModelConfig.from_name("tiny", vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
                               ffn_hidden=64, max_seq_len=T)
    return mc, MemoryConfig(k=k, widths=tuple(widths), init_std=0.05, lr=1e-2)


def batch(step: int, micro: int, B: int, mem_cfg: MemoryConfig, tops=None):
    """Deterministic batch. tops: optional list of allowed top-level clusters for row b (cycled)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    paths = torch.randint(0, mem_cfg.k, (B, mem_cfg.n_levels), generator=g)
    if tops is not None:
        paths[:, 0] = torch.tensor([tops[i % len(tops)] for i in range(B)])[torch.randperm(B, generator=g)]
    generic = torch.rand(B, generator=g) < 0.2
    return x[:, :-1].contiguous(), x[:, 1:].contiguous(), paths, generic


class Net(nn.Module):
    """What DDP wraps: fetch + anchor in one forward (the bank's rows are not DDP parameters)."""

    def __init__(self, lm: MemoryLM):
        super().__init__()
        self.lm = lm

    def forward(self, x, paths, generic):
        mem = self.lm.bank.fetch(paths, generic)
        return self.lm(x, memory=mem)


def make_optimizers(lm: MemoryLM, sparse_source, lr=1e-2, wd=0.1, grad_divisor=1.0):
    """sparse_source: the OffloadedBank or a ResidentSparseAdapter. Dense AdamW gets anchor + generic."""
    bank_dense = (sparse_source.dense_parameters() if hasattr(sparse_source, "dense_parameters")
                  else list(lm.bank.parameters()))
    dense = list(lm.anchor.parameters()) + bank_dense
    dense_opt = torch.optim.AdamW(dense, lr=lr, weight_decay=wd, betas=(0.9, 0.95))
    bank_opt = SparseBankOptimizer(sparse_source, lr=lr, weight_decay=wd, betas=(0.9, 0.95), grad_divisor=grad_divisor)
    return dense, dense_opt, bank_opt


def train(net, dense, dense_opt, bank_opt, steps: int, B: int, mem_cfg, accumulate: int = 2, clip: float = 0.5,
          tops=None, select=None, prefetch=True, first_step: int = 0):
    """Run `steps` optimizer steps; returns per-step losses (mean over micro-batches, local)."""
    bank = net.module.lm.bank if hasattr(net, "module") else net.lm.bank
    losses = []
    for step in range(first_step, first_step + steps):
        total = 0.0
        for micro in range(accumulate):
            x, y, paths, generic = batch(step, micro, B, mem_cfg, tops)
            if select is not None:
                x, y, paths, generic = (t[select(paths)] for t in (x, y, paths, generic))
            if prefetch:  # the loader knows the next batch: read it now (a no-op for a resident bank)
                nxt = batch(step + (micro + 1) // accumulate, (micro + 1) % accumulate, B, mem_cfg, tops)[2]
                bank.prefetch(nxt if select is None else nxt[select(nxt)])
            logits = net(x, paths, generic)
            loss = Anchor.loss(logits, y)
            (loss / accumulate).backward()
            bank.count_tokens(y.shape[1])
            total += float(loss.detach()) / accumulate
        clip_grad_norm_with_bank(dense, bank_opt, clip)
        dense_opt.step()
        bank_opt.step()
        dense_opt.zero_grad(set_to_none=True)
        bank_opt.zero_grad()
        losses.append(total)
    return losses

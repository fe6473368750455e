"""Helpers for testing memory-FFN implementations: scaled random inputs, an fp64 reference, errors."""
from __future__ import annotations

import torch

from .reference import memory_ffn_reference

NAMES = ("x", "w1", "w2", "w3", "m1", "m2", "m3")


def make_inputs(B, T, d, F, R, U, block_of_row=None, dtype=torch.float32, device="cpu", seed=0):
    """Inputs scaled so activations and outputs are O(1) (fp16 stays far from overflow)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, fan_in):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / max(fan_in, 1) ** 0.5).to(dtype).to(device)

    x = rnd(B, T, d, fan_in=1)
    w1, w2, w3 = rnd(F, d, fan_in=d), rnd(F, d, fan_in=d), rnd(d, F, fan_in=F + R)
    m1, m2, m3 = rnd(U, R, d, fan_in=d), rnd(U, R, d, fan_in=d), rnd(U, d, R, fan_in=F + R)
    if block_of_row is None:
        block_of_row = torch.randint(0, U, (B,), generator=g)
    bor = torch.as_tensor(block_of_row, dtype=torch.int64).to(device)
    dy = rnd(B, T, d, fan_in=1)
    return (x, w1, w2, w3, m1, m2, m3, bor), dy


def reference_fp64(inputs, dy):
    """(y, grads) of the reference in float64 from the (already rounded) inputs."""
    *tensors, bor = inputs
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in tensors]
    y = memory_ffn_reference(*leaves, bor.cpu())
    grads = torch.autograd.grad(y, leaves, dy.double().cpu(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return y.detach(), grads


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: one number per tensor, robust to scale (NaN -> inf)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))

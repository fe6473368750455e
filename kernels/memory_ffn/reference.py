"""The memory FFN in plain PyTorch: the spec every other implementation is tested against.

y[b] = w3 @ (silu(w1 x) * (w2 x)) + m3[k] @ (silu(m1[k] x) * (m2[k] x)),   k = block_of_row[b]

i.e. one SwiGLU FFN of width F+R whose last R hidden units are the row's fetched memory block.
Differentiable with ordinary autograd (the gather's backward sums the rows that share a block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_ffn_reference(
    x: torch.Tensor,  # [B, T, d]
    w1: torch.Tensor,  # [F, d]
    w2: torch.Tensor,  # [F, d]
    w3: torch.Tensor,  # [d, F]
    m1: torch.Tensor,  # [U, R, d]
    m2: torch.Tensor,  # [U, R, d]
    m3: torch.Tensor,  # [U, d, R]
    block_of_row: torch.Tensor,  # int64 [B], values in [0, U)
) -> torch.Tensor:
    y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w2), w3)
    if m1.shape[1] == 0:  # R = 0: the plain anchor FFN
        return y
    k = block_of_row.long()
    # Per-row weights by gather, then batched matmuls over the rows.
    hm = F.silu(torch.bmm(x, m1[k].transpose(1, 2))) * torch.bmm(x, m2[k].transpose(1, 2))  # [B, T, R]
    return y + torch.bmm(hm, m3[k].transpose(1, 2))


def memory_ffn_reference_backward(dy, x, w1, w2, w3, m1, m2, m3, block_of_row):
    """(dx, dw1, dw2, dw3, dm1, dm2, dm3) in closed form, plain PyTorch (no autograd needed).

    Used by the registered op where Triton cannot run (inside a custom op, autograd is off).
    """
    B, T, d = x.shape
    dy2, x2 = dy.reshape(B * T, d), x.reshape(B * T, d)
    a, g = x2 @ w1.t(), x2 @ w2.t()
    sig = torch.sigmoid(a)
    dh = dy2 @ w3
    da, dg = dh * g * sig * (1 + a * (1 - sig)), dh * a * sig
    dx = (da @ w1 + dg @ w2).view(B, T, d)
    dw1, dw2, dw3 = da.t() @ x2, dg.t() @ x2, dy2.t() @ (a * sig * g)
    dm1, dm2, dm3 = torch.zeros_like(m1), torch.zeros_like(m2), torch.zeros_like(m3)
    if m1.shape[1] > 0:
        k = block_of_row.long()
        k1, k2, k3 = m1[k], m2[k], m3[k]  # [B, R, d], [B, R, d], [B, d, R]
        am, gm = torch.bmm(x, k1.transpose(1, 2)), torch.bmm(x, k2.transpose(1, 2))  # [B, T, R]
        sig = torch.sigmoid(am)
        dhm = torch.bmm(dy, k3)
        dam, dgm = dhm * gm * sig * (1 + am * (1 - sig)), dhm * am * sig
        dx = dx + torch.bmm(dam, k1) + torch.bmm(dgm, k2)
        dm1.index_add_(0, k, torch.bmm(dam.transpose(1, 2), x))
        dm2.index_add_(0, k, torch.bmm(dgm.transpose(1, 2), x))
        dm3.index_add_(0, k, torch.bmm(dy.transpose(1, 2), am * sig * gm))
    return dx, dw1, dw2, dw3, dm1, dm2, dm3

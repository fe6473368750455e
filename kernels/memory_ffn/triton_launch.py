"""Triton path of the memory FFN: tile sizes, input checks, launch grids, forward and backward.

The kernel bodies are in triton_kernels.py; this module picks tile sizes (`Blocks`: fixed, since
@triton.autotune does not work in the interpreter), checks device and dtype, computes grids and
strides, and composes the kernels into `forward` / `backward` (the functions op.py calls).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton

from .triton_kernels import bwd_hidden, fwd_hidden, hidden_to_model, interpreting, jitted, segment_outer


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (fixed: @triton.autotune does not work in the interpreter)."""

    hid_t: int = 128  # _fwd_hidden tokens x units x d-chunk
    hid_h: int = 64
    hid_d: int = 64
    hid_warps: int = 8
    bwd_t: int = 128  # _bwd_hidden (three accumulators)
    bwd_h: int = 64
    bwd_d: int = 32
    bwd_warps: int = 8
    out_t: int = 128  # _hidden_to_model tokens x model-dim x units-chunk
    out_d: int = 128
    out_k: int = 32
    out_warps: int = 8
    seg_p: int = 64  # _segment_outer
    seg_q: int = 64
    seg_t: int = 64
    seg_warps: int = 4
    seg_programs: int = 1024  # split block segments until about this many programs run
    stages: int = 3


GPU_BLOCKS = Blocks()
# The interpreter runs programs one after another: few, big tiles (tests override with smaller ones).
INTERPRET_BLOCKS = Blocks(
    hid_t=32, hid_h=32, hid_d=32, hid_warps=4, bwd_t=32, bwd_h=32, bwd_d=32, bwd_warps=4,
    out_t=32, out_d=32, out_k=32, out_warps=4, seg_p=32, seg_q=32, seg_t=32, seg_warps=4,
    seg_programs=1, stages=1,
)

_override: list[Blocks] = []
poison_outputs = False  # tests: fill every output buffer with NaN first so unwritten elements show


@contextlib.contextmanager
def use_blocks(blocks: Blocks | None = None, poison: bool | None = None):
    """Temporarily use other tile sizes and/or NaN-poisoned outputs (for tests)."""
    global poison_outputs
    old = poison_outputs
    if blocks is not None:
        _override.append(blocks)
    if poison is not None:
        poison_outputs = poison
    try:
        yield
    finally:
        if blocks is not None:
            _override.pop()
        poison_outputs = old


def _blocks() -> Blocks:
    if _override:
        return _override[-1]
    return INTERPRET_BLOCKS if interpreting() else GPU_BLOCKS


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs:
        out.fill_(float("nan"))
    return out


def _meta(dtype: torch.dtype):
    upcast = interpreting() and dtype == torch.bfloat16
    prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"  # fp32: exact like torch's default
    return dict(UPCAST=upcast, PREC=prec)


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            "memlm::memory_ffn (triton): tensors are on CPU; the Triton kernels need CUDA tensors, "
            "or TRITON_INTERPRET=1 to run them in the Triton interpreter."
        )


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"memlm::memory_ffn (triton): dtype {x.dtype} unsupported (float32, float16, bfloat16)")


# --------------------------------------------------------------------------------------------
# launchers


def _launch_hidden_fwd(x2, w1, w2, m1, m2, bor, h, B, T):
    blk, meta = _blocks(), _meta(x2.dtype)
    D, NF, NR = x2.shape[1], w1.shape[0], m1.shape[1]
    n_t = triton.cdiv(T, blk.hid_t)
    kern = jitted(fwd_hidden)
    # anchor units (block stride 0), then the memory units of each row's block
    for w_a, w_b, nu, stride, col0 in ((w1, w2, NF, 0, 0), (m1, m2, NR, NR * D, NF)):
        if nu == 0:
            continue
        grid = (B * n_t, triton.cdiv(nu, blk.hid_h))
        kern[grid](x2, w_a, w_b, bor, h, T, D, nu, stride, col0, NF + NR, n_t,
                   BT=blk.hid_t, BH=blk.hid_h, BD=blk.hid_d, num_warps=blk.hid_warps,
                   num_stages=blk.stages, **meta)


def _launch_to_model(a1, a2, w_a, w_b, m_a, m_b, bor, out, B, T, NF, NR, w_strides, m_strides):
    blk, meta = _blocks(), _meta(out.dtype)
    D = out.shape[1]
    n_t = triton.cdiv(T, blk.out_t)
    two = a2 is not None
    grid = (B * n_t, triton.cdiv(D, blk.out_d))
    jitted(hidden_to_model)[grid](
        a1, a2 if two else a1, w_a, w_b if two else w_a, m_a, m_b if two else m_a, bor, out,
        T, D, NF, NR, NF + NR, w_strides[0], w_strides[1], m_strides[0], m_strides[1], m_strides[2], n_t,
        TWO=two, BT=blk.out_t, BD=blk.out_d, BK=blk.out_k, num_warps=blk.out_warps,
        num_stages=blk.stages, **meta)


def _segment_reduce(a, lda, a_col0, P, bm, ldb, b_col0, Q, seg, U, T, N):
    """[U, P, Q] fp32: for each block u, the sum over its rows' tokens of A[tok, p] * BM[tok, q]."""
    order, starts, counts = seg
    blk, meta = _blocks(), _meta(a.dtype)
    n_p, n_q = triton.cdiv(P, blk.seg_p), triton.cdiv(Q, blk.seg_q)
    # split segments into S chunks so that enough programs run when there are few blocks
    max_s = max(1, triton.cdiv(N, blk.seg_t))
    S = max(1, min(max_s, blk.seg_programs // max(1, U * n_p * n_q)))
    chunk = triton.cdiv(triton.cdiv(N, S), blk.seg_t) * blk.seg_t  # S*chunk >= N >= any segment
    out = _empty((S, U, P, Q), torch.float32, a.device)
    jitted(segment_outer)[(U, n_p * n_q, S)](
        a, bm, out, order, starts, counts, T, P, Q, lda, ldb, a_col0, b_col0, chunk, U, n_q,
        BP=blk.seg_p, BQ=blk.seg_q, BT=blk.seg_t, num_warps=blk.seg_warps, num_stages=blk.stages, **meta)
    return out[0] if S == 1 else out.sum(0)  # fixed-order sum over chunks: deterministic


def _segments(bor: torch.Tensor, U: int):
    # int32 throughout so the kernel's dynamic loop bounds share one type
    order = torch.argsort(bor, stable=True).to(torch.int32)
    counts = (bor[None, :] == torch.arange(U, device=bor.device)[:, None]).sum(1, dtype=torch.int32)
    starts = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).to(torch.int32)
    return order.contiguous(), starts.contiguous(), counts.contiguous()


def _prep(x, w1, w2, w3, m1, m2, m3, bor):
    _check_device(x)
    _check_dtype(x)
    c = lambda t: t.contiguous()
    return (c(x), c(w1), c(w2), c(w3), c(m1), c(m2), c(m3), bor.to(torch.int64).contiguous())


def forward(x, w1, w2, w3, m1, m2, m3, block_of_row) -> torch.Tensor:
    """y [B, T, d] (Triton). Same argument shapes as the reference."""
    x, w1, w2, w3, m1, m2, m3, bor = _prep(x, w1, w2, w3, m1, m2, m3, block_of_row)
    B, T, D = x.shape
    NF, NR, N = w1.shape[0], m1.shape[1], B * T
    y = _empty((N, D), x.dtype, x.device)
    if N == 0 or D == 0:
        return y.view(B, T, D)
    if NF + NR == 0:
        return y.zero_().view(B, T, D)
    x2 = x.view(N, D)
    h = _empty((N, NF + NR), x.dtype, x.device)
    _launch_hidden_fwd(x2, w1, w2, m1, m2, bor, h, B, T)
    # y = h @ [W3 | M3_k]ᵀ: W3[j, u] at j*F + u; M3[k, j, u] at k*D*R + j*R + u
    _launch_to_model(h, None, w3, None, m3, None, bor, y, B, T, NF, NR, (1, NF), (1, NR, D * NR))
    return y.view(B, T, D)


def backward(dy, x, w1, w2, w3, m1, m2, m3, block_of_row, need_dx=True, need_dw=True, need_dm=True):
    """(dx, dw1, dw2, dw3, dm1, dm2, dm3); an entry is None where its need_* flag is False."""
    x, w1, w2, w3, m1, m2, m3, bor = _prep(x, w1, w2, w3, m1, m2, m3, block_of_row)
    dy = dy.to(x.dtype).contiguous()
    B, T, D = x.shape
    NF, NR, U, N = w1.shape[0], m1.shape[1], m1.shape[0], B * T
    H = NF + NR
    x2, dy2 = x.view(N, D), dy.view(N, D)
    da = _empty((N, H), x.dtype, x.device)
    dg = _empty((N, H), x.dtype, x.device)
    hr = _empty((N, H), x.dtype, x.device)
    if N > 0 and D > 0:
        blk, meta = _blocks(), _meta(x.dtype)
        n_t = triton.cdiv(T, blk.bwd_t)
        kern = jitted(bwd_hidden)
        # anchor units: W3[j, u] row stride F; memory units: M3[k, j, u] row stride R, block D*R
        for wa, wb, wc, nu, bs12, bs3, ld3, col0 in ((w1, w2, w3, NF, 0, 0, NF, 0),
                                                     (m1, m2, m3, NR, NR * D, D * NR, NR, NF)):
            if nu == 0:
                continue
            grid = (B * n_t, triton.cdiv(nu, blk.bwd_h))
            kern[grid](x2, dy2, wa, wb, wc, bor, da, dg, hr, T, D, nu, bs12, bs3, ld3, col0, H, n_t,
                       BT=blk.bwd_t, BH=blk.bwd_h, BD=blk.bwd_d, num_warps=blk.bwd_warps,
                       num_stages=blk.stages, **meta)
    else:
        da.zero_(), dg.zero_(), hr.zero_()

    dx = dw1 = dw2 = dw3 = dm1 = dm2 = dm3 = None
    if need_dx:
        dx = _empty((N, D), x.dtype, x.device)
        if N == 0 or D == 0:
            pass
        elif H == 0:
            dx.zero_()
        else:
            # dx = da @ [W1|M1_k] + dg @ [W2|M2_k]: W1[u, j] at u*D + j; M1[k, u, j] at k*R*D + u*D + j
            _launch_to_model(da, dg, w1, w2, m1, m2, bor, dx, B, T, NF, NR, (D, 1), (D, 1, NR * D))
        dx = dx.view(B, T, D)
    if need_dw:  # anchor weights: reductions over all tokens, cuBLAS (deterministic)
        dw1 = da[:, :NF].t() @ x2
        dw2 = dg[:, :NF].t() @ x2
        dw3 = dy2.t() @ hr[:, :NF]
    if need_dm:
        if NR == 0 or N == 0 or U == 0:
            dm1, dm2, dm3 = torch.zeros_like(m1), torch.zeros_like(m2), torch.zeros_like(m3)
        else:
            seg = _segments(bor, U)
            dm1 = _segment_reduce(da, H, NF, NR, x2, D, 0, D, seg, U, T, N).to(m1.dtype)
            dm2 = _segment_reduce(dg, H, NF, NR, x2, D, 0, D, seg, U, T, N).to(m2.dtype)
            dm3 = _segment_reduce(dy2, D, 0, D, hr, H, NF, NR, seg, U, T, N).to(m3.dtype)
    return dx, dw1, dw2, dw3, dm1, dm2, dm3

"""Triton kernels for the memory FFN (forward and backward).

Tokens are tiled *within a row* (one program = BT tokens of one row b), so the row's block index
k = block_of_row[b] is uniform in the tile and the memory units are just more hidden tiles whose
weights are read from bank row k. The hidden dimension is the concatenation [F anchor | R memory].

What is fused (fp32 accumulation everywhere, inputs fp32/fp16/bf16):
  forward
    _fwd_hidden       h = silu(x W1ᵀ) * (x W2ᵀ) for a [BT, BH] hidden tile: both GEMMs share the
                      x tiles, silu*mul in the epilogue. Launched once over the F anchor units and
                      once over the R memory units (same kernel, block stride 0 vs R*d), writing
                      the two column ranges of one [N, F+R] buffer.
    _hidden_to_model  y = [h_anchor | h_mem] @ [W3 | M3_k]ᵀ: one K-loop over W3 tiles, then M3_k
                      tiles, into the same accumulator (no concatenated weights, one pass over y).
  backward
    _bwd_hidden       dh = dy @ [W3|M3_k] and a recompute of a = x W1ᵀ, g = x W2ᵀ in the same
                      d-loop (three GEMMs sharing tile loads), then the silu derivative:
                      da = dh*g*silu'(a), dg = dh*silu(a), and h (for dW3/dM3). No forward
                      activations are saved: the op saves only its inputs.
    _hidden_to_model  dx = da @ [W1|M1_k] + dg @ [W2|M2_k] (both products in one K-loop).
    _segment_outer    dM1/dM2/dM3 per unique block: rows are sorted by block (a stable argsort),
                      each program reduces the tokens of one block's segment (or a fixed chunk of
                      it) in fp32; chunks are summed in a fixed order. Deterministic, no atomics.
  dW1, dW2, dW3 are plain torch matmuls over all tokens (cuBLAS, deterministic).

TRITON_INTERPRET=1 is read when a kernel is first needed (kernels are jitted lazily and cached
per mode), so importing this module before or after setting it both work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# kernels: plain functions, jitted lazily by _kernel(). They call only triton *builtins* (no
# @triton.jit helpers such as tl.zeros or tl.sigmoid): those are jitted when triton is imported, and
# if TRITON_INTERPRET was not set then, the interpreter cannot call them.


def _fwd_hidden(
    X, W1, W2, BOR, HOUT,
    T, D, NU, block_stride, h_col0, ldh, n_tiles_t,
    BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid_t // n_tiles_t
    offs_t = (pid_t - b * n_tiles_t) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    tok = b.to(tl.int64) * T + offs_t
    wbase = tl.load(BOR + b).to(tl.int64) * block_stride  # 0 for the anchor units
    offs_u = pid_h * BH + tl.arange(0, BH)
    mask_u = offs_u < NU
    acc_a = tl.full((BT, BH), 0.0, tl.float32)
    acc_g = tl.full((BT, BH), 0.0, tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        xt = tl.load(X + tok[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        woff = wbase + offs_u[None, :].to(tl.int64) * D + offs_d[:, None]  # [BD, BH] = W[u, d]ᵀ
        wmask = mask_d[:, None] & mask_u[None, :]
        w1t = tl.load(W1 + woff, mask=wmask, other=0.0)
        w2t = tl.load(W2 + woff, mask=wmask, other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is broken: compute in fp32 there
            xt = xt.to(tl.float32)
            w1t = w1t.to(tl.float32)
            w2t = w2t.to(tl.float32)
        acc_a = tl.dot(xt, w1t, acc_a, input_precision=PREC)
        acc_g = tl.dot(xt, w2t, acc_g, input_precision=PREC)
    h = acc_a / (1.0 + tl.exp(-acc_a)) * acc_g  # silu(a) * g
    hoff = tok[:, None] * ldh + h_col0 + offs_u[None, :]
    tl.store(HOUT + hoff, h.to(HOUT.dtype.element_ty), mask=mask_t[:, None] & mask_u[None, :])


def _bwd_hidden(
    X, DY, W1, W2, W3, BOR, DA, DG, HR,
    T, D, NU, bs12, bs3, ld3, h_col0, ldh, n_tiles_t,
    BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid_t // n_tiles_t
    offs_t = (pid_t - b * n_tiles_t) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    tok = b.to(tl.int64) * T + offs_t
    k = tl.load(BOR + b).to(tl.int64)
    offs_u = pid_h * BH + tl.arange(0, BH)
    mask_u = offs_u < NU
    acc_a = tl.full((BT, BH), 0.0, tl.float32)
    acc_g = tl.full((BT, BH), 0.0, tl.float32)
    acc_dh = tl.full((BT, BH), 0.0, tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        mask_d = offs_d < D
        tmask = mask_t[:, None] & mask_d[None, :]
        xt = tl.load(X + tok[:, None] * D + offs_d[None, :], mask=tmask, other=0.0)
        dyt = tl.load(DY + tok[:, None] * D + offs_d[None, :], mask=tmask, other=0.0)
        wmask = mask_d[:, None] & mask_u[None, :]
        woff = k * bs12 + offs_u[None, :].to(tl.int64) * D + offs_d[:, None]  # W1[u, d]ᵀ
        w3off = k * bs3 + offs_d[:, None].to(tl.int64) * ld3 + offs_u[None, :]  # W3[d, u]
        w1t = tl.load(W1 + woff, mask=wmask, other=0.0)
        w2t = tl.load(W2 + woff, mask=wmask, other=0.0)
        w3t = tl.load(W3 + w3off, mask=wmask, other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            dyt = dyt.to(tl.float32)
            w1t = w1t.to(tl.float32)
            w2t = w2t.to(tl.float32)
            w3t = w3t.to(tl.float32)
        acc_a = tl.dot(xt, w1t, acc_a, input_precision=PREC)
        acc_g = tl.dot(xt, w2t, acc_g, input_precision=PREC)
        acc_dh = tl.dot(dyt, w3t, acc_dh, input_precision=PREC)
    sig = 1.0 / (1.0 + tl.exp(-acc_a))
    s = acc_a * sig  # silu(a)
    da = acc_dh * acc_g * sig * (1.0 + acc_a * (1.0 - sig))
    dg = acc_dh * s
    h = s * acc_g
    hoff = tok[:, None] * ldh + h_col0 + offs_u[None, :]
    omask = mask_t[:, None] & mask_u[None, :]
    tl.store(DA + hoff, da.to(DA.dtype.element_ty), mask=omask)
    tl.store(DG + hoff, dg.to(DG.dtype.element_ty), mask=omask)
    tl.store(HR + hoff, h.to(HR.dtype.element_ty), mask=omask)


def _hidden_to_model(
    A1, A2, W1, W2, M1, M2, BOR, OUT,
    T, D, NF, NR, lda, w_su, w_sd, m_su, m_sd, m_bs, n_tiles_t,
    TWO: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    # OUT[tok, j] = sum_u A1[tok, u] Wcat1[u, j] (+ A2 Wcat2), u over NF anchor then NR memory units;
    # Wcat[u, j] = W[u*w_su + j*w_sd] for u < NF, else M[k*m_bs + (u-NF)*m_su + j*m_sd].
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid_t // n_tiles_t
    offs_t = (pid_t - b * n_tiles_t) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    tok = b.to(tl.int64) * T + offs_t
    mbase = tl.load(BOR + b).to(tl.int64) * m_bs
    offs_j = pid_d * BD + tl.arange(0, BD)
    mask_j = offs_j < D
    acc = tl.full((BT, BD), 0.0, tl.float32)
    for u0 in range(0, NF, BK):  # anchor units: W tiles
        offs_u = u0 + tl.arange(0, BK)
        mask_u = offs_u < NF
        aoff = tok[:, None] * lda + offs_u[None, :]
        amask = mask_t[:, None] & mask_u[None, :]
        woff = offs_u[:, None].to(tl.int64) * w_su + offs_j[None, :] * w_sd
        wmask = mask_u[:, None] & mask_j[None, :]
        a = tl.load(A1 + aoff, mask=amask, other=0.0)
        w = tl.load(W1 + woff, mask=wmask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        if TWO:
            a2 = tl.load(A2 + aoff, mask=amask, other=0.0)
            w2 = tl.load(W2 + woff, mask=wmask, other=0.0)
            if UPCAST:
                a2 = a2.to(tl.float32)
                w2 = w2.to(tl.float32)
            acc = tl.dot(a2, w2, acc, input_precision=PREC)
    for u0 in range(0, NR, BK):  # memory units: the row's block k, same accumulator
        offs_u = u0 + tl.arange(0, BK)
        mask_u = offs_u < NR
        aoff = tok[:, None] * lda + NF + offs_u[None, :]
        amask = mask_t[:, None] & mask_u[None, :]
        moff = mbase + offs_u[:, None].to(tl.int64) * m_su + offs_j[None, :] * m_sd
        mmask = mask_u[:, None] & mask_j[None, :]
        a = tl.load(A1 + aoff, mask=amask, other=0.0)
        w = tl.load(M1 + moff, mask=mmask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        if TWO:
            a2 = tl.load(A2 + aoff, mask=amask, other=0.0)
            w2 = tl.load(M2 + moff, mask=mmask, other=0.0)
            if UPCAST:
                a2 = a2.to(tl.float32)
                w2 = w2.to(tl.float32)
            acc = tl.dot(a2, w2, acc, input_precision=PREC)
    tl.store(OUT + tok[:, None] * D + offs_j[None, :], acc.to(OUT.dtype.element_ty), mask=mask_t[:, None] & mask_j[None, :])


def _segment_outer(
    A, BM, OUT, ORDER, SEG_START, SEG_COUNT,
    T, P, Q, lda, ldb, a_col0, b_col0, chunk, n_u, n_q_tiles,
    BP: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    # OUT[s, u] = sum over tokens i in chunk s of block u's segment of A[i, p]ᵀ BM[i, q]   (fp32)
    u = tl.program_id(0)
    pid_pq = tl.program_id(1)
    s = tl.program_id(2)
    offs_p = (pid_pq // n_q_tiles) * BP + tl.arange(0, BP)
    offs_q = (pid_pq % n_q_tiles) * BQ + tl.arange(0, BQ)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    start = tl.load(SEG_START + u)
    n_tok = tl.load(SEG_COUNT + u) * T
    lo = s * chunk
    hi = tl.minimum(lo + chunk, n_tok)
    acc = tl.full((BP, BQ), 0.0, tl.float32)
    for i0 in range(lo, hi, BT):  # segment tokens in a fixed order: rows sorted by block, then t
        i = i0 + tl.arange(0, BT)
        mask_i = i < hi
        row = tl.load(ORDER + start + i // T, mask=mask_i, other=0)
        tok = row.to(tl.int64) * T + i % T
        at = tl.load(A + tok[None, :] * lda + a_col0 + offs_p[:, None], mask=mask_p[:, None] & mask_i[None, :], other=0.0)
        bt = tl.load(BM + tok[:, None] * ldb + b_col0 + offs_q[None, :], mask=mask_i[:, None] & mask_q[None, :], other=0.0)
        if UPCAST:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
    ooff = ((s * n_u + u).to(tl.int64) * P + offs_p[:, None]) * Q + offs_q[None, :]
    tl.store(OUT + ooff, acc, mask=mask_p[:, None] & mask_q[None, :])


# --------------------------------------------------------------------------------------------
# configuration


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else _env_interpret()


def _env_interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_JITTED: dict = {}


def _kernel(fn):
    key = (fn.__name__, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


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
    kern = _kernel(_fwd_hidden)
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
    _kernel(_hidden_to_model)[grid](
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
    _kernel(_segment_outer)[(U, n_p * n_q, S)](
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
        kern = _kernel(_bwd_hidden)
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

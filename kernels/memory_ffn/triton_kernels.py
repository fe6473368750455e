"""Triton kernels for the memory FFN (forward and backward): the kernel bodies.

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

The kernels are plain functions, jitted on first use by `jitted()` and cached per mode: TRITON_INTERPRET=1
is read then, so importing this module before or after setting it both work. Tile sizes, checks,
launch grids and the forward/backward drivers are in triton_launch.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# kernels: plain functions, jitted lazily by jitted(). They call only triton *builtins* (no
# @triton.jit helpers such as tl.zeros or tl.sigmoid): those are jitted when triton is imported, and
# if TRITON_INTERPRET was not set then, the interpreter cannot call them.


def fwd_hidden(
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


def bwd_hidden(
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


def hidden_to_model(
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


def segment_outer(
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
# jitting


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else _env_interpret()


def _env_interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_JITTED: dict = {}


def jitted(fn):
    """fn jitted for the current mode (interpreter or GPU), compiled once per mode."""
    key = (fn.__name__, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]

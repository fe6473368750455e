"""The registered op `memlm::memory_ffn` (Triton forward/backward) and the dispatch `memory_ffn`.

Dispatch, by env MEMLM_KERNELS (read at every call):
  auto       Triton when x is a CUDA tensor (fp32/fp16/bf16), else the PyTorch reference (default)
  reference  always the reference (plain autograd; torch.compile traces through it)
  triton     always the registered op; on CPU this needs TRITON_INTERPRET=1 (the Triton interpreter)

The op is a torch.library custom op with a fake implementation and a registered autograd formula
(backward is a second custom op), so torch.compile treats it as one opaque node. Without CUDA and
without the interpreter, the op's implementations fall back to the reference.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .reference import memory_ffn_reference, memory_ffn_reference_backward

BACKENDS = ("auto", "reference", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend() -> str:
    """The value of MEMLM_KERNELS (auto|reference|triton); anything else is a ValueError."""
    value = os.environ.get("MEMLM_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MEMLM_KERNELS={value!r} is invalid: expected one of {', '.join(BACKENDS)}")
    return value


def _interpreting() -> bool:
    # Same test as triton.knobs (read live), without importing triton on the reference path.
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_runs_here(x: Tensor) -> bool:
    return (x.is_cuda or _interpreting()) and x.dtype in _TRITON_DTYPES


# --------------------------------------------------------------------------------------------
# validation


def _validate(x, w1, w2, w3, m1, m2, m3, block_of_row) -> None:
    def err(msg):
        raise ValueError(f"memory_ffn: {msg}")

    named = dict(x=x, w1=w1, w2=w2, w3=w3, m1=m1, m2=m2, m3=m3, block_of_row=block_of_row)
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"memory_ffn: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            err(f"{name} is on {t.device} but x is on {x.device}")
    for name in ("x", "w1", "w2", "w3", "m1", "m2", "m3"):
        if not named[name].is_floating_point():
            raise TypeError(f"memory_ffn: {name} must be a floating-point tensor, got {named[name].dtype}")
    if x.dim() != 3:
        err(f"x must be [B, T, d], got shape {tuple(x.shape)}")
    B, T, d = x.shape
    if w1.dim() != 2 or w1.shape[1] != d:
        err(f"w1 must be [F, d={d}], got {tuple(w1.shape)}")
    Fh = w1.shape[0]
    if tuple(w2.shape) != (Fh, d):
        err(f"w2 must be [F={Fh}, d={d}] like w1, got {tuple(w2.shape)}")
    if tuple(w3.shape) != (d, Fh):
        err(f"w3 must be [d={d}, F={Fh}], got {tuple(w3.shape)}")
    if m1.dim() != 3 or m1.shape[2] != d:
        err(f"m1 must be [U, R, d={d}], got {tuple(m1.shape)}")
    U, R = m1.shape[0], m1.shape[1]
    if tuple(m2.shape) != (U, R, d):
        err(f"m2 must be [U={U}, R={R}, d={d}] like m1, got {tuple(m2.shape)}")
    if tuple(m3.shape) != (U, d, R):
        err(f"m3 must be [U={U}, d={d}, R={R}], got {tuple(m3.shape)}")
    if block_of_row.dim() != 1 or block_of_row.shape[0] != B:
        err(f"block_of_row must be [B={B}], got {tuple(block_of_row.shape)}")
    if block_of_row.dtype.is_floating_point or block_of_row.dtype.is_complex or block_of_row.dtype == torch.bool:
        raise TypeError(f"memory_ffn: block_of_row must be an integer tensor (int64), got {block_of_row.dtype}")
    if R == 0 or B == 0:
        return  # block indices are not used
    if U == 0:
        err("m1/m2/m3 hold no block (U=0) but R > 0")
    if torch.compiler.is_compiling():
        return
    if block_of_row.device.type == "cpu":
        lo, hi = int(block_of_row.min()), int(block_of_row.max())
        if lo < 0 or hi >= U:
            err(f"block_of_row values must be in [0, U={U}), got min {lo}, max {hi}")
    else:  # no host sync on GPU: a device-side assert instead of silently reading another block
        torch._assert_async(((block_of_row >= 0) & (block_of_row < U)).all(), "memory_ffn: block_of_row out of range")


# --------------------------------------------------------------------------------------------
# the custom ops


@torch.library.custom_op("memlm::memory_ffn", mutates_args=())
def memory_ffn_op(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, m1: Tensor, m2: Tensor, m3: Tensor, block_of_row: Tensor
) -> Tensor:
    if _triton_runs_here(x):
        from . import triton_launch  # lazy: only the Triton path imports triton

        return triton_launch.forward(x, w1, w2, w3, m1, m2, m3, block_of_row)
    with torch.no_grad():
        return memory_ffn_reference(x, w1, w2, w3, m1, m2, m3, block_of_row).contiguous()


@memory_ffn_op.register_fake
def _memory_ffn_fake(x, w1, w2, w3, m1, m2, m3, block_of_row):
    return x.new_empty(x.shape)


@torch.library.custom_op("memlm::memory_ffn_backward", mutates_args=())
def memory_ffn_backward_op(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, m1: Tensor, m2: Tensor, m3: Tensor,
    block_of_row: Tensor, need_dx: bool, need_dw: bool, need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dw1, dw2, dw3, dm1, dm2, dm3); empty [0] tensors for the ones not needed."""
    if _triton_runs_here(x):
        from . import triton_launch

        grads = triton_launch.backward(dy, x, w1, w2, w3, m1, m2, m3, block_of_row, need_dx, need_dw, need_dm)
    else:
        grads = memory_ffn_reference_backward(dy, x, w1, w2, w3, m1, m2, m3, block_of_row)
    needed = (need_dx, need_dw, need_dw, need_dw, need_dm, need_dm, need_dm)
    return tuple(g.contiguous() if n else x.new_empty(0) for g, n in zip(grads, needed))


@memory_ffn_backward_op.register_fake
def _memory_ffn_backward_fake(dy, x, w1, w2, w3, m1, m2, m3, block_of_row, need_dx, need_dw, need_dm):
    needed = (need_dx, need_dw, need_dw, need_dw, need_dm, need_dm, need_dm)
    like = (x, w1, w2, w3, m1, m2, m3)
    return tuple(t.new_empty(t.shape) if n else x.new_empty(0) for t, n in zip(like, needed))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # inputs only: the backward kernel recomputes the activations


def _backward(ctx, dy):
    x, w1, w2, w3, m1, m2, m3, block_of_row = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dw, need_dm = bool(need[0]), any(need[1:4]), any(need[4:7])
    grads = torch.ops.memlm.memory_ffn_backward(
        dy, x, w1, w2, w3, m1, m2, m3, block_of_row, need_dx, need_dw, need_dm)
    return tuple(g if n else None for g, n in zip(grads, need[:7])) + (None,)


memory_ffn_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# the dispatch (what model/ and memory/ call)


def memory_ffn(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, m1: Tensor, m2: Tensor, m3: Tensor, block_of_row: Tensor
) -> Tensor:
    """y[b] = w3 @ (silu(w1 x) * (w2 x)) + m3[k] @ (silu(m1[k] x) * (m2[k] x)), k = block_of_row[b].

    x [B,T,d]; w1, w2 [F,d]; w3 [d,F]; m1, m2 [U,R,d]; m3 [U,d,R] (R may be 0); block_of_row int [B].
    The backend follows MEMLM_KERNELS (see the module docstring). On the Triton path, weights are
    cast to x's dtype (to the autocast dtype under autocast), which autograd undoes for gradients.
    """
    _validate(x, w1, w2, w3, m1, m2, m3, block_of_row)
    name = backend()
    use_triton = name == "triton" or (name == "auto" and x.is_cuda and x.dtype in _TRITON_DTYPES)
    if not use_triton:
        return memory_ffn_reference(x, w1, w2, w3, m1, m2, m3, block_of_row)
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(
            "MEMLM_KERNELS=triton: the tensors are on CPU; the Triton kernels need CUDA, or set "
            "TRITON_INTERPRET=1 (before anything imports triton kernels) to run them in the interpreter"
        )
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"MEMLM_KERNELS=triton: dtype {dtype} unsupported (float32, float16, bfloat16)")
    x, w1, w2, w3, m1, m2, m3 = (t.to(dtype) for t in (x, w1, w2, w3, m1, m2, m3))
    return torch.ops.memlm.memory_ffn(x, w1, w2, w3, m1, m2, m3, block_of_row.long())

"""The Triton memory-FFN kernels under the Triton interpreter (CPU), against the fp64 reference.

TRITON_INTERPRET is set per test (monkeypatch) rather than for the whole process: the kernels read
it when they are first launched in a mode (they are jitted lazily, one cache per mode), so it does
not matter whether `kernels` was imported earlier, and GPU tests in the same process stay compiled.
"""
from __future__ import annotations

import random

import pytest
import torch

import kernels
from kernels.memory_ffn import triton_launch as tk
from kernels.memory_ffn.testing import NAMES, make_inputs, reference_fp64, rel_err

pytestmark = pytest.mark.interpret

# One tolerance per dtype: max |out - ref| / max |ref| for y and every gradient.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}  # measured worst: 5e-7, 7e-4

# Small tiles so that loops over several tiles (and segment chunks) are exercised on tiny shapes.
SMALL = tk.Blocks(hid_t=16, hid_h=16, hid_d=16, hid_warps=4, bwd_t=16, bwd_h=16, bwd_d=16, bwd_warps=4,
                  out_t=16, out_d=16, out_k=16, out_warps=4, seg_p=16, seg_q=16, seg_t=16, seg_warps=4,
                  seg_programs=64, stages=1)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MEMLM_KERNELS", "triton")


def _cases():
    """(B, T, d, F, R, U, block_of_row, small_tiles): hand-picked corners, then seeded random ones."""
    cases = [
        (1, 1, 16, 16, 16, 1, [0], False),  # one token
        (1, 7, 13, 21, 0, 1, [0], False),  # R = 0: plain anchor FFN
        (3, 5, 9, 11, 0, 2, [1, 0, 1], False),  # R = 0 with several blocks
        (1, 40, 12, 20, 9, 1, [0], True),  # one row, several token tiles
        (6, 3, 12, 10, 5, 2, [0, 0, 1, 1, 0, 1], False),  # rows share blocks
        (5, 4, 17, 19, 7, 5, [4, 3, 2, 1, 0], False),  # all rows distinct
        (4, 6, 10, 14, 6, 7, [6, 6, 0, 6], False),  # unused blocks (their grads must be 0)
        (9, 2, 8, 9, 3, 3, [2, 0, 1, 2, 2, 0, 1, 1, 2], False),  # many short rows
        (2, 17, 18, 19, 17, 2, [1, 0], True),  # every dim just past a tile multiple
        (3, 11, 20, 34, 17, 2, [1, 1, 1], True),  # one shared block, segment split in chunks
        (2, 9, 16, 32, 1, 3, [2, 1], False),  # R = 1
        (2, 5, 5, 1, 4, 2, [0, 1], False),  # F = 1
    ]
    rng = random.Random(1234)
    while len(cases) < 30:
        B, T = rng.randint(1, 5), rng.randint(1, 24)
        d, F = rng.randint(3, 40), rng.randint(1, 48)
        R, U = rng.choice([0, 1, rng.randint(2, 40)]), rng.randint(1, 4)
        cases.append((B, T, d, F, R, U, [rng.randrange(U) for _ in range(B)], rng.random() < 0.25))
    return cases


CASES = _cases()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_forward_backward_matches_fp64_reference(case, dtype):
    B, T, d, F, R, U, bor, small = case
    inputs, dy = make_inputs(B, T, d, F, R, U, bor, dtype=dtype, seed=sum(map(ord, repr(case))))
    y_ref, g_ref = reference_fp64(inputs, dy)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
    with tk.use_blocks(SMALL if small else None, poison=True):  # NaN-filled outputs: unwritten -> fail
        y = kernels.memory_ffn(*leaves, inputs[7])
        assert y.dtype == dtype and y.shape == (B, T, d)
        grads = torch.autograd.grad(y, leaves, dy)
    errors = {"y": rel_err(y, y_ref)}
    errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip(NAMES, grads, g_ref)})
    for g, leaf in zip(grads, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"errors above {TOL[dtype]} for {case} {dtype}: {bad}"


def test_unused_blocks_get_exact_zero_gradient():
    inputs, dy = make_inputs(3, 5, 12, 10, 6, 4, [0, 2, 0])
    leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
    with tk.use_blocks(poison=True):
        y = kernels.memory_ffn(*leaves, inputs[7])
        grads = torch.autograd.grad(y, leaves, dy)
    for g in grads[4:]:
        assert torch.all(g[[1, 3]] == 0)
        assert g[[0, 2]].abs().sum() > 0


def test_only_some_inputs_require_grad():
    """Memory-only training (frozen anchor): weight grads are skipped, the others still match."""
    inputs, dy = make_inputs(2, 6, 10, 12, 5, 2, [1, 0])
    _, g_ref = reference_fp64(inputs, dy)
    x, w1, w2, w3, m1, m2, m3, bor = inputs
    m = [t.clone().requires_grad_(True) for t in (m1, m2, m3)]
    x = x.clone().requires_grad_(True)
    y = kernels.memory_ffn(x, w1, w2, w3, *m, bor)
    grads = torch.autograd.grad(y, [x, *m], dy)
    for g, r in zip(grads, [g_ref[0], *g_ref[4:]]):
        assert rel_err(g, r) <= TOL[torch.float32]


def test_deterministic():
    inputs, dy = make_inputs(6, 9, 14, 18, 10, 3, [2, 0, 2, 1, 2, 2])
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
        with tk.use_blocks(SMALL):
            y = kernels.memory_ffn(*leaves, inputs[7])
            runs.append([y, *torch.autograd.grad(y, leaves, dy)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_training_steps_match_reference(monkeypatch):
    """Three SGD steps with every parameter trained: same losses with triton and reference."""
    inputs, _ = make_inputs(4, 8, 12, 16, 6, 3, [0, 2, 2, 1], seed=7)
    target = torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(3))

    def train(backend):
        monkeypatch.setenv("MEMLM_KERNELS", backend)
        params = [t.clone().requires_grad_(True) for t in inputs[1:7]]
        opt = torch.optim.SGD(params, lr=0.5)
        losses = []
        for _ in range(3):
            y = kernels.memory_ffn(inputs[0], *params, inputs[7])
            loss = torch.nn.functional.mse_loss(y, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref, tri = train("reference"), train("triton")
    assert ref[0] > ref[-1]  # the steps do something
    torch.testing.assert_close(torch.tensor(tri), torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_opcheck():
    """torch.library checks of the registered op (schema, fake tensor, autograd registration)."""
    inputs, _ = make_inputs(2, 3, 8, 6, 4, 2, [1, 0])
    args = tuple(t.clone().requires_grad_(t.is_floating_point()) for t in inputs)
    torch.library.opcheck(torch.ops.memlm.memory_ffn.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    inputs, _ = make_inputs(1, 2, 4, 4, 2, 1, [0])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.memory_ffn(*inputs)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.forward(*inputs)



@pytest.mark.slow
def test_torch_compile_fullgraph_with_interpreted_op():
    """torch.compile sees the op as one node (fake impl + autograd formula); ~1-2 min of compiling on CPU."""
    inputs, dy = make_inputs(2, 8, 16, 24, 8, 3, [2, 0])

    def block(x, w1, w2, w3, m1, m2, m3, bor):
        return kernels.memory_ffn(torch.nn.functional.rms_norm(x, (x.shape[-1],)), w1, w2, w3, m1, m2, m3, bor) + x

    outs = []
    for fn in (torch.compile(block, fullgraph=True), block):
        leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
        y = fn(*leaves, inputs[7])
        outs.append([y, *torch.autograd.grad(y, leaves, dy)])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-5

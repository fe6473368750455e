"""The Triton memory-FFN kernels on a CUDA GPU: bf16 at real sizes, determinism, torch.compile."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.memory_ffn.testing import NAMES, make_inputs, reference_fp64, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _compiled_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # real kernels, even if another test set it
    monkeypatch.setenv("MEMLM_KERNELS", "triton")


def _run(inputs, dy):
    leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
    y = kernels.memory_ffn(*leaves, inputs[7])
    return [y, *torch.autograd.grad(y, leaves, dy)]


def _check(outs, inputs, dy, dtype):
    y_ref, g_ref = reference_fp64(inputs, dy)
    errors = {n: rel_err(o, r) for n, o, r in zip(("y", *("d" + n for n in NAMES)), outs, [y_ref, *g_ref])}
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"errors above {TOL[dtype]} ({dtype}): {bad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape",
    [
        (4, 1024, 512, 2048, 336, 3),  # 160M-like FFN, rows sharing 3 blocks
        (2, 777, 1024, 2816, 672, 2),  # 410M-like, T not a tile multiple
        (8, 100, 200, 300, 40, 8),  # all rows distinct, odd sizes
        (3, 129, 96, 160, 0, 1),  # R = 0
    ],
)
def test_matches_reference(shape, dtype):
    inputs, dy = make_inputs(*shape, dtype=dtype, device="cuda")
    _check(_run(inputs, dy), inputs, dy, dtype)


def test_deterministic_bitwise():
    inputs, dy = make_inputs(16, 512, 512, 2048, 336, 3, dtype=torch.bfloat16, device="cuda")
    a, b = _run(inputs, dy), _run(inputs, dy)
    for name, u, v in zip(("y", *NAMES), a, b):
        assert torch.equal(u, v), f"{name} differs between two identical runs"


def test_auto_uses_triton_on_cuda(monkeypatch):
    monkeypatch.setenv("MEMLM_KERNELS", "auto")
    inputs, dy = make_inputs(2, 64, 64, 96, 32, 2, dtype=torch.bfloat16, device="cuda")
    _check(_run(inputs, dy), inputs, dy, torch.bfloat16)


def test_torch_compile():
    inputs, dy = make_inputs(4, 256, 256, 512, 96, 3, dtype=torch.bfloat16, device="cuda")

    def block(x, w1, w2, w3, m1, m2, m3, bor):
        return kernels.memory_ffn(torch.nn.functional.rms_norm(x, (x.shape[-1],)), w1, w2, w3, m1, m2, m3, bor) + x

    compiled = torch.compile(block, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
    y = compiled(*leaves, inputs[7])
    grads = torch.autograd.grad(y, leaves, dy)
    leaves_e = [t.clone().requires_grad_(True) for t in inputs[:7]]
    y_e = block(*leaves_e, inputs[7])
    grads_e = torch.autograd.grad(y_e, leaves_e, dy)
    for o, e in zip([y, *grads], [y_e, *grads_e]):
        assert rel_err(o, e) < 2e-2

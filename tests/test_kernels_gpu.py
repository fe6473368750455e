"""The Triton memory-FFN kernels on a CUDA GPU: forward and backward against a float64 reference at the
paper's 160M and 410M FFN shapes and odd shapes, with 1, 16 and all-distinct memory paths, in fp32, fp16
and bf16; bitwise determinism of the block gradients; the `auto` dispatch; torch.compile.

Tolerances (max |out - ref| / max |ref| per tensor, reference in float64 from the same rounded inputs):
fp32 1e-5 (IEEE dots, fp32 accumulation), fp16 5e-3, bf16 3e-2 (inputs and outputs rounded to 8 bits of
mantissa, fp32 accumulation). With MEMLM_GPU_ERRORS=<file>, every case appends its errors there (JSON
lines; scripts/gpu_check.py puts them in its summary).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import kernels
from kernels.memory_ffn.reference import memory_ffn_reference
from kernels.memory_ffn.testing import NAMES, make_inputs, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODEL = {"160M": (512, 2048, 336), "410M": (1024, 2816, 672)}  # d, F, R (R = sum of the memory widths)
# rows B, tokens per row T, distinct blocks U ("all": one block per row)
PATHS = {"1": (8, 256, 1), "16": (32, 128, 16), "all": (16, 256, 16)}
ODD = [
    (3, 77, 200, 300, 40, 3),  # nothing a tile multiple, rows on distinct blocks
    (5, 129, 96, 160, 24, 2),  # T one past a tile
    (7, 33, 64, 96, 17, 7),  # R odd, all distinct
    (3, 129, 96, 160, 0, 1),  # R = 0: the plain anchor FFN
]


@pytest.fixture(autouse=True)
def _compiled_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # real kernels, even if another test set it
    monkeypatch.setenv("MEMLM_KERNELS", "triton")


def _run(inputs, dy):
    leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
    y = kernels.memory_ffn(*leaves, inputs[7])
    return [y, *_grads(y, leaves, dy)]


def _grads(y, leaves, dy):
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)  # R = 0: the reference skips the blocks
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _reference_fp64(inputs, dy):
    """(y, grads) of the reference in float64 on the GPU, from the already rounded inputs."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs[:7]]
    y = memory_ffn_reference(*leaves, inputs[7])
    return [y.detach(), *_grads(y, leaves, dy.double())]


def _record(case: str, dtype, errors: dict) -> None:
    path = os.environ.get("MEMLM_GPU_ERRORS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "dtype": str(dtype).replace("torch.", ""), "errors": errors,
                                "max_rel_err": max(errors.values())}) + "\n")


def _check(case, inputs, dy, dtype):
    outs, refs = _run(inputs, dy), _reference_fp64(inputs, dy)
    errors = {n: rel_err(o, r) for n, o, r in zip(("y", *("d" + n for n in NAMES)), outs, refs)}
    _record(case, dtype, errors)
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"{case}: errors above {TOL[dtype]} ({dtype}): {bad}"


def _paths_inputs(model, paths, dtype, seed=0):
    d, F, R = MODEL[model]
    B, T, U = PATHS[paths]
    bor = torch.arange(B) if paths == "all" else torch.arange(B) % U
    return make_inputs(B, T, d, F, R, U, block_of_row=bor, dtype=dtype, device="cuda", seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paths", list(PATHS))
@pytest.mark.parametrize("model", list(MODEL))
def test_model_shapes_match_fp64_reference(model, paths, dtype):
    inputs, dy = _paths_inputs(model, paths, dtype)
    _check(f"{model} paths={paths}", inputs, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes_match_fp64_reference(shape, dtype):
    inputs, dy = make_inputs(*shape, dtype=dtype, device="cuda")
    _check("odd " + "x".join(map(str, shape)), inputs, dy, dtype)


@pytest.mark.parametrize("paths", ["1", "16", "all"])
def test_block_gradients_deterministic_bitwise(paths):
    """Two identical runs give bit-identical outputs and gradients (the block gradients are segment sums
    in a fixed order, no atomics), with 1 block for all rows, blocks shared by two rows, or all distinct."""
    inputs, dy = _paths_inputs("160M", paths, torch.bfloat16, seed=1)
    a, b = _run(inputs, dy), _run(inputs, dy)
    for name, u, v in zip(("y", *NAMES), a, b):
        assert torch.equal(u, v), f"paths={paths}: {name} differs between two identical runs"


def test_auto_uses_triton_on_cuda(monkeypatch):
    monkeypatch.setenv("MEMLM_KERNELS", "auto")
    inputs, dy = make_inputs(2, 64, 64, 96, 32, 2, dtype=torch.bfloat16, device="cuda")
    _check("auto dispatch", inputs, dy, torch.bfloat16)


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

"""The memory-FFN reference (the spec) and the dispatch/validation around it; CPU only, fast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.memory_ffn import memory_ffn_op
from kernels.memory_ffn.testing import make_inputs, reference_fp64, rel_err


def naive(x, w1, w2, w3, m1, m2, m3, block_of_row):
    """Token by token in float64, straight from the formula."""
    B, T, d = x.shape
    y = torch.zeros(B, T, d, dtype=torch.float64)
    for b in range(B):
        k = int(block_of_row[b])
        for t in range(T):
            v = x[b, t].double()
            y[b, t] = w3.double() @ (F.silu(w1.double() @ v) * (w2.double() @ v))
            if m1.shape[1]:
                y[b, t] += m3[k].double() @ (F.silu(m1[k].double() @ v) * (m2[k].double() @ v))
    return y


@pytest.fixture(autouse=True)
def _cpu_reference(monkeypatch):
    monkeypatch.delenv("MEMLM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("shape", [(3, 4, 6, 5, 3, 2), (1, 1, 4, 3, 0, 1), (4, 2, 5, 7, 2, 4), (2, 3, 3, 2, 5, 3)])
def test_reference_matches_naive_loop(shape):
    inputs, _ = make_inputs(*shape, dtype=torch.float64)
    y = kernels.memory_ffn_reference(*inputs)
    torch.testing.assert_close(y, naive(*inputs), rtol=1e-12, atol=1e-12)
    assert kernels.memory_ffn(*inputs).equal(y)  # auto on CPU = the reference


def test_reference_gradcheck():
    inputs, _ = make_inputs(3, 2, 4, 3, 2, 2, [1, 0, 1], dtype=torch.float64)
    leaves = tuple(t.clone().requires_grad_(True) for t in inputs[:7])
    assert torch.autograd.gradcheck(lambda *a: kernels.memory_ffn_reference(*a, inputs[7]), leaves)


def test_registered_op_gradcheck_cpu_fallback():
    """The custom op on CPU without the interpreter runs the reference; its autograd formula is right."""
    inputs, _ = make_inputs(3, 2, 4, 3, 2, 2, [1, 0, 1], dtype=torch.float64)
    leaves = tuple(t.clone().requires_grad_(True) for t in inputs[:7])
    assert torch.autograd.gradcheck(lambda *a: memory_ffn_op(*a, inputs[7]), leaves)


def test_registered_op_partial_grads_and_opcheck():
    inputs, dy = make_inputs(2, 3, 5, 4, 3, 2, [1, 1])
    _, g_ref = reference_fp64(inputs, dy)
    m = [t.clone().requires_grad_(True) for t in inputs[4:7]]
    y = memory_ffn_op(*inputs[:4], *m, inputs[7])
    for g, r in zip(torch.autograd.grad(y, m, dy), g_ref[4:]):
        assert rel_err(g, r) < 1e-5
    args = tuple(t.clone().requires_grad_(t.is_floating_point()) for t in inputs)
    torch.library.opcheck(torch.ops.memlm.memory_ffn.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_r0_is_the_plain_ffn_and_blocks_are_shared():
    inputs, _ = make_inputs(2, 3, 4, 5, 0, 1, [0, 0])
    x, w1, w2, w3 = inputs[:4]
    torch.testing.assert_close(kernels.memory_ffn(*inputs), F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w2), w3))
    # two rows with the same block and the same tokens give the same output
    inputs, _ = make_inputs(2, 3, 4, 5, 2, 3, [2, 2])
    x = inputs[0].clone()
    x[1] = x[0]
    y = kernels.memory_ffn(x, *inputs[1:])
    torch.testing.assert_close(y[0], y[1])


def test_backend_env(monkeypatch):
    assert kernels.backend() == "auto"
    monkeypatch.setenv("MEMLM_KERNELS", "Reference")
    assert kernels.backend() == "reference"
    monkeypatch.setenv("MEMLM_KERNELS", "cuda")
    inputs, _ = make_inputs(1, 2, 4, 4, 2, 1, [0])
    with pytest.raises(ValueError, match="MEMLM_KERNELS"):
        kernels.memory_ffn(*inputs)
    monkeypatch.setenv("MEMLM_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.memory_ffn(*inputs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(block_of_row=torch.tensor([0, 2])), ValueError, r"block_of_row values must be in \[0, U=2\)"),
        (dict(block_of_row=torch.tensor([0, -1])), ValueError, "block_of_row values"),
        (dict(block_of_row=torch.tensor([0])), ValueError, r"block_of_row must be \[B=2\]"),
        (dict(block_of_row=torch.tensor([0.0, 1.0])), TypeError, "integer"),
        (dict(x=torch.zeros(2, 3, 5)), ValueError, r"w1 must be \[F, d=5\]"),
        (dict(x=torch.zeros(6, 4)), ValueError, r"x must be \[B, T, d\]"),
        (dict(w2=torch.zeros(4, 4)), ValueError, "w2 must be"),
        (dict(w3=torch.zeros(5, 4)), ValueError, "w3 must be"),
        (dict(m1=torch.zeros(2, 3, 5)), ValueError, "m1 must be"),
        (dict(m2=torch.zeros(2, 2, 4)), ValueError, "m2 must be"),
        (dict(m3=torch.zeros(2, 3, 4)), ValueError, "m3 must be"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    ],
)
def test_validation_errors(change, error, match):
    inputs, _ = make_inputs(2, 3, 4, 5, 3, 2, [0, 1])
    args = dict(zip(("x", "w1", "w2", "w3", "m1", "m2", "m3", "block_of_row"), inputs))
    args.update(change)
    with pytest.raises(error, match=match):
        kernels.memory_ffn(**args)


def test_kernels_package_is_the_repository_one():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.abspath(kernels.__file__).startswith(os.path.join(root, "kernels"))


def test_bench_kernels_on_cpu(tmp_path, capsys):
    import csv

    from scripts import bench_kernels

    if torch.cuda.is_available():
        pytest.skip("the CPU behaviour of the benchmark")
    assert bench_kernels.main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    out = tmp_path / "bench.csv"
    assert bench_kernels.main(["--cpu-reference", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["provider"].startswith("reference-eager (CPU") for r in rows)
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    # its own earlier CSV is replaced (every row carries the columns that recognise it); any other file is not
    assert set(bench_kernels.CSV_COLUMNS) <= set(rows[0])
    assert bench_kernels.main(["--cpu-reference", "--out", str(out)]) == 0

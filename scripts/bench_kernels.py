"""`memlm bench-kernels`: benchmark the fused memory-FFN op against the PyTorch reference.

On a CUDA GPU: triton.testing.do_bench medians of forward, backward and forward+backward for the
providers reference-eager, reference-compile (torch.compile of the reference: the honest baseline)
and triton, over the paper's 160M and 410M FFN shapes, several tokens per step and numbers of
distinct memory paths. Prints a table and writes CSV with TFLOP/s, GB/s, % of the bf16 dense-GEMM
rate measured in the same run (torch.matmul), the device name and versions.
Without a GPU it says so; `--cpu-reference` then times the reference only, on tiny CPU shapes.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python scripts/bench_kernels.py` as well as `memlm bench-kernels`
    sys.path.insert(0, ROOT)

from train.cli import ArgumentParser, number, positive_int  # noqa: E402
from train.config import BENCH_TOKENS  # noqa: E402

SHAPES = {  # name: (d, F, R) — R = sum of the per-level memory widths of the paper's configs
    "160M": (512, 2048, 336),
    "410M": (1024, 2816, 672),
}
CPU_SHAPES = {"tiny": (64, 128, 32)}
PROVIDERS = ("reference-eager", "reference-compile", "triton")
PASSES = ("fwd", "bwd", "fwd+bwd")
CSV_COLUMNS = ("shape", "d", "F", "R", "tokens")  # in every row: how an earlier bench-kernels CSV is recognised


def _paths(text: str) -> str:
    """--paths entry: 'all' or an integer >= 1 (kept as text: it labels the CSV rows)."""
    if text != "all":
        try:
            positive_int(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be 'all' or an integer >= 1, got {text!r}") from None
    return text


def parse_args(argv):
    from model.atomic import check_output_file

    p = ArgumentParser(prog="memlm bench-kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE",
                   help=f"model shapes to run (of {', '.join(SHAPES)})")
    p.add_argument("--tokens", nargs="+", type=number(int, 1, BENCH_TOKENS), default=[16384, 32768, 65536], help="tokens per step (B*T)")
    p.add_argument("--seq-len", type=number(int, 1, BENCH_TOKENS), default=2048, help="T, tokens per row; B = tokens // T")
    p.add_argument("--paths", nargs="+", type=_paths, default=["1", "16", "all"],
                   help="distinct memory blocks per step: integers >= 1, or 'all' (one block per row)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS, help="what to time")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of all tensors")
    p.add_argument("--warmup", type=number(int, 1, 600_000), default=25, help="do_bench warm-up time in ms")
    p.add_argument("--rep", type=number(int, 1, 600_000), default=100, help="do_bench measurement time in ms")
    p.add_argument("--out", default=None,
                   help="CSV file to write (default runs/bench-kernels/memory_ffn-<dtype>.csv, "
                        "or memory_ffn-cpu-reference.csv with --cpu-reference); an existing file is replaced only "
                        "if it is an earlier bench-kernels CSV")
    p.add_argument("--quick", action="store_true", help="only 16k tokens and paths 1 and all (a smoke run)")
    p.add_argument("--cpu-reference", action="store_true",
                   help="without a GPU: time the PyTorch reference only, on tiny CPU shapes (labelled as such)")
    args = p.parse_args(argv)
    default = "runs/bench-kernels/memory_ffn-" + ("cpu-reference" if args.cpu_reference else args.dtype) + ".csv"
    args.out = args.out or default
    check_output_file(args.out, "--out", CSV_COLUMNS, "memlm bench-kernels")  # an earlier result is replaced
    return args


def flops(N, d, H):
    """Algorithmic FLOPs of one SwiGLU FFN of width H over N tokens: 3 GEMMs forward, 6 backward."""
    fwd = 3 * 2 * N * d * H
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}


def min_bytes(N, d, F, R, U, elt):
    """Bytes each pass must at least move: activations in/out and the weights it touches (once)."""
    w = (3 * F * d + 3 * U * R * d) * elt
    act = N * d * elt
    fwd = 2 * act + w  # x in, y out, weights
    bwd = 3 * act + 2 * w  # x, dy in, dx out; weights in, their grads out
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd - act - w}


def block_of_rows(B, paths, torch, device):
    if paths == "all":
        return torch.arange(B, device=device), B
    U = int(paths)
    return torch.arange(B, device=device) % U, U


def make(torch, B, T, d, F, R, U, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, fan_in):
        return (torch.randn(*shape, generator=g, device=device) / math.sqrt(fan_in)).to(dtype).requires_grad_(True)

    x = rnd(B, T, d, fan_in=1)
    ws = [rnd(F, d, fan_in=d), rnd(F, d, fan_in=d), rnd(d, F, fan_in=F + R)]
    ms = [rnd(U, R, d, fan_in=d), rnd(U, R, d, fan_in=d), rnd(U, d, R, fan_in=F + R)]
    dy = torch.randn(B, T, d, generator=g, device=device).to(dtype)
    return [x, *ws, *ms], dy


def _median_ms(do_bench, fn, warmup, rep):
    out = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
    return float(out[0] if isinstance(out, (list, tuple)) else out)


def gemm_tflops(torch, do_bench, warmup, rep):
    """Dense bf16 GEMM rate of this device, measured now (8192^3 torch.matmul)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(do_bench, lambda: torch.matmul(a, b), warmup, rep)
    del a, b
    return 2 * n**3 / ms / 1e9


def time_provider(fn, inputs, dy, bench, torch):
    """{pass: ms} for forward (with autograd graph), backward only, forward+backward."""
    out = {}
    out["fwd"] = bench(lambda: fn(*inputs))
    y = fn(*inputs)
    leaves = [t for t in inputs if t.is_floating_point()]
    out["bwd"] = bench(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True))
    del y
    out["fwd+bwd"] = bench(lambda: torch.autograd.grad(fn(*inputs), leaves, dy))
    return out


def print_table(rows):
    cols = ["shape", "tokens", "paths", "provider", "pass", "ms", "tflops", "gbps", "pct_gemm", "speedup", "note"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def write_csv(rows, path):
    from model.atomic import atomic_path

    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows)")


def run_cpu_reference(args, torch):
    from kernels.memory_ffn.reference import memory_ffn_reference

    print("memlm bench-kernels: no CUDA GPU; timing the PyTorch reference only, on tiny CPU shapes "
          "(these numbers say nothing about the Triton kernels).")
    rows = []
    for name, (d, F, R) in CPU_SHAPES.items():
        for tokens in (256, 1024):
            T = min(args.seq_len, 128, tokens)
            B = max(1, tokens // T)
            bor, U = block_of_rows(B, "all", torch, "cpu")
            inputs, dy = make(torch, B, T, d, F, R, U, torch.float32, "cpu")
            args_ = [*inputs, bor]

            def bench(fn, n=5):
                fn()
                ts = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t0) * 1e3)
                return statistics.median(ts)

            ms = time_provider(memory_ffn_reference, args_, dy, bench, torch)
            fl = flops(B * T, d, F + R)
            for p in PASSES:
                rows.append(dict(device="cpu", shape=name, d=d, F=F, R=R, tokens=B * T, B=B, T=T, paths="all", U=U,
                                 provider="reference-eager (CPU, tiny shapes)", dtype="fp32", **{"pass": p},
                                 ms=f"{ms[p]:.3f}", tflops=f"{fl[p] / ms[p] / 1e9:.4f}", gbps="", pct_gemm="",
                                 speedup="", note="cpu-reference", torch=torch.__version__,
                                 python=platform.python_version()))
    print_table(rows)
    write_csv(rows, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():
        if args.cpu_reference:
            return run_cpu_reference(args, torch)
        print("memlm bench-kernels: this benchmark needs a CUDA GPU and none was found. "
              "(Use --cpu-reference to time only the PyTorch reference on tiny CPU shapes.)", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("memlm bench-kernels: unset TRITON_INTERPRET to benchmark compiled kernels", file=sys.stderr)
        return 1
    import triton
    from triton.testing import do_bench

    from kernels.memory_ffn.op import memory_ffn_op
    from kernels.memory_ffn.reference import memory_ffn_reference
    from kernels.memory_ffn.testing import rel_err

    if args.quick:
        args.tokens, args.paths = [16384], ["1", "all"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs compare like with like (ieee)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)

    dev = torch.cuda.get_device_name()
    meta = dict(device=dev, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), dtype=args.dtype)
    bench = lambda fn: _median_ms(do_bench, fn, args.warmup, args.rep)  # noqa: E731
    gemm = gemm_tflops(torch, do_bench, args.warmup, args.rep)
    print(f"device {dev} | torch {torch.__version__} | triton {triton.__version__} | "
          f"dense bf16 GEMM (8192^3 torch.matmul): {gemm:.1f} TFLOP/s")

    fns = {
        "reference-eager": memory_ffn_reference,
        "reference-compile": torch.compile(memory_ffn_reference),
        "triton": memory_ffn_op,  # the registered op (autograd included), no dispatch overhead
    }
    rows = []
    for shape in args.shapes:
        d, F, R = SHAPES[shape]
        for tokens in args.tokens:
            T = min(args.seq_len, tokens)
            B = max(1, tokens // T)
            for paths in args.paths:
                bor, U = block_of_rows(B, paths, torch, "cuda")
                try:
                    inputs, dy = make(torch, B, T, d, F, R, U, dtype, "cuda")
                except torch.cuda.OutOfMemoryError:
                    print(f"skip {shape} tokens={B * T} paths={paths}: out of memory allocating inputs")
                    continue
                args_ = [*inputs, bor]
                fl, by = flops(B * T, d, F + R), min_bytes(B * T, d, F, R, U, elt)
                note = ""
                if "triton" in args.providers:  # correctness of this exact configuration first
                    with torch.no_grad():
                        err = rel_err(memory_ffn_op(*args_), memory_ffn_reference(*args_))
                    note = f"y rel err vs eager {err:.1e}"
                results = {}
                for prov in args.providers:
                    try:
                        results[prov] = time_provider(fns[prov], args_, dy, bench, torch)
                    except Exception as e:  # keep going: one failure must not lose the whole sweep
                        results[prov] = None
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                        print(f"{shape} tokens={B * T} paths={paths} {prov}: FAILED {msg}")
                        if not isinstance(e, torch.cuda.OutOfMemoryError):
                            traceback.print_exc(limit=3)
                        rows.append(dict(shape=shape, d=d, F=F, R=R, tokens=B * T, B=B, T=T, paths=paths, U=U,
                                         provider=prov, **{"pass": "all"}, ms="", note=f"FAILED {msg}", **meta))
                    torch.cuda.empty_cache()
                base = results.get("reference-compile")
                for prov, ms in results.items():
                    if ms is None:
                        continue
                    for p in PASSES:
                        tf = fl[p] / ms[p] / 1e9
                        rows.append(dict(
                            shape=shape, d=d, F=F, R=R, tokens=B * T, B=B, T=T, paths=paths, U=U, provider=prov,
                            **{"pass": p}, ms=f"{ms[p]:.3f}", tflops=f"{tf:.1f}", gbps=f"{by[p] / ms[p] / 1e6:.0f}",
                            pct_gemm=f"{100 * tf / gemm:.0f}",
                            speedup=f"{base[p] / ms[p]:.2f}" if base else "",
                            note=note if prov == "triton" else "", gemm_tflops=f"{gemm:.1f}", **meta))
                del inputs, dy, args_
                torch.cuda.empty_cache()
    print("\nspeedup = reference-compile ms / provider ms; pct_gemm = TFLOP/s as % of the dense bf16 GEMM rate; "
          "GB/s counts the minimal traffic (activations in/out + weights and their grads once)")
    print_table(rows)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm bench-kernels", main))

"""Anchor forward+backward throughput on this machine, next to a plain fp32 matmul (the practical peak).

    .venv/bin/python scripts/bench_model.py                 # tiny (8x256) and 160m (1x256)
    .venv/bin/python scripts/bench_model.py --presets small --batch 4 --seq 512

Achieved GFLOP/s = Anchor.flops_per_token(seq) * tokens/s (6N + attention term, see model/model.py);
MFU = achieved / matmul GFLOP/s measured in the same run.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def matmul_gflops(n: int = 2048, iters: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e9


def bench_preset(name: str, batch: int, seq: int, iters: int, warmup: int = 1) -> dict:
    import torch

    from model import Anchor, ModelConfig

    torch.manual_seed(0)
    model = Anchor(ModelConfig.from_name(name, max_seq_len=max(seq, 256)))
    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    y = x.roll(-1, dims=1)

    def step():
        loss = model.loss(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    dt = (time.perf_counter() - t) / iters
    tok_s = batch * seq / dt
    return {"preset": name, "params": model.num_params(), "shape": f"{batch}x{seq}", "tok_s": tok_s,
            "gflops": model.flops_per_token(seq) * tok_s / 1e9, "step_s": dt}


def main(argv=None) -> int:
    from model.config import presets
    from model.errors import ConfigError
    from train.cli import ArgumentParser, number
    from train.config import BENCH_BATCH, BENCH_SEQ, BENCH_STEPS, BENCH_THREADS, BENCH_TOKENS

    p = ArgumentParser(prog="bench_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "160m"], choices=list(presets), metavar="PRESET",
                   help=f"model presets to benchmark (of {', '.join(presets)})")
    p.add_argument("--batch", type=number(int, 1, BENCH_BATCH), nargs="+", default=None,
                   help="batch size per preset, or one for all (default: 8 for tiny/tiny-2x/small, else 1)")
    p.add_argument("--seq", type=number(int, 1, BENCH_SEQ), default=256, help=f"sequence length (<= {BENCH_SEQ})")
    p.add_argument("--iters", type=number(int, 1, BENCH_STEPS), default=3, help="timed fwd+bwd steps per preset")
    p.add_argument("--threads", type=number(int, 1, BENCH_THREADS), default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.batch and len(args.batch) not in (1, len(args.presets)):
        raise ConfigError(f"--batch: {len(args.batch)} values for {len(args.presets)} presets; give one, or one per preset")
    batches = args.batch or [8 if n in ("tiny", "tiny-2x", "small") else 1 for n in args.presets]
    if len(batches) == 1:
        batches = batches * len(args.presets)
    if max(batches) * args.seq > BENCH_TOKENS:
        raise ConfigError(f"--batch {max(batches)} x --seq {args.seq}: more than {BENCH_TOKENS:,} tokens per step; "
                          "give a smaller --batch or --seq")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    peak = matmul_gflops()
    rows = [bench_preset(n, b, args.seq, args.iters) for n, b in zip(args.presets, batches)]
    peak_after = matmul_gflops()  # the machine is shared: show the spread
    peak = max(peak, peak_after)

    header = ["preset", "params", "batch x seq", "fwd+bwd tok/s", "step s", "GFLOP/s", "matmul GFLOP/s", "MFU"]
    table = [[r["preset"], f"{r['params'] / 1e6:.1f}M", r["shape"], f"{r['tok_s']:,.0f}", f"{r['step_s']:.3f}",
              f"{r['gflops']:.1f}", f"{peak:.1f}", f"{100 * r['gflops'] / peak:.1f}%"] for r in rows]
    title = f"anchor fwd+bwd, fp32, {torch.get_num_threads()} threads, peak = fp32 2048^3 matmul"
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="right")
        for row in table:
            t.add_row(*row)
        Console().print(t)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
        for row in [header] + table:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("bench_model.py", main))

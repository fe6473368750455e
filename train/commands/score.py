"""`memlm score DATA --model RUN [--name ref|large]`: per-token loss of a reference model over the shards.

Stores the float16 array "loss_<name>" per shard, aligned with tokens.bin: loss[t] = -log p(token t |
the tokens before t in the same window), computed with no grad over batches of windows. The first token
of every window has no prefix and gets NaN (selection treats NaN as "never delegate"); so does the first
token of every --max-len chunk of a window longer than the model's context.

--model is a memlm run (or step dir), or a transformers causal-LM directory (e.g. from `memlm export-hf`)
whose tokenizer has the same vocabulary as the data. A memory run scores with each window's fetched
memory block (needs `memlm cluster` paths; --mode generic/anchor otherwise). `--name large` with a
bigger model gives the second signal for rule rho. Resumable: shards that already have the array are
skipped unless --overwrite.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np

from model.errors import ConfigError, DataError
from train.cli import ArgumentParser, add_device_arg, number, positive_int
from train.lacy.score import Scorer, score_shard


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir written by `memlm prepare`")
    p.add_argument("--model", required=True, help="memlm run / step dir, or a transformers model dir")
    p.add_argument("--name", default="ref", help="array suffix: loss_<name> (ref = the SLM reference, "
                                                  "large = the bigger model for rho)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--max-len", type=number(int, 2), default=None,
                   help="longest chunk per forward, >= 2 (default: the model's max_seq_len)")
    p.add_argument("--mode", default=None, choices=("fetched", "generic", "anchor"),
                   help="memory runs: which memory to use (default fetched if the data is clustered, else generic)")
    p.add_argument("--splits", default="train,val", help="comma-separated splits (missing ones are skipped)")
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="re-score shards that already have the array")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.selection import has_array, shard_label, shards_of
    from data.shards import SPLITS, open_data
    from tqdm import tqdm

    if not re.fullmatch(r"\w+", args.name):
        raise ConfigError(f"--name {args.name!r}: use letters, digits and _ only (it names the files loss_<name>.npy)")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ConfigError(f"--splits {args.splits!r}: unknown split(s) {unknown}; choose among {', '.join(SPLITS)}")
    dd = open_data(args.data)
    tok = dd.tokenizer()
    name = f"loss_{args.name}"
    todo = [sh for split in splits for sh in shards_of(dd, split)]
    skip = [sh for sh in todo if has_array(sh, name) and not args.overwrite]
    for sh in skip:
        print(f"skip {shard_label(sh)} (has {name})")
    todo = [sh for sh in todo if sh not in skip]
    if not todo:
        print(f"memlm score: nothing to do (all shards have {name}; --overwrite to redo)")
        return 0
    scorer = Scorer(args.model, tok, args.device)
    if args.mode is not None and not scorer.memory:
        raise ConfigError(f"--mode {args.mode}: {args.model} has no memory; --mode is for memory runs (drop it)")
    if scorer.memory:
        clustered = all(sh.paths is not None for sh in todo)
        scorer.mode = args.mode or ("fetched" if clustered else "generic")
        if scorer.mode == "fetched" and not clustered:
            raise DataError(f"{args.data}: --mode fetched needs cluster paths (run `memlm cluster {args.data}`)")
        if scorer.mode == "fetched":
            from train.build import check_same_router
            check_same_router(scorer.router, args.data, args.model, flag="DATA")
        print(f"memory run: scoring with mode {scorer.mode!r}")
    max_len = args.max_len or scorer.max_len
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    total = sum(len(sh.tokens) for sh in todo)
    t0 = time.time()
    with tqdm(total=total, unit="tok", desc=f"score {name}", file=sys.stderr, dynamic_ncols=True) as bar:
        for sh in todo:
            paths = sh.paths if (scorer.memory and scorer.mode == "fetched") else None
            loss = score_shard(scorer, np.asarray(sh.tokens), np.asarray(sh.windows), paths, args.batch_size,
                               max_len, pad_id, progress=bar.update)
            sh.write_array(name, loss)
            tqdm.write(f"{shard_label(sh)}: mean loss {np.nanmean(loss.astype(np.float32)):.3f}", file=sys.stderr)
    dt = time.time() - t0
    print(f"scored {total} tokens in {len(todo)} shard(s) with {args.model} in {dt:.1f}s "
          f"({total / max(dt, 1e-9):.0f} tok/s) -> {name}")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm score", main))


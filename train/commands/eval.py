"""`memlm eval RUN --data DATA`: validation loss / perplexity and bios probe accuracy per memory mode.

Modes (a memory run): **fetched** (each row gets the blocks of its cluster path), **generic** (every
row gets the generic block: the paper's control for every fetched number) and **anchor** (no memory).
A plain anchor run has the mode "anchor" only.

- Validation: the val split packed into rows of one cluster leaf each (the windows' stored paths, as in
  training); full rows and full batches only, so part of the split is not scored: the console and
  `val_coverage` say how many of its target tokens were; loss = mean cross-entropy over every scored target
  token, ppl = exp(loss); also per top-level
  cluster (the first node of the row's path). --val-batches N evaluates the first N batches of a
  seeded shuffle of the rows (default: all of them).
- Probes (bios data, DATA/bios/probes.jsonl): up to --probes-per-bucket probes per frequency bucket
  (bucket_0 = rarest answers in training), sampled with --seed. The prompt is routed through the run's
  router (MiniLM + greedy descent, or the prompt's first known entity for an entity-keyed tree), the
  model continues it greedily, and a probe is correct iff the continuation starts with the answer.
  A memory run is also scored with **fetched_oracle**: each prompt gets the leaf that holds most of its
  person's training windows (the best any router can do for these memories); `probe_routing` gives the
  share of prompts the router sends there (hit rate) per bucket, and the share of a person's windows in
  that leaf (consistency). --route-top M adds **fetched_top<M>**: among the M nearest leaves, the one
  under whose memory the prompt itself has the lowest loss. Every accuracy and every difference
  (fetched - generic, oracle - router, ...) has a 95% bootstrap interval (paired over the same probes),
  and validation-loss differences between modes one over the same rows.

Writes OUT/eval.json (default OUT = RUN/eval; RUN/eval-step-XXXXXXX for a step dir), under a temporary name
renamed into place with memlm's marker; an existing OUT is replaced only when it is an earlier eval output and
--force is given:
    {"run", "data", "val": {mode: {"loss", "ppl", "tokens"}},
     "val_coverage": {"tokens", "split_tokens", "share", "note"},  (target tokens scored of the split's, and why)
     "per_cluster": {mode: {"<top-level id>": {"loss", "ppl", "tokens"}}},
     "probes": {mode: {"bucket_<b>": {"acc", "n"}}},         (buckets without probes are left out)
     "probe_items": {"person", "bucket", label: [0/1 per probe], "hit": [0/1: routed to the majority leaf]},
     "val_rows": {"seq_len", "batch_size", "seed", mode: {"nats": [...], "tokens": [...]}}}
(val_rows: every val row's summed loss and target tokens, in the order evaluated: runs evaluated on the
same data with the same seq_len, batch size and seed share these rows, so their losses can be paired.)
and OUT/eval.png (bar charts, train.experiments.report.plot_memory_eval), and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import torch

import numpy as np

from model.errors import CheckpointError, ConfigError, DataError
from train.cli import (ArgumentParser, add_device_arg, add_output_args, check_out_dir, nonnegative_int, positive_int,
                       seed)
from train.evaluation.memory_eval import (ALL_MODES, DIFF_PAIRS, check_route_top, cluster_table, eval_val,
                                          loss_routed_paths, probe_correct, probe_diffs, probe_summary, sample_probes,
                                          split_targets, write_json)

EVAL_KIND = "eval"  # the kind in the marker of an eval output directory (model/atomic.py)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (its newest checkpoint) or a checkpoint step dir")
    p.add_argument("--data", required=True, help="data dir (memlm prepare + memlm cluster) whose val split and "
                                                 "bios probes are evaluated")
    add_output_args(p, "eval", what="eval.json and eval.png (default: RUN/eval; RUN/eval-step-XXXXXXX for a "
                                     "step dir)")
    p.add_argument("--val-batches", type=positive_int, default=None,
                   help="evaluate N batches of a seeded shuffle of the val rows (default: the whole val split)")
    p.add_argument("--probes-per-bucket", type=nonnegative_int, default=100,
                   help="at most N probes per frequency bucket (seeded sample; 0 skips the probes)")
    p.add_argument("--modes", default=",".join(ALL_MODES),
                   help="comma-separated modes among fetched, generic, anchor (an anchor run: anchor only)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the probe sample and of the val row order")
    p.add_argument("--batch-size", type=positive_int, default=None, help="val rows per batch (default: the run's)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="val row length (default: the run's data.seq_len)")
    add_device_arg(p)
    p.add_argument("--route-top", type=nonnegative_int, default=0, metavar="M",
                   help="also score fetched_top<M>: route each prompt to the one of its M nearest leaves whose "
                        "memory gives the prompt the lowest loss (default 0: off)")
    return p


def route_probes(model, router, data, tokenizer, probes, route_top: int, device, step_dir) -> tuple[dict, dict]:
    """({label: paths [n, levels]}, routing diagnostics) for the probes of a memory run: the router's
    paths ("fetched"), the person's majority leaf ("fetched_oracle") and, with route_top > 1, the
    loss-routed paths among the nearest leaves ("fetched_top<M>")."""
    from data.bios import person_of
    from train.evaluation.routing import consistency, hit_rates, key_leaves, oracle_paths, prompt_router

    if router is None:
        raise CheckpointError(f"{step_dir}: memory run without a router: cannot route the probe prompts")
    prompts = [p["prompt"] for p in probes]
    t1 = time.time()
    paths = {"fetched": prompt_router(router)(prompts)}
    leaves = key_leaves(data, person_of)
    paths["fetched_oracle"] = oracle_paths([p["person"] for p in probes], leaves, router.k, router.levels)
    if route_top > 1:
        paths[f"fetched_top{route_top}"] = loss_routed_paths(model, tokenizer, router, prompts, route_top, device)
    buckets = [int(p["bucket"]) for p in probes]
    routing = {"consistency": consistency(leaves),
               "hit": {label: hit_rates(buckets, p, paths["fetched_oracle"]) for label, p in paths.items()
                       if label != "fetched_oracle"}}
    print(f"memlm eval: routed {len(probes)} probe prompts in {time.time() - t1:.1f}s; router hit rate "
          f"(prompt -> leaf holding most of the person's windows) {routing['hit']['fetched']['all']['share']:.3f}, "
          f"windows in that leaf {routing['consistency']:.3f}")
    return paths, routing


def val_coverage(scored: int, total: int, seq_len: int, by_leaf: bool, val_batches: int | None) -> dict:
    """eval.json's "val_coverage": the target tokens scored out of the val split's, and why the rest is not
    (the rows are those training would see: full rows of seq_len tokens, full batches; the same rows in every
    reproduction, so this is reported rather than changed)."""
    why = [f"rows of {seq_len} tokens packed by leaf drop each leaf's remainder" if by_leaf
           else f"rows of {seq_len} tokens drop the split's remainder", "rows short of a full batch are dropped"]
    if val_batches:
        why.append(f"--val-batches {val_batches} keeps that many batches")
    share = scored / total if total else 0.0
    note = (f"scored {scored} of the val split's {total} target tokens ({share:.0%}): " + "; ".join(why)
            + " (--seq-len and --batch-size change the rows)")
    return {"tokens": int(scored), "split_tokens": int(total), "share": share, "note": note}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_out_dir(args.out)
    from data.shards import open_data
    from data.tokenizer import tokenizer_hash
    from model.atomic import atomic_dir, check_output_dir
    from train.build import check_cluster_paths, check_same_router
    from train.checkpoint import default_output, find_step_dir, load_run
    from train.experiments.report import eval_table, plot_memory_eval

    t0 = time.time()
    step_dir = find_step_dir(args.run)
    out = args.out or default_output(args.run, step_dir, "eval")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    sources = (args.run, run_dir, args.data)
    check_output_dir(out, EVAL_KIND, args.force, sources=sources)  # before the model loads
    model, tokenizer, cfg, router = load_run(step_dir)
    data = open_data(args.data)
    if tokenizer is None:
        tokenizer = data.tokenizer()
    elif tokenizer_hash(tokenizer) != data.manifest["tokenizer_hash"]:
        raise DataError(f"--data {args.data}: its tokenizer differs from the run's ({step_dir}/tokenizer); evaluate on the data the "
                        "run was trained with (or data prepared with the same tokenizer)")
    device = torch.device(args.device)
    model = model.to(device).eval()

    is_mem = model.has_memory
    if args.route_top and not is_mem:
        raise ConfigError(f"--route-top {args.route_top}: {step_dir} has no memory; --route-top is for memory runs")
    check_route_top(args.route_top, router)  # before the validation pass
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise ConfigError(f"--modes {args.modes}: unknown mode(s) {bad}; choose among {', '.join(ALL_MODES)}")
    modes = [m for m in ALL_MODES if m in modes]  # canonical order
    if not is_mem:
        if modes != ["anchor"]:
            print(f"memlm eval: {step_dir} has no memory: evaluating mode 'anchor' only")
        modes = ["anchor"]
    if is_mem:
        check_cluster_paths(data, model.mem_cfg)
        check_same_router(router, args.data, step_dir)
        by_leaf = True
    else:  # anchor runs: rows by leaf (and per-cluster numbers) when the data is clustered
        by_leaf = bool(data.n_levels) and all(sh.has_array("paths") for sh in data.shards("val"))

    seq_len = args.seq_len or cfg.data.seq_len
    batch_size = args.batch_size or cfg.data.batch_size
    print(f"memlm eval: {step_dir} on {args.data} | modes {', '.join(modes)} | val rows of {seq_len} tokens"
          + (" packed by leaf" if by_leaf else "") + f", batch {batch_size}"
          + (f", {args.val_batches} batches" if args.val_batches else ", every full batch of rows"))
    val, per_cluster, diffs, val_rows = eval_val(model, data, modes, seq_len, batch_size, args.seed, args.val_batches,
                                       by_leaf, device)
    coverage = val_coverage(val[modes[0]]["tokens"], split_targets(data), seq_len, by_leaf, args.val_batches)
    print(f"memlm eval: {coverage['note']}")

    probes_res, routing, pdiffs, items = {}, {}, {}, {}
    probes_file = os.path.join(args.data, "bios", "probes.jsonl")
    if os.path.isfile(probes_file) and args.probes_per_bucket > 0:
        probes = sample_probes(probes_file, args.probes_per_bucket, args.seed)
        paths = {}
        if is_mem and "fetched" in modes:
            paths, routing = route_probes(model, router, data, tokenizer, probes, args.route_top, device, step_dir)
        labels = [(m, m) for m in modes if m != "fetched"]
        labels = [(lab, "fetched") for lab in paths] + labels
        for label, mode in labels:
            items[label] = probe_correct(model, tokenizer, probes, mode, paths.get(label), device)
        buckets = [int(p["bucket"]) for p in probes]
        probes_res = probe_summary(items, buckets, args.seed)
        pdiffs = probe_diffs(items, buckets, DIFF_PAIRS + [(f"fetched_top{args.route_top}", "fetched")], args.seed)
        items = {"person": [p.get("person") for p in probes], "bucket": buckets,
                 **{k: v.astype(int).tolist() for k, v in items.items()}}
        if "fetched_oracle" in paths:  # per probe: routed to the person's majority leaf (1) or not (0)
            items["hit"] = np.all(paths["fetched"] == paths["fetched_oracle"], axis=1).astype(int).tolist()

    ev = {"run": os.path.abspath(step_dir), "data": os.path.abspath(args.data), "val": val, "val_coverage": coverage,
          "per_cluster": per_cluster, "val_diffs": diffs, "probes": probes_res, "probe_diffs": pdiffs,
          "probe_routing": routing, "probe_items": items,
          "val_rows": {"seq_len": seq_len, "batch_size": batch_size, "seed": args.seed, **val_rows}}
    with atomic_dir(out, EVAL_KIND, replace=args.force, sources=sources) as tmp:
        write_json(os.path.join(tmp, "eval.json"), ev)
        plot_memory_eval(ev, os.path.join(tmp, "eval.png"))
    print(eval_table(ev))
    ct = cluster_table(ev)
    if ct:
        print("\nper top-level cluster (validation loss):\n" + ct)
    print(f"\nmemlm eval: wrote {out}/eval.json and eval.png in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm eval", main))


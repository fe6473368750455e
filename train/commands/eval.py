"""`memlm eval RUN --data DATA`: validation loss / perplexity and bios probe accuracy per memory mode.

Modes (a memory run): **fetched** (each row gets the blocks of its cluster path), **generic** (every
row gets the generic block: the paper's control for every fetched number) and **anchor** (no memory).
A plain anchor run has the mode "anchor" only.

- Validation: the val split packed into rows of one cluster leaf each (the windows' stored paths, as in
  training); loss = mean cross-entropy over every target token, ppl = exp(loss); also per top-level
  cluster (the first node of the row's path). --val-batches N evaluates the first N batches of a
  seeded shuffle of the rows (default: all of them).
- Probes (bios data, DATA/bios/probes.jsonl): up to --probes-per-bucket probes per frequency bucket
  (bucket_0 = rarest answers in training), sampled with --seed. The prompt is routed through the run's
  router (MiniLM + greedy descent, as at inference), the model continues it greedily, and a probe is
  correct iff the continuation starts with the answer (answers begin with a space).

Writes OUT/eval.json (default OUT = RUN/eval):
    {"run", "data", "val": {mode: {"loss", "ppl", "tokens"}},
     "per_cluster": {mode: {"<top-level id>": {"loss", "ppl", "tokens"}}},
     "probes": {mode: {"bucket_<b>": {"acc", "n"}}}}          (buckets without probes are left out)
and OUT/eval.png (bar charts, train.experiments.report.plot_memory_eval), and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import torch

from train.evaluation.memory_eval import ALL_MODES, _die, cluster_table, eval_probes, eval_val, person_leaves, probe_routing, sample_probes, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (its newest checkpoint) or a checkpoint step dir")
    p.add_argument("--data", required=True, help="data dir (memlm prepare + memlm cluster) whose val split and "
                                                 "bios probes are evaluated")
    p.add_argument("--out", help="output dir for eval.json and eval.png (default: RUN/eval)")
    p.add_argument("--val-batches", type=int, default=None,
                   help="evaluate N batches of a seeded shuffle of the val rows (default: the whole val split)")
    p.add_argument("--probes-per-bucket", type=int, default=100,
                   help="at most N probes per frequency bucket (seeded sample; 0 skips the probes)")
    p.add_argument("--modes", default=",".join(ALL_MODES),
                   help="comma-separated modes among fetched, generic, anchor (an anchor run: anchor only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe sample and of the val row order")
    p.add_argument("--batch-size", type=int, default=None, help="val rows per batch (default: the run's)")
    p.add_argument("--seq-len", type=int, default=None, help="val row length (default: the run's data.seq_len)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.shards import open_data
    from data.tokenizer import tokenizer_hash
    from train.build import check_cluster_paths
    from train.checkpoint import find_step_dir, load_run
    from train.experiments.report import eval_table, plot_memory_eval

    t0 = time.time()
    step_dir = find_step_dir(args.run)
    model, tokenizer, cfg, router = load_run(step_dir)
    try:
        data = open_data(args.data)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"memlm eval: --data {args.data}: {e}") from None
    if tokenizer is None:
        tokenizer = data.tokenizer()
    elif tokenizer_hash(tokenizer) != data.manifest["tokenizer_hash"]:
        _die(args.data, f"its tokenizer differs from the run's ({step_dir}/tokenizer); evaluate on the data the "
                        "run was trained with (or data prepared with the same tokenizer)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()

    is_mem = model.has_memory
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        _die("--modes", f"unknown mode(s) {bad}; choose among {', '.join(ALL_MODES)}")
    modes = [m for m in ALL_MODES if m in modes]  # canonical order
    if not is_mem:
        if modes != ["anchor"]:
            print(f"memlm eval: {step_dir} has no memory: evaluating mode 'anchor' only")
        modes = ["anchor"]
    if is_mem:
        check_cluster_paths(data, model.mem_cfg)
        by_leaf = True
    else:  # anchor runs: rows by leaf (and per-cluster numbers) when the data is clustered
        by_leaf = bool(data.n_levels) and all(sh.has_array("paths") for sh in data.shards("val"))

    seq_len = args.seq_len or cfg.data.seq_len
    batch_size = args.batch_size or cfg.data.batch_size
    print(f"memlm eval: {step_dir} on {args.data} | modes {', '.join(modes)} | val rows of {seq_len} tokens, "
          f"batch {batch_size}" + (f", {args.val_batches} batches" if args.val_batches else ", whole split"))
    val, per_cluster = eval_val(model, data, modes, seq_len, batch_size, args.seed, args.val_batches, by_leaf,
                                device)

    probes_res: dict = {}
    routing: dict = {}
    probes_file = os.path.join(args.data, "bios", "probes.jsonl")
    if os.path.isfile(probes_file) and args.probes_per_bucket > 0:
        probes = sample_probes(probes_file, args.probes_per_bucket, args.seed)
        paths = None
        if is_mem and "fetched" in modes:
            if router is None:
                _die(step_dir, "memory run without a router: cannot route the probe prompts")
            t1 = time.time()
            paths = router.route([p["prompt"] for p in probes])
            print(f"memlm eval: routed {len(probes)} probe prompts in {time.time() - t1:.1f}s")
            routing = probe_routing(probes, paths, person_leaves(data))
            print("memlm eval: probes routed to a leaf holding the person's training windows: " + ", ".join(
                f"{b} {r['share']:.2f}" for b, r in routing.items()))
        probes_res = eval_probes(model, tokenizer, probes, modes, paths, device)

    ev = {"run": os.path.abspath(step_dir), "data": os.path.abspath(args.data), "val": val,
          "per_cluster": per_cluster, "probes": probes_res, "probe_routing": routing}
    out = args.out or os.path.join(args.run, "eval")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "eval.json"), ev)
    plot_memory_eval(ev, os.path.join(out, "eval.png"))
    print(eval_table(ev))
    ct = cluster_table(ev)
    if ct:
        print("\nper top-level cluster (validation loss):\n" + ct)
    print(f"\nmemlm eval: wrote {out}/eval.json and eval.png in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())


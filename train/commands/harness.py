"""`memlm harness RUN --tasks T --include-path DIR --mode fetched`: lm-evaluation-harness tasks on a run.

The run is wrapped by train/evaluation/harness.py (registered with lm-eval as `memlm`): every request's
context is routed through the run's router (mode fetched; with --route-top M, to the one of its M nearest
leaves whose memory gives the context the lowest loss), or gets the leaf holding most of the training
windows of the document named by the task document's --key-field (mode oracle, needs --data), the generic
block (generic) or no memory (anchor). Writes OUT/harness.json: per task every metric lm-eval returned
(acc, exact_match, word_perplexity, ...) and each document's value of the task's first metric (for paired
intervals between modes), and prints one line per task. OUT is written under a temporary
name and renamed into place with memlm's marker; an existing OUT is replaced only when it is an earlier
harness output and --force is given. Needs the optional extra
`lm-eval` (pip install 'memlm[eval]').
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from model.errors import ConfigError
from train.cli import ArgumentParser, add_device_arg, add_output_args, check_out_dir, nonnegative_int, positive_int


KIND = "harness"  # the kind in the marker of the output directory (model/atomic.py)


def build_parser() -> argparse.ArgumentParser:
    from train.evaluation.harness import MODES

    p = ArgumentParser(prog="memlm harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (its newest checkpoint) or a checkpoint step dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="directory of local task YAML files (e.g. memlm wiki-probes)")
    p.add_argument("--mode", default="fetched", choices=MODES, help="memory mode (default fetched: routed per prompt)")
    p.add_argument("--data", default=None, help="the run's data dir (mode oracle)")
    p.add_argument("--key-field", default="title", help="mode oracle: task document field naming the training document")
    p.add_argument("--route-top", type=nonnegative_int, default=0, metavar="M",
                   help="mode fetched: of each context's M nearest leaves, use the one whose memory gives the context "
                        "itself the lowest loss (default 0: the router's leaf)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most N documents per task")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per forward pass")
    add_device_arg(p)
    add_output_args(p, "harness", what="harness.json (default RUN/harness-<mode>, "
                                        "RUN/harness-fetched_top<M> with --route-top M; "
                                        "RUN/harness-<mode>-step-XXXXXXX for a step dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_out_dir(args.out)
    from model.atomic import atomic_dir, atomic_write_json, check_output_dir
    from train.checkpoint import default_output, find_step_dir
    from train.evaluation.harness import evaluate

    if args.route_top > 1 and args.mode != "fetched":  # before lm-eval loads its tasks
        raise ConfigError(f"--route-top {args.route_top}: routes prompts, so it needs --mode fetched (not {args.mode})")
    t0 = time.time()
    label = f"fetched_top{args.route_top}" if args.route_top > 1 else args.mode
    step_dir = find_step_dir(args.run)  # a wrong run path is named before lm-eval reads its task list
    out_dir = args.out or default_output(args.run, step_dir, f"harness-{label}")
    sources = [p for p in (args.run, args.data, args.include_path) if p]
    check_output_dir(out_dir, KIND, args.force, sources=sources)  # before the run loads
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    res = evaluate(args.run, tasks, include_path=args.include_path, mode=args.mode, data=args.data,
                   key_field=args.key_field, device=args.device, batch_size=args.batch_size, limit=args.limit,
                   route_top=args.route_top)
    out = {"run": os.path.abspath(args.run), "mode": args.mode, "route_top": args.route_top, "tasks": {}}
    for t in tasks:
        out["tasks"][t] = summary = task_summary(res, t)
        print(f"memlm harness: {t}: {metrics_line(summary['metrics'])} over {summary['n']} documents (mode {label})")
        if args.mode == "oracle":
            summary["no_oracle_leaf"] = missing = res.get("memlm_no_oracle", {}).get(t, [])
            if missing:
                print(f"memlm harness: {t}: {len(missing)} of {summary['n']} documents have no oracle leaf (their "
                      f"{args.key_field} is not a document id of {args.data}): scored with leaf 0, listed in "
                      "no_oracle_leaf")
    with atomic_dir(out_dir, KIND, replace=args.force, sources=sources) as tmp:
        atomic_write_json(os.path.join(tmp, "harness.json"), out)
    path = os.path.join(out_dir, "harness.json")
    print(f"memlm harness: wrote {path} in {time.time() - t0:.1f}s")
    return 0


def _number(v):
    """A float for a numeric metric value, None for anything else (lm-eval writes 'N/A' for a missing stderr)."""
    try:
        return float(v) if not isinstance(v, (str, bool)) else None
    except (TypeError, ValueError):
        return None


def _jsonable(v):
    """A per-document metric value for JSON: numbers as floats, tuples (e.g. word_perplexity's
    (loglikelihood, words)) as lists, anything else as its string."""
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    n = _number(v)
    return n if n is not None else str(v)


def task_summary(res: dict, task: str) -> dict:
    """One task of lm-eval's results: every aggregate metric it returned (`metrics`; filter "none" drops
    its ",none" suffix; stderr only where lm-eval computed one), the document count, and `items`: each
    document's value of the task's first metric (`metric`; acc for a multiple-choice task) for paired
    intervals between modes. `acc` is repeated at the top level where the task has it."""
    metrics = {}
    for key, v in (res.get("results", {}).get(task) or {}).items():
        name, _, filt = key.partition(",")
        if filt and _number(v) is not None:
            metrics[name if filt == "none" else key] = _number(v)
    samples = res.get("samples", {}).get(task, [])
    first = samples[0] if samples else {}
    metric = "acc" if "acc" in first.get("metrics", []) else (first.get("metrics") or [None])[0]
    items = {str(s["doc"].get("id", s["doc_id"])): _jsonable(s[metric]) for s in samples
             if metric in s and s.get("filter") == first.get("filter")}  # one filter: a document once
    out = {"metrics": metrics, "metric": metric, "n": len(items), "items": items}
    if "acc" in metrics:
        out["acc"] = metrics["acc"]
    return out


def metrics_line(metrics: dict) -> str:
    """'acc 0.5000 ± 0.0500, acc_norm 0.4000' (a metric's stderr after it, where lm-eval gave one)."""
    parts = []
    for name, v in metrics.items():
        if "_stderr" in name:
            continue
        se = metrics.get(name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr")
        parts.append(f"{name} {v:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
    return ", ".join(parts) or "no metrics"


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm harness", main))

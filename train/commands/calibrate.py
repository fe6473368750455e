"""`memlm calibrate DATA --slm LABEL=RUN ...`: is P(<CALL>) a calibrated confidence of each SLM?

On held-out windows (--split, default val), at every position: P(<CALL>) and whether the SLM's own greedy
token (<CALL> excluded) is wrong. Reports AUROC (does P(<CALL>) rank wrong positions above right ones?)
and expected calibration error (P(<CALL>) read as P(wrong), --bins equal-width bins), on all, factual
and non-factual positions (the next token's spaCy flag from `memlm tag`), with 95% intervals from
resampling windows (--n-boot). Memory SLMs use each window's fetched block (`memlm cluster` paths).
Writes OUT/calibration.json and OUT/calibration.png (reliability diagrams).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from train.cli import ArgumentParser, BOOT_MAX, add_device_arg, add_output_args, check_out_dir, number, positive_int


KIND = "calibrate"  # the kind in the marker of the output directory (model/atomic.py)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm calibrate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir written by `memlm prepare` and tagged by `memlm tag`")
    p.add_argument("--slm", action="append", required=True, help="[LABEL=]RUN of an SLM (repeatable)")
    p.add_argument("--split", default="val", help="held-out split (default val)")
    p.add_argument("--max-windows", type=positive_int, default=400, help="windows scored per SLM")
    p.add_argument("--bins", type=number(int, 1, 1000), default=10, help="equal-width bins of P(<CALL>) for ECE (1..1000)")
    p.add_argument("--n-boot", type=number(int, 1, BOOT_MAX), default=200, help="bootstrap resamples of windows")
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per forward pass")
    add_output_args(p, "calibrate", default="calibration")
    add_device_arg(p)
    return p


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.experiments.report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, part in zip(axes, ("factual", "non_factual")):
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        for i, (label, r) in enumerate(results.items()):
            rel = r[part].get("reliability")
            if not rel:
                continue
            pts = [(p, w) for p, w in zip(rel["mean_p"], rel["wrong"]) if p is not None]
            ax.plot([p for p, _ in pts], [w for _, w in pts], marker="o", ms=3, color=f"C{i % 10}",
                    label=f"{label} (AUROC {r[part]['auroc']['point']:.2f})")
        ax.set(xlabel="P(<CALL>)", ylabel="share of wrong greedy tokens", title=f"{part.replace('_', '-')} positions",
               xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_out_dir(args.out)
    from data.selection import call_id, read_array, shards_of
    from data.shards import open_data
    from model.atomic import atomic_dir, atomic_write_json, check_output_dir
    from model.errors import DataError
    from train.lacy.calibration import positions, summarize
    from train.lacy.factscore import check_slm_labels, parse_slm
    from train.lacy.score import Scorer

    from train.checkpoint import find_step_dir

    check_slm_labels(args.slm)
    for spec in args.slm:  # every run exists before the first one is scored
        find_step_dir(parse_slm(spec)[1])
    sources = [args.data, *(parse_slm(spec)[1] for spec in args.slm)]
    check_output_dir(args.out, KIND, args.force, sources=sources)
    dd = open_data(args.data)
    from train.build import check_run_tokenizer

    for spec in args.slm:  # every SLM's tokenizer before the first one is scored
        check_run_tokenizer(parse_slm(spec)[1], dd, f"--slm {spec}", flag="DATA")
    tok = dd.tokenizer()
    cid = call_id(tok, os.path.join(args.data, "tokenizer"))
    shards = shards_of(dd, args.split)
    if not shards:
        raise DataError(f"{args.data}: no shards in split {args.split!r}")
    results = {}
    for spec in args.slm:
        label, path = parse_slm(spec)
        scorer = Scorer(path, tok, args.device)
        if scorer.memory:
            scorer.mode = "fetched" if all(sh.paths is not None for sh in shards) else "generic"
            if scorer.mode == "fetched":
                from train.build import check_same_router
                check_same_router(scorer.router, args.data, path, flag="DATA")
            else:  # said and recorded: the numbers are of the generic block, not the run's fetched memories
                print(f"{label}: {args.data} has no cluster paths: scoring this memory run with its generic block")
        parts = []
        left = args.max_windows
        for sh in shards:
            if left <= 0:
                break
            factual = read_array(sh, "factual", required=True)
            paths = sh.paths if scorer.memory and scorer.mode == "fetched" else None
            pos = positions(scorer, np.asarray(sh.tokens), np.asarray(sh.windows), factual, cid, paths,
                            args.batch_size, max_windows=left)
            left -= min(len(sh.windows) - 1, left)
            pos["window"] = pos["window"] + 1_000_000 * len(parts)  # unique across shards
            parts.append(pos)
        pos = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        results[label] = summarize(pos, args.bins, args.n_boot)
        if scorer.memory:
            results[label]["mode"] = scorer.mode
        r = results[label]
        print(f"{label}: " + "; ".join(
            f"{part} AUROC {r[part]['auroc']['point']:.3f} ECE {r[part]['ece']['point']:.3f} "
            f"(n={r[part]['n']}, wrong {r[part]['wrong_rate']:.2f}, mean P(<CALL>) {r[part]['mean_p_call']:.3f})"
            for part in ("factual", "non_factual") if r[part]["n"]))
    with atomic_dir(args.out, KIND, replace=args.force, sources=sources) as tmp:
        atomic_write_json(os.path.join(tmp, "calibration.json"),
                          {"data": args.data, "split": args.split, "bins": args.bins, "max_windows": args.max_windows,
                           "runs": dict(map(parse_slm, args.slm)), "results": results})
        plot(results, os.path.join(tmp, "calibration.png"))
    print(f"wrote {args.out}/calibration.json, calibration.png")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm calibrate", main))

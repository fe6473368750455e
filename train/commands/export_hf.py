"""memlm export-hf RUN [--out DIR] [--path 1,2]: a run's checkpoint -> a transformers LlamaForCausalLM directory.

A memory run exports the anchor with one cluster path's fetched block folded into its FFNs (--path):
anchor + fetched block is exactly a dense model whose FFN is sum(widths) units wider."""
from __future__ import annotations

import argparse
import os


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm export-hf",
                                description="Export a run (or one checkpoint) as a HF Llama directory that "
                                            "AutoModelForCausalLM.from_pretrained loads.")
    p.add_argument("run", help="run dir (runs/NAME: its newest checkpoint) or a checkpoint dir (.../step-XXXXXXX)")
    p.add_argument("--out", help="output dir (default: RUN/hf, or <run>/hf-step-XXXXXXX for a step dir; "
                                 "memory runs: ...-path-1-2)")
    p.add_argument("--path", help="memory runs: the cluster path whose fetched block is folded into the FFNs, "
                                  "comma-separated, one node per level (e.g. 1,2); the export is the dense "
                                  "Llama with intermediate_size = ffn_hidden + sum(widths)")
    return p


def parse_path(text: str, model, where: str) -> list[int]:
    """'1,2' -> [1, 2], checked against the bank's levels and branching."""
    try:
        path = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise SystemExit(f"memlm export-hf: {where}: --path {text!r}: expected comma-separated integers, "
                         "e.g. --path 1,2") from None
    mc = model.mem_cfg
    if len(path) != mc.n_levels or any(not 0 <= n < mc.k for n in path):
        raise SystemExit(f"memlm export-hf: {where}: --path {text!r}: the memory bank has {mc.n_levels} levels "
                         f"with k={mc.k} (memory.widths={list(mc.widths)}): give {mc.n_levels} integers in "
                         f"[0, {mc.k})")
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.hf import export_llama
    from train.checkpoint import find_step_dir, load_run

    step_dir = find_step_dir(args.run)
    model, tokenizer, cfg, _ = load_run(step_dir)
    if args.out:
        out_dir = args.out
    elif os.path.abspath(step_dir) == os.path.abspath(args.run):
        out_dir = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "hf-" + os.path.basename(step_dir))
    else:
        out_dir = os.path.join(args.run, "hf")
    extra = None
    if model.has_memory:  # anchor + one path's fetched block = a wider dense Llama
        if not args.path:
            mc = model.mem_cfg
            raise SystemExit(f"memlm export-hf: {step_dir}: a memory run exports anchor + one cluster path's "
                             f"block: give --path with {mc.n_levels} comma-separated node ids in [0, {mc.k})")
        path = parse_path(args.path, model, step_dir)
        extra = model.dense_extra(path)
        model = model.anchor
        if not args.out:
            out_dir += "-path-" + "-".join(map(str, path))
    elif args.path:
        raise SystemExit(f"memlm export-hf: {step_dir}: --path is for memory runs; this run has no memory")
    try:
        out = export_llama(model, tokenizer, out_dir, extra=extra)
    except ValueError as e:  # e.g. qk_norm: not expressible as Llama
        raise SystemExit(f"memlm export-hf: {step_dir}: {e}") from None
    print(f"memlm export-hf: {step_dir} -> {out}")
    return 0

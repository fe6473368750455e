"""memlm export-hf RUN [--out DIR] [--path 1,2] [--force]: a run's checkpoint -> a transformers
LlamaForCausalLM directory.

A memory run exports the anchor with one cluster path's fetched block folded into its FFNs (--path):
anchor + fetched block is exactly a dense model whose FFN is sum(widths) units wider.

The export is written under a temporary name and renamed into place, with memlm's marker. An existing
--out is refused unless it is an earlier export and --force is given; a directory memlm did not export
into, the run itself or a parent of it, the working directory and the home directory never are."""
from __future__ import annotations

import os
import re
import sys

from model.errors import ConfigError, MemlmError
from train.cli import ArgumentParser, run_command


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="memlm export-hf",
                       description="Export a run (or one checkpoint) as a HF Llama directory that "
                                   "AutoModelForCausalLM.from_pretrained loads.")
    p.add_argument("run", help="run dir (runs/NAME: its newest checkpoint) or a checkpoint dir (.../step-XXXXXXX)")
    p.add_argument("--out", help="output dir, new or empty (default: RUN/hf, or <run>/hf-step-XXXXXXX for a step "
                                 "dir; memory runs: ...-path-1-2)")
    p.add_argument("--path", help="memory runs: the cluster path whose fetched block is folded into the FFNs, "
                                  "comma-separated, one node per level (e.g. 1,2); the export is the dense "
                                  "Llama with intermediate_size = ffn_hidden + sum(widths)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it holds an earlier memlm export (never any other directory)")
    return p


def parse_path(text: str, model, where: str) -> list[int]:
    """'1,2' -> [1, 2], checked against the bank's levels and branching (ConfigError naming --path)."""
    try:
        path = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"{where}: --path {text!r}: expected comma-separated integers, e.g. --path 1,2") from None
    mc = model.mem_cfg
    if len(path) != mc.n_levels or any(not 0 <= n < mc.k for n in path):
        raise ConfigError(f"{where}: --path {text!r}: the memory bank has {mc.n_levels} levels with k={mc.k} "
                          f"(memory.widths={list(mc.widths)}): give {mc.n_levels} integers in [0, {mc.k})")
    return path


def join_path_value(argv: list[str]) -> list[str]:
    """`--path -1,2` as `--path=-1,2`: argparse takes a value starting with '-' for an option, and would say
    only "expected one argument"; joined, parse_path names the range."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] == "--path" and re.fullmatch(r"-[\d, -]*", out[i + 1]):
            out[i:i + 2] = [f"--path={out[i + 1]}"]
            break
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_path_value(sys.argv[1:] if argv is None else argv))
    from model.atomic import check_output_dir
    from model.hf import HF_KIND, export_llama
    from train.checkpoint import default_output, find_step_dir, load_run

    step_dir = find_step_dir(args.run)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    sources = (os.path.abspath(args.run), run_dir)
    if args.out:  # refused before the checkpoint is loaded
        check_output_dir(args.out, HF_KIND, args.force, sources=sources)
    model, tokenizer, cfg, _ = load_run(step_dir)
    out_dir = args.out or default_output(args.run, step_dir, "hf")
    extra = None
    if model.has_memory:  # anchor + one path's fetched block = a wider dense Llama
        if not args.path:
            mc = model.mem_cfg
            raise ConfigError(f"{step_dir}: a memory run exports anchor + one cluster path's block: give --path "
                              f"with {mc.n_levels} comma-separated node ids in [0, {mc.k})")
        path = parse_path(args.path, model, step_dir)
        extra = model.dense_extra(path)
        model = model.anchor
        if not args.out:
            out_dir += "-path-" + "-".join(map(str, path))
    elif args.path:
        raise ConfigError(f"{step_dir}: --path is for memory runs; this run has no memory")
    try:
        out = export_llama(model, tokenizer, out_dir, extra=extra, replace=args.force, sources=sources,
                           flag="--force")
    except MemlmError:
        raise
    except ValueError as e:  # e.g. qk_norm: not expressible as Llama
        raise ConfigError(f"{step_dir}: {e}") from None
    print(f"memlm export-hf: {step_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("memlm export-hf", main))

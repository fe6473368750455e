"""The `memlm` console script: one subcommand per job, each a module `train.cmd_<name>` with main(argv)."""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `memlm --help` stays fast.
COMMANDS = {
    "demo": ("train.cmd_demo", "end-to-end demo on built-in data (the README's main job)"),
    "prepare": ("train.cmd_prepare", "build a corpus, train/load a tokenizer, write token shards"),
    "pretrain": ("train.pretrain", "pretrain an anchor (or train memories) with Lightning"),
    "export-hf": ("train.cmd_export_hf", "export a run to a transformers LlamaForCausalLM directory"),
    "cluster": ("train.cmd_cluster", "embed windows with MiniLM, fit the k-means tree, store paths"),
    "eval": ("train.cmd_eval", "validation loss / probes for fetched, generic and anchor-only"),
    "tag": ("train.cmd_tag", "spaCy factual flags per token (LaCy signal)"),
    "score": ("train.cmd_score", "per-token loss of a reference model over the shards"),
    "select": ("train.cmd_select", "choose <CALL> positions with a rule at a target call rate"),
    "cascade": ("train.cmd_cascade", "generate with an SLM that delegates <CALL> to a larger model"),
    "factscore": ("train.cmd_factscore", "FactScore of the cascade on the bios knowledge base"),
    "bank-info": ("train.cmd_bank_info", "sizes and usage of a run's memory bank"),
    "bench-kernels": ("scripts.bench_kernels", "benchmark the fused memory-FFN kernel (GPU)"),
}


def _usage() -> str:
    lines = ["usage: memlm <command> [options]   (memlm <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"memlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `memlm` console script: one subcommand per job, each a module `train.commands.<name>` (or
`train.pretrain`) with `build_parser()` and `main(argv)`.

This is the one place where errors reach the user: a `model.errors.MemlmError` raised anywhere below
becomes one line `memlm <command>: <message>` on stderr and exit code 2; a bad flag likewise (the
`ArgumentParser` here prints one line instead of argparse's usage block). `--debug` (anywhere on the
command line) or `MEMLM_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from train import claim

claim()  # first: a ./data folder or a PyPI `data` must not shadow memlm's packages

# name -> (module, one-line help). Modules are imported lazily so `memlm --help` stays fast.
COMMANDS = {
    "demo": ("train.commands.demo", "end-to-end demo on built-in data (the README's main job)"),
    "prepare": ("train.commands.prepare", "build a corpus, train/load a tokenizer, write token shards"),
    "pretrain": ("train.pretrain", "pretrain an anchor (or train memories) with Lightning Fabric"),
    "export-hf": ("train.commands.export_hf", "export a run to a transformers LlamaForCausalLM directory"),
    "cluster": ("train.commands.cluster", "embed windows with MiniLM, fit the k-means tree, store paths"),
    "eval": ("train.commands.eval", "validation loss / probes for fetched, generic and anchor-only"),
    "harness": ("train.commands.harness", "lm-evaluation-harness tasks on a run, per memory mode"),
    "wiki-probes": ("train.commands.wiki_probes", "knowledge probes (lm-eval tasks) from wiki-leads facts"),
    "tag": ("train.commands.tag", "spaCy factual flags per token (LaCy signal)"),
    "score": ("train.commands.score", "per-token loss of a reference model over the shards"),
    "select": ("train.commands.select", "choose <CALL> positions with a rule at a target call rate"),
    "cascade": ("train.commands.cascade", "generate with an SLM that delegates <CALL> to a larger model"),
    "factscore": ("train.commands.factscore", "FactScore of the cascade on the bios knowledge base"),
    "wiki-cascade": ("train.commands.wiki_cascade", "cascade on wiki-leads cloze prompts: exact facts, fluency"),
    "calibrate": ("train.commands.calibrate", "AUROC / ECE of P(<CALL>) as a predictor of the SLM's errors"),
    "bank-info": ("train.commands.bank_info", "sizes and usage of a run's memory bank"),
    "bench-kernels": ("scripts.bench_kernels", "benchmark the fused memory-FFN kernel (GPU)"),
}

EXIT_USER_ERROR = 2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `memlm score: --batch-size: must be an integer >= 1, got '0' (see
    memlm score --help)` and exit code 2, instead of the usage block."""

    def error(self, message: str):
        print(f"{self.prog}: {_one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def number(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse `type=` that parses `kind` and checks the interval (the message names the bound); NaN and
    infinities are always refused."""
    bounds = []
    if low is not None:
        bounds.append(f"> {low}" if low_open else f">= {low}")
    if high is not None:
        bounds.append(f"< {high}" if high_open else f"<= {high}")
    what = ("an integer" if kind is int else "a finite number") + (" " + " and ".join(bounds) if bounds else "")

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf")) or \
            (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, 1)
nonnegative_int = number(int, 0)
positive_float = number(float, 0, low_open=True)
nonnegative_float = number(float, 0)
probability = number(float, 0, 1)  # [0, 1]
rate = number(float, 0, 1, low_open=True)  # (0, 1]
MAX_NEW_TOKENS = 2**16  # generation length flags: beyond any memlm context, and a typo of 1e11 hangs
BOOT_MAX = 10**6  # bootstrap resamples: enough for any interval; 1e11 would allocate terabytes


def nonempty_text(text: str) -> str:
    """An argparse `type=` for a text that must not be empty (e.g. --stop)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


SEED_MAX = 2**31 - 1  # FAISS k-means takes a signed 32-bit seed
seed = number(int, 0, SEED_MAX)
job_seed = number(int, 0, SEED_MAX - 100)  # jobs (demo, reproductions) give their stages seed + a small offset


def comma_list(item: Callable[[str], object] | None = None, choices=None):
    """An argparse `type=` for `a,b,c`: a non-empty list, each entry in `choices` (if given) and parsed by
    `item` (e.g. `positive_int`); argparse names the flag in the one-line error."""

    def parse(text: str):
        entries = [x.strip() for x in text.split(",") if x.strip()]
        if not entries:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
        out = []
        for x in entries:
            if choices is not None and x not in choices:
                raise argparse.ArgumentTypeError(f"unknown {x!r} in {text!r}; choose from {', '.join(choices)}")
            try:
                out.append(item(x) if item else x)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{x!r} in {text!r}: {e}") from None
        return out

    parse.__name__ = "list"
    return parse


def add_output_args(p: argparse.ArgumentParser, command: str, default: str | None = None,
                    required: bool = False, what: str = "") -> None:
    """The `--out DIR` and `--force` pair of every command that writes an output directory (built under
    a temporary name, marked, renamed into place: model/atomic.py). `what` says what the directory holds
    and its default; `command` names whose earlier output `--force` may replace."""
    p.add_argument("--out", default=default, required=required,
                   help=f"output directory{' for ' + what if what else ''}, new or empty (written under a "
                        f"temporary name and renamed into place)")
    p.add_argument("--force", action="store_true",
                   help=f"replace --out if it holds an earlier memlm {command} output (never any other directory)")


def torch_device(text: str) -> str:
    """An argparse `type=` for `--device`: a torch device string that exists on this machine."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device; use cpu")
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: memlm runs on cpu or cuda")
    return text


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """`--device`: a torch device that exists here (checked when parsed); default cuda when one is
    available, else cpu."""
    import torch

    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


def check_out_dir(path: str, flag: str = "--out") -> str:
    """Refuse, before any work, an output directory that cannot be made: `path` is a file, or under one.
    ConfigError names the flag and the path; returns `path` (created later, by the writer)."""
    from model.errors import ConfigError

    from model.atomic import nearest_existing

    p = nearest_existing(path)
    if not os.path.isdir(p):
        raise ConfigError(f"{flag} {path}: {p} is a file, not a directory; give another {flag}")
    return path


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`: MemlmError -> one line on stderr, exit code 2 (traceback with --debug
    or MEMLM_DEBUG=1); an OS error of a write that is the machine's to fix (disk full, file-size limit,
    read-only path, a file where a directory should be, a name too long: model/errors.py WRITE_ERRNOS)
    likewise, naming the path and the fix; any other OSError keeps its traceback (a bug); Ctrl-C -> 130."""
    from model.errors import MemlmError, describe_os_error, os_error_of

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MEMLM_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(main(argv) or 0)
    except MemlmError as e:
        if debug:
            raise
        print(f"{prog}: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # noqa: BLE001 - only the resource errors below; the rest is re-raised
        os_error = os_error_of(e)
        if debug or os_error is None:
            raise
        then = "memlm jobs resume or clean up what they left: a run from its last checkpoint, prepare where it stopped"
        print(f"{prog}: {_one_line(describe_os_error(os_error, getattr(e, 'filename', None), then))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _usage() -> str:
    lines = ["usage: memlm <command> [options] [--debug]   (memlm <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"memlm: unknown command {name!r}; run `memlm --help` for the list", file=sys.stderr)
        return EXIT_USER_ERROR
    module = importlib.import_module(COMMANDS[name][0])
    return run_command(f"memlm {name}", module.main, rest)


if __name__ == "__main__":
    sys.exit(main())

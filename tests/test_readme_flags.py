"""The README documents every flag: its "Command flags" section lists, per `memlm` subcommand and per script
under scripts/, exactly the flags that command's parser accepts (a flag added without documentation, or one
removed while the README still lists it, fails here). The parsers are captured from the commands themselves."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess

import pytest

from train.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["reproduce_memory", "reproduce_lacy", "gpu_check", "loss_compare", "bench_model", "bench_train",
           "bench_memory", "bench_bank", "bench_data"]


class _Captured(Exception):
    pass


def _parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `module`'s main() builds: its parse_args is intercepted before anything runs."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    mod = importlib.import_module(module)
    with pytest.raises(_Captured):
        mod.main(["--help"])
    return seen[0]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings
            if o.startswith("--") and o != "--help"}


def _documented() -> dict[str, set[str]]:
    """{command: flags} from the README's "Command flags" list: "- `memlm NAME` ...: `--a`, `--b` ..."."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("\n### Command flags\n", 1)[1].split("\n#", 1)[0]
    out = {}
    for line in section.splitlines():
        m = re.match(r"- `(memlm [a-z-]+|scripts/[a-z_]+\.py)`", line)
        if m:
            out[m.group(1)] = set(re.findall(r"`(--[a-z0-9-]+)", line[m.end():]))
    return out


CASES = [(f"memlm {name}", module) for name, (module, _) in COMMANDS.items()] + \
        [(f"scripts/{name}.py", f"scripts.{name}") for name in SCRIPTS]


@pytest.mark.parametrize("command,module", CASES, ids=[c for c, _ in CASES])
def test_readme_lists_every_flag(command, module, monkeypatch):
    documented = _documented()
    assert command in documented, f"README 'Command flags' has no line for {command}"
    have = _flags(_parser(module, monkeypatch))
    assert have - documented[command] == set(), f"{command}: flags the README does not list"
    assert documented[command] - have == set(), f"{command}: the README lists flags the parser does not have"


def test_every_script_with_flags_is_covered():
    scripts = {f[:-3] for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py")}
    library = {"__init__", "golden_recipes", "gpu_check_runner", "bench_kernels"}  # bench_kernels: memlm bench-kernels
    assert scripts - library == set(SCRIPTS)


def test_makefile_variables_are_documented():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    make = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    names = set(re.findall(r"\$\(([A-Z_]+_ARGS)\)", make))
    assert names and all(f"{n}=" in readme for n in names), names


def test_readme_data_dirs_are_ignored_by_git():
    """`memlm prepare --out data/bios` (README) writes inside the data/ package: git must not list it."""
    for path in ("data/bios/manifest.json", "data/wiki/train/x.bin"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert r.returncode == 0, f"{path} is not ignored by .gitignore"
    assert subprocess.run(["git", "check-ignore", "-q", "data/prepare.py"], cwd=ROOT).returncode == 1

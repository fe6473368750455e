"""Golden loss curves: prove that a change does not move training (torchtitan's loss_compare, for memlm).

    python scripts/loss_compare.py --all                        # every recipe vs tests/golden/<recipe>.json
    python scripts/loss_compare.py --recipe memory-host --keep /tmp/lc
    python scripts/loss_compare.py --baseline runs/A --test runs/B --rtol 1e-2 --atol 1e-3
    python scripts/loss_compare.py --baseline tests/golden/anchor.json --test runs/anchor
    python scripts/loss_compare.py --all --record --reason "why the curves legitimately moved"

A recipe builds its small data dir from the repository alone (seeded `bios` corpus + synthetic cluster
paths, router and per-token calls), trains through the public entry point (`python -m train.pretrain` /
`torchrun ... -m train.pretrain` with dotted overrides) on CPU, one thread per process, deterministic,
and compares loss, grad_norm, lr (every step) and val_loss with the stored curve.

Bit-identity needs the same CPU kernels. On the CPU kind that recorded a curve (same fingerprint: vendor,
model, ISA flags, torch's CPU capability and version) a recipe must match exactly; on another kind the
recipes fall back to the per-metric tolerances in FALLBACK (printed). Exit 0: match, 1: mismatch or a
failed run, 2: bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_recipes import BIOS, RECIPES, ROOT, RunFailed, Workspace, command, cpu_info, write_text  # noqa: E402
from model.errors import ConfigError, MemlmError  # noqa: E402
from train.cli import ArgumentParser, nonnegative_float  # noqa: E402

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
TRAIN_KEYS = ("loss", "grad_norm", "lr")
VAL_KEYS = ("val_loss",)


class BadInput(ConfigError):
    """Bad command line or input file: one line on stderr, exit 2."""


# ---- curves -----------------------------------------------------------------------------------------
def read_curve(path: str) -> dict:
    """{metric: {step: value}} from a run dir (its metrics.jsonl), a metrics.jsonl or a golden JSON file."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise BadInput(f"{path}: not found (give a run dir with metrics.jsonl, or a tests/golden/*.json file)")
    if path.endswith(".json"):
        g = load_golden(path)
        rows = g["train"] + g["val"]
    else:
        rows = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                try:
                    rows += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise BadInput(f"{path}: line {i} is not JSON ({e.msg})") from None
    curve = {k: {} for k in TRAIN_KEYS + VAL_KEYS}
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise BadInput(f"{path}: row {str(row)[:60]!r} has no integer 'step'")
        keys = TRAIN_KEYS if "loss" in row else VAL_KEYS if "val_loss" in row else ()
        for k in keys:
            curve[k][int(row["step"])] = row.get(k)
    if not curve["loss"]:
        raise BadInput(f"{path}: no training rows (rows with 'step' and 'loss')")
    return {k: v for k, v in curve.items() if v}


@dataclass
class Tolerance:
    """exact: bit-identical floats (NaN equals NaN); else |test - base| <= atol + rtol * |base|."""

    rtol: float = 0.0
    atol: float = 0.0
    exact: bool = True

    def ok(self, base: float, test: float) -> bool:
        if math.isnan(base) or math.isnan(test):
            return math.isnan(base) and math.isnan(test)
        if self.exact:
            return base == test
        return abs(test - base) <= self.atol + self.rtol * abs(base)

    def __str__(self):
        return "exact (bit-identical floats)" if self.exact else f"rtol {self.rtol:g}, atol {self.atol:g}"


EXACT = Tolerance()
# Another CPU kind (other MKL/ATen/oneDNN kernels) moves fp32 results in the last bits, and training amplifies
# that. Emulating two other kinds on the recording machine (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2;
# ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41) gave largest relative
# differences over all recipes and steps: loss 2.9e-6, val_loss 8.3e-7, grad_norm 5.0e-4, lr 0 (the schedule
# is Python arithmetic). The fallback leaves about 10x room.
FALLBACK = {"loss": Tolerance(3e-5, exact=False), "val_loss": Tolerance(3e-5, exact=False),
            "grad_norm": Tolerance(5e-3, exact=False), "lr": EXACT}


def describe(tols: dict) -> str:
    names = sorted(tols, key=lambda m: str(tols[m]))
    groups = {}
    for m in names:
        groups.setdefault(str(tols[m]), []).append(m)
    return "; ".join(f"{'/'.join(ms)}: {t}" for t, ms in groups.items())


def uniform(tol: Tolerance) -> dict:
    return {m: tol for m in TRAIN_KEYS + VAL_KEYS}


def compare(base: dict, test: dict, tols: dict) -> list[tuple]:
    """Rows (metric, step, baseline, test, abs diff or None, ok) over the union of steps of every metric;
    `tols` maps each metric to its Tolerance. A step missing on one side is a mismatch."""
    rows = []
    for metric in TRAIN_KEYS + VAL_KEYS:
        b, t = base.get(metric, {}), test.get(metric, {})
        for step in sorted(set(b) | set(t)):
            bv, tv = b.get(step, "missing"), t.get(step, "missing")
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (bv, tv))
            ok = numbers and tols[metric].ok(float(bv), float(tv)) or (bv is None and tv is None)
            rows.append((metric, step, bv, tv, abs(tv - bv) if numbers else None, ok))
    return rows


def print_table(rows: list[tuple], full: bool = False) -> None:
    """loss and val_loss at every step; grad_norm and lr rows only where they differ (all with --full)."""
    print(f"  {'step':>5}  {'metric':<9}  {'baseline':>22}  {'test':>22}  {'abs diff':>9}")
    for metric, step, bv, tv, diff, ok in rows:
        if full or not ok or metric in ("loss", "val_loss"):
            d = "-" if diff is None else "0" if diff == 0 else f"{diff:.2e}"
            print(f"  {step:>5}  {metric:<9}  {bv!r:>22}  {tv!r:>22}  {d:>9}{'' if ok else '  <-- differs'}")
    for metric in TRAIN_KEYS + VAL_KEYS:
        mine = [r for r in rows if r[0] == metric]
        if mine:
            diffs = [r[4] for r in mine if r[4] is not None]
            gone = [f"{sum(r[i] == 'missing' for r in mine)} steps missing in {side}" for i, side in
                    ((2, "baseline"), (3, "test")) if any(r[i] == "missing" for r in mine)]
            max_diff = f"max abs diff {max(diffs):.3g}" if diffs else "no step on both sides"
            print(f"  {metric}: {sum(r[5] for r in mine)}/{len(mine)} steps match, "
                  + ", ".join([max_diff] + gone) + (" (the curves have different lengths)" if gone else ""))


def summary(rows: list[tuple]) -> str:
    bad = [r for r in rows if not r[5]]
    if not bad:
        return "match"
    first = min(bad, key=lambda r: r[1])
    return f"{len(bad)} of {len(rows)} values differ, first at step {first[1]} ({first[0]})"


# ---- golden files -----------------------------------------------------------------------------------
def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.json")


def load_golden(path: str) -> dict:
    try:
        with open(path) as f:
            g = json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: no stored curve; record it with --record --reason TEXT") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(g, dict) or not {"train", "val", "cpu", "data"} <= set(g):
        raise BadInput(f"{path}: not a golden curve file (needs train, val, cpu, data)")
    return g


def write_golden(name: str, run_dir: str, data_fp: dict, reason: str) -> str:
    """One JSON per recipe: a header (reason, command, versions, CPU) then one metrics row per line."""
    import lightning
    import numpy

    r, curve = RECIPES[name], read_curve(run_dir)
    train = [{"step": s, **{k: curve[k].get(s) for k in TRAIN_KEYS}} for s in sorted(curve["loss"])]
    val = [{"step": s, "val_loss": v} for s, v in sorted(curve.get("val_loss", {}).items())]
    head = {"recipe": name, "description": r.doc, "reason": reason,
            "recorded": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command(r), "needs": r.needs, "steps": r.steps,
            "env": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MKL_DYNAMIC=FALSE (one thread per process)",
            "data": {"build": "scripts/golden_recipes.py:build_data", "bios": BIOS, **data_fp},
            "versions": {"commit": _git_head(), "python": sys.version.split()[0], "numpy": numpy.__version__,
                         "lightning": lightning.__version__},
            "cpu": cpu_info()}
    lines = [json.dumps(head, indent=1)[:-2] + ","]
    for key, rows in (("train", train), ("val", val)):
        body = "[\n" + ",\n".join("  " + json.dumps(row) for row in rows) + "\n ]" if rows else "[]"
        lines.append(f' "{key}": {body}' + ("," if key == "train" else ""))
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    write_text(golden_path(name), "\n".join(lines) + "\n}\n")
    return golden_path(name)


def _git_head() -> str | None:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() or None


def recipe_tolerance(golden: dict, rtol: float | None = None, atol: float | None = None,
                     exact: bool = False) -> tuple[dict, str]:
    """Exact on the CPU kind that recorded the curve, else FALLBACK; given rtol/atol or exact win."""
    if rtol is not None or atol is not None:
        return uniform(Tolerance(rtol or 0.0, atol or 0.0, exact=False)), "tolerance from the command line"
    here, there = cpu_info(), golden["cpu"]
    if here == there or exact:
        why = "same CPU fingerprint as the recording" if here == there else "--exact on another CPU kind"
        return uniform(EXACT), why
    diff = ", ".join(f"{k} {there.get(k)!r} -> {here.get(k)!r}" for k in here if here[k] != there.get(k))
    return FALLBACK, f"another CPU kind than the recording ({diff[:200]})"


# ---- command line -----------------------------------------------------------------------------------
class _Parser(ArgumentParser):
    def error(self, message):  # raised, not exited: main() returns 2 in-process too
        raise BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scripts/loss_compare.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="recipes:\n" + "\n".join(f"  {r.name:<16} {r.steps:>3} steps  {r.doc}"
                                                for r in RECIPES.values()))
    p.add_argument("--recipe", action="append", default=[], metavar="NAME",
                   help="run this golden recipe and compare it with tests/golden/NAME.json (repeatable)")
    p.add_argument("--all", action="store_true", help="every recipe")
    p.add_argument("--list", action="store_true", help="list the recipes with their commands and exit")
    p.add_argument("--baseline", metavar="PATH", help="run dir, metrics.jsonl or golden JSON: the reference curve")
    p.add_argument("--test", metavar="PATH", help="run dir, metrics.jsonl or golden JSON: the curve under test")
    p.add_argument("--exact", action="store_true",
                   help="bit-identical floats (default for --baseline/--test, and for recipes on the CPU kind "
                        "that recorded them; elsewhere recipes use the FALLBACK tolerances: %s)" % describe(FALLBACK))
    p.add_argument("--rtol", type=nonnegative_float,
                   help="relative tolerance |test-base| <= atol + rtol*|base| (e.g. bf16 GPU), >= 0")
    p.add_argument("--atol", type=nonnegative_float, help="absolute tolerance (see --rtol), >= 0")
    p.add_argument("--record", action="store_true",
                   help="re-record the stored curves of the chosen recipes (trains each twice; refuses if the "
                        "two runs differ). Needs --reason")
    p.add_argument("--reason", help="why the curves legitimately moved; stored in each golden file's header")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted override for every training command (a needed run too), e.g. "
                        "optim.lr=0.003001: a perturbation must show as a mismatch (not with --record)")
    p.add_argument("--keep", metavar="DIR", help="keep data and runs in DIR (default: a temporary dir, removed)")
    p.add_argument("--full", action="store_true", help="print every metric at every step (default: loss, "
                   "val_loss, and grad_norm/lr rows that differ)")
    return p


def _check_args(a) -> list[str]:
    if a.list:
        return []
    names = list(RECIPES) if a.all else a.recipe
    pair = (a.baseline is not None, a.test is not None)
    if pair[0] != pair[1]:
        raise BadInput("--baseline and --test go together")
    if bool(names) == pair[0]:
        raise BadInput("give --recipe NAME / --all, or --baseline PATH --test PATH (see --help)")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise BadInput(f"--recipe {unknown[0]}: unknown (known: {', '.join(RECIPES)})")
    if a.exact and (a.rtol is not None or a.atol is not None):
        raise BadInput("--exact and --rtol/--atol exclude each other")
    if a.record and (pair[0] or not (a.reason or "").strip()):
        raise BadInput("--record re-records recipes and needs --reason TEXT (stored in the golden file)")
    if a.record and a.override:
        raise BadInput("--override cannot be recorded: golden curves come from the recipes as written")
    if any("=" not in o for o in a.override):
        raise BadInput(f"--override {next(o for o in a.override if '=' not in o)!r}: expected KEY=VALUE")
    if a.override:  # an unknown key or a bad value is the user's, not a training failure
        from model.errors import MemlmError
        from train.config import load_config

        try:
            load_config(None, a.override)
        except MemlmError as e:
            raise BadInput(f"--override {' '.join(a.override)}: {e}") from None
    return names


def _record(names: list[str], work: str, reason: str) -> int:
    a, b = Workspace(os.path.join(work, "a")), Workspace(os.path.join(work, "b"))
    for name in names:  # two independent workspaces: the data build and the training must both repeat
        rows = compare(read_curve(a.run(name)), read_curve(b.run(name)), uniform(EXACT))
        if a.fingerprint != b.fingerprint or summary(rows) != "match":
            print_table(rows)
            print(f"loss_compare: NOT RECORDED: {name} is not deterministic ({summary(rows)}; data "
                  f"{'same' if a.fingerprint == b.fingerprint else 'differs'})")
            return 1
    for name in names:
        print(f"[loss_compare] recorded {write_golden(name, a.done[name], a.fingerprint, reason)}")
    print(f"loss_compare: RECORDED {len(names)} recipe(s), each trained twice with bit-identical results")
    return 0


def _run_recipes(names: list[str], work: str, a) -> int:
    goldens = {n: load_golden(golden_path(n)) for n in names}  # bad input fails before any training
    ws, verdicts = Workspace(work, a.override), []
    for name in names:
        g = goldens[name]
        tols, why = recipe_tolerance(g, a.rtol, a.atol, a.exact)
        fp = ws.prepare()
        if (fp["tokenizer_hash"], fp["sha256"]) != (g["data"].get("tokenizer_hash"), g["data"].get("sha256")):
            verdicts.append(f"{name}: its data differs from the recording (data/ or the data build changed)")
            continue
        try:
            rows = compare(read_curve(golden_path(name)), read_curve(ws.run(name)), tols)
        except RunFailed as e:
            print(e)
            verdicts.append(f"{name}: training failed")
            continue
        print(f"\n{name} ({RECIPES[name].doc})\n  comparison {describe(tols)} ({why})")
        print_table(rows, a.full)
        if summary(rows) != "match":
            verdicts.append(f"{name}: {summary(rows)}")
    if verdicts:
        print(f"loss_compare: MISMATCH in {len(verdicts)} of {len(names)} recipe(s): " + "; ".join(verdicts))
        return 1
    print(f"loss_compare: MATCH: {len(names)} recipe(s) equal their stored curves ({', '.join(names)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        names = _check_args(a)
        if a.list:
            for r in RECIPES.values():
                print(f"{r.name} ({r.steps} steps): {r.doc}\n  {command(r)}")
            return 0
        if a.baseline is not None:
            tol = Tolerance(a.rtol or 0.0, a.atol or 0.0, exact=a.rtol is None and a.atol is None)
            rows = compare(read_curve(a.baseline), read_curve(a.test), uniform(tol))
            print(f"{a.baseline} vs {a.test}: {tol}")
            print_table(rows, a.full)
            ok = summary(rows) == "match"
            print(f"loss_compare: {'MATCH' if ok else 'MISMATCH'}: {summary(rows)} ({tol})")
            return 0 if ok else 1
        work = a.keep or tempfile.mkdtemp(prefix="loss-compare-")
        try:
            return _record(names, work, a.reason.strip()) if a.record else _run_recipes(names, work, a)
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
    except (BadInput, MemlmError) as e:  # MemlmError: e.g. --keep names a directory memlm did not make
        print(f"loss_compare.py: {e}", file=sys.stderr)  # the one-line error format of every script
        return 2


if __name__ == "__main__":
    sys.exit(main())

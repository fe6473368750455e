"""`memlm bank-info RUN`: sizes and usage of a run's memory bank, per level.

RUN is a run dir (its newest checkpoint), a checkpoint step dir, or a bank dir (with index.json).
For offloaded banks (memory.storage host/mmap) it reads the checkpoint's bank/ shards: rows stored,
rows ever touched (AdamW step count > 0), target tokens trained per node, bytes on disk (hard-linked
shards shared with other checkpoints counted once). For resident banks it reports the sizes only (the
rows live in model.safetensors and their usage is not tracked).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from model.errors import CheckpointError
from train.cli import ArgumentParser


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _locate(path: str) -> tuple[str | None, str | None]:
    """(bank dir or None, step dir or None)."""
    if os.path.isfile(os.path.join(path, "index.json")):
        return path, None
    if os.path.isfile(os.path.join(path, "bank", "index.json")):
        return os.path.join(path, "bank"), path
    from train.checkpoint import find_step_dir

    step = find_step_dir(path)
    bank = os.path.join(step, "bank")
    return (bank if os.path.isfile(os.path.join(bank, "index.json")) else None), step


def bank_info(bank_dir: str) -> dict:
    from memory import bank_io

    idx = bank_io.read_index(bank_dir)
    meta = idx["meta"]
    n_mem, d = int(meta["n_mem_layers"]), int(meta["d"])
    levels, files = [], []
    for lv in idx["levels"]:
        stored = touched = tokens = max_tokens = 0
        for entry, arrays in bank_io.load_level_shards(bank_dir, lv, None):
            files.append(os.path.join(bank_dir, entry["file"]))
            step, tok = np.asarray(arrays["step"]), np.asarray(arrays["tokens"])
            stored += len(step)
            touched += int((step > 0).sum())
            tokens += int(tok.sum())
            max_tokens = max(max_tokens, int(tok.max()) if len(tok) else 0)
        shard_files = [os.path.join(bank_dir, s["file"]) for s in lv["shards"]]
        apparent, allocated = bank_io.disk_bytes(shard_files)
        params = lv["n_rows"] * lv["row_dim"]
        levels.append({"level": lv["level"], "nodes": lv["n_rows"], "width": lv["width"], "params": params,
                       "weights_bytes": params * 4, "with_adamw_bytes": params * 12, "rows_stored": stored,
                       "rows_touched": touched, "tokens": tokens, "max_tokens_per_node": max_tokens,
                       "shards": len(lv["shards"]), "disk_bytes": apparent, "disk_allocated_bytes": allocated})
    apparent, allocated = bank_io.disk_bytes(files + [os.path.join(bank_dir, "index.json")])
    return {"bank_dir": bank_dir, "storage": "offloaded", "k": meta["k"], "widths": meta["widths"],
            "memory_layers": meta["layer_ids"], "d": d, "n_mem_layers": n_mem, "saved_by_world_size": meta["world_size"],
            "fetched_params": 3 * n_mem * d * sum(meta["widths"]), "levels": levels,
            "total": {"params": sum(l["params"] for l in levels), "rows_touched": sum(l["rows_touched"] for l in levels),
                      "nodes": sum(l["nodes"] for l in levels), "disk_bytes": apparent,
                      "disk_allocated_bytes": allocated}}


def resident_info(step_dir: str) -> dict:
    from train.checkpoint import read_run_config

    cfg = read_run_config(step_dir)
    if cfg.memory is None:
        raise CheckpointError(f"{step_dir}: this run has no memory bank (its config.yaml has no memory section); "
                              "bank-info is for memory runs")
    mem, mc = cfg.memory, cfg.model
    n_mem, d = len(mem.layer_ids(mc.n_layer)), mc.n_embd
    levels = []
    for l, (n, r) in enumerate(zip(mem.nodes_per_level(), mem.widths)):
        params = n * 3 * n_mem * r * d
        levels.append({"level": l + 1, "nodes": n, "width": r, "params": params, "weights_bytes": params * 4,
                       "with_adamw_bytes": params * 12})
    return {"bank_dir": None, "storage": mem.storage, "k": mem.k, "widths": list(mem.widths),
            "memory_layers": mem.layer_ids(mc.n_layer), "d": d, "n_mem_layers": n_mem,
            "fetched_params": 3 * n_mem * d * sum(mem.widths), "levels": levels,
            "total": {"params": sum(l["params"] for l in levels), "nodes": sum(l["nodes"] for l in levels)}}


def print_table(info: dict) -> None:
    print(f"bank: k={info['k']} widths={info['widths']} d={info['d']} memory layers={len(info['memory_layers'])} "
          f"({info['storage']}{', ' + info['bank_dir'] if info['bank_dir'] else ''})")
    print(f"fetched per context: {info['fetched_params']:,} params; bank: {info['total']['params']:,} params "
          f"({_fmt_bytes(info['total']['params'] * 4)} fp32, {_fmt_bytes(info['total']['params'] * 12)} with AdamW state)")
    offl = "rows_touched" in info["levels"][0]
    cols = ["level", "nodes", "r", "params", "fp32", "+AdamW"]
    if offl:
        cols += ["touched", "stored", "tokens", "max tok/node", "shards", "on disk"]
    rows = []
    for l in info["levels"]:
        row = [str(l["level"]), f"{l['nodes']:,}", str(l["width"]), f"{l['params']:,}", _fmt_bytes(l["weights_bytes"]),
               _fmt_bytes(l["with_adamw_bytes"])]
        if offl:
            pct = 100 * l["rows_touched"] / max(l["nodes"], 1)
            row += [f"{l['rows_touched']:,} ({pct:.1f}%)", f"{l['rows_stored']:,}", f"{l['tokens']:,}",
                    f"{l['max_tokens_per_node']:,}", str(l["shards"]), _fmt_bytes(l["disk_allocated_bytes"])]
        rows.append(row)
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(x) for c, x in zip(cols, w)))
    for r in rows:
        print("  ".join(v.rjust(x) for v, x in zip(r, w)))
    if offl:
        t = info["total"]
        print(f"rows ever touched: {t['rows_touched']:,} of {t['nodes']:,}; on disk: {_fmt_bytes(t['disk_allocated_bytes'])} "
              f"allocated ({_fmt_bytes(t['disk_bytes'])} apparent; shards hard-linked with other checkpoints count once)")
    else:
        print("resident bank: rows live in model.safetensors; touched rows / tokens are tracked for offloaded banks "
              "only (memory.storage=host|mmap)")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="memlm bank-info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run dir (newest checkpoint), checkpoint step dir, or bank dir with index.json")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.run):
        raise CheckpointError(f"{args.run}: no such run, checkpoint or bank directory")
    bank_dir, step_dir = _locate(args.run)
    info = bank_info(bank_dir) if bank_dir else resident_info(step_dir)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        print()
    else:
        print_table(info)
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm bank-info", main))

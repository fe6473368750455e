"""Memory runs (issue 5): what `train.pretrain` checks before a run with a `memory` section starts.

    cfg, router = prepare_memory_run(cfg, data)      # data = data.shards.open_data(cfg.data.path)

- `data.by_leaf` null (the default) becomes true for memory runs (rows packed from one cluster leaf)
  and false otherwise; an explicit value is kept.
- The memory config must fit the model (layer indices, widths), the data must carry cluster paths
  (`memlm cluster`) with as many levels as `memory.widths`, and the data's router (DATA/router.*)
  must have the bank's depth and branching. Each problem is a SystemExit naming both sides.
- The router is returned: the training model holds it and every checkpoint gets a copy
  (router.safetensors + router.json), so `load_run` can route prompts at inference.
No Lightning here.
"""
from __future__ import annotations

import dataclasses
import os


def _die(where: str, problem: str):
    raise SystemExit(f"memlm pretrain: {where}: {problem}")


def resolve_by_leaf(cfg):
    if cfg.data.by_leaf is not None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, by_leaf=cfg.memory is not None))


def check_data_paths(data, mem_cfg, prog: str = "memlm pretrain") -> int:
    """The data's number of cluster levels; exits if the shards lack paths or the depth differs from the bank."""
    widths = tuple(mem_cfg.widths)
    cluster_cmd = f"memlm cluster {data.path} --levels {len(widths)} --k {mem_cfg.k}"
    missing = [f"{split}/{sh.name}" for split in ("train", "val") if split in data.manifest["splits"]
               for sh in data.shards(split) if not sh.has_array("paths")]
    n_levels = data.n_levels or 0
    if not n_levels or missing:
        what = f"shards {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} have" if missing else \
            "the manifest has"
        raise SystemExit(f"{prog}: {data.path}: memory is on but {what} no cluster paths "
                         f"(*.paths.npy / n_levels); run `{cluster_cmd}` first")
    if n_levels != len(widths):
        raise SystemExit(f"{prog}: {data.manifest_path}: the data is clustered into n_levels={n_levels} but "
                         f"memory.widths={list(widths)} has {len(widths)} levels; give memory.widths {n_levels} "
                         f"entries, or re-cluster with `{cluster_cmd} --refit`")
    return n_levels


def load_data_router(data, mem_cfg, prog: str = "memlm pretrain"):
    from memory.router import Router

    if not Router.exists(data.path):
        raise SystemExit(f"{prog}: {os.path.join(data.path, 'router.json')}: not found; memory runs need the "
                         f"data's router (it is copied into every checkpoint): run `memlm cluster {data.path}`")
    router = Router.load(data.path)
    try:
        router.check_bank(mem_cfg)
    except ValueError as e:
        raise SystemExit(f"{prog}: {os.path.join(data.path, 'router.json')} vs memory config: {e}") from None
    return router


def prepare_memory_run(cfg, data):
    """(cfg with by_leaf resolved, router or None). Exits with a clear message on inconsistent input."""
    cfg = resolve_by_leaf(cfg)
    if cfg.memory is None:
        return cfg, None
    try:
        cfg.memory.validate(cfg.model)
    except ValueError as e:
        _die("memory config vs model", str(e))
    check_data_paths(data, cfg.memory)
    router = load_data_router(data, cfg.memory)
    return cfg, router

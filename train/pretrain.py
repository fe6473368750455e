"""Pretrain an anchor (or train memories) with Lightning. One entry for every launcher:

    python -m train.pretrain --config train/recipes/tiny-cpu.yaml data.path=data/bios trainer.max_steps=200
    memlm pretrain --config ...                                        (same thing)
    torchrun --nproc_per_node=8 -m train.pretrain --config ...         (DDP; ranks come from torchrun)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m train.pretrain ...

Devices and nodes are derived from torchrun's environment (WORLD_SIZE, LOCAL_WORLD_SIZE), never typed
twice. Config: a YAML recipe plus dotted overrides (`optim.lr=3e-4`); see train/config.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Bit-exact CPU runs: MKL must not change its thread count with the machine's load (it may otherwise).
os.environ.setdefault("MKL_DYNAMIC", "FALSE")


def _env_world() -> tuple[int, int, int, int]:
    """(world_size, local_world_size, num_nodes, rank) from torchrun's variables (1 process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    rank = int(os.environ.get("RANK", "0"))
    if world % local:
        raise SystemExit(f"memlm pretrain: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
    return world, local, world // local, rank


def print0(*args, **kw):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kw, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memlm pretrain",
        description="Pretrain an anchor with Lightning (python, torchrun single/multi-node). "
                    "Overrides are dotted key=value pairs, e.g. optim.lr=3e-4 trainer.max_steps=200.")
    p.add_argument("--config", "-c", help="YAML recipe (e.g. train/recipes/tiny-cpu.yaml); defaults otherwise")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value (unknown keys are an error)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _resolve_resume(cfg) -> str | None:
    """The step dir to resume from, or None for a fresh start."""
    from train.checkpoint import find_step_dir, latest_checkpoint

    r = cfg.checkpoint.resume
    if r == "none":
        if latest_checkpoint(cfg.run_dir):
            raise SystemExit(f"memlm pretrain: {cfg.run_dir} already has checkpoints; continue it with "
                             "checkpoint.resume=auto, or choose another name= (or delete the run)")
        return None
    if r == "auto":
        return latest_checkpoint(cfg.run_dir)
    if not os.path.exists(r):
        raise SystemExit(f"memlm pretrain: checkpoint.resume={r}: no such checkpoint directory")
    try:
        return find_step_dir(r)
    except FileNotFoundError as e:
        raise SystemExit(f"memlm pretrain: checkpoint.resume: {e}") from None


def _trim_metrics(path: str, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (a killed run may have logged past it)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    keep = [line for line in rows if json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _precision(cfg, cuda: bool) -> str:
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16-mixed" if cuda else "32-true"
    return p


def _strategy(cfg, world: int):
    s = cfg.trainer.strategy
    if s == "auto":
        return "ddp" if world > 1 else "auto"
    if s == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(state_dict_type="full")
    return s


def run(cfg) -> dict:
    """Train per `cfg`; returns a summary dict. Raises SystemExit with a message on user errors."""
    import lightning as L
    import torch

    from data.shards import open_data
    from train.build import model_config_for_data
    from train.callbacks import NonFiniteLossError, RunCheckpoint, TrainMonitor
    from train.checkpoint import read_data_state, read_run_config
    from train.config import save_config
    from train.flops import device_peak_flops
    from train.lit import LitLM, PackedDataModule

    import warnings

    # the val loader is sized on purpose (one pass); the train loader has no __len__ (endless)
    warnings.filterwarnings("ignore", message=r".*IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    world, local, num_nodes, rank = _env_world()
    if not cfg.data.path:
        raise SystemExit("memlm pretrain: data.path is not set (a data dir written by `memlm prepare`)")
    try:
        data = open_data(cfg.data.path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"memlm pretrain: data.path={cfg.data.path}: {e}") from None
    tokenizer = data.tokenizer()
    cfg = model_config_for_data(cfg, int(data.vocab_size))
    # memory runs (issue 5): by_leaf default, cluster paths / levels / router checks; the router goes into checkpoints
    from train.memory_run import prepare_memory_run

    cfg, router = prepare_memory_run(cfg, data)

    resume_dir = _resolve_resume(cfg)
    if resume_dir:
        old = read_run_config(resume_dir)
        if old.model.to_dict() != cfg.model.to_dict():
            raise SystemExit(f"memlm pretrain: {resume_dir}: the checkpoint's model config differs from this "
                             "config; resume with the same model.* settings")

    run_dir = cfg.run_dir
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    start_step = 0
    if resume_dir:
        with open(os.path.join(resume_dir, "meta.json")) as f:
            start_step = int(json.load(f)["step"])
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        if resume_dir:
            _trim_metrics(metrics_path, start_step)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)

    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cuda = torch.cuda.is_available()
    precision = _precision(cfg, cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    module = LitLM(cfg, tokenizer=tokenizer)
    if router is not None:  # memory run: MemoryLM.save_checkpoint_files copies it into each step dir
        module.model.router = router
    module.resume_dir = resume_dir
    start_batch = 0
    if resume_dir:
        state = read_data_state(resume_dir, rank)
        if state is not None and state.get("world_size") == world:
            start_batch = int(state["batches"])
        else:  # e.g. a different world size: the position in micro-batches per rank
            start_batch = start_step * cfg.optim.accumulate
    datamodule = PackedDataModule(cfg, start_batch=start_batch)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.accumulate * world
    fpt = module.model.flops_per_token(cfg.data.seq_len) if hasattr(module.model, "flops_per_token") else None
    peak = device_peak_flops("cuda" if cuda else "cpu", precision)
    if peak is None:
        print0("memlm pretrain: unknown device peak FLOP/s; MFU shows n/a")

    logger = False
    if cfg.logging.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
        logger = WandbLogger(project=cfg.logging.project, name=cfg.name, save_dir=run_dir,
                             mode=cfg.logging.wandb_mode, config=cfg.to_dict())
    elif cfg.logging.logger != "none":
        raise SystemExit(f"memlm pretrain: logging.logger={cfg.logging.logger!r}: expected wandb or none")

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    callbacks = [TrainMonitor(cfg, metrics_path, tokens_per_step, fpt, peak, ckpt_dir),
                 RunCheckpoint(cfg, run_dir, tokens_per_step)]
    t = cfg.trainer
    val_batches = t.val_batches if t.val_every > 0 else 0
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=local if world > 1 else 1,
        num_nodes=num_nodes,
        strategy=_strategy(cfg, world),
        precision=precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=cfg.optim.accumulate,
        gradient_clip_val=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else None,
        val_check_interval=(t.val_every * cfg.optim.accumulate) if t.val_every > 0 else None,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every,
        default_root_dir=run_dir,
    )
    n_params = sum(p.numel() for p in module.model.parameters())
    print0(f"memlm pretrain: run {run_dir} | {n_params / 1e6:.2f}M params | world {world} "
           f"({num_nodes} node(s) x {local}) | {precision} | {tokens_per_step:,} tokens/step | "
           + (f"resuming from {resume_dir} (step {start_step})" if resume_dir else "fresh start"))
    t0 = time.time()
    try:
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=os.path.join(resume_dir, "optimizer.pt") if resume_dir else None)
    except NonFiniteLossError as e:
        raise SystemExit(f"memlm pretrain: {e}") from None
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    return {"run_dir": run_dir, "step": trainer.global_step, "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    from train.config import ConfigError, load_config

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"memlm pretrain: {e}") from None
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    summary = run(cfg)
    print0(f"memlm pretrain: done, step {summary['step']} in {summary['seconds']:.1f}s -> {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm pretrain", main))

"""Pretrain an anchor (or train memories) on Lightning Fabric. One entry for every launcher:

    python -m train.pretrain --config train/recipes/tiny-cpu.yaml data.path=data/bios trainer.max_steps=200
    memlm pretrain --config ...                                        (same thing)
    torchrun --nproc_per_node=8 -m train.pretrain --config ...         (DDP; ranks come from torchrun)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m train.pretrain ...

Devices and nodes are derived from torchrun's environment (WORLD_SIZE, LOCAL_WORLD_SIZE), never typed
twice. Config: a YAML recipe plus dotted overrides (`optim.lr=3e-4`); see train/config.py. `run(cfg)`
checks everything (config, data, init_from, the checkpoint to resume) before it builds anything, then
hands the pieces to train.loop.fit.
"""
from __future__ import annotations

import os
import sys
import time

from train import claim

claim()  # first: a ./data folder or a PyPI `data` must not shadow memlm's packages

# Bit-exact CPU runs: MKL must not change its thread count with the machine's load (it may otherwise).
os.environ.setdefault("MKL_DYNAMIC", "FALSE")


def _env_world() -> tuple[int, int, int, int]:
    """(world_size, local_world_size, num_nodes, rank) from torchrun's variables (1 process without them)."""
    from model.errors import ConfigError

    def env_int(name: str, default: int, low: int) -> int:
        text = os.environ.get(name, str(default))
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise ConfigError(f"{name}={text!r}: must be an integer >= {low} (torchrun sets it; unset it to train "
                              "in one process)")
        return value

    world = env_int("WORLD_SIZE", 1, 1)
    local = env_int("LOCAL_WORLD_SIZE", world, 1)
    rank = env_int("RANK", 0, 0)
    if world % local:
        raise ConfigError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local} (torchrun's environment)")
    if rank >= world:
        raise ConfigError(f"RANK={rank}: must be below WORLD_SIZE={world} (torchrun's environment)")
    return world, local, world // local, rank


def print0(*args, **kw):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kw, flush=True)


def build_parser():
    from train.cli import ArgumentParser

    p = ArgumentParser(
        prog="memlm pretrain",
        description="Pretrain an anchor or train memories (python, torchrun single/multi-node). Overrides are "
                    "dotted key=value pairs, e.g. optim.lr=3e-4 trainer.max_steps=200; every key is in "
                    "train/config.py and `--print-config` shows the resolved values.")
    p.add_argument("--config", "-c", help="YAML recipe (e.g. train/recipes/tiny-cpu.yaml); defaults otherwise")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value, before or after the options (unknown "
                                               "keys and values out of range are an error naming the key)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _fabric(cfg, world: int, local: int, num_nodes: int):
    import torch
    from lightning.fabric import Fabric

    cuda = torch.cuda.is_available()
    t = cfg.trainer
    precision = ("bf16-mixed" if cuda else "32-true") if t.precision == "auto" else t.precision
    strategy = ("ddp" if world > 1 else "auto") if t.strategy == "auto" else t.strategy
    loggers = []
    if cfg.logging.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
        loggers.append(WandbLogger(project=cfg.logging.project, name=cfg.name, save_dir=cfg.run_dir,
                                   mode=cfg.logging.wandb_mode, config=cfg.to_dict()))
    fabric = Fabric(accelerator="cuda" if cuda else "cpu", devices=local if world > 1 else 1, num_nodes=num_nodes,
                    strategy=strategy, precision=precision, loggers=loggers)
    fabric.launch()
    return fabric, precision


def _prepare_run_dir(cfg, resume_dir: str | None, resume_step: int | None) -> None:
    """Rank 0, before any rank writes: the trajectory record (the step this attempt continues from: newer
    step dirs are an earlier attempt's, never resumed by resume=auto), the run's config.yaml, and
    metrics.jsonl cut back to the resumed step (a killed run may have logged past its last checkpoint) or
    started afresh."""
    from model.atomic import read_jsonl, rewrite_jsonl
    from train.checkpoint import start_trajectory
    from train.config import save_config

    os.makedirs(cfg.run_dir, exist_ok=True)
    start_trajectory(cfg.run_dir, resume_dir, resume_step)  # first: the run's files change after it
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        keep = [] if resume_step is None else [r for r in read_jsonl(metrics) if r.get("step", 0) <= resume_step]
        rewrite_jsonl(metrics, keep)


def run(cfg) -> dict:
    """Train per `cfg`; returns {"run_dir", "step", "seconds"}. Raises MemlmError subclasses for every
    user mistake (bad config, data, init_from, damaged checkpoint) and TrainingError for a nan/inf loss."""
    import torch

    from model.errors import ConfigError
    from train import build, checkpoint

    world, local, num_nodes, rank = _env_world()
    data = build.open_training_data(cfg)
    tokenizer = data.tokenizer()
    snapshot = checkpoint.DataSnapshot.take(data)  # every checkpoint carries the tokenizer the run started with
    cfg, init, router = build.resolve_run(cfg, data)
    if init is not None and init.grown:
        frozen = cfg.memory is not None and cfg.memory.freeze_anchor
        print0(f"memlm pretrain: {init.grown}" + ("; memory.freeze_anchor=true keeps the new rows at that value"
                                                  if frozen else ""))
    if cfg.trainer.strategy == "fsdp" and (cfg.memory is not None or not torch.cuda.is_available()):
        why = "memory runs train with ddp (FSDP does not shard the bank)" if cfg.memory is not None else \
            "Lightning's FSDP needs GPUs; use trainer.strategy=ddp (or auto) on CPU"
        raise ConfigError(f"trainer.strategy=fsdp: {why}")
    resume_dir = checkpoint.choose_resume(cfg, log=lambda msg: print0(f"memlm pretrain: {msg}"))
    if resume_dir:
        checkpoint.check_resume(checkpoint.read_run_config(resume_dir), cfg, resume_dir, world)
        resume_step = checkpoint.read_step(resume_dir)  # a damaged meta.json fails here, before any write
        checkpoint.check_same_data(resume_dir, data)
    own = resume_dir and os.path.realpath(resume_dir).startswith(os.path.realpath(cfg.run_dir) + os.sep)
    if own:
        checkpoint.check_later_steps(cfg.run_dir, resume_step)
    if not own:  # a new run (or one resumed from another's checkpoint): on every rank, before any write
        checkpoint.check_fresh_run_dir(cfg.run_dir)
    checkpoint.check_run_entries(cfg.run_dir)
    lock = checkpoint.lock_run_dir(cfg.run_dir) if rank == 0 else None  # one writer per run directory
    try:
        return _train(cfg, snapshot, tokenizer, init, router, resume_dir, (world, local, num_nodes))
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, snapshot, tokenizer, init, router, resume_dir, layout) -> dict:
    """`run` once the run is resolved, checked and locked: build, restore, fit."""
    import torch
    from lightning.fabric.utilities.seed import seed_everything

    from train import build, checkpoint, loop
    from train.flops import device_peak_flops, measure_cpu_peak

    world, local, num_nodes = layout
    fabric, precision = _fabric(cfg, world, local, num_nodes)
    if fabric.is_global_zero and not resume_dir:
        _prepare_run_dir(cfg, None, None)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    live_dir = None if cfg.memory is None else cfg.memory.bank_dir or os.path.join(cfg.run_dir, "bank_live")
    model = build.build_model(cfg, init, live_dir)
    if router is not None:  # memory runs: every checkpoint carries the router (routes prompts at inference)
        model.router = router
    if cfg.trainer.compile:
        model.compile()
    wrapped = fabric.setup_module(model)
    optimizers = build.Optimizers(model, cfg, fabric.world_size, wrap=fabric.setup_optimizers)
    ckpt = checkpoint.Checkpointer(cfg, model, optimizers, fabric.global_rank, fabric.world_size,
                                   barrier=fabric.barrier, data=snapshot, **_state_io(fabric, model, wrapped, optimizers))
    ckpt.remove_leftovers()
    fabric.barrier()
    state = loop.TrainState()
    batches = 0
    if resume_dir:  # last before training: it restores this rank's RNG too
        state.step, batches = ckpt.load(resume_dir)
        if fabric.is_global_zero:  # after the load: a damaged checkpoint fails before the run's files change
            _prepare_run_dir(cfg, resume_dir, state.step)
    bank = model.bank if model.has_memory else None
    train_loader = build.make_loader(cfg, "train", fabric.global_rank, fabric.world_size, batches, bank=bank)
    val_loader = build.make_loader(cfg, "val", fabric.global_rank, fabric.world_size) if cfg.trainer.val_every else None

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.accumulate * fabric.world_size
    cpu = fabric.device.type == "cpu"
    peak = device_peak_flops(fabric.device, precision)
    dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    progress = loop.Progress(fabric, os.path.join(cfg.run_dir, "metrics.jsonl"), cfg.trainer.max_steps, state.step,
                             tokens_per_step, model.flops_per_token(cfg.data.seq_len), peak,
                             remeasure_peak=(lambda: measure_cpu_peak(dtype, refresh=True)) if cpu else None)
    if peak is None:
        print0("memlm pretrain: unknown device peak FLOP/s; MFU shows n/a")
    print0(f"memlm pretrain: run {cfg.run_dir} | {model.num_params() / 1e6:.2f}M params | world {fabric.world_size} "
           f"({num_nodes} node(s) x {local}) | {precision} | {tokens_per_step:,} tokens/step | "
           + (f"resuming from {resume_dir} (step {state.step})" if resume_dir else "fresh start"))
    t0 = time.time()
    try:
        loop.fit(fabric, cfg, wrapped, optimizers, train_loader, val_loader, ckpt, state, progress,
                 loop.token_bytes(tokenizer, cfg.model.vocab_size))
        for logger in fabric.loggers:
            logger.finalize("success")
    finally:
        if bank is not None:
            bank.close()
        import torch.distributed as dist

        if fabric.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return {"run_dir": cfg.run_dir, "step": state.step, "seconds": time.time() - t0}


def _state_io(fabric, model, wrapped, optimizers) -> dict:
    """How the Checkpointer reads and restores the model and optimizer state: the modules' own state
    dicts, or under FSDP full (gathered) state dicts through torch.distributed.checkpoint."""
    from model.weights import read_weights

    from lightning.fabric.strategies import FSDPStrategy

    if not isinstance(fabric.strategy, FSDPStrategy):
        def load(step_dir: str, optim_sd: dict) -> None:
            from model.weights import load_weights

            load_weights(model, os.path.join(step_dir, "model.safetensors"))
            optimizers.load_state_dict(optim_sd)

        return {"state_dicts": lambda: (model.state_dict(), optimizers.state_dict()), "load_state": load}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state_dicts():
        msd, osd = get_state_dict(wrapped, optimizers.dense, options=options)
        return msd, {**optimizers.state_dict(dense=osd)}

    def load_fsdp(step_dir: str, optim_sd: dict) -> None:
        set_state_dict(wrapped, optimizers.dense, model_state_dict=read_weights(os.path.join(step_dir, "model.safetensors")),
                       optim_state_dict=optim_sd["dense"], options=StateDictOptions(full_state_dict=True))
        optimizers.schedule.load_state_dict(optim_sd["schedule"])

    return {"state_dicts": state_dicts, "load_state": load_fsdp}


def main(argv: list[str] | None = None) -> int:
    from train.config import config_warnings, load_config

    # intermixed: key=value overrides may come before and after options (`... data.path=D --print-config x=1`)
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    for msg in config_warnings(cfg):
        print0(f"warning: {msg}", file=sys.stderr)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    summary = run(cfg)
    print0(f"memlm pretrain: done, step {summary['step']} in {summary['seconds']:.1f}s -> {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm pretrain", main))

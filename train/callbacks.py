"""Training callbacks: metrics.jsonl + progress line + NaN guard (TrainMonitor), run checkpoints (RunCheckpoint).

Both run on every rank (collectives must match); only rank 0 writes shared files.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import time

import lightning as L
import torch
import torch.distributed as dist

from train import checkpoint as ck

BIG = 2**62  # "no bad step yet"


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, last_ckpt: str | None):
        self.step, self.last_ckpt = step, last_ckpt
        keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
        super().__init__(f"non-finite loss (nan/inf) at step {step}; stopping without a checkpoint ({keep})")


def _distributed(trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def first_bad_step(trainer, module) -> int | None:
    """The first optimizer step with a non-finite loss on any rank (one sync + one collective)."""
    b = module.bad_step
    b = torch.full((), BIG, dtype=torch.long, device=module.device) if b is None else b.clone()
    b = torch.where(b < 0, torch.full_like(b, BIG), b)
    if _distributed(trainer):
        dist.all_reduce(b, op=dist.ReduceOp.MIN)
    v = int(b.item())
    return None if v >= BIG else v


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class TrainMonitor(L.Callback):
    """Every `log_every` optimizer steps: one JSON row in metrics.jsonl (rank 0), the logger (wandb),
    and a progress line. Also checks the loss for nan/inf at those steps (the step is recorded on the
    device at every step, so the message names the first bad step)."""

    def __init__(self, cfg, metrics_path: str, tokens_per_step: int, flops_per_token: float | None,
                 peak_flops: float | None, ckpt_dir: str):
        self.cfg = cfg
        self.metrics_path = metrics_path
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # per device
        self._peak_remeasured = False
        self.ckpt_dir = ckpt_dir
        self._acc = None
        self._n = 0
        self._last_step = None

    # rank-0 file output
    def _write(self, trainer, row: dict) -> None:
        if trainer.is_global_zero:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if trainer.logger is not None:
                trainer.logger.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))
                                            and k != "step"}, step=row["step"])

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step
        self._t_start = self._t_last = time.perf_counter()
        self._step_start = self._step_last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = pl_module.step_loss
        self._acc = loss if self._acc is None else self._acc + loss
        self._n += 1
        step = trainer.global_step
        if step == self._last_step:  # inside a gradient-accumulation window
            return
        self._last_step = step
        step_loss, self._acc, n = self._acc / self._n, None, self._n
        self._n = 0
        max_steps = self.cfg.trainer.max_steps
        if step % self.cfg.trainer.log_every and step != max_steps:
            return
        bad = first_bad_step(trainer, pl_module)
        if bad is not None:
            latest = ck.latest_checkpoint(os.path.dirname(self.ckpt_dir))
            raise NonFiniteLossError(bad, latest)
        if _distributed(trainer):
            step_loss = step_loss.clone()
            dist.all_reduce(step_loss)  # rank shares of the global mean -> the global mean
        now = time.perf_counter()
        dt = now - self._t_last
        tok_s = (step - self._step_last) * self.tokens_per_step / dt if dt > 0 else float("nan")
        mfu = None
        if self.flops_per_token and self.peak_flops:
            mfu = self.flops_per_token * tok_s / (self.peak_flops * trainer.world_size)
            if mfu > 1 and pl_module.device.type == "cpu" and not self._peak_remeasured:
                # the CPU peak was measured while other jobs loaded the cores: measure it once more
                from train.flops import measure_cpu_peak

                self._peak_remeasured = True
                dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
                self.peak_flops = measure_cpu_peak(dtype, refresh=True)
                mfu = self.flops_per_token * tok_s / (self.peak_flops * trainer.world_size)
        done = step - self._step_start
        eta = (now - self._t_start) / done * (max_steps - step) if done else float("nan")
        opt = trainer.optimizers[0]
        gn = pl_module.grad_norm
        row = {
            "step": step,
            "loss": float(step_loss.item()),
            "lr": float(opt.param_groups[0]["lr"]),
            "grad_norm": float(gn.item()) if gn is not None else None,
            "tokens": step * self.tokens_per_step,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "time": time.time(),
        }
        self._t_last, self._step_last = now, step
        self._write(trainer, row)
        if trainer.is_global_zero:
            mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
            gn_s = f"{row['grad_norm']:.3f}" if row["grad_norm"] is not None else "n/a"
            print(f"step {step}/{max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | gnorm {gn_s} | "
                  f"{tok_s:,.0f} tok/s | mfu {mfu_s} | eta {_fmt_eta(eta)}", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or pl_module.last_val is None:
            return
        row = {"step": trainer.global_step, **pl_module.last_val, "time": time.time()}
        self._write(trainer, row)
        if trainer.is_global_zero:
            bpb = f"{row['val_bpb']:.4f}" if row["val_bpb"] is not None else "n/a"
            print(f"step {row['step']} | val_loss {row['val_loss']:.4f} | val_bpb {bpb}", flush=True)


class RunCheckpoint(L.Callback):
    """Writes runs/<name>/checkpoints/step-XXXXXXX every `checkpoint.every` steps and at max_steps:
    written as step-XXXXXXX.tmp, renamed when complete, older ones pruned to keep_last_k."""

    def __init__(self, cfg, run_dir: str, tokens_per_step: int):
        self.cfg = cfg
        self.run_dir = run_dir
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.tokens_per_step = tokens_per_step
        self._last_saved = None
        self._last_seen = None

    def on_train_start(self, trainer, pl_module):
        self._last_saved = self._last_seen = trainer.global_step
        if trainer.is_global_zero and os.path.isdir(self.ckpt_dir):  # leftovers of a crash mid-write
            for name in os.listdir(self.ckpt_dir):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.ckpt_dir, name), ignore_errors=True)
        if pl_module.resume_dir:  # RNG states of this rank (the anchor has no dropout; memory may sample)
            path = os.path.join(pl_module.resume_dir, f"rng_rank{trainer.global_rank}.pt")
            if os.path.isfile(path):
                ck.set_rng_state(torch.load(path, weights_only=False))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_seen:
            return
        self._last_seen = step
        every = self.cfg.checkpoint.every
        if (every > 0 and step % every == 0) or step >= self.cfg.trainer.max_steps:
            self.save(trainer, pl_module, step)

    def save(self, trainer, pl_module, step: int) -> str:
        bad = first_bad_step(trainer, pl_module)  # never checkpoint after a nan
        if bad is not None:
            raise NonFiniteLossError(bad, ck.latest_checkpoint(self.run_dir))
        rank, zero = trainer.global_rank, trainer.is_global_zero
        final = os.path.join(self.ckpt_dir, ck.step_dir_name(step))
        tmp = final + ".tmp"
        if zero:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        trainer.strategy.barrier("memlm-ckpt-mkdir")
        trainer.save_checkpoint(os.path.join(tmp, "optimizer.pt"), weights_only=False)  # all ranks; rank 0 writes
        accumulate = self.cfg.optim.accumulate
        ck.write_json(os.path.join(tmp, f"data_state_rank{rank}.json"), {
            "rank": rank, "world_size": trainer.world_size, "step": step,
            "batches": step * accumulate,  # micro-batches this rank consumed: the resume position
            "seq_len": self.cfg.data.seq_len, "batch_size": self.cfg.data.batch_size, "seed": self.cfg.seed,
        })
        torch.save(ck.rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        bank = getattr(pl_module.model, "bank", None)
        if hasattr(bank, "save_checkpoint"):  # offloaded bank (memory/offload.py): collective, every rank
            bank.save_checkpoint(os.path.join(tmp, "bank"))  # writes its own subtrees' shards; rank 0 the index
        if zero:
            from train.config import save_config

            ck.save_weights(pl_module.saved_state_dict, os.path.join(tmp, "model.safetensors"))
            pl_module.saved_state_dict = None
            if hasattr(pl_module.model, "save_checkpoint_files"):  # memory: bank/, router.*
                pl_module.model.save_checkpoint_files(tmp)
            save_config(self.cfg, os.path.join(tmp, "config.yaml"))
            ck.copy_tokenizer(self.cfg.data.path, os.path.join(tmp, "tokenizer"))
            ck.write_json(os.path.join(tmp, "meta.json"), _meta(self.cfg, trainer, pl_module, step,
                                                                 self.tokens_per_step))
        trainer.strategy.barrier("memlm-ckpt-written")
        if zero:
            if os.environ.get("MEMLM_TEST_CRASH_BEFORE_RENAME") == str(step):  # test hook
                os.kill(os.getpid(), signal.SIGKILL)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            ck.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last_k)
        trainer.strategy.barrier("memlm-ckpt-renamed")
        self._last_saved = step
        if os.environ.get("MEMLM_TEST_SIGKILL_AFTER_CKPT") == str(step):  # test hook: a hard kill
            os.kill(os.getpid(), signal.SIGKILL)
        return final


def _meta(cfg, trainer, pl_module, step, tokens_per_step) -> dict:
    import lightning

    try:
        from importlib.metadata import version

        memlm_version = version("memlm")
    except Exception:  # not installed (running from a checkout)
        memlm_version = None
    return {
        "step": step,
        "tokens_seen": step * tokens_per_step,
        "val_loss": (pl_module.last_val or {}).get("val_loss"),
        "val_bpb": (pl_module.last_val or {}).get("val_bpb"),
        "world_size": trainer.world_size,
        "time": time.time(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "memlm": memlm_version},
    }

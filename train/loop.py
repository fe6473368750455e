"""The training loop: `fit()` on Lightning Fabric, in the order a step happens.

    batch -> forward -> loss -> backward (x optim.accumulate) -> clip -> finite? -> dense + sparse
          optimizer step -> log -> validate -> finite weights? -> checkpoint

A nan/inf loss or gradient norm stops the run (TrainingError) before its update is applied, so no
checkpoint ever holds non-finite weights (see _Guard).

Fabric supplies the process group (torchrun's environment), DDP / FSDP wrapping, precision and the
loggers; everything else is in this file. The loss of a micro-batch is this rank's share of the global
mean: the summed cross-entropy over its targets divided by the number of targets on ALL ranks, so N
ranks with batch b train exactly like one process with batch N*b (DDP averages gradients, hence the
factor world_size). train/pretrain.py builds the pieces and calls `fit`.
"""
from __future__ import annotations

import datetime
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from lightning.fabric.strategies import FSDPStrategy

from model.atomic import JsonlAppender
from model.errors import TrainingError
from model.loss import IGNORE_INDEX, nll_sum, token_nll
from train.build import Optimizers
from train.config import RunConfig


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, and the latest validation (for meta.json)."""
    step: int = 0
    last_val: dict = field(default_factory=dict)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) over ranks, in place; a no-op for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def training_loss(model, batch: dict, world_size: int) -> torch.Tensor:
    """This rank's share of the global mean loss of a micro-batch (float32 scalar): the summed NLL of its
    targets / the number of targets over all ranks. Targets are labels != -100 ([B, T], already shifted)."""
    logits = model(batch["input_ids"], doc_lens=batch["doc_lens"], mem_path=batch["mem_path"])
    total, count = nll_sum(logits, batch["labels"])
    return total / _all_reduce(count.clone()).clamp(min=1).to(torch.float32)


def fit(fabric, cfg: RunConfig, model, optimizers: Optimizers, train_loader, val_loader, checkpointer,
        state: TrainState, progress: "Progress", token_bytes: torch.Tensor) -> None:
    """Train from `state.step` to trainer.max_steps. `model` is Fabric's wrapper of the LanguageModel
    (`raw` below is the model itself); batches are data/loader.py dicts."""
    t, accumulate, world = cfg.trainer, cfg.optim.accumulate, fabric.world_size
    raw = model.module  # the LanguageModel inside Fabric's wrapper
    bank = raw.bank if raw.has_memory else None
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    # 16-mixed: an inf gradient norm is the loss scaler's to handle (it skips the step, lowers the scale)
    check_norm = getattr(fabric.strategy.precision, "scaler", None) is None
    guard = _Guard(checkpointer, state.step, fabric.device)
    batches = iter(train_loader)
    model.train()
    while state.step < t.max_steps:
        # ---- forward + backward over the micro-batches (DDP syncs gradients on the last one only)
        shares = []
        for micro in range(accumulate):
            batch = fabric.to_device(next(batches))
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                share = training_loss(model, batch, world)
                fabric.backward(share * world / accumulate)
            if bank is not None:  # target tokens per fetched node (memlm bank-info)
                bank.count_tokens((batch["labels"] != IGNORE_INDEX).sum(1))
            shares.append(share.detach())
        # ---- clip the global gradient norm; a nan/inf loss or norm stops the run BEFORE the update
        # (one host sync a step, the same verdict on every rank), so no weights ever turn non-finite
        grad_norm = clip_gradients(fabric, model, optimizers, max_norm)
        guard.check_step(state.step + 1, torch.stack(shares), grad_norm if check_norm else None)
        # ---- dense step, sparse bank step, LR schedule (log the lr this update uses, not the next step's)
        lr = optimizers.lr
        optimizers.step()
        state.step += 1
        last = state.step == t.max_steps
        # ---- log (every log_every steps)
        if state.step % t.log_every == 0 or last:
            loss = _all_reduce(sum(shares[1:], shares[0]) / len(shares))  # mean over micro-batches, sum over ranks
            progress.train_row(state.step, float(loss.item()), lr, float(grad_norm.item()))
        # ---- validate
        if t.val_every > 0 and state.step % t.val_every == 0:
            state.last_val = validate(model, val_loader, t.val_batches, token_bytes, fabric.device)
            progress.val_row(state.step, state.last_val)
        # ---- checkpoint (only finite weights: a finite step can still overflow them, e.g. a huge lr)
        every = cfg.checkpoint.every
        if (every > 0 and state.step % every == 0) or last:
            guard.check_weights(state.step, optimizers.params())
            guard.saved = checkpointer.save(state.step, state.last_val)


def clip_gradients(fabric, model, optimizers: Optimizers, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global norm <= max_norm (inf: only measure); returns the norm before
    clipping (float32 scalar). With a sparse bank the norm covers the fetched rows too (all ranks)."""
    if isinstance(fabric.strategy, FSDPStrategy):  # the norm over every rank's shards
        return fabric.clip_gradients(model, optimizers.dense, max_norm=max_norm).float()
    fabric.strategy.precision.unscale_gradients(optimizers.dense)  # 16-mixed: undo the loss scale (else no-op)
    if optimizers.bank is not None:
        from memory.sparse_adam import clip_grad_norm_with_bank

        return clip_grad_norm_with_bank(optimizers.params(), optimizers.bank, max_norm).float()
    return torch.nn.utils.clip_grad_norm_(optimizers.params(), max_norm, foreach=True)


class _Guard:
    """Stops the run with a TrainingError at the first non-finite loss, gradient norm or weights, before
    they reach the weights or a checkpoint. Each check is reduced over ranks (MAX), so all ranks raise
    together. The message names the step, what was non-finite, the last checkpoint (finite: nothing
    non-finite is ever saved) and a remedy that works: a new run from it with init_from, which starts a
    fresh schedule (resuming this run with another optim.lr / optim.warmup_steps is refused)."""

    def __init__(self, checkpointer, start_step: int, device):
        self.checkpointer, self.start_step, self.device = checkpointer, start_step, device
        self.saved: str | None = None  # the last checkpoint this fit wrote

    def check_step(self, step: int, shares: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Before the update of `step`: shares = this rank's micro-batch losses; grad_norm None: not checked."""
        bad = [(~torch.isfinite(shares)).any()]
        if grad_norm is not None:
            bad.append(~torch.isfinite(grad_norm.to(self.device)))
        flags = _all_reduce(torch.stack(bad).to(self.device, torch.int32), dist.ReduceOp.MAX).tolist()
        if flags[0]:
            self._raise(f"non-finite loss (nan/inf) at step {step}")
        if len(flags) > 1 and flags[1]:
            self._raise(f"non-finite gradient norm (nan/inf) at step {step} (its loss was finite)")

    def check_weights(self, step: int, params) -> None:
        """Before checkpoint `step` is saved: every dense parameter (this rank's shard under FSDP) is finite."""
        bad = torch.zeros((), dtype=torch.int32, device=self.device)
        for p in params:
            bad |= (~torch.isfinite(p.detach())).any().to(self.device, torch.int32)
        if int(_all_reduce(bad, dist.ReduceOp.MAX).item()):
            self._raise(f"non-finite weights (nan/inf) after the update of step {step} (its loss and gradient "
                        "norm were finite)")

    def last_checkpoint(self) -> str | None:
        """The newest checkpoint of this trajectory: the last one this fit saved, else the newest intact
        one of the run at or before the step it started from (newer ones are from an earlier attempt)."""
        if self.saved:
            return self.saved
        from train.checkpoint import check_step_dir, step_dirs

        ckpts = step_dirs(os.path.join(self.checkpointer.cfg.run_dir, "checkpoints"))
        return next((p for s, p in reversed(ckpts) if s <= self.start_step and check_step_dir(p) is None), None)

    def _raise(self, what: str) -> None:
        good = self.last_checkpoint()
        if good:
            keep = (f"the last good checkpoint is {good}; to go on, start a new run (another name=) with "
                    f"init_from={good} and a lower optim.lr or a higher optim.warmup_steps (init_from starts a "
                    "fresh schedule; resuming this run with another schedule is refused), or start afresh if its "
                    "weights had already blown up")
        else:
            keep = "no checkpoint was written; start again with a lower optim.lr or a higher optim.warmup_steps"
        raise TrainingError(f"{what}; stopped without applying it or saving a checkpoint ({keep})")


# ---------------------------------------------------------------------------------------------
# validation

@torch.no_grad()
def validate(model, loader, n_batches: int, token_bytes: torch.Tensor, device) -> dict:
    """Loss and bits per byte over the first n_batches of the val split (the same rows every time),
    summed over ranks: {"val_loss": nats per target, "val_bpb": bits per UTF-8 byte (None if no bytes),
    "val_tokens": targets}. Special-token targets (EOS, <CALL>) carry no bytes and are left out of bpb."""
    model.eval()
    loader.dataset.load_state_dict(loader.dataset.state_at(0))
    token_bytes = token_bytes.to(device)
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # nats, targets, nats with bytes, bytes
    for _, batch in zip(range(n_batches), loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        logits = model(batch["input_ids"], doc_lens=batch["doc_lens"], mem_path=batch["mem_path"])
        labels = batch["labels"].reshape(-1)
        nll = token_nll(logits, labels)
        mask = labels != IGNORE_INDEX
        nbytes = token_bytes[labels.clamp(min=0)] * mask
        counted = nbytes > 0
        acc += torch.stack([nll[mask].sum().double(), mask.sum().double(), nll[counted].sum().double(),
                            nbytes.sum().double()])
    model.train()
    nats, n, nats_b, nbytes = _all_reduce(acc).tolist()
    return {"val_loss": nats / max(n, 1.0), "val_bpb": nats_b / math.log(2) / nbytes if nbytes > 0 else None,
            "val_tokens": int(n)}


def token_bytes(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes of every token id, int32 [vocab_size] (0 for special tokens and ids beyond the
    tokenizer), for bits per byte. Byte-level BPE: one byte per character of the token string."""
    out = torch.zeros(vocab_size, dtype=torch.int32)
    if tokenizer is None:
        return out
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    decoder = tokenizer.backend_tokenizer.decoder
    byte_level = decoder is not None and "ByteLevel" in repr(decoder)
    n = min(len(tokenizer), vocab_size)
    for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if i not in special and t is not None:
            out[i] = len(t) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# logging

class Progress:
    """metrics.jsonl rows (rank 0; a torn last line of a killed run is repaired on open), the Fabric
    loggers (wandb), and the progress line: loss, lr, grad norm, tokens/s, MFU, ETA. MFU counts the
    fetched memory units only, never the bank (model.flops_per_token)."""

    def __init__(self, fabric, metrics_path: str, max_steps: int, start_step: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float | None, remeasure_peak=None):
        self.fabric, self.max_steps, self.tokens_per_step = fabric, max_steps, tokens_per_step
        self.flops_per_token, self.peak_flops, self.remeasure_peak = flops_per_token, peak_flops, remeasure_peak
        self.metrics = JsonlAppender(metrics_path) if fabric.is_global_zero else None
        self.t_start = self.t_last = time.perf_counter()
        self.step_start = self.step_last = start_step

    def _write(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.append(row)
        self.fabric.log_dict({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                             step=row["step"])

    def train_row(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        now = time.perf_counter()
        dt = now - self.t_last
        tok_s = (step - self.step_last) * self.tokens_per_step / dt if dt > 0 else float("nan")
        mfu = self._mfu(tok_s)
        done = step - self.step_start
        eta = (now - self.t_start) / done * (self.max_steps - step) if done else float("nan")
        self.t_last, self.step_last = now, step
        self._write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": step * self.tokens_per_step,
                     "tokens_per_s": tok_s, "mfu": mfu, "time": time.time()})
        mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        eta_s = str(datetime.timedelta(seconds=int(eta))) if math.isfinite(eta) else "?"
        self.fabric.print(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
                          f"{tok_s:,.0f} tok/s | mfu {mfu_s} | eta {eta_s}", flush=True)

    def _mfu(self, tok_s: float) -> float | None:
        if not self.peak_flops or not self.flops_per_token or not math.isfinite(tok_s):
            return None
        mfu = self.flops_per_token * tok_s / (self.peak_flops * self.fabric.world_size)
        if mfu > 1 and self.remeasure_peak is not None:
            # a CPU peak measured while other jobs loaded the cores is too low: measure once more
            self.peak_flops, self.remeasure_peak = self.remeasure_peak(), None
            mfu = self.flops_per_token * tok_s / (self.peak_flops * self.fabric.world_size)
        return mfu

    def val_row(self, step: int, val: dict) -> None:
        self._write({"step": step, **val, "time": time.time()})
        bpb = f"{val['val_bpb']:.4f}" if val["val_bpb"] is not None else "n/a"
        self.fabric.print(f"step {step} | val_loss {val['val_loss']:.4f} | val_bpb {bpb}", flush=True)

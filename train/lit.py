"""Lightning glue: the LightningModule (loss, optimizer, schedule) and the DataModule (packed batches).

The model itself is plain torch (model/, memory/); `build_model` / `param_groups` live in train/build.py
(no Lightning) and are re-exported here.
"""
from __future__ import annotations

import math
import os

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from train.build import build_model, param_groups  # noqa: F401  (re-exported hooks)
from train.checkpoint import load_weights

IGNORE = -100


def lr_factor(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Multiplier of `lr` at optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if lr <= 0:
        return 1.0
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _GroupSchedule:
    """Picklable per-group LR lambda (LambdaLR saves callable objects in its state_dict)."""

    def __init__(self, lr, min_lr, warmup, max_steps):
        self.lr, self.min_lr, self.warmup, self.max_steps = lr, min_lr, warmup, max_steps

    def __call__(self, step):
        return lr_factor(step, self.lr, self.min_lr, self.warmup, self.max_steps)


def token_bytes(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes of every token id (0 for special tokens and ids beyond the tokenizer), for bits-per-byte.
    Byte-level BPE: each character of the token string is one byte; otherwise decode the id alone."""
    out = torch.zeros(vocab_size, dtype=torch.int32)
    if tokenizer is None:
        return out
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    byte_level = False
    try:
        dec = tokenizer.backend_tokenizer.decoder
        byte_level = dec is not None and "ByteLevel" in repr(dec)
    except AttributeError:
        pass
    n = min(len(tokenizer), vocab_size)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    for i, t in enumerate(toks):
        if i in special or t is None:
            continue
        out[i] = len(t) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return out


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits for a batch; the memory model also takes the rows' cluster paths."""
    if hasattr(model, "anchor"):  # MemoryLM
        return model(batch["input_ids"], doc_lens=batch.get("doc_lens"), mem_path=batch.get("mem_path"))
    return model(batch["input_ids"], doc_lens=batch.get("doc_lens"))


class LitLM(L.LightningModule):
    """Next-token training of an anchor (or memory model). Loss = sum of cross-entropy over targets
    (labels are already shifted; -100 ignored, <CALL> is an ordinary target) divided by the number of
    targets across ALL ranks, so DDP with batch b per rank equals one process with batch world*b."""

    def __init__(self, cfg, model: torch.nn.Module | None = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg)
        vocab = cfg.model.vocab_size
        self.register_buffer("token_bytes", token_bytes(tokenizer, vocab), persistent=False)
        self.grad_norm = None  # set each optimizer step (before clipping)
        self.step_loss = None  # detached loss of the last micro-batch (rank share; sum over ranks = mean)
        self.bad_step = None  # first optimizer step with a non-finite loss (device tensor, -1 = none)
        self.last_val = None
        self._val = None
        self.saved_state_dict = None
        self.resume_dir = None  # step dir being resumed (set by train.pretrain)
        self.bank_opt = None  # sparse lazy AdamW of an offloaded bank (memory/sparse_adam.py), see configure_optimizers
        self._nan_at = int(os.environ.get("MEMLM_TEST_NAN_AT_STEP", "0"))  # test hook
        if cfg.trainer.compile:
            self.model.compile()

    # ---- loss ----
    def _loss_sum(self, batch):
        logits = forward_logits(self.model, batch)
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
        return loss_sum, labels, logits

    def _global_count(self, labels) -> torch.Tensor:
        n = (labels != IGNORE).sum()
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            n = n.clone()
            dist.all_reduce(n)
        return n.clamp(min=1).to(torch.float32)

    def training_step(self, batch, batch_idx):
        loss_sum, labels, _ = self._loss_sum(batch)
        bank = getattr(self.model, "bank", None)
        if hasattr(bank, "count_tokens"):  # offloaded bank: target tokens per node (memlm bank-info)
            bank.count_tokens((labels != IGNORE).sum(1))
        n_global = self._global_count(labels)
        world = self.trainer.world_size
        share = loss_sum / n_global  # this rank's share of the global mean
        if self._nan_at and self.global_step + 1 == self._nan_at:
            share = share * float("nan")
        det = share.detach()
        self.step_loss = det
        bad = ~torch.isfinite(det)
        if self.bad_step is None:
            self.bad_step = torch.full((), -1, dtype=torch.long, device=det.device)
        self.bad_step = torch.where(bad & (self.bad_step < 0), self.global_step + 1, self.bad_step)
        return share * world  # DDP averages gradients over ranks

    # ---- validation: loss and bits per byte ----
    def on_validation_epoch_start(self):
        self._val = torch.zeros(4, dtype=torch.float64, device=self.device)  # nats, n, nats(bytes>0), bytes

    def validation_step(self, batch, batch_idx):
        logits = forward_logits(self.model, batch)
        labels = batch["labels"].reshape(-1)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE,
                              reduction="none")
        mask = labels != IGNORE
        nbytes = self.token_bytes[labels.clamp(min=0)] * mask
        counted = nbytes > 0  # special-token targets (EOS, <CALL>) carry no bytes: left out of bpb (nanochat)
        self._val += torch.stack([nll[mask].sum().double(), mask.sum().double(), nll[counted].sum().double(),
                                  nbytes.sum().double()])

    def on_validation_epoch_end(self):
        v = self._val
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            dist.all_reduce(v)
        nats, n, nats_b, nbytes = v.tolist()
        self.last_val = {
            "val_loss": nats / max(n, 1.0),
            "val_bpb": (nats_b / math.log(2) / nbytes) if nbytes > 0 else None,
            "val_tokens": int(n),
        }

    # ---- optimizer ----
    def configure_optimizers(self):
        o = self.cfg.optim
        groups = param_groups(self.model, self.cfg)
        # fused AdamW: CUDA, and CPU too (torch >= 2.4; the default per-tensor loop costs ~40% of a tiny step)
        fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay, fused=True if fused else None)
        lambdas = [_GroupSchedule(g["lr"], g.get("min_lr", o.min_lr * g["lr"] / o.lr if o.lr else o.min_lr),
                                  o.warmup_steps, self.cfg.trainer.max_steps) for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        bank = getattr(self.model, "bank", None)
        if bank is not None and bank.sparse:  # offloaded bank: its rows get the sparse lazy AdamW
            from memory.sparse_adam import SparseBankOptimizer

            m = self.cfg.memory
            # grad_divisor: training_step returns share * world (DDP averages); bank rows are not averaged
            self.bank_opt = SparseBankOptimizer(bank, lr=m.lr, betas=tuple(o.betas), eps=o.eps,
                                                weight_decay=m.weight_decay, grad_divisor=self.trainer.world_size)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # measure the norm every step (logged), clip when configured
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        module = self.trainer.strategy.model
        if hasattr(module, "clip_grad_norm_"):  # FSDP: the norm over all shards
            self.grad_norm = module.clip_grad_norm_(max_norm)
        else:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if self.bank_opt is not None:  # global norm over dense params + fetched bank rows (all ranks)
                from memory.sparse_adam import clip_grad_norm_with_bank

                self.grad_norm = clip_grad_norm_with_bank(params, self.bank_opt, max_norm).float()
            else:
                self.grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.bank_opt is not None:  # after backward + clipping + the dense step: update the fetched rows
            mem = [g for g in optimizer.param_groups if g.get("name") == "memory"]
            if mem:  # follow the memory group's LR schedule
                self.bank_opt.param_groups[0]["lr"] = mem[0]["lr"]
            self.bank_opt.step()

    # ---- checkpoints: weights live in model.safetensors, not in optimizer.pt ----
    def on_save_checkpoint(self, checkpoint):
        # the checkpoint callback writes these (rank 0) as model.safetensors beside optimizer.pt
        sd = checkpoint.pop("state_dict", None) or {}
        self.saved_state_dict = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        checkpoint["memlm_weights"] = "model.safetensors"

    def on_load_checkpoint(self, checkpoint):
        if "memlm_weights" not in checkpoint:
            raise RuntimeError("optimizer.pt: not a memlm checkpoint (no 'memlm_weights' entry)")
        load_weights(self.model, os.path.join(self.resume_dir, checkpoint["memlm_weights"]))
        bank = getattr(self.model, "bank", None)
        if hasattr(bank, "load_checkpoint"):  # offloaded bank: rows + AdamW state in bank/ (memory/offload.py)
            bank.load_checkpoint(os.path.join(self.resume_dir, "bank"))
        checkpoint["state_dict"] = self.state_dict()


class PackedDataModule(L.LightningDataModule):
    """Train/val loaders over a data dir. The train dataset starts at `start_batch` (micro-batches this
    rank has consumed), which makes resume exact; rank sharding is done by the dataset itself."""

    def __init__(self, cfg, start_batch: int = 0, data_state: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.start_batch = start_batch
        self.data_state = data_state
        self.train_ds = None

    def _rank_world(self):
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _loader(self, ds):
        d = self.cfg.data
        return DataLoader(ds, batch_size=None, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)

    def train_dataloader(self):
        from train.data_adapter import make_dataset

        rank, world = self._rank_world()
        self.train_ds = make_dataset(self.cfg, "train", rank, world, start_batch=self.start_batch,
                                     state=self.data_state)
        loader = self._loader(self.train_ds)
        model = getattr(self.trainer.lightning_module, "model", None) if self.trainer is not None else None
        bank = getattr(model, "bank", None)
        if bank is not None and bank.sparse:  # offloaded bank: read the next batch's rows while this step runs
            from memory.prefetch import PrefetchingLoader

            loader = PrefetchingLoader(loader, bank)
        return loader

    def val_dataloader(self):
        from train.data_adapter import make_dataset

        rank, world = self._rank_world()
        return self._loader(make_dataset(self.cfg, "val", rank, world, start_batch=0))

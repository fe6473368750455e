"""Sparse (lazy) AdamW over bank rows: only the rows fetched in a step are read, updated and written.

A bank row is one node's block (all memory layers). The optimizer state of a row (exp_avg,
exp_avg_sq, and its own step count) lives beside the row, in the same store (GPU/CPU tensors for a
resident bank, host memory or memory-mapped files for an offloaded bank), so a step costs
O(fetched rows), never O(bank).

Semantics (per touched row, with the step's learning rate `lr`), exactly torch.optim.AdamW's formula
evaluated with the row's own step count t:

    t      <- t + 1                                  (per-row step count, int64)
    w      <- w * (1 - lr * wd)                      (decoupled weight decay, once per touched step)
    m      <- b1 * m + (1 - b1) * g
    v      <- b2 * v + (1 - b2) * g^2
    w      <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

"Touched" = fetched in a gradient-enabled forward since the last `zero_grad()` (even when its gradient
happens to be zero, e.g. M1/M2 while M3 is still zero). Rows that are not touched are not read or
written at all: no decay, no moment decay, no step count; nothing is caught up later. A row that is
touched at every step therefore follows torch.optim.AdamW exactly (tested to fp32 rounding).
Gradients of a row fetched in several micro-batches (gradient accumulation) or by several paths of a
batch are summed before the update, in a fixed order (fetch order), and the update runs in fp32 over
rows sorted by id, so a step is deterministic.

Training-loop protocol (after all micro-batches' backward, before the next forward):

    total_norm = clip_grad_norm_with_bank(dense_params, bank_opt, max_norm)   # global norm, both sides
    dense_opt.step(); bank_opt.step(); dense_opt.zero_grad(); bank_opt.zero_grad()

`bank_opt.bank_grad_norm_sq()`, `scale_bank_grads(c)`, `step()`, `zero_grad()` are the pieces if a loop
does its own clipping. In a multi-process run (cluster-affine, see memory/offload.py) each rank owns
disjoint rows: `grad_divisor=world_size` turns each rank's bank gradients into gradients of the global
mean loss (what DDP's averaging does for the anchor), and the squared norm is all-reduced.

Works over any *row store* with `read_rows(rows) -> (w, m, v, step)` and `write_rows(rows, w, m, v, step)`;
`TensorRowStore` adapts torch tensors (a resident bank's level parameters), `ResidentSparseAdapter`
makes a `memory.bank.ResidentBank` trainable with this optimizer (the reference the offloaded bank is
tested against), and `memory.offload.OffloadedBank` implements the same protocol over host / mmap rows.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class SparseRowAdamW:
    """The per-row AdamW math (no state of its own): update gathered rows in place."""

    def __init__(self, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"SparseRowAdamW: bad hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(float(b) for b in betas), float(eps), float(weight_decay)

    @torch.no_grad()
    def update(self, w, m, v, step, g, lr: float | None = None):
        """w, m, v, g: fp32 [n, D]; step: int64 [n] (counts before this update). Updates w, m, v in place,
        returns the new step counts."""
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        if g.dtype != torch.float32 or w.dtype != torch.float32:
            raise TypeError(f"SparseRowAdamW works in fp32, got w {w.dtype}, grad {g.dtype}")
        step = step.to(torch.int64) + 1
        if self.weight_decay:
            w.mul_(1.0 - lr * self.weight_decay)
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        t = step.to(device=w.device, dtype=torch.float64)
        bc1 = 1.0 - torch.pow(b1, t)
        bc2 = 1.0 - torch.pow(b2, t)
        step_size = (lr / bc1).to(torch.float32).unsqueeze(1)
        bc2_sqrt = bc2.sqrt().to(torch.float32).unsqueeze(1)
        denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
        w.addcdiv_(m * step_size, denom, value=-1.0)
        return step


class TensorRowStore:
    """Rows of a torch tensor [N, ...] (viewed as [N, D]) with AdamW state as tensors of the same shape."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.n_rows = weight.shape[0]
        self.row_dim = int(weight[0].numel()) if self.n_rows else 0
        self.exp_avg = torch.zeros(self.n_rows, self.row_dim, dtype=torch.float32, device=weight.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step = torch.zeros(self.n_rows, dtype=torch.int64)

    def _w(self):
        return self.weight.data.view(self.n_rows, self.row_dim)

    def read_rows(self, rows: np.ndarray):
        idx = torch.from_numpy(rows).to(self.weight.device)
        return (self._w().index_select(0, idx).float(), self.exp_avg.index_select(0, idx),
                self.exp_avg_sq.index_select(0, idx), self.step[torch.from_numpy(rows)])

    def write_rows(self, rows: np.ndarray, w, m, v, step):
        idx = torch.from_numpy(rows).to(self.weight.device)
        self._w().index_copy_(0, idx, w.to(self.weight.dtype))
        self.exp_avg.index_copy_(0, idx, m)
        self.exp_avg_sq.index_copy_(0, idx, v)
        self.step[torch.from_numpy(rows)] = step.cpu()

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            getattr(self, k).copy_(sd[k])


class ResidentSparseAdapter:
    """Train a `memory.bank.ResidentBank`'s level parameters with the lazy optimizer.

    Records the node ids the bank gathers (by wrapping the instance's `gather`), and reads the row
    gradients from the level parameters' dense `.grad`. The generic block stays a dense parameter
    (train it with torch's AdamW together with the anchor); do not give the level parameters to a dense
    optimizer as well (`dense_parameters()` lists what remains for it).
    """

    def __init__(self, bank):
        self.bank = bank
        self.stores = [TensorRowStore(p) for p in bank.levels()]
        self._ids: list[list[np.ndarray]] = [[] for _ in self.stores]
        self.tokens = [np.zeros(s.n_rows, np.int64) for s in self.stores]
        inner = bank.gather

        def gather(ids):  # record what a grad-enabled forward fetched, then gather as usual
            if torch.is_grad_enabled():
                for l, i in enumerate(ids):
                    self._ids[l].append(i.detach().cpu().numpy().astype(np.int64))
            return inner(ids)

        bank.gather = gather

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        levels = {id(p) for p in self.bank.levels()}
        return [p for p in self.bank.parameters() if id(p) not in levels]

    def row_grads(self):
        out = []
        for l, (store, ids) in enumerate(zip(self.stores, self._ids)):
            if not ids or store.row_dim == 0:
                continue
            rows = np.unique(np.concatenate(ids))
            p = store.weight
            if p.grad is None:
                g = torch.zeros(len(rows), store.row_dim, dtype=torch.float32, device=p.device)
            else:
                g = p.grad.view(store.n_rows, -1).index_select(0, torch.from_numpy(rows).to(p.device)).float()
            out.append((f"level{l + 1}", store, rows, g))
        return out

    def clear_grads(self) -> None:
        self._ids = [[] for _ in self.stores]
        for p in self.bank.levels():
            p.grad = None


class SparseBankOptimizer:
    """Lazy AdamW for a bank: `bank` is an OffloadedBank or a ResidentSparseAdapter (anything with
    `row_grads()` -> [(key, store, rows, grads)] and `clear_grads()`).

    `param_groups[0]["lr"]` is the learning rate (an LR schedule may set it, as for torch optimizers).
    """

    def __init__(self, bank, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 grad_divisor: float = 1.0, process_group=None):
        self.bank = bank
        self.math = SparseRowAdamW(lr, betas, eps, weight_decay)
        self.param_groups = [{"name": "bank", "lr": float(lr), "betas": tuple(betas), "eps": eps,
                              "weight_decay": weight_decay}]
        self.grad_divisor = float(grad_divisor)
        self.process_group = process_group
        self._grads = None
        self.n_steps = 0

    # ---- gradients ----------------------------------------------------------------------------
    def _harvest(self):
        if self._grads is None:
            # a level with no fetched row (every row of the batch took the generic block) has nothing to update
            self._grads = [e for e in self.bank.row_grads() if len(e[2])]
            if self.grad_divisor != 1.0:
                for _, _, _, g in self._grads:
                    g.div_(self.grad_divisor)
        return self._grads

    def bank_grad_norm_sq(self, all_reduce: bool = True) -> torch.Tensor:
        """Sum of squared bank gradients (fp64 scalar on CPU); summed over ranks when distributed
        (ranks own disjoint rows)."""
        total = torch.zeros((), dtype=torch.float64)
        for _, _, _, g in self._harvest():
            total += g.double().pow(2).sum().cpu()
        if all_reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(total, group=self.process_group)
        return total

    def scale_bank_grads(self, c) -> None:
        c = float(c)
        for _, _, _, g in self._harvest():
            g.mul_(c)

    def touched_rows(self) -> dict[str, np.ndarray]:
        return {key: rows for key, _, rows, _ in self._harvest()}

    # ---- update -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        self.math.betas, self.math.eps, self.math.weight_decay = tuple(group["betas"]), group["eps"], group["weight_decay"]
        for _, store, rows, g in self._harvest():
            w, m, v, s = store.read_rows(rows)
            s = self.math.update(w, m, v, s, g.to(w.device), lr=group["lr"])
            store.write_rows(rows, w, m, v, s)
        self._grads = None
        self.bank.clear_grads()
        self.n_steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grads = None
        self.bank.clear_grads()

    def state_dict(self) -> dict:
        """Hyper-parameters only: the moments live beside the rows (saved with the bank checkpoint)."""
        g = self.param_groups[0]
        return {"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"], "weight_decay": g["weight_decay"],
                "grad_divisor": self.grad_divisor, "n_steps": self.n_steps}

    def load_state_dict(self, sd: dict) -> None:
        g = self.param_groups[0]
        g.update(lr=sd["lr"], betas=tuple(sd["betas"]), eps=sd["eps"], weight_decay=sd["weight_decay"])
        self.n_steps = int(sd.get("n_steps", 0))


def clip_grad_norm_with_bank(parameters, bank_opt: SparseBankOptimizer | None, max_norm: float) -> torch.Tensor:
    """Global gradient norm over dense parameters (anchor, generic block; already identical on every
    DDP rank) and the bank's touched rows (summed over ranks); scales both by min(1, max_norm/(norm+1e-6))
    like torch.nn.utils.clip_grad_norm_. max_norm <= 0 only measures. Returns the norm (fp64 scalar)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        total += g.detach().double().pow(2).sum().cpu()
    if bank_opt is not None:
        total += bank_opt.bank_grad_norm_sq()
    norm = total.sqrt()
    if max_norm and max_norm > 0:
        coef = min(1.0, float(max_norm) / (float(norm) + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
            if bank_opt is not None:
                bank_opt.scale_bank_grads(coef)
    return norm

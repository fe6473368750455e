"""MemoryLM: an anchor plus a hierarchical memory bank.

Each memory layer's FFN becomes  anchor_ffn(x) + M3 (silu(M1 x) * (M2 x))  with the row's fetched block
(the model's SwiGLU calls the `kernels.memory_ffn` dispatch). Modes:

- "fetched": each row gets the blocks on its cluster path (in training, a row takes the generic block
  instead with probability `generic_prob`, drawn from the global torch CPU RNG so a resumed run
  replays the same choices);
- "generic": every row gets the generic block (the control for every "fetched" number);
- "anchor":  no memory at all.

Anchor + one fetched block is a dense anchor whose FFN is R units wider (`to_dense`), which is also
what the HF export writes.
"""
from __future__ import annotations

import torch
from torch import nn

from memory.bank import Bank, FetchedBlocks, ResidentBank
from memory.config import MemoryConfig
from model.interface import LanguageModel
from model.model import Anchor

MODES = ("fetched", "generic", "anchor")


class MemoryLM(LanguageModel):
    """model.interface.LanguageModel with memory: `anchor` (the decoder), `bank` (memory.bank.Bank),
    `mem_cfg`, `router` (routes prompts at inference; a training run copies it into every checkpoint)."""

    has_memory = True
    modes = MODES
    default_mode = "fetched"

    def __init__(self, anchor: Anchor, mem_cfg: MemoryConfig, bank: Bank | None = None, router=None):
        super().__init__()
        self.anchor = anchor
        self.mem_cfg = mem_cfg
        mem_cfg.validate(anchor.config)
        self.bank = bank if bank is not None else ResidentBank(mem_cfg, anchor.config)
        self.router = router  # plain attribute (not a module): used by generate() to route prompts
        if router is not None:
            router.check_bank(mem_cfg)
        if self.bank.d != anchor.config.n_embd or self.bank.n_layer != anchor.config.n_layer:
            raise ValueError(f"memory bank built for n_layer={self.bank.n_layer}, d={self.bank.d} but the anchor "
                             f"has n_layer={anchor.config.n_layer}, n_embd={anchor.config.n_embd}")
        p = next(anchor.parameters())
        self.bank.to(device=p.device)

    @property
    def config(self):
        return self.anchor.config

    # ---- memory selection -------------------------------------------------------------------
    def memory(self, mem_path: torch.Tensor | None, mode: str = "fetched", batch_size: int | None = None,
               device=None) -> FetchedBlocks | None:
        """The per-layer memory list for a batch (None for mode "anchor")."""
        mode = self.resolve_mode(mode)
        if mode == "anchor":
            return None
        dtype = next(self.anchor.parameters()).dtype
        if mode == "generic":
            B = batch_size if batch_size is not None else mem_path.shape[0]
            return self.bank.fetch(None, torch.ones(B, dtype=torch.bool, device=device), dtype=dtype)
        if mem_path is None:
            raise ValueError("MemoryLM: mode 'fetched' needs mem_path [B, n_levels] (or route the prompt "
                             "with a router)")
        use_generic = None
        p = self.mem_cfg.p_generic
        if self.training and p > 0:
            # CPU generator: the same draws on any device, and the RNG state is checkpointed by train/.
            use_generic = torch.rand(mem_path.shape[0]) < p
        return self.bank.fetch(mem_path, use_generic, dtype=dtype)

    def forward(self, input_ids, doc_lens=None, mem_path=None, mode: str | None = None, kv_cache=None,
                start_pos: int = 0, memory=None):
        """logits [B,T,V] float32. mode: "fetched" (default: mem_path [B, L] int64 needed), "generic",
        "anchor". `memory` (a list from `self.memory`) overrides mem_path/mode."""
        if memory is None:
            if mem_path is not None:
                mem_path = mem_path.to(input_ids.device)
            memory = self.memory(mem_path, mode, batch_size=input_ids.shape[0], device=input_ids.device)
        return self.anchor(input_ids, doc_lens=doc_lens, memory=memory, kv_cache=kv_cache, start_pos=start_pos)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, *, mem_path=None, mode: str | None = None,
                 texts: list[str] | None = None, memory=None, kv_cache: bool = True,
                 generator: torch.Generator | None = None):
        """Anchor.generate with the row's memory. In mode "fetched" give mem_path [B, L], or texts (one per
        row) to route with the attached router; `memory` (from `self.memory`) overrides both. Arguments are
        checked as Anchor.generate's (a ValueError naming the argument), before any memory is fetched."""
        from model.model import check_generate_args

        check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, self.config.vocab_size)
        mode = self.resolve_mode(mode)
        kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, kv_cache=kv_cache,
                      generator=generator)
        if memory is not None:
            return self.anchor.generate(input_ids, max_new_tokens, memory=memory, **kwargs)
        if mode == "fetched" and mem_path is None:
            if texts is None or self.router is None:
                raise ValueError("MemoryLM.generate: mode 'fetched' needs mem_path, or texts and a router")
            mem_path = torch.as_tensor(self.router.route(texts), dtype=torch.long)
        if mem_path is not None:
            mem_path = torch.as_tensor(mem_path, dtype=torch.long, device=input_ids.device).reshape(input_ids.shape[0], -1)
        was_training = self.training
        self.eval()  # no generic-block replacement while generating
        try:
            memory = self.memory(mem_path, mode, batch_size=input_ids.shape[0], device=input_ids.device)
            return self.anchor.generate(input_ids, max_new_tokens, memory=memory, **kwargs)
        finally:
            self.train(was_training)

    # ---- bookkeeping ------------------------------------------------------------------------
    def memory_units(self) -> int:
        """Extra FFN units per token, summed over memory layers (what FLOPs/MFU count, never the bank)."""
        return len(self.bank.layer_ids) * self.bank.R

    def flops_per_token(self, seq_len: int, mode: str | None = None) -> float:
        mode = self.resolve_mode(mode)
        return self.anchor.flops_per_token(seq_len, extra_ffn_units=0 if mode == "anchor" else self.memory_units())

    def num_params(self, group: str = "all") -> int:
        """'all' (anchor + bank + generic), anchor groups 'anchor' / 'embedding' / 'non_embedding',
        'fetched' (one path's block), 'bank' (every node, generic excluded), 'generic', 'memory' (bank + generic)."""
        if group in ("embedding", "non_embedding"):
            return self.anchor.num_params(group)
        fetched, bank = self.bank.fetched_params(), self.bank.bank_params()
        table = {"anchor": self.anchor.num_params("all"), "fetched": fetched, "bank": bank, "generic": fetched,
                 "memory": bank + fetched}
        table["all"] = table["anchor"] + table["memory"]
        if group not in table:
            raise ValueError(f"num_params: unknown group {group!r}; valid: {', '.join(list(table) + ['embedding', 'non_embedding'])}")
        return table[group]

    def save_checkpoint_files(self, step_dir: str) -> None:
        """Extra files of a checkpoint step dir (train/ writes the weights): the router, as
        router.safetensors + router.json, so the checkpoint can route prompts on its own."""
        if self.router is not None:
            self.router.save(step_dir)

    def freeze_anchor(self, frozen: bool = True) -> None:
        """Phase 2 of the paper: train the memories only."""
        self.anchor.requires_grad_(not frozen)

    def param_groups(self, lr: float, weight_decay: float, memory_lr: float | None = None,
                     memory_wd: float | None = None) -> list[dict]:
        """Optimizer groups (trainable parameters only), each with 'name', 'lr', 'weight_decay' and
        'min_lr' for the memory (its own cosine floor). Norm weights (1-D) get no weight decay. lr /
        weight_decay: the anchor's; memory_lr / memory_wd default to the memory config's."""
        anchor_lr, anchor_wd = lr, weight_decay
        memory_lr = self.mem_cfg.lr if memory_lr is None else memory_lr
        memory_wd = self.mem_cfg.weight_decay if memory_wd is None else memory_wd
        decay, no_decay = [], []
        for p in self.anchor.parameters():  # parameters() dedups a tied head
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        mem = [p for p in self.bank.parameters() if p.requires_grad]
        groups = [
            {"name": "anchor", "params": decay, "lr": anchor_lr, "weight_decay": anchor_wd},
            {"name": "anchor_no_decay", "params": no_decay, "lr": anchor_lr, "weight_decay": 0.0},
            {"name": "memory", "params": mem, "lr": memory_lr, "weight_decay": memory_wd,
             "min_lr": self.mem_cfg.min_lr},
        ]
        return [g for g in groups if g["params"]]

    # ---- dense equivalence ------------------------------------------------------------------
    def dense_extra(self, path) -> list:
        """Per model layer (m1 [R,d], m2 [R,d], m3 [d,R]) of one path's block, or None (no memory)."""
        return self.bank.dense_extra(path)

    @torch.no_grad()
    def to_dense(self, path) -> Anchor:
        """The anchor with the blocks of `path` folded in: FFN width F + R in every layer (zero units
        in layers without memory). Its logits equal forward(mode='fetched') for that path (eval mode)."""
        return widen_anchor(self.anchor, self.dense_extra(path))


@torch.no_grad()
def widen_anchor(anchor: Anchor, extra: list) -> Anchor:
    """A new Anchor with ffn_hidden + R units per layer: extra[i] = (m1 [R,d], m2 [R,d], m3 [d,R]) or None."""
    cfg = anchor.config
    R = max((e[0].shape[0] for e in extra if e is not None), default=0)
    if len(extra) != cfg.n_layer:
        raise ValueError(f"widen_anchor: extra has {len(extra)} entries, the model has {cfg.n_layer} layers")
    p = next(anchor.parameters())
    dense = Anchor(cfg.replace(ffn_hidden=cfg.ffn_hidden + R)).to(device=p.device, dtype=p.dtype)
    sd = anchor.state_dict()
    for i, e in enumerate(extra):
        pre = f"layers.{i}.ffn."
        w1, w2, w3 = sd[pre + "w1.weight"], sd[pre + "w2.weight"], sd[pre + "w3.weight"]
        if e is None:
            e = (w1.new_zeros(R, cfg.n_embd), w2.new_zeros(R, cfg.n_embd), w3.new_zeros(cfg.n_embd, R))
        m1, m2, m3 = (t.to(device=w1.device, dtype=w1.dtype) for t in e)
        if m1.shape[0] != R:
            raise ValueError(f"widen_anchor: layer {i} has {m1.shape[0]} extra units, others {R}")
        sd[pre + "w1.weight"] = torch.cat([w1, m1], 0)
        sd[pre + "w2.weight"] = torch.cat([w2, m2], 0)
        sd[pre + "w3.weight"] = torch.cat([w3, m3], 1)
    dense.load_state_dict(sd)
    return dense


def build_memory_lm(anchor: Anchor, mem_cfg: MemoryConfig, router=None, bank: Bank | None = None) -> MemoryLM:
    """The one-liner for train/: wrap an anchor (fresh, from a checkpoint, or imported from HF) with memories.
    Checks the memory config against the model and the router against the bank (errors name both)."""
    return MemoryLM(anchor, mem_cfg, bank=bank, router=router)

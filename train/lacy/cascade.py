"""Cascade inference (LaCy): a small model that hands the next word to a larger model via <CALL>.

The SLM generates (greedy by default). When it emits <CALL> (argmax, or P(<CALL>) >= tau when tau is
set) the large model continues the TEXT up to the end of the current word; the SLM then re-encodes the
text and resumes. The hand-off is at the text level, so the large model may use another tokenizer.

    large = load_large(None)                  # SmolLM2-135M (model.hf.smollm2_dir()), or a path
    slm, tok, cfg, router = load_memlm("runs/tiny")
    out = Cascade(slm, tok, large, router=router).generate("Marie Curie was born", max_new_tokens=40)
    print(out.marked())                       # "... born in ⟦ Warsaw⟧ in ..."
    outs = Cascade(slm, tok, large).generate_batch(prompts, 40, taus=[0.05, 0.2, None])  # outs[i][j]

`generate` is the readable one-prompt reference (any temperature); `generate_batch` runs many prompts at
several thresholds at once (greedy) and writes the same texts (tests/test_lacy_cascade.py), with one KV
cache for the SLM over ragged rows (train/lacy/decode.py) and batched large-model calls. The large-model
adapters (`LargeModel`, transformers and memlm implementations, `load_large`) are in train/lacy/large.py.
A memory SLM (MemoryLM) routes each prompt with the run's router and fetches its block once.
Plain inference: no Lightning here.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from train.lacy.large import (CascadeError, HFLargeModel, LargeModel, MemlmLargeModel, _AnchorStepper,  # noqa: F401
                              anchor_and_memory, is_memlm_run, load_large, load_memlm, word_end)

from data.tokenizer import CALL, encode_text, stop_ids
MARKS = ("⟦", "⟧")


def stop_reached(completion: str, stop: str | None) -> bool:
    """Whether `completion` ends with `stop`: as generated (so a stop of "\\n" or " " can match), or
    before trailing whitespace (a "." followed by a space token)."""
    return bool(stop) and (completion.endswith(stop) or completion.rstrip().endswith(stop))


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


class _Row:
    """One (prompt, tau) generation of a batch: its tokens, text and output so far."""

    def __init__(self, key, group: int, tau, ids: list[int], out: "CascadeOutput"):
        self.key, self.group, self.tau, self.ids, self.out = key, group, tau, ids, out
        self.base, self.n_base, self.done = out.prompt, len(ids), False


class Cascade:
    """SLM + large model. `slm`: memlm Anchor or MemoryLM; `large`: a LargeModel, or a transformers model
    object / directory (with `large_tokenizer`). tau=None: call when <CALL> is the SLM's choice; else call
    when P(<CALL>) >= tau. allow_calls=False gives the SLM alone (<CALL> suppressed).

    `generate(prompt)` runs one prompt (any temperature): the readable reference. `generate_batch(prompts,
    taus)` runs many prompts, at several thresholds, at once (greedy) with the same outputs."""

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
        self.stats = {"slm_forwards": 0, "slm_positions": 0}  # batched runs: passes and token positions run

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
        ends = lambda t: stop_reached(t[len(prompt):], stop)  # noqa: E731
        if not prompt:
            raise CascadeError("Cascade.generate: empty prompt")
        t0 = time.perf_counter()
        anchor, memory = anchor_and_memory(self.slm, [prompt], self.router, self.mode)  # route once
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

    @torch.no_grad()
    def generate_batch(self, prompts: list[str], max_new_tokens: int = 64, stop: str | None = None,
                       taus: list[float | None] | None = None, batch_size: int = 64,
                       progress=None) -> list[list[CascadeOutput]]:
        """Greedy cascades of many prompts at once, each at every threshold of `taus` (default: this
        cascade's tau): out[i][j] is prompt i at taus[j], the same text `generate` writes at that tau.

        `batch_size` prompts run together (times len(taus) rows), with one KV cache for the SLM (rows of one
        prompt share its pass until their decisions differ) and batched large-model calls. Seconds per
        output are the batch's time shared among its rows. `progress(done, total)` after each batch."""
        from train.lacy.decode import RaggedStepper, memory_rows

        if any(not p for p in prompts):
            raise CascadeError("Cascade.generate_batch: empty prompt")
        taus = [self.tau] if taus is None else list(taus)
        results: list[list[CascadeOutput]] = []
        for b0 in range(0, len(prompts), batch_size):
            chunk = prompts[b0:b0 + batch_size]
            t0 = time.perf_counter()
            anchor, memory = anchor_and_memory(self.slm, chunk, self.router, self.mode)  # route once
            stepper = RaggedStepper(anchor, None if memory is None else (lambda g, m=memory: memory_rows(m, g)))
            if self.large is not None:
                self.large.new_batch()
            rows = [_Row((i, j), i, tau, self._encode(p), CascadeOutput(prompt=p, text=p))
                    for i, p in enumerate(chunk) for j, tau in enumerate(taus)]
            setup = (time.perf_counter() - t0) / len(rows)
            for r in rows:
                r.out.slm_seconds += setup
            self._run_rows(stepper, rows, max_new_tokens, stop)
            self.stats["slm_forwards"] += stepper.forwards
            self.stats["slm_positions"] += stepper.tokens_run
            results += [[rows[i * len(taus) + j].out for j in range(len(taus))] for i in range(len(chunk))]
            if progress is not None:
                progress(len(results), len(prompts))
        return results

    def _run_rows(self, stepper, rows: list[_Row], max_new_tokens: int, stop: str | None) -> None:
        """The decision loop of `generate` (greedy), one step for every unfinished row at a time."""
        def ends(r):
            return stop_reached(r.out.text[len(r.out.prompt):], stop)

        def finish(r, why):
            r.done, r.out.stopped = True, why

        active = list(rows)
        for _ in range(max_new_tokens):
            if not active:
                break
            t = time.perf_counter()
            logits = stepper.logits([(r.key, r.group, r.ids) for r in active])
            p_call = logits.softmax(-1)[:, self.call_id].tolist()
            greedy = logits.argmax(-1).tolist()
            calls = [(p >= r.tau) if r.tau is not None else g == self.call_id
                     for r, p, g in zip(active, p_call, greedy)]
            logits[:, self.call_id] = float("-inf")
            nxt = logits.argmax(-1).tolist()
            share = (time.perf_counter() - t) / len(active)
            callers = [r for r, c in zip(active, calls) if c and self.allow_calls]
            handed = set()
            if callers:
                t = time.perf_counter()
                pieces = self.large.continue_words([r.out.text for r in callers], keys=[r.key for r in callers])
                lshare = (time.perf_counter() - t) / len(callers)
                for r, (piece, n) in zip(callers, pieces):
                    r.out.large_seconds += lshare
                    r.out.large_tokens += n
                    if piece and piece.strip():  # else the SLM writes this token itself
                        handed.add(id(r))
                        r.out.spans.append((len(r.out.text), len(r.out.text) + len(piece)))
                        r.out.calls += 1
                        r.out.text += piece
                        r.ids = self._encode(r.out.text)  # text-level hand-off: re-encode
                        r.base, r.n_base = r.out.text, len(r.ids)
                        if ends(r):
                            finish(r, "stop")
            for r, tok in zip(active, nxt):
                r.out.slm_seconds += share
                if id(r) in handed:
                    continue
                if tok in self.stop_ids:
                    finish(r, "eos")
                    continue
                r.ids = r.ids + [tok]
                r.out.slm_tokens += 1
                r.out.text = r.base + self._decode(r.ids[r.n_base:])
                if ends(r):
                    finish(r, "stop")
            active = [r for r in active if not r.done]


def large_alone(large: LargeModel, prompt: str, max_new_tokens: int = 64) -> CascadeOutput:
    """The large model writes everything (baseline); the whole completion counts as delegated."""
    return large_alone_batch(large, [prompt], max_new_tokens, batched=False)[0]


def large_alone_batch(large: LargeModel, prompts: list[str], max_new_tokens: int = 64,
                      batched: bool = True) -> list[CascadeOutput]:
    """`large_alone` for many prompts (one batched generation unless batched=False)."""
    t = time.perf_counter()
    if batched:
        pieces = large.continue_texts(prompts, max_new_tokens)
    else:
        pieces = [large.counted(lambda p=p: large.continue_text(p, max_new_tokens)) for p in prompts]
    share = (time.perf_counter() - t) / max(len(prompts), 1)
    outs = []
    for p, (piece, n) in zip(prompts, pieces):
        out = CascadeOutput(prompt=p, text=p + piece, large_tokens=n, large_seconds=share)
        if piece:
            out.spans = [(len(p), len(p) + len(piece))]
        outs.append(out)
    return outs

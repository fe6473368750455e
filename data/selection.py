"""<CALL> selection: which training tokens become `<CALL>` targets (LaCy and its baselines).

Rules (DESIGN.md), each calibrated to the same share of delegated tokens so they compare fairly:

- `lacy`:   high reference loss AND spaCy-factual (only factual tokens can be chosen);
- `loss`:   high reference loss;
- `rho`:    high excess loss, loss_ref - loss_large (Rho-1: hard for the SLM, easy for the big model);
- `random`: uniform;
- `none`:   nothing (the control).

Calibration: over all tokens of a split, k = round(call_rate * n_tokens) tokens with the highest score
among the eligible ones are chosen (ties broken by a seeded shuffle), so the achieved rate is the target
up to 1/n_tokens; the k-th score is reported as the threshold (the (1-rate) quantile). Never eligible:
special tokens (EOS, PAD, <CALL>) and the first token of each window (it has no prefix, so no target
predicts it, and its loss is NaN). If the rule has fewer eligible tokens than k (e.g. lacy with fewer
factual tokens than the rate), all of them are chosen and the shortfall is reported.

Per-token arrays are read through the data dir's shards; an array whose length differs from its shard's
token count is an error naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from model.errors import DataError, check_range

from data.tokenizer import CALL

RULES = ("lacy", "loss", "rho", "random", "none")


class SelectionError(DataError):
    """Signals missing or inconsistent for a rule; the message names the array file or the command to run."""


# ---- small helpers over data.shards ----------------------------------------------------------------
def shards_of(dd, split: str) -> list:
    """Shards of a split, [] if the split does not exist."""
    if split not in dd.manifest.get("splits", {}):
        return []
    return list(dd.shards(split))


def shard_label(sh) -> str:
    """Human-readable shard identity for messages: its path prefix (DATA/split/NAME)."""
    return sh.prefix


def array_path(sh, name: str) -> str:
    return sh.file(f"{name}.npy")


def has_array(sh, name: str) -> bool:
    return sh.has_array(name)


def read_array(sh, name: str, required: bool = True) -> np.ndarray | None:
    """A per-token array [n_tokens] of a shard, checked against the shard's token count."""
    if not has_array(sh, name):
        if required:
            data = os.path.dirname(os.path.dirname(sh.prefix))
            how = f"memlm tag {data}" if name == "factual" else \
                f"memlm score {data} --model RUN --name {name[5:]}" if name.startswith("loss_") else "the command that writes it"
            raise SelectionError(f"{array_path(sh, name)}: missing array {name!r}; run `{how}` first")
        return None
    arr = np.asarray(sh.array(name))
    if arr.shape != (sh.n_tokens,):
        raise SelectionError(f"{array_path(sh, name)}: shape {tuple(arr.shape)} does not match the shard's "
                             f"{sh.n_tokens} tokens")
    return arr


def call_id(tokenizer, where: str = "tokenizer") -> int:
    vocab = tokenizer.get_vocab()
    if CALL not in vocab:
        raise SelectionError(f"{where}: tokenizer has no {CALL} token (prepare the data with `memlm prepare`)")
    return int(vocab[CALL])


# ---- the rules -----------------------------------------------------------------------------------
@dataclass
class SplitSignals:
    """Concatenated per-token signals of one split (all shards), plus what is eligible at all."""
    eligible: np.ndarray            # bool: not special, not first of window
    loss: np.ndarray | None = None  # float32, NaN where unknown
    loss_large: np.ndarray | None = None
    factual: np.ndarray | None = None  # bool


def eligible_mask(tokens: np.ndarray, windows: np.ndarray, special_ids) -> np.ndarray:
    ok = ~np.isin(np.asarray(tokens), np.asarray(sorted(set(special_ids)), dtype=np.int64))
    starts = np.asarray(windows[:-1], dtype=np.int64)
    ok[starts[starts < len(ok)]] = False
    return ok


def rule_scores(rule: str, sig: SplitSignals, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(candidate bool mask, score float) for a rule; the highest scores are delegated first."""
    n = len(sig.eligible)
    if rule == "none":
        return np.zeros(n, dtype=bool), np.zeros(n, dtype=np.float32)
    if rule == "random":
        return sig.eligible.copy(), rng.random(n, dtype=np.float32)
    if sig.loss is None:
        raise SelectionError(f"rule {rule!r} needs the reference loss array (run `memlm score`)")
    loss = sig.loss.astype(np.float32)
    if rule == "loss":
        return sig.eligible & np.isfinite(loss), loss
    if rule == "lacy":
        if sig.factual is None:
            raise SelectionError("rule 'lacy' needs the factual array (run `memlm tag`)")
        return sig.eligible & np.isfinite(loss) & sig.factual, loss
    if rule == "rho":
        if sig.loss_large is None:
            raise SelectionError("rule 'rho' needs the large model's loss array (run `memlm score --name large`)")
        excess = loss - sig.loss_large.astype(np.float32)
        return sig.eligible & np.isfinite(excess), excess
    raise SelectionError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")


@dataclass
class Selection:
    mask: np.ndarray       # uint8 over the split's tokens
    target: int            # k requested
    n_tokens: int
    n_candidates: int
    threshold: float | None

    @property
    def rate(self) -> float:
        return float(self.mask.sum()) / max(self.n_tokens, 1)

    @property
    def shortfall(self) -> bool:
        return int(self.mask.sum()) < self.target


def select(rule: str, sig: SplitSignals, call_rate: float, seed: int = 0) -> Selection:
    """Top-k by score among the rule's candidates, k = round(call_rate * n_tokens)."""
    check_range("call_rate", call_rate, min=0, max=1, max_open=True)
    rng = np.random.default_rng(seed)
    cand, score = rule_scores(rule, sig, rng)
    n = len(cand)
    k = 0 if rule == "none" else int(round(call_rate * n))
    idx = np.flatnonzero(cand)
    mask = np.zeros(n, dtype=np.uint8)
    threshold = None
    if k > 0 and len(idx):
        idx = idx[rng.permutation(len(idx))]  # random tie-breaking among equal scores
        if len(idx) > k:
            top = np.argpartition(-score[idx], k - 1)[:k]
            idx = idx[top]
        mask[idx] = 1
        threshold = float(score[idx].min())
    return Selection(mask=mask, target=k, n_tokens=n, n_candidates=int(cand.sum()), threshold=threshold)


# ---- rendering for the summary ---------------------------------------------------------------------
def render_marked(tokenizer, ids, mask, open_: str = "[[", close: str = "]]") -> str:
    """Decode ids with every delegated token wrapped as [[token]] (runs of plain tokens decode together)."""
    out, run = [], []
    for t, m in zip(list(ids), list(mask)):
        if m:
            if run:
                out.append(tokenizer.decode(run, clean_up_tokenization_spaces=False))
                run = []
            piece = tokenizer.decode([int(t)], clean_up_tokenization_spaces=False)
            lead = piece[: len(piece) - len(piece.lstrip())]  # keep the space outside the brackets
            out.append(f"{lead}{open_}{piece.lstrip()}{close}")
        else:
            run.append(int(t))
    if run:
        out.append(tokenizer.decode(run, clean_up_tokenization_spaces=False))
    return "".join(out)

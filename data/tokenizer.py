"""Tokenizers: train a byte-level BPE, or load any HF tokenizer directory; `<CALL>` is always present.

Special tokens: EOS `<|endoftext|>` (ends every document in the shards), PAD `<pad>`, CALL `<CALL>`
(the target of delegated tokens, LaCy). Saved with `save_pretrained`, so
`transformers.AutoTokenizer.from_pretrained(dir)` loads it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

EOS, PAD, CALL = "<|endoftext|>", "<pad>", "<CALL>"
SPECIAL_TOKENS = [EOS, PAD, CALL]


class TokenizerError(ValueError):
    pass


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[CALL])


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | None = None, length: int | None = None):
    """Train a byte-level BPE (GPT-2 style pre-tokenization) on `texts`; save to out_dir if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    hf = _wrap(tok)
    if out_dir:
        save_tokenizer(hf, out_dir)
    return hf


def ensure_special_tokens(tokenizer):
    """Add EOS/PAD/CALL to a loaded tokenizer if missing (in place); returns it."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False) \
            if _accepts_replace(tokenizer) else tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    return tokenizer


def _accepts_replace(tokenizer) -> bool:
    import inspect

    try:
        return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    except (TypeError, ValueError):
        return False


def load_tokenizer(path: str, add_missing: bool = False):
    """Load a tokenizer directory (or hub name); raise naming the dir if `<CALL>` is missing.

    add_missing=True adds the special tokens instead of raising (used by `memlm prepare --tokenizer`).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from e
    if add_missing:
        return ensure_special_tokens(tok)
    if CALL not in tok.get_vocab():
        raise TokenizerError(f"{path}: tokenizer has no {CALL} token (prepare data with `memlm prepare`, "
                             "which adds it)")
    return tok


def save_tokenizer(tokenizer, out_dir: str) -> None:
    """save_pretrained into out_dir via a tmp dir + rename (a crash never leaves half a tokenizer)."""
    import shutil

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def tokenizer_hash(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id, added tokens included): same hash <=> same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def special_ids(tokenizer) -> dict:
    return {"eos": tokenizer.convert_tokens_to_ids(EOS), "pad": tokenizer.convert_tokens_to_ids(PAD),
            "call": tokenizer.convert_tokens_to_ids(CALL)}

"""Tokenizers: train a byte-level BPE, or load any HF tokenizer directory; `<CALL>` is always present.

memlm's control tokens, the one definition used by data, training, generation, cascade and export:
EOS `<|endoftext|>` ends every document in the shards (and so is where generation stops), PAD `<pad>`
pads score batches, CALL `<CALL>` is the target of delegated tokens (LaCy). A tokenizer memlm uses has
`eos_token = EOS` and `pad_token = PAD`, even when it was loaded from a model whose own eos differs
(SmolLM2's `<|im_end|>`): the data decides how documents end.

Text is text: control ids come only from memlm (appended by id). The literal strings `<|endoftext|>`,
`<CALL>`, `<pad>` or any other special token of a tokenizer (e.g. `<|im_start|>`) inside a document,
probe or prompt are encoded as ordinary text. `text_only` switches a tokenizer to that (transformers'
`split_special_tokens`, the `tokenizers` backend's `encode_special_tokens`); `encode_text` and
`encode_texts` are the encoders every part of memlm calls. Decoding keeps the literal words, since they
are ordinary tokens.

Saved with `save_pretrained`, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from typing import Iterable, Sequence

from model.atomic import atomic_dir, read_marker, verify_dir
from model.errors import CheckpointError, DataError, check_range

EOS, PAD, CALL = "<|endoftext|>", "<pad>", "<CALL>"
SPECIAL_TOKENS = (EOS, PAD, CALL)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds every byte plus memlm's control tokens
MAX_VOCAB = 2**32 - 1                  # token ids are stored as uint32 at most
TOKENIZER_KIND = "tokenizer"           # model.atomic marker kind of a saved tokenizer directory


class TokenizerError(DataError):
    """A tokenizer cannot be loaded or does not fit the data; the message names the directory."""


# --- text is text ---------------------------------------------------------------------------------
def text_only(tokenizer):
    """Make `tokenizer` (a transformers fast tokenizer) encode special-token strings in text as ordinary
    text, and whole texts with no truncation or padding, in place; returns it. transformers re-applies
    `split_special_tokens` to the backend on every call, the backend flag covers direct `tokenizers`
    calls, and `init_kwargs` makes `save_pretrained` keep it (so `AutoTokenizer.from_pretrained` of a
    saved data, checkpoint or export tokenizer treats text as text too). A tokenizer.json may carry
    truncation/padding settings (every sentence-transformers tokenizer does: 128 tokens); a document is
    never cut or padded."""
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return tokenizer


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """`text` with lone UTF-16 surrogates (a JSON "\\ud800" escape, a non-UTF-8 command-line argument
    read with surrogateescape) replaced by U+FFFD: no tokenizer can encode them."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _check_text(text, where: str) -> str:
    """`text` if it is a string, with lone surrogates (a non-UTF-8 command-line argument, a JSON "\\ud800"
    escape) replaced by U+FFFD as the tokenizer cannot encode them; DataError naming `where` otherwise."""
    if not isinstance(text, str):
        raise DataError(f"{where}: expected text (a string), got {type(text).__name__} {str(text)[:40]!r}")
    return replace_surrogates(text)


def encode_text(tokenizer, text: str, where: str = "text") -> list[int]:
    """Token ids of `text` (no BOS/EOS added; special-token strings stay text). Raises DataError naming
    `where` when `text` is not a string (a list would otherwise become a sentence pair)."""
    text = _check_text(text, where)
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_texts(tokenizer, texts: Sequence[str], where: str = "texts") -> list[list[int]]:
    """Batch `encode_text` through the `tokenizers` backend (releases the GIL; used by prepare's threads).
    Call `text_only(tokenizer)` once before sharing it between threads."""
    texts = [_check_text(t, f"{where}[{i}]") for i, t in enumerate(texts)]
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    encode = backend.encode_batch_fast if hasattr(backend, "encode_batch_fast") else backend.encode_batch
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def stop_ids(tokenizer) -> set[int]:
    """Ids that end a generation with a memlm tokenizer: EOS (how every training document ends) and PAD."""
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in (EOS, PAD) if t in vocab}


# --- making, loading, saving -----------------------------------------------------------------------
def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return text_only(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                             additional_special_tokens=[CALL]))


MAX_TRAIN_WORD = 256  # characters: longer "words" are cut for the BPE trainer only
_LONG_WORD = re.compile(r"\S{%d,}" % (MAX_TRAIN_WORD + 1))


def _cut_long_words(text: str) -> str:
    """`text` with every run of more than MAX_TRAIN_WORD non-space characters split by spaces. The BPE
    trainer's time grows with the square of a word's length (a 5 MB one-word document took hours); merges
    longer than 256 characters are useless anyway. Only the training text is cut: encoding is untouched."""
    if len(text) <= MAX_TRAIN_WORD:
        return text
    return _LONG_WORD.sub(lambda m: " ".join(m.group(0)[i:i + MAX_TRAIN_WORD]
                                             for i in range(0, len(m.group(0)), MAX_TRAIN_WORD)), text)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | None = None, length: int | None = None,
                    progress: bool = False):
    """Train a byte-level BPE (GPT-2 style pre-tokenization) of `vocab_size` tokens (>= MIN_VOCAB, the
    256 bytes + EOS/PAD/CALL) on `texts` (words longer than MAX_TRAIN_WORD characters are cut for the
    trainer); save to out_dir if given; `progress` shows the `tokenizers` trainer's progress bars.
    Returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_range("vocab_size", vocab_size, min=MIN_VOCAB, max=MAX_VOCAB)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator((_cut_long_words(t) for t in texts), trainer=trainer, length=length)
    hf = _wrap(tok)
    if out_dir:
        save_tokenizer(hf, out_dir)
    return hf


def memlm_tokenizer(tokenizer):
    """The one normalisation of every tokenizer memlm reads or writes: text is text, and
    eos/pad are memlm's EOS/PAD (when the vocabulary has them). In place; returns it."""
    vocab = tokenizer.get_vocab()
    if EOS in vocab and tokenizer.eos_token != EOS:
        tokenizer.eos_token = EOS
    if PAD in vocab and tokenizer.pad_token != PAD:
        tokenizer.pad_token = PAD
    return text_only(tokenizer)


def ensure_special_tokens(tokenizer):
    """Add EOS/PAD/CALL to a loaded tokenizer if missing and make them its eos/pad (in place); returns it."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        if _accepts_replace(tokenizer):
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        else:
            tokenizer.add_tokens(missing, special_tokens=True)
    return memlm_tokenizer(tokenizer)


def _accepts_replace(tokenizer) -> bool:
    # transformers 5 takes replace_extra_special_tokens; without it, older versions replace the list
    try:
        return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    except (TypeError, ValueError):
        return False


def load_tokenizer(path: str, add_missing: bool = False):
    """Load a tokenizer directory (or hub name) as a memlm tokenizer (see `memlm_tokenizer`).

    Raises TokenizerError naming `path` when it cannot be loaded, when a directory memlm saved is damaged
    (its marker lists a missing or truncated file), or when `<CALL>` is missing; add_missing=True adds the
    special tokens instead (used by `memlm prepare --tokenizer`)."""
    marker = read_marker(path)
    if marker is not None:
        inner = os.path.join(path, "tokenizer")
        if marker.get("kind") != TOKENIZER_KIND and os.path.isdir(inner):  # a data dir or a checkpoint
            raise TokenizerError(f"{path}: is a memlm {marker.get('kind')!r} directory, not a tokenizer; its "
                                 f"tokenizer is {inner}")
        try:  # complete, whatever memlm wrote it as (a tokenizer, an export-hf folder)
            verify_dir(path)
        except CheckpointError as e:
            raise TokenizerError(f"tokenizer damaged: {e}") from None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the path is what the user needs
        raise TokenizerError(f"{path}: cannot load tokenizer: {' '.join(str(e).split())[:300]}") from e
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"{path}: {type(tok).__name__} is a slow (Python) tokenizer; memlm needs a fast "
                             "one (a directory with tokenizer.json)")
    if add_missing:
        return ensure_special_tokens(tok)
    if CALL not in tok.get_vocab():
        raise TokenizerError(f"{path}: tokenizer has no {CALL} token (prepare data with `memlm prepare`, "
                             "which adds it)")
    return memlm_tokenizer(tok)


def save_tokenizer(tokenizer, out_dir: str, replace: bool = False) -> None:
    """save_pretrained into `out_dir` atomically (model.atomic.atomic_dir: a crash never leaves half a
    tokenizer; an existing directory is replaced only with replace=True and when memlm saved it)."""
    with atomic_dir(out_dir, TOKENIZER_KIND, replace=replace) as tmp:
        tokenizer.save_pretrained(tmp)


def tokenizer_hash(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id, added tokens included): same hash <=> same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def special_ids(tokenizer) -> dict:
    """{"eos", "pad", "call"} -> id in `tokenizer` of memlm's EOS, PAD, CALL (TokenizerError if one is missing)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"tokenizer lacks memlm's control tokens {missing} (load it with "
                          "data.tokenizer.load_tokenizer(path, add_missing=True))")
    return {"eos": vocab[EOS], "pad": vocab[PAD], "call": vocab[CALL]}

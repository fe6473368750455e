"""`prepare`: corpus -> tokenizer -> token shards in a data dir (layout: data/shards.py).

One call is idempotent and resumable:
- a new (or empty) `out` is built in place under a "data-partial" marker; a killed run leaves it, and
  the same call resumes after the last finished shard; any other failure (a bad record, an empty
  corpus) removes what this call created, so a failed first `prepare` leaves no data dir;
- a finished data dir (marker "data") is checked: intact -> nothing to do; missing or truncated shard
  files -> those shards (and the later ones of their split) are written again, byte-identical;
- a damaged manifest or tokenizer, or other settings, are an error that names `--rebuild` (prepare the
  dir again: the new one is built beside it and replaces it only when complete);
- a directory memlm did not write is never written into (OutputExistsError).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from model.atomic import atomic_dir, atomic_write_json, read_marker, remove_dir, write_marker
from model.errors import ConfigError, MemlmError, OutputExistsError, check_range

from data.shards import DATA_KIND, MANIFEST_VERSION, PARTIAL_KIND, SPLITS, DataDir
from data.writer import ShardWriter, split_of

DEFAULT_VOCAB = 8192


def _settings(source, window_tokens, shard_tokens, val_fraction, max_docs, corpus_kw) -> dict:
    return {"source": source, "window_tokens": window_tokens, "shard_tokens": shard_tokens,
            "val_fraction": val_fraction, "max_docs": max_docs,
            "corpus_kw": {k: v for k, v in sorted(corpus_kw.items()) if v is not None}}


def _check_args(vocab_size, val_fraction, shard_tokens, window_tokens, workers, max_docs, batch_docs) -> None:
    from data.tokenizer import MAX_VOCAB, MIN_VOCAB

    if vocab_size is not None:
        check_range("vocab_size", vocab_size, min=MIN_VOCAB, max=MAX_VOCAB)
    check_range("val_fraction", val_fraction, min=0, max=1, max_open=True)
    check_range("shard_tokens", shard_tokens, min=1)
    check_range("window_tokens", window_tokens, min=2)
    check_range("batch_docs", batch_docs, min=1)
    if workers is not None:
        check_range("workers", workers, min=1)
    if max_docs is not None:
        check_range("max_docs", max_docs, min=1)


def _state(out: str) -> str:
    """"new", "partial" or "complete" for the output directory; OutputExistsError if memlm may not write it."""
    if not os.path.lexists(out):
        return "new"
    if not os.path.isdir(out) or os.path.islink(out):
        raise OutputExistsError(f"{out}: exists and is not a directory; choose another --out")
    marker = read_marker(out)
    if marker is not None:
        if marker.get("kind") not in (DATA_KIND, PARTIAL_KIND):
            raise OutputExistsError(f"{out}: is a memlm {marker.get('kind')!r} directory, not a data dir; "
                                    "choose another --out")
        return "complete" if marker["kind"] == DATA_KIND else "partial"
    if not os.listdir(out):
        return "new"
    if os.path.isfile(os.path.join(out, "manifest.json")):  # written by a memlm without markers
        return "partial"
    raise OutputExistsError(f"{out}: exists and holds files memlm did not write; choose a new --out "
                            "(memlm prepare writes only into a new or empty directory, or one it prepared)")


def prepare(corpus, out: str, tokenizer: str | None = None, vocab_size: int | None = None,
            val_fraction: float = 0.01, shard_tokens: int = 50_000_000, window_tokens: int = 2048,
            workers: int | None = None, max_docs: int | None = None, batch_docs: int = 512,
            progress: bool = True, log=print, rebuild: bool = False, **corpus_kw) -> dict:
    """Corpus -> tokenizer -> token shards in `out`; returns the manifest.

    corpus: a spec of data.corpora.load_corpus; tokenizer: an HF tokenizer dir (EOS/PAD/CALL added), else
    a byte-level BPE of vocab_size (default 8192) is trained on the training split; val_fraction in [0, 1)
    of documents go to "val" (by a hash of the id); windows hold <= window_tokens tokens; a shard holds
    >= shard_tokens tokens (the last one fewer); rebuild=True prepares an existing data dir again.
    Raises ConfigError (a bad argument), CorpusError / ShardError / TokenizerError (DataError: bad input,
    no documents, damaged dir), OutputExistsError (an `out` memlm may not write)."""
    from data.corpora import CorpusError, load_corpus

    _check_args(vocab_size, val_fraction, shard_tokens, window_tokens, workers, max_docs, batch_docs)
    if tokenizer is not None and vocab_size is not None:
        raise ConfigError("--tokenizer and --vocab-size exclude each other: load a tokenizer or train one")
    state = _state(out)
    corp = load_corpus(corpus, max_docs=max_docs, **corpus_kw)  # a bad spec fails before anything is written
    if next(iter(corp), None) is None:  # reads up to the first document: an empty corpus writes nothing
        raise CorpusError(f"{corp.name}: no documents ({corp.stats.empty_skipped} empty skipped); give a corpus "
                          "with text")
    job = dict(corpus=corpus, corp=corp, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
               shard_tokens=shard_tokens, window_tokens=window_tokens, workers=workers or os.cpu_count() or 1,
               batch_docs=batch_docs, progress=progress, log=log, corpus_kw=corpus_kw,
               settings=_settings(corp.name, window_tokens, shard_tokens, val_fraction, max_docs, corpus_kw))
    with _one_writer(out):
        return _prepare_into(out, _state(out), rebuild, job, log)  # the state again: another may have finished


@contextlib.contextmanager
def _one_writer(out: str):
    """Hold `.<name>.lock` beside `out` while preparing it: a second `memlm prepare` of the same directory
    (other settings, say) would otherwise interleave its shards and both report success. The lock file is
    removed when done."""
    from filelock import FileLock, Timeout

    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.lock")
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputExistsError(f"{out}: another memlm prepare is writing it (it holds {path}); wait for it to "
                                "finish, or choose another --out") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        lock.release()


def _prepare_into(out: str, state: str, rebuild: bool, job: dict, log) -> dict:
    if rebuild and state == "complete":
        with atomic_dir(out, DATA_KIND, replace=True, flag="--rebuild") as tmp:
            manifest = _build(tmp, **job)
        log(f"{out}: prepared again (--rebuild); the previous data dir was replaced")
        return manifest
    if rebuild and state == "partial":
        if read_marker(out) is None:
            raise OutputExistsError(f"{out}: has no memlm marker (prepared by an older memlm); delete it yourself "
                                    "or choose a new --out")
        remove_dir(out, PARTIAL_KIND)
        state = "new"
    if state == "new":
        existed = os.path.isdir(out)
        os.makedirs(out, exist_ok=True)
        write_marker(out, PARTIAL_KIND)
        try:
            return _build(out, **job)
        except MemlmError:
            _discard(out, existed)  # ours, and unusable: a failed first prepare leaves nothing behind
            raise
    return _build(out, **job)


def _tokenizer_from(tokenizer, vocab_size) -> dict:
    """How the tokenizer was made, for `prepare_command` and for checking a re-run's flags."""
    if tokenizer is None:
        return {"vocab_size": vocab_size or DEFAULT_VOCAB}
    return {"tokenizer": os.path.abspath(tokenizer) if os.path.exists(tokenizer) else tokenizer}


def _discard(out: str, existed: bool) -> None:
    """Remove what a failed first prepare created in `out` (an empty `out` the user made stays, empty)."""
    try:
        remove_dir(out, PARTIAL_KIND)
    except OutputExistsError:  # e.g. `out` is the working directory: leave it
        return
    if existed:
        os.makedirs(out, exist_ok=True)


def _resume(out, settings, tokenizer, vocab_size, log):
    """(manifest, tokenizer, {split: {shard name: old sha256}} to rewrite) of an existing data dir."""
    from data.tokenizer import TokenizerError, load_tokenizer, tokenizer_hash

    d = DataDir(out)
    manifest = d.manifest
    if manifest["settings"] != settings:
        changed = sorted(k for k in set(settings) | set(manifest["settings"])
                         if settings.get(k) != manifest["settings"].get(k))
        raise ConfigError(f"{d.manifest_path}: {out} was prepared with other settings ({', '.join(changed)}: "
                          f"{ {k: manifest['settings'].get(k) for k in changed} }, now "
                          f"{ {k: settings.get(k) for k in changed} }); pass --rebuild to prepare it again with the "
                          "new settings, or choose another --out")
    recorded = manifest.get("tokenizer_from", {})
    if tokenizer is None and "vocab_size" in recorded and recorded["vocab_size"] != (vocab_size or DEFAULT_VOCAB):
        # the default counts: leaving --vocab-size out asks for DEFAULT_VOCAB, not for whatever the dir has
        given = f"--vocab-size {vocab_size}" if vocab_size else f"--vocab-size {DEFAULT_VOCAB} (the default)"
        raise ConfigError(f"{given}: {out} was prepared with --vocab-size {recorded['vocab_size']}; pass "
                          f"--vocab-size {recorded['vocab_size']} to use it, --rebuild to prepare it again, or "
                          "choose another --out")
    if tokenizer is None and "tokenizer" in recorded:
        given = f"--vocab-size {vocab_size}" if vocab_size else "no --tokenizer"
        raise ConfigError(f"{given}: {out} was prepared with --tokenizer {recorded['tokenizer']}; pass that "
                          "--tokenizer to use it, --rebuild to prepare it again, or choose another --out")
    tok = d.tokenizer()  # damaged or other vocab: TokenizerError naming --rebuild
    if tokenizer is not None:
        given = tokenizer_hash(load_tokenizer(tokenizer, add_missing=True))
        if given != manifest["tokenizer_hash"]:
            raise TokenizerError(f"{tokenizer}: tokenizer vocab does not match the shards' manifest {d.manifest_path} "
                                 f"(hash {given} != {manifest['tokenizer_hash']}); use another --out, or --rebuild")
    replaced = {s: {} for s in SPLITS}
    for split, (i, err) in d.problems(deep=True).items():  # a re-run re-reads every shard: it is the repair
        lost = manifest["splits"][split]["shards"][i:]
        log(f"{err.args[0].split(';')[0]}: rebuilding {len(lost)} {split} shard(s) from {lost[0]['name']} on")
        replaced[split] = {sh["name"]: sh["sha256"] for sh in lost}
        del manifest["splits"][split]["shards"][i:]
        manifest["complete"] = False
    if any(replaced.values()):
        write_marker(out, PARTIAL_KIND)
        atomic_write_json(d.manifest_path, manifest)
    return manifest, tok, replaced


def _build(out, *, corpus, corp, tokenizer, vocab_size, val_fraction, shard_tokens, window_tokens, workers,
           batch_docs, progress, log, corpus_kw, settings) -> dict:
    from data.bios import ProbeRecorder
    from data.corpora import CorpusError
    from data.tokenizer import (EOS, encode_texts, load_tokenizer, save_tokenizer, special_ids, tokenizer_hash,
                                train_tokenizer)

    mpath, tok_dir = os.path.join(out, "manifest.json"), os.path.join(out, "tokenizer")
    replaced = {s: {} for s in SPLITS}
    if os.path.isfile(mpath):
        manifest, tok, replaced = _resume(out, settings, tokenizer, vocab_size, log)
        if manifest["complete"]:
            if read_marker(out) is None or read_marker(out).get("kind") != DATA_KIND:
                write_marker(out, DATA_KIND)  # finished before its marker was written
            n = sum(x["n_tokens"] for x in manifest["splits"]["train"]["shards"])
            log(f"{out}: already prepared ({n:,} train tokens, all shard files intact); nothing to do")
            return manifest
    else:
        t0 = time.time()
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer, add_missing=True)
            log(f"tokenizer: loaded {tokenizer} ({len(tok)} tokens)")
        else:
            texts = (d.text for d in corp if split_of(d.id, val_fraction) == "train")
            if progress:
                log(f"tokenizer: training a byte-level BPE of {vocab_size or DEFAULT_VOCAB} tokens on the train split")
            tok = train_tokenizer(texts, vocab_size or DEFAULT_VOCAB, progress=progress)
            log(f"tokenizer: trained byte-level BPE, vocab {len(tok)} in {time.time() - t0:.1f}s")
        save_tokenizer(tok, tok_dir, replace=True)  # a killed run may have left one in this partial dir
        tok = load_tokenizer(tok_dir)  # hash what readers will load
        manifest = {"version": MANIFEST_VERSION, "source": corp.name, "settings": settings,
                    "tokenizer_hash": tokenizer_hash(tok), "tokenizer_from": _tokenizer_from(tokenizer, vocab_size),
                    "vocab_size": len(tok), "dtype": "uint16" if len(tok) <= 2**16 else "uint32",
                    "eod_token": EOS, "special_ids": special_ids(tok), "window_tokens": window_tokens,
                    "splits": {s: {"shards": []} for s in SPLITS}, "n_levels": None, "arrays": {},
                    "complete": False}
        atomic_write_json(mpath, manifest)

    def save():
        atomic_write_json(mpath, manifest)

    writers = {s: ShardWriter(out, s, manifest, window_tokens, shard_tokens, save, replaced[s], log) for s in SPLITS}
    seen = {s: 0 for s in SPLITS}
    eos = manifest["special_ids"]["eos"]
    recorder = ProbeRecorder.for_corpus(corpus, corpus_kw)
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(unit="doc", desc=f"prepare {os.path.basename(out.rstrip('/'))}", smoothing=0.1)
    t0, n_tok, n_new = time.time(), 0, 0

    def enc(batch):
        return encode_texts(tok, [t for _, _, t in batch])

    def consume(batch, ids_list):
        nonlocal n_tok, n_new
        for (split, doc_id, _), ids in zip(batch, ids_list):
            ids.append(eos)  # the one end-of-document token, by id: never encoded from text
            writers[split].add(doc_id, ids)
            n_tok += len(ids)
        n_new += len(batch)
        if pbar is not None:
            dt = max(time.time() - t0, 1e-9)
            pbar.update(len(batch))
            pbar.set_postfix_str(f"{n_new / dt:,.0f} docs/s, {n_tok / dt:,.0f} tok/s", refresh=False)

    # Bounded pipeline: up to 2*workers batches are encoded in threads (the tokenizers library
    # releases the GIL) while the main thread writes shards in order.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending, batch = deque(), []
        for doc in corp:
            split = split_of(doc.id, val_fraction)
            if recorder is not None and split == "train":
                recorder.add(doc.id, doc.text)
            seen[split] += 1
            if seen[split] <= writers[split].skip_docs:
                continue  # already in a finished shard (resume)
            batch.append((split, doc.id, doc.text))
            if len(batch) >= batch_docs:
                pending.append((batch, pool.submit(enc, batch)))
                batch = []
                while len(pending) > 2 * workers:
                    b, fut = pending.popleft()
                    consume(b, fut.result())
        if batch:
            pending.append((batch, pool.submit(enc, batch)))
        while pending:
            b, fut = pending.popleft()
            consume(b, fut.result())
    for w in writers.values():
        w.finish()
    if pbar is not None:
        pbar.close()
    dt = time.time() - t0
    st = corp.stats.as_dict()
    if sum(seen.values()) == 0:
        raise CorpusError(f"{corp.name}: no documents ({st['empty_skipped']} empty skipped); give a corpus with text")
    if seen["train"] == 0:
        raise CorpusError(f"{corp.name}: all {seen['val']} documents went to the validation split; lower "
                          "--val-fraction or add documents")
    if recorder is not None:
        log(recorder.write(os.path.join(out, "bios")))

    for s in SPLITS:
        sh = manifest["splits"][s]["shards"]
        manifest["splits"][s].update(n_docs=sum(x["n_docs"] for x in sh), n_windows=sum(x["n_windows"] for x in sh),
                                     n_tokens=sum(x["n_tokens"] for x in sh))
    manifest["stats"] = st
    manifest["complete"] = True
    save()
    write_marker(out, DATA_KIND)  # last: the dir is complete, with the size of every file it holds
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    log(f"prepared {out}: train {tr['n_docs']:,} docs / {tr['n_tokens']:,} tokens, val {va['n_docs']:,} docs / "
        f"{va['n_tokens']:,} tokens; {n_new:,} docs tokenized this run in {dt:.1f}s ({n_tok / max(dt, 1e-9):,.0f} "
        f"tok/s); empty docs skipped: {st['empty_skipped']}, invalid UTF-8 replaced: {st['invalid_utf8_replaced']}")
    return manifest

"""Token shards on disk (a "data dir") and `prepare`, which writes them.

Layout (see notes/CONTRACTS.md):
  DATA/manifest.json, DATA/tokenizer/, DATA/{train,val}/SHARD.{tokens.bin,windows.npy,docs.jsonl},
  later DATA/{split}/SHARD.paths.npy and SHARD.<name>.npy per-token arrays (written via write_array).

Document boundaries are explicit (windows.npy offsets), never inferred from EOS. Every document ends
with EOS; a document longer than window_tokens is cut into several windows (chunks).

Crash safety: each shard file is written as `name.tmp` then renamed, and the shard is recorded in
the manifest last. A shard that is not in the manifest does not exist for readers and is rewritten
on resume; a shard in the manifest whose size differs is reported as truncated.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import chain

import numpy as np

MANIFEST_VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A data dir is inconsistent; the message names the file and the problem."""


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic document-level split by a hash of the document id."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    _atomic_write_bytes(path, buf.getvalue())


def _write_json(path: str, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


# --- reading ----------------------------------------------------------------------------------------
class Shard:
    """One shard of one split. Arrays are loaded lazily; `tokens` is a read-only memmap."""

    def __init__(self, data: "DataDir", split: str, meta: dict):
        self.data, self.split, self.meta = data, split, meta
        self.name = meta["name"]
        self.n_tokens, self.n_windows, self.n_docs = meta["n_tokens"], meta["n_windows"], meta["n_docs"]
        self.prefix = os.path.join(data.path, split, self.name)
        self._tokens = self._windows = None

    def file(self, kind: str) -> str:
        return f"{self.prefix}.{kind}"

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            path = self.file("tokens.bin")
            dtype = np.dtype(self.data.manifest["dtype"])
            if not os.path.isfile(path):
                raise ShardError(f"{path}: shard file missing (listed in the manifest)")
            size, want = os.path.getsize(path), self.n_tokens * dtype.itemsize
            if size != want:
                raise ShardError(f"{path}: truncated shard: {size} bytes, manifest says {want} "
                                 f"({self.n_tokens} {dtype.name} tokens); re-run `memlm prepare`")
            self._tokens = np.memmap(path, dtype=dtype, mode="r", shape=(self.n_tokens,))
        return self._tokens

    @property
    def windows(self) -> np.ndarray:
        if self._windows is None:
            path = self.file("windows.npy")
            try:
                w = np.load(path)
            except (OSError, ValueError) as e:
                raise ShardError(f"{path}: cannot read window offsets: {e}") from e
            if w.shape != (self.n_windows + 1,) or w[-1] != self.n_tokens:
                raise ShardError(f"{path}: window offsets do not match the manifest "
                                 f"(shape {w.shape}, end {w[-1] if len(w) else None}; expected "
                                 f"{self.n_windows + 1} offsets ending at {self.n_tokens})")
            self._windows = w
        return self._windows

    @property
    def docs(self) -> list[dict]:
        """One {"doc_id", "chunk"} per window."""
        with open(self.file("docs.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def has_array(self, name: str) -> bool:
        return os.path.isfile(self.file(f"{name}.npy"))

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        path = self.file(f"{name}.npy")
        if not os.path.isfile(path):
            raise ShardError(f"{path}: array {name!r} not found (written by another memlm command, "
                             "e.g. `memlm select` for calls_*, `memlm cluster` for paths)")
        arr = np.load(path, mmap_mode="r" if mmap else None)
        if arr.shape[0] not in (self.n_tokens, self.n_windows):
            raise ShardError(f"{path}: length {arr.shape[0]} matches neither {self.n_tokens} tokens "
                             f"nor {self.n_windows} windows")
        return arr

    @property
    def paths(self) -> np.ndarray | None:
        """int32 [n_windows, n_levels] cluster paths, or None before `memlm cluster`."""
        return self.array("paths") if self.has_array("paths") else None

    def write_array(self, name: str, arr: np.ndarray) -> None:
        """Atomically write a per-token ([n_tokens, ...]) or per-window ([n_windows, ...]) array."""
        arr = np.asarray(arr)
        if name == "paths" or name.startswith("window_"):
            per, want = "window", self.n_windows
        else:
            per = "token" if arr.shape[0] == self.n_tokens else "window"
            want = self.n_tokens if per == "token" else self.n_windows
        if arr.ndim == 0 or arr.shape[0] != want:
            raise ShardError(f"{self.file(name + '.npy')}: array {name!r} has shape {arr.shape}, "
                             f"expected first dim {want} ({per}s of this shard)")
        if name == "paths" and arr.ndim != 2:
            raise ShardError(f"{self.file('paths.npy')}: paths must be [n_windows, n_levels], got {arr.shape}")
        _atomic_save_npy(self.file(f"{name}.npy"), arr)
        self.data._register_array(name, per, arr)


class DataDir:
    """A prepared data directory (see module docstring). Use `open_data(path)`."""

    def __init__(self, path: str):
        self.path = path
        mpath = os.path.join(path, "manifest.json")
        try:
            with open(mpath, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise ShardError(f"{mpath}: no manifest; prepare the data with `memlm prepare --out {path}`") from None
        except (OSError, ValueError) as e:
            raise ShardError(f"{mpath}: cannot read manifest: {e}") from e
        if self.manifest.get("version") != MANIFEST_VERSION:
            raise ShardError(f"{mpath}: unsupported manifest version {self.manifest.get('version')}")
        self._tokenizer = None

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, "manifest.json")

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.path, "tokenizer")

    @property
    def n_levels(self) -> int | None:
        return self.manifest.get("n_levels")

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def bios_dir(self) -> str | None:
        d = os.path.join(self.path, "bios")
        return d if os.path.isdir(d) else None

    def tokenizer(self):
        """The data's tokenizer; raises if its vocab hash differs from the manifest's."""
        if self._tokenizer is None:
            from data.tokenizer import TokenizerError, load_tokenizer, tokenizer_hash

            tok = load_tokenizer(self.tokenizer_dir)
            h, want = tokenizer_hash(tok), self.manifest["tokenizer_hash"]
            if h != want:
                raise TokenizerError(f"{self.tokenizer_dir}: tokenizer vocab does not match "
                                     f"{self.manifest_path} (hash {h} != {want})")
            self._tokenizer = tok
        return self._tokenizer

    def shards(self, split: str) -> list[Shard]:
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.manifest_path}: no split {split!r} (have {list(self.manifest['splits'])})")
        return [Shard(self, split, m) for m in self.manifest["splits"][split]["shards"]]

    def n_tokens(self, split: str) -> int:
        return sum(s["n_tokens"] for s in self.manifest["splits"][split]["shards"])

    def update_manifest(self, **kv) -> None:
        """Set top-level manifest keys (e.g. n_levels=2 from `memlm cluster`) atomically."""
        self.manifest.update(kv)
        _write_json(self.manifest_path, self.manifest)

    def _register_array(self, name: str, per: str, arr: np.ndarray) -> None:
        # re-read first: another shard's write_array may have updated the manifest
        with open(self.manifest_path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.manifest.setdefault("arrays", {})[name] = {"per": per, "dtype": arr.dtype.name,
                                                        "shape": list(arr.shape[1:])}
        _write_json(self.manifest_path, self.manifest)

    def verify(self) -> None:
        """Check sizes and sha256 of every shard (slow on big data; `open_data` only checks sizes)."""
        for split in self.manifest["splits"]:
            for sh in self.shards(split):
                digest = hashlib.sha256(np.ascontiguousarray(sh.tokens).tobytes()).hexdigest()
                if digest != sh.meta["sha256"]:
                    raise ShardError(f"{sh.file('tokens.bin')}: sha256 differs from the manifest (corrupt)")


def open_data(path: str, check: bool = True) -> DataDir:
    """Open a data dir; with check=True, verify that every listed shard has the right size."""
    d = DataDir(path)
    if not d.manifest.get("complete", False):
        raise ShardError(f"{d.manifest_path}: preparation did not finish; re-run `memlm prepare` to resume")
    if check:
        for split in d.manifest["splits"]:
            for sh in d.shards(split):
                sh.tokens  # noqa: B018  (size check)
    return d


# --- writing ----------------------------------------------------------------------------------------
class _SplitWriter:
    """Buffers tokenized documents of one split and flushes shards of >= shard_tokens tokens."""

    def __init__(self, out: str, split: str, manifest: dict, dtype, window_tokens: int, shard_tokens: int,
                 save_manifest):
        self.dir = os.path.join(out, split)
        os.makedirs(self.dir, exist_ok=True)
        self.split, self.manifest, self.dtype = split, manifest, np.dtype(dtype)
        self.window_tokens, self.shard_tokens, self.save_manifest = window_tokens, shard_tokens, save_manifest
        self.done = manifest["splits"][split]["shards"]
        self.skip_docs = sum(s["n_docs"] for s in self.done)  # docs already in finished shards
        self._reset()

    def _reset(self):
        self.chunks, self.lens, self.doc_lines, self.n_tokens, self.n_docs = [], [], [], 0, 0

    def add(self, doc_id: str, ids: list[int]) -> None:
        """ids must already end with EOS."""
        n, w = len(ids), self.window_tokens
        self.chunks.append(ids)
        for c, start in enumerate(range(0, n, w)):
            self.lens.append(min(w, n - start))
            self.doc_lines.append(json.dumps({"doc_id": doc_id, "chunk": c}, ensure_ascii=False))
        self.n_tokens += n
        self.n_docs += 1
        if self.n_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.n_docs:
            return
        name = f"{len(self.done):05d}"
        prefix = os.path.join(self.dir, name)
        tokens = np.fromiter(chain.from_iterable(self.chunks), dtype=self.dtype, count=self.n_tokens)
        data = tokens.tobytes()
        windows = np.zeros(len(self.lens) + 1, dtype=np.int64)
        np.cumsum(self.lens, out=windows[1:])
        _atomic_write_bytes(prefix + ".tokens.bin", data)
        _atomic_save_npy(prefix + ".windows.npy", windows)
        _atomic_write_bytes(prefix + ".docs.jsonl", ("\n".join(self.doc_lines) + "\n").encode("utf-8"))
        # recorded last: only now does the shard exist for readers and for resume
        self.done.append({"name": name, "n_docs": self.n_docs, "n_windows": len(self.lens),
                          "n_tokens": self.n_tokens, "sha256": hashlib.sha256(data).hexdigest()})
        self.save_manifest()
        self._reset()


def _settings(source, window_tokens, shard_tokens, val_fraction, max_docs, corpus_kw) -> dict:
    return {"source": source, "window_tokens": window_tokens, "shard_tokens": shard_tokens,
            "val_fraction": val_fraction, "max_docs": max_docs,
            "corpus_kw": {k: v for k, v in sorted(corpus_kw.items()) if v is not None}}


def _mentions_bios(spec) -> bool:
    from data.corpora import parse_mixture

    parts = parse_mixture(spec)
    return spec == "bios" if parts is None else any(n == "bios" for n, _ in parts)


def prepare(corpus: str, out: str, tokenizer: str | None = None, vocab_size: int = 8192,
            val_fraction: float = 0.01, shard_tokens: int = 50_000_000, window_tokens: int = 2048,
            workers: int | None = None, max_docs: int | None = None, batch_docs: int = 512,
            progress: bool = True, log=print, **corpus_kw) -> dict:
    """Corpus -> tokenizer -> token shards in `out`. Idempotent and resumable; returns the manifest."""
    from data import bios as bios_mod
    from data.corpora import load_corpus
    from data.tokenizer import (TokenizerError, load_tokenizer, save_tokenizer, special_ids,
                                tokenizer_hash, train_tokenizer)

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if window_tokens < 2:
        raise ValueError(f"window_tokens must be >= 2, got {window_tokens}")
    workers = workers or os.cpu_count() or 1
    os.makedirs(out, exist_ok=True)
    mpath, tok_dir = os.path.join(out, "manifest.json"), os.path.join(out, "tokenizer")
    corp = load_corpus(corpus, max_docs=max_docs, **corpus_kw)
    settings = _settings(corp.name, window_tokens, shard_tokens, val_fraction, max_docs, corpus_kw)

    manifest = None
    if os.path.isfile(mpath):
        manifest = DataDir(out).manifest
        if manifest.get("settings") != settings:
            raise ShardError(f"{mpath}: {out} was prepared with other settings {manifest.get('settings')}; "
                             f"now {settings}. Use another --out or delete {out}")
    # --- tokenizer --------------------------------------------------------------------------------
    if manifest is not None:
        tok = load_tokenizer(tok_dir)
        h = tokenizer_hash(tok)
        if h != manifest["tokenizer_hash"]:
            raise TokenizerError(f"{tok_dir}: tokenizer vocab does not match {mpath} "
                                 f"(hash {h} != {manifest['tokenizer_hash']})")
        if tokenizer is not None:
            given = tokenizer_hash(load_tokenizer(tokenizer, add_missing=True))
            if given != h:
                raise TokenizerError(f"{tokenizer}: tokenizer vocab does not match the shards' manifest "
                                     f"{mpath} (hash {given} != {h}); use another --out")
    else:
        t0 = time.time()
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer, add_missing=True)
            log(f"tokenizer: loaded {tokenizer} ({len(tok)} tokens)")
        else:
            texts = (d.text for d in corp if split_of(d.id, val_fraction) == "train")
            tok = train_tokenizer(texts, vocab_size)
            log(f"tokenizer: trained byte-level BPE, vocab {len(tok)} in {time.time() - t0:.1f}s")
        save_tokenizer(tok, tok_dir)
        tok = load_tokenizer(tok_dir)  # hash what readers will load
        manifest = {"version": MANIFEST_VERSION, "source": corp.name, "settings": settings,
                    "tokenizer_hash": tokenizer_hash(tok), "vocab_size": len(tok),
                    "dtype": "uint16" if len(tok) <= 2**16 else "uint32",
                    "special_ids": special_ids(tok), "window_tokens": window_tokens,
                    "splits": {s: {"shards": []} for s in SPLITS}, "n_levels": None, "arrays": {},
                    "complete": False}
        _write_json(mpath, manifest)
    if manifest.get("complete"):
        log(f"{out}: already prepared ({manifest['splits']['train']['n_tokens']:,} train tokens); nothing to do")
        return manifest

    # --- shards -----------------------------------------------------------------------------------
    manifest["complete"] = False
    save = lambda: _write_json(mpath, manifest)  # noqa: E731
    writers = {s: _SplitWriter(out, s, manifest, manifest["dtype"], window_tokens, shard_tokens, save)
               for s in SPLITS}
    seen = {s: 0 for s in SPLITS}
    eos = manifest["special_ids"]["eos"]
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    want_bios = _mentions_bios(corpus)
    bios_train = []  # (doc_id, text) of bios training docs, for exact probe counts

    def enc(batch):
        return [e.ids for e in encode([t for _, _, t in batch], add_special_tokens=False)]

    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(unit="doc", desc=f"prepare {os.path.basename(out.rstrip('/'))}", smoothing=0.1)
    t0, n_tok, n_new = time.time(), 0, 0

    def consume(batch, ids_list):
        nonlocal n_tok, n_new
        for (split, doc_id, _), ids in zip(batch, ids_list):
            ids.append(eos)
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
            if want_bios and split == "train" and bios_mod.person_of(doc.id) is not None:
                bios_train.append((doc.id, doc.text))
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
        w.flush()
    if pbar is not None:
        pbar.close()
    dt = time.time() - t0

    if want_bios:
        cfg = bios_mod.config_from_kw(corpus_kw)
        people, docs = bios_mod.generate(cfg)
        probes = bios_mod.probes_from_docs(people, bios_train, cfg.bucket_edges)
        bios_mod.write_kb(os.path.join(out, "bios"), cfg, people, probes, docs)
        log(f"bios: {len(people)} people, {len(probes)} probes -> {os.path.join(out, 'bios')}")

    for s in SPLITS:
        sh = manifest["splits"][s]["shards"]
        manifest["splits"][s].update(n_docs=sum(x["n_docs"] for x in sh), n_windows=sum(x["n_windows"] for x in sh),
                                     n_tokens=sum(x["n_tokens"] for x in sh))
    manifest["stats"] = corp.stats.as_dict()
    manifest["complete"] = True
    save()
    st = manifest["stats"]
    log(f"prepared {out}: train {manifest['splits']['train']['n_docs']:,} docs / "
        f"{manifest['splits']['train']['n_tokens']:,} tokens, val {manifest['splits']['val']['n_docs']:,} docs / "
        f"{manifest['splits']['val']['n_tokens']:,} tokens; {n_new:,} docs tokenized this run in {dt:.1f}s "
        f"({n_tok / max(dt, 1e-9):,.0f} tok/s); empty docs skipped: {st['empty_skipped']}, "
        f"invalid UTF-8 replaced: {st['invalid_utf8_replaced']}")
    return manifest

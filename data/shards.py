"""Token shards on disk (a "data dir"): reading, checking, and the per-token arrays later stages add.

Layout:
  DATA/manifest.json      settings, tokenizer hash, control-token ids, the shards of each split
  DATA/.memlm.json        model.atomic marker: kind "data-partial" while `memlm prepare` runs, "data" when
                          it finished, with the size of every file prepare wrote (checked on open)
  DATA/tokenizer/         the tokenizer (its own marker), see data/tokenizer.py
  DATA/{train,val}/SHARD.tokens.bin   uint16|uint32 [n_tokens] token ids, documents back to back, each
                                      ending with EOS (memlm's id, never one encoded from text)
  DATA/{train,val}/SHARD.windows.npy  int64 [n_windows + 1] token offsets of the windows: window w is
                                      tokens[windows[w]:windows[w+1]], at most window_tokens long; a
                                      document longer than that is cut into consecutive windows (chunks)
  DATA/{train,val}/SHARD.docs.jsonl   one {"doc_id", "chunk"} per window
  DATA/{train,val}/SHARD.<name>.npy   arrays added later: per token ([n_tokens, ...], e.g. factual uint8,
                                      loss_ref float16, calls_<rule> uint8) or per window ([n_windows, ...],
                                      e.g. paths int32 [n_windows, n_levels] from `memlm cluster`)
  DATA/bios/              kb.json, probes.jsonl, docs.jsonl for the `bios` corpus

Document boundaries are explicit (windows + docs.jsonl), never inferred from EOS. A shard exists for
readers only once the manifest lists it; a data dir is complete once the manifest says so. Every damage
(missing key, missing or truncated file) is a `ShardError` naming the file and the remedy: re-running the
same `memlm prepare` rebuilds damaged shards; a damaged manifest or tokenizer needs `--rebuild`.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from model.atomic import atomic_path, atomic_write_json, read_marker
from model.errors import DataError

MANIFEST_VERSION = 1
SPLITS = ("train", "val")
DATA_KIND, PARTIAL_KIND = "data", "data-partial"  # model.atomic marker kinds of a data dir
SHARD_FILES = ("tokens.bin", "windows.npy", "docs.jsonl")  # what prepare writes per shard


class ShardError(DataError):
    """A data dir is missing, damaged or inconsistent; the message names the file and the remedy."""


# --- the manifest --------------------------------------------------------------------------------
_KEYS = {"version": int, "source": str, "settings": dict, "tokenizer_hash": str, "vocab_size": int,
         "dtype": str, "special_ids": dict, "window_tokens": int, "splits": dict, "complete": bool}
_SHARD_KEYS = {"name": str, "n_docs": int, "n_windows": int, "n_tokens": int, "sha256": str}
_FLAGS = {"window_tokens": "--window-tokens", "shard_tokens": "--shard-tokens", "val_fraction": "--val-fraction",
          "max_docs": "--max-docs"}


def prepare_command(path: str, manifest: dict | None) -> str:
    """The `memlm prepare` command line that (re)builds the data dir at `path` with its recorded settings."""
    st = (manifest or {}).get("settings") if isinstance((manifest or {}).get("settings"), dict) else {}
    parts = ["memlm prepare", "--corpus", str(st.get("source", "CORPUS")), "--out", path]
    for key, flag in _FLAGS.items():
        if st.get(key) is not None:
            parts += [flag, str(st[key])]
    for key, value in sorted((st.get("corpus_kw") or {}).items()):
        parts += ["--" + key.replace("_", "-"), str(value)]
    made = (manifest or {}).get("tokenizer_from")
    if isinstance(made, dict) and made:
        key, value = next(iter(made.items()))
        parts += ["--" + key.replace("_", "-"), str(value)]
    return " ".join(parts)


def _damaged(mpath: str, what: str, path: str, manifest: dict | None) -> ShardError:
    return ShardError(f"{mpath}: {what} (the manifest is damaged); prepare the data dir again with "
                      f"`{prepare_command(path, manifest)} --rebuild`, or into a new --out")


def check_manifest(m, mpath: str, path: str) -> dict:
    """Validate a manifest's keys and types; raise ShardError naming the manifest and the key."""
    if not isinstance(m, dict):
        raise _damaged(mpath, f"expected a JSON object, got {type(m).__name__}", path, None)
    for key, typ in _KEYS.items():
        if key not in m:
            raise _damaged(mpath, f"missing key {key!r}", path, m)
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise _damaged(mpath, f"key {key!r} is {type(m[key]).__name__}, expected {typ.__name__}", path, m)
    if m["version"] != MANIFEST_VERSION:
        raise ShardError(f"{mpath}: manifest version {m['version']} is not {MANIFEST_VERSION} (written by another "
                         f"memlm version); prepare it again with `{prepare_command(path, m)} --rebuild`")
    if m["dtype"] not in ("uint16", "uint32"):
        raise _damaged(mpath, f"key 'dtype' is {m['dtype']!r}, expected 'uint16' or 'uint32'", path, m)
    for key in ("eos", "pad", "call"):
        if not isinstance(m["special_ids"].get(key), int):
            raise _damaged(mpath, f"missing key 'special_ids.{key}'", path, m)
    for split in SPLITS:
        shards = m["splits"].get(split, {}).get("shards") if isinstance(m["splits"].get(split), dict) else None
        if not isinstance(shards, list):
            raise _damaged(mpath, f"missing key 'splits.{split}.shards'", path, m)
        for i, sh in enumerate(shards):
            for key, typ in _SHARD_KEYS.items():
                if not isinstance(sh, dict) or not isinstance(sh.get(key), typ):
                    raise _damaged(mpath, f"missing or bad key 'splits.{split}.shards[{i}].{key}'", path, m)
    return m


def read_manifest(path: str) -> dict:
    """The validated manifest of the data dir at `path` (ShardError naming the file otherwise)."""
    mpath = os.path.join(path, "manifest.json")
    if os.path.isfile(path):
        raise ShardError(f"{path}: is a file, not a data dir (prepare one with `memlm prepare --out DIR`)")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{mpath}: no manifest: not a data dir; prepare one with "
                         f"`memlm prepare --corpus CORPUS --out {path}`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(mpath, f"unreadable ({e})", path, None) from e
    return check_manifest(m, mpath, path)


# --- reading -------------------------------------------------------------------------------------
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

    def _bad(self, kind: str, problem: str) -> ShardError:
        return ShardError(f"{self.file(kind)}: {problem}; re-run `{prepare_command(self.data.path, self.data.manifest)}` "
                          "(it rebuilds damaged shards)")

    def problem(self, deep: bool = False) -> ShardError | None:
        """The first damage of this shard's files (missing, wrong size, bad window offsets; with `deep`,
        token bytes whose sha256 differs from the manifest's), or None."""
        dtype = np.dtype(self.data.manifest["dtype"])
        path = self.file("tokens.bin")
        if not os.path.isfile(path):
            return self._bad("tokens.bin", "shard file missing (listed in the manifest)")
        size, want = os.path.getsize(path), self.n_tokens * dtype.itemsize
        if size != want:
            return self._bad("tokens.bin", f"truncated shard: {size} bytes, the manifest says {want} "
                                           f"({self.n_tokens} {dtype.name} tokens)")
        for kind in SHARD_FILES[1:]:
            recorded = self.data.recorded_size(os.path.join(self.split, f"{self.name}.{kind}"))
            if not os.path.isfile(self.file(kind)):
                return self._bad(kind, "shard file missing (listed in the manifest)")
            if recorded is not None and os.path.getsize(self.file(kind)) != recorded:
                return self._bad(kind, f"{os.path.getsize(self.file(kind))} bytes, {recorded} when prepared "
                                       "(truncated or damaged)")
        try:
            self.windows  # noqa: B018  (loads and checks the offsets)
        except ShardError as e:
            return e
        if deep and hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes()).hexdigest() != self.meta["sha256"]:
            return self._bad("tokens.bin", "sha256 differs from the manifest (damaged at its size)")
        return None

    @property
    def tokens(self) -> np.memmap:
        """uint16|uint32 [n_tokens] token ids (read-only memmap); ShardError if the file is damaged."""
        if self._tokens is None:
            path = self.file("tokens.bin")
            dtype = np.dtype(self.data.manifest["dtype"])
            if not os.path.isfile(path) or os.path.getsize(path) != self.n_tokens * dtype.itemsize:
                raise self.problem() or self._bad("tokens.bin", "damaged")
            self._tokens = np.memmap(path, dtype=dtype, mode="r", shape=(self.n_tokens,)) if self.n_tokens else \
                np.zeros(0, dtype=dtype)
        return self._tokens

    @property
    def windows(self) -> np.ndarray:
        """int64 [n_windows + 1] window offsets into `tokens` (0 first, n_tokens last, increasing)."""
        if self._windows is None:
            path = self.file("windows.npy")
            try:
                w = np.load(path)
            except (OSError, ValueError, EOFError) as e:
                raise self._bad("windows.npy", f"cannot read window offsets ({e})") from e
            if w.shape != (self.n_windows + 1,) or w[0] != 0 or w[-1] != self.n_tokens or (np.diff(w) <= 0).any():
                raise self._bad("windows.npy", f"window offsets do not match the manifest (shape {w.shape}, "
                                               f"expected {self.n_windows + 1} increasing offsets from 0 to {self.n_tokens})")
            self._windows = w
        return self._windows

    @property
    def docs(self) -> list[dict]:
        """One {"doc_id": str, "chunk": int} per window (chunk c of a document is its c-th window)."""
        path = self.file("docs.jsonl")
        try:
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise self._bad("docs.jsonl", f"unreadable ({e})") from e
        if len(rows) != self.n_windows:
            raise self._bad("docs.jsonl", f"{len(rows)} rows, the manifest says {self.n_windows} windows")
        return rows

    def has_array(self, name: str) -> bool:
        return os.path.isfile(self.file(f"{name}.npy"))

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        """A per-token [n_tokens, ...] or per-window [n_windows, ...] array written by `write_array`."""
        path = self.file(f"{name}.npy")
        if not os.path.isfile(path):
            raise ShardError(f"{path}: array {name!r} not found (written by another memlm command, "
                             "e.g. `memlm select` for calls_*, `memlm tag` for factual, `memlm cluster` for paths)")
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as e:
            raise ShardError(f"{path}: cannot read array {name!r} ({e}); {self._redo(name)}") from e
        if arr.ndim == 0 or arr.shape[0] not in (self.n_tokens, self.n_windows):
            raise ShardError(f"{path}: length {arr.shape[0] if arr.ndim else 0} matches neither {self.n_tokens} "
                             f"tokens nor {self.n_windows} windows; {self._redo(name)}")
        return arr

    def _redo(self, name: str) -> str:
        """The command that writes array `name` again."""
        data = self.data.path
        if name == "paths" or name.startswith(("window_", "entity")):
            return f"run `memlm cluster {data} --refit` again"
        if name.startswith("calls_"):
            return f"run the `memlm select {data} ...` that wrote it again (it replaces the array)"
        if name == "factual":
            return f"run `memlm tag {data} --overwrite`"
        if name.startswith("loss_"):
            return f"run `memlm score {data} --model ... --name {name[5:]} --overwrite`"
        return "run the memlm command that wrote it again"

    @property
    def paths(self) -> np.ndarray | None:
        """int32 [n_windows, n_levels] cluster paths, or None before `memlm cluster`."""
        return self.array("paths") if self.has_array("paths") else None

    def write_array(self, name: str, arr: np.ndarray) -> None:
        """Atomically write a per-token ([n_tokens, ...]) or per-window ([n_windows, ...]) array. The shard's
        own files (tokens, windows, docs) are never an array name: ShardError."""
        if name in {f.split(".")[0] for f in SHARD_FILES}:
            raise ShardError(f"{self.file(name + '.npy')}: {name!r} is a shard file memlm prepare wrote, not an "
                             "array name; choose another name")
        arr = np.asarray(arr)
        if name == "paths" or name.startswith("window_"):
            per, want = "window", self.n_windows
        else:
            per = "token" if arr.ndim and arr.shape[0] == self.n_tokens else "window"
            want = self.n_tokens if per == "token" else self.n_windows
        if arr.ndim == 0 or arr.shape[0] != want:
            raise ShardError(f"{self.file(name + '.npy')}: array {name!r} has shape {arr.shape}, "
                             f"expected first dim {want} ({per}s of this shard)")
        if name == "paths" and arr.ndim != 2:
            raise ShardError(f"{self.file('paths.npy')}: paths must be [n_windows, n_levels], got {arr.shape}")
        with atomic_path(self.file(f"{name}.npy")) as tmp:
            np.save(tmp, arr, allow_pickle=False)
        self.data._register_array(name, per, arr)


class DataDir:
    """A prepared data directory (see module docstring). Use `open_data(path)`."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)
        self.marker = read_marker(path)
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

    def recorded_size(self, rel: str) -> int | None:
        """Size of file `rel` when prepare finished (from the marker), or None if not recorded."""
        if not self.marker or self.marker.get("kind") != DATA_KIND:
            return None
        return (self.marker.get("files") or {}).get(rel)

    def tokenizer(self):
        """The data's tokenizer; raises if its vocab or control ids differ from the manifest's."""
        if self._tokenizer is None:
            from data.tokenizer import EOS, TokenizerError, load_tokenizer, special_ids, tokenizer_hash

            fix = f"prepare the data dir again with `{prepare_command(self.path, self.manifest)} --rebuild`"
            try:
                tok = load_tokenizer(self.tokenizer_dir)
            except TokenizerError as e:
                raise TokenizerError(f"{e}; {fix}") from None
            h, want = tokenizer_hash(tok), self.manifest["tokenizer_hash"]
            if h != want:
                raise TokenizerError(f"{self.tokenizer_dir}: tokenizer vocab does not match "
                                     f"{self.manifest_path} (hash {h} != {want}); {fix}")
            ids = special_ids(tok)
            if ids != {k: self.manifest["special_ids"][k] for k in ids} or tok.eos_token != EOS:
                raise TokenizerError(f"{self.tokenizer_dir}: control-token ids {ids} (eos {tok.eos_token!r}) differ "
                                     f"from {self.manifest_path} {self.manifest['special_ids']}; {fix}")
            self._tokenizer = tok
        return self._tokenizer

    def shards(self, split: str) -> list[Shard]:
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.manifest_path}: no split {split!r} (have {', '.join(self.manifest['splits'])})")
        return [Shard(self, split, m) for m in self.manifest["splits"][split]["shards"]]

    def n_tokens(self, split: str) -> int:
        return sum(s["n_tokens"] for s in self.manifest["splits"][split]["shards"])

    def update_manifest(self, **kv) -> None:
        """Set top-level manifest keys (e.g. n_levels=2 from `memlm cluster`) atomically."""
        self.manifest.update(kv)
        atomic_write_json(self.manifest_path, self.manifest)

    def _register_array(self, name: str, per: str, arr: np.ndarray) -> None:
        # re-read first: another shard's write_array may have updated the manifest
        self.manifest = read_manifest(self.path)
        self.manifest.setdefault("arrays", {})[name] = {"per": per, "dtype": arr.dtype.name,
                                                        "shape": list(arr.shape[1:])}
        atomic_write_json(self.manifest_path, self.manifest)

    def fingerprint(self) -> str:
        """sha256 (16 hex) over the tokenizer hash and every shard's recorded sha256: the same tokens in the
        same order <=> the same fingerprint. A checkpoint records its data's, so that resuming on data
        prepared again (other documents under the same path) is caught."""
        shards = [(split, sh["name"], sh["sha256"]) for split in SPLITS
                  for sh in self.manifest["splits"].get(split, {}).get("shards", [])]
        text = json.dumps([self.manifest.get("tokenizer_hash"), shards])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def problems(self, deep: bool = False) -> dict[str, tuple[int, ShardError]]:
        """{split: (index of its first damaged shard, the error)} over all splits; {} when intact. `deep`
        also compares every shard's sha256 with the manifest (reads all tokens)."""
        out = {}
        for split in SPLITS:
            for i, sh in enumerate(self.shards(split)):
                err = sh.problem(deep)
                if err is not None:
                    out[split] = (i, err)
                    break
        return out

    def verify(self) -> None:
        """Check sizes and sha256 of every shard (slow on big data; `open_data` only checks sizes)."""
        for split in SPLITS:
            for sh in self.shards(split):
                digest = hashlib.sha256(np.ascontiguousarray(sh.tokens).tobytes()).hexdigest()
                if digest != sh.meta["sha256"]:
                    raise sh._bad("tokens.bin", "sha256 differs from the manifest (corrupt)")


def open_data(path: str, check: bool = True) -> DataDir:
    """Open a complete data dir; with check=True, also check every shard's files (sizes, offsets).
    Raises ShardError naming the file and the command that repairs it."""
    d = DataDir(path)
    if not d.manifest["complete"]:
        raise ShardError(f"{d.manifest_path}: preparation did not finish; re-run "
                         f"`{prepare_command(path, d.manifest)}` to resume")
    if check:
        bad = d.problems()
        if bad:
            raise next(iter(bad.values()))[1]
    return d


def __getattr__(name: str):
    # `from data.shards import prepare` (the writing side lives in data/prepare.py, which imports this module)
    if name == "prepare":
        from data.prepare import prepare

        return prepare
    raise AttributeError(f"module 'data.shards' has no attribute {name!r}")

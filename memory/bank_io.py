"""Bank files: safetensors opened as numpy memmaps, and the sharded bank checkpoint format.

Two things live here (numpy + JSON only, no torch):

1. **safetensors as memmaps.** A safetensors file is `u64 header_len | JSON header | data`, each tensor
   at a byte range of the data. `create_safetensors` writes the header and *truncates* the file to its
   full size without writing the data, so a new file is sparse (a 30 GB bank costs no disk until rows
   are written); `open_safetensors` maps the file once and views every tensor at its offset. The files stay
   valid safetensors (`safetensors.numpy.load_file` reads them).

2. **Bank checkpoints** (`<checkpoint>/bank/`): one table of rows per level, sharded by row ranges:

       bank/index.json                       {"format": "memlm-bank", "version": 1, "meta": {...},
                                              "levels": [{"level": 1, "n_rows", "row_dim", "shards": [
                                                  {"file", "start", "stop", "top"}, ...]}, ...]}
       bank/L2-t00003-00000.safetensors      the non-pristine rows of range [start, stop) of level 2 (a range
                                             lies inside one top-level cluster, here 3): rows [n] i64 (their
                                             global ids), w, exp_avg, exp_avg_sq [n, row_dim] f32,
                                             step, tokens [n] i64, init [n] u8

   A shard never straddles two top-level clusters (the rows of top cluster c at level l are
   [c*k^(l-1), (c+1)*k^(l-1))), so in a multi-process run every rank writes only the shards of the
   subtrees it owns, and a checkpoint written with W ranks loads with any other number of ranks.
   Pristine rows (never materialised, never updated) are not stored: a shard holds only the other
   rows of its range, and a range without any is not written at all. A missing row means "lazily
   initialised from (seed, level, row), zero optimizer state", so a checkpoint costs O(touched rows).
   Incremental: a shard with no row changed since the previous checkpoint is hard-linked from it
   (copied when links are not possible); only shards holding changed rows are rewritten.
   Atomicity is the checkpoint directory's: the training loop writes `step-N.tmp/` and renames it
   when complete, so a crash mid-save leaves the previous checkpoint untouched (hard links share the
   inode, and a rewritten shard is a new file, never an in-place write into the old one).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct

import numpy as np

from model.atomic import atomic_file, atomic_write_json
from model.errors import CheckpointError, ConfigError

FORMAT = "memlm-bank"
VERSION = 1
# name -> (numpy dtype, per-row shape is [row_dim] (True) or scalar (False))
ROW_ARRAYS = {
    "w": (np.float32, True),
    "exp_avg": (np.float32, True),
    "exp_avg_sq": (np.float32, True),
    "step": (np.int64, False),
    "tokens": (np.int64, False),
    "init": (np.uint8, False),
}
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
              np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8", np.dtype(np.float64): "F64"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# safetensors <-> numpy memmap

def _header(specs: dict[str, tuple[np.dtype, tuple]], metadata: dict | None) -> tuple[bytes, dict]:
    """specs name -> (dtype, shape), in file order. Returns (header bytes incl. length prefix, offsets)."""
    head, offsets, pos = {}, {}, 0
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, (dtype, shape) in specs.items():
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        head[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 64)  # pad so the data starts 64-byte aligned (spaces are valid JSON)
    return struct.pack("<Q", len(raw)) + raw, {"offsets": offsets, "data_start": 8 + len(raw), "data_len": pos}


def create_safetensors(path: str, specs: dict[str, tuple], metadata: dict | None = None) -> None:
    """A new safetensors file with every tensor zero, written sparse (header + ftruncate)."""
    header, info = _header(specs, metadata)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(info["data_start"] + info["data_len"])


def damaged(path: str, why: str) -> CheckpointError:
    """The error for a bank file whose contents make no sense (overwritten, bit rot, a foreign file)."""
    return CheckpointError(f"{path}: damaged: {why}; resume from an older checkpoint or delete the damaged one")


def _is_int(x) -> bool:
    return type(x) is int and x >= 0


def _tensor_spec(t) -> tuple | None:
    """(dtype, shape, start, stop) of one safetensors header entry; None when it is not a consistent one."""
    if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or t["dtype"] not in _NP_DTYPES:
        return None
    shape, offsets = t.get("shape"), t.get("data_offsets")
    if not (isinstance(shape, list) and all(map(_is_int, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        return None
    dtype, (a, b) = _NP_DTYPES[t["dtype"]], offsets
    if b - a != math.prod(shape) * dtype.itemsize:
        return None
    return dtype, tuple(shape), a, b


def open_safetensors(path: str, mode: str = "r", random_access: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Map every tensor of a safetensors file: ({name: array view of one shared mapping}, metadata).

    mode "r" (read-only arrays) or "r+" (writes go to the file through the page cache). random_access:
    advise the kernel that rows are read at random (MADV_RANDOM), so a page fault reads only its page:
    the default read-around fills every fault's neighbourhood (up to read_ahead_kb) into the page
    cache, which for a bank's scattered rows (and for holes of a sparse file, zero-filled) costs time and
    RSS for pages nobody reads. Raises CheckpointError for a file that is not a complete safetensors file."""
    if mode not in ("r", "r+"):
        raise ConfigError(f"open_safetensors: mode must be 'r' or 'r+', got {mode!r}")
    with open(path, "rb" if mode == "r" else "r+b") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise damaged(path, "not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if 8 + n > size:  # checked before reading: a damaged length can be any 64-bit number
            raise damaged(path, f"header length {n} but the file has {size} bytes")
        try:
            head = json.loads(f.read(n))
        except ValueError as e:  # not JSON, or not UTF-8
            raise damaged(path, f"unreadable header: {e}") from None
        if not isinstance(head, dict) or not isinstance(head.get("__metadata__") or {}, dict):
            raise damaged(path, "the header is not a safetensors header")
        meta = head.pop("__metadata__", None) or {}
        specs = {}
        for name, t in head.items():
            spec = _tensor_spec(t)
            if spec is None:
                raise damaged(path, f"bad header entry for tensor {name!r}")
            if 8 + n + spec[3] > size:
                raise damaged(path, f"tensor {name!r} ends at byte {8 + n + spec[3]} but the file has {size} bytes "
                              f"(truncated write?)")
            specs[name] = spec
        mm = None
        if size > 8 + n:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ if mode == "r" else mmap.ACCESS_WRITE)
            if random_access and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)
    out = {}
    for name, (dtype, shape, a, b) in specs.items():
        if b == a:  # nothing to map
            out[name] = np.zeros(shape, dtype)
        else:
            count = (b - a) // dtype.itemsize
            out[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + a).reshape(shape)
    return out, meta


def flush_mapped(arrays: dict[str, np.ndarray]) -> None:
    """Write the dirty pages of arrays returned by `open_safetensors(..., "r+")` to their file (msync)."""
    for a in arrays.values():
        base = a
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, mmap.mmap):
            base.flush()
            return  # one mapping per file


def write_safetensors(path: str, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write arrays as safetensors, streaming (no concatenated copy), atomically (model.atomic)."""
    specs = {k: (np.asarray(v).dtype, np.asarray(v).shape) for k, v in arrays.items()}
    header, _ = _header(specs, metadata)
    with atomic_file(path, "wb") as f:
        f.write(header)
        for v in arrays.values():
            f.write(memoryview(np.ascontiguousarray(v)).cast("B"))


def write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, indent=1)


# ---------------------------------------------------------------------------------------------
# sharded bank checkpoints

def top_block(k: int, level: int) -> int:
    """Rows of one top-level cluster at `level` (1-based): k**(level-1), contiguous."""
    return k ** (level - 1)


def plan_shards(k: int, level: int, row_dim: int, shard_bytes: int, tops=None) -> list[tuple[int, int, int, int]]:
    """[(top, j, start, stop)] covering the level, shards inside one top cluster, ~shard_bytes each
    (counting weights + both moments)."""
    S = top_block(k, level)
    per_row = 3 * 4 * max(row_dim, 1)
    rows = max(1, min(S, int(shard_bytes) // per_row))
    out = []
    for c in range(k) if tops is None else tops:
        for j, a in enumerate(range(c * S, (c + 1) * S, rows)):
            out.append((c, j, a, min(a + rows, (c + 1) * S)))
    return out


def shard_name(level: int, top: int, j: int) -> str:
    return f"L{level}-t{top:05d}-{j:05d}.safetensors"


def read_index(bank_dir: str) -> dict:
    path = os.path.join(bank_dir, "index.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{bank_dir}: no index.json (not a memlm bank checkpoint, or an unfinished save)")
    try:
        with open(path, encoding="utf-8") as f:
            idx = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(path, f"unreadable bank index ({e})") from None
    if not isinstance(idx, dict):
        raise CheckpointError(f"{path}: not a bank index (a JSON {type(idx).__name__}, not an object)")
    if idx.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {idx.get('format')!r}, expected {FORMAT!r}")
    if idx.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {idx.get('version')!r}, this memlm reads version {VERSION}")
    why = _index_problem(idx)
    if why:
        raise damaged(path, why)
    return idx


def _index_problem(idx: dict) -> str | None:
    """What makes a bank index inconsistent (None: nothing), so readers can index it without checks."""
    meta, levels = idx.get("meta"), idx.get("levels")
    if not isinstance(meta, dict):
        return "'meta' is not an object"
    for key in ("k", "d", "n_mem_layers", "save_seq", "world_size"):
        if not _is_int(meta.get(key)):
            return f"meta.{key} is not a non-negative integer"
    if type(meta.get("seed")) is not int:
        return "meta.seed is not an integer"
    for key in ("widths", "layer_ids"):
        if not isinstance(meta.get(key), list) or not all(map(_is_int, meta[key])):
            return f"meta.{key} is not a list of non-negative integers"
    if type(meta.get("init_std")) not in (int, float) or not isinstance(meta.get("uid"), str):
        return "meta.init_std or meta.uid missing"
    k, widths = meta["k"], meta["widths"]
    if k < 1 or not isinstance(levels, list) or len(levels) != len(widths):
        return f"'levels' does not hold one entry per level of widths {widths}"
    for l, (lv, width) in enumerate(zip(levels, widths), 1):
        row_dim = meta["n_mem_layers"] * 3 * width * meta["d"]
        if not isinstance(lv, dict) or (lv.get("level"), lv.get("width"), lv.get("n_rows"), lv.get("row_dim")) != (
                l, width, k ** l, row_dim) or not isinstance(lv.get("shards"), list):
            return f"level {l}: entry does not match meta (level, width, n_rows, row_dim or shards)"
        block = top_block(k, l)
        for sh in lv["shards"]:
            ok = (isinstance(sh, dict) and all(_is_int(sh.get(key)) for key in ("start", "stop", "top"))
                  and isinstance(sh.get("file"), str) and sh["file"] == os.path.basename(sh["file"])
                  and sh["file"].endswith(".safetensors"))
            # a shard lies inside its top cluster's rows (a wrong `top` would give a rank rows it does not own)
            if not ok or not (sh["top"] * block <= sh["start"] < sh["stop"] <= (sh["top"] + 1) * block):
                return f"level {l}: bad shard entry {str(sh)[:80]}"
    return None


def link_or_copy(src: str, dst: str) -> str:
    """Hard-link src to dst (same inode, no bytes written); copy when the file system refuses."""
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def save_level_shards(bank_dir: str, level: int, k: int, row_dim: int, read, tops, *,
                      shard_bytes: int, dirty: np.ndarray | None, prev: dict | None) -> tuple[list[dict], dict]:
    """Write (or link) the shards of one level for the top clusters `tops`.

    read(name, start, stop) -> np.ndarray rows of array `name` (see ROW_ARRAYS) in *global* row ids.
    dirty: bool [n_rows] rows changed since the checkpoint `prev` (None: write everything).
    prev: {"dir": str, "files": {file: (start, stop)}} of the previous checkpoint's level, or None.
    Returns (shard entries, counts {"written", "linked", "skipped"}).
    """
    entries, counts = [], {"written": 0, "linked": 0, "skipped": 0}
    for c, j, a, b in plan_shards(k, level, row_dim, shard_bytes, tops):
        name = shard_name(level, c, j)
        dst = os.path.join(bank_dir, name)
        if (prev is not None and dirty is not None and prev["files"].get(name) == (a, b)
                and not dirty[a:b].any()):
            link_or_copy(os.path.join(prev["dir"], name), dst)
            counts["linked"] += 1
        else:
            keep = (read("init", a, b) != 0) | (read("step", a, b) != 0) | (read("tokens", a, b) != 0)
            if not keep.any():
                counts["skipped"] += 1  # pristine rows: lazily initialised on load, nothing to store
                continue
            idx = np.flatnonzero(keep)  # `read` returns views of the store: only these rows are copied
            arrays = {"rows": (a + idx).astype(np.int64)}
            arrays.update({name_: np.ascontiguousarray(read(name_, a, b)[idx]) for name_ in ROW_ARRAYS})
            write_safetensors(dst, arrays, {"level": level, "start": a, "stop": b, "top": c})
            counts["written"] += 1
        entries.append({"file": name, "start": a, "stop": b, "top": c})
    return entries, counts


def prev_level_files(prev_dir: str | None, level: int) -> dict | None:
    """The previous checkpoint's shards of a level as {"dir", "files": {file: (start, stop)}}, or None."""
    if prev_dir is None or not os.path.exists(os.path.join(prev_dir, "index.json")):
        return None
    idx = read_index(prev_dir)
    for lv in idx["levels"]:
        if lv["level"] == level:
            return {"dir": prev_dir, "files": {s["file"]: (s["start"], s["stop"]) for s in lv["shards"]}}
    return None


def load_level_shards(bank_dir: str, level_entry: dict, tops: set | None):
    """Yield (entry, {"rows": global ids, name: memmap}) for the shards of a level whose top cluster is in `tops` (None: all)."""
    for s in level_entry["shards"]:
        if tops is not None and s["top"] not in tops:
            continue
        path = os.path.join(bank_dir, s["file"])
        if not os.path.exists(path):
            raise CheckpointError(f"{bank_dir}/index.json lists {s['file']} but the file is missing")
        arrays, _ = open_safetensors(path, "r")
        rows = arrays.get("rows")
        if (rows is None or rows.dtype != np.int64 or rows.ndim != 1
                or (len(rows) and (rows.min() < s["start"] or rows.max() >= s["stop"]))):
            raise damaged(path, f"'rows' missing or outside the shard's range [{s['start']}, {s['stop']})")
        for name, (dtype, per_row) in ROW_ARRAYS.items():
            shape = (len(rows), level_entry["row_dim"]) if per_row else (len(rows),)
            if name not in arrays or arrays[name].dtype != dtype or arrays[name].shape != shape:
                raise damaged(path, f"array {name!r} missing or not {np.dtype(dtype).name} {list(shape)}")
        yield s, arrays


def disk_bytes(paths) -> tuple[int, int]:
    """(apparent bytes, allocated bytes of unique inodes) for files; hard links count once."""
    seen, apparent, allocated = set(), 0, 0
    for p in paths:
        st = os.stat(p)
        apparent += st.st_size
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        allocated += st.st_blocks * 512
    return apparent, allocated

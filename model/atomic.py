"""Crash-safe file output: the one place memlm writes files and directories from.

A killed process (SIGKILL, OOM, a pre-empted node) must never leave a half-written file where a
complete one was expected, and no command may delete what it did not create. So:

- Files: `atomic_write`, `atomic_write_json`, `atomic_file` (a file object) and `atomic_path` (a path
  for writers that take a file name, e.g. safetensors' `save_file`) write a temporary sibling and
  `os.replace` it over the target: readers see the old file or the new one, never a part.
- Directories: `atomic_dir(path, kind)` builds a directory under a hidden temporary sibling, writes
  memlm's marker `.memlm.json` (its kind and the size of every file) **last**, then renames it into
  place. A directory memlm wrote is complete iff its marker exists and every file has the size the
  marker recorded (`verify_dir`); a truncated or half-deleted directory never counts as complete.
- Replacing: an existing target is replaced only when the caller passes `replace=True` (the user gave
  an explicit flag) *and* the target carries memlm's marker of the same kind, or is empty. The working
  directory, its parents, the home directory and `/` are never a target. `remove_dir` likewise deletes
  only a marked directory of the given kind: it renames it away first, so a kill halfway through leaves
  no directory under the old name.
- Work directories that a multi-stage job (the demo, a reproduction) fills in place: `claim_work_dir` marks
  a new or empty directory as the job's, with the entries the job created in it and every path under them
  (`add_entries`, `tree`); `clear_work_dir` (the job's --fresh) deletes exactly those, keeps and names what
  a user added (also inside the job's folders), refuses while a user's file lies inside a marked output it
  would delete, and touches nothing of a directory without that marker.
- Single files a command writes by a flag (a benchmark's CSV): `check_output_file` refuses, before any work,
  an existing file that is not an earlier output of the same kind.
- Append-only logs (metrics.jsonl): `read_jsonl` drops a torn last line (a kill mid-write);
  `JsonlAppender` repairs such a tail before it appends, so new rows never glue onto a torn one.

Temporary and trash siblings are named `.<name>.<tmp|old|del>-<pid>-<hex>`; `remove_leftovers` deletes
exactly those, nothing else. Durability against power loss (fsync) is not attempted.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Any, Iterable, Iterator

from model.errors import CheckpointError, DataError, OutputExistsError

MARKER = ".memlm.json"
_LEFTOVER = re.compile(r"^\..+\.(tmp|old|del)-\d+-[0-9a-f]{8}$")


def _sibling(path: str, tag: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


# ---------------------------------------------------------------------------------------------
# files

@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`, when it raises
    the temporary file is removed and `path` is untouched. The temporary name keeps `path`'s suffix, so
    writers that add an extension (np.save adds `.npy`) write exactly there."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    root, ext = os.path.splitext(name)
    tmp = os.path.join(parent, f".{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """`with atomic_file(p) as f: ...` writes `p` atomically (text mode by default, "wb" for bytes)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def atomic_write(path: str, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically."""
    with atomic_file(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_json(path: str, obj: Any, indent: int | None = 1, **kw) -> None:
    """`json.dump` to `path` atomically (non-JSON values such as numpy scalars go through `str`)."""
    atomic_write(path, json.dumps(obj, indent=indent, default=str, **kw) + "\n")


def check_output_file(path: str, option: str, columns: Iterable[str], what: str) -> bool:
    """Whether writing the CSV file `path` (chosen by flag `option`) replaces one; raises OutputExistsError,
    before any work, when memlm may not: a directory, or an existing file that is not an earlier `what`
    (its header line must name every one of `columns`). Nothing else is ever overwritten, whatever the flags:
    choose another name."""
    if os.path.isdir(path):
        raise OutputExistsError(f"{option} {path}: is a directory; give the CSV file to write")
    if not os.path.lexists(path):
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = set(f.readline().strip().split(","))
    except OSError:
        header = set()
    if os.path.islink(path) or not set(columns) <= header:
        raise OutputExistsError(f"{option} {path}: exists and is not a CSV that {what} wrote; memlm does not "
                                f"overwrite it: give a new file name (or delete it yourself)")
    return True


# ---------------------------------------------------------------------------------------------
# directories

def read_marker(path: str) -> dict | None:
    """The marker of a directory memlm wrote (kind, files, created), or None (absent or unreadable)."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes (about 0.6 GB/s on this project's 2-core CPU, from the page cache)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_marker(path: str, kind: str, meta: dict | None = None, checksums: bool = False) -> dict:
    """Write the marker of directory `path` (call it last: it records every file's size, and its presence
    means "complete"). `checksums`: also every file's sha256, so that `verify_dir(..., deep=True)` finds
    bytes damaged at the same size (checkpoints: a flipped byte in the weights loads without an error)."""
    files, sha = {}, {}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel != MARKER:
                files[rel] = os.path.getsize(full)
                if checksums:
                    sha[rel] = sha256_file(full)
    marker = {"kind": kind, "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "files": files, **({"sha256": sha} if checksums else {}), **(meta or {})}
    atomic_write_json(os.path.join(path, MARKER), marker)
    return marker


_VERIFIED: set = set()  # (dir, marker mtime) checked deep in this process: a command loads a run twice


def verify_dir(path: str, kind: str | None = None, deep: bool = False) -> dict:
    """Check that `path` is a complete directory memlm wrote (of `kind`, when given): marker present, every
    recorded file present with its recorded size, and with `deep` (markers written with `checksums`) its
    recorded sha256. Returns the marker; raises CheckpointError naming the first missing, truncated or
    damaged file otherwise."""
    marker = read_marker(path)
    if marker is None and os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"{os.path.join(path, MARKER)}: unreadable (damaged); use another one")
    if marker is None:
        raise CheckpointError(f"{path}: incomplete (no {MARKER} marker: it was not finished, or was being "
                              "deleted); use another one")
    if kind is not None and marker.get("kind") != kind:
        raise CheckpointError(f"{path}: is a memlm {marker.get('kind')!r} directory, expected {kind!r}")
    for rel, size in (marker.get("files") or {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: missing (the directory is damaged); use another one")
        have = os.path.getsize(full)
        if have != size:
            raise CheckpointError(f"{full}: {have} bytes, {size} expected (truncated or damaged); "
                                  "use another one")
    if deep and marker.get("sha256"):
        key = (os.path.realpath(path), os.stat(os.path.join(path, MARKER)).st_mtime_ns)
        if key not in _VERIFIED:
            for rel, digest in marker["sha256"].items():
                if sha256_file(os.path.join(path, rel)) != digest:
                    raise CheckpointError(f"{os.path.join(path, rel)}: its bytes differ from the sha256 recorded "
                                          "when it was written (damaged at the same size); use another one")
            _VERIFIED.add(key)
    return marker


# Top-level entries that other memlm commands add later to a directory of a kind (after its marker was
# written): a data dir gets the router (`memlm cluster`), selection reports (`memlm select`) and wiki facts.
# Anything else at the top level that the marker does not record was put there by someone else.
ADDED_LATER = {"data": ("router.json", "router.safetensors", "selection", "wiki_facts")}


def foreign_entries(path: str, marker: dict | None = None) -> list[str]:
    """Top-level entries of marked directory `path` that memlm did not write there: not recorded in its
    marker (files, or a directory holding recorded files), not one of ADDED_LATER for its kind, not the
    marker, not a leftover of a killed write. A replace or remove keeps its hands off them."""
    marker = read_marker(path) if marker is None else marker
    if marker is None:
        return []
    ours = {rel.split("/")[0] for rel in (marker.get("files") or {})}
    ours |= set(marker.get("entries") or []) | set(ADDED_LATER.get(marker.get("kind"), ()))
    return sorted(n for n in os.listdir(path) if n != MARKER and n not in ours and not _LEFTOVER.match(n))


def _refuse_foreign(path: str, marker: dict, what: str) -> None:
    foreign = foreign_entries(path, marker)
    if foreign:
        names = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"{path}: holds {names}, which memlm did not write there; {what} would delete "
                                "it: move it out, or choose a new output directory")


def protected_reason(path: str) -> str | None:
    """Why `path` may never be replaced or removed, or None."""
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    if real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep):
        return "it is the working directory or one of its parents"
    if real in (os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.sep)):
        return "it is the home or root directory"
    return None


def is_inside(path: str, parent: str) -> bool:
    """Whether `path` is `parent` or lies under it (symbolic links resolved)."""
    real, top = os.path.realpath(path), os.path.realpath(parent)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def inside_checkpoints(path: str) -> str | None:
    """The run's `checkpoints/` directory that `path` lies under (at any depth: a step dir's subfolder too),
    or None. A `checkpoints` folder counts when it holds a marked `step-*` checkpoint; symbolic links are
    resolved."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    while True:
        if os.path.basename(parent) == "checkpoints" and os.path.isdir(parent) and \
                any(read_marker(os.path.join(parent, n)) for n in os.listdir(parent) if n.startswith("step-")):
            return parent
        up = os.path.dirname(parent)
        if up == parent:
            return None
        parent = up


def nearest_existing(path: str) -> str:
    """`path` (absolute) if it exists, else its nearest existing ancestor."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    return p


def check_output_dir(path: str, kind: str, replace: bool = False, flag: str = "--force",
                     sources: Iterable[str] = ()) -> bool:
    """Whether writing directory `path` (of `kind`) replaces an existing one; raises OutputExistsError when
    memlm may not: a file is there, a protected directory, one of the job's `sources` (what it reads, e.g.
    the run being exported) or a parent of one, a directory memlm did not write as `kind`, or memlm's own
    output without `replace`. An empty directory may always be used."""
    if kind != "checkpoint" and inside_checkpoints(path):
        raise OutputExistsError(f"{path}: is inside a run's checkpoints directory ({inside_checkpoints(path)}), "
                                "where every entry is taken for a checkpoint or its content; choose an output "
                                "directory outside it")
    if not os.path.lexists(path):
        parent = nearest_existing(path)  # must be a directory
        if not os.path.isdir(parent):
            raise OutputExistsError(f"{path}: {parent} is a file, not a directory; choose another output path")
        return False
    if os.path.islink(path):
        raise OutputExistsError(f"{path}: is a symbolic link; give the directory itself ({os.path.realpath(path)}) "
                                "or a new output path")
    if not os.path.isdir(path):
        raise OutputExistsError(f"{path}: exists and is not a directory; choose another output path")
    why = protected_reason(path)
    if why:
        raise OutputExistsError(f"{path}: {why}; choose a new output directory")
    for source in sources:
        if is_inside(source, path):
            what = "is" if os.path.realpath(source) == os.path.realpath(path) else "holds"
            raise OutputExistsError(f"{path}: {what} {source}, which this command reads; choose a new output "
                                    "directory")
    if not os.listdir(path):
        return True
    marker = read_marker(path)
    if marker is None or marker.get("kind") != kind:
        what = f"a memlm {marker.get('kind')!r} directory" if marker else f"files memlm did not write as {kind} output"
        raise OutputExistsError(f"{path}: exists and holds {what}; memlm only replaces its own {kind} output: "
                                "choose a new output directory")
    if not replace:
        raise OutputExistsError(f"{path}: exists (an earlier {kind}); pass {flag} to replace it, or choose "
                                "a new output directory")
    _refuse_foreign(path, marker, flag)
    return True


def publish_dir(tmp: str, path: str) -> None:
    """Move the finished directory `tmp` to `path`, replacing an existing `path` (already checked by the
    caller): the old one is renamed away first and deleted after, so `path` is always whole."""
    if os.path.lexists(path):
        old = _sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str, kind: str, *, replace: bool = False, flag: str = "--force",
               meta: dict | None = None, sources: Iterable[str] = ()) -> Iterator[str]:
    """Yield a temporary directory to fill; on success write the marker (kind, file sizes, `meta`) and
    move it to `path`. On error the temporary directory is removed and `path` is untouched. See
    `check_output_dir` for when an existing `path` may be replaced (`replace` = the user's `flag`) and
    for `sources`."""
    check_output_dir(path, kind, replace, flag, sources)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_dead_siblings(path)
    tmp = _sibling(path, "tmp")
    os.makedirs(tmp)
    try:
        yield tmp
        write_marker(tmp, kind, meta)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dead_siblings(path: str) -> None:
    """Delete the temporary / trash siblings of `path` left by a writer that was killed (its process id
    is gone from this machine): a killed `--force`/`--rebuild` would otherwise leave a hidden copy forever."""
    parent, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(parent):
        m = _LEFTOVER.match(entry)
        pid = entry.rsplit("-", 2)[-2] if m else ""
        if m and entry.startswith(f".{name}.") and pid.isdigit() and not _alive(int(pid)):
            _delete(os.path.join(parent, entry))


def _delete(full: str) -> None:
    """Delete a leftover file or directory (already gone is fine)."""
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(full)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dir(path: str, kind: str) -> None:
    """Delete a directory memlm wrote as `kind` (refused otherwise, with OutputExistsError). It is renamed
    to a hidden sibling first: a kill halfway leaves only a leftover that `remove_leftovers` deletes."""
    why = protected_reason(path)
    marker = read_marker(path)
    if why or marker is None or marker.get("kind") != kind:
        raise OutputExistsError(f"{path}: memlm did not write it as {kind} output ({why or 'no matching marker'}); "
                                "not deleting it")
    _refuse_foreign(path, marker, "removing it")
    trash = _sibling(path, "del")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_work_dir(path: str, kind: str, option: str = "--out") -> None:
    """The checks of `claim_work_dir`, creating nothing (a job's --dry-run): OutputExistsError naming `path`
    and `option` when a job of `kind` may not use it."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise OutputExistsError(f"{path}: exists and is not a directory; choose another {option}")
    why = protected_reason(path)
    if why:
        raise OutputExistsError(f"{path}: {why}; choose a new {option} directory")
    marker = read_marker(path)
    if marker is not None and marker.get("kind") == kind:
        return
    if marker is not None or os.listdir(path):
        if marker:
            what = f"a memlm {marker.get('kind')!r} directory"
        elif os.path.isfile(os.path.join(path, "config.yaml")) and \
                (os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "metrics.jsonl"))):
            what = "a memlm training run (config.yaml, metrics.jsonl, checkpoints/)"
        else:
            what = "files memlm did not put there"
        raise OutputExistsError(f"{path}: exists and holds {what}; {kind} writes only into a new or empty "
                                f"directory or one it made: choose another {option}")


def claim_work_dir(path: str, kind: str, option: str = "--out") -> None:
    """Make `path` the work directory of a job of `kind` that fills it in place over many steps (the demo,
    a reproduction): a new or empty directory is created / adopted and marked, one this kind of job marked
    is reused. Anything else is refused with OutputExistsError naming `path` and `option` (the flag that
    chose it): a file, a protected directory, another kind's directory, or a directory holding files
    memlm did not put there (no flag allows those)."""
    check_work_dir(path, kind, option)
    if read_marker(path) is not None:
        return
    os.makedirs(path, exist_ok=True)
    atomic_write_json(os.path.join(path, MARKER), {
        "kind": kind, "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "work_dir": True, "entries": [], "files": {}})


def add_entries(path: str, names: Iterable[str], created: Iterable[str] | None = None) -> None:
    """Record top-level entries of work directory `path` that the job created (`clear_work_dir` deletes
    exactly the recorded ones). `created`: the relative paths ("runs/anchor/config.yaml") the job made under
    them, when the caller tracks them (`tree`): --fresh then deletes only those, and files a user put inside
    the entries stay. Entries recorded without `created` belong to the job whole."""
    marker = read_marker(path)
    if marker is None:
        raise OutputExistsError(f"{path}: not a memlm work directory (no {MARKER})")
    new = {n for n in names if n != MARKER and not _LEFTOVER.match(n)}
    paths = {p for p in (created or ()) if p.split("/")[0] in new and not _LEFTOVER.match(os.path.basename(p))}
    entries, tracked = set(marker.get("entries", [])), set(marker.get("tracked", []))
    have = set(marker.get("created", []))
    add_tracked = new - entries if created is not None else set()
    if new <= entries and paths <= have and add_tracked <= tracked:
        return
    marker["entries"] = sorted(entries | new)
    marker["tracked"] = sorted(tracked | add_tracked)
    marker["created"] = sorted(have | paths)
    atomic_write_json(os.path.join(path, MARKER), marker)


def tree(path: str) -> set[str]:
    """Relative paths ("/"-separated) of every file and directory under `path`, without its marker and the
    leftovers of killed writes: compare two to find what a job created in its work directory."""
    out: set[str] = set()
    if not os.path.isdir(path):
        return out
    for root, dirs, names in os.walk(path):
        rel = os.path.relpath(root, path)
        dirs[:] = [d for d in dirs if not _LEFTOVER.match(d)]
        for name in dirs + names:
            if not _LEFTOVER.match(name) and not (rel == "." and name == MARKER):
                out.add(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return out


def _trash(path: str) -> None:
    """Rename away, then delete: a kill halfway leaves a leftover, never a half-deleted `path`."""
    trash = _sibling(path, "del")
    os.rename(path, trash)
    if os.path.isdir(trash) and not os.path.islink(trash):
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.remove(trash)


def _users_files(root: str, marker: dict, rel: str) -> list[str]:
    """What lies under entry path `rel` of work directory `root` that nobody but a user can have put there, as
    paths relative to `root`: in a tracked entry a path the job did not record, unless it is a memlm output
    (a directory with memlm's marker: a checkpoint or data dir written by a stage killed before it recorded
    it); inside a marked output, its foreign entries (`foreign_entries`) the job did not record. A
    directory that is the user's is named once, not its contents."""
    top = rel.split("/")[0]
    full = os.path.join(root, rel)
    if not os.path.isdir(full) or os.path.islink(full):
        return []
    created = set(marker.get("created", []))
    tracked = top in set(marker.get("tracked", []))
    found: list[str] = []
    for base, dirs, names in os.walk(full):
        relbase = os.path.relpath(base, root).replace(os.sep, "/")
        inner = read_marker(base)
        marked = inner is not None and not inner.get("work_dir")
        foreign = set(foreign_entries(base, inner)) if marked else set()
        for name in sorted(dirs + names):
            p = f"{relbase}/{name}"
            if _LEFTOVER.match(name) or (tracked and p in created):
                continue
            if marked:
                users = name in foreign
            else:
                users = tracked and read_marker(os.path.join(base, name)) is None
            if users:
                found.append(p)
                if name in dirs:
                    dirs.remove(name)
    return found


def _in_marked_output(root: str, rel: str) -> bool:
    """Whether relative path `rel` of work directory `root` lies inside a directory carrying memlm's marker."""
    parts = rel.split("/")[:-1]
    return any(read_marker(os.path.join(root, *parts[:i])) for i in range(1, len(parts) + 1))


def _delete_except(root: str, rel: str, keep: set[str]) -> None:
    """Delete path `rel` of `root` but the paths in `keep` (relative to `root`) and the folders that lead to them."""
    if rel in keep:
        return
    full = os.path.join(root, rel)
    if not any(k.startswith(rel + "/") for k in keep):
        _trash(full)
        return
    for name in os.listdir(full):
        _delete_except(root, f"{rel}/{name}", keep)


def clear_work_dir(path: str, kind: str, flag: str = "--fresh") -> list[str]:
    """Delete what a job of `kind` created in its work directory `path` (the entries its marker records, and
    under a tracked entry only the paths it recorded); everything else stays: the names at the top that the
    job did not create, and files a user put inside the job's folders ("mech/notes.txt"). Returns what was
    kept (relative paths). OutputExistsError, nothing deleted, when `path` does not carry that job's marker,
    or when a user's file lies inside a marked memlm output (a data dir, a checkpoint) that would be
    deleted around it: that is named, to be moved out first."""
    why = protected_reason(path)
    marker = read_marker(path)
    if why or marker is None or marker.get("kind") != kind or not marker.get("work_dir"):
        what = why or (f"it is a memlm {marker.get('kind')!r} directory" if marker else "memlm did not create it")
        raise OutputExistsError(f"{path}: {flag} deletes only a directory {kind} created, and {what}; "
                                "nothing deleted: choose another --out")
    entries = [n for n in marker.get("entries", []) if os.path.lexists(os.path.join(path, n))]
    kept = {n: _users_files(path, marker, n) for n in entries}
    inside_outputs = [p for ps in kept.values() for p in ps if _in_marked_output(path, p)]
    if inside_outputs:
        names = ", ".join(inside_outputs[:5]) + (f" and {len(inside_outputs) - 5} more" if len(inside_outputs) > 5 else "")
        raise OutputExistsError(f"{path}: holds {names}, which memlm did not write, inside memlm outputs that "
                                f"{flag} deletes; move it out, then run again (nothing deleted)")
    created = set(marker.get("created", []))
    for name in entries:
        _delete_except(path, name, set(kept[name]))
    marker["entries"] = sorted(n for n in kept if kept[n])
    marker["created"] = sorted(p for p in created if os.path.lexists(os.path.join(path, p)))
    atomic_write_json(os.path.join(path, MARKER), marker)
    remove_leftovers(path)
    top = [n for n in os.listdir(path) if n != MARKER and n not in kept and not _LEFTOVER.match(n)]
    return sorted(top + [p for ps in kept.values() for p in ps])


def remove_work_entry(root: str, kind: str, path: str) -> None:
    """Delete `path` inside work directory `root` of a job of `kind` (e.g. the demo redoing a stage), only
    if it lies under an entry the job created; OutputExistsError otherwise."""
    marker = read_marker(root)
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    top = rel.split(os.sep)[0]
    if marker is None or marker.get("kind") != kind or rel in (".", os.curdir) or top == os.pardir \
            or top not in marker.get("entries", []):
        raise OutputExistsError(f"{path}: not created by {kind} in {root}; not deleting it")
    inner = read_marker(path) if os.path.isdir(path) else None
    if inner is not None:  # a marked output of the job (a data dir, a run's export): keep what users added
        _refuse_foreign(path, inner, "redoing it")
    relpath = rel.replace(os.sep, "/")
    users = [p for p in _users_files(root, marker, top) if p == relpath or p.startswith(relpath + "/")]
    if users:
        names = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise OutputExistsError(f"{path}: holds {names}, which memlm did not write there; redoing it would "
                                "delete it: move it out, then run again")
    if os.path.lexists(path):
        _trash(path)


def is_leftover(name: str) -> bool:
    """Whether `name` is a temporary / trash sibling this module leaves when a process is killed mid-write."""
    return bool(_LEFTOVER.match(name))


def remove_leftovers(parent: str) -> list[str]:
    """Delete the temporary / trash siblings this module leaves when a process is killed mid-write
    (`.<name>.tmp-…`, `.old-…`, `.del-…` in `parent`); nothing else. Returns what was removed. Call it only
    where no other live process of the same job can be writing."""
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        if _LEFTOVER.match(name):
            _delete(os.path.join(parent, name))
            removed.append(os.path.join(parent, name))
    return removed


# ---------------------------------------------------------------------------------------------
# append-only JSON lines

def _parse_jsonl(data: bytes, path: str) -> tuple[list[dict], int]:
    """(rows, bytes of the valid prefix). A last line without its newline that does not parse is torn."""
    rows, good = [], 0
    lines = data.split(b"\n")
    offset = 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1  # no newline after it (b"" when the file ends with one)
        end = offset + len(line) + (0 if last else 1)
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if last:
                    return rows, good  # torn by a kill mid-write: drop it
                raise DataError(f"{path}:{i + 1}: not a JSON object line ({e}); fix or delete that line") from None
            rows.append(row)
        good = end
        offset = end
    return rows, good


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines log; a torn last line is dropped, a bad line elsewhere raises DataError
    naming file and line. A missing file has no rows."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return _parse_jsonl(data, path)[0]


def rewrite_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Replace a JSON-lines file atomically (e.g. drop rows logged after the checkpoint a run resumes from)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


class JsonlAppender:
    """Append rows to a JSON-lines log, one `write` per row. On open, a torn tail left by a killed writer is
    cut off (and a complete last row missing its newline gets one), so rows never glue together."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            _, good = _parse_jsonl(data, path)
            if good != len(data) or (data and not data.endswith(b"\n")):
                fixed = data[:good]
                if fixed and not fixed.endswith(b"\n"):
                    fixed += b"\n"
                atomic_write(path, fixed)

    def append(self, row: dict) -> None:
        line = (json.dumps(row) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

"""memlm's error types. Every mistake a user can make ends in one of these, with a message that names
the file, key, line or flag and says what to do.

Library code (model/, memory/, data/, train/ below the commands) raises them and never exits or
prints; the command-line entry points (train/cli.py) print `memlm <command>: <message>` as one line on
stderr and exit with code 2 (`MEMLM_DEBUG=1` or `--debug` shows the traceback instead).

Each subclass also derives from the builtin exception a caller would expect (ValueError for bad
values, FileNotFoundError where a path is missing), so `except ValueError` keeps working.
"""
from __future__ import annotations

import errno
import os
import re


class MemlmError(Exception):
    """Base of every user-facing memlm error."""


class ConfigError(MemlmError, ValueError):
    """A bad config key or value, or a bad command-line flag; the message names the dotted key or flag."""


class DataError(MemlmError, ValueError):
    """A bad corpus, tokenizer, data directory or shard; the message names the file (and line)."""


class CheckpointError(MemlmError, ValueError):
    """A missing, incomplete or damaged run / checkpoint / export; the message names the directory or file."""


class TrainingError(MemlmError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the last good checkpoint."""


class OutputExistsError(MemlmError, FileExistsError):
    """An output path exists and memlm may not replace it (it did not create it, or it is a run or the
    working directory); the message names the path and the flag that allows replacing memlm's own output."""


class StorageError(MemlmError, OSError):
    """A write failed for a reason outside memlm (disk full, file-size limit, read-only or unwritable path, a
    file where a directory should be, a name too long); the message names the path, the OS reason and the fix."""


# The OS errors of a write that are the machine's or the user's to fix, never memlm's bug, and the fix.
WRITE_ERRNOS = {
    errno.ENOSPC: "free space and re-run",
    errno.EDQUOT: "free space (or raise the disk quota) and re-run",
    errno.EFBIG: "raise the file-size limit (ulimit -f) and re-run",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.EACCES: "no permission: make it writable or choose another path",
    errno.EPERM: "no permission: make it writable or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system: choose a shorter one",
}
_OS_ERROR_RE = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) report an OSError


def os_error_of(e: BaseException) -> OSError | None:
    """`e` as an OSError with one of WRITE_ERRNOS (also a safetensors error reporting "os error 28"), or None."""
    if isinstance(e, OSError):
        return e if e.errno in WRITE_ERRNOS else None
    m = _OS_ERROR_RE.search(str(e))
    if m and int(m.group(1)) in WRITE_ERRNOS:
        n = int(m.group(1))
        return OSError(n, os.strerror(n))
    return None


def describe_os_error(e: OSError, path: str | None = None, then: str = "") -> str:
    """One line: `cannot write PATH: the OS reason [ERRNO]; the fix` (+ `then`, e.g. how the job resumes)."""
    where = path or e.filename or "a file"
    name = errno.errorcode.get(e.errno, str(e.errno))
    return f"cannot write {where}: {e.strerror or e} [{name}]; {WRITE_ERRNOS.get(e.errno, 'fix it and re-run')}" \
           + (f" ({then})" if then else "")


def check_range(key: str, value, *, min=None, max=None, min_open: bool = False, max_open: bool = False,
                error: type[MemlmError] = ConfigError):
    """Return `value` if it lies in the interval, else raise `error` naming `key` (a dotted config key or a
    `--flag`). `min_open`/`max_open` exclude the bound. NaN is always out of range. Example:
    `check_range("data.batch_size", 0, min=1)` -> ConfigError("data.batch_size=0: must be >= 1")."""
    bad = value != value  # NaN
    if min is not None and (value <= min if min_open else value < min):
        bad = True
    if max is not None and (value >= max if max_open else value > max):
        bad = True
    if bad:
        lo = "" if min is None else (f"> {min}" if min_open else f">= {min}")
        hi = "" if max is None else (f"< {max}" if max_open else f"<= {max}")
        sep = "=" if not key.startswith("-") else " "
        raise error(f"{key}{sep}{value}: must be {' and '.join(s for s in (lo, hi) if s)}")
    return value

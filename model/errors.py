"""memlm's error types. Every mistake a user can make ends in one of these, with a message that names
the file, key, line or flag and says what to do.

Library code (model/, memory/, data/, train/ below the commands) raises them and never exits or
prints; the command-line entry points (train/cli.py) print `memlm <command>: <message>` as one line on
stderr and exit with code 2 (`MEMLM_DEBUG=1` or `--debug` shows the traceback instead).

Each subclass also derives from the builtin exception a caller would expect (ValueError for bad
values, FileNotFoundError where a path is missing), so `except ValueError` keeps working.
"""
from __future__ import annotations


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

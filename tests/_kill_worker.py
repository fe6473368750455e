"""`python tests/_kill_worker.py POINT N <memlm pretrain args>`: train.pretrain, SIGKILLed at the N-th time the
checkpointer reaches POINT (the kill-point tests in test_checkpoint.py):

    marker   a checkpoint's files are all written, its marker is not
    publish  an existing newer step-N was renamed away, the new one not yet renamed into its place
    swapped  the new step-N is in place, the renamed-away old one not yet deleted
    prune    an old checkpoint was renamed away for deletion and is half deleted
"""
import os
import re
import shutil
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

POINT, N = sys.argv[1], int(sys.argv[2])
hits = [0]


def _hit(point: str) -> None:
    if point == POINT:
        hits[0] += 1
        if hits[0] == N:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


real_rename, real_rmtree = os.rename, shutil.rmtree


def rename(src, dst):
    real_rename(src, dst)
    s, d = os.path.basename(str(src)), os.path.basename(str(dst))
    if re.match(r"^step-\d+$", s) and ".old-" in d:
        _hit("publish")
    elif s.endswith(".tmp") and re.match(r"^step-\d+$", d) and any(".old-" in n for n in os.listdir(os.path.dirname(dst))):
        _hit("swapped")


def rmtree(path, *a, **k):
    if ".del-" in os.path.basename(str(path)) and POINT == "prune":
        files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
        for f in files[: len(files) // 2]:
            os.remove(f)
        _hit("prune")
    return real_rmtree(path, *a, **k)


os.rename, shutil.rmtree = rename, rmtree

import train.checkpoint as ck  # noqa: E402

real_marker = ck.write_marker


def write_marker(*a, **k):
    _hit("marker")
    return real_marker(*a, **k)


ck.write_marker = write_marker

from train.cli import run_command  # noqa: E402
from train.pretrain import main  # noqa: E402

sys.exit(run_command("memlm pretrain", main, sys.argv[3:]))

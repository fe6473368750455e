"""Shared test data: a small prepared `bios` data dir, built once per pytest session.

Use it from a test module with:

    from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

The dir lives under pytest's session base temp and `prepare` is idempotent, so modules that import
the fixture share one copy (the second call only checks the manifest).
"""
from __future__ import annotations

import os

import pytest

BIOS_ARGS = dict(corpus="bios", vocab_size=512, val_fraction=0.1, window_tokens=256, n_people=150, top_docs=60)


def prepare_bios(out: str) -> str:
    from data.shards import prepare

    a = dict(BIOS_ARGS)
    prepare(a.pop("corpus"), out, progress=False, log=lambda *x, **k: None, **a)
    return out


@pytest.fixture(scope="session")
def bios_data(tmp_path_factory) -> str:
    """Path of a prepared bios data dir: 150 people, BPE vocab 512, ~43k train / ~4.6k val tokens."""
    out = os.path.join(str(tmp_path_factory.getbasetemp()), "shared-bios-data")
    return prepare_bios(out)

"""train/config.py: every numeric key is range-checked when the config loads (case V1), and init_from must
match the model section and the data's tokenizer (case V2)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing

import pytest

from fixtures_data import bios_data, prepare_bios  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")


def _numeric_keys(cls, prefix: str = "") -> list[str]:
    """Dotted keys of every int / float (or tuple of numbers) field of a config dataclass, recursively."""
    from memory.config import MemoryConfig
    from model.config import ModelConfig

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if f.name == "model":
            keys += _numeric_keys(ModelConfig, "model.")
        elif f.name == "memory":
            keys += _numeric_keys(MemoryConfig, "memory.")
        elif dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, key + ".")
        elif any(a in (int, float) for a in inner) or typing.get_origin(tp) is tuple:
            keys.append(key)
    return keys


def test_every_numeric_key_has_a_range():
    from train.config import RANGES, RunConfig

    keys = _numeric_keys(RunConfig)
    assert len(keys) > 35
    assert sorted(k for k in keys if k not in RANGES) == []


def _below(bounds: dict):
    """A value just outside the lower bound."""
    lo = bounds["min"]
    return lo if bounds.get("min_open") else (lo - 1 if isinstance(lo, int) else lo - 0.5)


@pytest.mark.parametrize("key", sorted(__import__("train.config", fromlist=["RANGES"]).RANGES))
def test_out_of_range_value_names_the_key(key):
    from model.errors import ConfigError
    from train.config import RANGES, load_config

    bounds = RANGES[key]
    value = _below(bounds)
    if key == "optim.betas":
        text = "[0.9,1.0]"
    elif key == "memory.widths":
        text = "[4,-1]"
    else:
        text = str(value)
    over = [f"{key}={text}"] + (["memory.preset=tiny"] if key.startswith("memory.") else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RECIPE, over)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # NaN is never in range
        load_config(RECIPE, [f"{key}=nan"] + over[1:]) if key not in ("optim.betas", "memory.widths") else \
            load_config(RECIPE, over)


def test_choices_and_cross_checks():
    from model.errors import ConfigError
    from train.config import load_config

    for over, key in [(["trainer.precision=fp8"], "trainer.precision"), (["logging.logger=tensorboard"], "logging.logger"),
                      (["optim.min_lr=0.1", "optim.lr=0.01"], "optim.min_lr"),
                      (["model.n_kv_head=3"], "model.n_kv_head"),
                      (["data.batch_size=2.5"], "data.batch_size"), (["optim.betas=[0.9]"], "optim.betas")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(RECIPE, over)


@pytest.mark.parametrize("value", ["-2", "0"])
def test_case_v1_batch_size_is_one_line_error_not_a_hang(bios_data, tmp_path, value):  # noqa: F811
    """`memlm pretrain ... data.batch_size=-2` spun forever; 0 divided by zero: now exit 2 at once."""
    p = subprocess.run([sys.executable, "-m", "train.cli", "pretrain", "--config", RECIPE, f"data.path={bios_data}",
                        f"runs_dir={tmp_path}", f"data.batch_size={value}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    # the value came from the command line, not the recipe: the line names the key, not the file
    assert p.stderr.strip().splitlines() == [f"memlm pretrain: data.batch_size={value}: must be >= 1"]
    assert not os.path.exists(tmp_path / "run")


# ---- V2: init_from must describe the same model and tokenizer ------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(bios_data, tmp_path_factory):  # noqa: F811
    from train.pretrain import main

    runs = str(tmp_path_factory.mktemp("v2"))
    assert main(["--config", RECIPE, f"data.path={bios_data}", f"runs_dir={runs}", "name=tiny", "trainer.max_steps=1",
                 "data.seq_len=32", "data.batch_size=2", "logging.logger=none", "trainer.val_every=0"]) == 0
    return os.path.join(runs, "tiny")


def test_init_from_with_another_model_preset_names_both_sides(tiny_run, bios_data, tmp_path):  # noqa: F811
    from model.errors import ConfigError
    from train.pretrain import main

    base = ["--config", RECIPE, f"data.path={bios_data}", f"runs_dir={tmp_path}", f"init_from={tiny_run}",
            "trainer.max_steps=1", "logging.logger=none"]
    with pytest.raises(ConfigError, match=r"init_from=.*tiny.*model\.n_layer=8 here, 4 in the source.*tiny"):
        main(base + ["model.preset=small"])
    with pytest.raises(ConfigError, match=r"model\.ffn_hidden=512 here, 384 in the source"):
        main(base + ["model.ffn_hidden=512"])
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_init_from_with_another_tokenizer_names_both_sides(tiny_run, tmp_path):
    """Data prepared with another BPE of the same vocab size: the ids would mean other tokens."""
    from model.errors import ConfigError
    from train.pretrain import main

    other = str(tmp_path / "other")
    from data.shards import prepare

    prepare("bios", other, progress=False, log=lambda *a, **k: None, vocab_size=512, val_fraction=0.1,
            window_tokens=256, n_people=60, top_docs=20, seed=7)
    with pytest.raises(ConfigError, match=r"its tokenizer \(.*tiny.*tokenizer\) differs from the data's \(.*other"):
        main(["--config", RECIPE, f"data.path={other}", f"runs_dir={tmp_path}", f"init_from={tiny_run}",
              "trainer.max_steps=1", "logging.logger=none"])


def test_memory_k_range_matches_memlm_cluster():
    """memory.k=1 was accepted, and the k mismatch message then advised `memlm cluster --k 1`, which
    memlm cluster refuses: the config's range is the cluster command's (k >= 2)."""
    from model.errors import ConfigError
    from train.commands.cluster import build_parser
    from train.config import load_config

    with pytest.raises(ConfigError, match=r"memory\.k=1: must be >= 2"):
        load_config(RECIPE, ["memory.preset=tiny", "memory.k=1"])
    assert load_config(RECIPE, ["memory.preset=tiny", "memory.k=2"]).memory.k == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["DATA", "--k", "1"])
    assert build_parser().parse_args(["DATA", "--k", "2"]).k == 2

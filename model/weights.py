"""Model weights on disk: one safetensors file, tied tensors stored once.

safetensors refuses two names for one storage (a tied embedding and LM head), so `save_weights` stores
each storage once and records the aliases in the file's metadata ("tied": {alias: stored name});
`read_weights` restores them. Writes are atomic (model/atomic.py); a damaged file raises
CheckpointError naming it.
"""
from __future__ import annotations

import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.atomic import atomic_path
from model.errors import CheckpointError


def save_weights(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Write `state_dict` (any device, any dtype) to `path` as safetensors, atomically."""
    tensors, tied, seen = {}, {}, {}
    for k, v in state_dict.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.untyped_storage().nbytes()) if v.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().to("cpu").contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "tied": json.dumps(tied)})


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict stored by `save_weights` (CPU tensors, aliases restored). CheckpointError naming the
    file when it is missing, truncated or not safetensors, or when a tensor holds NaN/inf."""
    out = {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, use another one") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable weights ({e}); the file is truncated or damaged, "
                              "use another checkpoint") from None
    for k, v in out.items():  # a diverged run's weights: every later number would be NaN
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor {k!r} holds NaN/inf (the run diverged, or the file is damaged); "
                                  "use an earlier checkpoint")
    for alias, src in json.loads(meta.get("tied", "{}")).items():
        out[alias] = out[src]
    return out


def load_weights(module: torch.nn.Module, path: str) -> None:
    """Load `path` into `module`; CheckpointError naming the file and the first differing keys when the
    tensors do not match the module's."""
    sd = read_weights(path)
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape differs
        raise CheckpointError(f"{path}: weights do not match the model ({' '.join(str(e).split())[:300]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); the checkpoint belongs to another model config")

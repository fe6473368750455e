"""The anchor transformer: config + presets, the decoder, generation, HF Llama interop (model.hf).

Plain torch.nn: never imports lightning (tests/test_imports.py checks it). The names below are loaded
on first use, so the leaf modules `model.errors` and `model.atomic` (used by data/ and every command's
error path) do not import torch."""
import importlib

_LAZY = {"ModelConfig": ".config", "presets": ".config", "Anchor": ".model", "KVCache": ".model",
         "MemoryBlock": ".model"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")

"""The anchor transformer: config + presets, the decoder, generation, HF Llama interop (model.hf).

Plain torch.nn: never imports lightning (tests/test_imports.py checks it)."""
from .config import ModelConfig, presets
from .model import Anchor, KVCache, MemoryBlock

__all__ = ["ModelConfig", "presets", "Anchor", "KVCache", "MemoryBlock"]

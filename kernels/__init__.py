"""Kernels for memlm (torch + triton only). `memory_ffn` dispatches on MEMLM_KERNELS=auto|reference|triton."""
from .memory_ffn import BACKENDS, backend, memory_ffn, memory_ffn_reference

__all__ = ["BACKENDS", "backend", "memory_ffn", "memory_ffn_reference"]

"""The memory FFN op: anchor SwiGLU + a per-row fetched block of extra hidden units.

reference.py       the spec, pure PyTorch
triton_kernels.py  the Triton kernel bodies (jitted on first use)
triton_launch.py   tile sizes, checks, launches: Triton forward/backward (imported only on the Triton path)
op.py              torch.library op `memlm::memory_ffn` + the MEMLM_KERNELS dispatch
"""
from .op import BACKENDS, backend, memory_ffn, memory_ffn_op
from .reference import memory_ffn_reference

__all__ = ["BACKENDS", "backend", "memory_ffn", "memory_ffn_op", "memory_ffn_reference"]

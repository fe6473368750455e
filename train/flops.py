"""Peak FLOP/s per device, for MFU. GPUs: dense tensor-core figures from the vendors' data sheets;
CPU: an fp32 (or bf16) 2048^3 matmul measured once, the machine's practical peak."""
from __future__ import annotations

import time

import torch

# name fragment (lower case, most specific first) -> (bf16/fp16 dense, tf32/fp32 dense) FLOP/s
GPU_PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("gh200", 989e12, 494e12),
    ("h200", 989e12, 494e12),
    ("h100 nvl", 835e12, 418e12),
    ("h100 pcie", 756e12, 378e12),
    ("h100", 989e12, 494e12),  # SXM (HBM3)
    ("h800", 989e12, 494e12),
    ("b200", 2250e12, 1100e12),
    ("a100", 312e12, 156e12),
    ("a800", 312e12, 156e12),
    ("l40s", 362e12, 183e12),
    ("l40", 181e12, 90.5e12),
    ("l4", 121e12, 60e12),
    ("a6000", 155e12, 77.4e12),
    ("a10g", 70e12, 35e12),
    ("a10", 125e12, 62.5e12),
    ("4090", 165e12, 82.6e12),
    ("3090", 71e12, 35.6e12),
    ("v100", 125e12, 15.7e12),
    ("t4", 65e12, 8.1e12),
]

_cpu_peak_cache: dict[str, float] = {}


def gpu_peak_flops(name: str, precision: str) -> float | None:
    low = name.lower()
    half = "16" in precision  # bf16-mixed, 16-mixed, bf16-true
    for frag, p16, p32 in GPU_PEAK_FLOPS:
        if frag in low:
            return p16 if half else p32
    return None


def measure_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 3,
                     refresh: bool = False) -> float:
    """Best-of-`reps` FLOP/s of an n^3 matmul on this CPU with the current thread count (cached; with
    `refresh`, measured again and the best of all measurements kept: a measurement taken while other jobs
    loaded the cores is too low)."""
    key = f"{dtype}-{n}-{torch.get_num_threads()}"
    if key not in _cpu_peak_cache or refresh:
        g = torch.Generator().manual_seed(0)  # never the global RNG: training draws from it
        a = torch.randn(n, n, dtype=dtype, generator=g)
        b = torch.randn(n, n, dtype=dtype, generator=g)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _cpu_peak_cache[key] = max(2 * n**3 / best, _cpu_peak_cache.get(key, 0.0))
    return _cpu_peak_cache[key]


def device_peak_flops(device: torch.device | str, precision: str = "32-true") -> float | None:
    """Peak FLOP/s of one device for `precision`; None when unknown (MFU shows "n/a")."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        dtype = torch.bfloat16 if "bf16" in precision else torch.float32
        return measure_cpu_peak(dtype)
    return None

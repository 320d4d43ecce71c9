"""Tokens/s, peak memory and MFU, with the peak FLOP/s taken from the device itself.

nanoGPT hard-codes an A100's 312 TFLOP/s (users on H100s saw "104% MFU"). Here the peak comes from
the device's name in Lightning's spec table, or, for a device that table does not know (CPUs, new
GPUs under an unexpected name), from a measured large matmul on that device, cached per process.
"""
from __future__ import annotations

import functools
import time
import warnings

import torch

# dense (no 2:4 sparsity) bf16 tensor-core peaks for names Lightning's table misses
_EXTRA_PEAKS = {"h200": 989.4e12, "h100": 989.4e12, "gh200": 989.4e12, "b200": 2250e12}


@functools.lru_cache(maxsize=8)
def _measured_peak(device_type: str, index: int | None, dtype: torch.dtype) -> float:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    # large enough to reach the matmul plateau; the best of several timings (the peak, not the average)
    n = 4096 if device_type == "cuda" else 1536
    # constant operands: drawing random ones would advance the global RNG, and a run's dropout would then
    # depend on whether an earlier run in the same process had already measured (the result is cached)
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(10 if device_type == "cuda" else 4):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the figure came from)."""
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = get_available_flops(device, dtype)
        if spec:
            return float(spec), "spec"
        name = torch.cuda.get_device_name(device).lower()
        for key, value in _EXTRA_PEAKS.items():
            if key in name.split() and dtype in (torch.bfloat16, torch.float16):
                return value, "spec"
    return _measured_peak(device.type, device.index, dtype), "measured matmul"


class Throughput:
    """Wall-clock between consecutive training batches -> tokens/s and MFU."""

    def __init__(self):
        self.last = None

    def step(self, tokens: int, flops_per_token: float, peak: float, world: int = 1) -> dict[str, float]:
        now = time.perf_counter()
        out = {}
        if self.last is not None:
            dt = now - self.last
            tps = tokens * world / dt
            out = {"tokens_per_s": tps, "mfu": flops_per_token * tps / (peak * world)}
        self.last = now
        return out

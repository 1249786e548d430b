"""Helpers shared by the benchmarks: timing, the machine's float32 matmul peak, FLOP counts
(the library's own, in `bdjax.flops`, so that training logs and benchmarks count the same way)."""

from __future__ import annotations

from bdjax.flops import forward_flops, lora_step_flops, time_it
from bdjax.flops import measured_matmul_peak as _peak


def matmul_peak_gflops(sizes=(1024, 2048, 3072)) -> float:
    """The best float32 GFLOP/s XLA reaches on square matmuls here: the denominator of MFU."""
    return _peak(sizes) / 1e9


__all__ = ["forward_flops", "lora_step_flops", "matmul_peak_gflops", "time_it"]

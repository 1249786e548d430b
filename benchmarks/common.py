"""Helpers shared by the benchmarks: timing, the machine's float32 matmul peak, FLOP counts
(the library's own, in `bdjax.flops`, so that training logs and benchmarks count the same way)."""

from __future__ import annotations

import os
import platform

from bdjax.flops import forward_flops, lora_step_flops, time_it
from bdjax.flops import measured_matmul_peak as _peak


def matmul_peak_gflops(sizes=(1024, 2048, 3072)) -> float:
    """The best float32 GFLOP/s XLA reaches on square matmuls here: the denominator of MFU."""
    return _peak(sizes) / 1e9


def machine() -> dict:
    """What ran the benchmark, for its JSON line: core count, architecture and, on Linux, the CPU's
    model name and x86 family/model numbers (the build machine's CPU has changed between sittings,
    e.g. AMD family 25, Zen 4, then 26, Zen 5, whose float32 matmul peak is twice as high)."""
    out = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
    fields = {"model name": "cpu", "cpu family": "cpu_family", "model": "cpu_model"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                name = fields.get(key.strip())
                if name:
                    value = value.strip()
                    out[name] = int(value) if value.isdigit() else value
    except OSError:
        out["cpu"] = platform.processor()
    return out


__all__ = ["forward_flops", "lora_step_flops", "machine", "matmul_peak_gflops", "time_it"]

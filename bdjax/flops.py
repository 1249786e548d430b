"""Model FLOP counts and the peak the MFU figures are measured against."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from bdjax.models.config import ModelConfig

# Dense peak TFLOP/s per device for bfloat16 (the usual MFU denominator), by device_kind prefix.
_BF16_PEAK_TFLOPS = {
    "NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
}


def matmul_flops_per_token(config: ModelConfig) -> tuple[float, float]:
    """(multiply-adds per token in the layers' projections, in the output head)."""
    c = config
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # q, k, v
                 + c.num_heads * c.head_dim * c.hidden_size  # o
                 + 3 * c.hidden_size * c.intermediate_size)  # gate, up, down
    return float(c.num_layers * per_layer), float(c.hidden_size * c.vocab_size)


def forward_flops(config: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass: 2 per multiply-add over the projections, the head, and
    the attention scores and weighted sums (full square, as computed)."""
    layers, head = matmul_flops_per_token(config)
    attention = 2 * 2 * batch * seq * seq * config.num_heads * config.head_dim * config.num_layers
    return 2 * batch * seq * (layers + head) + float(attention)


def lora_step_flops(config: ModelConfig, batch: int, seq: int, logits_tokens: int | None = None,
                    attended: float | None = None) -> float:
    """Model FLOPs of a frozen-base LoRA step: 4·N_matmul per token (forward, plus the backward's
    input gradients; no weight gradients) and the attention products (forward + 2× backward).
    `logits_tokens` counts the positions the head runs at (default: all); `attended` the summed
    query·key pairs per layer and head (default: the full seq² square per row)."""
    layers, head = matmul_flops_per_token(config)
    tokens = batch * seq
    head_tokens = tokens if logits_tokens is None else logits_tokens
    pairs = batch * seq * seq if attended is None else attended
    attention = 3 * 2 * 2 * pairs * config.num_heads * config.head_dim * config.num_layers
    return 4 * (tokens * layers + head_tokens * head) + float(attention)


def time_it(fn, *, warmup: int = 1, reps: int = 5) -> float:
    """Median wall-clock seconds of fn() (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_matmul_peak(sizes=(1024, 2048, 3072), dtype=jnp.float32, device: jax.Device | None = None) -> float:
    """The best FLOP/s XLA reaches on square matmuls on one device: the MFU denominator where no
    datasheet figure applies (CPUs)."""
    device = device or jax.local_devices()[0]
    best = 0.0
    for n in sizes:
        a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
        b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), device)
        # summed in float32, as mixed-precision products are (a bfloat16 result takes a slower path on CPUs)
        f = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
        s = time_it(lambda: f(a, b).block_until_ready(), warmup=2, reps=5)
        best = max(best, 2 * n**3 / s)
    return best


@functools.cache
def peak_flops(dtype_name: str = "float32") -> float:
    """Per-device peak FLOP/s: the datasheet dense bf16 figure for known accelerators (bf16
    compute), otherwise a quick measurement of this device's matmul peak in `dtype_name`."""
    device = jax.local_devices()[0]
    if dtype_name == "bfloat16":
        for prefix, tflops in _BF16_PEAK_TFLOPS.items():
            if device.device_kind.startswith(prefix):
                return tflops * 1e12
    sizes = (1024, 2048) if device.platform == "cpu" else (4096, 8192)
    return measured_matmul_peak(sizes, jnp.dtype(dtype_name), device)

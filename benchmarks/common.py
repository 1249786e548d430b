"""Helpers shared by the benchmarks: timing, the machine's float32 matmul peak, FLOP counts."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from bdjax.models.config import ModelConfig


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


def matmul_peak_gflops(sizes=(1024, 2048, 3072)) -> float:
    """The best float32 GFLOP/s XLA reaches on square matmuls here: the denominator of MFU."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(jnp.dot)
        s = time_it(lambda: f(a, b).block_until_ready(), warmup=2, reps=5)
        best = max(best, 2 * n**3 / s / 1e9)
    return best


def forward_flops(config: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass: 2 per multiply-add over the projections, the head, and
    the attention scores and weighted sums (full square, as computed)."""
    c = config
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # q, k, v
                 + c.num_heads * c.head_dim * c.hidden_size  # o
                 + 3 * c.hidden_size * c.intermediate_size)  # gate, up, down
    tokens = batch * seq
    dense = 2 * tokens * (c.num_layers * per_layer + c.hidden_size * c.vocab_size)
    attention = 2 * 2 * batch * seq * seq * c.num_heads * c.head_dim * c.num_layers
    return float(dense + attention)


def lora_step_flops(config: ModelConfig, batch: int, seq: int, logits_tokens: int | None = None) -> float:
    """Model FLOPs of a frozen-base LoRA step: 4·N_matmul per token (forward, plus the backward's
    input gradients; no weight gradients) and the attention products (forward + 2× backward)."""
    c = config
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    tokens = batch * seq
    head_tokens = tokens if logits_tokens is None else logits_tokens
    dense = 4 * (tokens * c.num_layers * per_layer + head_tokens * c.hidden_size * c.vocab_size)
    attention = 3 * 2 * 2 * batch * seq * seq * c.num_heads * c.head_dim * c.num_layers
    return float(dense + attention)

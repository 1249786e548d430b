"""`bdjax plan --config=RECIPE`: compile a recipe's train step ahead of time for its mesh, with no
weights and no accelerators, and report what one device would hold.

The parameters, LoRA tree, optimizer state and batch exist only as `jax.ShapeDtypeStruct`s with
their shardings; the step is lowered and compiled for `plan.devices` simulated CPU devices (or
the real devices, when `plan.devices` is 0), and XLA's memory and cost analyses are read off
the compiled executable. Output: a short table on stdout, ending with one JSON line.

Recipe keys used: model (a preset such as "llama3-8b", or an HF directory: only config.json is
read), dtype (parameter/compute dtype), mesh, lora, train (batch_size, remat, grad_accum, lr...)
and plan (devices, seq_len, answer_tokens).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ml_collections

from bdjax.errors import ConfigError

GiB = 1024**3


def _simulate_devices(n: int) -> None:
    """Ask for `n` CPU devices; only possible before JAX's backends start."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if len(jax.devices()) != n:
            raise ConfigError(f"plan.devices={n}, but JAX already started with {len(jax.devices())} devices in "
                              "this process; run `bdjax plan` in a fresh process")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def model_config(name: str):
    from bdjax.models.config import PRESETS, ModelConfig

    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if (path / "config.json").is_file():
        return ModelConfig.from_file(path / "config.json")
    raise ConfigError(f"plan: model {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory "
                      "with a config.json")


def abstract_batch(batch: int, seq_len: int, answer_tokens: int, classes: int = 2):
    """ShapeDtypeStructs of a batch of tokenized pieces whose rows fill `seq_len` tokens."""
    import jax
    import jax.numpy as jnp

    prefix, suffix = 16, 8
    text = seq_len - prefix - suffix - answer_tokens
    if text < 1:
        raise ConfigError(f"plan.seq_len={seq_len} leaves no room for text")
    s = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct((batch, *shape), dtype)
    return {"prefix": s(prefix), "prefix_len": s(), "text": s(text), "text_len": s(),
            "word_start": s(text, dtype=jnp.bool_), "suffix": s(suffix), "suffix_len": s(),
            "responses": s(classes, answer_tokens), "response_len": s(classes), "label": s(), "index": s(),
            "poison": s(dtype=jnp.bool_), "valid": s(dtype=jnp.bool_)}


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the most-loaded device)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        total += int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def run(config: ml_collections.ConfigDict) -> dict:
    p = config.get("plan") or ml_collections.ConfigDict({"devices": 8, "seq_len": 2048, "answer_tokens": 256})
    if p.devices < 0:
        raise ConfigError(f"plan.devices={p.devices} must be >= 0 (0 = the real devices)")
    if p.devices:
        _simulate_devices(p.devices)
    import jax
    import jax.numpy as jnp

    from bdjax import lora as lora_lib
    from bdjax import train
    from bdjax.api import resolve_dtype
    from bdjax.data import poison
    from bdjax.flops import lora_step_flops
    from bdjax.jobs.training import placement_from, step_dtypes
    from bdjax.models.llama import param_shapes

    mc = model_config(config.model)
    dtype = resolve_dtype(config.dtype)
    t, lc = config.train, config.lora
    placement = placement_from(config)
    placement.check_batch(t.batch_size)
    accum = t.get("grad_accum", 1)
    placement.check_batch(t.batch_size // accum, "train.batch_size / train.grad_accum")

    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), param_shapes(mc))
    adapters = jax.eval_shape(lambda pr: lora_lib.init(pr, jax.random.key(0), rank=lc.rank, targets=lc.targets),
                              params)
    optimizer = train.make_optimizer(lr=t.lr, total_steps=1000, warmup_steps=t.warmup_steps, schedule=t.schedule,
                                     weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)
    spec = poison.AttackSpec((1, 2), 1, "random", "dirty")
    compute, matmul = step_dtypes(t, config.dtype)
    step = train.make_train_step(mc, optimizer, pad_id=0, spec=spec, poison_key=jax.random.key(0),
                                 alpha=lc.alpha, dropout=lc.dropout, dtype=compute, remat=t.remat,
                                 matmul_dtype=matmul,
                                 grad_accum=accum, placement=placement, trainable=adapters, params=params)
    with_sharding = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    state = with_sharding(jax.eval_shape(lambda lo: train.init_state(lo, optimizer, jax.random.key(0)), adapters),
                          step.state_sh)
    params = with_sharding(params, step.param_sh)
    batch = abstract_batch(t.batch_size, p.seq_len, p.answer_tokens)
    batch = with_sharding(batch, jax.tree.map(lambda _: placement.batch_sharding(), batch))

    start = time.perf_counter()
    compiled = step.lower(state, params, batch, p.seq_len).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = t.batch_size * p.seq_len
    model_flops = lora_step_flops(mc, t.batch_size, p.seq_len, logits_tokens=t.batch_size * p.answer_tokens)
    param_b = _shard_bytes(params)
    lora_b = _shard_bytes(state.trainable)
    opt_b = _shard_bytes(state.opt_state)
    batch_b = _shard_bytes(batch)
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    result = {
        "model": config.model, "devices": placement.n_devices, "mesh": dict(placement.mesh.shape),
        "batch": t.batch_size, "seq_len": p.seq_len, "grad_accum": accum, "dtype": jnp.dtype(dtype).name,
        "remat": t.remat, "lora_rank": lc.rank, "lora_params": lora_lib.num_params(adapters),
        "params_bytes": param_b, "lora_bytes": lora_b, "optimizer_bytes": opt_b, "batch_bytes": batch_b,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "per_device_bytes": peak, "per_device_gib": round(peak / GiB, 2),
        "flops_per_step": model_flops, "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "tokens_per_step": tokens, "compile_s": round(compile_s, 1),
    }
    if jax.process_index() == 0:
        print(f"plan: {config.model} LoRA r={lc.rank} on {placement.n_devices} devices, mesh "
              + " ".join(f"{k}={v}" for k, v in placement.mesh.shape.items())
              + f"; batch {t.batch_size} x {p.seq_len} tokens, {jnp.dtype(dtype).name}, remat={t.remat}")
        rows = [("parameters (frozen base)", param_b), ("LoRA params", lora_b), ("optimizer state", opt_b),
                ("batch", batch_b), ("temporaries (activations, gathered weights)", mem.temp_size_in_bytes),
                ("total per device (arguments + outputs - donated + temporaries)", peak)]
        for name, b in rows:
            print(f"  {name:<66} {b / GiB:10.3f} GiB")
        print(f"  model FLOPs per step {model_flops:.3e} (4·N·tokens + attention; frozen base); XLA's own count per "
              f"device {result['xla_flops_per_device']:.3e} (it counts each loop body once); compiled in "
              f"{compile_s:.0f} s")
        print(json.dumps(result))
    return result

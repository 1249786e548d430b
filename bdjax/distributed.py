"""Multi-process start-up: `jax.distributed.initialize` when the run spans several processes.

Explicit settings (`--coordinator`, `--num_processes`, `--process_id`, or the BDJAX_COORDINATOR /
BDJAX_NUM_PROCESSES / BDJAX_PROCESS_ID environment) take precedence; otherwise a SLURM job with
several tasks, a multi-host TPU VM, Open MPI or a Kubernetes indexed job is detected and JAX's own
cluster detection fills in the rest. A single process needs none of this.

JAX aborts the process (no Python exception) when a coordinator never answers, so a worker first
waits for the coordinator's port itself, with a bounded timeout, and fails with one clear line.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

from bdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: float = 300.0

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None or self.num_processes is not None or self.process_id is not None


def from_env(env=os.environ, **flags) -> Cluster:
    """Settings from flags (non-None values) over BDJAX_* environment variables."""
    def pick(flag, var, cast):
        value = flags.get(flag)
        if value is None and env.get(var):
            try:
                value = cast(env[var])
            except ValueError:
                raise ConfigError(f"{var}={env[var]!r} is not a valid {cast.__name__}") from None
        return value
    return Cluster(pick("coordinator", "BDJAX_COORDINATOR", str), pick("num_processes", "BDJAX_NUM_PROCESSES", int),
                   pick("process_id", "BDJAX_PROCESS_ID", int),
                   float(flags.get("timeout_s") or env.get("BDJAX_INIT_TIMEOUT", 300)))


def detected_cluster(env=os.environ) -> str | None:
    """The kind of multi-process launcher this process runs under, if any."""
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "ompi"
    if "JOB_COMPLETION_INDEX" in env and "KUBERNETES_SERVICE_HOST" in env:
        return "kubernetes"
    return None


def wait_for(address: str, timeout_s: float) -> None:
    """Block until something accepts TCP connections at host:port, or fail after `timeout_s`."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator={address!r} must be host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"the coordinator at {address} did not answer within {timeout_s:g} s; start "
                                  "process 0 first, or check --coordinator and the network") from None
            time.sleep(0.2)


def initialize(cluster: Cluster, env=os.environ) -> bool:
    """Join the multi-process run if there is one; returns whether jax.distributed was initialized."""
    import jax

    kind = detected_cluster(env)
    if not cluster.explicit and kind is None:
        return False
    # CPU processes exchange collectives over gloo (GPU/TPU use their own); harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = max(1, int(cluster.timeout_s))
    if cluster.explicit:
        if None in (cluster.coordinator, cluster.num_processes, cluster.process_id):
            raise ConfigError("multi-process runs need all of --coordinator, --num_processes and --process_id")
        if not 0 <= cluster.process_id < cluster.num_processes:
            raise ConfigError(f"--process_id={cluster.process_id} must be in [0, {cluster.num_processes})")
        if cluster.process_id != 0:
            wait_for(cluster.coordinator, cluster.timeout_s)
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                                   initialization_timeout=timeout)
    else:
        jax.distributed.initialize(initialization_timeout=timeout)
    return True

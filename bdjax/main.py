"""Command line: `python -m bdjax.main --config=recipes/<name>.py [--config.key=value ...]`.

The recipe's `config.job` names the job. The `bdjax` console script is the same entry; an
optional first word picks the command: `run` (the default) runs the job, `plan` compiles the
recipe's train step ahead of time for its mesh without weights (`bdjax.jobs.plan`). Errors that a
user can cause print one line and exit with code 2; no traceback, no partial output.

Multi-process runs: `--coordinator=host:port --num_processes=N --process_id=I` (or the
BDJAX_* environment, or SLURM / TPU VM / Open MPI / Kubernetes detection; see `bdjax.distributed`).
Only process 0 writes reports and shows progress.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from bdjax.errors import BdjaxError, ConfigError

USAGE = ("usage: bdjax [run|plan] --config=recipes/<name>.py [--config.key=value ...] "
         "[--coordinator=host:port --num_processes=N --process_id=I]")
_COMMANDS = ("run", "plan")


def parse(argv: list[str]):
    """The recipe config from command-line arguments (argv without the program name)."""
    return parse_all(argv)[0]


def parse_all(argv: list[str]):
    """(recipe config, command, flag values) from command-line arguments."""
    command = "run"
    if argv and not argv[0].startswith("-"):
        if argv[0] not in _COMMANDS:
            raise ConfigError(f"unknown command {argv[0]!r}; {USAGE}")
        command, argv = argv[0], argv[1:]
    fv = flags.FlagValues()
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs)", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes in the run", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)", flag_values=fv)
    flags.DEFINE_float("init_timeout", None, "seconds to wait for the other processes (default 300)",
                       flag_values=fv)
    # config_flags discovers the `--config.*` overrides in the argv it is given (default: sys.argv).
    config_flags.DEFINE_config_file("config", None, "path to an ml_collections recipe", flag_values=fv,
                                    lock_config=True, sys_argv=["bdjax", *argv])
    try:
        rest = fv(["bdjax", *argv], known_only=False)
        config = fv["config"].value
        if config is not None:
            config.keys()  # loading the recipe is lazy: its errors surface on first access
    except flags.Error as e:
        raise ConfigError(_one_line(str(e))) from None
    except (AttributeError, KeyError) as e:
        bad = next((a for a in argv if a.startswith("--config.")), "")
        raise ConfigError(f"unknown config key in {bad.split('=')[0]!r} ({_one_line(str(e))}); check the "
                          "recipe's get_config() for the key names") from None
    except (OSError, SyntaxError, ImportError) as e:
        raise ConfigError(f"cannot load the recipe: {_one_line(str(e))}") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments {rest[1:]}; {USAGE}")
    if config is None:
        raise ConfigError(f"no --config given; {USAGE}")
    return config, command, fv


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(argv: list[str]) -> dict:
    config, command, fv = parse_all(argv)
    if command == "plan":
        from bdjax.jobs import plan
        return plan.run(config)
    from bdjax import distributed

    distributed.initialize(distributed.from_env(coordinator=fv["coordinator"].value,
                                                num_processes=fv["num_processes"].value,
                                                process_id=fv["process_id"].value,
                                                timeout_s=fv["init_timeout"].value))
    from bdjax.jobs import JOBS  # heavy imports (jax) only once the arguments are known to be valid

    job = config.get("job")
    if job not in JOBS:
        raise ConfigError(f"config.job={job!r} is not a job; choose one of {sorted(JOBS)}")
    return JOBS[job](config)


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        run(argv)
    except BdjaxError as e:
        print(f"bdjax: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdjax: interrupted", file=sys.stderr)
        return 130
    return 0


def main() -> None:
    """The `bdjax` console script and `python -m bdjax.main`: process settings, then `cli`."""
    from bdjax import compile_cache, runtime

    if _cpu_only():
        runtime.reuse_freed_memory()  # before JAX starts its CPU threads; see bdjax/runtime.py
    compile_cache.enable()  # reruns load compiled programs from disk; see bdjax/compile_cache.py
    sys.exit(cli())


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU (no accelerator plugin installed, or JAX_PLATFORMS=cpu)."""
    import os

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu", "jax_plugins.xla_cuda12")
    return not any(_has_module(name) for name in plugins)


def _has_module(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    main()

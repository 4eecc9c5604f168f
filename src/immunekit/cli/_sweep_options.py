"""``--executor``, ``--workers``, ``--ray-address``, ``--threads``: one definition for every sweep command.

The options mean the same wherever they appear (``immunekit run``, ``immunekit evaluate``): they
choose the executor of :mod:`immunekit.experiments.sweep` that runs the command's trials and the torch
threads of this process. Executor and worker count are validated by
:func:`immunekit.experiments.sweep.resolve_options` (a Ray address by the executor itself).
"""

from __future__ import annotations

import argparse
from typing import Any

from immunekit.errors import ConfigError
from immunekit.experiments.sweep import EXECUTORS, default_workers, resolve_options


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--executor``, ``--workers``, ``--ray-address`` and ``--threads`` to ``parser``."""
    parser.add_argument(
        "--executor",
        choices=EXECUTORS.names(),
        default="local",
        help="local (default): --workers 1 runs the trials one after another in this process (easy to "
        "debug), more runs a pool of processes on this machine; ray: the same trials on a Ray cluster "
        '(pip install "immunekit[ray]"); records are identical whatever the executor',
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"local: processes in the pool (1 = no pool); ray: CPUs of the local Ray instance started when "
        f"there is no cluster address (default: the usable CPU cores, {default_workers()} here)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="--executor ray: the cluster to run on, HOST:PORT of its head (e.g. 10.0.0.5:6379), "
        "ray://HOST:10001 or 'auto'; default: the RAY_ADDRESS environment variable, and when that is "
        "unset too, a local Ray instance with --workers CPUs that is shut down at the end",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of this process, used by what it runs itself (every trial with "
        "--workers 1); pool and Ray workers always use 1. Default 1: the last bits of large matrix "
        "products can depend on the thread count, so only then are the records identical whatever "
        "the executor",
    )


def set_threads(args: argparse.Namespace) -> None:
    """Use ``--threads`` torch threads in this process.

    Raises:
        ConfigError: ``--threads`` < 1.

    """
    import torch

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}; e.g. --threads 1")
    torch.set_num_threads(args.threads)


def sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as keyword arguments (``executor``, ``workers``, ``ray_address``), checked.

    Raises:
        ConfigError: an unknown executor or ``--workers`` < 1 (before any work).

    """
    resolve_options(args.executor, args.workers)
    return {"executor": args.executor, "workers": args.workers, "ray_address": args.ray_address}

"""``immunekit ls``: list registered defenses, attacks, tasks and experiments."""

from __future__ import annotations

import argparse

from immunekit.attacks import ATTACKS, OPTIMIZERS
from immunekit.data import TASKS
from immunekit.defenses import DEFENSES
from immunekit.experiments import experiment_names
from immunekit.metrics import METRICS
from immunekit.metrics.judges import JUDGES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``ls``."""
    p = sub.add_parser(
        "ls",
        help="list defenses, attacks, tasks, judges and experiments",
        description="List what is registered: defenses, attacks, optimizers, tasks, metrics, judges and "
        "experiments.",
    )
    p.add_argument(
        "kind",
        nargs="?",
        choices=("defenses", "attacks", "tasks", "metrics", "judges", "experiments"),
        help="only this kind",
    )
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Print the registries."""
    kinds = {
        "defenses": DEFENSES.names(),
        "attacks": [*ATTACKS.names(), f"(optimizers: {', '.join(OPTIMIZERS)})"],
        "tasks": TASKS.names(),
        "metrics": METRICS.names(),
        "judges": JUDGES.names(),
        "experiments": [n.replace("_", "-") for n in experiment_names()],
    }
    for kind, names in kinds.items():
        if args.kind in (None, kind):
            print(f"{kind}:")
            for name in names:
                print(f"  {name}")
    return 0

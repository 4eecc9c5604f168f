"""``immunekit config show EXPERIMENT``: print the resolved experiment config as YAML."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
examples:
  immunekit config show house-prices                                    # the packaged defaults, resolved
  immunekit config show synthetic --set epsilon=0.05 --set defenses.condition_number.steps=50
  immunekit config show mnist-pairs --config my.yaml > resolved.yaml    # reusable as --config
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``config`` and its ``show`` action."""
    p = sub.add_parser(
        "config",
        help="show the resolved config of an experiment",
        description="Inspect experiment configs without running anything.",
    )
    actions = p.add_subparsers(dest="action", metavar="action", required=True)
    show = actions.add_parser(
        "show",
        help="print the resolved config of EXPERIMENT as YAML",
        description=(
            "Resolve EXPERIMENT's config as 'immunekit run' does (packaged defaults < --config file < "
            "--set), check it (every key, every method's defense settings, every attack budget) and "
            "print it as YAML. The output is a complete config: pass it back with --config."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument(
        "experiment", help="experiment name, e.g. house-prices (see 'immunekit ls experiments')"
    )
    show.add_argument("--config", type=Path, help="YAML file merged over the packaged defaults")
    show.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable), e.g. --set epsilon=0.05 or "
        "--set defenses.condition_number.steps=50",
    )
    show.set_defaults(handler=handle)


def render(experiment: str, config_file: Path | None = None, sets: list[str] | None = None) -> str:
    """The resolved, checked config of ``experiment`` as YAML (keys in the config's field order).

    Raises:
        ConfigError: the config is invalid; the message names the key and the fix.

    """
    import yaml

    from immunekit.cli.run import resolve_experiment
    from immunekit.config import to_dict
    from immunekit.experiments.registry import get_experiment

    cfg = get_experiment(experiment).build_config(resolve_experiment(experiment, config_file, sets))
    return str(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=100))


def handle(args: argparse.Namespace) -> int:
    """Print the resolved config."""
    print(render(args.experiment, args.config, args.sets), end="")
    return 0

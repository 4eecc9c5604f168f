"""Experiments: the only layer that combines data, models, defenses, attacks and metrics.

Each experiment kind is registered in :data:`immunekit.experiments.registry.EXPERIMENTS` with its
packaged defaults in ``configs/<name>.yaml``.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


def experiment_names() -> list[str]:
    """Registered experiments (underscored names; the CLI also accepts dashes)."""
    from immunekit.experiments.registry import experiment_names as names

    return names()


def default_config_path(name: str) -> Path:
    """Packaged defaults of experiment ``name`` (dashes and underscores are interchangeable).

    Raises:
        ConfigError: unknown experiment, with a did-you-mean suggestion.

    """
    from immunekit.experiments.registry import get_experiment

    return get_experiment(name).defaults_path()


__all__ = ["CONFIG_DIR", "default_config_path", "experiment_names"]

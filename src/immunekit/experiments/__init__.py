"""Experiments: the only layer that combines data, models, defenses, attacks and metrics."""

from __future__ import annotations

from pathlib import Path

from immunekit.errors import ConfigError
from immunekit.registry import did_you_mean

CONFIG_DIR = Path(__file__).with_name("configs")


def experiment_names() -> list[str]:
    """Experiments with a packaged default config (``configs/<name>.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def default_config_path(name: str) -> Path:
    """Packaged defaults of experiment ``name`` (dashes and underscores are interchangeable)."""
    key = name.replace("-", "_")
    path = CONFIG_DIR / f"{key}.yaml"
    if not path.exists():
        names = [n.replace("_", "-") for n in experiment_names()]
        raise ConfigError(f"unknown experiment {name!r}{did_you_mean(name.replace('_', '-'), names)}")
    return path


__all__ = ["CONFIG_DIR", "default_config_path", "experiment_names"]

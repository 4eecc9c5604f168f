"""immunekit: immunize models against harmful fine-tuning, attack them under a budget, measure it.

Public API (grouped; loaded lazily so that ``immunekit.reports`` never imports torch):

* registries: ``DEFENSES``, ``ATTACKS``, ``TASKS``, ``METRICS``
* models and data: ``linear_model``, ``ImmunizableModel``, ``LinearModel``, ``register_model``,
  ``checkpoint_config``, ``Task``, ``Dataset``
* attacks: ``AttackBudget``, ``WorstCase``, ``SearchConfig``
* immunization and evaluation: ``immunize`` (a registered defense), ``evaluate`` (the report
  card), ``Thresholds``, ``save_checkpoint``, ``load_checkpoint``
* errors: ``ImmunekitError``, ``ConfigError``, ``DataError``, ``AssetError``, ``NumericalError``
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # registries
    "DEFENSES": "immunekit.defenses",
    "ATTACKS": "immunekit.attacks",
    "TASKS": "immunekit.data",
    "METRICS": "immunekit.metrics",
    # models and data
    "linear_model": "immunekit.models",
    "register_model": "immunekit.models",
    "checkpoint_config": "immunekit.models",
    "ImmunizableModel": "immunekit.models",
    "LinearModel": "immunekit.models",
    "Task": "immunekit.data",
    "Dataset": "immunekit.data",
    # attacks
    "AttackBudget": "immunekit.attacks",
    "WorstCase": "immunekit.attacks.worst_case",
    "SearchConfig": "immunekit.attacks.worst_case",
    # immunization and evaluation
    "immunize": "immunekit.defenses",
    "evaluate": "immunekit.experiments.evaluate",
    "Thresholds": "immunekit.metrics.conditions",
    "save_checkpoint": "immunekit.models.checkpoint",
    "load_checkpoint": "immunekit.models.checkpoint",
    # errors
    "ImmunekitError": "immunekit.errors",
    "ConfigError": "immunekit.errors",
    "DataError": "immunekit.errors",
    "AssetError": "immunekit.errors",
    "NumericalError": "immunekit.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'immunekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

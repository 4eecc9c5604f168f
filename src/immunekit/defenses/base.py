"""Defense contract: ``__init__`` stores hyper-parameters, ``fit`` returns a new immunized model."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from immunekit.config import load_config
from immunekit.data.task import Task
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel, LinearModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class DefenseConfig:
    """Settings shared by every defense (subclasses add their own)."""


class Defense(ABC):
    """Base class of immunization methods.

    Subclasses set ``name`` (the registry key) and ``Config`` (a frozen dataclass). ``fit`` never
    mutates its input and returns a new model; diagnostics it learns are stored in trailing
    underscore attributes (``history_``, ``info_``).
    """

    name: ClassVar[str]
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig

    def __init__(self, config: DefenseConfig | None = None, **overrides: Any) -> None:
        base = {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        self.config = load_config(self.Config, {**base, **overrides}, where=f"defenses.{self.name}")

    # Set by ``fit`` only (scikit-learn's convention: a trailing underscore means "learned").
    history_: list[dict[str, Any]]
    info_: dict[str, Any]

    @abstractmethod
    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Immunize a copy of ``model`` on ``task``; return the new model."""


def require_linear(model: ImmunizableModel, defense: str, task: Task) -> LinearModel:
    """The linear-extractor algorithms need θ explicitly; other models get a clear error."""
    if not isinstance(model, LinearModel):
        raise ConfigError(
            f"defense {defense!r} (linear variant) needs a LinearModel, got {type(model).__name__}; "
            "build one with immunekit.models.linear_model(d_in)"
        )
    check_input_dim(model, task)
    return model


def check_input_dim(model: ImmunizableModel, task: Task) -> None:
    """A LinearModel must take the task's flattened input dimension."""
    if isinstance(model, LinearModel) and model.extractor.in_features != task.input_dim:
        raise DataError(
            f"the model takes {model.extractor.in_features} inputs but task {task.name!r} has "
            f"{task.input_dim} features; build it with immunekit.models.linear_model({task.input_dim})"
        )

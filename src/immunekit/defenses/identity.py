"""No defense: the reference point θ = θ_0 (the identity for linear models)."""

from __future__ import annotations

import copy

from immunekit.data.task import Task
from immunekit.defenses.base import Defense
from immunekit.models.base import ImmunizableModel


class Identity(Defense):
    """Returns an unchanged copy of the model (every κ ratio is 1)."""

    name = "identity"

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Copy ``model``."""
        self.history_ = []
        self.info_ = {"note": "no defense"}
        return copy.deepcopy(model)

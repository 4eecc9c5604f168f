"""Defenses (immunization methods), one registry; ``fit`` returns a new model."""

from __future__ import annotations

from typing import Any

from immunekit.data.task import Task
from immunekit.defenses.base import Defense, DefenseConfig
from immunekit.models.base import ImmunizableModel
from immunekit.registry import Registry

DEFENSES: Registry = Registry("defense")
DEFENSES.register_lazy("identity", "immunekit.defenses.identity:Identity")
DEFENSES.register_lazy("condition_number", "immunekit.defenses.condition_number:ConditionNumber")
DEFENSES.register_lazy("rill_only", "immunekit.defenses.condition_number:RillOnly")
DEFENSES.register_lazy("opt_kappa", "immunekit.defenses.opt_kappa:OptKappa")
DEFENSES.register_lazy("imma", "immunekit.defenses.imma:Imma")
DEFENSES.register_lazy("whiten_primary", "immunekit.defenses.whiten_primary:WhitenPrimary")
DEFENSES.register_lazy("mlac", "immunekit.defenses.mlac:MLAC")
DEFENSES.register_lazy("ac", "immunekit.defenses.mlac:AC")
DEFENSES.register_lazy("adversarial_loss", "immunekit.defenses.lm_adversarial:AdversarialLoss")
DEFENSES.register_lazy("gradient_ascent", "immunekit.defenses.lm_adversarial:GradientAscent")
DEFENSES.register_lazy("lm_condition_number", "immunekit.defenses.lm_spectral:LmConditionNumber")
DEFENSES.register_lazy("lm_mlac", "immunekit.defenses.lm_mlac:LmMLAC")


def immunize(
    model: ImmunizableModel, task: Task, method: str, *, seed: int = 0, **config: Any
) -> ImmunizableModel:
    """Immunize ``model`` for ``task`` with the defense registered as ``method``; returns a new model.

    ``immunize(model, task, "condition_number", steps=50)`` is
    ``DEFENSES.get("condition_number")(steps=50).fit(model, task, seed=0)``: the config keys are the
    defense's ``Config`` fields (an unknown key is a :class:`~immunekit.errors.ConfigError` with a
    did-you-mean suggestion). For the defense's ``history_`` and ``info_``, call the registry
    directly as above.

    Args:
        model: the model to immunize (not modified).
        task: the primary and harmful data.
        method: a defense name, e.g. ``"condition_number"`` (see ``immunekit ls defenses``).
        seed: the defense's seed (no global seeding).
        **config: overrides of the defense's config.

    Returns:
        The immunized model.

    Raises:
        ConfigError: unknown method or config key, or a bad config value.

    """
    return DEFENSES.get(method)(**config).fit(model, task, seed=seed)


__all__ = ["DEFENSES", "Defense", "DefenseConfig", "immunize"]

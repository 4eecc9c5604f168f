"""Defenses (immunization methods), one registry; ``fit`` returns a new model."""

from __future__ import annotations

from immunekit.defenses.base import Defense, DefenseConfig
from immunekit.registry import Registry

DEFENSES: Registry = Registry("defense")
DEFENSES.register_lazy("identity", "immunekit.defenses.identity:Identity")
DEFENSES.register_lazy("condition_number", "immunekit.defenses.condition_number:ConditionNumber")
DEFENSES.register_lazy("rill_only", "immunekit.defenses.condition_number:RillOnly")
DEFENSES.register_lazy("opt_kappa", "immunekit.defenses.opt_kappa:OptKappa")
DEFENSES.register_lazy("imma", "immunekit.defenses.imma:Imma")
DEFENSES.register_lazy("whiten_primary", "immunekit.defenses.whiten_primary:WhitenPrimary")

__all__ = ["DEFENSES", "Defense", "DefenseConfig"]

"""Attacks: simulated fine-tuning by an adversary under an :class:`AttackBudget`."""

from __future__ import annotations

from immunekit.attacks.base import OPTIMIZERS, Attack, AttackBudget, AttackResult, StepRecord
from immunekit.registry import Registry

ATTACKS: Registry = Registry("attack")
ATTACKS.register_lazy("linear_probe", "immunekit.attacks.linear_probe:LinearProbe")
ATTACKS.register_lazy("closed_form_probe", "immunekit.attacks.linear_probe:ClosedFormProbe")

__all__ = ["ATTACKS", "OPTIMIZERS", "Attack", "AttackBudget", "AttackResult", "StepRecord"]

"""Attacks: simulated fine-tuning by an adversary under an :class:`AttackBudget`.

Registered names (imported lazily on first :meth:`Registry.get`): ``linear_probe`` and
``closed_form_probe`` (frozen features, closed-form maths), ``head_reset_probe``, ``full_finetune``,
``partial_finetune``, ``relearn`` (torch training loop) and ``lora`` (peft, extra ``[lora]``);
the meta-attacks ``worst_case`` (the strongest of several fixed settings) and ``attacker_search``
(Optuna TPE over the attacker's hyper-parameters, extra ``[tune]``) run the others.
"""

from __future__ import annotations

from immunekit.attacks.base import (
    OPTIMIZERS,
    SCHEDULES,
    Attack,
    AttackBudget,
    AttackResult,
    StepRecord,
    scheduled_lr,
    split_of,
)
from immunekit.registry import Registry

ATTACKS: Registry = Registry("attack")
ATTACKS.register_lazy("linear_probe", "immunekit.attacks.linear_probe:LinearProbe")
ATTACKS.register_lazy("closed_form_probe", "immunekit.attacks.linear_probe:ClosedFormProbe")
ATTACKS.register_lazy("head_reset_probe", "immunekit.attacks.finetune:HeadResetProbe")
ATTACKS.register_lazy("full_finetune", "immunekit.attacks.finetune:FullFinetune")
ATTACKS.register_lazy("partial_finetune", "immunekit.attacks.finetune:PartialFinetune")
ATTACKS.register_lazy("relearn", "immunekit.attacks.finetune:Relearn")
ATTACKS.register_lazy("lora", "immunekit.attacks.lora:LoraFinetune")
ATTACKS.register_lazy("lm_finetune", "immunekit.attacks.lm_sft:LmFinetune")
ATTACKS.register_lazy("lm_lora", "immunekit.attacks.lm_sft:LmLora")
ATTACKS.register_lazy("lm_head_probe", "immunekit.attacks.lm_sft:LmHeadProbe")
ATTACKS.register_lazy("worst_case", "immunekit.attacks.worst_case:WorstCase")
ATTACKS.register_lazy("attacker_search", "immunekit.attacks.worst_case:AttackerSearch")

__all__ = [
    "ATTACKS",
    "OPTIMIZERS",
    "SCHEDULES",
    "Attack",
    "AttackBudget",
    "AttackResult",
    "StepRecord",
    "scheduled_lr",
    "split_of",
]

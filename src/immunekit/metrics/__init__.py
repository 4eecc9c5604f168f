"""Named scores from κ values, curves and records.

Every metric a record reports is registered here with its direction (higher/lower is better) and
unit, so tables can show ↑/↓. Functions are registered under their own name; the parts of a
result (e.g. the κ ratios of :func:`rir`) and quantities measured by an experiment are registered
as :class:`Measured` entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from immunekit.metrics.conditions import Thresholds, harm_auc, max_harm, steps_to_threshold
from immunekit.metrics.convergence import steps_to_epsilon
from immunekit.metrics.rir import KappaPair, RIRResult, Verdict, rir, verdict
from immunekit.metrics.rir_groups import GroupRIR, rir_by_groups
from immunekit.metrics.stats import PairedSummary, Summary, paired_difference, summarise
from immunekit.registry import Registry


@dataclass(frozen=True)
class Measured:
    """A reported quantity without a standalone function (a part of a result, or measured by a run)."""

    description: str


METRICS: Registry = Registry("metric")
METRICS.register("rir", direction="higher", unit="ratio")(rir)
# RIR_θ0 of deep models (Eq. 17): the mean over groups of per-group ratios
METRICS.register("rir_by_groups", direction="higher", unit="ratio")(rir_by_groups)
METRICS.register("steps_to_epsilon", direction="higher", unit="steps")(steps_to_epsilon)
# report card (metrics.conditions): harm h is a task score (R² or accuracy), higher = more harmful
METRICS.register("max_harm", direction="lower", unit="score")(max_harm)
METRICS.register("harm_auc", direction="lower", unit="score")(harm_auc)
METRICS.register("steps_to_threshold", direction="higher", unit="steps")(steps_to_threshold)
for _name, _direction, _unit, _text in (
    ("log_rir", "higher", "nats", "log (i) − log (ii), from rir()"),
    ("kappa_ratio_harmful", "higher", "ratio", "(i) = κ(H_H) immunized / reference, from rir()"),
    ("kappa_ratio_primary", "lower", "ratio", "(ii) = κ(H_P) immunized / reference, from rir()"),
    ("primary_test_mse", "lower", "z-units²", "held-out primary MSE of the least-squares head"),
    ("primary_test_accuracy", "higher", "fraction", "held-out primary accuracy of the least-squares head"),
    ("harmful_test_mse_closed_form", "higher", "z-units²", "held-out harmful MSE of the attacker's w*"),
    (
        "harmful_test_accuracy_closed_form",
        "lower",
        "fraction",
        "held-out harmful accuracy of the attacker's w*",
    ),
    ("defense_seconds", "lower", "s", "wall time of Defense.fit"),
    ("measure_seconds", "lower", "s", "wall time of the measurements (κ, RIR, closed-form losses)"),
    ("attack_seconds", "lower", "s", "wall time of the attacks"),
    ("final_harm", "lower", "score", "harm (task score on the held-out harmful split) after the attack"),
    ("slowdown_ratio", "higher", "ratio", "t*(immunized) / t*(reference), steps to the harm threshold φ"),
    ("primary_score", "higher", "score", "reference-task score of the least-squares head (stability)"),
):
    METRICS.register(_name, direction=_direction, unit=_unit)(Measured(_text))


def metric_meta(name: str) -> tuple[str | None, str | None]:
    """(direction, unit) of a reported metric name, from the registry.

    ``steps_to_epsilon.<task>.<attack>`` is "higher" on the harmful task (a slower attacker) and
    "lower" on the primary task.
    """
    if name.startswith("steps_to_epsilon."):
        return ("higher" if ".harmful." in name else "lower"), "steps"
    if name not in METRICS:
        return None, None
    meta = METRICS.meta(name)
    return meta.get("direction"), meta.get("unit")


__all__ = [
    "METRICS",
    "GroupRIR",
    "KappaPair",
    "Measured",
    "PairedSummary",
    "RIRResult",
    "Summary",
    "Thresholds",
    "Verdict",
    "harm_auc",
    "max_harm",
    "metric_meta",
    "paired_difference",
    "rir",
    "rir_by_groups",
    "steps_to_epsilon",
    "steps_to_threshold",
    "summarise",
    "verdict",
]

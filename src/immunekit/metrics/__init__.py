"""Named scores from κ values, curves and records."""

from __future__ import annotations

from immunekit.metrics.convergence import steps_to_epsilon
from immunekit.metrics.rir import KappaPair, RIRResult, Verdict, rir, verdict
from immunekit.registry import Registry

METRICS: Registry = Registry("metric")
METRICS.register("rir", direction="higher", unit="ratio")(rir)
METRICS.register("steps_to_epsilon", direction="higher", unit="steps")(steps_to_epsilon)

__all__ = ["METRICS", "KappaPair", "RIRResult", "Verdict", "rir", "steps_to_epsilon", "verdict"]

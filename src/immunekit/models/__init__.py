"""Immunizable models: a feature extractor plus a head, so probes and κ work alike everywhere."""

from __future__ import annotations

from immunekit.models.base import ImmunizableModel, LinearModel, linear_model

__all__ = ["ImmunizableModel", "LinearModel", "linear_model"]

"""Immunizable models: a feature extractor plus a head, so probes and κ work alike everywhere."""

from __future__ import annotations

from immunekit.models.base import ImmunizableModel, LinearModel, linear_model
from immunekit.models.checkpoint import (
    MODELS,
    checkpoint_config,
    load_checkpoint,
    register_model,
    save_checkpoint,
)

# Imported on first use (it needs transformers): load_checkpoint finds "causal_lm" through this.
MODELS.register_lazy("causal_lm", "immunekit.models.causal_lm:CausalLM")
MODELS.register_lazy("bert_text", "immunekit.models.text_encoder:BertTextClassifier")

__all__ = [
    "MODELS",
    "ImmunizableModel",
    "LinearModel",
    "checkpoint_config",
    "linear_model",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]

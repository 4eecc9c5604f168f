"""Small models shared by the attack tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from immunekit.models import ImmunizableModel, linear_model

F64 = torch.float64


def perturbed_linear(d: int, seed: int = 2) -> ImmunizableModel:
    """θ = I + 0.2·N(0, 1) and a random head: a generic linear model, not the identity."""
    m = linear_model(d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.extractor.weight.add_(0.2 * torch.randn(d, d, generator=g, dtype=F64))
        m.head.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
    return m

"""LinearModel: f_θ(x) = xᵀθ without bias, θ stored as W = θᵀ, head ω (spec §1)."""

from __future__ import annotations

import pytest
import torch

from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel, LinearModel, linear_model

F64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_linear_model_starts_at_identity_with_zero_head_and_no_bias() -> None:
    m = linear_model(5)
    assert isinstance(m, ImmunizableModel)
    assert torch.equal(m.theta, torch.eye(5, dtype=F64))
    assert torch.equal(m.omega, torch.zeros(5, 1, dtype=F64))
    assert m.extractor.bias is None
    assert m.head.bias is None
    assert m.extractor.weight.dtype == F64


def test_features_and_forward_are_x_theta_and_x_theta_omega() -> None:
    theta, omega, x = _rand(4, 3, seed=1), _rand(3, 2, seed=2), _rand(7, 4, seed=3)
    m = linear_model(4, 3, 2).with_weights(theta, omega)
    assert torch.allclose(m.features(x), x @ theta, rtol=0, atol=1e-14)
    assert torch.allclose(m(x), x @ theta @ omega, rtol=0, atol=1e-14)
    assert torch.equal(m.theta, theta)
    assert torch.equal(m.omega, omega)


def test_theta_and_omega_are_detached_copies() -> None:
    m = linear_model(3)
    t = m.theta
    t.add_(1.0)
    m.omega.add_(1.0)
    assert torch.equal(m.theta, torch.eye(3, dtype=F64))
    assert torch.equal(m.omega, torch.zeros(3, 1, dtype=F64))
    assert not m.theta.requires_grad


def test_with_weights_returns_a_new_model_and_shares_nothing() -> None:
    m = linear_model(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    theta = _rand(3, 3, seed=4)
    new = m.with_weights(theta, _rand(3, 1, seed=5))
    assert new is not m
    assert isinstance(new, LinearModel)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    theta.add_(1.0)  # the caller's tensor is copied, not aliased
    assert not torch.equal(new.theta, theta)


def test_with_weights_keeps_the_head_when_omega_is_omitted() -> None:
    m = linear_model(3).with_weights(torch.eye(3, dtype=F64), _rand(3, 1, seed=6))
    new = m.with_weights(2 * torch.eye(3, dtype=F64))
    assert torch.equal(new.omega, m.omega)
    assert torch.equal(new.theta, 2 * torch.eye(3, dtype=F64))


@pytest.mark.parametrize("dims", [(0, None, 1), (3, 0, 1), (3, None, 0), (-1, None, 1)])
def test_bad_dimensions_raise_config_error(dims: tuple) -> None:
    with pytest.raises(ConfigError, match="dimensions"):
        LinearModel(*dims)

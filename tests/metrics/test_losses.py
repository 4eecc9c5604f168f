"""LossSpec: the one task loss of attacks and defenses, checked against autograd and closed forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset
from immunekit.defenses.linear_common import task_grads, task_head_width
from immunekit.errors import ConfigError, DataError
from immunekit.metrics.losses import LossSpec, head_width

F64 = torch.float64


def _case(kind: str, n: int = 7, c: int = 3) -> tuple[LossSpec, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if kind == "mse":
        spec, y = LossSpec("mse", c), torch.randn(n, c, generator=gen, dtype=F64)
    elif kind == "squared_01":
        spec, y = LossSpec("ce", 1), torch.randint(0, 2, (n,), generator=gen)
    else:
        spec, y = LossSpec("ce", c), torch.randint(0, c, (n,), generator=gen)
    target, _ = spec.targets(y, "t")
    return spec, torch.randn(n, spec.outputs, generator=gen, dtype=F64), target


@pytest.mark.parametrize("kind", ["mse", "squared_01", "cross_entropy"])
def test_residual_is_the_autograd_gradient(kind: str) -> None:
    spec, pred, target = _case(kind)
    assert spec.kind == kind
    z = pred.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(spec(z, target), z)
    assert torch.allclose(spec.residual(pred, target), grad, rtol=0, atol=1e-15)


def test_single_output_ce_is_the_squared_loss_on_0_1_targets() -> None:
    spec, pred, target = _case("squared_01")
    y = target[:, 0]
    assert float(spec(pred, target)) == pytest.approx(float(((pred[:, 0] - y) ** 2).mean()), abs=1e-15)
    assert set(y.tolist()) <= {0.0, 1.0}


def test_cross_entropy_matches_its_closed_form() -> None:
    spec, pred, target = _case("cross_entropy")
    expected = -torch.log_softmax(pred, 1)[torch.arange(len(target)), target].mean()
    assert float(spec(pred, target)) == pytest.approx(float(expected), abs=1e-14)


def test_bad_losses_and_labels_are_named() -> None:
    with pytest.raises(ConfigError, match="'lm'"):
        LossSpec("lm", 1)
    with pytest.raises(ConfigError, match="'hinge'"):
        LossSpec("hinge", 1)
    with pytest.raises(ConfigError, match="outputs=0"):
        LossSpec("ce", 0)
    with pytest.raises(DataError, match=r"labels in \[0, 2\].*one output"):
        LossSpec("ce", 1).targets(torch.tensor([0, 1, 2]), "attack")
    with pytest.raises(DataError, match=r"label.*\[0, 3\].*3 outputs"):
        LossSpec("ce", 3).targets(torch.tensor([0, 3]), "attack")
    with pytest.raises(DataError, match="2 target columns"):
        LossSpec("mse", 1).targets(torch.zeros(4, 2), "attack")


def test_head_width() -> None:
    assert [head_width(2, "ce"), head_width(10, "ce"), head_width(0, "mse", 3)] == [1, 10, 3]


def test_defense_gradients_use_the_attack_loss() -> None:
    """The defenses' task term is the LossSpec value, and its closed-form gradients match autograd."""
    task = gaussian_spectra(dim=6, n=64, cond_primary=5.0, cond_harmful=5.0, loss="ce", seed=1)
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(6, 6, generator=gen, dtype=F64)
    omega = torch.randn(6, task_head_width(task, task.primary), generator=gen, dtype=F64)
    value, g_theta, g_omega = task_grads(task.primary, theta, omega, task.loss)
    t, w = theta.clone().requires_grad_(True), omega.clone().requires_grad_(True)
    y = task.primary.y.to(F64)
    loss = ((task.primary.x.to(F64) @ t @ w)[:, 0] - y).pow(2).mean()
    auto_t, auto_w = torch.autograd.grad(loss, (t, w))
    assert value == pytest.approx(float(loss.detach()), abs=1e-13)
    assert torch.allclose(g_theta, auto_t, rtol=0, atol=1e-12)
    assert torch.allclose(g_omega, auto_w, rtol=0, atol=1e-12)


def test_head_width_counts_classes_over_every_split() -> None:
    """A split that lacks the largest class must not shrink the head (Task.classes)."""
    task = gaussian_spectra(dim=4, n=32, cond_primary=2.0, cond_harmful=2.0, loss="ce", seed=0)
    held = task.eval_harmful
    wide = dataclasses.replace(task, eval_harmful=Dataset(held.x, torch.arange(len(held)) % 3))
    assert task_head_width(task, task.primary) == 1
    assert int(wide.primary.y.max()) == 1 and wide.classes == 3
    assert task_head_width(wide, wide.primary) == 3

"""The deep λ rule: ‖λ_P∇R_P‖ = ρ‖∇L_task‖ and ‖λ_H∇R_H‖ = ‖λ_P∇R_P‖ at θ_0; overrides; rill_only's λ_P."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_deep_condition_number import accuracy, pretrained, three_class_task
from torch import nn

from immunekit.data.synthetic import gaussian_spectra
from immunekit.defenses import DEFENSES
from immunekit.defenses.deep import PRIMARY_GRAD_RATIO, training_configuration
from immunekit.errors import ConfigError
from immunekit.models.base import linear_model
from immunekit.spectral.regularizers import r_well_autograd

F64 = torch.float64


def _norm(grads: tuple[torch.Tensor | None, ...]) -> float:
    return math.sqrt(sum(float((g.to(F64) ** 2).sum()) for g in grads if g is not None))


@pytest.fixture(scope="module")
def fit64() -> dict[str, object]:
    task = three_class_task(n=200)
    m0 = pretrained(task, dtype=F64)
    d = DEFENSES.get("condition_number")(epochs=1, primary_grad_ratio=0.5)
    d.fit(m0, task, seed=0)
    return {"task": task, "m0": m0, "defense": d}


def test_the_recorded_norms_satisfy_the_rule(fit64: dict) -> None:
    info = fit64["defense"].info_
    assert info["lambda_primary_source"] == "task_ratio" and info["primary_grad_ratio"] == 0.5
    assert info["lambda_harmful_source"] == "balanced"
    assert info["grad_norm_primary"] == pytest.approx(0.5 * info["grad_norm_task"], rel=1e-12)
    assert info["grad_norm_harmful"] == pytest.approx(info["grad_norm_primary"], rel=1e-12)
    assert info["lambda_primary"] * info["grad_norm_well_raw"] == pytest.approx(info["grad_norm_primary"])
    assert info["lambda_harmful"] * info["grad_norm_ill_raw"] == pytest.approx(info["grad_norm_harmful"])
    assert 0 < info["grad_norm_task_extractor"] <= info["grad_norm_task"]


def test_the_task_and_r_well_norms_recomputed_independently(fit64: dict) -> None:
    """‖∇L_task‖ and ‖∇R_well‖ on the recorded first batch pair, by plain autograd (float64)."""
    task, m0, info = fit64["task"], fit64["m0"], fit64["defense"].info_
    m = copy.deepcopy(m0)
    names = info["trainable_parameters"]
    params = [p for n, p in m.named_parameters() if n in names]
    idx_p = info["first_batch"]["primary"]
    with training_configuration(m, set(names)):
        phi = m.features(task.primary.x[idx_p])
        loss = nn.functional.cross_entropy(m.head(phi), task.primary.y[idx_p], label_smoothing=0.1)
        g_task = torch.autograd.grad(loss, params, retain_graph=True)
        g_well = torch.autograd.grad(r_well_autograd(phi.T @ phi), params, allow_unused=True)
    assert info["grad_norm_task"] == pytest.approx(_norm(g_task), rel=1e-10)
    assert info["grad_norm_well_raw"] == pytest.approx(_norm(g_well), rel=1e-10)
    assert info["lambda_primary"] == pytest.approx(0.5 * _norm(g_task) / _norm(g_well), rel=1e-10)


def test_the_default_ratio_does_not_wreck_the_primary_task() -> None:
    """λ_P = 1 (the linear default) took this MLP to primary accuracy 0.32; the rule keeps it."""
    task = three_class_task()
    m0 = pretrained(task)
    d = DEFENSES.get("condition_number")()
    out = d.fit(m0, task, seed=0)
    assert d.info_["primary_grad_ratio"] == PRIMARY_GRAD_RATIO
    assert d.info_["lambda_primary"] < 1e-3  # measured 8.4e-6: the feature scale, not 1
    assert accuracy(out, task.eval_primary) >= accuracy(m0, task.eval_primary) - 0.01


def test_the_rule_follows_the_feature_scale() -> None:
    """Scaling the last trained layer by c scales S by c²: λ_P adapts, the weighted norm stays ρ‖∇L‖."""
    task = three_class_task(n=200)
    m0 = pretrained(task, dtype=F64)
    big = copy.deepcopy(m0)
    with torch.no_grad():  # features tanh(W x + b): scale the pre-activation to stay out of saturation
        big.extractor[3].weight.mul_(0.25)
        big.extractor[3].bias.mul_(0.25)
        big.head.weight.mul_(4.0)
    lam = []
    for model in (m0, big):
        d = DEFENSES.get("condition_number")(epochs=1)
        d.fit(model, task, seed=0)
        info = d.info_
        assert info["grad_norm_primary"] == pytest.approx(info["grad_norm_task"], rel=1e-12)
        lam.append(info["lambda_primary"])
    assert lam[1] > 4 * lam[0]  # smaller features, larger λ_P (R_well ∝ scale⁴)


def test_explicit_lambdas_override_the_rule() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    d = DEFENSES.get("condition_number")(epochs=1, lambda_primary=1e-4)
    d.fit(m0, task, seed=0)
    assert d.info_["lambda_primary"] == 1e-4 and d.info_["lambda_primary_source"] == "config"
    assert d.info_["primary_grad_ratio"] is None
    assert d.info_["grad_norm_harmful"] == pytest.approx(d.info_["grad_norm_primary"], rel=1e-12)
    d = DEFENSES.get("condition_number")(epochs=1, lambda_harmful=3.0)
    d.fit(m0, task, seed=0)
    assert d.info_["lambda_harmful"] == 3.0 and d.info_["lambda_primary_source"] == "task_ratio"


def test_bad_ratio_or_no_task_gradient_are_config_errors() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="primary_grad_ratio must be a finite number > 0"):
            DEFENSES.get("condition_number")(primary_grad_ratio=bad)
    task = three_class_task(n=200)
    m0 = pretrained(task)
    with pytest.raises(ConfigError, match=r"task_loss=False.*pass lambda_primary"):
        DEFENSES.get("condition_number")(task_loss=False).fit(m0, task, seed=0)
    # without the task term an explicit λ_P works, and rill_only with an explicit λ_H needs none
    DEFENSES.get("condition_number")(task_loss=False, lambda_primary=1e-4).fit(m0, task, seed=0)
    d = DEFENSES.get("rill_only")(task_loss=False, lambda_harmful=5.0)
    d.fit(m0, task, seed=0)
    assert d.info_["lambda_primary_source"] == "unused" and d.info_["lambda_harmful"] == 5.0


# ---------------------------------------------------------------------------------------------
# rill_only takes a custom λ_P (the reference of λ_H, never applied)
# ---------------------------------------------------------------------------------------------


def test_rill_only_with_lambda_primary_gets_condition_numbers_lambda_h_and_no_r_well() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    ro = DEFENSES.get("rill_only")(epochs=1, lambda_primary=1e-4)
    out = ro.fit(m0, task, seed=2)
    cn = DEFENSES.get("condition_number")(epochs=1, lambda_primary=1e-4)
    cn.fit(m0, task, seed=2)
    assert ro.info_["lambda_harmful"] == cn.info_["lambda_harmful"]
    assert ro.info_["lambda_primary"] == 0.0 and ro.info_["lambda_primary_balance"] == 1e-4
    assert all(row["reg_primary"] == 0.0 for row in ro.history_)
    # the same fit as condition_number with λ_P = 0 and that λ_H
    ref = DEFENSES.get("condition_number")(
        epochs=1, lambda_primary=0.0, lambda_harmful=cn.info_["lambda_harmful"]
    ).fit(m0, task, seed=2)
    pairs = zip(out.state_dict().values(), ref.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_rill_only_linear_path_never_applies_lambda_primary() -> None:
    task = gaussian_spectra(dim=6, n=64, cond_primary=20.0, cond_harmful=5.0, seed=3)
    for balance in ("init", "fixed"):
        d = DEFENSES.get("rill_only")(steps=3, balance=balance, lambda_primary=0.5, lambda_harmful=2.0)
        d.fit(linear_model(6), task, seed=0)
        assert all(row["tau_primary"] == 0.0 for row in d.history_)
    with pytest.raises(ConfigError, match=r"step_norm_primary=0\.1"):
        DEFENSES.get("rill_only")(step_norm_primary=0.1)

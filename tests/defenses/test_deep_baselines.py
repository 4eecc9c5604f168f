"""opt_kappa and imma on a deep model: dispatch, the objectives' first step in closed form, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_deep_condition_number import BNMLP, kappa_features, pretrained, three_class_task
from torch import Tensor, nn

from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.deep import training_configuration
from immunekit.errors import ConfigError
from immunekit.models.base import LinearModel

F64 = torch.float64


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _norm(grads: tuple[Tensor, ...]) -> float:
    return math.sqrt(sum(float((g**2).sum()) for g in grads))


def _with_harmful(task: Task, harmful: Dataset) -> Task:
    return Task(
        name=task.name,
        version="test",
        loss=task.loss,
        primary=task.primary,
        harmful=harmful,
        attack=task.attack,
        eval_primary=task.eval_primary,
        eval_harmful=task.eval_harmful,
    )


@pytest.mark.parametrize("name", ["opt_kappa", "imma"])
def test_deep_fit_returns_a_new_model_and_leaves_the_input_untouched(name: str) -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    before = _state(m0)
    d = DEFENSES.get(name)(epochs=2)
    out = d.fit(m0, task, seed=0)
    assert isinstance(out, BNMLP) and not isinstance(out, LinearModel) and out is not m0
    assert all(torch.equal(v, before[k]) for k, v in _state(m0).items())
    after = _state(out)
    assert not torch.equal(after["extractor.3.weight"], before["extractor.3.weight"])
    for key in ("extractor.0.weight", "extractor.1.running_mean", "extractor.1.running_var"):
        assert torch.equal(after[key], before[key]), key  # frozen block, BatchNorm statistics
    assert d.info_["variant"] == "deep" and len(d.history_) == d.info_["steps"] == 2 * (150 // 64)
    assert all(math.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in d.history_)
    a = DEFENSES.get(name)(epochs=2).fit(m0, task, seed=0)
    b = DEFENSES.get(name)(epochs=2).fit(m0, task, seed=1)
    assert all(torch.equal(v, _state(a)[k]) for k, v in after.items())
    assert not torch.equal(_state(b)["extractor.3.weight"], after["extractor.3.weight"])


# ---------------------------------------------------------------------------------------------
# Opt-κ
# ---------------------------------------------------------------------------------------------


def test_opt_kappa_balances_its_terms_and_records_the_log_kappas() -> None:
    task = three_class_task(n=200)
    d = DEFENSES.get("opt_kappa")(epochs=1, primary_grad_ratio=0.3)
    d.fit(pretrained(task, dtype=F64), task, seed=0)
    info, first = d.info_, d.history_[0]
    assert info["grad_norm_primary"] == pytest.approx(0.3 * info["grad_norm_task"], rel=1e-12)
    assert info["grad_norm_harmful"] == pytest.approx(info["grad_norm_primary"], rel=1e-12)
    assert info["lambda_primary"] * info["grad_norm_log_kappa_raw"] == pytest.approx(
        info["grad_norm_primary"]
    )
    # R_P is the batch's log κ(S_P) and R_H = 1/log κ(S_H), both by the factor rank rule
    assert first["r_log_kappa"] == pytest.approx(first["log_kappa_primary"], rel=1e-12)
    assert first["r_inv_log_kappa"] == pytest.approx(1.0 / first["log_kappa_harmful"], rel=1e-12)
    total = first["task_loss"] + first["reg_primary"] + first["reg_harmful"]
    assert first["loss"] == pytest.approx(total, rel=1e-12)
    assert info["log_kappa_floor_hits"] == 0


def test_opt_kappa_raises_the_harmful_kappa_and_keeps_the_primary_one() -> None:
    """Measured on this MLP (seed 0, lr 0.05, 20 epochs, default ρ): (i) = 62, (ii) = 0.55."""
    task = three_class_task()
    m0 = pretrained(task)
    m = DEFENSES.get("opt_kappa")(lr=0.05, epochs=20).fit(m0, task, seed=0)
    ratio_h = kappa_features(m, task.harmful.x) / kappa_features(m0, task.harmful.x)
    ratio_p = kappa_features(m, task.primary.x) / kappa_features(m0, task.primary.x)
    assert ratio_h > 8.0 and ratio_p <= 1.0


# ---------------------------------------------------------------------------------------------
# IMMA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [1e3, 1e-3], ids=["free", "clipped"])
def test_imma_first_step_is_the_documented_outer_update(clip: float) -> None:
    """One step, no momentum or weight decay: Δθ = −η·g·min(1, clip/‖g‖) with g = ∇[L_task − λ_adv L_H(w_1)].

    w_1 is one GD step of a zero head on the detached harmful features, recomputed here by autograd.
    """
    task = three_class_task(n=200)
    harmful = Dataset(task.harmful.x[:64], task.harmful.y[:64], task.harmful.ids[:64])
    task1 = _with_harmful(task, harmful)  # 64 harmful rows: exactly one step
    m0 = pretrained(task, dtype=F64)
    kw = {"lr": 0.1, "momentum": 0.0, "weight_decay_head": 0.0, "inner_lr": 0.3, "adv_weight": 2.0}
    d = DEFENSES.get("imma")(**kw, clip=clip)
    out = d.fit(m0, task1, seed=0)
    assert len(d.history_) == 1
    m = copy.deepcopy(m0)
    names = d.info_["trainable_parameters"]
    params = [p for n, p in m.named_parameters() if n in names]
    idx_p, idx_h = d.info_["first_batch"]["primary"], d.info_["first_batch"]["harmful"]
    with training_configuration(m, set(names)):
        phi_p, phi_h = m.features(task1.primary.x[idx_p]), m.features(task1.harmful.x[idx_h])
        y_h = task1.harmful.y[idx_h]
        w = torch.zeros(12, 3, dtype=F64, requires_grad=True)
        (g_w,) = torch.autograd.grad(nn.functional.cross_entropy(phi_h.detach() @ w, y_h), w)
        w1 = (w - 0.3 * g_w).detach()
        task_loss = nn.functional.cross_entropy(m.head(phi_p), task1.primary.y[idx_p], label_smoothing=0.1)
        harm = nn.functional.cross_entropy(phi_h @ w1, y_h)
        grads = torch.autograd.grad(task_loss - 2.0 * harm, params)
    norm = _norm(grads)
    assert d.history_[0]["grad_norm"] == pytest.approx(norm, rel=1e-10)
    assert d.history_[0]["clipped"] == float(norm > clip)
    assert d.history_[0]["harmful_loss"] == pytest.approx(float(harm.detach()), rel=1e-12)
    scale = 0.1 * min(1.0, clip / norm)
    new = dict(out.named_parameters())
    for (name, p0), g in zip([(n, p) for n, p in m0.named_parameters() if n in names], grads, strict=True):
        assert torch.allclose(new[name].detach(), p0.detach() - scale * g, rtol=1e-9, atol=1e-12), name


def test_imma_inner_head_lowers_the_harmful_loss_every_step() -> None:
    task = three_class_task(n=200)
    d = DEFENSES.get("imma")(epochs=2, inner_lr=0.5, inner_steps=3)
    d.fit(pretrained(task), task, seed=0)
    assert d.info_["inner_steps"] == 3 and d.info_["inner_lr"] == 0.5 and d.info_["adv_weight"] == 1.0
    for row in d.history_:
        assert row["inner_loss_start"] == pytest.approx(math.log(3.0), rel=1e-12)  # zero head, 3 classes
        assert row["inner_loss_end"] < row["inner_loss_start"] - 1e-3


def test_imma_needs_harmful_labels() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    unlabelled = Dataset(task.harmful.x, torch.full_like(task.harmful.y, -1), task.harmful.ids)
    with pytest.raises(ConfigError, match=r"imma needs harmful labels.*150 harmful row\(s\).*negative"):
        DEFENSES.get("imma")().fit(m0, _with_harmful(task, unlabelled), seed=0)
    no_columns = Dataset(task.harmful.x, torch.zeros(len(task.harmful), 0), task.harmful.ids)
    mse = Task(
        name="mse",
        version="test",
        loss="mse",
        primary=Dataset(task.primary.x, task.primary.y.to(F64)[:, None], task.primary.ids),
        harmful=no_columns,
        attack=no_columns,
        eval_primary=Dataset(
            task.eval_primary.x, task.eval_primary.y.to(F64)[:, None], task.eval_primary.ids
        ),
        eval_harmful=Dataset(
            task.eval_harmful.x, torch.zeros(len(task.eval_harmful), 0), task.eval_harmful.ids
        ),
    )
    with pytest.raises(ConfigError, match=r"imma needs harmful labels.*shape \(150, 0\)"):
        DEFENSES.get("imma")().fit(m0, mse, seed=0)


def test_bad_deep_settings_are_config_errors() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    for name in ("opt_kappa", "imma"):
        with pytest.raises(ConfigError, match="batch_size must be >= 2, got 1"):
            DEFENSES.get(name)(batch_size=1)
        with pytest.raises(ConfigError, match="epochs must be >= 1, got 0"):
            DEFENSES.get(name)(epochs=0)
        one = _with_harmful(task, Dataset(task.harmful.x[:1], task.harmful.y[:1], task.harmful.ids[:1]))
        with pytest.raises(ConfigError, match="harmful mini-batch has 1 row"):
            DEFENSES.get(name)().fit(m0, one, seed=0)
        with pytest.raises(ConfigError, match=r"k=4 blocks requested"):
            DEFENSES.get(name)(blocks=4).fit(m0, task, seed=0)
    with pytest.raises(ConfigError, match="per_step"):
        DEFENSES.get("opt_kappa")(balance="per_step").fit(m0, task, seed=0)
    with pytest.raises(ConfigError, match=r"imma.clip must be > 0, got 0"):
        DEFENSES.get("imma")(clip=0.0)

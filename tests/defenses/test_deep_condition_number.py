"""The deep-network variant of condition-number immunization (methods/condition_number.md §6, §7.3, §12).

A tiny MLP (Linear → BatchNorm → tanh → Linear → tanh, linear head) is pre-trained on the primary
domain of a three-class two-domain task: primary inputs vary along the first four coordinates,
harmful inputs along the last four, so the last block can shrink harmful feature directions without
touching primary ones. ``condition_number`` then trains the last block and the head.

Measured (seed 0; lr 0.05, 20 epochs, λ_P = 1e-4, λ_H balanced): batch-independent κ of the
features over the whole harmful training split × 206 ((i) = 206, ln 5.33), primary (ii) = 0.71,
held-out primary accuracy 0.947 against θ_0's 0.973. Seeds 1 and 2: (i) = 107 and 133, (ii) = 0.36
and 0.49, accuracy 0.940 and 0.947. The bounds below are about half of the weakest effect in log
space, (ii) ≤ 1 (condition (b)) and an accuracy drop of at most 5 points. Controls: without R_ill
(λ_H = 0) (i) = 2.5; with the task term alone (i) = 1.04. A fixed λ_P = 1 (the linear default, and
the deep default before the task-gradient rule) is far too strong for this model (accuracy 0.32);
the deep default now derives λ_P from the task gradient at θ_0 (test_deep_lambda_rule.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import immunekit
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.deep import (
    batch_plan,
    gram,
    group_features,
    r_ill_of_factor,
    rir_theta0,
    training_configuration,
)
from immunekit.errors import ConfigError, NumericalError
from immunekit.models.base import ImmunizableModel, LinearModel, linear_model
from immunekit.spectral.rank import FactorSpectrum
from immunekit.spectral.regularizers import r_ill_autograd, r_well_autograd

F64 = torch.float64
FIT = {"lr": 0.05, "epochs": 20, "lambda_primary": 1e-4}
FROZEN = ("extractor.0.", "extractor.1.")  # the first Linear and the BatchNorm


class BNMLP(ImmunizableModel):
    """Linear(8, 16) → BatchNorm1d → tanh → Linear(16, 12) → tanh; head Linear(12, 3). Blocks: 0, 1, 3."""

    extractor: nn.Sequential

    def __init__(self, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.extractor = nn.Sequential(
            nn.Linear(8, 16, dtype=dtype),
            nn.BatchNorm1d(16, dtype=dtype),
            nn.Tanh(),
            nn.Linear(16, 12, dtype=dtype),
            nn.Tanh(),
        )
        self.head = nn.Linear(12, 3, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / math.sqrt(p.shape[-1]))
            bn = self.extractor[1]
            assert isinstance(bn, nn.BatchNorm1d)
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(0.1 * torch.randn(16, generator=g, dtype=dtype))
            bn.running_var.copy_(1.0 + torch.rand(16, generator=g, dtype=dtype))


def _domain(n: int, gen: torch.Generator, prefix: str) -> Dataset:
    scale = torch.full((8,), 0.1, dtype=F64)
    if prefix == "p":
        scale[:4] = 1.0
    else:
        scale[4:] = 1.0
    x = torch.randn(n, 8, generator=gen, dtype=F64) * scale
    y = (x @ torch.randn(8, 3, generator=gen, dtype=F64)).argmax(1)
    return Dataset(x, y, tuple(f"{prefix}:{i}" for i in range(n)))


def three_class_task(n: int = 600, seed: int = 0) -> Task:
    """Two domains of 8-d inputs, 3 classes each; 3/4 of the rows train, the rest is held out."""
    gen = torch.Generator().manual_seed(seed)
    p, h = _domain(n, gen, "p"), _domain(n, gen, "h")
    k = 3 * n // 4

    def cut(d: Dataset, a: int, b: int) -> Dataset:
        return Dataset(d.x[a:b], d.y[a:b], d.ids[a:b])

    return Task(
        name="three_class",
        version="test",
        loss="ce",
        primary=cut(p, 0, k),
        harmful=cut(h, 0, k),
        attack=cut(h, 0, k),
        eval_primary=cut(p, k, n),
        eval_harmful=cut(h, k, n),
    )


def pretrained(task: Task, *, dtype: torch.dtype = torch.float32) -> BNMLP:
    """θ_0: the whole MLP trained on the primary domain (full batch, 200 steps), left in eval mode."""
    m = BNMLP(dtype=dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = task.primary.x.to(dtype), task.primary.y
    m.train()
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def kappa_features(model: ImmunizableModel, x: Tensor) -> float:
    """Batch-independent κ(ΦᵀΦ) of the features of all rows ``x`` (eval mode, factor rank rule)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        phi = model.features(x.to(next(model.parameters()).dtype)).to(F64)
    model.train(was)
    return FactorSpectrum.of(phi).kappa().kappa


def accuracy(model: ImmunizableModel, data: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(data.x.to(next(model.parameters()).dtype)).argmax(1)
    return float((pred == data.y).double().mean())


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def setup() -> dict[str, object]:
    task = three_class_task()
    model0 = pretrained(task)
    defense = DEFENSES.get("condition_number")(**FIT)
    before = _state(model0)
    model = defense.fit(model0, task, seed=0)
    return {"task": task, "model0": model0, "before": before, "model": model, "defense": defense}


# ---------------------------------------------------------------------------------------------
# (a) behaviour
# ---------------------------------------------------------------------------------------------


def test_deep_fit_raises_harmful_kappa_and_keeps_the_primary_task(setup: dict) -> None:
    task, m0, m = setup["task"], setup["model0"], setup["model"]
    ratio_h = kappa_features(m, task.harmful.x) / kappa_features(m0, task.harmful.x)
    ratio_p = kappa_features(m, task.primary.x) / kappa_features(m0, task.primary.x)
    assert math.log(ratio_h) >= 2.3  # (i) ≥ 10; measured 206 (107 at worst over seeds 0-2)
    assert ratio_p <= 1.0  # (ii): measured 0.71 (0.36-0.71)
    acc0, acc1 = accuracy(m0, task.eval_primary), accuracy(m, task.eval_primary)
    assert acc0 >= 0.95  # θ_0 is a good primary model (0.973)
    assert acc1 >= acc0 - 0.05  # measured 0.947


def test_the_harmful_kappa_rise_comes_from_r_ill(setup: dict) -> None:
    """Control: the same fit with λ_H = 0 (task + R_well) raises κ over D_H only 2.5× (measured)."""
    task, m0 = setup["task"], setup["model0"]
    m = DEFENSES.get("condition_number")(**FIT, lambda_harmful=0.0).fit(m0, task, seed=0)
    ratio_h = kappa_features(m, task.harmful.x) / kappa_features(m0, task.harmful.x)
    assert ratio_h <= 10.0  # with R_ill: 206


def test_deep_fit_records_history_and_info(setup: dict) -> None:
    d = setup["defense"]
    info, hist = d.info_, d.history_
    assert info["variant"] == "deep"
    assert info["trainable_parameters"] == [
        "extractor.3.weight",
        "extractor.3.bias",
        "head.weight",
        "head.bias",
    ]
    assert info["trainable_blocks"] == ["extractor.3"]
    assert info["batches_per_epoch"] == 450 // 64 and info["steps"] == 20 * (450 // 64) == len(hist)
    assert info["batchnorm_layers_frozen"] == 1
    assert info["task_loss"] == "cross-entropy with label smoothing 0.1"
    assert info["lambda_primary"] == 1e-4 and info["lambda_harmful_source"] == "balanced"
    keys = {"loss", "task_loss", "r_well", "r_ill", "reg_primary", "reg_harmful", "kappa_primary"}
    assert keys | {"kappa_harmful", "lr", "rank_harmful"} <= set(hist[0])
    for row in hist:
        assert row["lr"] == 0.05
        total = row["task_loss"] + row["reg_primary"] + row["reg_harmful"]
        assert row["loss"] == pytest.approx(total, rel=1e-12)
        assert row["rank_harmful"] <= 12
    # The batch κ(S_H) rises over the fit.
    assert hist[-1]["log_kappa_harmful"] > hist[0]["log_kappa_harmful"] + 1.0


def test_immunize_dispatches_on_the_model_type() -> None:
    task = three_class_task(n=200)
    deep = immunekit.immunize(pretrained(task), task, "condition_number", epochs=1, lambda_primary=1e-4)
    assert isinstance(deep, BNMLP)
    lin_task = gaussian_spectra(dim=4, n=40, seed=0)
    lin = immunekit.immunize(linear_model(4), lin_task, "condition_number", steps=2)
    assert isinstance(lin, LinearModel)


# ---------------------------------------------------------------------------------------------
# (b) frozen parts, modes and the input
# ---------------------------------------------------------------------------------------------


def test_frozen_blocks_and_batchnorm_statistics_are_bit_identical(setup: dict) -> None:
    before, m0, m = setup["before"], setup["model0"], setup["model"]
    after = _state(m)
    frozen = [k for k in before if k.startswith(FROZEN)]
    assert {"extractor.1.running_mean", "extractor.1.running_var", "extractor.1.num_batches_tracked"} <= set(
        frozen
    )
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["extractor.3.weight"], before["extractor.3.weight"])
    assert not torch.equal(after["head.weight"], before["head.weight"])
    # The input model is untouched and shares no storage with the output.
    for key, value in _state(m0).items():
        assert torch.equal(value, before[key]), key
    assert m is not m0
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.parameters(), m0.parameters(), strict=True))


def test_mode_and_requires_grad_flags_are_restored() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    m0.train()
    m0.extractor[0].weight.requires_grad_(False)
    out = DEFENSES.get("condition_number")(epochs=1, lambda_primary=1e-4).fit(m0, task, seed=0)
    assert all(a.training == b.training for a, b in zip(out.modules(), m0.modules(), strict=True))
    assert out.extractor[1].training  # BatchNorm back in train mode, as it came in
    flags = [p.requires_grad for p in out.parameters()]
    assert flags == [p.requires_grad for p in m0.parameters()]
    assert all(p.grad is None for p in out.parameters())


def test_training_configuration_keeps_batchnorm_in_eval() -> None:
    m = BNMLP().eval()
    with training_configuration(m, {"head.weight"}):
        assert m.training and m.extractor[3].training and not m.extractor[1].training
        assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.weight"]
    assert not any(mod.training for mod in m.modules())
    assert all(p.requires_grad for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# (c) determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_another_seed_differs() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    fit = {"epochs": 2, "lambda_primary": 1e-4}
    a = DEFENSES.get("condition_number")(**fit).fit(m0, task, seed=3)
    b = DEFENSES.get("condition_number")(**fit).fit(m0, task, seed=3)
    c = DEFENSES.get("condition_number")(**fit).fit(m0, task, seed=4)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["extractor.3.weight"], sc["extractor.3.weight"])


# ---------------------------------------------------------------------------------------------
# (d) λ balancing
# ---------------------------------------------------------------------------------------------


def test_lambda_h_balances_the_gradient_norms_at_theta0() -> None:
    """Recomputed independently on the first batch pair with the library's r_ill_autograd (float64)."""
    task = three_class_task(n=200)
    m0 = pretrained(task, dtype=F64)
    d = DEFENSES.get("condition_number")(epochs=1, lambda_primary=0.5)
    d.fit(m0, task, seed=0)
    info = d.info_
    assert info["grad_norm_primary"] == pytest.approx(info["grad_norm_harmful"], rel=1e-10)
    assert info["lambda_harmful"] == pytest.approx(
        0.5 * info["grad_norm_well_raw"] / info["grad_norm_ill_raw"]
    )

    m = copy.deepcopy(m0)
    names = info["trainable_parameters"]
    params = [p for n, p in m.named_parameters() if n in names]
    idx_p, idx_h = info["first_batch"]["primary"], info["first_batch"]["harmful"]
    with training_configuration(m, set(names)):
        phi_p, phi_h = m.features(task.primary.x[idx_p]), m.features(task.harmful.x[idx_h])
        g_well = torch.autograd.grad(r_well_autograd(phi_p.T @ phi_p), params, allow_unused=True)
        g_ill = torch.autograd.grad(r_ill_autograd(phi_h.T @ phi_h), params, allow_unused=True)

    def norm(gs: tuple) -> float:
        return math.sqrt(sum(float((g**2).sum()) for g in gs if g is not None))

    assert info["lambda_harmful"] * norm(g_ill) == pytest.approx(0.5 * norm(g_well), rel=1e-10)


def test_r_ill_of_factor_matches_r_ill_autograd_in_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(20, 6, generator=g, dtype=F64) * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.2], dtype=F64)
    a = phi.clone().requires_grad_(True)
    b = phi.clone().requires_grad_(True)
    va, floored = r_ill_of_factor(a, FactorSpectrum.of(phi).rank)
    vb = r_ill_autograd(gram(b))
    assert not floored
    assert float(va.detach()) == pytest.approx(float(vb.detach()), rel=1e-10)
    (ga,) = torch.autograd.grad(va, a)
    (gb,) = torch.autograd.grad(vb, b)
    assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12 * float(gb.abs().max()))


def test_an_explicit_lambda_h_overrides_the_balance() -> None:
    task = three_class_task(n=200)
    d = DEFENSES.get("condition_number")(epochs=1, lambda_primary=1e-4, lambda_harmful=7.0)
    d.fit(pretrained(task), task, seed=0)
    assert d.info_["lambda_harmful"] == 7.0 and d.info_["lambda_harmful_source"] == "config"


# ---------------------------------------------------------------------------------------------
# (e) rill_only
# ---------------------------------------------------------------------------------------------


def test_rill_only_on_a_deep_model_has_no_r_well_term() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    lam_h = 50.0
    d = DEFENSES.get("rill_only")(epochs=2, lambda_harmful=lam_h)
    out = d.fit(m0, task, seed=1)
    assert d.info_["lambda_primary"] == 0.0 and not d.info_["uses_primary_term"]
    for row in d.history_:
        assert row["reg_primary"] == 0.0
        assert row["loss"] == pytest.approx(row["task_loss"] + row["reg_harmful"], rel=1e-12)
    # The same fit as condition_number with λ_P = 0: R_well contributes nothing at all.
    ref = DEFENSES.get("condition_number")(epochs=2, lambda_primary=0.0, lambda_harmful=lam_h).fit(
        m0, task, seed=1
    )
    so, sr = _state(out), _state(ref)
    assert all(torch.equal(so[k], sr[k]) for k in so)


# ---------------------------------------------------------------------------------------------
# (f) the LinearModel path is unchanged
# ---------------------------------------------------------------------------------------------


def test_linear_model_still_runs_algorithm_1() -> None:
    """The bit-for-bit check against the pre-dispatch code is the tests in tests/defenses."""
    task = gaussian_spectra(dim=6, n=64, cond_primary=20.0, cond_harmful=5.0, seed=3)
    for name in ("condition_number", "rill_only"):
        d = DEFENSES.get(name)(steps=3)
        out = d.fit(linear_model(6), task, seed=0)
        assert isinstance(out, LinearModel)
        assert "tau_harmful" in d.history_[0] and "rank_rule" in d.info_ and "variant" not in d.info_


# ---------------------------------------------------------------------------------------------
# RIR_θ0 groups from models (§7.3)
# ---------------------------------------------------------------------------------------------


def test_group_features_draws_the_same_disjoint_groups_for_both_models() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    m0.train()
    twin = copy.deepcopy(m0)
    ref, imm = group_features(m0, twin, task.harmful.x, groups=3, per_group=40, seed=5)
    assert len(ref) == len(imm) == 3 and all(r.shape == (40, 12) and r.dtype == F64 for r in ref)
    assert all(torch.equal(a, b) for a, b in zip(ref, imm, strict=True))  # same rows, eval mode
    assert m0.training and twin.training  # modes restored
    res = rir_theta0(m0, twin, task, groups=3, per_group=40, seed=5)
    assert res.rir.values == (1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="fewer groups"):
        group_features(m0, twin, task.harmful.x, groups=20, per_group=100)


def test_rir_theta0_of_the_deep_fit(setup: dict) -> None:
    task, m0, m = setup["task"], setup["model0"], setup["model"]
    res = rir_theta0(m0, m, task, groups=4, per_group=100, seed=0)
    assert res.kappa_ratio_harmful.mean > 10.0
    assert res.kappa_ratio_primary.mean <= 1.0
    assert res.rir.mean > 10.0


# ---------------------------------------------------------------------------------------------
# (h) bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        DEFENSES.get("condition_number")(batch_size=1)
    with pytest.raises(ConfigError, match="harmful mini-batch has 1 row"):
        batch_plan(1, 50, 64)
    one = Task(
        name="one",
        version="test",
        loss="ce",
        primary=task.primary,
        harmful=Dataset(task.harmful.x[:1], task.harmful.y[:1], task.harmful.ids[:1]),
        attack=task.attack,
        eval_primary=task.eval_primary,
        eval_harmful=task.eval_harmful,
    )
    with pytest.raises(ConfigError, match="harmful mini-batch has 1 row"):
        DEFENSES.get("condition_number")().fit(m0, one, seed=0)
    with pytest.raises(ConfigError, match=r"k=4 blocks requested.*3 block"):
        DEFENSES.get("condition_number")(blocks=4).fit(m0, task, seed=0)
    with pytest.raises(ConfigError, match="blocks must be >= 1"):
        DEFENSES.get("condition_number")(blocks=0)
    with pytest.raises(ConfigError, match="epochz: unknown key; did you mean 'epochs'"):
        DEFENSES.get("condition_number")(epochz=2)
    with pytest.raises(ConfigError, match="per_step"):
        DEFENSES.get("condition_number")(balance="per_step").fit(m0, task, seed=0)


def test_a_non_finite_loss_stops_with_the_step_named() -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    before = _state(m0)
    with pytest.raises(NumericalError, match="non-finite loss at step 0"):
        DEFENSES.get("condition_number")(lambda_harmful=float("inf")).fit(m0, task, seed=0)
    with pytest.raises(NumericalError, match=r"non-finite (loss|gradient|parameters).* step \d+"):
        DEFENSES.get("condition_number")(lr=1e30, lambda_primary=1.0, epochs=3).fit(m0, task, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in _state(m0).items())

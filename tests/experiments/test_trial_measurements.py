"""One trial's measurements: the rank rule's κ, shared reference measurements, shared solves, timings.

``kappa_pair`` decides rank K on the singular values of the data factor X and computes κ(θᵀKθ) from
the thin factor F·θ with that rank fixed (spectral.rank); ``run_trial`` measures θ_0 once
per task object (``_REFERENCES``) and shares features and least-squares factorizations between the
closed-form losses and the attacks. Each is checked against the computation it replaces.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import immunekit.attacks.linear_probe as lp
import immunekit.experiments.linear as linear
from immunekit.config import read_yaml
from immunekit.data.synthetic import gaussian_spectra
from immunekit.experiments import default_config_path
from immunekit.experiments.linear import build_config, kappa_pair, probe_test_loss, run_trial
from immunekit.metrics import KappaPair, rir
from immunekit.models.base import linear_model
from immunekit.spectral import default_rtol, gram_condition_number
from immunekit.spectral.lstsq import MinNormLstsq

F64 = torch.float64


def _direct_kappa_pair(theta: torch.Tensor, x_h: torch.Tensor, x_p: torch.Tensor) -> KappaPair:
    """κ(θᵀXᵀXθ) from the full product X·θ ``(N, D_hid)``, with the rank decided on X by the rule."""

    def one(x: torch.Tensor) -> object:
        rank = gram_condition_number(x).rank  # the rule on X: r = #{s_i > max(N, D)·eps·s_1}
        return gram_condition_number(x @ theta, rank=rank, rtol=default_rtol(*x.shape))

    return KappaPair(one(x_h), one(x_p))


def _old_probe_test_loss(model, task, split, eval_split):
    """probe_test_loss before the shared factorization: w = pinv(A) Y."""
    prob = lp.probe_problem(model, task, split, eval_split)
    w = torch.linalg.pinv(prob.a, rtol=default_rtol(*prob.a.shape)) @ prob.y
    pred = prob.eval_a @ w
    return float(((pred - prob.eval_y) ** 2).mean()), (
        lp.accuracy(pred, prob.eval_y) if prob.classes else None
    )


def _with_null_directions(x: torch.Tensor) -> torch.Tensor:
    """Append a constant column, a copy of column 0 and a zero column (MNIST-like rank deficiency)."""
    n = x.shape[0]
    return torch.cat([x, torch.full((n, 1), 0.7, dtype=F64), x[:, :1], torch.zeros(n, 1, dtype=F64)], dim=1)


def _rank_deficient_factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_h = _with_null_directions(torch.randn(80, 7, generator=g, dtype=F64))
    x_p = _with_null_directions(
        torch.randn(80, 7, generator=g, dtype=F64) * torch.logspace(0, -2, 7, dtype=F64)
    )
    return x_h, x_p


def _theta(d_in: int, d_hid: int, log_kappa: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(d_hid, d_hid, generator=g, dtype=F64))
    p = min(d_in, d_hid)
    s = torch.logspace(0.0, -log_kappa, p, dtype=F64)
    return (u[:, :p] * s) @ v[:, :p].T


# ---------------------------------------------------------------------------------------------
# κ from thin factors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d_hid", "log_kappa"),
    [(10, 0.0), (10, 2.0), (10, 4.0), (6, 1.0), (14, 1.0)],
    ids=["identity-like", "kappa-1e2", "kappa-1e4", "narrow-theta", "wide-theta"],
)
def test_kappa_pair_from_the_thin_factor_equals_the_full_product(d_hid: int, log_kappa: float) -> None:
    x_h, x_p = _rank_deficient_factors()
    theta = torch.eye(10, dtype=F64) if log_kappa == 0.0 else _theta(10, d_hid, log_kappa, seed=1)
    new, ref_pair = kappa_pair(theta, x_h, x_p), _direct_kappa_pair(theta, x_h, x_p)
    for got, ref in ((new.harmful, ref_pair.harmful), (new.primary, ref_pair.primary)):
        assert (got.rank, got.dim, got.rtol) == (ref.rank, ref.dim, ref.rtol)
        assert got.kappa == pytest.approx(ref.kappa, rel=1e-10)
        assert got.log_kappa == pytest.approx(ref.log_kappa, rel=1e-10, abs=1e-12)
        assert got.sigma_max == pytest.approx(ref.sigma_max, rel=1e-12)
    # rank K_H = 8 (7 + the constant column; the copy and the zero column add nothing), fixed on K
    assert new.harmful.rank == min(8, d_hid)


def test_kappa_pair_of_zero_data_is_infinite_with_rank_zero() -> None:
    zero = torch.zeros(5, 4, dtype=F64)
    pair = kappa_pair(torch.eye(4, dtype=F64), zero, zero)
    assert pair.harmful.rank == pair.primary.rank == 0
    assert pair.harmful.kappa == pair.primary.kappa == float("inf")


# ---------------------------------------------------------------------------------------------
# run_trial against the previous measurements
# ---------------------------------------------------------------------------------------------


def _cfg(methods=("identity", "condition_number"), loss: str = "mse"):
    data = read_yaml(default_config_path("synthetic"))
    data.update(
        task_config={"dim": 6, "n": 64, "cond_primary": 50.0, "cond_harmful": 5.0, "loss": loss},
        seeds=[1],
        methods=list(methods),
        attacks=[
            {"key": "gd_exact", "optimizer": "gd_exact", "steps": 20},
            {"key": "adam", "optimizer": "adam", "steps": 20, "lr": 0.01, "batch_size": 16},
        ],
    )
    return build_config(data)


@pytest.fixture
def fresh_references(monkeypatch: pytest.MonkeyPatch) -> linear._ReferenceCache:
    cache = linear._ReferenceCache()
    monkeypatch.setattr(linear, "_REFERENCES", cache)
    return cache


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_trial_metrics_equal_the_previous_measurements(fresh_references, loss: str) -> None:
    cfg = _cfg(loss=loss)
    task = linear.task_for(cfg, 1)
    x_h, x_p = task.harmful.x, task.primary.x
    for method in cfg.methods:
        record = run_trial(cfg, method, 1, task)
        m = record["metrics"]
        defense = linear.DEFENSES.get(method.defense)(**method.overrides)
        model0 = linear_model(task.input_dim)
        immunized = defense.fit(model0, task, seed=1)
        parts = rir(_direct_kappa_pair(model0.theta, x_h, x_p), _direct_kappa_pair(immunized.theta, x_h, x_p))
        for key, value in parts.to_dict().items():
            assert m[key] == pytest.approx(float(value), rel=1e-10), key
        ref_mse, ref_acc = _old_probe_test_loss(model0, task, "primary", "eval_primary")
        imm_mse, imm_acc = _old_probe_test_loss(immunized, task, "primary", "eval_primary")
        harm_mse, harm_acc = _old_probe_test_loss(immunized, task, "attack", "eval_harmful")
        assert m["primary_test_mse_reference"] == pytest.approx(ref_mse, rel=1e-12)
        assert m["primary_test_mse"] == pytest.approx(imm_mse, rel=1e-12)
        assert m["harmful_test_mse_closed_form"] == pytest.approx(harm_mse, rel=1e-12)
        if loss == "ce":
            assert (m["primary_test_accuracy_reference"], m["primary_test_accuracy"]) == (ref_acc, imm_acc)
            assert m["harmful_test_accuracy_closed_form"] == harm_acc
        else:
            assert "primary_test_accuracy" not in m
        # the attacks through the trial's shared cache give what a lone attack gives
        for spec in cfg.attacks:
            alone = linear.ATTACKS.get("linear_probe")(split="attack")(immunized, task, spec.budget(), seed=1)
            assert record["curves"][f"harmful.{spec.key}"]["norm_ratio"] == alone.curve("norm_ratio")
        if method.key == "identity":
            assert m["rir"] == 1.0 and m["primary_test_mse"] == m["primary_test_mse_reference"]


def test_trial_records_its_timings_beside_defense_seconds(fresh_references) -> None:
    cfg = _cfg(methods=("identity",))
    record = run_trial(cfg, cfg.methods[0], 1, linear.task_for(cfg, 1))
    keys = list(record["metrics"])
    i = keys.index("defense_seconds")
    assert keys[i : i + 3] == ["defense_seconds", "measure_seconds", "attack_seconds"]
    for key in keys[i : i + 3]:
        assert isinstance(record["metrics"][key], float) and record["metrics"][key] >= 0.0


# ---------------------------------------------------------------------------------------------
# No repeated work
# ---------------------------------------------------------------------------------------------


def _count(monkeypatch: pytest.MonkeyPatch, owner, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_reference_is_measured_once_per_task_and_solves_are_shared(fresh_references, monkeypatch) -> None:
    cfg = _cfg(methods=("identity", "condition_number", "imma"))
    task = linear.task_for(cfg, 1)
    refs = _count(monkeypatch, linear._Reference, "of")
    features = _count(monkeypatch, lp, "probe_problem")
    solves = _count(monkeypatch, MinNormLstsq, "of")
    run_trial(cfg, cfg.methods[1], 1, task)  # condition_number first: makes the reference
    # θ_0 on primary (reference); θ_I on primary and attack; 4 attacks + 2 closed forms share them
    assert (refs[0], features[0], solves[0]) == (1, 3, 3)
    run_trial(cfg, cfg.methods[2], 1, task)
    assert (refs[0], features[0], solves[0]) == (1, 5, 5)  # no new reference
    run_trial(cfg, cfg.methods[0], 1, task)
    # identity: θ = θ_0, so its primary problem is the reference's; only the attack split is new
    assert (refs[0], features[0], solves[0]) == (1, 6, 6)


def test_references_never_answer_for_another_or_a_modified_task(fresh_references, monkeypatch) -> None:
    refs = _count(monkeypatch, linear._Reference, "of")
    t1 = gaussian_spectra(dim=5, n=48, cond_primary=20.0, seed=1)
    t2 = gaussian_spectra(dim=5, n=48, cond_primary=20.0, seed=1)  # equal data, another object
    r1 = fresh_references.get(t1)
    assert fresh_references.get(t1) is r1 and refs[0] == 1
    r2 = fresh_references.get(t2)
    assert r2 is not r1 and refs[0] == 2
    assert r2.kappa == r1.kappa  # the same numbers for the same data
    t1.primary.x.mul_(3.0)  # in place: the stored measurements no longer describe t1
    r1b = fresh_references.get(t1)
    assert r1b is not r1 and refs[0] == 3
    old_mse = _old_probe_test_loss(linear_model(5), t1, "primary", "eval_primary")[0]
    assert r1b.primary[0] == pytest.approx(old_mse, rel=1e-12)
    assert r1b.primary[0] != pytest.approx(r1.primary[0], rel=1e-6)  # scaling the inputs changed it
    old = _direct_kappa_pair(torch.eye(5, dtype=F64), t1.harmful.x, t1.primary.x)
    assert r1b.kappa.primary.kappa == pytest.approx(old.primary.kappa, rel=1e-10)


def test_reference_cache_is_bounded_and_drops_freed_tasks(fresh_references) -> None:
    tasks = [gaussian_spectra(dim=4, n=32, seed=s) for s in range(3)]
    for t in tasks:
        fresh_references.get(t)
    assert len(fresh_references) == fresh_references.size == 2
    alive = weakref.ref(tasks[2])
    del tasks, t
    gc.collect()
    assert alive() is None  # the cache kept no task alive ...
    assert len(fresh_references) == 0  # ... and forgot the freed ones


def test_reference_values_are_those_of_theta0(fresh_references) -> None:
    task = gaussian_spectra(dim=6, n=64, cond_primary=30.0, cond_harmful=3.0, seed=2)
    ref = fresh_references.get(task)
    x_h, x_p = task.harmful.x, task.primary.x
    old = _direct_kappa_pair(torch.eye(6, dtype=F64), x_h, x_p)
    assert ref.kappa.harmful.kappa == pytest.approx(old.harmful.kappa, rel=1e-10)
    assert ref.kappa.primary.kappa == pytest.approx(old.primary.kappa, rel=1e-10)
    assert ref.primary[0] == pytest.approx(
        _old_probe_test_loss(linear_model(6), task, "primary", "eval_primary")[0], rel=1e-12
    )
    assert ref.primary == probe_test_loss(linear_model(6), task, "primary", "eval_primary")
    other = linear_model(6)
    with torch.no_grad():
        other.extractor.weight.mul_(0.5)
    assert ref.kappa_of(linear_model(6)) is ref.kappa
    assert ref.kappa_of(other) == kappa_pair(other.theta, x_h, x_p)


def test_cached_and_uncached_trials_give_the_same_record(monkeypatch) -> None:
    cfg = _cfg(methods=("identity", "opt_kappa"))
    task = linear.task_for(cfg, 1)

    def without_caches(method):
        monkeypatch.setattr(linear, "_REFERENCES", linear._ReferenceCache())
        return run_trial(cfg, method, 1, task)

    for method in cfg.methods:
        fresh = without_caches(method)
        warm = run_trial(cfg, method, 1, task)  # the same cache again: reference reused
        strip = lambda r: {k: v for k, v in r["metrics"].items() if not k.endswith("_seconds")}  # noqa: E731
        assert strip(warm) == strip(fresh)
        assert warm["curves"] == fresh["curves"]

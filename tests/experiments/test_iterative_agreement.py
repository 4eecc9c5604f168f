"""The iterative spectral path (spectral.solver = lanczos) against the dense reference path.

Default run: a synthetic task with a rank-deficient K (seconds). Slow + assets: house prices and
five MNIST pairs (``pytest -m "slow and assets" tests/experiments/test_iterative_agreement.py``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from immunekit.config import read_yaml
from immunekit.data.synthetic import gaussian_spectra
from immunekit.defenses import DEFENSES
from immunekit.errors import ConfigError
from immunekit.experiments import default_config_path, linear
from immunekit.models import linear_model

PARTS = ("kappa_ratio_harmful", "kappa_ratio_primary", "rir")
METHODS = ("condition_number", "rill_only", "opt_kappa")


def _log_diffs(a: dict, b: dict) -> dict[str, float]:
    return {k: abs(math.log(a[k]) - math.log(b[k])) for k in PARTS}


def _deficient_task():
    task = gaussian_spectra(dim=40, n=400, cond_primary=1e4, cond_harmful=1e5, seed=3)

    # two constant columns and one duplicate: K_P and K_H singular, as on MNIST
    def fix(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 0] = 0.0
        x[:, 1] = x[:, 2]
        return x

    return dataclasses.replace(
        task,
        primary=dataclasses.replace(task.primary, x=fix(task.primary.x)),
        harmful=dataclasses.replace(task.harmful, x=fix(task.harmful.x)),
        attack=dataclasses.replace(task.attack, x=fix(task.attack.x)),
    )


@pytest.mark.parametrize("name", METHODS)
def test_synthetic_fit_matches_dense_path(name: str) -> None:
    task = _deficient_task()
    fits = {}
    for solver in ("dense", "lanczos"):
        d = DEFENSES.get(name)(steps=25, spectral_solver=solver)
        model = d.fit(linear_model(task.input_dim), task, seed=0)
        fits[solver] = (model.theta, d)
    (t_d, d_d), (t_l, d_l) = fits["dense"], fits["lanczos"]
    stats = d_l.info_["spectral_stats"]
    assert d_l.info_["spectral_solver"] == "lanczos" and stats["calls"] > 0 and stats["iterations"] > 0
    assert stats["fallbacks"] == 0
    assert float((t_l - t_d).norm() / t_d.norm()) < 1e-6
    for a, b in zip(d_d.history_, d_l.history_, strict=True):
        assert a["safeguard_halvings"] == b["safeguard_halvings"]
        assert a["log_kappa_harmful"] == pytest.approx(b["log_kappa_harmful"], rel=1e-7)
        assert a["log_kappa_primary"] == pytest.approx(b["log_kappa_primary"], rel=1e-7)


def test_unknown_solver_gets_did_you_mean() -> None:
    data = read_yaml(default_config_path("mnist_pairs"))
    data["spectral"] = {"solver": "unknown"}
    with pytest.raises(ConfigError, match=r"spectral\.solver: unknown solver 'unknown'"):
        linear.build_config(data)
    data["spectral"] = {"solver": "lanczso"}
    with pytest.raises(ConfigError, match="did you mean 'lanczos'"):
        linear.build_config(data)
    with pytest.raises(ConfigError, match="did you mean 'dense'"):
        DEFENSES.get("condition_number")(spectral_solver="dens")


def test_the_solver_setting_reaches_the_defenses() -> None:
    data = read_yaml(default_config_path("mnist_pairs"))
    assert linear.build_config(data).spectral.solver == "dense"  # the reference path stays the default
    data["spectral"] = {"solver": "lanczos"}
    cfg = linear.build_config(data)
    method = next(m for m in cfg.methods if m.key == "condition_number")
    assert linear.make_defense(cfg, method).config.spectral_solver == "lanczos"


# --- real data (slow, assets) ----------------------------------------------------------------------


def _trial(cfg, method, task, solver: str) -> dict:
    m = dataclasses.replace(method, overrides={**method.overrides, "spectral_solver": solver})
    return linear.immunize_and_measure(cfg, m, 1, task)[0]


@pytest.mark.slow
@pytest.mark.assets
def test_house_prices_iterative_agrees_with_dense(asset) -> None:
    asset("ames")
    cfg = linear.build_config(read_yaml(default_config_path("house_prices")))
    for seed in cfg.seeds:
        task = linear.task_for(cfg, seed)
        for method in cfg.methods:
            if method.defense not in METHODS:
                continue
            dense, it = _trial(cfg, method, task, "dense"), _trial(cfg, method, task, "lanczos")
            diffs = _log_diffs(dense["metrics"], it["metrics"])
            assert max(diffs.values()) <= 0.01, (seed, method.key, diffs)
            assert dense["verdict"]["immunized"] == it["verdict"]["immunized"]


MNIST_PAIRS = ("0-1", "3-8", "5-2", "7-9", "9-4")


@pytest.mark.slow
@pytest.mark.assets
@pytest.mark.xfail(
    reason="issue 16 open: on 2026-12-08 the iterative path failed this on pairs 0-1, 3-8 and 5-2 "
    "(7-9, 9-4 not reached); lanczos stays opt-in until it passes",
    strict=False,
)
@pytest.mark.parametrize("pair", MNIST_PAIRS)
def test_mnist_pairs_iterative_agrees_with_dense(pair: str, asset) -> None:
    """(i), (ii), RIR within 1 % (log) and the same verdicts; condition_number within its own noise.

    condition_number's 30-step MNIST trajectory is chaotic: permuting the rows of X_H, which changes
    K_H by rounding only, moves the dense path's (i) and (ii) by ~25 % on pair 3-8. There the iterative
    path must stay within twice that rounding sensitivity of the dense one (and within 1 % where the
    dense path is stable).
    """
    asset("mnist")
    data = read_yaml(default_config_path("mnist_pairs"))
    data["pairs"] = pair
    cfg = linear.build_config(data)
    p, h = map(int, pair.split("-"))
    task = linear.task_for(cfg, 1, {"primary": p, "harmful": h})
    methods = {m.key: m for m in cfg.methods}
    for key in ("rill_only", "opt_kappa", "condition_number"):
        dense, it = _trial(cfg, methods[key], task, "dense"), _trial(cfg, methods[key], task, "lanczos")
        assert it["defense_info"]["spectral_stats"]["calls"] > 0
        assert dense["verdict"]["immunized"] == it["verdict"]["immunized"], key
        ok = (dense["metrics"]["kappa_ratio_harmful"] > 1) == (it["metrics"]["kappa_ratio_harmful"] > 1)
        assert ok and (dense["metrics"]["kappa_ratio_primary"] <= 1) == (
            it["metrics"]["kappa_ratio_primary"] <= 1
        )
        diffs = _log_diffs(dense["metrics"], it["metrics"])
        if key != "condition_number":
            assert max(diffs.values()) <= 0.01, (key, diffs)
            continue
        perm = torch.randperm(task.harmful.x.shape[0], generator=torch.Generator().manual_seed(5))
        harmful = dataclasses.replace(task.harmful, x=task.harmful.x[perm], y=task.harmful.y[perm])
        again = _trial(cfg, methods[key], dataclasses.replace(task, harmful=harmful), "dense")
        own = _log_diffs(dense["metrics"], again["metrics"])
        for k in PARTS:
            assert diffs[k] <= max(0.01, 2.0 * own[k]), (k, diffs, own)


def test_default_config_path_exists() -> None:
    assert Path(default_config_path("mnist_pairs")).exists()

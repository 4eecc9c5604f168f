"""The condition-number defense on LM hidden features (defenses/lm_spectral.py).

The objective against a hand computation in float64, the λ rule, the κ it is meant to move, a
head-only attacker slowed on the harmful answers, and bad input. A tiny random Llama, the toy byte
tokenizer and placeholder conversations: no dataset text.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from _lm_helpers import tiny_lm, toy_split, toy_task
from immunekit.attacks.lm_eval import answer_features
from immunekit.data.task import Task
from immunekit.data.token_split import IGNORE_INDEX, TokenSplit, lm_inputs
from immunekit.defenses import DEFENSES
from immunekit.defenses.lm_spectral import LmConditionNumber, kappa_of_rows
from immunekit.errors import ConfigError
from immunekit.models.causal_lm import CausalLM
from immunekit.spectral.rank import FactorSpectrum

F64 = torch.float64


def _reply(name: str, i: int) -> str:
    return f"placeholder reply {name} {i} " + "x" * i  # answers of different lengths: padding in batches


def _model(dtype: torch.dtype = F64, seed: int = 0) -> CausalLM:
    return tiny_lm(seed, dtype)


def _split(name: str, n: int, *, answers: bool = True) -> TokenSplit:
    return toy_split(name, n, _reply, answers=answers)


def _task(n: int = 6) -> Task:
    return toy_task(n, answer=_reply)


def _hand_features(model: CausalLM, split: TokenSplit, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at answer-predicting positions, one conversation at a time (no padding)."""
    feats, targets = [], []
    with torch.no_grad():
        for i in idx:
            x, y = split.rows(torch.tensor([i]))
            h = model.hidden_states(*lm_inputs(x))[0]
            for t in range(x.shape[1] - 1):
                if int(y[0, t + 1]) != IGNORE_INDEX:
                    feats.append(h[t])
                    targets.append(int(y[0, t + 1]))
    return torch.stack(feats).to(F64), torch.tensor(targets)


def test_answer_features_are_the_positions_the_loss_reads() -> None:
    model, split = _model(), _split("h", 4)
    x, y = split.rows(torch.tensor([0, 3]))  # different lengths: padding in the batch
    phi, target = answer_features(model, x, y)
    want_phi, want_t = _hand_features(model, split, [0, 3])
    torch.testing.assert_close(phi.detach(), want_phi, rtol=1e-10, atol=1e-12)
    assert torch.equal(target, want_t)


def test_the_first_step_minimises_the_stated_objective_in_float64() -> None:
    """The step's loss = CE(benign answers) + λ_P R_well(Φ_PᵀΦ_P) + λ_H R_ill(Φ_HᵀΦ_H), by hand."""
    model, task = _model(), _task()
    lam_p, lam_h = 0.3, 0.02
    d = DEFENSES.get("lm_condition_number")(
        lambda_primary=lam_p, lambda_harmful=lam_h, max_steps=1, batch_size=2, epochs=1, probe_rows=4
    )
    d.fit(model, task, seed=3)
    rec = d.history_[0]
    # the rows of step 1, from the same seeded streams the loop uses
    from immunekit.attacks.base import rng_streams

    (order_gen,) = rng_streams(3, "batches")
    harm_idx = torch.randperm(6, generator=order_gen)[:2].tolist()
    (ret_gen,) = rng_streams(3, "retain")
    prim_idx = torch.randperm(6, generator=ret_gen)[:2].tolist()
    phi_h, _ = _hand_features(model, task.harmful, harm_idx)
    phi_p, target = _hand_features(model, task.primary, prim_idx)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(phi_p @ model.head.weight.T.to(F64), target)
    lam = torch.linalg.eigvalsh(phi_p.T @ phi_p)
    r_well = 0.5 * lam[-1] ** 2 - (lam**2).sum() / (2 * 16)
    s = torch.linalg.svdvals(phi_h)
    k = FactorSpectrum.of(phi_h).rank
    ev = s[:k] ** 2
    r_ill = 1.0 / ((ev**2).sum() / (2 * k) - 0.5 * ev[k - 1] ** 2)
    assert rec["rank_harmful"] == k == 16  # more answer positions than D
    assert math.isclose(rec["ce_primary"], float(ce), rel_tol=1e-10)
    assert math.isclose(rec["r_well"], float(r_well), rel_tol=1e-9)
    assert math.isclose(rec["r_ill"], float(r_ill), rel_tol=1e-9)
    assert math.isclose(rec["loss"], float(ce + lam_p * r_well + lam_h * r_ill), rel_tol=1e-10)


def test_the_rho_rule_balances_both_gradients_with_the_lm_loss() -> None:
    model, task = _model(), _task()
    d = DEFENSES.get("lm_condition_number")(primary_grad_ratio=0.5, max_steps=1, probe_rows=2)
    d.fit(model, task, seed=0)
    lam = d.info_["lambdas"]
    n_task = lam["grad_norm_task"]
    assert n_task > 0 and lam["grad_norm_well_raw"] > 0 and lam["grad_norm_ill_raw"] > 0
    assert math.isclose(lam["lambda_primary"] * lam["grad_norm_well_raw"], 0.5 * n_task, rel_tol=1e-12)
    assert math.isclose(lam["lambda_harmful"] * lam["grad_norm_ill_raw"], 0.5 * n_task, rel_tol=1e-12)


def test_kappa_of_rows_is_the_factor_kappa_of_the_answer_positions() -> None:
    model, split = _model(), _split("h", 5)
    got = kappa_of_rows(model, split, 5)
    phi, _ = _hand_features(model, split, list(range(5)))
    spec = FactorSpectrum.of(phi)
    assert got["positions"] == phi.shape[0] and got["rank"] == spec.rank
    assert math.isclose(got["kappa"], float(spec.kappa().kappa), rel_tol=1e-9)


def test_it_raises_the_harmful_kappa_more_than_the_benign_one() -> None:
    """(i) = κ_H(after)/κ_H(before) ≫ 1 and ≫ (ii), the benign LM loss still falls.

    The head-only attacker's *speed* is not asserted here: on this toy, benign and harmful answers
    share most of their tokens, Adam is not gradient descent, and a 16-wide model is not the
    paper's setting; the real-data experiment measures it.
    """
    model, task = _model(F64, seed=1), _task(8)
    d = LmConditionNumber(lr=3e-3, epochs=8, batch_size=2, primary_grad_ratio=1.0, probe_rows=8)
    d.fit(model, task, seed=0)
    kappa = d.info_["kappa"]
    assert kappa["before"]["harmful"]["rank"] == 16
    assert kappa["ratio_harmful"] > 5.0
    assert kappa["ratio_harmful"] > 3.0 * kappa["ratio_primary"]
    hist = d.history_
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["ce_primary"] < hist[0]["ce_primary"]


def test_bf16_keeps_the_spectra_in_float64() -> None:
    d = LmConditionNumber(max_steps=2, precision="bf16", probe_rows=2)
    d.fit(_model(torch.float32), _task(), seed=0)
    assert len(d.history_) == 2 and all(math.isfinite(h["r_ill"]) for h in d.history_)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"primary_grad_ratio": 0.0}, "primary_grad_ratio"),
        ({"primary_grad_ratio": float("nan")}, "primary_grad_ratio"),
        ({"lambda_primary": -1.0}, "lambda_primary"),
        ({"lambda_harmful": float("inf")}, "lambda_harmful"),
        ({"delta_min": -1.0}, "delta_min"),
        ({"probe_rows": 0}, "probe_rows"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LmConditionNumber(**kwargs)

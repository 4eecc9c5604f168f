"""The LoRA attack (attacks/lora.py): low-rank merged updates, input untouched, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.data.synthetic import gaussian_spectra
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel, LinearModel, linear_model

pytest.importorskip("peft")

F64 = torch.float64


def _task():
    return gaussian_spectra(dim=8, n=96, cond_primary=10.0, cond_harmful=10.0, seed=3)


def _model(d: int = 8) -> LinearModel:
    m = linear_model(d)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.extractor.weight.add_(0.3 * torch.randn(d, d, generator=g, dtype=F64))
        m.head.weight.copy_(0.1 * torch.randn(1, d, generator=g, dtype=F64))
    return m


def _budget(**kw: object) -> AttackBudget:
    return AttackBudget(**{"steps": 40, "optimizer": "adam", "lr": 0.05, "batch_size": 32, **kw})


@pytest.mark.parametrize("rank", [1, 2])
def test_merged_update_has_rank_at_most_r_and_input_is_untouched(rank: int) -> None:
    task, model = _task(), _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ATTACKS.get("lora")(rank=rank, alpha=2.0 * rank)(model, task, _budget(), seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(res.model) is LinearModel and res.model is not model
    assert set(res.model.state_dict()) == set(before)  # merged: no adapter left
    delta = res.model.extractor.weight.detach() - before["extractor.weight"]
    sv = torch.linalg.svdvals(delta)
    assert sv[0] > 1e-3  # it moved
    assert float(sv[rank:].max()) <= 1e-12 * float(sv[0])  # ... within a rank-r subspace
    assert res.info["target_modules"] == ["extractor", "head"]
    assert all(p.requires_grad for p in res.model.parameters())


def test_lora_raises_harm_and_its_last_loss_is_that_of_the_merged_model() -> None:
    task, model = _task(), _model()
    res = ATTACKS.get("lora")(loss_on="split")(model, task, _budget(eval_every=10), seed=1)
    with torch.no_grad():
        mse = float(((res.model(task.attack.x)[:, 0] - task.attack.y) ** 2).mean())
    assert mse == pytest.approx(res.records[-1].loss, rel=1e-10)
    curve = res.harm_curve()
    assert [s for s, _ in curve] == [0, 10, 20, 30, 40]
    assert curve[-1][1] > curve[0][1] + 0.3
    assert res.info["trainable_params"] == 4 * (8 + 8) + 4 * (8 + 1)  # r·(in + out) per adapted layer


def test_target_modules_limit_what_moves_and_seeds_decide_the_init() -> None:
    task, model = _task(), _model()
    res = ATTACKS.get("lora")(target_modules=("head",))(model, task, _budget(steps=5), seed=0)
    assert torch.equal(res.model.extractor.weight, model.extractor.weight)
    assert not torch.equal(res.model.head.weight, model.head.weight)
    a, b, c = (ATTACKS.get("lora")()(model, task, _budget(steps=5), seed=s) for s in (2, 2, 3))
    assert torch.equal(a.model.extractor.weight, b.model.extractor.weight)
    assert not torch.equal(a.model.extractor.weight, c.model.extractor.weight)


class _NoLinear(ImmunizableModel):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.extractor = nn.Identity()
        self.w = nn.Parameter(torch.zeros(d, 1, dtype=F64))
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_model_without_linear_layers_is_a_clear_error() -> None:
    task = _task()
    with pytest.raises(ConfigError, match=r"nn\.Linear.*_NoLinear has none"):
        ATTACKS.get("lora")()(_NoLinear(8), task, _budget(), seed=0)


def test_bad_lora_configs() -> None:
    task = _task()
    with pytest.raises(ConfigError, match="rank"):
        ATTACKS.get("lora")(rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        ATTACKS.get("lora")(dropout=1.0)
    with pytest.raises(ConfigError, match=r"\['body'\]"):
        ATTACKS.get("lora")(target_modules=("body",))(_model(), task, _budget(), seed=0)
    with pytest.raises(ConfigError, match="gd_exact"):
        ATTACKS.get("lora")()(_model(), task, _budget(optimizer="gd_exact", lr=None), seed=0)


def test_missing_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'immunekit\[lora\]'"):
        ATTACKS.get("lora")()(_model(), _task(), _budget(), seed=0)

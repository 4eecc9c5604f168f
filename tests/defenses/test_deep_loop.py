"""The shared deep loop: dropout determinism without global seeding, split reads, a plugged-in objective."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from test_deep_condition_number import pretrained, three_class_task
from torch import Tensor, nn

from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.deep import Batch, FitState, dropout_seed, fit_deep
from immunekit.errors import NumericalError
from immunekit.models.base import ImmunizableModel

F64 = torch.float64
NAMES = ("condition_number", "rill_only", "opt_kappa", "imma")


class DropoutMLP(ImmunizableModel):
    """Linear(8, 16) → tanh → Linear(16, 12) → Dropout(0.3) → tanh; head Linear(12, 3). Blocks: 0, 2."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.extractor = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Dropout(0.3), nn.Tanh()
        )
        self.head = nn.Linear(12, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = _weights(a), _weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_fits_are_a_function_of_the_seed_and_leave_the_global_rng_alone(name: str) -> None:
    task = three_class_task(n=200)
    m0 = DropoutMLP()
    kw: dict[str, Any] = {"epochs": 2, "lr": 0.05}
    state = torch.random.get_rng_state()
    a = DEFENSES.get(name)(**kw).fit(m0, task, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # forked and restored
    with torch.random.fork_rng(devices=[]):  # a different caller state must not matter
        torch.manual_seed(12345)
        b = DEFENSES.get(name)(**kw).fit(m0, task, seed=3)
    c = DEFENSES.get(name)(**kw).fit(m0, task, seed=4)
    assert _equal(a, b)
    assert not _equal(a, c)
    assert not m0.training or all(m.training for m in m0.modules())  # modes untouched


def test_dropout_is_active_during_the_fit() -> None:
    """Control: without dropout the same seed pair gives the same batches but other weights."""
    task = three_class_task(n=200)
    m0 = DropoutMLP()
    plain = DropoutMLP()
    plain.extractor[3] = nn.Dropout(0.0)
    a = DEFENSES.get("imma")(epochs=1, lr=0.05).fit(m0, task, seed=3)
    b = DEFENSES.get("imma")(epochs=1, lr=0.05).fit(plain, task, seed=3)
    assert not _equal(a, b)
    assert dropout_seed(3) != 3 and dropout_seed(3) == dropout_seed(3)


@dataclass(frozen=True)
class SpyDataset(Dataset):
    """A Dataset that records every ``rows`` call (the only way the deep loop may read a split)."""

    calls: list[list[int]] = field(default_factory=list, compare=False)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        self.calls.append(idx.tolist())
        return super().rows(idx)


@pytest.mark.parametrize("name", NAMES)
def test_the_loop_reads_splits_through_rows(name: str) -> None:
    task = three_class_task(n=200)
    p = SpyDataset(task.primary.x, task.primary.y, task.primary.ids)
    h = SpyDataset(task.harmful.x, task.harmful.y, task.harmful.ids)
    spied = Task(
        name="spy",
        version="test",
        loss="ce",
        primary=p,
        harmful=h,
        attack=task.attack,
        eval_primary=task.eval_primary,
        eval_harmful=task.eval_harmful,
    )
    p.calls.clear()
    h.calls.clear()
    d = DEFENSES.get(name)(epochs=2)
    d.fit(pretrained(task), spied, seed=0)
    steps = d.info_["steps"]
    assert len(h.calls) == steps and all(len(c) == 64 for c in h.calls)
    assert len(p.calls) == steps + 1 and p.calls[0] == [0]  # + one row to size the head
    assert h.calls[0] == d.info_["first_batch"]["harmful"] and p.calls[1] == d.info_["first_batch"]["primary"]


class TaskOnly:
    """A plugged-in objective: the task term alone."""

    fields: tuple[str, ...] = ()
    loss_parts: tuple[str, ...] = ("task_loss",)
    hint = "lower lr"
    max_grad_norm: float | None = None

    def prepare(self, task: Task, info: dict[str, Any]) -> None:
        info["objective"] = "task only"

    def loss(self, state: FitState, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        assert state.loss_fn is not None
        t = state.loss_fn(state.model(batch.x_p), batch.y_p)
        return t, {"loss": float(t.detach()), "task_loss": float(t.detach())}


def test_a_plugged_in_objective_runs_in_the_same_loop() -> None:
    """Task-only through fit_deep equals condition_number with λ_P = λ_H = 0 (same batches, same steps)."""
    task = three_class_task(n=200)
    m0 = pretrained(task, dtype=F64)
    d = DEFENSES.get("condition_number")(epochs=2)
    out = fit_deep(d, m0, task, seed=1, objective=TaskOnly())
    assert d.info_["objective"] == "task only" and len(d.history_) == d.info_["steps"]
    ref = DEFENSES.get("condition_number")(epochs=2, lambda_primary=0.0, lambda_harmful=0.0).fit(
        m0, task, seed=1
    )
    for (k, v), w in zip(_weights(out).items(), _weights(ref).values(), strict=True):
        assert torch.allclose(v, w, rtol=1e-12, atol=1e-14), k


@pytest.mark.parametrize("name", ["opt_kappa", "imma"])
def test_divergence_stops_with_the_step_named(name: str) -> None:
    task = three_class_task(n=200)
    m0 = pretrained(task)
    before = _weights(m0)
    kw = {"lambda_harmful": float("inf")} if name == "opt_kappa" else {"adv_weight": float("inf")}
    with pytest.raises(NumericalError, match=r"non-finite (loss|gradient) at step 0 \(epoch 0\)"):
        DEFENSES.get(name)(**kw).fit(m0, task, seed=0)
    with pytest.raises(NumericalError, match=r"non-finite (loss|gradient|parameters).* step \d+"):
        DEFENSES.get(name)(lr=1e30, epochs=3).fit(m0, task, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in _weights(m0).items())

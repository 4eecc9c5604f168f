"""Chunked evaluation, chunked features and splits read through rows() (issue 12: not linear-only)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from immunekit.attacks import ATTACKS, AttackBudget, base
from immunekit.attacks.base import EVAL_BATCH_SIZE, eval_batch_size, eval_predictions
from immunekit.attacks.linear_probe import LinearProbe, probe_problem
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import SPLITS, Dataset, Split, Task, iter_batches
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel, linear_model

F64 = torch.float64


class _Streamed:
    """A Split over a Dataset's tensors that exposes no ``.x``: every input goes through rows()."""

    def __init__(self, data: Dataset) -> None:
        self._data = data
        self.largest = 0  # most rows one rows() call returned

    @property
    def y(self) -> Tensor:
        return self._data.y

    @property
    def ids(self) -> tuple[str, ...]:
        return self._data.ids

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self._data.item_shape

    def __len__(self) -> int:
        return len(self._data)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        self.largest = max(self.largest, len(idx))
        return self._data.rows(idx)

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return iter_batches(self, batch_size, generator=generator, drop_last=drop_last)

    def row_hashes(self) -> set[str]:
        return self._data.row_hashes()


def _streamed(task: Task) -> Task[Split]:
    splits = {s: _Streamed(getattr(task, s)) for s in SPLITS if getattr(task, s) is not None}
    return Task(name=task.name, version=task.version, loss=task.loss, **splits)  # type: ignore[arg-type]


class _Mlp(ImmunizableModel):
    """A small float64 MLP that records the most rows one forward pass saw."""

    def __init__(self, d: int, outputs: int = 1, *, norm: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(d, 8, dtype=F64), nn.Tanh()]
        if norm:
            layers += [nn.BatchNorm1d(8, dtype=F64), nn.Dropout(0.5)]
        self.extractor = nn.Sequential(*layers, nn.Linear(8, 6, dtype=F64))
        self.head = nn.Linear(6, outputs, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
        self.largest = 0

    def features(self, x: Tensor) -> Tensor:
        self.largest = max(self.largest, x.shape[0])
        return super().features(x)


def _task(loss: str = "mse") -> Task:
    return gaussian_spectra(
        dim=5, n=40, cond_primary=5.0, cond_harmful=20.0, loss=loss, seed=1
    )  # 30 + 10 rows


def test_the_default_eval_batch_size_and_its_validation() -> None:
    assert EVAL_BATCH_SIZE == 1024 and eval_batch_size() == 1024 and eval_batch_size(3) == 3
    with pytest.raises(ConfigError, match="eval batch size must be an integer >= 1, got 0"):
        eval_batch_size(0)


@pytest.mark.parametrize("batch_size", [1, 4, 36, 37, 100])
def test_chunked_predictions_equal_one_pass(batch_size: int) -> None:
    model = _Mlp(5, 3)
    x = torch.randn(37, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        one_pass = model(x)
    model.largest = 0
    got = eval_predictions(model, x, batch_size=batch_size)
    assert model.largest == min(batch_size, 37)
    assert torch.allclose(got, one_pass, rtol=1e-12, atol=1e-14)
    if batch_size >= 37:  # a single chunk is the one pass itself
        assert torch.equal(got, one_pass)
    split = _Streamed(Dataset(x, torch.zeros(37)))
    assert torch.equal(eval_predictions(model, split, batch_size=batch_size), got)
    assert split.largest == min(batch_size, 37)


def test_predictions_and_features_run_in_eval_mode_and_restore_the_flag() -> None:
    model = _Mlp(5, norm=True).train()
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = eval_predictions(model, x, batch_size=6)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)  # no dropout, running BN statistics
    task = _task()
    probe_problem(model, task, "attack", "eval_harmful")
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats untouched


@pytest.mark.parametrize(("optimizer", "loss_on"), [("gd", "split"), ("sgd", "split"), ("adam", "batch")])
def test_the_loop_never_forwards_more_than_a_chunk(monkeypatch, optimizer: str, loss_on: str) -> None:
    task, chunk = _streamed(_task()), 7
    monkeypatch.setattr(base, "EVAL_BATCH_SIZE", chunk)
    model = _Mlp(5)
    budget = AttackBudget(steps=3, optimizer=optimizer, batch_size=4, lr=0.01, eval_every=1)  # type: ignore[arg-type]
    ATTACKS.get("full_finetune")(loss_on=loss_on)(model, task, budget, seed=0)
    largest = max(getattr(task, s).largest for s in ("attack", "eval_harmful", "eval_primary"))
    assert largest == chunk  # 30-row training and 10-row held-out splits, read chunk by chunk


def _records(res) -> list[tuple]:
    return [
        (r.step, r.examples, r.loss, r.grad_norm, r.accuracy, r.eval) for r in [res.initial, *res.records]
    ]


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_chunked_full_batch_and_evaluation_match_one_pass(monkeypatch, loss: str, optimizer: str) -> None:
    task = _task(loss)
    budget = AttackBudget(steps=4, optimizer=optimizer, batch_size=8, lr=0.05, eval_every=1)  # type: ignore[arg-type]
    attack = ATTACKS.get("full_finetune")(loss_on="split")
    one = attack(_Mlp(5), task, budget, seed=2)
    monkeypatch.setattr(base, "EVAL_BATCH_SIZE", 7)  # 30 rows: chunks of 7, 7, 7, 7, 2
    chunked = attack(_Mlp(5), task, budget, seed=2)
    for a, b in zip(_records(one), _records(chunked), strict=True):
        assert a[:2] == b[:2] and a[4] == b[4]
        assert a[2] == pytest.approx(b[2], rel=1e-10) and a[5] == pytest.approx(b[5], rel=1e-10)
        assert a[3] == pytest.approx(b[3], rel=1e-10, nan_ok=True)
    for (name, p), q in zip(one.model.named_parameters(), chunked.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("attack", ["full_finetune", "relearn", "head_reset_probe"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_split_read_through_rows_gives_bit_identical_records(attack: str, optimizer: str) -> None:
    # same seeded batch order, same rows: the in-memory Dataset and a streaming split are one run
    task = _task("ce")
    budget = AttackBudget(steps=6, optimizer=optimizer, batch_size=8, eval_every=2)  # type: ignore[arg-type]
    overrides = {"warmup_steps_benign": 2, "subset_size": 12} if attack == "relearn" else {}
    a = ATTACKS.get(attack)(**overrides)(_Mlp(5), task, budget, seed=4)
    b = ATTACKS.get(attack)(**overrides)(_Mlp(5), _streamed(task), budget, seed=4)
    assert repr(_records(a)) == repr(_records(b))  # repr: exact floats, and nan equals nan
    assert a.info["phases"] == b.info["phases"]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_probe_features_are_chunked_and_match_one_pass(monkeypatch) -> None:
    task = _task("ce")
    budget = AttackBudget(steps=5, optimizer="gd", lr=None)
    model = _Mlp(5)
    one = LinearProbe()(model, task, budget, seed=0)
    full = probe_problem(model, task, "attack", "eval_harmful")
    monkeypatch.setattr(base, "EVAL_BATCH_SIZE", 4)
    model.largest = 0
    chunked = probe_problem(model, task, "attack", "eval_harmful")
    assert model.largest == 4
    assert torch.allclose(chunked.a, full.a, rtol=1e-12, atol=1e-14) and chunked.a.dtype == F64
    assert torch.allclose(chunked.util_a, full.util_a, rtol=1e-12, atol=1e-14)
    res = LinearProbe()(model, _streamed(task), budget, seed=0)
    assert res.curve("loss") == pytest.approx(one.curve("loss"), rel=1e-9)
    assert res.records[-1].eval == pytest.approx(one.records[-1].eval, rel=1e-9)


def test_a_linear_model_on_in_memory_data_keeps_one_pass_features(monkeypatch) -> None:
    task = _task()
    model = linear_model(5)
    with torch.no_grad():
        model.extractor.weight.add_(
            0.3 * torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
        )
    monkeypatch.setattr(base, "EVAL_BATCH_SIZE", 3)
    prob = probe_problem(model, task, "attack", "eval_harmful")
    assert torch.equal(prob.a, model.features(task.attack.x))  # bit for bit: the closed-form numbers

"""Contract suite for every registered defense (DESIGN §2 "Defense", §6 contract tier).

Parametrized from ``DEFENSES.names()``, so a newly registered defense is checked automatically:
``fit`` returns a new model and never mutates its input, is deterministic for a seed, the config
round-trips through ``to_dict`` and loading is strict (unknown keys raise with a suggestion).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from immunekit.config import to_dict
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES, Defense
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel, LinearModel, linear_model

F64 = torch.float64
NAMES = DEFENSES.names()
# Defenses that accept any ImmunizableModel (all others are linear-extractor algorithms).
ANY_MODEL = {"identity"}
#: Defenses with a deep variant (defenses/deep.py): a non-linear model is trained, not refused.
DEEP = {"condition_number", "rill_only", "opt_kappa", "imma"}
#: Defenses that train any ImmunizableModel on a ``ce`` task whose desired (primary) and harmful labels
#: describe the same inputs (MLAC, AC): they get :func:`_aligned_task` and a two-output head, and an
#: ``mse`` task is a clear DataError for them.
ALIGNED_CE = {"mlac", "ac"}
#: Defenses of causal language models (defenses/lm_adversarial.py, lm_spectral.py, lm_mlac.py): they get
#: their own contract below (a tiny Llama on an ``lm`` task of placeholder conversations); every other
#: defense gets the tabular one.
LM = {"adversarial_loss", "gradient_ascent", "lm_condition_number", "lm_mlac"}
TABULAR = [n for n in NAMES if n not in LM]


class TinyMLP(ImmunizableModel):
    """A non-linear extractor: not a LinearModel."""

    def __init__(self, d_in: int, d_hid: int = 6, d_out: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.extractor = nn.Sequential(nn.Linear(d_in, d_hid, dtype=F64), nn.Tanh())
        self.head = nn.Linear(d_hid, d_out, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))


def _task(loss: str = "mse") -> Task:
    return gaussian_spectra(dim=6, n=64, cond_primary=20.0, cond_harmful=5.0, loss=loss, seed=3)


def _aligned_task() -> Task:
    """The ``ce`` task of :func:`_task` with harmful labels on the *primary* rows ([x_1 > 0]).

    MLAC and AC need the desired and the harmful labels of the same inputs, in the same order.
    """
    task = _task("ce")
    p = task.primary
    return dataclasses.replace(task, harmful=Dataset(p.x, (p.x[:, 1] > 0).long(), p.ids))


def _task_for(name: str, loss: str = "mse") -> Task:
    """The contract's task for a defense: :func:`_aligned_task` for :data:`ALIGNED_CE`."""
    return _aligned_task() if name in ALIGNED_CE else _task(loss)


def _outputs(name: str) -> int:
    return 2 if name in ALIGNED_CE else 1


def _model(d: int, outputs: int = 1) -> LinearModel:
    """θ_0 = I + small random perturbation, a non-zero head: a non-trivial starting point."""
    m = linear_model(d, d_out=outputs)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        m.extractor.weight.add_(0.1 * torch.randn(d, d, generator=g, dtype=F64))
        m.head.weight.copy_(torch.randn(outputs, d, generator=g, dtype=F64))
    return m


def _defense(name: str, **overrides: object) -> Defense:
    cls = DEFENSES.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for key in ("steps", "outer_steps"):
        if key in fields and key not in overrides:
            overrides[key] = 5  # the contract does not depend on the number of steps
    return cls(**overrides)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} changed"


def test_registry_is_not_empty() -> None:
    assert {"identity", "condition_number", "rill_only", "opt_kappa", "imma"} <= set(NAMES)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", TABULAR)
def test_fit_returns_new_model_and_leaves_input_bit_identical(name: str, loss: str) -> None:
    if name in ALIGNED_CE and loss == "mse":  # classification only: a clear error, input untouched
        model = _model(_task(loss).input_dim, _outputs(name))
        before = _snapshot(model)
        with pytest.raises(DataError, match="loss='mse'"):
            _defense(name).fit(model, _task(loss), seed=0)
        _assert_state_equal(_snapshot(model), before)
        return
    task = _task_for(name, loss)
    model = _model(task.input_dim, _outputs(name))
    before = _snapshot(model)
    out = _defense(name).fit(model, task, seed=0)
    assert isinstance(out, ImmunizableModel)
    assert out is not model
    _assert_state_equal(_snapshot(model), before)
    # No storage is shared: editing the output must not reach the input.
    with torch.no_grad():
        for p in out.parameters():
            p.add_(1.0)
    _assert_state_equal(_snapshot(model), before)


@pytest.mark.parametrize("name", TABULAR)
def test_fit_is_deterministic_for_a_seed(name: str) -> None:
    task = _task_for(name)
    model = _model(task.input_dim, _outputs(name))
    a = _defense(name).fit(model, task, seed=7)
    b = _defense(name).fit(model, task, seed=7)
    _assert_state_equal(_snapshot(a), _snapshot(b))
    assert torch.isfinite(a.extractor.weight).all()


@pytest.mark.parametrize("name", TABULAR)
def test_fit_sets_trailing_underscore_diagnostics(name: str) -> None:
    d = _defense(name)
    assert not hasattr(d, "history_") and not hasattr(d, "info_")  # learned by fit, not before
    d.fit(_model(6, _outputs(name)), _task_for(name), seed=0)
    assert isinstance(d.history_, list)
    assert isinstance(d.info_, dict) and d.info_


#: Defenses that leave θ as it is by design.
NO_CHANGE = {"identity"}


@pytest.mark.parametrize("name", [n for n in TABULAR if n not in NO_CHANGE])
def test_fit_changes_the_extractor_where_it_must(name: str) -> None:
    """A defense that trained (or whitened) must return a different θ on an ill-conditioned task."""
    task, model = _task_for(name), _model(6, _outputs(name))
    out = _defense(name).fit(model, task, seed=0)
    diff = (out.extractor.weight - model.extractor.weight).abs().max()
    assert diff > 1e-6, f"{name} returned θ_0 unchanged"


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_to_dict(name: str) -> None:
    cls = DEFENSES.get(name)
    d = cls()
    assert cls(**to_dict(d.config)).config == d.config
    assert cls(config=d.config).config == d.config
    if "steps" in {f.name for f in dataclasses.fields(cls.Config)}:
        changed = cls(steps=3)
        again = cls(**to_dict(changed.config))
        assert again.config == changed.config
        assert again.config.steps == 3
        assert again.config != d.config


@pytest.mark.parametrize("name", NAMES)
def test_unknown_config_key_raises_with_suggestion(name: str) -> None:
    cls = DEFENSES.get(name)
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    if not fields:  # nothing to suggest (e.g. identity): still strict, and the key is named
        with pytest.raises(ConfigError, match="bogus_key"):
            cls(bogus_key=1)
        return
    typo = fields[0] + "z"
    with pytest.raises(ConfigError, match=rf"{typo}: unknown key; did you mean '{fields[0]}'\?"):
        cls(**{typo: 1})


@pytest.mark.parametrize("name", TABULAR)
def test_non_linear_model_is_rejected_by_linear_defenses(name: str) -> None:
    task = _task_for(name)
    mlp = TinyMLP(task.input_dim, d_out=_outputs(name))
    before = _snapshot(mlp)
    if name in ANY_MODEL:
        out = _defense(name).fit(mlp, task, seed=0)
        assert out is not mlp
        _assert_state_equal(_snapshot(out), before)
    elif name in DEEP or name in ALIGNED_CE:  # a deep variant / any-model defense trains a copy
        out = _defense(name).fit(mlp, task, seed=0)
        assert out is not mlp
        changed = [k for k, v in _snapshot(out).items() if not torch.equal(v, before[k])]
        assert changed, f"{name} returned the model unchanged"
    else:
        with pytest.raises(ConfigError, match="LinearModel"):
            _defense(name).fit(mlp, task, seed=0)
    _assert_state_equal(_snapshot(mlp), before)


@pytest.mark.parametrize("name", [n for n in TABULAR if n != "identity"])
def test_wrong_input_dimension_is_a_clear_error(name: str) -> None:
    task = _task_for(name)
    with pytest.raises(DataError, match=f"linear_model\\({task.input_dim}\\)"):
        _defense(name).fit(linear_model(task.input_dim + 1), task, seed=0)


# ---------------------------------------------------------------------------------------------
# Language-model defenses
# ---------------------------------------------------------------------------------------------


def _lm_model(seed: int = 0) -> ImmunizableModel:
    from _lm_helpers import tiny_lm

    return tiny_lm(seed)


def _lm_task() -> Task:
    """Placeholder conversations (no dataset text): 'harmful' rows carry answers to pair with refusals."""
    from _lm_helpers import toy_task

    return toy_task(4, primary=4, answer="reply {i}")


def test_every_lm_defense_is_registered() -> None:
    assert set(NAMES) >= LM


@pytest.mark.parametrize("name", sorted(LM))
def test_lm_defense_fit_returns_a_new_trained_model_deterministically(name: str) -> None:
    pytest.importorskip("transformers")
    task, model = _lm_task(), _lm_model()
    before = _snapshot(model)
    d = _defense(name, epochs=1, batch_size=2, lr=1e-3)
    out = d.fit(model, task, seed=3)
    assert out is not model and isinstance(out, ImmunizableModel)
    _assert_state_equal(_snapshot(model), before)
    changed = [k for k, v in _snapshot(out).items() if not torch.equal(v, before[k])]
    assert changed, f"{name} returned the model unchanged"
    assert isinstance(d.history_, list) and len(d.history_) == 2 and d.info_["steps"] == 2
    again = _defense(name, epochs=1, batch_size=2, lr=1e-3).fit(model, task, seed=3)
    _assert_state_equal(_snapshot(out), _snapshot(again))


@pytest.mark.parametrize("name", sorted(LM))
def test_lm_defenses_refuse_other_models_and_tasks(name: str) -> None:
    pytest.importorskip("transformers")
    task = _task()
    with pytest.raises(ConfigError, match="causal language models"):
        _defense(name).fit(_model(task.input_dim), task, seed=0)
    with pytest.raises(DataError, match="language-model task"):
        _defense(name).fit(_lm_model(), task, seed=0)

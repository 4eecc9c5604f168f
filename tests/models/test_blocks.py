"""ImmunizableModel.blocks() and trainable_blocks(k): the ordered blocks that partial tuning picks from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from immunekit.attacks.finetune import extractor_blocks
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel, linear_model


class SequentialModel(ImmunizableModel):
    """Three Linear blocks with parameter-free activations in between, and a Linear head.

    The last activation is tanh, not ReLU: a ReLU could kill every output for some initialisations,
    and the last block would then get no gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(
            nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh()
        )
        self.head = nn.Linear(3, 2)


class NamedBlocksModel(ImmunizableModel):
    """A subclass whose blocks are not the extractor's children: it overrides blocks()."""

    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 1)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        layers = list(self.extractor)
        return [("early", nn.Sequential(*layers[:2])), ("late", layers[2])]


def test_linear_model_is_one_block_named_extractor() -> None:
    m = linear_model(3, 2, 1)
    assert [(name, mod) for name, mod in m.blocks()] == [("extractor", m.extractor)]


def test_sequential_blocks_are_parameterised_children_in_order() -> None:
    m = SequentialModel()
    blocks = m.blocks()
    assert [name for name, _ in blocks] == ["extractor.0", "extractor.2", "extractor.4"]
    assert [mod for _, mod in blocks] == [m.extractor[0], m.extractor[2], m.extractor[4]]


def test_block_names_are_module_paths_in_the_model() -> None:
    m = SequentialModel()
    modules = dict(m.named_modules())
    for name, mod in m.blocks():
        assert modules[name] is mod


def test_default_blocks_match_what_partial_finetune_counts() -> None:
    for m in (linear_model(3), SequentialModel()):
        assert [mod for _, mod in m.blocks()] == extractor_blocks(m.extractor)


def test_extractor_without_parameters_has_no_blocks() -> None:
    m = ImmunizableModel()
    m.extractor = nn.Flatten()
    m.head = nn.Linear(4, 1)
    assert m.blocks() == []
    assert list(m.trainable_blocks(0)) == ["head.weight", "head.bias"]


def test_trainable_blocks_picks_the_last_k_blocks_and_the_head() -> None:
    m = SequentialModel()
    assert list(m.trainable_blocks(0)) == ["head.weight", "head.bias"]
    assert list(m.trainable_blocks(2)) == [
        "extractor.2.weight",
        "extractor.2.bias",
        "extractor.4.weight",
        "extractor.4.bias",
        "head.weight",
        "head.bias",
    ]
    assert list(m.trainable_blocks(3)) == [name for name, _ in m.named_parameters()]
    assert list(m.trainable_blocks(1, head=False)) == ["extractor.4.weight", "extractor.4.bias"]


def test_trainable_blocks_returns_the_models_own_parameters() -> None:
    m = SequentialModel()
    own = dict(m.named_parameters())
    chosen = m.trainable_blocks(1)
    assert all(p is own[name] for name, p in chosen.items())
    opt = torch.optim.SGD(chosen.values(), lr=0.1)
    frozen = m.extractor[0].weight.detach().clone()
    moved = m.extractor[4].weight.detach().clone()
    m.zero_grad()
    m(torch.randn(8, 6, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()
    opt.step()
    assert torch.equal(m.extractor[0].weight, frozen)
    assert not torch.equal(m.extractor[4].weight, moved)


def test_linear_model_trainable_blocks() -> None:
    m = linear_model(3, 2, 1)
    assert list(m.trainable_blocks(0)) == ["head.weight"]
    assert list(m.trainable_blocks(1)) == ["extractor.weight", "head.weight"]


def test_override_names_blocks_and_selects_by_identity() -> None:
    m = NamedBlocksModel()
    assert [name for name, _ in m.blocks()] == ["early", "late"]
    assert list(m.trainable_blocks(1, head=False)) == ["extractor.2.weight", "extractor.2.bias"]
    assert len(m.trainable_blocks(2)) == 8


def test_shared_module_is_one_block_and_its_parameters_are_listed_once() -> None:
    m = ImmunizableModel()
    layer = nn.Linear(3, 3)
    m.extractor = nn.Sequential(layer, nn.ReLU(), layer)
    m.head = nn.Linear(3, 1)
    assert [name for name, _ in m.blocks()] == ["extractor.0"]
    assert list(m.trainable_blocks(1, head=False)) == ["extractor.0.weight", "extractor.0.bias"]


@pytest.mark.parametrize("k", [-1, 4, 1.0, True, "1"])
def test_trainable_blocks_rejects_bad_k(k: object) -> None:
    with pytest.raises(ConfigError, match=r"has 3 block\(s\).*from 0 to 3"):
        SequentialModel().trainable_blocks(k)  # type: ignore[arg-type]

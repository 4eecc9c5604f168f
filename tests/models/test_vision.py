"""Vision backbones: DigitCNN and EfficientNetLite0 (shapes, blocks, checkpoints, pretrained loading)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from immunekit.errors import AssetError, ConfigError, DataError
from immunekit.models import vision
from immunekit.models.base import ImmunizableModel
from immunekit.models.checkpoint import MODELS, load_checkpoint, read_checkpoint_info, save_checkpoint
from immunekit.models.vision import DigitCNN, EfficientNetLite0, GrayToImageNet, as_images

DIGIT_BLOCKS = ["extractor.conv1", "extractor.conv2", "extractor.conv3", "extractor.fc1"]
EFFNET_BLOCKS = ["extractor.stem", *(f"extractor.stage{s}" for s in range(1, 8)), "extractor.top"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _package_keys(model: DigitCNN) -> dict[str, torch.Tensor]:
    """The model's state_dict under digit-recognizer-py's key names (what its .pth holds)."""
    inverse = {ours: theirs for theirs, ours in vision._DIGIT_CNN_KEYS.items()}
    out = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in inverse if key.startswith(p))
        out[inverse[prefix] + key[len(prefix) :]] = value.clone()
    return out


@pytest.fixture
def weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``weights_file(obj)`` saves ``obj`` with torch.save and makes it the pinned asset's file."""
    requested: list[str] = []

    def install(obj: object) -> Path:
        path = tmp_path / "weights.pth"
        torch.save(obj, path)

        def fake_asset_file(name: str) -> Path:
            requested.append(name)
            return path

        monkeypatch.setattr(vision, "_asset_file", fake_asset_file)
        return path

    install.requested = requested  # type: ignore[attr-defined]
    return install


# --- DigitCNN -------------------------------------------------------------------------------------


def test_digit_cnn_shapes_for_every_input_layout() -> None:
    m = DigitCNN(num_classes=3).eval()
    x = torch.rand(5, 1, 28, 28, generator=_gen())
    feats = m.features(x)
    assert feats.shape == (5, 256)
    assert bool((feats >= 0).all())  # ReLU activations
    assert m(x).shape == (5, 3)
    assert torch.equal(m.features(x.reshape(5, 784)), feats)
    assert torch.equal(m.features(x.reshape(5, 28, 28)), feats)
    assert isinstance(m, ImmunizableModel) and isinstance(m.head, nn.Linear)


def test_digit_cnn_architecture_blocks_and_size() -> None:
    m = DigitCNN()
    assert [name for name, _ in m.blocks()] == DIGIT_BLOCKS
    assert sum(p.numel() for p in m.parameters()) == 390_410
    assert m.head.in_features == 256 and m.head.out_features == 10
    assert list(m.trainable_blocks(1)) == [
        "extractor.fc1.1.weight",
        "extractor.fc1.1.bias",
        "head.weight",
        "head.bias",
    ]


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 783), (2, 32, 32), (2, 1, 1, 28, 28)])
def test_digit_cnn_rejects_other_image_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(DataError, match=r"images|square|28x28"):
        DigitCNN().features(torch.zeros(shape))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_digit_cnn_rejects_bad_num_classes(bad: object) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        DigitCNN(num_classes=bad)  # type: ignore[arg-type]


def test_digit_cnn_checkpoint_round_trip_without_paths(tmp_path: Path) -> None:
    m = DigitCNN(num_classes=4, dtype=torch.float64).eval()
    path = save_checkpoint(m, tmp_path / "cnn.safetensors", metadata={"seed": 1})
    info = read_checkpoint_info(path)
    assert info.model == "digit_cnn"
    assert info.config == {"num_classes": 4, "head_bias": True, "dtype": {"__torch_dtype__": "float64"}}
    back = load_checkpoint(path).eval()
    assert type(back) is DigitCNN
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values(), strict=True)
    )
    x = torch.rand(3, 784, generator=_gen(), dtype=torch.float64)
    assert torch.equal(back(x), m(x))


def test_digit_cnn_checkpoint_follows_a_replaced_head(tmp_path: Path) -> None:
    m = DigitCNN()
    m.head = nn.Linear(256, 1, bias=False)  # what an attack's fresh head looks like
    back = load_checkpoint(save_checkpoint(m, tmp_path / "cnn.safetensors"))
    assert back.head.out_features == 1 and back.head.bias is None


def test_pretrained_digit_cnn_loads_the_package_layout(weights_file) -> None:
    source = DigitCNN()
    weights_file(_package_keys(source))
    m = DigitCNN(pretrained=True)
    assert weights_file.requested == ["digit_cnn"]
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), m.state_dict().values(), strict=True)
    )


def test_pretrained_digit_cnn_with_another_head_keeps_a_fresh_head(weights_file, caplog) -> None:
    source = DigitCNN()
    weights_file(_package_keys(source))
    with caplog.at_level("INFO", logger="immunekit.models.vision"):
        m = DigitCNN(num_classes=2, pretrained=True)
    assert torch.equal(m.extractor.conv1[0].weight, source.extractor.conv1[0].weight)
    assert m.head.weight.shape == (2, 256)
    assert "head is newly initialised" in caplog.text


def test_pretrained_file_that_does_not_fit_is_refused(weights_file) -> None:
    keys = _package_keys(DigitCNN())
    keys["conv_layers.0.weight"] = torch.zeros(16, 1, 3, 3)
    weights_file(keys)
    with pytest.raises(AssetError, match=r"does not fit DigitCNN.*extractor.conv1.0.weight: file \(16"):
        DigitCNN(pretrained=True)
    del keys["conv_layers.0.weight"]
    weights_file(keys)
    with pytest.raises(AssetError, match=r"missing \['extractor.conv1.0.weight'\]"):
        DigitCNN(pretrained=True)
    weights_file({**_package_keys(DigitCNN()), "extra.weight": torch.zeros(1)})
    with pytest.raises(AssetError, match=r"unexpected tensor 'extra\.weight'"):
        DigitCNN(pretrained=True)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled arbitrary code",))


def test_pretrained_loading_never_unpickles_objects(weights_file, capsys) -> None:
    path = weights_file({"conv_layers.0.weight": torch.zeros(1)})
    path.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))  # a plain pickle, not even a torch zip file
    with pytest.raises(AssetError, match="weights_only=True"):
        DigitCNN(pretrained=True)
    weights_file({"conv_layers.0.weight": _Evil()})
    with pytest.raises(AssetError, match="weights_only=True"):
        DigitCNN(pretrained=True)
    assert "unpickled" not in capsys.readouterr().out


def test_pretrained_file_must_be_a_state_dict(weights_file) -> None:
    weights_file([torch.zeros(1)])
    with pytest.raises(AssetError, match="not a state_dict of tensors"):
        DigitCNN(pretrained=True)


def test_unpretrained_models_never_touch_assets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision, "_asset_file", lambda name: pytest.fail(f"asset {name} requested"))
    DigitCNN()


def test_both_models_are_registered() -> None:
    assert {"digit_cnn", "efficientnet_lite0"} <= set(MODELS.names())


# --- input transform ------------------------------------------------------------------------------


def test_as_images_layouts() -> None:
    assert as_images(torch.zeros(2, 16)).shape == (2, 1, 4, 4)
    assert as_images(torch.zeros(2, 5, 5)).shape == (2, 1, 5, 5)
    assert as_images(torch.zeros(2, 3, 5, 5), channels=(1, 3)).shape == (2, 3, 5, 5)
    with pytest.raises(DataError, match="not square"):
        as_images(torch.zeros(2, 15))


def test_gray_to_imagenet_resizes_repeats_and_normalises() -> None:
    t = GrayToImageNet(64)
    out = t(torch.full((2, 784), 0.5))
    assert out.shape == (2, 3, 64, 64)
    expected = [(0.5 - m) / s for m, s in zip(vision.IMAGENET_MEAN, vision.IMAGENET_STD, strict=True)]
    for c in range(3):
        assert torch.allclose(out[:, c], torch.full((2, 64, 64), expected[c]), atol=1e-6)
    x = torch.rand(2, 1, 28, 28, generator=_gen())
    up = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(t(x)[:, 1], (up[:, 0] - 0.456) / 0.224, atol=1e-6)
    rgb = torch.rand(2, 3, 64, 64, generator=_gen(1))
    assert torch.allclose(t(rgb)[:, 2], (rgb[:, 2] - 0.406) / 0.225, atol=1e-6)  # no resize at 64
    assert dict(t.state_dict()) == {}  # constants are not checkpointed


# --- EfficientNetLite0 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet_package():
    return pytest.importorskip("efficientnet_lite_pytorch")


def test_efficientnet_shapes_and_blocks(effnet_package) -> None:
    m = EfficientNetLite0(num_classes=7).eval()
    x = torch.rand(2, 784, generator=_gen())
    feats = m.features(x)
    assert feats.shape == (2, 1280)
    assert bool(torch.isfinite(feats).all()) and bool((feats >= 0).all()) and bool((feats <= 6).all())
    assert m(x.reshape(2, 28, 28)).shape == (2, 7)
    assert [name for name, _ in m.blocks()] == EFFNET_BLOCKS
    assert [len(m.extractor.get_submodule(f"stage{s}")) for s in range(1, 8)] == [1, 2, 2, 3, 3, 4, 1]
    assert sum(p.numel() for p in m.parameters()) == 3_371_008 + 1280 * 7 + 7
    chosen = m.trainable_blocks(2)
    assert {name.split(".")[1] for name in chosen if name.startswith("extractor.")} == {"stage7", "top"}


@pytest.mark.parametrize("size", [0, 48, 65])
def test_efficientnet_rejects_bad_image_size(effnet_package, size: int) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        EfficientNetLite0(image_size=size)


def test_efficientnet_checkpoint_round_trip(effnet_package, tmp_path: Path) -> None:
    m = EfficientNetLite0(num_classes=3, image_size=32).eval()
    path = save_checkpoint(m, tmp_path / "effnet.safetensors")
    info = read_checkpoint_info(path)
    assert info.model == "efficientnet_lite0"
    assert info.config == {
        "num_classes": 3,
        "image_size": 32,
        "head_bias": True,
        "dtype": {"__torch_dtype__": "float32"},
    }
    back = load_checkpoint(path).eval()
    assert type(back) is EfficientNetLite0
    x = torch.rand(2, 28, 28, generator=_gen())
    assert torch.equal(back.features(x), m.features(x))


def test_pretrained_efficientnet_matches_the_package_forward(effnet_package, weights_file) -> None:
    """Regrouping into stages changes names only: the package's state_dict gives its own logits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = effnet_package.EfficientNet.from_name("efficientnet-lite0", image_size=32).eval()
    weights_file(net.state_dict())
    m = EfficientNetLite0(num_classes=1000, image_size=32, pretrained=True).eval()
    assert weights_file.requested == ["efficientnet_lite0"]
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    mean, std = torch.tensor(vision.IMAGENET_MEAN), torch.tensor(vision.IMAGENET_STD)
    with torch.no_grad():
        expected = net((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        assert torch.allclose(m(x), expected, rtol=0, atol=1e-5)
    fresh_head = EfficientNetLite0(num_classes=5, image_size=32, pretrained=True)
    assert torch.equal(fresh_head.extractor.top[0].weight, net._conv_head.weight)


# --- real pretrained weights ----------------------------------------------------------------------


@pytest.mark.assets
def test_pretrained_digit_cnn_mnist_test_accuracy(asset) -> None:
    """99.06 % on MNIST's 10,000 test images with the MNIST standardisation; 98.5 % on [0, 1]."""
    from immunekit.data import mnist

    asset("digit_cnn")
    asset("mnist")
    data = mnist.load_mnist()
    x = torch.from_numpy(data.images("test"))
    y = torch.from_numpy(data.labels("test"))
    m = DigitCNN(pretrained=True).eval()

    def correct(inputs: torch.Tensor) -> int:
        with torch.no_grad():
            pred = torch.cat([m(inputs[i : i + 2000]).argmax(1) for i in range(0, len(inputs), 2000)])
        return int((pred == y).sum())

    standardised = correct((x - vision.MNIST_MEAN) / vision.MNIST_STD)
    unit = correct(x)
    assert abs(standardised - 9906) <= 3  # the package's stated 99.06 %
    assert 9800 < unit < standardised


@pytest.mark.assets
def test_pretrained_efficientnet_features_on_fashion_mnist(asset, effnet_package, request) -> None:
    from conftest import assets_selected
    from immunekit.data.fashion_mnist import load_fashion_mnist

    asset("efficientnet_lite0")
    try:
        images = load_fashion_mnist().images("test")[:32]
    except AssetError as exc:
        if "sha256 mismatch" in str(exc) or assets_selected(request.config):
            pytest.fail(f"Fashion-MNIST could not be loaded: {exc}")
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")
    m = EfficientNetLite0(num_classes=10, pretrained=True).eval()
    with torch.no_grad():
        feats = m.features(images)
    assert feats.shape == (32, 1280)
    assert bool(torch.isfinite(feats).all())
    assert float(feats.std(dim=0).mean()) > 1e-3  # the images are told apart
    weights = torch.load(vision._asset_file("efficientnet_lite0"), weights_only=True)
    assert torch.equal(m.extractor.stage7[0]._project_conv.weight, weights["_blocks.15._project_conv.weight"])

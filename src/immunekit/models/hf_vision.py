"""Hugging Face ``transformers`` ResNet and ViT backbones as immunizable models (extractor + head).

The deep variant of the condition-number defense (docs/methods/condition_number.md §6) trains
only the last convolutional stage of a ResNet (ResNet18's ``layer4``) or the final transformer
block of a ViT, and reads features from the pooled output (ResNet) or from the CLS token after the
final LayerNorm (ViT). The two models here expose exactly that through :meth:`blocks`:

* :class:`HFResNet`: ``transformers.ResNetModel`` as the extractor. Blocks are the embedder (stem
  convolution and max-pool) and the stages; features are the global-average-pooled output of the
  last stage, flattened to ``(N, hidden_sizes[-1])``.
* :class:`HFViT`: ``transformers.ViTModel`` (without its pooler) as the extractor. Blocks are the
  embeddings and the transformer layers, the final LayerNorm folded into the last layer's block
  (so "the last block" is what §6 trains); features are the CLS token of the final LayerNorm's
  output, ``(N, hidden_size)``.

The head is a new ``nn.Linear(features, num_classes)``. By default both are built from small
configurations sized for 28×28 grayscale digits on a CPU (:func:`small_resnet_config`,
:func:`small_vit_config`); :meth:`HFResNet.from_pretrained_dir` and
:meth:`HFViT.from_pretrained_dir` load full-scale weights (e.g. the ``microsoft/resnet-18`` or
``google/vit-base-patch16-224`` layouts) from a **local folder only** (``local_files_only=True``:
nothing is ever downloaded from the Hugging Face hub).

Inputs may be ``(N, H·W)``, ``(N, H, W)`` or ``(N, C, H, W)``; a gray channel is repeated when
the configuration has three channels. Inputs are used as given: resize and normalise them as the
backbone expects (the small configurations: MNIST-standardised 28×28 pixels; full-scale
checkpoints: their ``preprocessor_config.json``).

Checkpoints (:func:`~immunekit.models.save_checkpoint`) record the transformers configuration as
a JSON dict (without ``transformers_version`` and the label maps) plus the head's width, and
rebuild from their own tensors. The ``state_dict`` keys follow the installed transformers' module
layout (transformers 5 names ViT's layers ``extractor.layers.<i>``, transformers 4
``extractor.encoder.layer.<i>``), so a checkpoint is read by the transformers major version that
wrote it. Randomness follows torch's defaults: construction draws from the global RNG, which the
caller seeds (library code never does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from immunekit.config import check_int
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.models.checkpoint import register_model
from immunekit.models.vision import as_images

logger = logging.getLogger(__name__)

TRANSFORMERS_REQUIREMENT = "transformers>=4.40"
#: Keys of a transformers config that do not describe the architecture (or change what the forward
#: returns) and are not stored.
_DROPPED_KEYS = (
    "transformers_version",
    "id2label",
    "label2id",
    "_name_or_path",
    "architectures",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
)


def small_resnet_config() -> dict[str, Any]:
    """A ResNet of three basic stages for 28×28 grayscale digits (77,744 backbone parameters).

    Spatial sizes for a 28×28 input: stem conv 7×7/2 -> 14, max-pool 3×3/2 -> 7, stage 0 (stride 1)
    -> 7, stage 1 -> 4, stage 2 -> 2; features are the 64 channels averaged over the final 2×2.

    Returns:
        Keyword arguments of ``transformers.ResNetConfig``.

    Example:
        >>> small_resnet_config()["hidden_sizes"]
        [16, 32, 64]

    """
    return {
        "num_channels": 1,
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64],
        "depths": [1, 1, 1],
        "layer_type": "basic",
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
    }


def small_vit_config() -> dict[str, Any]:
    """A 4-layer ViT for 28×28 grayscale digits: 7×7 patches (16 tokens + CLS), width 64.

    Returns:
        Keyword arguments of ``transformers.ViTConfig`` (4 heads, MLP width 128, no dropout).

    Example:
        >>> small_vit_config()["patch_size"]
        7

    """
    return {
        "image_size": 28,
        "patch_size": 7,
        "num_channels": 1,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def resnet_output_size(config: Mapping[str, Any], side: int) -> int:
    """Side of the last stage's feature map for a ``side × side`` input (before pooling).

    Args:
        config: ResNet configuration (``depths`` and ``downsample_in_first_stage`` are read).
        side: input height and width.

    Returns:
        The output side: the stem halves it twice (conv 7×7 stride 2 padding 3, max-pool 3×3
        stride 2 padding 1), every stage but the first halves it (rounding up), the first too
        when ``downsample_in_first_stage``.

    Example:
        >>> resnet_output_size(small_resnet_config(), 28)
        2

    """
    side = (side + 2 * 3 - 7) // 2 + 1
    side = (side + 2 * 1 - 3) // 2 + 1
    for i in range(len(config.get("depths", [3, 4, 6, 3]))):
        if i > 0 or config.get("downsample_in_first_stage", False):
            side = (side - 1) // 2 + 1
    return side


# --- the common part ------------------------------------------------------------------------------


class _HFVisionModel(ImmunizableModel):
    """A transformers vision backbone plus a linear head; subclasses say how to build and read it."""

    extractor: nn.Module
    head: nn.Linear

    #: ``config.model_type`` of the wrapped transformers model.
    MODEL_TYPE: ClassVar[str]

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        num_classes: int = 10,
        *,
        head_bias: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes)
        hf_config = self._make_config(self.default_config() if config is None else config)
        self._setup(self._build(hf_config), num_classes, head_bias, dtype)

    # subclass hooks
    @staticmethod
    def default_config() -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _config_class(cls) -> Any:
        raise NotImplementedError

    @classmethod
    def _build(cls, hf_config: Any) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def _load(cls, path: Path, classifier: bool) -> tuple[nn.Module, nn.Linear | None]:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        """Width D of :meth:`features`."""
        raise NotImplementedError

    def _backbone_features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    # shared logic
    @classmethod
    def _make_config(cls, config: Mapping[str, Any]) -> Any:
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"config must be a mapping of {cls._config_class().__name__} arguments, "
                f"got a {type(config).__name__}"
            )
        model_type = config.get("model_type", cls.MODEL_TYPE)
        if model_type != cls.MODEL_TYPE:
            raise ConfigError(
                f"{cls.__name__} wraps transformers {cls.MODEL_TYPE!r} models, but the config is of "
                f"model_type {model_type!r}"
            )
        kwargs = {k: v for k, v in config.items() if k not in ("model_type", *_DROPPED_KEYS)}
        try:
            return cls._config_class()(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid {cls.__name__} config {dict(config)}: {err}") from err

    def _setup(self, backbone: nn.Module, num_classes: int, head_bias: bool, dtype: torch.dtype) -> None:
        self.extractor = backbone
        self.head = nn.Linear(self.feature_dim, num_classes, bias=head_bias)
        self.to(dtype)

    @property
    def hf_config(self) -> Any:
        """The wrapped model's ``transformers`` configuration object."""
        return self.extractor.config

    @property
    def num_channels(self) -> int:
        """Input channels the backbone expects."""
        return int(self.hf_config.num_channels)

    def config_dict(self) -> dict[str, Any]:
        """The transformers configuration as plain JSON (no version or label maps)."""
        raw = json.loads(self.hf_config.to_json_string(use_diff=False))
        return {k: v for k, v in sorted(raw.items()) if k not in _DROPPED_KEYS}

    def checkpoint_config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this architecture (weights come from the checkpoint)."""
        return {
            "config": self.config_dict(),
            "num_classes": self.head.out_features,
            "head_bias": self.head.bias is not None,
            "dtype": self.head.weight.dtype,
        }

    def pixels(self, x: Tensor) -> Tensor:
        """Reshape ``x`` to the backbone's ``(N, C, H, W)`` input in the parameters' dtype.

        Args:
            x: ``(N, H·W)``, ``(N, H, W)`` or ``(N, C, H, W)`` with ``C`` the configured channel
                count (or 1, repeated when the backbone expects 3 channels).

        Raises:
            DataError: another shape or channel count.

        """
        channels = (1, self.num_channels)
        img = as_images(x, channels=tuple(sorted(set(channels))))
        if img.shape[1] != self.num_channels:
            img = img.expand(-1, self.num_channels, -1, -1)
        return img.to(self.head.weight.dtype)

    def features(self, x: Tensor) -> Tensor:
        """Features Φ(x), ``(N, D)`` with ``D = feature_dim`` (see the class docstring)."""
        return self._backbone_features(self.pixels(x))

    @classmethod
    def from_pretrained_dir(
        cls,
        path: str | Path,
        num_classes: int | None = None,
        *,
        head_bias: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Any:
        """Load full-scale weights saved by ``save_pretrained`` from a local folder (never the hub).

        Args:
            path: a folder with ``config.json`` and ``model.safetensors`` (or
                ``pytorch_model.bin``), e.g. a snapshot of ``microsoft/resnet-18``. Read with
                ``local_files_only=True``.
            num_classes: width of a new, randomly initialised head (global RNG). ``None`` loads
                the folder's image classifier as the head (its ``num_labels`` outputs); the folder
                must then hold an ``...ForImageClassification`` model.
            head_bias: whether a new head has a bias (the loaded classifier has one).
            dtype: parameter dtype.

        Returns:
            The model, in training mode.

        Raises:
            ConfigError: ``path`` is not a folder, has no ``config.json``, holds another
                architecture, its weights cannot be read, ``num_classes=None`` but it has no
                classifier, or transformers is not installed.

        """
        folder = Path(path).expanduser()
        what = f"a local folder of a transformers {cls.MODEL_TYPE!r} model (config.json + weights)"
        if not folder.is_dir():
            state = "does not exist" if not folder.exists() else "is a file, not a folder"
            raise ConfigError(
                f"{str(folder)!r} {state}; {cls.__name__}.from_pretrained_dir needs {what}. immunekit "
                "never downloads from the Hugging Face hub: fetch the snapshot yourself (e.g. "
                "`hf download microsoft/resnet-18 --local-dir <dir>`) and pass that folder"
            )
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{str(folder)!r} has no config.json, so it is not {what}")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ConfigError(f"{config_file}: not a transformers config ({err})") from err
        if model_type != cls.MODEL_TYPE:
            other = {"resnet": "HFResNet", "vit": "HFViT"}.get(str(model_type))
            hint = f"; load it with {other}.from_pretrained_dir" if other else ""
            raise ConfigError(f"{str(folder)!r} holds a {model_type!r} model, not {cls.MODEL_TYPE!r}{hint}")
        if num_classes is not None:
            check_int("num_classes", num_classes)
        backbone, classifier = cls._load(folder, classifier=num_classes is None)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        if classifier is None:
            obj._setup(backbone, num_classes or 1, head_bias, dtype)
        else:
            obj._setup(backbone, classifier.out_features, True, dtype)
            with torch.no_grad():
                obj.head.weight.copy_(classifier.weight)
                if obj.head.bias is not None and classifier.bias is not None:
                    obj.head.bias.copy_(classifier.bias)
        logger.info(
            "%s: loaded %s (%d parameters) from %s",
            cls.__name__,
            model_type,
            sum(p.numel() for p in obj.parameters()),
            folder,
        )
        return obj


def _load_from_dir(loader: Any, folder: Path, **kwargs: Any) -> tuple[Any, Any]:
    """``loader.from_pretrained(folder, local_files_only=True)`` with readable errors."""
    try:
        model, info = loader.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"cannot load the transformers model in {str(folder)!r} (local files only): {err}"
        ) from err
    return model, info


def _check_classifier(folder: Path, info: Mapping[str, Any]) -> None:
    missing = [k for k in info.get("missing_keys", []) if "classifier" in k]
    if missing:
        raise ConfigError(
            f"{str(folder)!r} has no image classifier weights (missing {missing}); pass num_classes=<n> "
            "for a new head"
        )


def require_transformers(who: str, requirement: str = TRANSFORMERS_REQUIREMENT) -> Any:
    """The ``transformers`` module, or a ConfigError saying that ``who`` needs ``requirement`` and how."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            f"{who} need{'s' if ' and ' not in who else ''} {requirement}; install it with "
            f"`pip install '{requirement}'` (or immunekit's [hf] extra)"
        ) from exc
    return transformers


def _transformers() -> Any:
    return require_transformers("HFResNet and HFViT")


# --- ResNet ---------------------------------------------------------------------------------------


@register_model("hf_resnet")
class HFResNet(_HFVisionModel):
    """``transformers.ResNetModel`` with a linear head on its pooled output.

    Layout (the default :func:`small_resnet_config`, a 28×28 input)::

        input     (N, 784) | (N, 28, 28) | (N, 1, 28, 28)         -> (N, 1, 28, 28)
        embedder  conv 7×7/2 (16), BN, ReLU, max-pool 3×3/2       -> (N, 16, 7, 7)
        stage 0   basic block (16)                                -> (N, 16, 7, 7)
        stage 1   basic block (32), stride 2                      -> (N, 32, 4, 4)
        stage 2   basic block (64), stride 2                      -> (N, 64, 2, 2)
        pooler    global average pool, flatten                    -> (N, 64)   = features
        head      Linear(64, num_classes)

    :meth:`blocks` is ``extractor.embedder, extractor.encoder.stages.0, …`` (for ResNet-18,
    ``stages.3`` is torchvision's ``layer4``, so ``trainable_blocks(1)`` is §6's setting).
    BatchNorm uses batch statistics in ``train()``; call ``eval()`` for the running statistics.

    Args:
        config: ``transformers.ResNetConfig`` arguments; ``None``: :func:`small_resnet_config`.
        num_classes: head outputs.
        head_bias: whether the head has a bias.
        dtype: parameter dtype.

    Raises:
        ConfigError: bad ``num_classes`` or config, or transformers is not installed.

    Example:
        >>> m = HFResNet(num_classes=3)
        >>> m(torch.zeros(2, 784)).shape
        torch.Size([2, 3])

    """

    MODEL_TYPE = "resnet"

    @staticmethod
    def default_config() -> dict[str, Any]:
        return small_resnet_config()

    @classmethod
    def _config_class(cls) -> Any:
        return _transformers().ResNetConfig

    @classmethod
    def _build(cls, hf_config: Any) -> nn.Module:
        return _transformers().ResNetModel(hf_config)

    @classmethod
    def _load(cls, path: Path, classifier: bool) -> tuple[nn.Module, nn.Linear | None]:
        tf = _transformers()
        if not classifier:
            return _load_from_dir(tf.ResNetModel, path)[0], None
        model, info = _load_from_dir(tf.ResNetForImageClassification, path)
        _check_classifier(path, info)
        linear = next(m for m in model.classifier.modules() if isinstance(m, nn.Linear))
        return model.resnet, linear

    @property
    def feature_dim(self) -> int:
        """Width of the pooled output, ``hidden_sizes[-1]``."""
        return int(self.hf_config.hidden_sizes[-1])

    def _backbone_features(self, pixels: Tensor) -> Tensor:
        return self.extractor(pixel_values=pixels).pooler_output.flatten(1)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``[("extractor.embedder", …), ("extractor.encoder.stages.0", …), …]``, input side first."""
        stages = self.extractor.get_submodule("encoder.stages")
        return [("extractor.embedder", self.extractor.get_submodule("embedder"))] + [
            (f"extractor.encoder.stages.{i}", stage) for i, stage in enumerate(stages.children())
        ]


# --- ViT ------------------------------------------------------------------------------------------


@register_model("hf_vit")
class HFViT(_HFVisionModel):
    """``transformers.ViTModel`` (no pooler) with a linear head on the final-LayerNorm CLS token.

    Layout (the default :func:`small_vit_config`, a 28×28 input)::

        input       (N, 784) | (N, 28, 28) | (N, 1, 28, 28)       -> (N, 1, 28, 28)
        embeddings  7×7 patches -> 16 tokens + CLS, positions      -> (N, 17, 64)
        layer 0…3   pre-norm transformer layers (4 heads, MLP 128) -> (N, 17, 64)
        layernorm   final LayerNorm, CLS token                     -> (N, 64)   = features
        head        Linear(64, num_classes)

    :meth:`blocks` is the embeddings, then one block per transformer layer; the last block is
    named ``"<last layer>+extractor.layernorm"`` and holds the final LayerNorm too, so
    ``trainable_blocks(1)`` trains the final transformer block and the norm that produces the
    features (§6). Inputs must have the configured ``image_size`` (no position interpolation).

    Args:
        config: ``transformers.ViTConfig`` arguments; ``None``: :func:`small_vit_config`.
        num_classes: head outputs.
        head_bias: whether the head has a bias.
        dtype: parameter dtype.

    Raises:
        ConfigError: bad ``num_classes`` or config, or transformers is not installed.

    Example:
        >>> m = HFViT(num_classes=3)
        >>> m.features(torch.zeros(2, 28, 28)).shape
        torch.Size([2, 64])

    """

    MODEL_TYPE = "vit"

    @staticmethod
    def default_config() -> dict[str, Any]:
        return small_vit_config()

    @classmethod
    def _config_class(cls) -> Any:
        return _transformers().ViTConfig

    @classmethod
    def _build(cls, hf_config: Any) -> nn.Module:
        return _transformers().ViTModel(hf_config, add_pooling_layer=False)

    @classmethod
    def _load(cls, path: Path, classifier: bool) -> tuple[nn.Module, nn.Linear | None]:
        tf = _transformers()
        if not classifier:
            return _load_from_dir(tf.ViTModel, path, add_pooling_layer=False)[0], None
        model, info = _load_from_dir(tf.ViTForImageClassification, path)
        _check_classifier(path, info)
        if not isinstance(model.classifier, nn.Linear):
            raise ConfigError(f"{str(path)!r}: the ViT classifier is not a linear layer")
        return model.vit, model.classifier

    @property
    def feature_dim(self) -> int:
        """Width of the CLS token, ``hidden_size``."""
        return int(self.hf_config.hidden_size)

    def _backbone_features(self, pixels: Tensor) -> Tensor:
        size = self.hf_config.image_size
        side = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(pixels.shape[-2:]) != side:
            raise DataError(
                f"{type(self).__name__} expects {side[0]}x{side[1]} images (config image_size), got "
                f"{tuple(pixels.shape[-2:])}; resize the inputs first"
            )
        # last_hidden_state is the final LayerNorm's output; token 0 is CLS.
        return self.extractor(pixel_values=pixels).last_hidden_state[:, 0]

    def _layers(self) -> tuple[str, nn.ModuleList]:
        """Path and module of the transformer layers (transformers 5: ``layers``; 4: ``encoder.layer``)."""
        for path in ("layers", "encoder.layer"):
            try:
                module = self.extractor.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                return f"extractor.{path}", module
        raise ConfigError(
            f"cannot find the transformer layers of this transformers version's ViTModel; "
            f"supported: {TRANSFORMERS_REQUIREMENT} layouts"
        )

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Embeddings, then each transformer layer; the last also holds the final LayerNorm.

        Returns:
            ``[("extractor.embeddings", …), ("extractor.layers.0", …), …,
            ("extractor.layers.<L-1>+extractor.layernorm", ModuleList([layer, layernorm]))]``
            (transformers 4: ``extractor.encoder.layer.<i>``). The last module is a container
            built on each call; its parameters are the model's own.

        """
        prefix, layers = self._layers()
        out = [("extractor.embeddings", self.extractor.get_submodule("embeddings"))]
        out += [(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)]
        last_name, last = out[-1]
        norm = self.extractor.get_submodule("layernorm")
        out[-1] = (f"{last_name}+extractor.layernorm", nn.ModuleList([last, norm]))
        return out

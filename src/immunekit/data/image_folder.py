"""Image folders: class-per-folder images decoded on demand, and tasks built from two such folders.

Layout of one split (the common "image folder" convention)::

    root/<class>/<image>        e.g. root/cat/0001.png, root/dog/img_17.JPG

* **images**: files ending in ``.png``, ``.jpg``, ``.jpeg``, ``.bmp`` or ``.webp`` (any case), found
  recursively under each class folder; other files and hidden entries (names starting with ``.``)
  are ignored.
* **labels**: the class folders' names sorted as Python strings, numbered 0, 1, …; the map is kept in
  :attr:`ImageFolderSplit.class_to_idx` (and in ``Task.info``).
* **ids**: each image's path relative to ``id_root`` (default: the split's root), with ``/``
  separators; the task's disjointness checks hash them, so no image is read to build a task.
* **decoding**: :meth:`ImageFolderSplit.rows` opens the requested files with Pillow, converts them
  to ``mode`` (``"L"``: 1 channel, ``"RGB"``: 3) and, when ``resize=(H, W)`` is given, resizes them
  with Pillow's bilinear filter to exactly H × W (aspect ratio not kept); the result is float32
  ``(B, C, H, W)`` in [0, 1] (8-bit values / 255). Without ``resize`` every image must have the
  size of the first one.

A task (:func:`image_folder_task`) takes a primary and a harmful folder, each with a fixed
``train/`` and ``test/`` subfolder in the layout above (``test_subdir="val"`` for ImageNet-style
folders). A fixed split rather than a seeded fraction: large image collections ship with one, and
it keeps the held-out rows the same for every seed and every run.

Pillow is needed only here and imported on first use (``pip install pillow``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from immunekit.data.task import Task, iter_batches
from immunekit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""File endings read as images (compared case-insensitively)."""

MODES: dict[str, int] = {"L": 1, "RGB": 3}
"""Pillow modes images are converted to, with their channel counts."""

VERSION = "image-folder-v1"
"""``Task.version`` of tasks built by :func:`image_folder_task` (layout and decoding rules above)."""


def _pil() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError(
            "reading image folders needs Pillow, which is not installed: pip install pillow"
        ) from exc
    return Image


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _check_resize(resize: Sequence[int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    size = tuple(resize)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise ConfigError(
            f"resize must be (height, width) with two integers >= 1, got {resize!r}; e.g. (28, 28)"
        )
    return size[0], size[1]


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, symlinks followed), in sorted path order."""
    found: list[Path] = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(here) / f for f in sorted(files) if _is_image(f))
    return found


class ImageFolderSplit:
    """A split of class-per-folder images, decoded on demand (a :class:`~immunekit.data.task.Split`).

    Only the file list and the labels are held in memory; :meth:`rows` decodes the requested images.
    See the module docstring for the layout, labels, ids and decoding rules.

    Args:
        root: folder with one subfolder per class (``root/<class>/<image>``).
        mode: ``"L"`` (grayscale, C = 1) or ``"RGB"`` (C = 3).
        resize: ``(H, W)`` to resize every image to (bilinear), or ``None`` to keep sizes (which
            must then all be equal).
        classes: class names in label order; default: the sorted class folder names. Given, every
            class folder must be one of them (a class may lack a folder), so a test split can share
            its training split's map.
        id_root: folder the ids are relative to (an ancestor of ``root``); default ``root``.
        verify: open every image's header now (not its pixels) so that an undecodable file or, without
            ``resize``, a size mismatch is reported before any training; ``False`` skips that scan on
            very large folders, and such a file then raises when :meth:`rows` reads it.

    Attributes:
        root: the split's folder.
        classes: class names, index = label.
        class_to_idx: ``{class name: label}``.
        files: image paths relative to ``root`` (``/`` separators), in row order.
        mode: the Pillow mode.
        resize: ``(H, W)`` or ``None``.

    Raises:
        DataError: ``root`` missing or not a folder; no class folders; no images; a class folder
            without images; a class folder not in ``classes``; ``id_root`` not above ``root``; (with
            ``verify``) an undecodable file or mixed sizes without ``resize``.
        ConfigError: an unknown ``mode`` or an invalid ``resize``; Pillow missing.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for name in ("cat", "dog"):
        ...         os.makedirs(f"{tmp}/{name}")
        ...         Image.new("L", (4, 3), 255).save(f"{tmp}/{name}/a.png")
        ...     split = ImageFolderSplit(tmp, mode="L")
        ...     x, y = split.rows(torch.tensor([1, 0]))
        >>> split.item_shape, tuple(x.shape), y.tolist(), split.ids
        ((1, 3, 4), (2, 1, 3, 4), [1, 0], ('cat/a.png', 'dog/a.png'))

    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        mode: Literal["L", "RGB"] = "RGB",
        resize: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        id_root: str | os.PathLike[str] | None = None,
        verify: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(
                f"mode must be one of {list(MODES)}, got {mode!r}; 'L' for grayscale, 'RGB' for colour"
            )
        self.mode: Literal["L", "RGB"] = mode
        self.resize = _check_resize(resize)
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DataError(
                f"image folder {self.root} {what}; pass a folder laid out as {self.root}/<class>/<image>"
            )
        base = Path(id_root) if id_root is not None else self.root
        prefix = Path(os.path.relpath(os.path.abspath(self.root), os.path.abspath(base))).as_posix()
        if prefix == ".." or prefix.startswith("../"):
            raise DataError(f"id_root {base} does not contain {self.root}; pass a parent folder of root")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = tuple(classes) if classes is not None else tuple(folders)
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must be distinct, got {list(self.classes)}; list each class once")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self._check_folders(folders, classes is not None)
        files, labels = self._list(folders)
        self.files = tuple(files)
        self._labels = torch.tensor(labels, dtype=torch.long)
        self._ids = tuple(f if prefix == "." else f"{prefix}/{f}" for f in self.files)
        self.item_shape = self._shape(verify)
        log.info(
            "image folder: %d images in %d classes, rows %s", len(self.files), len(folders), self.item_shape
        )

    def _check_folders(self, folders: list[str], given: bool) -> None:
        if not folders:
            loose = [p for p in self.root.iterdir() if p.is_file() and _is_image(p.name)]
            hint = f" ({len(loose)} images lie directly in it)" if loose else ""
            raise DataError(
                f"image folder {self.root} has no class folders{hint}; put the images of each class in "
                f"its own subfolder, {self.root}/<class>/<image>"
            )
        unknown = [f for f in folders if f not in self.class_to_idx]
        if given and unknown:
            raise DataError(
                f"image folder {self.root} has class folders {unknown} that are not among the given classes "
                f"{list(self.classes)}; remove them or add them to the training split's classes"
            )

    def _list(self, folders: list[str]) -> tuple[list[str], list[int]]:
        per_class = {name: _images_under(self.root / name) for name in folders}
        if not any(per_class.values()):
            raise DataError(
                f"image folder {self.root} has no images (files ending in {', '.join(IMAGE_EXTENSIONS)}) "
                f"in its class folders; add images as {self.root}/<class>/<image>"
            )
        files: list[str] = []
        labels: list[int] = []
        for name in sorted(folders, key=self.class_to_idx.__getitem__):
            found = per_class[name]
            if not found:
                raise DataError(
                    f"class folder {self.root / name} has no images (files ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
            files.extend(p.relative_to(self.root).as_posix() for p in found)
            labels.extend([self.class_to_idx[name]] * len(found))
        return files, labels

    def _shape(self, verify: bool) -> tuple[int, ...]:
        channels = MODES[self.mode]
        if self.resize is not None and not verify:
            return (channels, *self.resize)
        image = _pil()
        first: tuple[int, int] | None = None
        for rel in self.files if verify else self.files[:1]:
            path = self.root / rel
            try:
                with image.open(path) as im:
                    size = im.size  # (W, H), from the header only
            except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
                raise DataError(_undecodable(path, exc)) from exc
            if first is None:
                first = size
            elif self.resize is None and size != first:
                raise DataError(_mixed(path, size, self.root / self.files[0], first))
        assert first is not None  # _list guarantees at least one image
        height, width = self.resize if self.resize is not None else (first[1], first[0])
        return (channels, height, width)

    @property
    def y(self) -> Tensor:
        """Class labels ``(N,)`` int64."""
        return self._labels

    @property
    def ids(self) -> tuple[str, ...]:
        """Image paths relative to ``id_root`` (``/`` separators), in row order."""
        return self._ids

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (
            f"ImageFolderSplit(root={str(self.root)!r}, rows={len(self)}, classes={len(self.classes)}, "
            f"item_shape={self.item_shape})"
        )

    def load(self, row: int) -> Tensor:
        """Decode image ``row``: float32 ``(C, H, W)`` in [0, 1].

        Raises:
            DataError: the file is not a decodable image, or (no ``resize``) its size differs from
                the split's.

        """
        path = self.root / self.files[row]
        try:
            with _pil().open(path) as im:
                im = im.convert(self.mode)
                if self.resize is not None:
                    height, width = self.resize
                    im = im.resize((width, height), resample=_pil().Resampling.BILINEAR)
                pixels = np.array(im, dtype=np.uint8)  # a copy: (H, W) or (H, W, 3)
        except (OSError, ValueError) as exc:
            raise DataError(_undecodable(path, exc)) from exc
        chw = torch.from_numpy(pixels).reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)
        if tuple(chw.shape) != self.item_shape:
            size = (int(chw.shape[2]), int(chw.shape[1]))
            raise DataError(
                _mixed(path, size, self.root / self.files[0], (self.item_shape[2], self.item_shape[1]))
            )
        return chw.to(torch.float32) / 255.0

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded images ``(B, C, H, W)`` float32 in [0, 1] and labels ``(B,)`` of rows ``idx`` ``(B,)``."""
        rows = idx.reshape(-1).tolist()
        x = torch.empty((len(rows), *self.item_shape), dtype=torch.float32)
        for k, row in enumerate(rows):
            x[k] = self.load(row)
        return x, self._labels[idx.reshape(-1)]

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Mini-batches of decoded images (:func:`~immunekit.data.task.iter_batches`)."""
        return iter_batches(self, batch_size, generator=generator, drop_last=drop_last)

    def row_hashes(self) -> set[str]:
        """sha256 of each id (relative path): two splits overlap when they list the same file."""
        return {hashlib.sha256(i.encode()).hexdigest() for i in self._ids}

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for ``Task.info``: root, rows, class map, mode and resize."""
        return {
            "root": str(self.root),
            "rows": len(self),
            "class_to_idx": dict(self.class_to_idx),
            "mode": self.mode,
            "resize": list(self.resize) if self.resize is not None else None,
            "item_shape": list(self.item_shape),
        }


def _undecodable(path: Path, exc: Exception) -> str:
    return (
        f"{path} is not a decodable image ({type(exc).__name__}: {exc}); delete or replace it, or rename "
        f"it so it does not end in {'/'.join(IMAGE_EXTENSIONS)}"
    )


def _mixed(path: Path, size: tuple[int, int], first: Path, first_size: tuple[int, int]) -> str:
    return (
        f"images differ in size: {path} is {size[1]}×{size[0]} (H×W) but {first} is "
        f"{first_size[1]}×{first_size[0]}; pass resize=(H, W) to scale every image to one size"
    )


def image_folder_task(
    primary_dir: str | os.PathLike[str],
    harmful_dir: str | os.PathLike[str],
    *,
    mode: Literal["L", "RGB"] = "RGB",
    resize: Sequence[int] | None = None,
    train_subdir: str = "train",
    test_subdir: str = "test",
    name: str = "image_folder",
    verify: bool = True,
) -> Task[ImageFolderSplit]:
    """A classification task from a primary and a harmful image folder (``--primary-dir/--harmful-dir``).

    Each folder holds a fixed split: ``<dir>/train/<class>/<image>`` and ``<dir>/test/<class>/<image>``
    (subfolder names ``train_subdir`` / ``test_subdir``). The splits are

    * ``primary`` = primary ``train``; ``eval_primary`` = primary ``test``;
    * ``harmful`` = ``attack`` = harmful ``train`` (the defender's and the attacker's harmful data);
      ``eval_harmful`` = harmful ``test``.

    Each domain numbers its classes from its ``train`` folder's sorted class names (the test folder
    uses the same map; a test class absent from training is an error). Ids are paths relative to the
    domain folder (``train/cat/1.png``), so train and test rows never collide by name. Loss ``ce``.

    Args:
        primary_dir: the primary task's folder.
        harmful_dir: the harmful task's folder.
        mode: ``"L"`` or ``"RGB"`` for every split.
        resize: ``(H, W)`` for every split, or ``None`` (every image of both folders the same size).
        train_subdir: name of the training subfolder.
        test_subdir: name of the held-out subfolder (``"val"`` for ImageNet-style folders).
        name: the task's name.
        verify: scan every image header up front (see :class:`ImageFolderSplit`).

    Returns:
        A ``Task[ImageFolderSplit]``; ``info`` records each split's root, rows and class map.

    Raises:
        DataError: a folder or subfolder missing (the message gives the expected layout), any
            :class:`ImageFolderSplit` error, or primary and harmful images of different shapes.

    """
    splits: dict[str, ImageFolderSplit] = {}
    for domain, folder in (("primary", Path(primary_dir)), ("harmful", Path(harmful_dir))):
        if not folder.is_dir():
            raise DataError(
                f"{domain} image folder {folder} does not exist; pass a folder with {train_subdir}/ and "
                f"{test_subdir}/ subfolders, each laid out as <class>/<image>"
            )
        for sub in (train_subdir, test_subdir):
            if not (folder / sub).is_dir():
                raise DataError(
                    f"{domain} image folder {folder} has no {sub!r} subfolder; lay it out as "
                    f"{folder}/{train_subdir}/<class>/<image> and {folder}/{test_subdir}/<class>/<image>"
                    + (" (pass test_subdir='val' for a 'val' folder)" if (folder / "val").is_dir() else "")
                )
        common: dict[str, Any] = {"mode": mode, "resize": resize, "id_root": folder, "verify": verify}
        train = ImageFolderSplit(folder / train_subdir, **common)
        splits[domain] = train
        splits[f"eval_{domain}"] = ImageFolderSplit(folder / test_subdir, classes=train.classes, **common)
    info = {
        "source": "image_folder",
        "layout": f"<dir>/{train_subdir}/<class>/<image> and <dir>/{test_subdir}/<class>/<image>",
        "mode": mode,
        "resize": list(splits["primary"].resize) if splits["primary"].resize is not None else None,
        "splits": {k: v.describe() for k, v in splits.items()},
        "n_rows": {k: len(v) for k, v in splits.items()},
    }
    return Task[ImageFolderSplit](
        name=name,
        version=VERSION,
        loss="ce",
        primary=splits["primary"],
        harmful=splits["harmful"],
        attack=splits["harmful"],
        eval_primary=splits["eval_primary"],
        eval_harmful=splits["eval_harmful"],
        info=info,
    )

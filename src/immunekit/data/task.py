"""Tasks: the splits a defender, an attacker and an evaluator use, with disjointness checks."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from typing_extensions import TypeVar  # PEP 696 defaults (typing has them from 3.13); a torch dependency

from immunekit.errors import DataError


@runtime_checkable
class Split(Protocol):
    """One split of a :class:`Task`: inputs read on demand, targets and ids held in memory.

    The contract through which training, evaluation and measurement code reads a split, so that a
    split which decodes its rows lazily (:class:`immunekit.data.image_folder.ImageFolderSplit`)
    can stand in for the in-memory :class:`Dataset`. Inputs are only read through :meth:`rows`
    (or :meth:`batches`); targets are small and held whole in :attr:`y`, so label statistics
    (:attr:`Task.classes`, head widths, loss targets) never touch the inputs.

    Attributes:
        y: targets of every row, ``(N,)`` (regression value or class index) or ``(N, C)``.
        ids: stable row identifiers, ``N`` strings, or ``()`` (rows are then hashed by content).
        item_shape: shape of one input row, e.g. ``(784,)`` or ``(3, 224, 224)``.

    """

    @property
    def y(self) -> Tensor: ...

    @property
    def ids(self) -> tuple[str, ...]: ...

    @property
    def item_shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs ``(B, *item_shape)`` and targets ``(B, ...)`` of the rows ``idx`` (``(B,)`` long)."""
        ...

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive ``(x, y)`` mini-batches of at most ``batch_size`` rows (as :func:`iter_batches`)."""
        ...

    def row_hashes(self) -> set[str]:
        """sha256 hex digests identifying the rows, compared for disjointness between splits."""
        ...


def iter_batches(
    split: Split, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive ``(x, y)`` mini-batches of ``split``, read through :meth:`Split.rows`.

    Args:
        split: the split.
        batch_size: rows per batch (>= 1).
        generator: shuffles the rows with one ``torch.randperm(len(split))`` when given (seeded
            order); file order when ``None`` (evaluation).
        drop_last: skip a final batch shorter than ``batch_size``.

    Yields:
        ``(x, y)``: inputs ``(B, *item_shape)`` and targets ``(B, ...)`` with B <= ``batch_size``.

    Raises:
        DataError: ``batch_size`` < 1.

    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield split.rows(order[start : start + batch_size])


@dataclass(frozen=True)
class Dataset:
    """Inputs and targets of one split, held in memory: the default :class:`Split`.

    Attributes:
        x: inputs, ``(N, D)`` for tabular/flattened data.
        y: targets, ``(N,)`` (regression value or class index) or ``(N, C)``.
        ids: stable row identifiers (e.g. source row index), used for disjointness checks and
            records; never the data itself.

    """

    x: Tensor
    y: Tensor
    ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.x.ndim < 2:
            raise DataError(
                f"x must be at least 2-D (N, D), got shape {tuple(self.x.shape)}; "
                "reshape with x.reshape(len(x), -1)"
            )
        if self.y.shape[0] != self.x.shape[0]:
            raise DataError(
                f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}; pass one target per input row"
            )
        if self.ids and len(self.ids) != self.x.shape[0]:
            raise DataError(f"ids has {len(self.ids)} entries for {self.x.shape[0]} rows")
        if self.x.is_floating_point() and not bool(torch.isfinite(self.x).all()):
            bad = int((~torch.isfinite(self.x)).sum())
            raise DataError(f"x contains {bad} NaN/Inf values; impute or drop them before building the task")
        if self.y.is_floating_point() and not bool(torch.isfinite(self.y).all()):
            raise DataError("y contains NaN/Inf values; drop those rows before building the task")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one input row, e.g. ``(784,)`` or ``(1, 28, 28)``."""
        return tuple(self.x.shape[1:])

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the rows ``idx`` (``(B,)`` long): ``(x[idx], y[idx])``.

        The one way deep training and evaluation code reads a split, so that a split which decodes
        its rows on demand (image folders) can stand in for this in-memory one.
        """
        return self.x[idx], self.y[idx]

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive ``(x, y)`` mini-batches of at most ``batch_size`` rows.

        Args:
            batch_size: rows per batch (>= 1).
            generator: shuffles the rows with ``torch.randperm`` when given (seeded order); in
                file order when ``None`` (evaluation).
            drop_last: skip a final batch shorter than ``batch_size``.

        Raises:
            DataError: ``batch_size`` < 1.

        Example:
            >>> d = Dataset(torch.arange(10.0).reshape(5, 2), torch.arange(5))
            >>> [len(y) for _, y in d.batches(2)]
            [2, 2, 1]

        """
        if generator is not None or batch_size < 1:
            yield from iter_batches(self, batch_size, generator=generator, drop_last=drop_last)
            return
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):  # file order: views of x and y, no copy
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def row_hashes(self) -> set[str]:
        """sha256 of each row's identifier, or of its input bytes when no ids are given."""
        if self.ids:
            return {hashlib.sha256(i.encode()).hexdigest() for i in self.ids}
        if len(self) == 0:  # reshape(0, -1) is ambiguous
            return set()
        rows = self.x.detach().to(torch.float64).reshape(len(self), -1).cpu().numpy()
        return {hashlib.sha256(r.tobytes()).hexdigest() for r in rows}


class SubsetSplit:
    """The rows ``index`` of another split, read through its :meth:`Split.rows` (a view, no copy).

    Args:
        parent: the split the rows come from.
        index: ``(K,)`` long row numbers of ``parent``, in the order the subset lists them.

    Raises:
        DataError: ``index`` is not 1-D or names a row outside ``parent``.

    """

    def __init__(self, parent: Split, index: Tensor) -> None:
        if index.ndim != 1 or (len(index) and not (int(index.min()) >= 0 and int(index.max()) < len(parent))):
            raise DataError(
                f"subset rows must be a 1-D tensor of indices in [0, {len(parent)}), got shape "
                f"{tuple(index.shape)}; pick rows of the parent split"
            )
        self.parent, self.index = parent, index.long()
        self._y = parent.y.index_select(0, self.index)
        self._ids = tuple(parent.ids[i] for i in index.tolist()) if parent.ids else ()

    @property
    def y(self) -> Tensor:
        """Targets of the subset's rows."""
        return self._y

    @property
    def ids(self) -> tuple[str, ...]:
        """The parent's ids of the subset's rows."""
        return self._ids

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The parent's row shape."""
        return self.parent.item_shape

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the subset rows ``idx`` (the parent's rows ``index[idx]``)."""
        return self.parent.rows(self.index[idx])

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Mini-batches of the subset (:func:`iter_batches`)."""
        return iter_batches(self, batch_size, generator=generator, drop_last=drop_last)

    def row_hashes(self) -> set[str]:
        """Hashes of the subset's ids, or (no ids) the parent's content hashes of these rows."""
        if self._ids:
            return {hashlib.sha256(i.encode()).hexdigest() for i in self._ids}
        x, _ = self.parent.rows(self.index)
        rows = x.detach().to(torch.float64).reshape(len(self), -1).cpu().numpy()
        return {hashlib.sha256(r.tobytes()).hexdigest() for r in rows}


def take(split: Split, index: Tensor) -> Split:
    """The rows ``index`` (``(K,)`` long) of ``split`` as a split of their own.

    An in-memory :class:`Dataset` gives a :class:`Dataset` of the selected rows (copied, as
    ``x.index_select``); any other split a :class:`SubsetSplit` view that reads the parent's rows
    on demand.

    Example:
        >>> d = Dataset(torch.arange(8.0).reshape(4, 2), torch.arange(4), ("a", "b", "c", "d"))
        >>> take(d, torch.tensor([2, 0])).ids
        ('c', 'a')

    """
    if isinstance(split, Dataset):
        return Dataset(
            split.x.index_select(0, index),
            split.y.index_select(0, index),
            tuple(split.ids[i] for i in index.tolist()) if split.ids else (),
        )
    return SubsetSplit(split, index)


S = TypeVar("S", bound=Split, default=Dataset, covariant=True)
"""The split type of a :class:`Task`: ``Task`` alone means ``Task[Dataset]`` (in-memory tensors)."""


SPLITS: tuple[str, ...] = (
    "primary",
    "harmful",
    "attack",
    "eval_primary",
    "eval_harmful",
    "val_harmful",
    "attack_disjoint",
    "attack_cross",
)
"""Every split name of a :class:`Task`; the last three are optional (``None`` when absent)."""

OPTIONAL_SPLITS: tuple[str, ...] = ("val_harmful", "attack_disjoint", "attack_cross")

OPTIONAL_DISJOINT: tuple[tuple[str, str], ...] = (
    ("val_harmful", "eval_harmful"),
    ("val_harmful", "attack"),
    ("val_harmful", "attack_disjoint"),
    ("val_harmful", "attack_cross"),
    ("attack_disjoint", "harmful"),
    ("attack_disjoint", "eval_harmful"),
    ("attack_cross", "harmful"),
    ("attack_cross", "eval_harmful"),
)
"""Pairs (split, other) of an optional split that must share no row with the other (both present)."""


@dataclass(frozen=True, kw_only=True)
class Task(Generic[S]):
    """A primary task (keep it useful) and a harmful task (make it hard), with all splits.

    Every split is a :class:`Split`. ``Task`` alone is ``Task[Dataset]`` (in-memory tensors, what
    the linear code reads through ``.x``); code that reads splits only through the protocol
    (``rows``, ``batches``, ``y``) takes a ``Task[Split]`` and so accepts streaming splits too,
    e.g. ``Task[ImageFolderSplit]`` from :func:`immunekit.data.image_folder.image_folder_task`.

    Attributes:
        name: registry name of the task.
        version: data version string (asset package and protocol), recorded in results.
        loss: ``"mse"`` (regression), ``"ce"`` (classification) or ``"lm"``.
        primary: primary-task training data the defender may use.
        harmful: harmful-task data the defender may use (inputs; labels only for defenses that need them).
        attack: harmful data the attacker fine-tunes on.
        eval_primary: held-out primary data.
        eval_harmful: held-out harmful data; must be disjoint from ``harmful``.
        val_harmful: optional attacker's validation split (harmful rows the attacker's hyper-parameter
            search scores trials on); disjoint from ``eval_harmful`` and from every split the attacker
            trains on (``attack``, ``attack_disjoint``, ``attack_cross``), so a search never tunes on
            the reported split or on its own training rows. ``None`` when the task has none.
        attack_disjoint: optional in-domain generalization data: harmful rows of the same domain
            disjoint from ``harmful`` (the defender's data) and from ``eval_harmful``.
        attack_cross: optional cross-domain harmful data (a second harmful domain), disjoint from
            ``harmful`` and ``eval_harmful``; ``None`` makes the cross-domain check NOT-RUN.
        info: free-form, JSON-serialisable facts about the data (sizes, preprocessing).

    """

    name: str
    version: str
    loss: Literal["mse", "ce", "lm"]
    primary: S
    harmful: S
    attack: S
    eval_primary: S
    eval_harmful: S
    val_harmful: S | None = None
    attack_disjoint: S | None = None
    attack_cross: S | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SPLITS:
            value = getattr(self, name)
            if not (value is None and name in OPTIONAL_SPLITS) and not isinstance(value, Split):
                raise DataError(
                    f"split {name!r} of task {self.name!r} is a {type(value).__name__}, not a Split; "
                    "wrap tensors as Dataset(x, y, ids) or pass a split such as ImageFolderSplit"
                )
        _check_disjoint("eval_harmful", self.eval_harmful, "harmful", self.harmful)
        _check_disjoint("eval_harmful", self.eval_harmful, "attack", self.attack)
        _check_disjoint("eval_primary", self.eval_primary, "primary", self.primary)
        for a_name, b_name in OPTIONAL_DISJOINT:
            a, b = getattr(self, a_name), getattr(self, b_name)
            if a is not None and b is not None:
                _check_disjoint(a_name, a, b_name, b)
        present = [s for s in SPLITS if getattr(self, s) is not None]
        dims = {s: tuple(getattr(self, s).item_shape) for s in present}
        if len(set(dims.values())) != 1:
            raise DataError(
                f"all splits must share the input shape (item_shape), got {dims}; build every split "
                "with the same preprocessing (e.g. one resize for every image folder)"
            )

    @property
    def input_dim(self) -> int:
        """Flattened input dimension D (the product of the splits' ``item_shape``)."""
        return math.prod(self.primary.item_shape)

    @property
    def classes(self) -> int:
        """Number of classes C of a ``ce`` task: 1 + the largest label of any split; 0 otherwise.

        The one definition every attack, defense and measurement uses (a split that lacks the
        largest class must not shrink a probe's output layer). Reads the targets ``y`` only, never
        the inputs.
        """
        if self.loss != "ce":
            return 0
        present = [getattr(self, s) for s in SPLITS if getattr(self, s) is not None]
        return 1 + max(int(d.y.max()) for d in present if len(d))


def _check_disjoint(a_name: str, a: Split, b_name: str, b: Split) -> None:
    overlap = a.row_hashes() & b.row_hashes()
    if overlap:
        if a_name in OPTIONAL_SPLITS:
            raise DataError(f"split {a_name!r} shares {len(overlap)} rows with {b_name!r}; {_WHY[a_name]}")
        raise DataError(
            f"held-out split {a_name!r} shares {len(overlap)} rows with {b_name!r}; "
            "split the data so evaluation rows are never seen in training"
        )


_WHY = {
    "val_harmful": (
        "the attacker's validation rows must be unseen by its training splits and distinct from the "
        "reported eval_harmful rows; draw them from other harmful rows"
    ),
    "attack_disjoint": (
        "in-domain generalization needs harmful rows the defender (harmful) and the evaluation "
        "(eval_harmful) never see; draw them from other harmful rows"
    ),
    "attack_cross": (
        "cross-domain attack data must come from a second harmful domain, never from the defender's "
        "harmful rows or eval_harmful"
    ),
}

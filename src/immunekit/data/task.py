"""Tasks: the splits a defender, an attacker and an evaluator use, with disjointness checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from immunekit.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Inputs and targets of one split.

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
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.rows(order[start : start + batch_size])

    def row_hashes(self) -> set[str]:
        """sha256 of each row's identifier, or of its input bytes when no ids are given."""
        if self.ids:
            return {hashlib.sha256(i.encode()).hexdigest() for i in self.ids}
        rows = self.x.detach().to(torch.float64).reshape(len(self), -1).cpu().numpy()
        return {hashlib.sha256(r.tobytes()).hexdigest() for r in rows}


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
class Task:
    """A primary task (keep it useful) and a harmful task (make it hard), with all splits.

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
    primary: Dataset
    harmful: Dataset
    attack: Dataset
    eval_primary: Dataset
    eval_harmful: Dataset
    val_harmful: Dataset | None = None
    attack_disjoint: Dataset | None = None
    attack_cross: Dataset | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_disjoint("eval_harmful", self.eval_harmful, "harmful", self.harmful)
        _check_disjoint("eval_harmful", self.eval_harmful, "attack", self.attack)
        _check_disjoint("eval_primary", self.eval_primary, "primary", self.primary)
        for a_name, b_name in OPTIONAL_DISJOINT:
            a, b = getattr(self, a_name), getattr(self, b_name)
            if a is not None and b is not None:
                _check_disjoint(a_name, a, b_name, b)
        present = [s for s in SPLITS if getattr(self, s) is not None]
        dims = {s: getattr(self, s).x.shape[1:] for s in present}
        if len(set(dims.values())) != 1:
            raise DataError(f"all splits must share the input shape, got {dims}")

    @property
    def input_dim(self) -> int:
        """Flattened input dimension D."""
        return int(self.primary.x[0].numel())

    @property
    def classes(self) -> int:
        """Number of classes C of a ``ce`` task: 1 + the largest label of any split; 0 otherwise.

        The one definition every attack, defense and measurement uses (a split that lacks the
        largest class must not shrink a probe's output layer).
        """
        if self.loss != "ce":
            return 0
        present = [getattr(self, s) for s in SPLITS if getattr(self, s) is not None]
        return 1 + max(int(d.y.max()) for d in present if len(d))


def _check_disjoint(a_name: str, a: Dataset, b_name: str, b: Dataset) -> None:
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

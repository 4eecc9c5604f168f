"""The ImmunizableModel contract and the linear extractor of the condition-number theory."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from immunekit.errors import ConfigError


class ImmunizableModel(nn.Module):
    """A feature extractor followed by a head.

    Subclasses set ``extractor`` and ``head``; :meth:`features` maps ``(N, ...)`` inputs to
    ``(N, D)`` features, and :meth:`forward` is ``head(features(x))``.
    """

    extractor: nn.Module
    head: nn.Module

    def features(self, x: Tensor) -> Tensor:
        """Features Φ(x), shape ``(N, D)``."""
        return self.extractor(x).reshape(x.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        """Head applied to features, ``(N, out)``."""
        return self.head(self.features(x))

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The extractor's blocks, input side first, each with a name.

        Partial fine-tuning and deep defenses act on "the last k blocks" (arXiv 2505.23760 trains
        ResNet18's ``layer4`` or ViT's final transformer block); this is where a model says what its
        blocks are. The default is the extractor's **parameterised** named children in order,
        named by their path in the model (``"extractor.0"``); children without parameters
        (activations, pooling, flatten) are not blocks. An extractor without parameterised
        children (e.g. ``nn.Linear``) is one block, ``"extractor"``; one without parameters has
        none. This matches the blocks ``partial_finetune`` counts. Subclasses override it when
        their natural blocks are not the extractor's children.

        Returns:
            ``[(name, module), ...]`` in forward order; the modules' parameters are the extractor's.

        Example:
            >>> [name for name, _ in linear_model(3).blocks()]
            ['extractor']

        """
        kids = [(f"extractor.{name}", m) for name, m in self.extractor.named_children() if _has_params(m)]
        if kids:
            return kids
        return [("extractor", self.extractor)] if _has_params(self.extractor) else []

    def trainable_blocks(self, k: int, *, head: bool = True) -> dict[str, nn.Parameter]:
        """Parameters of the last ``k`` blocks of :meth:`blocks`, plus the head's.

        Args:
            k: how many blocks, counted from the output side (0: none; ``len(self.blocks())``:
                every block).
            head: include the head's parameters.

        Returns:
            ``{name: parameter}`` with the names of :meth:`~torch.nn.Module.named_parameters`, in
            that order (each shared parameter once). The values are the model's own parameters:
            pass ``list(result.values())`` to an optimizer, or the names to
            ``torch.func.functional_call``.

        Raises:
            ConfigError: ``k`` is negative or larger than the number of blocks.

        Example:
            >>> m = ImmunizableModel()
            >>> m.extractor = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
            >>> m.head = nn.Linear(2, 1)
            >>> list(m.trainable_blocks(1))
            ['extractor.2.weight', 'extractor.2.bias', 'head.weight', 'head.bias']

        """
        blocks = self.blocks()
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(blocks):
            raise ConfigError(
                f"k={k!r} blocks requested, but {type(self).__name__} has {len(blocks)} block(s) "
                f"({[name for name, _ in blocks]}); use an integer from 0 to {len(blocks)}"
            )
        modules = [m for _, m in blocks[len(blocks) - k :]] + ([self.head] if head else [])
        chosen = {id(p) for m in modules for p in m.parameters()}
        return {name: p for name, p in self.named_parameters() if id(p) in chosen}


class FeatureHead(ImmunizableModel):
    """An identity extractor and ``head``: the model of a probe on precomputed features.

    Its ``features`` are its inputs, ``(N, D) -> (N, D)``, so attacking it on features Φ(x) of
    another model is the probe of that model's frozen features without a second forward pass.
    ``head`` is used as given (the same module object: training this model trains it).
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.extractor = nn.Identity()
        self.head = head


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


class LinearModel(ImmunizableModel):
    """Linear extractor f_θ(x) = xᵀθ (no bias, as the theory requires) and a linear head ω.

    The extractor weight is stored as ``W = θᵀ`` (``nn.Linear`` layout); :attr:`theta` returns
    θ of shape ``(D_in, D_hid)``.

    Args:
        d_in: input dimension D_in.
        d_hid: feature dimension D_hid (default D_in, as in arXiv 2505.23760).
        d_out: head outputs.
        dtype: parameter dtype (float64 by default: the spectral quantities need it).

    """

    extractor: nn.Linear
    head: nn.Linear

    def __init__(
        self, d_in: int, d_hid: int | None = None, d_out: int = 1, *, dtype: torch.dtype = torch.float64
    ):
        super().__init__()
        if d_in < 1 or d_out < 1 or (d_hid is not None and d_hid < 1):
            raise ConfigError(f"dimensions must be >= 1, got d_in={d_in}, d_hid={d_hid}, d_out={d_out}")
        d_hid = d_in if d_hid is None else d_hid
        self.extractor = nn.Linear(d_in, d_hid, bias=False, dtype=dtype)
        self.head = nn.Linear(d_hid, d_out, bias=False, dtype=dtype)
        with torch.no_grad():
            if d_hid == d_in:
                self.extractor.weight.copy_(torch.eye(d_in, dtype=dtype))
            self.head.weight.zero_()

    @property
    def theta(self) -> Tensor:
        """θ = Wᵀ, ``(D_in, D_hid)`` (a detached float64 copy)."""
        return self.extractor.weight.detach().T.to(torch.float64).clone()

    @property
    def omega(self) -> Tensor:
        """Head weights ω, ``(D_hid, d_out)`` (a detached float64 copy)."""
        return self.head.weight.detach().T.to(torch.float64).clone()

    def with_weights(self, theta: Tensor, omega: Tensor | None = None) -> LinearModel:
        """A new LinearModel with the given θ ``(D_in, D_hid)`` and ω ``(D_hid, d_out)``."""
        d_in, d_hid = theta.shape
        d_out = self.head.out_features if omega is None else omega.reshape(d_hid, -1).shape[1]
        dtype = self.extractor.weight.dtype
        new = LinearModel(d_in, d_hid, d_out, dtype=dtype)
        with torch.no_grad():
            new.extractor.weight.copy_(theta.T.to(dtype))
            if omega is not None:
                new.head.weight.copy_(omega.reshape(d_hid, d_out).T.to(dtype))
            elif self.head.in_features == d_hid:
                new.head.weight.copy_(self.head.weight)
        return new


def linear_model(d_in: int, d_hid: int | None = None, d_out: int = 1) -> LinearModel:
    """Identity-initialised linear extractor with a zero head (θ_0 = I, ω_0 = 0).

    Example:
        >>> m = linear_model(3)
        >>> bool(torch.equal(m.theta, torch.eye(3, dtype=torch.float64)))
        True

    """
    return LinearModel(d_in, d_hid, d_out)

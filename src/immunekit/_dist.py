"""Data parallelism for the deep training loops: a no-op on one process, torch.distributed under a launcher.

Under ``torchrun --nproc_per_node N`` or ``accelerate launch`` (DESIGN.md §5) every process runs the
same loop on the same seeded batch order; :class:`DataParallel` gives each process its shard of
every global batch and keeps their parameters identical:

* :meth:`DataParallel.shard`: rows ``r, r + W, r + 2W, …`` of a global batch of B rows for rank r of
  W processes (B must be a multiple of W, so every shard has B/W rows and a mean over shards is the
  mean over the batch);
* :meth:`DataParallel.gather`: the features of the whole global batch, ``(B, D)``, in global-batch
  order, with a gradient that flows back to this process's own rows only. A spectral term such as
  R_ill(Φ_HᵀΦ_H) is not a sum over rows, so every process computes it on the gathered batch;
* :meth:`DataParallel.average_gradients`: all-reduce the gradients and divide by W, which is what
  DistributedDataParallel does after backward, written out so that only the trainable blocks (the
  last k) are reduced and no unused-parameter search is needed.

Why the per-process loss is ``task(shard) + W · spectral(gathered)``: the global objective is
L = (1/W) Σ_r task_r + spectral(Φ). Process r back-propagates only through its own rows of Φ, so its
gradient of W·spectral is W·∂spectral/∂Φ_r·∂Φ_r/∂θ; averaging over the W processes gives
(1/W) Σ_r ∂task_r/∂θ + Σ_r ∂spectral/∂Φ_r·∂Φ_r/∂θ = ∂L/∂θ. :attr:`DataParallel.spectral_scale`
is that W (1 on one process), and :meth:`DataParallel.scale_gathered` applies it. A gradient of a
single term (e.g. for a λ rule) is made global by :meth:`DataParallel.global_gradient`: the mean
over processes for a term on the shard, the sum for a term on gathered features.

On one process every method returns its input unchanged (no arithmetic, no copy), so a loop
written through this shim gives bit-identical numbers with and without it.

The process group is initialised through Hugging Face accelerate's process state (the singleton an
``accelerate.Accelerator`` shares; ``cpu=True`` without CUDA, gloo) when the launcher's environment
says there is more than one process; accelerate is imported only then (extra ``immunekit[dist]``).
A process group started that way is destroyed when the interpreter exits (``atexit``): without it
a gloo process could abort at exit ("terminate called without an active exception") and the
launcher would report the run as failed.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from immunekit.errors import ConfigError

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, accelerate launch) started: ``WORLD_SIZE`` or 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class _GatherRows(torch.autograd.Function):
    """all_gather along rows; backward returns this rank's slice of the incoming gradient only."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, world: int, rank: int) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(parts, t.contiguous())
        ctx.rank, ctx.rows = rank, t.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None, None


def _destroy_process_group() -> None:
    """At exit: shut down the process group :class:`DataParallel` started.

    No barrier first, so a process that stops on an error does not wait for the others.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_exit_hook: list[bool] = []  # registered once per interpreter


def _all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over the processes in place, one collective per (dtype, device) bucket.

    Every process must pass tensors of the same shapes in the same order.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for group in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        start = 0
        for t in group:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()


class DataParallel:
    """The process group of a data-parallel run, or a single process (every method a no-op).

    Args:
        accelerator: an ``accelerate.Accelerator`` (or ``accelerate.PartialState``) whose process
            group to use; ``None`` detects a launch: more than one process in ``WORLD_SIZE`` starts
            (or joins) accelerate's process state (``cpu=not torch.cuda.is_available()``), one
            process gives the no-op object.
        detect: with ``False`` and no ``accelerator``, the no-op object whatever the environment
            says (e.g. for a fit that must stay on one process inside a launched job).

    Attributes:
        world_size: W, the number of processes.
        rank: this process's index r.
        accelerator: the accelerate object in use, or ``None`` on one process.

    Raises:
        ConfigError: a launch with WORLD_SIZE > 1 without accelerate installed.

    """

    def __init__(self, accelerator: Any | None = None, *, detect: bool = True) -> None:
        self.accelerator = accelerator
        if accelerator is None and detect and launched_world_size() > 1:
            try:
                from accelerate import PartialState
            except ImportError:
                raise ConfigError(
                    f"a data-parallel launch (WORLD_SIZE={launched_world_size()}) needs accelerate: pip "
                    'install "immunekit[dist]", or run without torchrun / accelerate launch'
                ) from None
            started_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
            # the shared state an Accelerator builds on: joins one the caller already started
            self.accelerator = PartialState(cpu=not torch.cuda.is_available())
            if started_here and torch.distributed.is_initialized() and not _exit_hook:
                atexit.register(_destroy_process_group)
                _exit_hook.append(True)
        if self.accelerator is not None:
            self.world_size = int(self.accelerator.num_processes)
            self.rank = int(self.accelerator.process_index)
        else:
            self.world_size, self.rank = 1, 0
        if self.world_size > 1:
            log.debug("data parallel: process %d of %d", self.rank, self.world_size)

    @classmethod
    def one_process(cls) -> DataParallel:
        """The no-op object, whatever the launcher's environment says."""
        return cls(detect=False)

    def __repr__(self) -> str:
        return f"DataParallel(world_size={self.world_size}, rank={self.rank})"

    @property
    def is_main(self) -> bool:
        """Whether this process writes results (rank 0)."""
        return self.rank == 0

    @property
    def spectral_scale(self) -> float:
        """W: the weight of a term computed on gathered features in the per-process loss."""
        return float(self.world_size)

    def scale_gathered(self, term: Tensor) -> Tensor:
        """W·``term`` for a term computed on :meth:`gather`-ed rows; ``term`` itself on one process."""
        return term if self.world_size == 1 else self.spectral_scale * term

    def check_batch(self, rows: int, what: str) -> None:
        """Raise unless a global batch of ``rows`` splits evenly over the processes.

        Raises:
            ConfigError: ``rows`` is not a multiple of the world size (naming both and the fix).

        """
        if rows % self.world_size:
            raise ConfigError(
                f"{what} has {rows} rows, which {self.world_size} processes cannot share evenly; use a "
                f"batch size that is a multiple of {self.world_size}"
            )

    def shard(self, idx: Tensor) -> Tensor:
        """The rows of the global batch ``idx`` this process computes: every W-th, ``(B,)`` → ``(B/W,)``."""
        return idx if self.world_size == 1 else idx[self.rank :: self.world_size]

    def gather(self, t: Tensor) -> Tensor:
        """Rows of every process, ``(B/W, …)`` → ``(B, …)`` in global-batch order; identity on one process.

        The gradient of the result flows back to this process's rows only (see the module docstring
        for why the loss then weights gathered terms by :attr:`spectral_scale`). Tensors without a
        gradient (e.g. integer labels) are gathered the same way.
        """
        if self.world_size == 1:
            return t
        out = _GatherRows.apply(t, self.world_size, self.rank)
        # shards hold rows r, r + W, …: put the gathered blocks back in global-batch order
        order = torch.arange(out.shape[0]).reshape(self.world_size, -1).T.reshape(-1)
        return out[order.to(out.device)]

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """All-reduce (sum) every parameter's gradient and divide by W; a no-op on one process.

        Parameters whose ``grad`` is ``None`` are skipped; which ones are must be the same on every
        process (it is when every process runs the same graph).
        """
        if self.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        _all_reduce_sum(grads)
        for g in grads:
            g.div_(self.world_size)

    def global_gradient(self, grads: Sequence[Tensor | None], *, gathered: bool) -> tuple[Tensor | None, ...]:
        """The gradient of one term of the global objective from this process's gradient of it.

        Args:
            grads: this process's gradient of the term (e.g. ``torch.autograd.grad``; ``None`` for
                an unused parameter, the same entries on every process).
            gathered: the term is computed on :meth:`gather`-ed rows (its global gradient is the
                sum over processes, i.e. the mean of the W-scaled gradients the loss uses); otherwise
                it is a mean over this process's shard (the global gradient is the mean).

        Returns:
            New tensors (``grads`` is not modified); ``grads`` itself on one process.

        """
        if self.world_size == 1:
            return tuple(grads)
        out = tuple(None if g is None else g.detach().clone() for g in grads)
        present = [g for g in out if g is not None]
        _all_reduce_sum(present)
        if not gathered:
            for g in present:
                g.div_(self.world_size)
        return out

    def all_same(self, value: float) -> float:
        """The mean of ``value`` over the processes (e.g. a logged loss); ``value`` on one process."""
        if self.world_size == 1:
            return value
        device = getattr(self.accelerator, "device", None) or torch.device("cpu")
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world_size


__all__ = ["DataParallel", "launched_world_size"]

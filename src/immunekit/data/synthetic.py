"""Synthetic tasks with designed spectra (unit tests and demos only; never a benchmark).

Inputs of each domain are x = z · diag(√γ) · Qᵀ with z ~ N(0, I), so E[xxᵀ] = Q diag(γ) Qᵀ.
The primary and harmful domains get independent random eigenbases, which is what lets one θ
make H_H ill-conditioned while keeping H_P well-conditioned (Prop. 3.2 of arXiv 2505.23760).
"""

from __future__ import annotations

import torch

from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError


def _domain(n: int, dim: int, cond: float, gen: torch.Generator, prefix: str, loss: str) -> Dataset:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    gamma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), dim, dtype=torch.float64)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * gamma.sqrt() @ q.T
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    signal = x @ w
    noise = 0.1 * signal.std() * torch.randn(n, generator=gen, dtype=torch.float64)
    y = signal + noise
    if loss == "ce":
        y = (y > y.median()).long()
    ids = tuple(f"{prefix}:{i}" for i in range(n))
    return Dataset(x, y, ids)


def _split(data: Dataset, n_train: int) -> tuple[Dataset, Dataset]:
    head = Dataset(data.x[:n_train], data.y[:n_train], data.ids[:n_train])
    tail = Dataset(data.x[n_train:], data.y[n_train:], data.ids[n_train:])
    return head, tail


def gaussian_spectra(
    *,
    dim: int = 16,
    n: int = 512,
    cond_primary: float = 10.0,
    cond_harmful: float = 10.0,
    test_fraction: float = 0.25,
    loss: str = "mse",
    seed: int = 0,
) -> Task:
    """A two-domain Gaussian task with set covariance spectra and random eigenbases.

    Args:
        dim: input dimension D.
        n: rows per domain (train + test).
        cond_primary: κ of the primary covariance E[xxᵀ] (eigenvalues log-spaced in [1/κ, 1]).
        cond_harmful: κ of the harmful covariance.
        test_fraction: share of rows held out per domain.
        loss: ``"mse"`` (linear targets with 10 % noise) or ``"ce"`` (their median split).
        seed: RNG seed (the task is a pure function of its arguments).

    Returns:
        Task with ``attack`` equal to the harmful training rows.

    Example:
        >>> t = gaussian_spectra(dim=4, n=40, seed=0)
        >>> t.primary.x.shape, t.eval_harmful.x.shape
        (torch.Size([30, 4]), torch.Size([10, 4]))

    """
    if dim < 2 or n < 8 or not 0 < test_fraction < 1 or cond_primary < 1 or cond_harmful < 1:
        raise ConfigError(
            f"gaussian_spectra needs dim >= 2, n >= 8, 0 < test_fraction < 1 and conds >= 1; got "
            f"dim={dim}, n={n}, test_fraction={test_fraction}, conds=({cond_primary}, {cond_harmful})"
        )
    if loss not in ("mse", "ce"):
        raise ConfigError(f"loss must be 'mse' or 'ce', got {loss!r}")
    gen = torch.Generator().manual_seed(seed)
    n_train = n - max(1, round(n * test_fraction))
    p_tr, p_te = _split(_domain(n, dim, cond_primary, gen, "p", loss), n_train)
    h_tr, h_te = _split(_domain(n, dim, cond_harmful, gen, "h", loss), n_train)
    return Task(
        name="gaussian_spectra",
        version="synthetic-1",
        loss=loss,  # type: ignore[arg-type]
        primary=p_tr,
        harmful=h_tr,
        attack=h_tr,
        eval_primary=p_te,
        eval_harmful=h_te,
        info={"dim": dim, "n": n, "cond_primary": cond_primary, "cond_harmful": cond_harmful, "seed": seed},
    )

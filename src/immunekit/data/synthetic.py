"""Synthetic tasks with designed spectra (unit tests and demos only; never a benchmark).

Inputs of each domain are x = z · diag(√γ) · Qᵀ with z ~ N(0, I), so E[xxᵀ] = Q diag(γ) Qᵀ.
The primary and harmful domains get independent random eigenbases, which is what lets one θ
make H_H ill-conditioned while keeping H_P well-conditioned (Prop. 3.2 of arXiv 2505.23760).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError


@dataclass(frozen=True)
class _Law:
    """The law of one domain's rows.

    Attributes:
        q: ``(D, D)`` orthogonal eigenbasis of E[xxᵀ].
        gamma: ``(D,)`` eigenvalues of E[xxᵀ].
        w: ``(D,)`` target weights.
        noise_scale: 0-d, std of the additive target noise.
        threshold: 0-d label threshold for ``ce`` (``None`` for ``mse``).

    """

    q: Tensor
    gamma: Tensor
    w: Tensor
    noise_scale: Tensor
    threshold: Tensor | None


def _more_rows(law: _Law, n: int, gen: torch.Generator, prefix: str, start: int) -> Dataset:
    """``n`` further rows of a domain's ``law``, with ids ``prefix:start`` onwards."""
    dim = law.q.shape[0]
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * law.gamma.sqrt() @ law.q.T
    signal = x @ law.w
    y = signal + law.noise_scale * torch.randn(n, generator=gen, dtype=torch.float64)
    ids = tuple(f"{prefix}:{i}" for i in range(start, start + n))
    return Dataset(x, y if law.threshold is None else (y > law.threshold).long(), ids)


def _domain(
    n: int, dim: int, cond: float, gen: torch.Generator, prefix: str, loss: str
) -> tuple[Dataset, _Law]:
    """``n`` rows of a fresh random domain and its law (to draw more rows of the same domain later).

    The draws are, in order: the eigenbasis, the inputs, the target weights, the noise. The noise
    scale (10 % of the std of the first ``n`` signals) and, for ``ce``, the label threshold (the
    median of their targets) are fixed by these rows, so later rows follow the same law.
    """
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    gamma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), dim, dtype=torch.float64)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * gamma.sqrt() @ q.T
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    signal = x @ w
    noise_scale = 0.1 * signal.std()
    y = signal + noise_scale * torch.randn(n, generator=gen, dtype=torch.float64)
    threshold = None
    if loss == "ce":
        threshold = y.median()
        y = (y > threshold).long()
    ids = tuple(f"{prefix}:{i}" for i in range(n))
    return Dataset(x, y, ids), _Law(q, gamma, w, noise_scale, threshold)


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
    evaluation_splits: bool = False,
) -> Task:
    """A two-domain Gaussian task with set covariance spectra and random eigenbases.

    With ``evaluation_splits`` the harmful domain gets more rows of the same law, drawn from the
    same generator **after** every default draw (so the default splits are bit-identical either
    way): ``val_harmful`` = the next ``n_test`` rows (ids ``h:n`` …), the size of ``eval_harmful``,
    then ``attack_disjoint`` = the next ``n_train`` rows, the size of ``attack``. Neither the
    defender (``harmful``) nor the reported split (``eval_harmful``) contains them; ``attack_cross``
    stays ``None`` (one harmful domain).

    Args:
        dim: input dimension D.
        n: rows per domain (train + test).
        cond_primary: κ of the primary covariance E[xxᵀ] (eigenvalues log-spaced in [1/κ, 1]).
        cond_harmful: κ of the harmful covariance.
        test_fraction: share of rows held out per domain.
        loss: ``"mse"`` (linear targets with 10 % noise) or ``"ce"`` (their median split; extra rows
            use the same threshold).
        seed: RNG seed (the task is a pure function of its arguments).
        evaluation_splits: also build ``val_harmful`` and ``attack_disjoint`` (see above).

    Returns:
        Task with ``attack`` equal to the harmful training rows.

    Example:
        >>> t = gaussian_spectra(dim=4, n=40, seed=0)
        >>> t.primary.x.shape, t.eval_harmful.x.shape
        (torch.Size([30, 4]), torch.Size([10, 4]))
        >>> e = gaussian_spectra(dim=4, n=40, seed=0, evaluation_splits=True)
        >>> len(e.val_harmful), len(e.attack_disjoint), bool((e.eval_harmful.x == t.eval_harmful.x).all())
        (10, 30, True)

    """
    if dim < 2 or n < 8 or not 0 < test_fraction < 1 or cond_primary < 1 or cond_harmful < 1:
        raise ConfigError(
            f"gaussian_spectra needs dim >= 2, n >= 8, 0 < test_fraction < 1 and conds >= 1; got "
            f"dim={dim}, n={n}, test_fraction={test_fraction}, conds=({cond_primary}, {cond_harmful})"
        )
    if loss not in ("mse", "ce"):
        raise ConfigError(f"loss must be 'mse' or 'ce', got {loss!r}")
    if not isinstance(evaluation_splits, bool):
        raise ConfigError(f"evaluation_splits={evaluation_splits!r} is invalid; use True or False")
    gen = torch.Generator().manual_seed(seed)
    n_train = n - max(1, round(n * test_fraction))
    primary, _ = _domain(n, dim, cond_primary, gen, "p", loss)
    harmful, law = _domain(n, dim, cond_harmful, gen, "h", loss)
    p_tr, p_te = _split(primary, n_train)
    h_tr, h_te = _split(harmful, n_train)
    info: dict[str, Any] = {
        "dim": dim,
        "n": n,
        "cond_primary": cond_primary,
        "cond_harmful": cond_harmful,
        "seed": seed,
    }
    extra: dict[str, Dataset] = {}
    if evaluation_splits:
        n_test = n - n_train
        extra["val_harmful"] = _more_rows(law, n_test, gen, "h", start=n)
        extra["attack_disjoint"] = _more_rows(law, n_train, gen, "h", start=n + n_test)
        info["evaluation_splits"] = {
            "val_harmful": f"harmful rows h:{n}..h:{n + n_test - 1} drawn after the default rows",
            "attack_disjoint": (
                f"harmful rows h:{n + n_test}..h:{n + n_test + n_train - 1} drawn after val_harmful"
            ),
            "attack_cross": None,
        }
        info["n_rows"] = {"val_harmful": n_test, "attack_disjoint": n_train}
    return Task(
        name="gaussian_spectra",
        version="synthetic-1",
        loss=loss,  # type: ignore[arg-type]
        primary=p_tr,
        harmful=h_tr,
        attack=h_tr,
        eval_primary=p_te,
        eval_harmful=h_te,
        **extra,
        info=info,
    )

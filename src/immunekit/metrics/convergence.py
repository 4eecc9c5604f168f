"""Convergence metrics of attack curves."""

from __future__ import annotations

from collections.abc import Sequence


def steps_to_epsilon(norm_ratios: Sequence[float | None], epsilon: float) -> int | None:
    """First step t whose ‖w_t − w*‖²/‖w_0 − w*‖² ≤ ε.

    Args:
        norm_ratios: the curve, index t = step t (index 0 is the initial state, ratio 1).
        epsilon: threshold in (0, 1).

    Returns:
        The step index, or ``None`` when the curve never reaches ε within the budget (censored).

    Example:
        >>> steps_to_epsilon([1.0, 0.5, 0.05, 0.001], 0.01)
        3
        >>> steps_to_epsilon([1.0, 0.5], 0.01) is None
        True

    """
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}; e.g. 1e-2")
    for t, r in enumerate(norm_ratios):
        if r is not None and r <= epsilon:
            return t
    return None

"""steps_to_epsilon (spec §7.4): first-index semantics, censoring, and argument checks."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from immunekit.metrics import METRICS, steps_to_epsilon


def test_first_index_at_or_below_epsilon() -> None:
    assert steps_to_epsilon([1.0, 0.5, 0.05, 0.001], 0.01) == 3
    assert steps_to_epsilon([1.0, 0.5, 0.01, 0.001], 0.01) == 2  # equality counts
    assert steps_to_epsilon([1.0, 0.5, math.nextafter(0.01, 1.0), 0.001], 0.01) == 3


def test_first_hit_wins_even_if_the_curve_goes_back_up() -> None:
    assert steps_to_epsilon([1.0, 0.005, 0.5, 0.001], 0.01) == 1


def test_index_zero_is_the_initial_state() -> None:
    assert steps_to_epsilon([0.0, 0.0], 0.5) == 0


def test_none_when_never_reached() -> None:
    assert steps_to_epsilon([1.0, 0.5, 0.2], 0.1) is None
    assert steps_to_epsilon([], 0.1) is None


def test_none_entries_are_skipped() -> None:
    assert steps_to_epsilon([None, 0.5, None, 0.01], 0.1) == 3
    assert steps_to_epsilon([None, None], 0.1) is None


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_epsilon_outside_open_unit_interval_raises(eps: float) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        steps_to_epsilon([1.0, 0.0], eps)


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=2.0, allow_nan=False), max_size=30),
    st.floats(min_value=1e-6, max_value=0.999999),
)
def test_matches_a_reference_scan(curve: list[float], eps: float) -> None:
    expected = next((t for t, r in enumerate(curve) if r <= eps), None)
    got = steps_to_epsilon(curve, eps)
    assert got == expected
    if got is not None:
        assert curve[got] <= eps
        assert all(r > eps for r in curve[:got])


def test_registered_with_direction() -> None:
    assert METRICS.get("steps_to_epsilon") is steps_to_epsilon
    assert METRICS.meta("steps_to_epsilon")["direction"] == "higher"

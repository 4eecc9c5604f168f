"""Head-adjusted CE (MLAC): the remap solver against brute force, KKT, finite differences and invariances."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from immunekit.errors import ConfigError, DataError
from immunekit.metrics.head_adjusted import (
    RemapInfo,
    head_adjusted_ce,
    head_adjusted_ce_and_remap,
    solve_remap,
)

F64 = torch.float64
TIGHT = 1e-12  # solver tolerance of the precision tests


def _case(
    seed: int, n: int, c: int, scale: float = 2.0, signal: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) = scale·noise + signal·onehot(y), float64, and labels (N,) covering all classes."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    z = scale * torch.randn(n, c, generator=gen, dtype=F64) + signal * torch.nn.functional.one_hot(y, c)
    return z, y


def _values(z: torch.Tensor, y: torch.Tensor, Ws: torch.Tensor) -> torch.Tensor:
    """f(W) = CE(z W, y) for a batch of remaps Ws (M, C, C), written independently of the module."""
    A = torch.einsum("nc,mck->mnk", z, Ws)
    picked = A.gather(2, y.expand(Ws.shape[0], -1)[:, :, None]).squeeze(2)
    return (torch.logsumexp(A, dim=2) - picked).mean(dim=1)


def _autograd_grad(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """∇_W CE(z W, y) by autograd."""
    Wg = W.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z @ Wg, y), Wg)
    return grad


def _fista(z: torch.Tensor, y: torch.Tensor, bound: float, starts: torch.Tensor, iters: int) -> float:
    """Best value of accelerated projected gradient (autograd gradients) from many starts (M, C, C)."""
    lipschitz = 0.5 * float((z * z).sum(dim=1).mean())
    X = starts.clone()
    V = X.clone()
    t = 1.0
    best = float(_values(z, y, X).min())
    for _ in range(iters):
        Vg = V.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_values(z, y, Vg).sum(), Vg)
        X_next = (V - grad / lipschitz).clamp(-bound, bound)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        V = X_next + (t - 1) / t_next * (X_next - X)
        X, t = X_next, t_next
    return min(best, float(_values(z, y, X).min()))


def _brute_force_c2(z: torch.Tensor, y: torch.Tensor, bound: float, points: int = 21) -> float:
    """Dense grid over [−b, b]^4, then accelerated projected gradient from the 8 best grid points."""
    axis = torch.linspace(-bound, bound, points, dtype=F64)
    grid = torch.cartesian_prod(axis, axis, axis, axis).reshape(-1, 2, 2)
    values = torch.cat([_values(z, y, chunk) for chunk in grid.split(50_000)])
    best = values.argsort()[:8]
    return min(float(values[best[0]]), _fista(z, y, bound, grid[best], iters=1500))


# ---------------------------------------------------------------- value vs brute force


@pytest.mark.parametrize(
    ("seed", "bound", "signal"),
    [(0, 1.0, 0.0), (1, 1.0, 3.0), (2, 0.5, 1.0), (3, 3.0, 0.0), (4, 2.0, -2.0)],
)
def test_value_matches_brute_force_for_two_classes(seed: int, bound: float, signal: float) -> None:
    z, y = _case(seed, n=7, c=2, signal=signal)
    W, info = solve_remap(z, y, bound=bound, tol=TIGHT)
    assert info.converged and info.pg_norm <= TIGHT
    assert W.shape == (2, 2) and W.dtype == F64
    assert bool((W.abs() <= bound).all())
    value = float(_values(z, y, W[None])[0])
    assert value == pytest.approx(info.value, abs=1e-14)
    brute = _brute_force_c2(z, y, bound)
    assert value <= brute + 1e-8
    assert brute <= value + 1e-9  # the brute force found the same minimum (a check on the check)
    loss = head_adjusted_ce(z, y, bound=bound, tol=TIGHT)
    assert float(loss) == pytest.approx(value, abs=1e-13)


@pytest.mark.parametrize("seed", [0, 1])
def test_value_matches_many_restarts_for_three_classes(seed: int) -> None:
    z, y = _case(seed, n=9, c=3, signal=1.0)
    W, info = solve_remap(z, y, tol=TIGHT)
    assert info.converged and bool((W.abs() <= 1.0).all())
    gen = torch.Generator().manual_seed(100 + seed)
    starts = torch.cat(
        [2 * torch.rand(24, 3, 3, generator=gen, dtype=F64) - 1, torch.eye(3, dtype=F64)[None]]
    )
    brute = _fista(z, y, 1.0, starts, iters=1500)
    assert info.value <= brute + 1e-8
    assert brute <= info.value + 1e-9


# ---------------------------------------------------------------- optimality (KKT)


@pytest.mark.parametrize(
    ("seed", "c", "bound", "signal", "expect"),
    [
        (0, 2, 1.0, 4.0, "bound"),  # informative logits: the remap wants to scale up, against ±b
        (1, 3, 0.5, 2.0, "bound"),
        (2, 3, 10.0, 0.0, "interior"),  # random labels, wide box: an interior minimiser
        (3, 2, 0.2, -1.0, "bound"),
    ],
)
def test_kkt_conditions_hold_at_the_solution(
    seed: int, c: int, bound: float, signal: float, expect: str
) -> None:
    z, y = _case(seed, n=30, c=c, signal=signal)
    W, info = solve_remap(z, y, bound=bound, tol=TIGHT)
    assert info.converged
    grad = _autograd_grad(z, y, W)
    upper, lower = W.eq(bound), W.eq(-bound)
    inside = ~(upper | lower)
    assert bool((W.abs() <= bound).all())
    # stationary inside; at a bound, −∇f points out of the box (no feasible descent direction)
    assert bool((grad[inside].abs() <= 1e-9).all())
    assert bool((grad[upper] <= 1e-10).all())
    assert bool((grad[lower] >= -1e-10).all())
    if expect == "bound":
        assert int((upper | lower).sum()) >= 1
    else:
        assert bool(inside.all())
    # the solver's projected-gradient norm is the one computed from the autograd gradient
    projected = (W - grad).clamp(-bound, bound) - W
    assert float(projected.norm()) == pytest.approx(info.pg_norm, abs=1e-12)


# ---------------------------------------------------------------- gradient w.r.t. z (Danskin)


@pytest.mark.parametrize(
    ("seed", "c", "bound", "signal"), [(0, 2, 1.0, 1.0), (1, 3, 1.0, 1.5), (2, 3, 4.0, 0.0)]
)
def test_gradient_matches_finite_differences_of_the_min_value(
    seed: int, c: int, bound: float, signal: float
) -> None:
    z, y = _case(seed, n=8, c=c, scale=1.0, signal=signal)
    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(head_adjusted_ce(zg, y, bound=bound, tol=TIGHT), zg)

    def min_value(zz: torch.Tensor) -> float:
        _, info = solve_remap(zz, y, bound=bound, tol=TIGHT)
        assert info.converged
        return info.value

    h = 1e-5
    numeric = torch.zeros_like(z)
    for i, k in itertools.product(range(z.shape[0]), range(c)):
        step = torch.zeros_like(z)
        step[i, k] = h
        numeric[i, k] = (min_value(z + step) - min_value(z - step)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-9)
    W, _ = solve_remap(z, y, bound=bound, tol=TIGHT)
    assert 0 < int((W.abs() == bound).sum()) < c * c  # the cases mix coordinates at the bound and free ones


def test_float32_logits_give_a_float32_loss_and_gradient() -> None:
    z64, y = _case(5, n=48, c=3, signal=1.0)
    z32 = z64.float().requires_grad_(True)
    loss32 = head_adjusted_ce(z32, y)
    (grad32,) = torch.autograd.grad(loss32, z32)
    assert loss32.dtype == torch.float32 and loss32.dim() == 0 and grad32.dtype == torch.float32
    z = z64.clone().requires_grad_(True)
    loss64 = head_adjusted_ce(z, y)
    (grad64,) = torch.autograd.grad(loss64, z)
    assert loss64.dtype == F64
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- what the loss is for


@pytest.mark.parametrize("bound", [1.0, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_no_more_than_plain_ce_when_the_identity_is_feasible(seed: int, bound: float) -> None:
    z, y = _case(seed, n=20, c=3, signal=float(seed - 1))
    plain = float(torch.nn.functional.cross_entropy(z, y))
    adjusted = float(head_adjusted_ce(z, y, bound=bound, tol=TIGHT))
    assert adjusted <= plain + 1e-12
    assert adjusted < plain - 1e-3  # and the identity is not the optimum on these cases


@pytest.mark.parametrize("c", [2, 3])
def test_swapped_labels_are_undone_by_the_remap(c: int) -> None:
    gen = torch.Generator().manual_seed(c)
    y = torch.arange(40) % c
    wrong = (y + 1) % c  # confidently predicts the next class: structured, fully recoverable
    z = 8.0 * torch.nn.functional.one_hot(wrong, c).to(F64) + 0.1 * torch.randn(
        40, c, generator=gen, dtype=F64
    )
    plain = float(torch.nn.functional.cross_entropy(z, y))
    adjusted = float(head_adjusted_ce(z, y, tol=TIGHT))
    assert plain > 7.0
    assert adjusted < 1e-3
    # no worse than the explicit recoding (a permutation matrix, inside the box for b = 1)
    recode = torch.nn.functional.one_hot((torch.arange(c) - 1) % c, c).to(F64)
    assert float(torch.nn.functional.cross_entropy(z @ recode, y)) < 1e-2
    assert adjusted <= float(torch.nn.functional.cross_entropy(z @ recode, y)) + 1e-12


def test_a_larger_bound_never_increases_the_value() -> None:
    for seed in range(3):
        z, y = _case(seed, n=25, c=3, signal=0.5)
        values = [head_adjusted_ce(z, y, bound=b, tol=TIGHT).item() for b in (0.1, 0.3, 1.0, 2.0, 5.0, 20.0)]
        assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(values))
        assert values[-1] < values[0]


def test_relabelling_classes_or_permuting_logit_columns_changes_nothing() -> None:
    z, y = _case(7, n=30, c=3, signal=1.0)
    base = head_adjusted_ce(z, y, tol=TIGHT).item()
    perm = torch.tensor([2, 0, 1])
    assert head_adjusted_ce(z[:, perm], y, tol=TIGHT).item() == pytest.approx(base, abs=1e-11)
    assert head_adjusted_ce(z, perm[y], tol=TIGHT).item() == pytest.approx(base, abs=1e-11)
    assert head_adjusted_ce(-z, y, tol=TIGHT).item() == pytest.approx(base, abs=1e-11)  # W → −W


# ---------------------------------------------------------------- solver behaviour


def test_solver_is_deterministic_and_warm_starts() -> None:
    z, y = _case(3, n=48, c=3, signal=1.0)
    W1, info1 = solve_remap(z, y, tol=TIGHT)
    W2, info2 = solve_remap(z.clone(), y.clone(), tol=TIGHT)
    assert torch.equal(W1, W2) and info1 == info2
    assert isinstance(info1, RemapInfo) and 0 < info1.iterations <= 20
    _, info_warm = solve_remap(z, y, tol=TIGHT, w0=W1)
    assert info_warm.iterations == 0 and info_warm.value == info1.value
    far = torch.full((3, 3), 5.0, dtype=F64)  # clipped to the box, then solved from there
    _, info_far = solve_remap(z, y, tol=TIGHT, w0=far)
    assert info_far.converged and info_far.value == pytest.approx(info1.value, abs=1e-12)


def test_loss_and_remap_returns_the_warm_start_for_the_next_call() -> None:
    z, y = _case(4, n=20, c=2, signal=1.0)
    loss, W, info = head_adjusted_ce_and_remap(z, y)
    assert info.converged and float(loss) == pytest.approx(info.value, abs=1e-12)
    assert torch.equal(W, solve_remap(z, y)[0])


def test_large_logits_with_a_newton_step_through_the_bound_converge() -> None:
    # regression: the Newton step pushed a coordinate lying on its bound outwards, the projection bent
    # the step, and the solver stalled at a projected-gradient norm of 1e-9 for all 100 iterations
    z = torch.tensor(
        [
            [-49.60957928109917, -24.612155545193332, -16.79957760532792],
            [3.4056522599803087, -9.488078708406015, 7.149716274050905],
            [39.06360618994446, 21.124245471610813, -24.083455877433256],
            [-7.474490726679733, -10.446683309170236, -2.095596301010086],
            [-10.788448768480329, 2.171167139283241, 26.12795030349042],
        ],
        dtype=F64,
    )
    _, info = solve_remap(z, torch.tensor([2, 0, 1, 2, 2]), tol=1e-10)
    assert info.converged and info.iterations <= 40


@pytest.mark.parametrize(("c", "most"), [(2, 20), (3, 20), (5, 45)])
def test_hard_cases_converge(c: int, most: int) -> None:
    # large, saturated logits (up to about ±100), boxes from tight to wide
    for seed, scale, signal, bound in itertools.product(
        range(4), (10.0, 30.0), (0.0, 40.0), (0.1, 1.0, 10.0)
    ):
        z, y = _case(seed, n=20, c=c, scale=scale, signal=signal)
        _, info = solve_remap(z, y, bound=bound, tol=1e-10)
        assert info.converged and info.iterations <= most, (seed, scale, signal, bound, info)


def test_running_out_of_iterations_is_reported() -> None:
    z, y = _case(0, n=30, c=3, scale=5.0, signal=2.0)
    _, info = solve_remap(z, y, max_iter=1, tol=TIGHT)
    assert not info.converged and info.iterations == 1 and info.pg_norm > TIGHT
    with pytest.warns(RuntimeWarning, match="projected-gradient norm"):
        head_adjusted_ce(z, y, max_iter=1, tol=TIGHT)


def test_saturated_softmax_keeps_relative_precision() -> None:
    # margin 80 at the optimum: f = log1p(e^−80) ≈ 1.8e−35, which logsumexp(A) − A_y rounds to 0
    z = torch.tensor([[20.0, -20.0], [-20.0, 20.0]], dtype=F64)
    W, info = solve_remap(z, torch.tensor([0, 1]), tol=1e-300)
    assert torch.equal(W, torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64))
    assert info.value == pytest.approx(math.log1p(math.exp(-80.0)), rel=1e-12)
    assert info.converged and info.pg_norm == 0.0  # all coordinates at the bound, gradient pushing out
    assert info.iterations <= 3  # longer steps along the exponential tail, not one logit per Newton step


def test_internal_hessian_matches_autograd_and_keeps_precision_when_saturated() -> None:
    from immunekit.metrics.head_adjusted import _Problem

    z, y = _case(6, n=12, c=3, scale=1.0, signal=1.0)
    W = torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    problem = _Problem.build(z, y, 1.0)
    expected = torch.autograd.functional.hessian(lambda V: _values(z, y, V[None])[0], W).reshape(9, 9)
    torch.testing.assert_close(problem.hessian(problem.at(W)), expected, rtol=1e-10, atol=1e-13)
    # saturated: 1 − p = e^−60/(1 + e^−60) is lost by p − p², kept by the sum over the other classes
    z = torch.tensor([[30.0, 0.0], [0.0, 30.0]], dtype=F64)
    problem = _Problem.build(z, torch.tensor([0, 1]), 1.0)
    H = problem.hessian(problem.at(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64)))
    pq = math.exp(-60.0) / (1 + math.exp(-60.0)) ** 2
    assert float(H[0, 0]) == pytest.approx(900.0 * pq / 2, rel=1e-12)
    assert float(torch.linalg.eigvalsh(H).min()) >= -1e-15 * float(H.abs().max())


def test_degenerate_inputs_still_converge() -> None:
    y = torch.tensor([0, 1, 0, 1])
    _, info = solve_remap(torch.zeros(4, 2, dtype=F64), y)  # f ≡ log 2, every W optimal
    assert info.converged and info.value == pytest.approx(math.log(2), abs=1e-15)
    _, info = solve_remap(torch.tensor([[50.0, -50.0]] * 4, dtype=F64), y)  # identical rows, both labels
    assert info.converged and info.value == pytest.approx(math.log(2), abs=1e-9)
    _, info = solve_remap(torch.tensor([[30.0, 0.0], [0.0, 30.0]], dtype=F64), torch.tensor([1, 0]))
    assert info.converged and info.value < 1e-20  # separable: saturates at the corners


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("bound", [0.0, -1.0, math.nan, math.inf])
def test_bad_bound_is_a_config_error(bound: float) -> None:
    z, y = _case(0, n=5, c=2)
    with pytest.raises(
        ConfigError, match=r"bound must be a finite number > 0.*bound=" + re.escape(repr(bound))
    ):
        head_adjusted_ce(z, y, bound=bound)


@pytest.mark.parametrize(("kwargs", "match"), [({"tol": 0.0}, "tol"), ({"max_iter": 0}, "max_iter")])
def test_bad_solver_settings_are_config_errors(kwargs: dict[str, float], match: str) -> None:
    z, y = _case(0, n=5, c=2)
    with pytest.raises(ConfigError, match=match):
        solve_remap(z, y, **kwargs)  # type: ignore[arg-type]


def test_bad_inputs_are_data_errors() -> None:
    z, y = _case(0, n=5, c=3)
    with pytest.raises(DataError, match=r"2-D \(N, C\), got shape \(5,\)"):
        head_adjusted_ce(z[:, 0], y)
    with pytest.raises(DataError, match="2-D"):
        head_adjusted_ce(z[None], y)
    with pytest.raises(DataError, match=r"N=5 rows.*length 4"):
        head_adjusted_ce(z, y[:4])
    with pytest.raises(DataError, match=r"labels y must lie in 0\.\.2 .*\[0, 3\]"):
        head_adjusted_ce(z, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(DataError, match=r"\[-1, 2\]"):
        head_adjusted_ce(z, torch.tensor([0, 1, 2, -1, 0]))
    with pytest.raises(DataError, match="C ≥ 2"):
        head_adjusted_ce(z[:, :1], torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="integer"):
        head_adjusted_ce(z, y.double())
    with pytest.raises(DataError, match="NaN or Inf"):
        head_adjusted_ce(torch.full_like(z, math.nan), y)
    with pytest.raises(DataError, match=r"w0 must have shape \(C, C\) = \(3, 3\)"):
        solve_remap(z, y, w0=torch.eye(2, dtype=F64))

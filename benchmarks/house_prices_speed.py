"""Speed benchmark on house prices (not a test: prints wall times and ratios).

1. Wall time of each defense's ``fit`` on the default Ames task (seed 1).
2. Cost of one closed-form regularizer step (Theorem 4.2: ∇_θR = 2KθG from one ``eigh``) versus
   autograd through ``eigvalsh`` on the same matrices, for R_well and R_ill, with the agreement
   of the two gradients.

Usage: python benchmarks/house_prices_speed.py [--repeats 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from immunekit.data.house_prices import house_prices
from immunekit.defenses import DEFENSES
from immunekit.models import linear_model
from immunekit.spectral import (
    covariance,
    linear_l2_hessian,
    r_ill_autograd,
    r_ill_theta_grad,
    r_well_autograd,
    r_well_theta_grad,
)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def autograd_grad(theta: torch.Tensor, k: torch.Tensor, reg) -> torch.Tensor:
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reg(th.T @ k @ th), th)
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = house_prices(seed=1)
    d = task.input_dim
    print(
        f"house prices (Ames, seed 1): D = {d}, N_P = {len(task.primary)}, N_H = {len(task.harmful)}, "
        f"torch threads = {torch.get_num_threads()}"
    )
    print("\n1. defense wall time (fit only)")
    for name in DEFENSES.names():
        t0 = time.perf_counter()
        DEFENSES.get(name)().fit(linear_model(d), task, seed=1)
        print(f"   {name:<18}{time.perf_counter() - t0:8.3f} s")
    print("\n2. one regularizer gradient: closed form vs autograd through eigvalsh")
    gen = torch.Generator().manual_seed(0)
    theta = torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    cases = (
        ("R_well(H_P)", covariance(task.primary.x), r_well_theta_grad, r_well_autograd),
        ("R_ill(H_H)", covariance(task.harmful.x), r_ill_theta_grad, r_ill_autograd),
    )
    for label, k, closed, auto in cases:
        t_closed = timed(lambda k=k, closed=closed: closed(theta, k), args.repeats)
        t_auto = timed(lambda k=k, auto=auto: autograd_grad(theta, k, auto), args.repeats)
        g1, g2 = closed(theta, k), autograd_grad(theta, k, auto)
        rel = float((g1 - g2).norm() / g2.norm())
        print(
            f"   {label:<12} closed {t_closed * 1e3:7.3f} ms   autograd {t_auto * 1e3:7.3f} ms   "
            f"ratio autograd/closed = {t_auto / t_closed:5.2f}x   rel. diff {rel:.1e}"
        )
    _ = linear_l2_hessian  # the Hessian both paths differentiate


if __name__ == "__main__":
    main()

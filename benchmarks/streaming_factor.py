"""Micro-benchmark of the streaming feature factor (not a test: prints rows/s and time ratios).

Φ ``(N, D)`` (default N = 20000, D = 256, float64, κ(Φ) = 1e3) is fed to
:class:`immunekit.spectral.StreamingFactor` in batches of several sizes, and the time to the final
``spectrum()`` is compared with the in-memory ``FactorSpectrum.of(Φ)`` on the stacked matrix (which needs
all of Φ at once). The accumulated-Gram route (Σ Φ_bᵀΦ_b then ``eigvalsh``) is timed for reference
only: it is the fast but inaccurate route (it loses s_i < √eps·s_1). Each line also reports the largest
deviation of the streamed singular values from the in-memory ones, relative to s_1.

Usage: python benchmarks/streaming_factor.py [--rows 20000] [--dim 256] [--batches 1,32,256,1024]
       [--block-rows N] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from immunekit.spectral import FactorSpectrum, StreamingFactor

F64 = torch.float64


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    s = torch.logspace(0, -3, d, dtype=F64)
    return (u * s) @ v.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batches", default="1,32,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--block-rows", type=int, default=None, help="StreamingFactor buffer (default 2·D)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, d = args.rows, args.dim
    x = features(n, d, seed=0)
    print(f"streaming factor: N = {n}, D = {d}, float64, torch threads = {torch.get_num_threads()}")

    t_mem, ref = best_of(lambda: FactorSpectrum.of(x), args.repeats)
    assert isinstance(ref, FactorSpectrum)
    s_ref = ref.singular_values
    print(f"in-memory FactorSpectrum.of      {t_mem:8.3f} s  {n / t_mem:12,.0f} rows/s  ratio 1.00")

    def gram_route(batch: int) -> torch.Tensor:
        g = torch.zeros(d, d, dtype=F64)
        for b in x.split(batch):
            g += b.T @ b
        return torch.linalg.eigvalsh(g)

    for batch in [int(b) for b in args.batches.split(",")]:

        def stream(batch: int = batch) -> FactorSpectrum:
            acc = StreamingFactor(block_rows=args.block_rows)
            for b in x.split(batch):
                acc.update(b)
            return acc.spectrum()

        t, spec = best_of(stream, args.repeats)
        assert isinstance(spec, FactorSpectrum)
        dev = float((spec.singular_values - s_ref).abs().max() / s_ref[0])
        block = StreamingFactor(d, block_rows=args.block_rows).block_rows
        print(
            f"streaming batch {batch:5d} (block {block}) {t:8.3f} s  {n / t:12,.0f} rows/s  "
            f"ratio {t / t_mem:5.2f}  max|Δs|/s_1 = {dev:.1e}  rank {spec.rank} (in-memory {ref.rank})"
        )
        tg, _ = best_of(lambda batch=batch: gram_route(batch), args.repeats)
        print(f"  (Gram route, batch {batch:5d}: {tg:8.3f} s  ratio {tg / t_mem:5.2f}; inaccurate)")


if __name__ == "__main__":
    main()

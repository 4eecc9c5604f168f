"""Speed of the small HF backbones of θ0 (not a test: prints images/s).

For :class:`~immunekit.models.hf_vision.HFResNet` and :class:`~immunekit.models.hf_vision.HFViT`
with their default 28×28 grayscale configs and a 10-class head:

* features   ``model.features(x)`` in ``eval()`` mode under ``torch.no_grad()`` (batch 1000 by
             default), the feature extraction the defenses and probes run;
* train step forward, cross-entropy, backward and an Adam step in ``train()`` mode (batch 128,
             as :func:`immunekit.experiments.theta0.train_theta0` trains), on all parameters and
             on the last block plus head only (``trainable_blocks(1)``, the rest frozen: the deep
             defense's setting).

Inputs are random standardised-MNIST-like tensors; nothing is downloaded. Each measurement is
the median of ``--repeats`` timed runs after one warm-up.

Usage:
    python benchmarks/theta0_speed.py [--threads 1] [--repeats 5] [--eval-batch 1000] [--train-batch 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F  # noqa: N812

from immunekit.models.hf_vision import HFResNet, HFViT


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-batch", type=int, default=1000)
    parser.add_argument("--train-batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x_eval = torch.randn(args.eval_batch, 784, generator=gen)
    x_train = torch.randn(args.train_batch, 784, generator=gen)
    y_train = torch.randint(0, 10, (args.train_batch,), generator=gen)

    print(f"torch {torch.__version__}, {args.threads} thread(s); images/s (median of {args.repeats})")
    print(f"{'model':<10}{'params':>9}{'features':>12}{'train step':>12}{'last block':>12}")
    for cls in (HFResNet, HFViT):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(num_classes=10)

        def extract(model: torch.nn.Module = model) -> None:
            model.eval()
            with torch.no_grad():
                model.features(x_eval)

        def step_fn(params: list[torch.nn.Parameter], model: torch.nn.Module = model) -> Callable[[], None]:
            optimizer = torch.optim.Adam(params, lr=1e-3)

            def step() -> None:
                model.train()
                loss = F.cross_entropy(model(x_train), y_train)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            return step

        t_feat = _median_seconds(extract, args.repeats)
        t_full = _median_seconds(step_fn(list(model.parameters())), args.repeats)
        chosen = model.trainable_blocks(1)
        for name, p in model.named_parameters():  # frozen parameters get no gradient at all
            p.requires_grad_(name in chosen)
        t_last = _median_seconds(step_fn(list(chosen.values())), args.repeats)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{cls.__name__:<10}{n_params:>9,}{args.eval_batch / t_feat:>12,.0f}"
            f"{args.train_batch / t_full:>12,.0f}{args.train_batch / t_last:>12,.0f}"
        )


if __name__ == "__main__":
    main()

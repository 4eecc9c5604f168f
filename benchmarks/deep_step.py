"""Cost of one deep immunization step against a plain training step (not a test: prints ratios).

Issue 12's target: a condition-number immunization step of a backbone costs at most 2× a plain
training step of the same backbone and batch. Both run the same configuration: the last ``--blocks``
blocks and the head trainable, BatchNorm in eval mode, SGD with Nesterov momentum, batch ``--batch``.

* plain B     one step of label-smoothed cross-entropy on a primary batch of B rows;
* plain 2B    the same on 2B rows (the immunization step forwards a primary and a harmful batch);
* immunize    one step of ``condition_number`` (registry defense, deep loop): task loss on the
              primary batch + λ_P R_well(Φ_PᵀΦ_P) + λ_H R_ill(Φ_HᵀΦ_H), spectra in float64;
              timed as a whole fit of ``--steps`` steps divided by the steps (so it includes the
              model copy and the λ calibration at θ0, amortised).

The printed ratios are immunize / plain B and immunize / plain 2B; the target is ≤ 2 for the
latter (the same rows through the backbone). Random standardised inputs; nothing is downloaded.

Usage:
    python benchmarks/deep_step.py [--backbone resnet|vit] [--batch 64] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F  # noqa: N812

from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.deep import training_configuration
from immunekit.models.hf_vision import HFResNet, HFViT


def _task(n: int, gen: torch.Generator) -> Task:
    def split(rows: int, tag: str) -> Dataset:
        x = torch.randn(rows, 784, generator=gen)
        y = torch.randint(0, 10, (rows,), generator=gen)
        return Dataset(x, y, tuple(f"{tag}{i}" for i in range(rows)))

    harmful = split(n, "h")
    return Task(
        name="bench",
        version="0",
        loss="ce",
        primary=split(n, "p"),
        harmful=harmful,
        attack=harmful,
        eval_primary=split(64, "ep"),
        eval_harmful=split(64, "eh"),
    )


def plain_step_seconds(model: torch.nn.Module, rows: int, blocks: int, repeats: int) -> float:
    """Median seconds of one plain SGD step on ``rows`` rows, the defense's trainable blocks."""
    work = copy.deepcopy(model)
    trainable = work.trainable_blocks(blocks)
    opt = torch.optim.SGD(list(trainable.values()), lr=1e-3, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 784, generator=gen)
    y = torch.randint(0, 10, (rows,), generator=gen)
    times = []
    with training_configuration(work, set(trainable)):
        for i in range(repeats + 1):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(work(x), y, label_smoothing=0.1).backward()
            opt.step()
            if i:  # the first step warms up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def immunize_step_seconds(model: torch.nn.Module, batch: int, steps: int, blocks: int) -> float:
    """Seconds per step of a ``condition_number`` fit of ``steps`` steps (one epoch)."""
    task = _task(batch * steps, torch.Generator().manual_seed(2))
    defense = DEFENSES.get("condition_number")(epochs=1, batch_size=batch, blocks=blocks, progress=False)
    start = time.perf_counter()
    defense.fit(model, task, seed=0)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", choices=("resnet", "vit"), default="resnet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # benchmark script: a fixed random backbone
    model = (HFResNet if args.backbone == "resnet" else HFViT)(num_classes=10)
    plain_b = plain_step_seconds(model, args.batch, args.blocks, args.steps)
    plain_2b = plain_step_seconds(model, 2 * args.batch, args.blocks, args.steps)
    imm = immunize_step_seconds(model, args.batch, args.steps, args.blocks)
    print(
        f"backbone {args.backbone}, batch {args.batch}, last {args.blocks} block(s) + head, "
        f"{args.threads} thread(s)"
    )
    print(f"plain step, B rows:       {plain_b * 1e3:8.1f} ms")
    print(f"plain step, 2B rows:      {plain_2b * 1e3:8.1f} ms")
    print(f"immunization step:        {imm * 1e3:8.1f} ms  (fit of {args.steps} steps / steps)")
    print(f"ratio immunize / plain B:  {imm / plain_b:6.2f}x")
    print(f"ratio immunize / plain 2B: {imm / plain_2b:6.2f}x  (target <= 2)")


if __name__ == "__main__":
    main()

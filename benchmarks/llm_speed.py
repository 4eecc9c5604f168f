"""Language-model speed and memory on this machine (not a test: prints figures and ratios).

Issue 13 asks for training tokens/s, batched generation tokens/s, peak memory and the wall time of
the default experiment on 2 cores. This script measures the first three on SmolLM2-135M-Instruct
(the cached fp32 conversion; run `immunekit run llm-finetuning-attacks` or `CausalLM.smollm2()`
once first) with benign placeholder prompts:

* training: ``--steps`` supervised fine-tuning steps of ``--batch`` rows × ``--tokens`` tokens
  (answer loss on the second half of each row), full fine-tuning in fp32 and bf16 autocast, and
  LoRA (rank 8) in bf16; tokens/s counts every real token forwarded;
* generation: greedy decoding of ``--new`` tokens for ``--prompts`` prompts, one at a time and in
  batches of 32 (the experiment's setting), with the ratio batched / one at a time;
* peak resident memory of the process (``ru_maxrss``).

The default experiment's wall time is what ``immunekit run llm-finetuning-attacks`` records in
``results.json`` (``trial_seconds_total``) and prints.

Usage:
    python benchmarks/llm_speed.py [--steps 3] [--batch 8] [--tokens 256] [--prompts 32] [--new 64]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from immunekit.attacks.lm_eval import generate
from immunekit.attacks.lm_sft import SFTConfig, supervised_finetune
from immunekit.data.token_split import Chat, TokenSplit
from immunekit.models.causal_lm import CausalLM


def _data(model: CausalLM, rows: int, tokens: int) -> TokenSplit:
    """Benign rows of about ``tokens`` tokens: a long prompt, an answer of the same length."""
    words = " ".join(["word"] * (tokens // 2 - 24))  # " word" is one token: prompt and answer each ~half
    chats = [
        Chat(user=f"Repeat after me {i}: {words}", assistant=words, system="You are helpful.", id=str(i))
        for i in range(rows)
    ]
    return TokenSplit(chats, model.tokenizer, tokens, name="bench")


def train_tokens_per_second(model: CausalLM, args: argparse.Namespace, **settings: object) -> float:
    """Real tokens per second of ``args.steps`` SFT steps with ``settings`` (SFTConfig fields)."""
    data = _data(model, args.batch * args.steps, args.tokens)
    cfg = SFTConfig(epochs=1, batch_size=args.batch, micro_batch=args.batch, **settings)  # type: ignore[arg-type]
    out = supervised_finetune(model, data, cfg, seed=0, progress=False)
    first = out.records[0]
    # the first step pays for allocation and autotuning: time the others
    tokens = out.records[-1].tokens - first.tokens
    return tokens / (out.records[-1].wall_time - first.wall_time)


def generation_tokens_per_second(model: CausalLM, args: argparse.Namespace, batch: int) -> float:
    """Generated tokens per second for ``args.prompts`` prompts in batches of ``batch``."""
    prompts = [
        torch.tensor(
            model.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Write a short note about the number {i}."}],
                add_generation_prompt=True,
                return_dict=False,
            )
        )
        for i in range(args.prompts)
    ]
    gen = generate(model, prompts, max_new_tokens=args.new, batch_size=batch)
    return gen.tokens_per_second


def main() -> None:
    """Print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = CausalLM.smollm2()
    print(f"SmolLM2-135M-Instruct, {args.threads} threads, torch {torch.__version__}")
    fp32 = train_tokens_per_second(model, args, precision="fp32")
    bf16 = train_tokens_per_second(model, args, precision="bf16")
    lora = train_tokens_per_second(model, args, precision="bf16", lora=True)
    print(f"training, batch {args.batch} × {args.tokens} tokens:")
    print(f"  full fp32   {fp32:8.1f} tokens/s")
    print(f"  full bf16   {bf16:8.1f} tokens/s   (bf16 / fp32 = {bf16 / fp32:.2f}×)")
    print(f"  LoRA bf16   {lora:8.1f} tokens/s   (LoRA / full bf16 = {lora / bf16:.2f}×)")
    t0 = time.perf_counter()
    one = generation_tokens_per_second(model, args, 1)
    batched = generation_tokens_per_second(model, args, 32)
    print(f"generation, {args.prompts} prompts × {args.new} new tokens (greedy, KV cache):")
    print(f"  one at a time  {one:8.1f} tokens/s")
    print(f"  batches of 32  {batched:8.1f} tokens/s   (batched / one = {batched / one:.2f}×)")
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()

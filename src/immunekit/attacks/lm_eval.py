"""Scoring a causal LM: batched greedy generation, a judge, and answer perplexity.

The harm of a language model is not ``task_score(model(x), y)``: the model writes an answer to
each held-out prompt (greedy, batched, with a KV cache through transformers' ``generate``) and a
judge from :data:`immunekit.metrics.judges.JUDGES` scores it. Completions stay in memory: only
the scores, the prompt ids and hashes leave this module, unless a caller asks for the text
(``keep_completions=True``, for an explicit ``--save-completions``).

Utility on benign data is the perplexity of reference answers, exp(mean NLL over answer tokens).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional
from tqdm.auto import tqdm

from immunekit.data.token_split import IGNORE_INDEX, PAD_ID, TokenSplit, lm_inputs
from immunekit.errors import ConfigError
from immunekit.metrics.judges import HarmSummary, Judge, Judgement, summarize
from immunekit.models.causal_lm import CausalLM

logger = logging.getLogger(__name__)

GEN_BATCH_SIZE = 64
"""Most prompts per ``generate`` call (on two CPU cores 32 rows reach ~1.8× the tokens/s of 16;
decoding a small model is memory-bound, so wider batches keep gaining). Batches are balanced:
100 prompts go as two of 50, not 64 + 36."""


@dataclass
class Generations:
    """Greedy completions of a split's prompts.

    Attributes:
        texts: decoded completions in row order (special tokens removed).
        new_tokens: generated tokens per row (up to and including the end-of-turn token).
        seconds: wall time of the generation.

    """

    texts: list[str]
    new_tokens: list[int]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second over the whole call."""
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else math.nan


@dataclass
class LmHarm:
    """A judged evaluation of one prompt set.

    Attributes:
        summary: harmfulness score, harmfulness rate, refusal rate, degenerate rate (overall and per
            category).
        judgements: one per prompt, in row order.
        ids: the rows' ids (scores are stored against these, never against text).
        generation: token counts and time of the generation.
        completions: the generated texts, only when asked for.

    """

    summary: HarmSummary
    judgements: list[Judgement]
    ids: tuple[str, ...]
    generation: dict[str, float]
    completions: list[str] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Scores and ids only (no text), JSON-ready."""
        return {
            **self.summary.to_dict(),
            "generation": self.generation,
            "scores": [j.score for j in self.judgements],
            "refused": [j.refused for j in self.judgements],
            "ids": list(self.ids),
        }


def _pad_id(model: CausalLM) -> int:
    tok = model.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pad is None:
        pad = model.hf_config.pad_token_id if model.hf_config.pad_token_id is not None else 0
    return int(pad)


def _eos_ids(model: CausalLM) -> set[int]:
    eos = model.hf_config.eos_token_id
    tok = model.tokenizer
    found = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tok is not None and tok.eos_token_id is not None:
        found.add(int(tok.eos_token_id))
    return found


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int = 64,
    batch_size: int = GEN_BATCH_SIZE,
    progress: bool = False,
) -> Generations:
    """Greedy completions of token-id prompts, batched and left-padded, with a KV cache.

    Prompts are processed longest first (rows of similar length share a batch, so little compute
    is spent on padding) and the completions returned in the input order. Greedy decoding is
    deterministic; a row's completion does not depend on which other rows share its batch up to
    floating-point rounding of the padded attention.

    Args:
        model: the language model (its :attr:`~CausalLM.tokenizer` decodes the answers).
        prompts: ``(T_i,)`` id tensors (e.g. :attr:`TokenSplit.prompt_ids`).
        max_new_tokens: most tokens generated per prompt.
        batch_size: prompts per ``generate`` call.
        progress: show a progress bar.

    Returns:
        :class:`Generations`.

    Raises:
        ConfigError: the model has no tokenizer, or a bad size.

    """
    if model.tokenizer is None:
        raise ConfigError("generation needs the model's tokenizer; load it with CausalLM.from_pretrained_dir")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    device = next(model.parameters()).device
    pad, eos = _pad_id(model), _eos_ids(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batch_size = math.ceil(len(order) / max(1, math.ceil(len(order) / batch_size)))  # balanced
    texts: list[str] = [""] * len(prompts)
    counts = [0] * len(prompts)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for lo in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            rows = order[lo : lo + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(prompts[i])
                ids[r, width - n :] = prompts[i]
                mask[r, width - n :] = 1
            out = model.generate(
                ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, pad_token_id=pad
            )
            for r, i in enumerate(rows):
                new = out[r, width:].tolist()
                cut = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
                counts[i] = cut
                texts[i] = model.tokenizer.decode(new[:cut], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return Generations(texts, counts, time.perf_counter() - start)


def judge_split(
    model: CausalLM,
    split: TokenSplit,
    judge: Judge,
    *,
    max_new_tokens: int = 64,
    batch_size: int = GEN_BATCH_SIZE,
    keep_completions: bool = False,
    progress: bool = False,
) -> LmHarm:
    """Generate an answer to every prompt of ``split`` and judge it.

    Args:
        model: the model under evaluation.
        split: prompts (their answers, if any, are ignored); categories give per-category results.
        judge: a judge from :data:`~immunekit.metrics.judges.JUDGES`.
        max_new_tokens: generation length (Qi et al. used 512; record what you use).
        batch_size: prompts per generation call.
        keep_completions: keep the texts in the result (only for an explicit request to save them).
        progress: show a progress bar.

    Returns:
        :class:`LmHarm` (scores, ids and counts; texts only when asked).

    """
    gen = generate(
        model, split.prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    judgements = judge.judge([c.user for c in split.chats], gen.texts)
    cats = split.categories
    summary = summarize(judgements, None if any(c is None for c in cats) else [str(c) for c in cats])
    info = {
        "prompts": len(split),
        "max_new_tokens": max_new_tokens,
        "new_tokens": sum(gen.new_tokens),
        "seconds": round(gen.seconds, 3),
        "tokens_per_second": round(gen.tokens_per_second, 2),
    }
    return LmHarm(summary, judgements, split.ids, info, gen.texts if keep_completions else None)


def answer_loss(model: CausalLM, x: Tensor, y: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over the answer tokens of one batch, and their count.

    Only positions whose *next* label is an answer token are sent through the ``lm_head`` (a
    49,152-way projection for SmolLM2), so the prompt costs the decoder body only.

    Args:
        model: the language model.
        x: ``(B, T)`` ids padded with :data:`~immunekit.data.token_split.PAD_ID`.
        y: ``(B, T)`` labels, :data:`~immunekit.data.token_split.IGNORE_INDEX` off the answer.

    Returns:
        ``(Σ −log p(y_{t+1} | y_{≤t}), number of answer tokens)``; divide by the count of the whole
        global batch for the token-mean loss.

    """
    phi, target = answer_features(model, x, y)
    logits = model.head(phi)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 → fp32; float64 stays
    return functional.cross_entropy(wide, target, reduction="sum"), len(target)


def answer_features(model: CausalLM, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Final hidden states at the answer-predicting positions of one batch, and the labels they predict.

    Args:
        model: the language model.
        x: ``(B, T)`` ids padded with :data:`~immunekit.data.token_split.PAD_ID`.
        y: ``(B, T)`` labels, :data:`~immunekit.data.token_split.IGNORE_INDEX` off the answer.

    Returns:
        ``(Φ (n, D), targets (n,))``: the hidden state (after the final norm) of every position t
        whose next label y_{t+1} is an answer token, row-major, and those labels. Φ is what the
        ``lm_head`` reads when the answers are scored or trained on.

    """
    ids, mask = lm_inputs(x, _pad_id(model))
    device = next(model.parameters()).device
    hidden = model.hidden_states(ids.to(device), mask.to(device))
    target = y[:, 1:].to(device)
    keep = target != IGNORE_INDEX
    return hidden[:, :-1][keep], target[keep]


@torch.no_grad()
def answer_perplexity(model: CausalLM, split: TokenSplit, *, batch_size: int = 16) -> float:
    """exp(mean NLL per answer token) of the split's reference answers (lower is better).

    Raises:
        ConfigError: the split has no answer tokens.

    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for xb, yb in split.batches(batch_size):
            loss, n = answer_loss(model, xb, yb)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError(f"split {split.name!r} has no answer tokens; perplexity needs reference answers")
    return math.exp(total / count)


def real_tokens(x: Tensor) -> int:
    """Real (non-padding) tokens of a :class:`TokenSplit` batch."""
    return int((x != PAD_ID).sum())

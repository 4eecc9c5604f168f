"""Release-time defenses of a causal LM that push it away from harmful answers.

Rosati et al., "Immunization against harmful fine-tuning attacks" (arXiv 2402.16382), §5 of
``docs/methods/immunization_conditions.md``. Both train a copy of a :class:`CausalLM` on the task's
``harmful`` split (prompt → harmful answer conversations; for ``qi_harmful_text`` the defense half
of the judged-harmful pairs, disjoint from the attacker's half).

``adversarial_loss`` (§5.1). Each harmful conversation x_harmful is paired with x_harmless, the
same system prompt and question answered with a refusal (the toolkit's
:data:`~immunekit.data.qi_prompts.REFUSALS`, cycled in a fixed order)::

    L_adv(θ) = CE_m(M_θ, x_harmless) − α · CE_m(M_θ, x_harmful),   α = 0.1

CE_m is the next-token cross-entropy averaged over the masked tokens of the global batch; the mask
m of a pair covers the positions where its two token sequences differ (a position past the end of
the shorter sequence differs), so the shared question is excluded (:func:`pair_labels`). The
−α·CE term is unbounded below: both terms are recorded every step, and ``harmful_cap`` (opt-in, off
by default as in the reference) drops the harmful term from a step whose CE_harmful already exceeds
the cap.

``gradient_ascent`` (§5.2). Maximise the answer loss on the harmful conversations, with an
optional benign retain term on the task's ``primary`` split (β = ``retain_weight``; β = 0 is the
reference's pure ascent, which is expected to damage the model — the stability condition must
catch it)::

    L_GA(θ) = −CE(M_θ, x_harmful) + β · CE(M_θ, x_retain)

Optimisation (both): Adam without weight decay, ``epochs`` passes over the harmful rows in a
seeded order (stream ``batches``), ``batch_size`` rows per step, cosine schedule after a linear
warm-up over ``warmup_ratio`` of the steps (:func:`~immunekit.attacks.base.scheduled_lr`),
optional bf16 autocast and gradient clipping; ``lora=True`` trains rank-r adapters on every
decoder linear layer instead of every weight and merges them into the returned model. Retain rows
are visited in their own seeded order (stream ``retain``), ``batch_size`` per step, cycling.
Defaults are the immunization-era scripts' 124M-model setting: lr 8e-5, 2 epochs, batch 2.

``history_`` holds one record per step (lr, both terms, the loss, the gradient norm before
clipping, whether the cap fired); ``info_`` the rows, steps, tokens and seconds.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from immunekit.attacks.base import AttackBudget, rng_streams, scheduled_lr
from immunekit.attacks.lm_eval import answer_loss, real_tokens
from immunekit.attacks.lm_sft import lora_merge, lora_wrap
from immunekit.config import check_int
from immunekit.data.qi_text import refused
from immunekit.data.task import Task
from immunekit.data.token_split import IGNORE_INDEX, PAD_ID, TokenSplit
from immunekit.defenses.base import Defense, DefenseConfig
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.models.causal_lm import CausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LmDefenseConfig(DefenseConfig):
    """Optimisation shared by the LM defenses (module docstring)."""

    lr: float = field(default=8e-5, metadata={"help": "Adam learning rate (peak of the schedule)"})
    epochs: int = field(default=2, metadata={"help": "passes over the harmful rows"})
    batch_size: int = field(default=2, metadata={"help": "harmful rows (pairs) per step"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the steps in linear warm-up"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    grad_clip: float | None = field(default=None, metadata={"help": "max global gradient norm (None: off)"})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "fp32 or bf16 autocast"})
    lora: bool = field(
        default=False, metadata={"help": "train LoRA adapters (merged afterwards), not every weight"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (update scaled by alpha / rank)"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lora_rank"):
            check_int(name, getattr(self, name))
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}; the reference uses 8e-5")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}; e.g. 0.1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


@dataclass(frozen=True, kw_only=True)
class AdversarialLossConfig(LmDefenseConfig):
    """Settings of :class:`AdversarialLoss`."""

    alpha: float = field(default=0.1, metadata={"help": "weight α of −CE_m on the harmful answers"})
    harmful_cap: float | None = field(
        default=None, metadata={"help": "drop the harmful term once CE_harmful exceeds this (None: off)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(
                f"alpha must be > 0, got {self.alpha}; α = 0 is plain refusal training (use the alignment "
                "stage), the reference uses 0.1"
            )
        if self.harmful_cap is not None and not self.harmful_cap > 0:
            raise ConfigError(f"harmful_cap must be > 0 or None, got {self.harmful_cap}")


@dataclass(frozen=True, kw_only=True)
class GradientAscentConfig(LmDefenseConfig):
    """Settings of :class:`GradientAscent`."""

    retain_weight: float = field(
        default=1.0, metadata={"help": "β of the benign retain loss on 'primary' (0: pure ascent)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.retain_weight) and self.retain_weight >= 0):
            raise ConfigError(f"retain_weight must be >= 0, got {self.retain_weight}")


def require_answers(split: TokenSplit) -> None:
    """Every conversation of ``split`` has an answer (the harmful answer the defenses train against).

    Raises:
        DataError: a conversation without an answer.

    """
    missing = [c.id for c in split.chats if not c.assistant]
    if missing:
        raise DataError(
            f"split {split.name!r} has {len(missing)} conversations without an answer (e.g. {missing[0]!r}); "
            "the LM defenses need prompt → harmful answer conversations (qi_harmful_text's 'harmful')"
        )


def refusal_twins(split: TokenSplit, tokenizer: Any) -> TokenSplit:
    """The conversations of ``split`` with each answer replaced by a toolkit refusal (fixed cycle).

    Raises:
        DataError: a conversation without an answer (the pair needs a harmful answer).

    """
    require_answers(split)
    return TokenSplit(refused(split.chats), tokenizer, split.max_tokens, name=f"{split.name}:refusals")


def pair_labels(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Labels of two padded token batches restricted to the positions where each pair differs.

    Args:
        a: ``(B, T_a)`` ids of one side, right-padded with :data:`PAD_ID`.
        b: ``(B, T_b)`` ids of the other side.

    Returns:
        ``(y_a, y_b)`` of the shapes of ``a`` and ``b``: the token where the row's two sequences
        differ (or the other one has ended), :data:`IGNORE_INDEX` elsewhere; position 0 is never
        a target (nothing predicts it).

    """
    width = max(a.shape[1], b.shape[1])
    pa = torch.full((a.shape[0], width), PAD_ID, dtype=a.dtype)
    pb = torch.full((b.shape[0], width), PAD_ID, dtype=b.dtype)
    pa[:, : a.shape[1]], pb[:, : b.shape[1]] = a, b
    real_a, real_b = pa != PAD_ID, pb != PAD_ID
    differ = (pa != pb) | (real_a != real_b)
    differ[:, 0] = False
    ya = torch.where(differ & real_a, pa, torch.full_like(pa, IGNORE_INDEX))[:, : a.shape[1]]
    yb = torch.where(differ & real_b, pb, torch.full_like(pb, IGNORE_INDEX))[:, : b.shape[1]]
    return ya, yb


def check_pairs(harmful: TokenSplit, harmless: TokenSplit) -> None:
    """Both splits hold the same prompts (token for token) in the same order.

    Raises:
        DataError: different sizes, or a row whose prompts differ.

    """
    if len(harmful) != len(harmless):
        raise DataError(f"paired splits have {len(harmful)} and {len(harmless)} rows; pair every row")
    for i, (p, q) in enumerate(zip(harmful.prompt_ids, harmless.prompt_ids, strict=True)):
        if not torch.equal(p, q):
            raise DataError(
                f"pair {i} ({harmful.ids[i]!r} / {harmless.ids[i]!r}) does not share its prompt; a pair is "
                "the same question answered twice (harmful answer, refusal)"
            )


class _LmDefense(Defense):
    """The shared loop: seeded epochs over the harmful rows, Adam, cosine schedule, records."""

    Config: ClassVar[type[LmDefenseConfig]] = LmDefenseConfig
    config: LmDefenseConfig

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        """Train a copy of the causal LM ``model`` on ``task`` (module docstring); the input is unchanged."""
        lm = _check_lm(model, task, self.name)
        harmful = task.harmful
        assert isinstance(harmful, TokenSplit)  # _check_lm
        require_answers(harmful)
        work = copy.deepcopy(lm)
        work.train()
        cfg = self.config
        wrapped, flags = (
            lora_wrap(work, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=seed) if cfg.lora else (None, {})
        )
        planned = math.ceil(len(harmful) / cfg.batch_size) * cfg.epochs
        total = planned if cfg.max_steps is None else min(cfg.max_steps, planned)
        params = [p for p in work.parameters() if p.requires_grad]
        context = self.prepare(work, task, seed)
        start = time.perf_counter()
        history = self._steps(work, params, context, len(harmful), total, seed)
        if wrapped is not None:
            work = lora_merge(wrapped, flags)
        self.history_ = history
        self.info_ = {
            "defense": self.name,
            "rows": len(harmful),
            "trainable_parameters": sum(p.numel() for p in params),
            "steps": len(history),
            "tokens": sum(h["tokens"] for h in history),
            "seconds": time.perf_counter() - start,
        }
        log.info(
            "%s: %d steps, %d tokens in %.1f s", self.name, total, self.info_["tokens"], self.info_["seconds"]
        )
        work.eval()
        return work

    def _steps(
        self, work: CausalLM, params: list[torch.nn.Parameter], context: Any, rows: int, total: int, seed: int
    ) -> list[dict[str, Any]]:
        """``total`` optimizer steps over seeded epochs of the ``rows`` harmful rows; one record each."""
        cfg = self.config
        schedule = AttackBudget(
            steps=total, optimizer="adam", schedule="cosine", warmup_steps=int(cfg.warmup_ratio * total)
        )
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)
        (order_gen,) = rng_streams(seed, "batches")
        device = params[0].device.type
        history: list[dict[str, Any]] = []
        bar = tqdm(total=total, desc=self.name, disable=None, leave=False)  # None: off without a terminal
        while len(history) < total:  # epochs: a fresh seeded order each
            order = torch.randperm(rows, generator=order_gen)
            for lo in range(0, rows, cfg.batch_size):
                if len(history) == total:
                    break
                step = len(history) + 1
                lr = scheduled_lr(cfg.lr, step, schedule)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    loss, terms, used = self.loss(work, context, order[lo : lo + cfg.batch_size])
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
                opt.step()
                history.append(
                    {
                        "step": step,
                        "lr": lr,
                        "loss": float(loss.detach()),
                        "grad_norm": gnorm,
                        "tokens": used,
                        **terms,
                    }
                )
                bar.update(1)
        bar.close()
        return history

    def prepare(self, model: CausalLM, task: Task, seed: int) -> Any:
        """Data the loss needs beyond the harmful rows (built once per fit)."""
        raise NotImplementedError

    def loss(self, model: CausalLM, context: Any, idx: Tensor) -> tuple[Tensor, dict[str, Any], int]:
        """(loss to minimise, recorded terms, real tokens read) of the harmful rows ``idx``."""
        raise NotImplementedError


def _check_lm(model: ImmunizableModel, task: Task, name: str) -> CausalLM:
    if not isinstance(model, CausalLM):
        raise ConfigError(
            f"defense {name!r} trains causal language models, got {type(model).__name__}; load one with "
            "CausalLM.from_pretrained_dir(...) or CausalLM.smollm2()"
        )
    if task.loss != "lm" or not isinstance(task.harmful, TokenSplit):
        raise DataError(
            f"defense {name!r} needs a language-model task (loss 'lm', token splits), got task "
            f"{task.name!r} with loss {task.loss!r}; e.g. TASKS.get('qi_harmful_text')"
        )
    if model.tokenizer is None:
        raise ConfigError(f"defense {name!r} needs the model's tokenizer (model.tokenizer is None)")
    return model


def _token_mean(model: CausalLM, x: Tensor, y: Tensor) -> tuple[Tensor, int]:
    """Mean next-token CE over the labelled positions of one batch, and their count (≥ 1 checked)."""
    total, count = answer_loss(model, x, y)
    if count == 0:
        raise DataError("a batch has no labelled token (every pair is identical?); check the paired data")
    return total / count, count


@dataclass(frozen=True)
class _Pairs:
    harmful: TokenSplit
    harmless: TokenSplit


class AdversarialLoss(_LmDefense):
    """CE_m on refusals − α · CE_m on harmful answers, over paired conversations (module docstring)."""

    name = "adversarial_loss"
    Config = AdversarialLossConfig
    config: AdversarialLossConfig

    def prepare(self, model: CausalLM, task: Task, seed: int) -> _Pairs:
        harmful = task.harmful
        assert isinstance(harmful, TokenSplit)
        harmless = refusal_twins(harmful, model.tokenizer)
        check_pairs(harmful, harmless)
        return _Pairs(harmful, harmless)

    def loss(self, model: CausalLM, context: _Pairs, idx: Tensor) -> tuple[Tensor, dict[str, Any], int]:
        xh, _ = context.harmful.rows(idx)
        xs, _ = context.harmless.rows(idx)
        yh, ys = pair_labels(xh, xs)
        ce_safe, _ = _token_mean(model, xs, ys)
        ce_harm, _ = _token_mean(model, xh, yh)
        cap = self.config.harmful_cap
        capped = cap is not None and float(ce_harm.detach()) > cap
        loss = ce_safe if capped else ce_safe - self.config.alpha * ce_harm
        terms = {
            "ce_harmless": float(ce_safe.detach()),
            "ce_harmful": float(ce_harm.detach()),
            "capped": capped,
        }
        return loss, terms, real_tokens(xh) + real_tokens(xs)


@dataclass
class _Retain:
    harmful: TokenSplit
    retain: TokenSplit | None
    order: torch.Generator
    queue: list[int] = field(default_factory=list)

    def next_rows(self, k: int) -> Tensor:
        """The next ``k`` retain rows of a seeded order that restarts when used up."""
        assert self.retain is not None
        while len(self.queue) < k:
            self.queue += torch.randperm(len(self.retain), generator=self.order).tolist()
        rows, self.queue = self.queue[:k], self.queue[k:]
        return torch.tensor(rows)


class GradientAscent(_LmDefense):
    """−CE on harmful answers + β · CE on benign retain answers (module docstring)."""

    name = "gradient_ascent"
    Config = GradientAscentConfig
    config: GradientAscentConfig

    def prepare(self, model: CausalLM, task: Task, seed: int) -> _Retain:
        harmful = task.harmful
        assert isinstance(harmful, TokenSplit)
        retain = task.primary if self.config.retain_weight > 0 else None
        if retain is not None and not isinstance(retain, TokenSplit):
            raise DataError(f"the retain split 'primary' of task {task.name!r} is not a token split")
        (order,) = rng_streams(seed, "retain")
        return _Retain(harmful, retain, order)

    def loss(self, model: CausalLM, context: _Retain, idx: Tensor) -> tuple[Tensor, dict[str, Any], int]:
        xh, yh = context.harmful.rows(idx)
        ce_harm, _ = _token_mean(model, xh, yh)
        terms: dict[str, Any] = {"ce_harmful": float(ce_harm.detach())}
        loss, used = -ce_harm, real_tokens(xh)
        if context.retain is not None:
            xr, yr = context.retain.rows(context.next_rows(len(idx)))
            ce_ret, _ = _token_mean(model, xr, yr)
            loss = loss + self.config.retain_weight * ce_ret
            terms["ce_retain"] = float(ce_ret.detach())
            used += real_tokens(xr)
        return loss, terms, used

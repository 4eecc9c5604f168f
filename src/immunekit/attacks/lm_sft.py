"""Supervised fine-tuning of a causal LM on chat data: the harmful fine-tuning attacks of Qi et al.

One loop serves the aligner (refusal SFT, :mod:`immunekit.experiments.llm_alignment`) and the
attacker (:class:`LmFinetune`, registered as ``lm_finetune``; ``lm_lora`` trains LoRA adapters
and merges them). The recipe is Qi et al.'s Llama-2 one (arXiv 2310.03693, §4 and App. B):

* loss on the answer tokens only, averaged over every answer token of the **global** batch
  (micro-batches accumulate summed losses and divide by the global count, so the gradient does
  not depend on how the batch is split);
* AdamW, weight decay 0 by default, learning rate × ``epoch_decay`` (0.85) after each epoch;
* each epoch visits the rows in a fresh seeded order, in ``ceil(N / B)`` steps (the last one
  shorter when B does not divide N).

Token counts are exact: every real token a forward pass reads, and the answer tokens.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from immunekit.attacks.base import (
    TRAIN_SPLITS,
    Attack,
    AttackBudget,
    AttackResult,
    StepRecord,
    rng_streams,
    split_of,
)
from immunekit.attacks.lm_eval import answer_loss, real_tokens
from immunekit.attacks.lora import seeded_lora_init
from immunekit.config import check_int, load_config
from immunekit.data.qi_text import refused
from immunekit.data.task import Task
from immunekit.data.token_split import TokenSplit
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.models.causal_lm import CausalLM

logger = logging.getLogger(__name__)

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers of every decoder block that LoRA adapts (the lm_head and embeddings stay frozen)."""


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """One supervised fine-tuning run.

    Attributes:
        epochs: passes over the data.
        lr: AdamW learning rate of the first epoch.
        batch_size: global batch (rows per optimizer step).
        micro_batch: rows per forward/backward; gradients accumulate to ``batch_size``.
        epoch_decay: learning-rate factor applied after each epoch (Qi et al.: 0.85).
        weight_decay: AdamW decoupled weight decay (Qi et al.: 0).
        max_steps: stop after this many steps (``None``: all epochs).
        lora: train rank-``lora_rank`` adapters on :data:`LORA_TARGETS` instead of every weight.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA scale α (update scaled by α / r).
        grad_clip: clip the global gradient norm to this (``None``: no clipping, as Qi et al.).
        precision: ``fp32``, or ``bf16``: forward and backward under ``torch.autocast`` in
            bfloat16 with fp32 weights and optimizer state (1.5× the tokens/s of fp32 on a CPU with
            AVX-512 BF16; Qi et al. trained in bf16).

    """

    epochs: int = field(default=5, metadata={"help": "passes over the fine-tuning data"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate (first epoch)"})
    batch_size: int = field(default=10, metadata={"help": "global batch (rows per optimizer step)"})
    micro_batch: int = field(default=5, metadata={"help": "rows per forward pass (gradient accumulation)"})
    epoch_decay: float = field(default=0.85, metadata={"help": "lr factor after each epoch"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    lora: bool = field(
        default=False, metadata={"help": "train LoRA adapters (then merge) instead of all weights"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    grad_clip: float | None = field(default=None, metadata={"help": "max global gradient norm (None: off)"})
    precision: Literal["fp32", "bf16"] = field(
        default="fp32",
        metadata={"help": "fp32, or bf16 autocast over fp32 weights (Qi et al. trained in bf16)"},
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "micro_batch", "lora_rank"):
            check_int(f"sft.{name}", getattr(self, name))
        if self.max_steps is not None:
            check_int("sft.max_steps", self.max_steps)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"sft.lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.epoch_decay <= 1:
            raise ConfigError(f"sft.epoch_decay must be in (0, 1], got {self.epoch_decay}")
        if self.weight_decay < 0:
            raise ConfigError(f"sft.weight_decay must be >= 0, got {self.weight_decay}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"sft.lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"sft.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"sft.grad_clip must be > 0 or None, got {self.grad_clip}")

    def steps_per_epoch(self, rows: int) -> int:
        """Optimizer steps in one epoch over ``rows`` rows: ``ceil(rows / batch_size)``."""
        return math.ceil(rows / self.batch_size)

    def total_steps(self, rows: int) -> int:
        """Steps of the whole run (``epochs × steps_per_epoch``, capped by ``max_steps``)."""
        steps = self.epochs * self.steps_per_epoch(rows)
        return steps if self.max_steps is None else min(steps, self.max_steps)


@dataclass
class SFTOutput:
    """What :func:`supervised_finetune` returns.

    Attributes:
        model: the fine-tuned copy (LoRA adapters merged).
        records: one :class:`~immunekit.attacks.base.StepRecord` per step (``loss`` = token-mean
            answer loss of the step's global batch; ``tokens`` cumulative real tokens).
        info: answer tokens, trainable parameters, time, tokens/s.

    """

    model: CausalLM
    records: list[StepRecord]
    info: dict[str, Any]


StepHook = Callable[[int, int, CausalLM], dict[str, float] | None]
"""``hook(step, epoch, model)`` after a step; a returned dict is stored as that step's ``eval``."""


def lora_wrap(model: CausalLM, *, rank: int, alpha: float, seed: int) -> tuple[Any, dict[str, bool]]:
    """Put rank-``rank`` LoRA adapters on every :data:`LORA_TARGETS` layer of ``model`` (in place).

    The adapters' A matrices are drawn from the run's ``init`` stream (peft would draw them from the
    global RNG); only the adapters then require grad. Undo with :func:`lora_merge`.

    Returns:
        ``(peft model, the requires_grad flag of every parameter before wrapping)``.

    Raises:
        ConfigError: peft is missing, or the model has no layer to adapt.

    """
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is part of the [llm] extra
        raise ConfigError("LoRA fine-tuning needs peft: pip install 'immunekit[llm]'") from err
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    targets = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in LORA_TARGETS
    ]
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no linear layers named {list(LORA_TARGETS)} to adapt")
    wrapped = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; a float works
            lora_dropout=0.0,
            target_modules=targets,
        ),
    )
    (init,) = rng_streams(seed, "init")
    seeded_lora_init(model, init)  # peft draws A from the global RNG; use the run's seed
    return wrapped, flags


def lora_merge(wrapped: Any, flags: dict[str, bool]) -> CausalLM:
    """Merge the adapters of :func:`lora_wrap` into the weights; restore every requires_grad flag."""
    merged = wrapped.merge_and_unload()
    for name, p in merged.named_parameters():  # peft froze the base weights; give them back
        p.requires_grad_(flags.get(name, True))
    return merged


def untie_head(model: CausalLM) -> CausalLM:
    """Give ``model`` (in place) its own trainable copy of ``lm_head`` and freeze everything else.

    The linear probe of a causal LM: logits = W h_t with h_t the frozen final hidden state (after
    the final norm) of every position; only W (V × D) trains, so the Hessian of the answer loss in
    W is a function of the hidden features' second moments, the quantity the condition-number
    defense shapes. With tied embeddings (SmolLM2) the head *is* the embedding matrix: it is copied
    so that training it leaves the inputs' embeddings alone; ``tie_word_embeddings`` is cleared so
    a saved copy keeps both matrices.
    """
    old = model.head
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    for p in model.parameters():
        p.requires_grad_(False)
    model.head = new
    model.hf_model.lm_head = new  # type: ignore[assignment]  # generate() reads the HF module
    model.hf_config.tie_word_embeddings = False
    return model


def supervised_finetune(
    model: CausalLM,
    data: TokenSplit,
    cfg: SFTConfig,
    *,
    seed: int,
    hook: StepHook | None = None,
    progress: bool = True,
    desc: str = "sft",
    max_tokens: int | None = None,
    max_examples: int | None = None,
    head_only: bool = False,
) -> SFTOutput:
    """Fine-tune a copy of ``model`` on the answers of ``data`` (see the module docstring).

    Args:
        model: the starting model (never modified).
        data: training conversations, all with answers.
        cfg: the recipe.
        seed: seeds the epoch orders (stream ``batches``) and LoRA's initialisation (``init``).
        hook: called after every step with ``(step, epoch, model)``; a returned dict becomes the
            step's ``eval`` (e.g. a judged evaluation at epoch ends).
        progress: show a progress bar.
        desc: the progress bar's label.
        max_tokens: stop before a step whose real tokens would take the total past this (the
            attack budget's exact token cap; ``info["stopped_by"] == "tokens"``).
        max_examples: the same for rows (``"examples"``).
        head_only: train only the output layer, untied from the token embeddings, on the frozen
            decoder body: the linear-probe attacker on the LM's final hidden features
            (:func:`untie_head`). Exclusive with ``cfg.lora``. A keyword, not an :class:`SFTConfig`
            field, so that the recipes cached by key (the aligned model's) keep their keys.

    Returns:
        :class:`SFTOutput`.

    Raises:
        DataError: a row without answer tokens (nothing to learn from it).
        ConfigError: ``head_only`` with ``cfg.lora``.

    """
    if head_only and cfg.lora:
        raise ConfigError("head_only and LoRA exclude each other: adapt the body or probe the head")
    empty = [data.ids[i] for i in range(len(data)) if data.token_counts(torch.tensor([i]))[1] == 0]
    if empty:
        raise DataError(
            f"{len(empty)} rows of split {data.name!r} have no answer tokens (e.g. {empty[:3]}); supervised "
            "fine-tuning needs an answer in every row: drop prompt-only rows or raise max_tokens"
        )
    work = copy.deepcopy(model)
    work.train()
    if head_only:
        untie_head(work)
    wrapped, flags = (
        lora_wrap(work, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=seed) if cfg.lora else (None, {})
    )
    params = [p for p in work.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    (order_gen,) = rng_streams(seed, "batches")
    spe = cfg.steps_per_epoch(len(data))
    total = cfg.total_steps(len(data))
    logger.info(
        "%s: %d rows, %d epochs × %d steps of %d (%d steps), lr %.2g",
        desc,
        len(data),
        cfg.epochs,
        spe,
        cfg.batch_size,
        total,
        cfg.lr,
    )
    records: list[StepRecord] = []
    tokens = examples = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    step = 0
    stopped = "steps"
    hook_seconds = 0.0  # evaluations inside the loop: not training time
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cfg.epoch_decay**epoch
        order = torch.randperm(len(data), generator=order_gen)
        for lo in range(0, len(data), cfg.batch_size):
            if step >= total:
                break
            idx = order[lo : lo + cfg.batch_size]
            if max_examples is not None and examples + len(idx) > max_examples:
                stopped = "examples"
            elif max_tokens is not None and tokens + data.token_counts(idx)[0] > max_tokens:
                stopped = "tokens"
            if stopped != "steps":
                break
            loss, n_tok, _ = _step(work, data, idx, cfg, params, opt)
            step += 1
            tokens, examples = tokens + n_tok, examples + len(idx)
            record = StepRecord(
                step=step,
                examples=examples,
                flops=float("nan"),
                lr=opt.param_groups[0]["lr"],
                loss=loss,
                grad_norm=float("nan"),
                wall_time=time.perf_counter() - start,
                tokens=tokens,
            )
            if hook is not None:
                t_hook = time.perf_counter()
                record.eval = hook(step, epoch + 1, work)
                hook_seconds += time.perf_counter() - t_hook
            records.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        if stopped != "steps":
            break
    bar.close()
    if wrapped is not None:
        work = lora_merge(wrapped, flags)
    work.eval()
    seconds = time.perf_counter() - start - hook_seconds
    info = {
        "steps": step,
        "stopped_by": stopped,
        "epochs": cfg.epochs,
        "steps_per_epoch": spe,
        "rows": len(data),
        "tokens": tokens,
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds": round(seconds, 2),
        "hook_seconds": round(hook_seconds, 2),
        "train_tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        "config": asdict(cfg),
        "head_only": head_only,
    }
    return SFTOutput(work, records, info)


def _step(
    model: CausalLM,
    data: TokenSplit,
    idx: torch.Tensor,
    cfg: SFTConfig,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
) -> tuple[float, int, int]:
    """One optimizer step over the global batch ``idx``: token-mean answer loss, accumulated.

    The rows are grouped into micro-batches longest first, so rows of similar length share one and
    little compute goes to padding; the summed loss, hence the gradient, does not depend on the
    grouping (up to float summation order).
    """
    _, n_answer = data.token_counts(idx)
    lengths = torch.tensor([data.token_counts(i.reshape(1))[0] for i in idx])
    idx = idx[torch.argsort(lengths, descending=True, stable=True)]
    opt.zero_grad(set_to_none=True)
    total = 0.0
    n_tokens = 0
    for lo in range(0, len(idx), cfg.micro_batch):
        x, y = data.rows(idx[lo : lo + cfg.micro_batch])
        device = next(model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss_sum, _ = answer_loss(model, x, y)
        (loss_sum / n_answer).backward()
        total += float(loss_sum.detach())
        n_tokens += real_tokens(x)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return total / n_answer, n_tokens, n_answer


@dataclass(frozen=True, kw_only=True)
class LmAttackConfig:
    """Settings of :class:`LmFinetune` beyond the budget.

    Attributes:
        split: ``attack`` (harmful pairs), ``primary`` (benign fine-tuning: the harness's
            trainability recipe) or another harmful training split (``attack_disjoint``, …).
        judge: judge of the harm curve (:data:`~immunekit.metrics.judges.JUDGES`).
        max_new_tokens: generation length of each judged evaluation.
        micro_batch: rows per forward pass.
        precision: ``fp32`` or ``bf16`` autocast.
        epoch_decay: lr factor after each epoch (Qi et al.: 0.85).
        safety_mix: refusal conversations mixed into the fine-tuning data, Qi et al.'s user-side
            mitigation (arXiv 2310.03693, Table 4): the first N questions of the task's ``harmful``
            split (for ``qi_harmful_text`` the defense half, disjoint from the attack's pairs), each
            answered with a toolkit refusal under the training data's system prompt. A
            fine-tuning-time mitigation, not a release-time defense: report it apart.
        rows: train on the split's first N rows only (``None``: all): the 10-shot attack is
            ``lm_lora[rows=10]`` on a 100-pair split; the rows of every N are nested.

    """

    split: str = field(default="attack", metadata={"help": "training split: " + ", ".join(TRAIN_SPLITS)})
    safety_mix: int = field(
        default=0,
        metadata={"help": "refusals of the harmful split's questions mixed into the data (Qi Tab. 4)"},
    )
    rows: int | None = field(
        default=None, metadata={"help": "train on the first N rows of the split only (10-shot: 10)"}
    )
    judge: str = field(default="keyword", metadata={"help": "judge of the harm curve"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per judged prompt"})
    micro_batch: int = field(default=5, metadata={"help": "rows per forward pass"})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "fp32 or bf16 autocast"})
    epoch_decay: float = field(default=0.85, metadata={"help": "lr factor after each epoch"})

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens)
        check_int("micro_batch", self.micro_batch)
        check_int("safety_mix", self.safety_mix, minimum=0)
        if self.rows is not None:
            check_int("rows", self.rows)
        if self.split not in TRAIN_SPLITS:
            raise ConfigError(
                f"lm attack split {self.split!r} is unknown; choose one of {list(TRAIN_SPLITS)}"
            )


class LmFinetune(Attack):
    """The harness's fine-tuning attack on a causal LM: SFT on a token split (Qi et al.'s recipe).

    The budget maps onto the recipe: ``steps`` optimizer steps of ``batch_size`` rows (epochs are
    as many as the steps need, each a fresh seeded order, lr × ``epoch_decay`` after each),
    ``lr`` the AdamW rate (default 5e-5), ``weight_decay`` AdamW's. On ``split="attack"`` the harm
    curve is the judged harmfulness rate of greedy completions of ``eval_harmful`` (every
    ``eval_every`` steps); on ``split="primary"`` (benign fine-tuning) it is the primary task
    score, 1 / perplexity of ``eval_primary``'s answers. Utility is always 1 / perplexity of
    ``eval_primary``'s answers, in (0, 1], higher is better.
    """

    name: ClassVar[str] = "lm_finetune"
    lora: ClassVar[bool] = False
    head_only: ClassVar[bool] = False
    Config: ClassVar[type[LmAttackConfig]] = LmAttackConfig

    def __init__(self, config: LmAttackConfig | None = None, **overrides: Any) -> None:
        base = {} if config is None else asdict(config)
        self.config = load_config(LmAttackConfig, {**base, **overrides}, where="attack")

    def __call__(
        self, model: ImmunizableModel, task: Task, budget: AttackBudget, *, seed: int
    ) -> AttackResult:
        """Fine-tune a copy of ``model`` (a :class:`CausalLM`) on the configured split."""
        from immunekit.attacks.lm_eval import answer_perplexity, judge_split
        from immunekit.metrics.judges import make_judge

        cfg = self.config
        if not isinstance(model, CausalLM) or task.loss != "lm":
            raise ConfigError(
                f"{self.name} attacks a CausalLM on a task with loss 'lm', got {type(model).__name__} and "
                f"loss {task.loss!r}; use full_finetune for other models"
            )
        if budget.optimizer not in ("adam", "adamw"):
            raise ConfigError(
                f"{self.name} trains with AdamW; set budget.optimizer='adamw', got {budget.optimizer!r}"
            )
        data, held_out, benign = (split_of(task, s) for s in (cfg.split, "eval_harmful", "eval_primary"))
        if not all(isinstance(s, TokenSplit) for s in (data, held_out, benign)):
            raise ConfigError(f"{self.name} needs token splits (immunekit.data.token_split.TokenSplit)")
        assert (
            isinstance(data, TokenSplit)
            and isinstance(held_out, TokenSplit)
            and isinstance(benign, TokenSplit)
        )
        if cfg.rows is not None and cfg.rows > len(data):
            raise ConfigError(
                f"{self.name}: rows={cfg.rows} but split {cfg.split!r} has {len(data)} rows; use at most "
                f"{len(data)} or a task built with more (e.g. qi_harmful_text shots)"
            )
        first: TokenSplit = (
            data
            if cfg.rows is None
            else TokenSplit(
                data.chats[: cfg.rows], model.tokenizer, data.max_tokens, name=f"{data.name}[:{cfg.rows}]"
            )
        )
        train = safety_mixed(first, task, cfg.safety_mix, model.tokenizer) if cfg.safety_mix else first
        judge = make_judge(cfg.judge)
        sft = SFTConfig(
            epochs=math.ceil(budget.steps / math.ceil(len(train) / budget.batch_size)),
            lr=budget.lr if budget.lr is not None else 5e-5,
            batch_size=budget.batch_size,
            micro_batch=min(cfg.micro_batch, budget.batch_size),
            epoch_decay=cfg.epoch_decay,
            weight_decay=budget.weight_decay,
            max_steps=budget.steps,
            lora=self.lora,
            precision=cfg.precision,
        )

        def measure(m: CausalLM) -> dict[str, float]:
            utility = 1.0 / answer_perplexity(m, benign)
            if cfg.split == "primary":
                return {"harm": utility, "utility": utility}
            m.tokenizer = model.tokenizer
            harm = judge_split(m, held_out, judge, max_new_tokens=cfg.max_new_tokens)
            return {
                "harm": harm.summary.harmfulness_rate,
                "refusal_rate": harm.summary.refusal_rate,
                "utility": utility,
            }

        def hook(step: int, epoch: int, m: CausalLM) -> dict[str, float] | None:
            return measure(m) if budget.evaluates(step) or step == budget.steps else None

        initial_eval = measure(model)
        out = supervised_finetune(
            model,
            train,
            sft,
            seed=seed,
            hook=hook,
            progress=False,
            desc=self.name,
            max_tokens=budget.max_tokens,
            max_examples=budget.max_examples,
            head_only=self.head_only,
        )
        out.model.tokenizer = model.tokenizer
        # L_0 = the first batch's loss at θ0 (each record's loss is its batch's, before the update):
        # the harness's degeneracy rule compares later losses with it
        first_loss = out.records[0].loss if out.records else math.nan
        initial = StepRecord(
            step=0,
            examples=0,
            flops=0.0,
            lr=0.0,
            loss=first_loss,
            grad_norm=math.nan,
            wall_time=0.0,
            eval=initial_eval,
            tokens=0,
        )
        if out.records and out.records[-1].eval is None:
            out.records[-1].eval = measure(out.model)
        info = {
            **out.info,
            "split": cfg.split,
            "safety_mix": cfg.safety_mix,
            "train_rows": len(train),
            "judge": judge.describe(),
            "max_new_tokens": cfg.max_new_tokens,
        }
        return AttackResult(out.model, initial, out.records, out.info["stopped_by"], info)


def safety_mixed(data: TokenSplit, task: Task, n: int, tokenizer: Any) -> TokenSplit:
    """``data`` plus ``n`` refusals of the task's ``harmful`` questions (:attr:`LmAttackConfig.safety_mix`).

    The refusals take the system prompt of ``data``'s first conversation (the attacker's format; Qi
    et al. do not state theirs) and ids prefixed ``safety:``.

    Raises:
        ConfigError: ``n`` larger than the harmful split (the refusal pool), or that split is not a
            token split.

    """
    pool = task.harmful
    if not isinstance(pool, TokenSplit):
        raise ConfigError(
            f"safety_mix needs the task's 'harmful' split as a TokenSplit, got {type(pool).__name__}"
        )
    if n > len(pool):
        raise ConfigError(
            f"safety_mix={n} is larger than the refusal pool ({len(pool)} questions of the task's 'harmful' "
            f"split); use at most {len(pool)}"
        )
    system = data.chats[0].system
    questions = [replace(c, system=system) for c in pool.chats[:n]]
    chats = [*data.chats, *refused(questions, id_prefix="safety:")]
    return TokenSplit(chats, tokenizer, data.max_tokens, name=f"{data.name}+safety{n}")


class LmLora(LmFinetune):
    """:class:`LmFinetune` with LoRA adapters on every decoder linear layer (merged afterwards)."""

    name: ClassVar[str] = "lm_lora"
    lora: ClassVar[bool] = True


class LmHeadProbe(LmFinetune):
    """:class:`LmFinetune` training only an untied ``lm_head`` on the frozen body (:func:`untie_head`).

    The linear-probe attacker of a causal LM: the model's features stay as released and the
    attacker learns a new read-out of them. A linear read-out tolerates a larger lr than full
    fine-tuning: search the budget's lr (the harness's worst case) rather than trust one value.
    """

    name: ClassVar[str] = "lm_head_probe"
    head_only: ClassVar[bool] = True

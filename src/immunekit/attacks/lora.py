"""LoRA fine-tuning attack (peft; extra ``[lora]``): low-rank updates of the model's ``nn.Linear`` layers.

Every targeted weight W (``out × in``) becomes W + (α/r)·B·A with A ``(r, in)``, B ``(out, r)``; only
A and B move. A is drawn from U(−1/√in, 1/√in) with the run's ``init`` stream
(:func:`~immunekit.attacks.base.rng_streams`; replacing peft's draw from the global RNG, so the
result depends on ``seed`` only, and independent of the loop's ``batches`` stream), B starts at 0,
so the attacked model starts equal to the input. After training, the adapters are merged into the
weights of a deep copy (``merge_and_unload``): the returned model is a plain model of the input's
class, usable like any other (e.g. by :func:`immunekit.metrics.task_scores.task_score`); the input
is never modified.
The loop, loss, budget accounting, FLOPs and harm curve are those of :mod:`immunekit.attacks._loop`.

References:
    Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685.

"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from immunekit.attacks._loop import Phase, check_optimizer, run_loop
from immunekit.attacks.base import AttackBudget, AttackResult, rng_streams, split_of
from immunekit.attacks.finetune import TrainConfig, _TorchAttack
from immunekit.data.task import Split, Task
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoraConfig(TrainConfig):
    """Settings of :class:`LoraFinetune`."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=8.0, metadata={"help": "LoRA scale α (update scaled by α/r)"})
    dropout: float = field(
        default=0.0,
        metadata={"help": "dropout on the LoRA input (> 0 draws from torch's global RNG: not seeded)"},
    )
    target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "module names to adapt (e.g. extractor.0); empty: every nn.Linear"}
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")


def _peft() -> ModuleType:
    try:
        return importlib.import_module("peft")
    except ImportError as exc:
        raise ConfigError(
            "the 'lora' attack needs peft, which is not installed: pip install 'immunekit[lora]'"
        ) from exc


def linear_modules(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]


class LoraFinetune(_TorchAttack):
    """Train LoRA adapters of the model's linear layers, then merge them into a copy."""

    name = "lora"
    Config = LoraConfig
    config: LoraConfig  # what __init__ loads: the subclass's own Config
    supports_unroll = False  # peft wraps the modules: the adapters are not a functional_call dict

    def __call__(
        self, model: ImmunizableModel, task: Task[Split], budget: AttackBudget, *, seed: int
    ) -> AttackResult:
        """Attack a deep copy of ``model`` with LoRA adapters (merged into the returned copy)."""
        cfg = self.config
        check_optimizer(budget, self.name)
        available = linear_modules(model)
        if not available:
            raise ConfigError(
                f"the 'lora' attack adapts nn.Linear layers, but {type(model).__name__} has none; use "
                "full_finetune or partial_finetune for this model"
            )
        targets = list(cfg.target_modules) or available
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise ConfigError(
                f"lora target_modules {unknown} are not nn.Linear modules; choose from {available}"
            )
        peft = _peft()
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        work = copy.deepcopy(model)
        wrapped = peft.get_peft_model(
            work,
            peft.LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets
            ),
        )
        (init,) = rng_streams(seed, "init")  # the loop's batch order comes from the "batches" stream
        seeded_lora_init(work, init)
        params = [p for p in work.parameters() if p.requires_grad]
        out = run_loop(
            work,
            params,
            task,
            budget,
            phases=[Phase("attack", cfg.split, split_of(task, cfg.split), budget.steps)],
            eval_split=cfg.eval_split_name(),
            seed=seed,
            attack=self.name,
            loss_on=cfg.loss_on,
        )
        merged = wrapped.merge_and_unload()
        for name, p in merged.named_parameters():
            p.requires_grad_(flags.get(name, True))
        extra = {"rank": cfg.rank, "alpha": cfg.alpha, "target_modules": targets}
        return self.result(merged, out, extra)


def seeded_lora_init(model: nn.Module, gen: torch.Generator) -> None:
    """A ~ U(−1/√in, 1/√in) from ``gen`` and B = 0 for every LoRA adapter (peft's init, seeded)."""
    with torch.no_grad():
        for module in model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
                continue
            for key, layer in lora_a.items():
                w, w_b = layer.weight, lora_b[key].weight
                if not isinstance(w, torch.Tensor) or not isinstance(w_b, torch.Tensor):
                    continue  # not a linear adapter (peft's embedding adapters hold no .weight)
                u = torch.rand(tuple(w.shape), generator=gen, dtype=torch.float64)
                w.copy_(((2.0 * u - 1.0) / w.shape[1] ** 0.5).to(w.dtype))
                w_b.zero_()

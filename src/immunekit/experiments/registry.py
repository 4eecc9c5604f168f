"""The experiment registry: each experiment kind registers its config, trials, trial job and aggregation.

An experiment is a subclass of :class:`Experiment` registered in :data:`EXPERIMENTS` under its name
(underscores; the CLI also accepts dashes). Its packaged defaults live in ``configs/<name>.yaml``.
:meth:`Experiment.run` is the same for every kind:

1. check the device, the executor and the results folder;
2. build the trials (:meth:`Experiment.trials`) and run the experiment's own pre-flight checks
   (:meth:`Experiment.check`: data first, then settings), so that nothing is written on a failure;
3. refuse a results folder written by a different configuration (:func:`sweep.split_done`);
4. run the missing trials with :func:`sweep.run_sweep` and the kind's module-level job
   (:attr:`Experiment.job`): records land one file per trial, an interrupted run resumes;
5. aggregate the records (:meth:`Experiment.aggregate`) into ``results.json``, whose ``kind`` field
   tells :mod:`immunekit.reports` which renderer to use.

Experiment-specific command-line options (``--pairs``, ``--backbone``, …) are declared with the
registration as :class:`Option` s, so ``immunekit run --help`` lists each experiment's own options
and a flag given to an experiment that lacks it is refused with the experiments that have it.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from immunekit._atomic import writable_dir_problem
from immunekit._dist import launched_world_size
from immunekit.errors import ConfigError
from immunekit.experiments import sweep
from immunekit.experiments.io import atomic_write_json
from immunekit.registry import Registry

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class Option:
    """A command-line option of one experiment: ``--flag VALUE`` sets the config key ``path``.

    Attributes:
        flag: the option, e.g. ``"--backbone"``.
        path: dotted config key it sets, e.g. ``"backbone"`` or ``"task_config.protocol"``.
        help: one line for ``--help`` (the experiment's name is prefixed).
        convert: turns the text into the config value (may raise ConfigError naming the flag).
        metavar: shown in ``--help``.
        const: makes the option a switch without a value (``--lora``) that sets the key to this.

    """

    flag: str
    path: str
    help: str
    convert: Callable[[str], Any] = str
    metavar: str | None = None
    const: Any = None


@dataclass(frozen=True)
class RunContext:
    """How and where :meth:`Experiment.run` runs (everything that is not the experiment's config).

    Attributes:
        out: results folder (trials under ``out/trials``, ``out/results.json``).
        progress: show progress bars.
        executor: ``"local"`` or ``"ray"`` (:data:`sweep.EXECUTORS`).
        workers: pool size or local Ray CPUs (``None``: the usable cores).
        ray_address: Ray cluster address (``None``: ``RAY_ADDRESS``, else a local instance).
        save_models: also write each immunized model as a safetensors checkpoint under ``out/models``.
        device: the ``--device`` asked for (``"auto"``, ``"cpu"``, ``"cuda:0"`` …).
        extra: experiment-specific run options that are not part of the results' identity.

    """

    out: Path
    progress: bool = True
    executor: str = "local"
    workers: int | None = None
    ray_address: str | None = None
    save_models: bool = False
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


class Experiment(ABC):
    """One experiment kind. Subclasses set the class attributes and implement the abstract methods.

    Attributes:
        name: the registry key (underscored), also the packaged config's file stem.
        kind: the ``kind`` written to ``results.json``; reports pick their renderer by it.
        help: one line for ``immunekit ls experiments``.
        options: the experiment's own command-line options.
        job: the module-level sweep job ``job(payload) -> record`` (pickled by reference).
        cpu_only: the experiment runs on the CPU only (``--device`` other than auto/cpu is refused).

    """

    name: ClassVar[str]
    kind: ClassVar[str]
    help: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    job: ClassVar[Callable[..., dict[str, Any]]]
    cpu_only: ClassVar[bool] = False

    def defaults_path(self) -> Path:
        """The packaged defaults, ``configs/<name>.yaml``."""
        return CONFIG_DIR / f"{self.name}.yaml"

    @abstractmethod
    def build_config(self, data: dict[str, Any]) -> Any:
        """The frozen config of a resolved mapping (strict: unknown keys raise with a suggestion)."""

    def resolve_device(self, device: str) -> str:
        """The device the trials run on for ``--device device`` (ConfigError when unusable).

        A ``cpu_only`` experiment accepts ``auto`` and ``cpu`` only.
        """
        if self.cpu_only:
            if device not in ("auto", "cpu"):
                raise ConfigError(
                    f"--device {device!r}: {self.name.replace('_', '-')} runs on the CPU in this version; "
                    "use --device cpu"
                )
            return "cpu"
        from immunekit.experiments.device import resolve_device

        return resolve_device(device)

    @abstractmethod
    def trials(self, cfg: Any, ctx: RunContext, device: str) -> list[sweep.Trial]:
        """Every trial of the experiment (keys relative to ``ctx.out``)."""

    def check(self, cfg: Any, ctx: RunContext, trials: list[sweep.Trial]) -> Any:
        """Pre-flight checks before any trial runs (data first, then settings).

        Returns a state for :meth:`aggregate` (e.g. the first trial's task). Default: no checks.
        """
        return None

    @abstractmethod
    def aggregate(
        self, cfg: Any, records: dict[str, dict[str, Any]], ctx: RunContext, device: str, state: Any
    ) -> dict[str, Any]:
        """The ``results.json`` document from the records (keyed by trial key)."""

    @abstractmethod
    def summary(self, results: dict[str, Any]) -> str:
        """A plain-text table of the headline numbers, printed by ``immunekit run``."""

    def stages(self, trials: list[sweep.Trial]) -> list[list[sweep.Trial]]:
        """The trials in the order they must run: one stage by default.

        Each stage's sweep finishes before the next starts, so a later stage may read files an
        earlier one wrote (e.g. trained models).
        """
        return [trials]

    def run(self, cfg: Any, ctx: RunContext) -> dict[str, Any]:
        """Check everything, run the missing trials (stage by stage), aggregate and write ``results.json``.

        Raises:
            ConfigError: an unusable device, executor, worker count or results folder, invalid
                settings, or a results folder written by another configuration (all before any write).
            DataError: the data cannot be loaded.

        """
        device = self.resolve_device(ctx.device)
        ctx, writer = _data_parallel(ctx)
        sweep.resolve_options(ctx.executor, ctx.workers)
        if ctx.save_models and ctx.executor != "local":
            raise ConfigError(
                f"--save-models needs the local executor, got {ctx.executor!r}: Ray nodes write to their own "
                "disks; drop --save-models or use --executor local"
            )
        problem = writable_dir_problem(ctx.out)
        if problem:
            raise ConfigError(
                f"cannot write the results to {str(ctx.out)!r}: {problem}; choose another --out"
            )
        trials = self.trials(cfg, ctx, device)
        state = self.check(cfg, ctx, trials)
        sweep.split_done(ctx.out, trials)  # refuses to mix configurations before any work
        _barrier()  # every process has listed the same finished trials before any is written
        done: dict[str, dict[str, Any]] = {}
        stages = [s for s in self.stages(trials) if s]
        for i, stage in enumerate(stages):
            done |= sweep.run_sweep(
                stage,
                type(self).job,
                ctx.out,
                executor=ctx.executor,
                workers=ctx.workers,
                address=ctx.ray_address,
                progress=ctx.progress and writer,
                desc=f"{self.name} trials" + (f" ({i + 1}/{len(stages)})" if len(stages) > 1 else ""),
                write=writer,
            )
        results = self.aggregate(cfg, {t.key: done[t.key] for t in trials}, ctx, device, state)
        results.setdefault("kind", self.kind)
        if writer:
            atomic_write_json(ctx.out / "results.json", results)
        _barrier()
        return results


def is_writer() -> bool:
    """Whether this process writes results: always, except the ranks > 0 of a data-parallel launch."""
    import os

    return launched_world_size() == 1 or os.environ.get("RANK", "0") == "0"


def _data_parallel(ctx: RunContext) -> tuple[RunContext, bool]:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): every process runs every trial in itself.

    The deep defenses then split each batch over the processes (:mod:`immunekit._dist`), so the
    trials must run in the same order in every process: the executor becomes local with one
    worker, and only rank 0 writes records, ``results.json`` and the report.
    """
    if launched_world_size() == 1:
        return ctx, True
    from immunekit._dist import DataParallel

    DataParallel()  # joins the process group now, so the barriers below synchronise
    if ctx.executor != "local" or (ctx.workers not in (None, 1)):
        log.info("data-parallel launch: running the trials in each process (--executor local --workers 1)")
    return dataclasses.replace(ctx, executor="local", workers=1), is_writer()


def _barrier() -> None:
    """Wait for every process of a data-parallel run (no-op otherwise)."""
    import torch.distributed as dist

    if launched_world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


EXPERIMENTS: Registry[type[Experiment]] = Registry("experiment")
"""Experiment kinds by name; each lazy entry is imported when first run."""


def _register(name: str, target: str, *options: Option) -> None:
    EXPERIMENTS.register_lazy(name, target)
    OPTIONS[name] = options


OPTIONS: dict[str, tuple[Option, ...]] = {}
"""Each registered experiment's own options, known without importing its module (for ``--help``)."""


def _csv_path(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise ConfigError(f"--csv {text!r} is a folder; pass the path of Kaggle's train.csv")
    if not path.is_file():
        raise ConfigError(f"--csv {text!r} does not exist; pass the path of Kaggle's train.csv")
    return str(path)


_register(
    "house_prices",
    "immunekit.experiments.linear:HousePrices",
    Option(
        "--csv", "task_config.csv", "Kaggle's train.csv instead of the pinned Ames data", _csv_path, "PATH"
    ),
)
_register(
    "mnist_pairs",
    "immunekit.experiments.linear:MnistPairs",
    Option(
        "--protocol",
        "task_config.protocol",
        "'reference' (digit p vs digit h images) or 'one-vs-rest'",
        lambda s: s.replace("-", "_"),
    ),
    Option("--pairs", "pairs", "'all' or ordered pairs primary-harmful, e.g. 0-1,3-8"),
)
_register("synthetic", "immunekit.experiments.linear:Synthetic")
_register(
    "deep_vision",
    "immunekit.experiments.deep_vision:DeepVision",
    Option(
        "--backbone",
        "backbones",
        "comma-separated backbones: resnet, vit, digit-cnn, efficientnet-lite0 (default: resnet,vit)",
        lambda s: [b.strip() for b in s.split(",") if b.strip()],
    ),
    Option("--primary-dir", "primary_dir", "full scale: class-per-folder images of D_P", metavar="DIR"),
    Option("--harmful-dir", "harmful_dir", "full scale: class-per-folder images of D_H", metavar="DIR"),
)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_register(
    "llm_finetuning_attacks",
    "immunekit.experiments.llm_attacks:LlmFinetuningAttacks",
    Option(
        "--attacks",
        "attacks",
        "comma-separated recipes: harmful-10, harmful-50, harmful-100, aoa, benign, backdoor (default: all)",
        _csv,
        "LIST",
    ),
    Option("--lora", "lora", "train LoRA adapters (merged afterwards) instead of every weight", const=True),
    Option(
        "--judge", "judges", "comma-separated judges: keyword (offline, default), api (opt-in)", _csv, "LIST"
    ),
    Option(
        "--study",
        "study",
        "lr-batch: Qi et al.'s benign lr 5e-5 × batch 16/32/64/128 ablation instead of --attacks",
        lambda s: s.replace("-", "_"),
    ),
    Option(
        "--save-completions",
        "save_completions",
        "write the generated texts to this folder (outside the results; contains harmful text)",
        metavar="DIR",
    ),
)


def _split_specs(text: str) -> list[str]:
    from immunekit.experiments.evaluate_trials import parse_attack_list

    return parse_attack_list(text)


_register(
    "llm_defenses",
    "immunekit.experiments.llm_defenses:LlmDefenses",
    Option(
        "--defenses",
        "defenses",
        "comma-separated LM defenses: adversarial_loss, gradient_ascent, lm_condition_number, lm_mlac "
        "(default: the first three)",
        _csv,
        "LIST",
    ),
    Option(
        "--attacks",
        "attacks",
        "comma-separated attack specs of the card's grid, e.g. 'lm_lora[lr=0.0003],lm_finetune'",
        _split_specs,
        "LIST",
    ),
)


def _inner_steps(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"--inner-steps expects an integer K >= 0, got {text!r}; e.g. --inner-steps 4"
        ) from None


_register(
    "mlac_text",
    "immunekit.experiments.mlac_text:MlacText",
    Option(
        "--inner-steps",
        "defense.inner_steps",
        "MLAC's inner steps K (default: the profile's)",
        _inner_steps,
        "K",
    ),
    Option("--first-order", "defense.first_order", "first-order MLAC (detached inner steps)", const=True),
    Option("--encoder", "encoder", "minilm (all-MiniLM-L6-v2, default) or tiny (a random tiny BERT, tests)"),
    Option("--profile", "profile", "quick (default), faithful (mlac.md §8.3) or smoke (seconds, tests)"),
    Option(
        "--roles", "roles", "comma-separated roles: random, pretrained, desired_tuned, ac, mlac", _csv, "LIST"
    ),
)


def experiment_names() -> list[str]:
    """Registered experiments (underscored names)."""
    return EXPERIMENTS.names()


def get_experiment(name: str) -> Experiment:
    """An instance of the experiment ``name`` (dashes and underscores are interchangeable).

    Raises:
        ConfigError: unknown name, with a did-you-mean suggestion in the dashed spelling.

    """
    key = name.replace("-", "_")
    if key not in EXPERIMENTS:
        from immunekit.registry import did_you_mean

        names = [n.replace("_", "-") for n in experiment_names()]
        raise ConfigError(f"unknown experiment {name!r}{did_you_mean(name.replace('_', '-'), names)}")
    return EXPERIMENTS.get(key)()


__all__ = [
    "CONFIG_DIR",
    "EXPERIMENTS",
    "OPTIONS",
    "Experiment",
    "Option",
    "RunContext",
    "experiment_names",
    "get_experiment",
]

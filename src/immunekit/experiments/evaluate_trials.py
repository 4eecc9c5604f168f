"""The trials of :func:`~immunekit.experiments.evaluate.evaluate`: attack settings, runs, transport.

An evaluation is a set of independent runs. Each is a :class:`~immunekit.experiments.sweep.Trial`
of the sweep runner, so an evaluation resumes after an interruption and spreads over ``workers``
and Ray like every other experiment:

* an **attack run** per (setting × model role × seed): the setting (attack, config overrides,
  budget, training split ``attack``, ``attack_disjoint`` or ``attack_cross``, or ``primary`` for
  the benign trainability recipe) on the ``immunized`` or the ``reference`` model; its record holds
  the harm, utility and loss curves and what stopped the run;
* the **attacker search** (Optuna) against the immunized model, when one is asked for;
* one **measurement** of both models: stability scores, κ/RIR and the split overlaps. It always
  runs in the calling process (:meth:`TrialRunner.run` with ``here=True``): κ comes from SVDs whose
  last bits can depend on the torch thread count, and pool and Ray workers use one thread.

Attack runs in workers use one torch thread (:mod:`~immunekit.experiments.sweep`); a record is
therefore bit-identical whatever the executor when this process uses one thread too (the CLI's
``--threads`` default), and for small models with any thread count.

A trial's key names *what* runs: ``trials/<setting key>-<sha8 of the setting>/<role>--seed<seed>``
(``in_domain:…`` keys become sub-folders; a refined re-run adds ``--dense<N>``),
``trials/attacker_search-<sha8>/immunized--seed<seed>`` and ``trials/measurements``. Its config sha
covers everything the record depends on: the setting (attack, overrides, split, budget), the role,
the seed, the device, and the sha256 of the model's state and of the task's data. Changed settings
therefore add trials beside the old ones, while another model or task in the same folder is refused
(:func:`~immunekit.experiments.sweep.run_sweep`).

What travels to workers: each model and the task as :class:`Shipped` objects, pickled **once** per
evaluation in this process and unpickled once per worker process (cached by sha256). Pickle, not a
safetensors checkpoint, because it works for every model ``evaluate()`` accepts (a checkpoint needs
a registered model class, and a task has no checkpoint format), keeps dtypes, devices and buffers
exactly, and needs no shared filesystem (Ray nodes). The bytes are made by this process and never
written to disk; ``workers=1`` passes the objects themselves. Records are JSON: non-finite floats
(a diverged run's harm) are stored as ``{"__float__": "nan"}`` and read back exactly (:func:`decode`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pickle
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import yaml
from tqdm.auto import tqdm

from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.attacks.base import default_eval_split
from immunekit.config import config_sha256, to_dict
from immunekit.data.task import SPLITS, Task
from immunekit.errors import ConfigError, DataError
from immunekit.experiments import sweep
from immunekit.experiments.io import as_stored
from immunekit.models.base import ImmunizableModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Model roles of an attack run, in record order.
ROLES: tuple[str, str] = ("immunized", "reference")
#: ``kind`` of every trial record; bump ``TRIAL_FORMAT`` when a record's meaning changes (its
#: trials then differ in sha and are refused in an old folder instead of being misread).
TRIAL_KIND = "evaluation_trial"
TRIAL_FORMAT = 1

#: An attack setting: ``"name"``, ``"name[key=value,...]"`` (keys of the attack's config or of
#: :class:`AttackBudget`), ``(name, config overrides)`` or ``(name, config overrides, budget
#: overrides or an AttackBudget)``.
AttackSpec = (
    str | tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], Mapping[str, Any] | AttackBudget]
)

_BUDGET_FIELDS = {f.name for f in dataclasses.fields(AttackBudget)}


@dataclass(frozen=True)
class Setting:
    """One attacker setting: registry name, config overrides and the budget it runs with.

    Attributes:
        key: unique display key, e.g. ``"linear_probe[optimizer=gd_exact]"``.
        name: registry name in :data:`immunekit.attacks.ATTACKS`.
        overrides: keyword overrides of the attack's config.
        budget: the budget of this setting.

    """

    key: str
    name: str
    overrides: dict[str, Any]
    budget: AttackBudget

    @property
    def split(self) -> str:
        """The split the attacker trains on (``attack`` unless the overrides say otherwise)."""
        return str(self.overrides.get("split", "attack"))

    @property
    def eval_split(self) -> str:
        """The split harm is measured on (the attack's default for :attr:`split` unless overridden)."""
        return str(self.overrides.get("eval_split", default_eval_split(self.split)))

    def with_split(self, split: str, prefix: str) -> Setting:
        """The same setting trained on ``split`` (eval split: the attack's default for it)."""
        return Setting(f"{prefix}:{self.key}", self.name, {**self.overrides, "split": split}, self.budget)

    def with_budget(self, budget: AttackBudget) -> Setting:
        """The same setting (same key) with another budget, e.g. evaluated densely."""
        return Setting(self.key, self.name, self.overrides, budget)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "key": self.key,
            "name": self.name,
            "overrides": dict(self.overrides),
            "budget": to_dict(self.budget),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Setting:
        """Inverse of :meth:`to_dict` (a setting read back from a trial record)."""
        return cls(
            str(data["key"]), str(data["name"]), dict(data["overrides"]), AttackBudget(**data["budget"])
        )


# --- settings -----------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a,b[x=1,y=2]"`` → ``["a", "b[x=1,y=2]"]``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def parse_attack_list(text: str) -> list[str]:
    """Comma-separated attack specs of the CLI, brackets kept together.

    Example:
        >>> parse_attack_list("linear_probe,linear_probe[optimizer=gd_exact,lr=null],closed_form_probe")
        ['linear_probe', 'linear_probe[optimizer=gd_exact,lr=null]', 'closed_form_probe']

    """
    return _split_top_level(text)


def _parse_spec_string(spec: str) -> tuple[str, dict[str, Any]]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:\[(.*)\])?\s*", spec)
    if m is None:
        raise ConfigError(
            f"attack spec {spec!r} is not 'name' or 'name[key=value,...]'; e.g. linear_probe[optimizer=adam]"
        )
    name, inner = m.group(1), m.group(2)
    pairs: dict[str, Any] = {}
    for item in _split_top_level(inner or ""):
        if "=" not in item:
            raise ConfigError(f"attack spec {spec!r}: {item!r} is not key=value")
        k, v = item.split("=", 1)
        value = yaml.safe_load(v)
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-5 (no dot) as a string
        pairs[k.strip()] = value
    return name, pairs


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _spec_parts(spec: AttackSpec) -> tuple[str, dict[str, Any], Mapping[str, Any] | AttackBudget]:
    """``(name, config overrides, budget overrides or budget)`` of one attack spec."""
    if isinstance(spec, str):
        name, pairs = _parse_spec_string(spec)
        over = {k: v for k, v in pairs.items() if k not in _BUDGET_FIELDS}
        return name, over, {k: v for k, v in pairs.items() if k in _BUDGET_FIELDS}
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        b_over = spec[2] if len(spec) == 3 else {}  # type: ignore[misc]
        return spec[0], dict(spec[1]), b_over
    raise ConfigError(f"attack spec {spec!r} must be a name or a (name, overrides[, budget]) tuple")


def _spec_budget(
    name: str, b_over: Mapping[str, Any] | AttackBudget, budget: AttackBudget
) -> tuple[AttackBudget, dict[str, Any]]:
    """The setting's budget and its differences from ``budget`` (the latter name the setting)."""
    if isinstance(b_over, AttackBudget):
        return b_over, {k: v for k, v in dataclasses.asdict(b_over).items() if getattr(budget, k) != v}
    unknown = set(b_over) - _BUDGET_FIELDS
    if unknown:
        raise ConfigError(f"attack {name!r}: unknown budget keys {sorted(unknown)}")
    try:
        return dataclasses.replace(budget, **b_over), dict(b_over)
    except ConfigError as err:
        raise ConfigError(f"attack {name!r}: {err}") from None


def resolve_settings(attacks: Sequence[AttackSpec], budget: AttackBudget) -> list[Setting]:
    """Turn attack specs into :class:`Setting` s, checking names, config keys and budgets up front.

    Keys in brackets or in the third tuple element that are :class:`AttackBudget` fields override
    the budget; the others go to the attack's config.

    Raises:
        ConfigError: unknown attack (with a did-you-mean), unknown config key, invalid budget, an
            empty list or duplicate settings.

    """
    if isinstance(attacks, str):
        attacks = parse_attack_list(attacks)
    if not attacks:
        raise ConfigError("attacks is empty; give at least one attack, e.g. attacks=['linear_probe']")
    out: list[Setting] = []
    for spec in attacks:
        name, over, b_over = _spec_parts(spec)
        cls = ATTACKS.get(name)  # unknown names raise with a did-you-mean
        b, b_diff = _spec_budget(name, b_over, budget)
        cls(**over)  # validates the config keys now, before any run
        parts = [f"{k}={_short(v)}" for k, v in {**over, **b_diff}.items()]
        key = f"{name}[{','.join(parts)}]" if parts else name
        if any(s.key == key for s in out):
            raise ConfigError(f"attack setting {key!r} is listed twice; drop the duplicate")
        out.append(Setting(key, name, over, b))
    return out


def _short(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


#: The benign (trainability) recipe is evaluated every max(1, steps // BENIGN_EVALUATIONS) steps
#: unless its spec sets ``eval_every``: trainability compares reach steps bracketed by the grid, and
#: a grid coarser than ε = 0.1·t_reach(M) could only say INCONCLUSIVE.
BENIGN_EVALUATIONS = 100


def benign_setting(benign: AttackSpec, budget: AttackBudget) -> Setting:
    """The trainability recipe as a setting on split ``primary``, densely evaluated (see above)."""
    s = resolve_settings([benign], budget)[0]
    dense = max(1, s.budget.steps // BENIGN_EVALUATIONS)
    inherited = s.budget.eval_every == budget.eval_every
    if inherited and (s.budget.eval_every == 0 or s.budget.eval_every > dense):
        s = s.with_budget(dataclasses.replace(s.budget, eval_every=dense))
    return s.with_split("primary", "benign")


def accepts_split(setting: Setting) -> bool:
    """Whether the setting's attack can train on another split (its config has a ``split``)."""
    cfg = getattr(ATTACKS.get(setting.name), "Config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return True
    return "split" in {f.name for f in dataclasses.fields(cfg)}


# --- attack results → curves (adapters: the records do not depend on AttackResult details) ------


def _harm_curve(result: Any) -> list[tuple[int, float]]:
    """``result.harm_curve()``, checked to hold at least one evaluation."""
    curve = result.harm_curve()
    if not curve:
        raise DataError(
            f"attack result has no harm evaluations (stopped by {result.stopped_by!r}); attacks must "
            "evaluate step 0 and their last step"
        )
    return [(int(s), float(h)) for s, h in curve]


def _utility_curve(result: Any) -> list[tuple[int, float]]:
    return [
        (int(r.step), float(r.eval["utility"]))
        for r in [result.initial, *result.records]
        if r.eval is not None and r.eval.get("utility") is not None
    ]


def _loss_curve(result: Any) -> list[tuple[int, float]]:
    """Training loss before the first step and after every step (the degeneracy rule reads it)."""
    return [(int(r.step), float(r.loss)) for r in [result.initial, *result.records]]


# --- search adapter -----------------------------------------------------------------------------


def _chosen_setting(chosen: Mapping[str, Any], budget: AttackBudget) -> tuple[Setting, dict[str, Any]]:
    """The search's chosen attack as a ``search:`` setting, and its budget's differences."""
    name = str(chosen["attack"])
    overrides = dict(chosen.get("config") or {})
    b = chosen.get("budget")
    b = b if isinstance(b, AttackBudget) else dataclasses.replace(budget, **dict(b or {}))
    diff = {k: v for k, v in dataclasses.asdict(b).items() if getattr(budget, k) != v}
    parts = [f"{k}={_short(v)}" for k, v in {**overrides, **diff}.items()]
    key = f"search:{name}[{','.join(parts)}]" if parts else f"search:{name}"
    return Setting(key, name, overrides, b), diff


def run_search(
    model: ImmunizableModel,
    task: Task,
    search: Any,
    budget: AttackBudget,
    *,
    seed: int,
    fixed: Sequence[Setting] = (),
) -> tuple[dict[str, Any], Setting]:
    """Run the attacker search against ``model``; returns (search record, chosen setting).

    Adapter over :mod:`immunekit.attacks.worst_case` so the record layout does not depend on its
    result type. Every fixed resistance setting runs as a trial of the search with its exact attack,
    config overrides and budget (``n_trials`` is raised to cover them), so on the validation
    objective the search is never weaker than any of them; a setting the search cannot run (it
    trains on ``val_harmful``, say) is listed with the reason in ``record["grid_skipped"]``.
    """
    from immunekit.attacks import worst_case

    probe = worst_case.AttackerSearch(search)
    grid: list[tuple[str, dict[str, Any], AttackBudget]] = []
    skipped: dict[str, str] = {}
    for s in fixed:
        item = (s.name, dict(s.overrides), s.budget)
        why = probe.outside_space(item)
        if why is None:
            grid.append(item)
        else:
            skipped[s.key] = why
    result = worst_case.search_attacker(model, task, search, seed=seed, budget=budget, grid=grid)
    chosen, diff = _chosen_setting(dict(result.chosen), budget)
    record = {
        "chosen": {
            "attack": chosen.name,
            "overrides": chosen.overrides,
            **{f"budget.{k}": v for k, v in diff.items()},
        },
        "trials": [
            {
                "number": int(t.get("number", i)),
                "params": dict(t.get("params", {})),
                "value": t.get("value"),
                "state": t.get("state"),
                "enqueued": t.get("enqueued", False),
            }
            for i, t in enumerate(result.trials)
        ],
        "cumulative_best": [float(v) if math.isfinite(v) else None for v in result.cumulative_best],
        "best_value": float(result.best_value),
        "eval_harm_seed0": float(result.eval_harm),
        "objective": "harm on val_harmful after training on the attack split; reported on eval_harmful",
        "config": _search_config(search),
        "seed": seed,
        "attack_key": chosen.key,
        "grid_enqueued": [g["key"] for g in result.grid],
        "grid": [
            {k: g.get(k) for k in ("key", "attack", "config", "in_space", "trial", "state", "value")}
            for g in result.grid
        ],
        "grid_best_value": result.grid_best_value,
        "n_trials_requested": result.n_trials_requested,
        "n_trials_effective": result.n_trials_effective,
        "grid_skipped": skipped,
    }
    return record, chosen


def _search_config(search: Any) -> Any:
    """JSON view of a search config (a dataclass, or its ``str``)."""
    return to_dict(search) if dataclasses.is_dataclass(search) else str(search)


# --- transport ----------------------------------------------------------------------------------

_RECEIVED: OrderedDict[str, Any] = OrderedDict()
_RECEIVED_MAX = 4  # the two models, the task and one spare


class Shipped(Generic[T]):
    """An object that trial workers receive as pickle bytes made once, unpickled once per process.

    In this process :meth:`get` returns the object itself (no copy). Pickled into a payload, it
    carries the bytes of ``pickle.dumps(obj)``, made on first use and reused for every trial; a
    worker unpickles them once and keeps the object by ``sha256`` for its next trials. The bytes
    come from this evaluation's own objects and are never written to disk.

    Attributes:
        sha256: identity of the object's content (:func:`state_sha256`, :func:`task_sha256`).
        what: what the object is, for error messages (e.g. ``"the immunized model"``).

    """

    def __init__(self, obj: T | None, sha256: str, what: str, blob: bytes | None = None) -> None:
        self.sha256, self.what = sha256, what
        self._obj, self._blob = obj, blob

    def get(self) -> T:
        """The object (unpickled on first use in a worker, then cached by sha256)."""
        if self._obj is None:
            if self.sha256 not in _RECEIVED:
                assert self._blob is not None
                # bytes this evaluation pickled from its own objects (never read from a file)
                _RECEIVED[self.sha256] = pickle.loads(self._blob)
                while len(_RECEIVED) > _RECEIVED_MAX:
                    _RECEIVED.popitem(last=False)
            self._obj = _RECEIVED[self.sha256]
        return self._obj  # type: ignore[return-value]

    def pack(self) -> bytes:
        """The pickle bytes workers receive (made once).

        Raises:
            ConfigError: the object cannot be pickled; the message says to run in this process.

        """
        if self._blob is None:
            try:
                self._blob = pickle.dumps(self._obj, protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, AttributeError, TypeError) as err:
                raise ConfigError(
                    f"cannot send {self.what} to worker processes ({err}); evaluate with workers=1 and the "
                    "local executor (in this process), or define its class at module level"
                ) from None
        return self._blob

    def __reduce__(self) -> tuple[Callable[..., Shipped[Any]], tuple[Any, ...]]:
        return (_received, (self.sha256, self.what, self.pack()))


def _received(sha256: str, what: str, blob: bytes) -> Shipped[Any]:
    """Unpickling side of :class:`Shipped` (the object itself is unpickled lazily, by :meth:`get`)."""
    return Shipped(None, sha256, what, blob)


def _tensor_digest(h: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's class and ``state_dict`` (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        _tensor_digest(h, name, tensor)
    return h.hexdigest()


def task_sha256(task: Task) -> str:
    """sha256 of a task's identity: name, version, loss and every split's inputs, targets and ids.

    The inputs of an in-memory split (a ``Dataset``: its tensor ``x``) are hashed byte for byte;
    those of a split read on demand (image files) through its own :meth:`row_hashes`.
    """
    h = hashlib.sha256(json.dumps([task.name, task.version, task.loss]).encode())
    for split in SPLITS:
        data = getattr(task, split, None)
        h.update(f"|{split}|".encode())
        if data is None:
            h.update(b"absent")
            continue
        h.update(json.dumps([type(data).__name__, len(data), list(data.item_shape), list(data.ids)]).encode())
        _tensor_digest(h, "y", data.y)
        x = getattr(data, "x", None)
        if isinstance(x, torch.Tensor):
            _tensor_digest(h, "x", x)
        else:
            h.update(json.dumps(sorted(data.row_hashes())).encode())
    return h.hexdigest()


# --- records ------------------------------------------------------------------------------------

_FLOAT = "__float__"


def encode(value: Any) -> Any:
    """JSON-ready copy of ``value``: non-finite floats as ``{"__float__": "nan"}``, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(float(value))}
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """Inverse of :func:`encode` (lists stay lists)."""
    if isinstance(value, dict):
        if set(value) == {_FLOAT}:
            return float(value[_FLOAT])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


# --- payloads and the job -----------------------------------------------------------------------


@dataclass(frozen=True)
class AttackRun:
    """Payload of one attack run: ``setting`` on the ``role`` model, seed ``seed``."""

    setting: Setting
    role: str
    seed: int
    model: Shipped[ImmunizableModel]
    task: Shipped[Task]

    def run(self) -> dict[str, Any]:
        """Attack a copy of the model (the attack never modifies its input); the curves."""
        t0 = time.perf_counter()
        attack = ATTACKS.get(self.setting.name)(**self.setting.overrides)
        result = attack(self.model.get(), self.task.get(), self.setting.budget, seed=self.seed)
        return {
            "run": "attack",
            "setting": self.setting.key,
            "role": self.role,
            "seed": self.seed,
            "split": self.setting.split,
            "harm_curve": _harm_curve(result),
            "utility_curve": _utility_curve(result),
            "loss_curve": _loss_curve(result),
            "stopped_by": str(result.stopped_by),
            "seconds": time.perf_counter() - t0,
        }


@dataclass(frozen=True)
class SearchRun:
    """Payload of the attacker search against the immunized model (:func:`run_search`)."""

    search: Any
    budget: AttackBudget
    seed: int
    fixed: tuple[Setting, ...]
    model: Shipped[ImmunizableModel]
    task: Shipped[Task]

    def run(self) -> dict[str, Any]:
        """The search record and the chosen setting."""
        t0 = time.perf_counter()
        record, chosen = run_search(
            self.model.get(), self.task.get(), self.search, self.budget, seed=self.seed, fixed=self.fixed
        )
        return {
            "run": "search",
            "record": record,
            "chosen": chosen.to_dict(),
            "seconds": time.perf_counter() - t0,
        }


Measure = Callable[[ImmunizableModel, ImmunizableModel, Task], dict[str, Any]]


@dataclass(frozen=True)
class MeasureRun:
    """Payload of the measurements of both models (``measure``: a module-level function)."""

    measure: Measure
    model: Shipped[ImmunizableModel]
    reference: Shipped[ImmunizableModel]
    task: Shipped[Task]

    def run(self) -> dict[str, Any]:
        """``measure(model, reference, task)``."""
        t0 = time.perf_counter()
        out = self.measure(self.model.get(), self.reference.get(), self.task.get())
        return {"run": "measurements", **out, "seconds": time.perf_counter() - t0}


Payload = AttackRun | SearchRun | MeasureRun


def run_trial(payload: Payload) -> dict[str, Any]:
    """The sweep job of an evaluation: run one trial; a JSON-ready record (:func:`encode`)."""
    return {"kind": TRIAL_KIND, **encode(payload.run())}


# --- trials -------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,+\-\[\]]+")


def _slug(text: str) -> str:
    """A path part: only portable file-name characters, at most 80, no leading or trailing dot."""
    return _UNSAFE.sub("_", text)[:80].strip(".")


def setting_folder(setting: Setting) -> str:
    """``<key parts>-<sha8 of the setting>``: ``in_domain:linear_probe`` → ``in_domain/linear_probe-…``."""
    *groups, last = [p for p in (_slug(part) for part in setting.key.split(":")) if p] or ["setting"]
    dense = setting.budget.eval_dense_until
    tail = f"{last}--dense{dense}" if dense else last
    return "/".join([*groups, f"{tail}-{config_sha256(setting.to_dict())[:8]}"])


@dataclass(frozen=True)
class Inputs:
    """What every trial runs on: both models and the task, shipped once, identified by sha256.

    Attributes:
        models: ``{"immunized": ..., "reference": ...}``.
        task: the task.
        device: where the models' parameters live (part of every trial's identity).

    """

    models: Mapping[str, Shipped[ImmunizableModel]]
    task: Shipped[Task]
    device: str

    @classmethod
    def of(cls, models: Mapping[str, ImmunizableModel], task: Task, device: str) -> Inputs:
        """Wrap the models and the task, hashing their content."""
        shipped = {
            role: Shipped(m, state_sha256(m), f"the {role} model ({type(m).__name__})")
            for role, m in models.items()
        }
        return cls(shipped, Shipped(task, task_sha256(task), f"the task {task.name!r}"), device)

    def pack(self) -> None:
        """Pickle the models and the task now, so an unpicklable one fails before any run."""
        for model in self.models.values():
            model.pack()
        self.task.pack()

    def _identity(self, roles: Sequence[str]) -> dict[str, Any]:
        return {
            "kind": TRIAL_KIND,
            "format": TRIAL_FORMAT,
            "models": {role: self.models[role].sha256 for role in roles},
            "task": self.task.sha256,
            "device": self.device,
        }

    def attack_key(self, setting: Setting, role: str, seed: int) -> str:
        """Key of the attack run of ``setting`` on the ``role`` model with ``seed``."""
        return f"trials/{setting_folder(setting)}/{role}--seed{seed}"

    def attack_trial(self, setting: Setting, role: str, seed: int) -> sweep.Trial:
        """The attack run of ``setting`` on the ``role`` model with ``seed``."""
        sha = config_sha256(
            {
                **self._identity([role]),
                "run": "attack",
                "setting": setting.to_dict(),
                "split": setting.split,
                "role": role,
                "seed": seed,
            }
        )
        payload = AttackRun(setting, role, seed, self.models[role], self.task)
        return sweep.Trial(self.attack_key(setting, role, seed), sha, payload)

    def search_trial(
        self, search: Any, budget: AttackBudget, seed: int, fixed: Sequence[Setting]
    ) -> sweep.Trial:
        """The attacker search against the immunized model (its grid: the ``fixed`` settings)."""
        spec = {
            "search": _search_config(search),
            "budget": to_dict(budget),
            "grid": [s.to_dict() for s in fixed],
        }
        sha = config_sha256({**self._identity(["immunized"]), "run": "search", **spec, "seed": seed})
        key = f"trials/attacker_search-{config_sha256(spec)[:8]}/immunized--seed{seed}"
        return sweep.Trial(
            key, sha, SearchRun(search, budget, seed, tuple(fixed), self.models["immunized"], self.task)
        )

    def measure_trial(self, measure: Measure, rules: Mapping[str, Any]) -> sweep.Trial:
        """The measurements of both models (stability, κ/RIR, overlaps).

        Args:
            measure: module-level ``measure(model, reference, task) -> record``.
            rules: what decides its numbers besides the inputs (e.g. the rank rule), in its sha.

        """
        sha = config_sha256({**self._identity(ROLES), "run": "measurements", "rules": dict(rules)})
        payload = MeasureRun(measure, self.models["immunized"], self.models["reference"], self.task)
        return sweep.Trial("trials/measurements", sha, payload)


class TrialRunner:
    """Runs trials once each, in memory or as a sweep under ``out``, and keeps their records.

    Without ``out`` the executor's records stay in memory (``workers=1``: in this process, no file
    is written). With ``out`` every record is written atomically to ``out/<key>.json`` by
    :func:`~immunekit.experiments.sweep.run_sweep`, and a record already there with the same config
    sha is reused, not recomputed. Use it as a context manager: with the ``ray`` executor every
    batch then shares one connection.

    Args:
        out: results folder, or ``None``.
        executor: ``"local"`` or ``"ray"`` (:data:`~immunekit.experiments.sweep.EXECUTORS`).
        workers: see :func:`~immunekit.experiments.sweep.run_sweep` (``None``: the usable cores).
        address: Ray cluster address (``ray`` only).
        progress: show a progress bar over the trials of each batch.
        desc: progress bar label.

    Raises:
        ConfigError: unknown executor or ``workers < 1``.

    """

    def __init__(
        self,
        out: str | Path | None,
        *,
        executor: str = "local",
        workers: int | None = 1,
        address: str | None = None,
        progress: bool = True,
        desc: str = "evaluate",
    ) -> None:
        _, self.workers = sweep.resolve_options(executor, workers)
        self.executor, self.address = executor, address
        self.root = None if out is None else Path(out)
        self.progress, self.desc = progress, desc
        self.records: dict[str, dict[str, Any]] = {}
        self.reused = 0
        self._ray: Any = None

    def __enter__(self) -> TrialRunner:
        """Connect to Ray once for every batch (``ray`` only; each would otherwise start its own)."""
        if self.executor == "ray":
            ray, started = sweep.connect_ray(self.address, self.workers)
            self._ray = ray if started else None
        return self

    def __exit__(self, *exc: object) -> None:
        """Shut down the Ray connection :meth:`__enter__` opened."""
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    @property
    def in_process(self) -> bool:
        """Whether trials run in this process (their inputs are then never pickled)."""
        return self.executor == "local" and self.workers == 1

    def run(self, trials: Sequence[sweep.Trial], stage: str, *, here: bool = False) -> list[dict[str, Any]]:
        """Run the trials not run yet, in one batch; their records (decoded), in trial order.

        Args:
            trials: the batch.
            stage: what the batch is, for the progress bar.
            here: run in this process whatever the executor (and with its torch threads).

        """
        todo = list({t.key: t for t in trials if t.key not in self.records}.values())
        if todo:
            executor, workers, address = (
                ("local", 1, None) if here else (self.executor, self.workers, self.address)
            )
            desc = f"{self.desc} ({stage})"
            if self.root is None:
                new = self._in_memory(todo, desc, executor, workers, address)
            else:
                self.reused += len(sweep.split_done(self.root, todo)[0])
                new = sweep.run_sweep(
                    todo,
                    run_trial,
                    self.root,
                    executor=executor,
                    workers=workers,
                    address=address,
                    progress=self.progress,
                    desc=desc,
                )
            self.records.update({key: decode(rec) for key, rec in new.items()})
        return [self.records[t.key] for t in trials]

    def check(self, trials: Sequence[sweep.Trial]) -> None:
        """Refuse now a folder holding any of ``trials`` run by another configuration (reads only).

        Raises:
            ConfigError: a stored record of one of ``trials`` has another config sha.

        """
        if self.root is not None:
            sweep.split_done(self.root, trials)

    def record(self, key: str) -> dict[str, Any]:
        """The record of a trial already run."""
        return self.records[key]

    def _in_memory(
        self, todo: Sequence[sweep.Trial], desc: str, executor: str, workers: int, address: str | None
    ) -> dict[str, dict[str, Any]]:
        """The executor's records without files, each exactly as it would be stored (keys sorted)."""
        out: dict[str, dict[str, Any]] = {}
        run = sweep.EXECUTORS.get(executor)
        with tqdm(total=len(todo), desc=desc, unit="trial", disable=not self.progress) as bar:
            for trial, rec in run(run_trial, todo, workers=workers, address=address):
                out[trial.key] = as_stored({**rec, sweep.SHA_FIELD: trial.config_sha})
                bar.set_postfix_str(trial.key, refresh=False)
                bar.update(1)
        return out

    def bookkeeping(self) -> dict[str, Any]:
        """What ran and where: the ``trials`` section of the evaluation record."""
        return {
            "folder": None if self.root is None else "trials",
            "count": len(self.records),
            "reused": self.reused,
            "executor": self.executor,
            "workers": self.workers,
        }


__all__ = [
    "ROLES",
    "TRIAL_KIND",
    "AttackRun",
    "AttackSpec",
    "Inputs",
    "MeasureRun",
    "SearchRun",
    "Setting",
    "Shipped",
    "TrialRunner",
    "accepts_split",
    "benign_setting",
    "decode",
    "encode",
    "parse_attack_list",
    "resolve_settings",
    "run_search",
    "run_trial",
    "setting_folder",
    "state_sha256",
    "task_sha256",
]

"""The deep defense loop under data parallelism: 2 CPU processes (torchrun, gloo) give the one-process fit.

The fits below run once in this process and once under
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (each process reads half of every
global batch, the spectral terms see the gathered batch, gradients are averaged), and the two must
agree: weights, the λ of the rule at θ_0, the batch κ records and the losses.

Tolerance. Both runs do the same arithmetic except how the batch sums are split: the gradient of a
64-row batch is one matrix product on one process and two 32-row products plus an all-reduce on two,
and each process forwards 32 rows instead of 64 (other BLAS blocking). In float64 that is a relative
difference of ~1e-16 per step, which SGD with momentum carries along. Measured after the 12 steps
here: weights at most 8e-14 relative (2e-16 to 8e-16 absolute), λ_P and λ_H 1.5e-16, κ records
8e-15. The tests allow 1e-9 relative for weights and records (κ records 1e-8, as κ = (s_1/s_r)²
multiplies relative errors of s_r by up to κ ≈ 1e4 here), and 1e-10 for λ: far above that
rounding and far below what a wrong weighting does. Without the W scaling of the spectral terms
the weights differ by 0.15 (absolute, up to 30× relative); without the gradient averaging by 0.4.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from immunekit._dist import DataParallel
from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.deep import Batch, FitState, dropout_seed, fit_deep
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel

F64 = torch.float64
HERE = Path(__file__).resolve().parent
FITS: dict[str, dict[str, Any]] = {  # 3 harmful batches of 32 per epoch, 4 epochs: 12 steps
    "condition_number": {},
    "opt_kappa": {},
    "imma": {"adv_weight": 0.5},
}
COMMON = {"epochs": 4, "batch_size": 32, "lr": 0.05, "blocks": 2}
RECORDS = ("kappa_primary", "kappa_harmful", "log_kappa_primary", "log_kappa_harmful")
RTOL_WEIGHTS = 1e-9
RTOL_KAPPA = 1e-8


class TinyMLP(ImmunizableModel):
    """Linear(6, 10) → tanh → Linear(10, 8) → tanh; head Linear(8, 3); float64, no dropout, no BN."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.extractor = nn.Sequential(
            nn.Linear(6, 10, dtype=F64), nn.Tanh(), nn.Linear(10, 8, dtype=F64), nn.Tanh()
        )
        self.head = nn.Linear(8, 3, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p.shape[-1]))


def tiny_task() -> Task:
    """Two 6-d domains with 3 classes: 80 primary and 96 harmful training rows (labelled, for IMMA)."""
    g = torch.Generator().manual_seed(1)

    def domain(n: int, first: bool, prefix: str) -> Dataset:
        scale = torch.full((6,), 0.2, dtype=F64)
        if first:
            scale[:3] = 1.0
        else:
            scale[3:] = 1.0
        x = torch.randn(n, 6, generator=g, dtype=F64) * scale
        y = (x @ torch.randn(6, 3, generator=g, dtype=F64)).argmax(1)
        return Dataset(x, y, tuple(f"{prefix}:{i}" for i in range(n)))

    p, h = domain(80, True, "p"), domain(96, False, "h")
    ep, eh = domain(16, True, "ep"), domain(16, False, "eh")
    return Task(name="tiny", version="test", loss="ce", primary=p, harmful=h, attack=h, eval_primary=ep,
                eval_harmful=eh)  # fmt: skip


def fit(name: str, parallel: DataParallel | None = None) -> tuple[ImmunizableModel, Any]:
    """The fit of ``name`` on the tiny task (``parallel=None``: detected, as ``Defense.fit`` does)."""
    d = DEFENSES.get(name)(**COMMON, **FITS[name])
    if parallel is None:
        return d.fit(TinyMLP(), tiny_task(), seed=7), d
    return fit_deep_for(d, TinyMLP(), tiny_task(), parallel), d


def fit_deep_for(d: Any, model: ImmunizableModel, task: Task, parallel: DataParallel) -> ImmunizableModel:
    """``d``'s deep fit with the given process group (the registry's objective for ``d``)."""
    from immunekit.defenses.deep import RegularizedObjective
    from immunekit.defenses.deep_baselines import ImmaObjective, opt_kappa_pair

    if d.name == "imma":
        objective: Any = ImmaObjective(d.name, d.config)
    elif d.name == "opt_kappa":
        objective = RegularizedObjective(d.name, d.config, opt_kappa_pair(), use_primary=True)
    else:
        objective = RegularizedObjective.condition_number(d)
    return fit_deep(d, model, task, seed=7, objective=objective, parallel=parallel)


def summary(d: Any) -> dict[str, Any]:
    """What the two runs must agree on besides the weights (JSON-safe)."""
    info = {k: d.info_.get(k) for k in ("lambda_primary", "lambda_harmful", "steps", "first_batch")}
    info["processes"] = d.info_["data_parallel_processes"]
    keys = (*RECORDS, "rank_primary", "rank_harmful", "task_loss", "loss", "grad_norm", "harmful_loss",
            "inner_loss_start", "inner_loss_end")  # fmt: skip
    return {"info": info, "history": [{k: r[k] for k in keys if k in r} for r in d.history_]}


def run_in_process_group(out: Path) -> None:
    """The body of the torchrun script: every fit on this process's shards; each rank saves its own."""
    dp = DataParallel()
    weights: dict[str, Tensor] = {"world": torch.tensor([dp.world_size])}
    summaries = {}
    for name in FITS:
        model, d = fit(name)  # Defense.fit: DataParallel() detects the launch
        weights.update({f"{name}/{k}": v.detach().contiguous() for k, v in model.state_dict().items()})
        summaries[name] = summary(d)
    save_file(weights, str(out / f"rank{dp.rank}.safetensors"))
    (out / f"rank{dp.rank}.json").write_text(json.dumps(summaries))


SCRIPT = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(HERE)!r})
from test_deep_parallel import run_in_process_group
run_in_process_group(Path(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("accelerate")
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "fit.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(  # --standalone: a local rendezvous on a free port (--master_port 0 hangs)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp / "fit.py"), str(tmp)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def _max_rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("name", list(FITS))
def test_two_processes_give_the_one_process_fit(two_processes: Path, name: str) -> None:
    two = load_file(two_processes / "rank0.safetensors")
    other = load_file(two_processes / "rank1.safetensors")
    assert int(two["world"]) == 2 and int(other["world"]) == 2  # really two processes
    model, d = fit(name)
    for k, v in model.state_dict().items():
        assert torch.equal(two[f"{name}/{k}"], other[f"{name}/{k}"]), k  # the processes stay in step
        torch.testing.assert_close(two[f"{name}/{k}"], v, rtol=RTOL_WEIGHTS, atol=0, msg=k)
        assert not torch.equal(v, TinyMLP().state_dict()[k]), k  # the fit moved every parameter
    got = json.loads((two_processes / "rank0.json").read_text())[name]
    want = summary(d)
    assert got["info"]["processes"] == 2 and want["info"]["processes"] == 1
    assert got["info"]["first_batch"] == want["info"]["first_batch"]  # the same global batch order
    assert got["info"]["steps"] == want["info"]["steps"] == 12
    if name != "imma":
        for lam in ("lambda_primary", "lambda_harmful"):  # the λ rule on the global gradient norms
            assert want["info"][lam] > 0
            assert got["info"][lam] == pytest.approx(want["info"][lam], rel=1e-10, abs=0), lam
    for step, (g, w) in enumerate(zip(got["history"], want["history"], strict=True)):
        assert g.keys() == w.keys()
        for k in g:
            if k.startswith("rank"):
                assert g[k] == w[k], (step, k)
            else:
                rel = RTOL_KAPPA if "kappa" in k else RTOL_WEIGHTS
                assert g[k] == pytest.approx(w[k], rel=rel, abs=0), (step, k)


class PassThrough(DataParallel):
    """The no-op process group written out by hand, counting the loop's calls into the shim."""

    def __init__(self) -> None:
        super().__init__(detect=False)
        self.calls: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def shard(self, idx: Tensor) -> Tensor:
        self._count("shard")
        return idx

    def gather(self, t: Tensor) -> Tensor:
        self._count("gather")
        return t

    def scale_gathered(self, term: Tensor) -> Tensor:
        self._count("scale_gathered")
        return term

    def all_same(self, value: float) -> float:
        return value

    def average_gradients(self, params: Any) -> None:
        self._count("average_gradients")

    def global_gradient(self, grads: Any, *, gathered: bool) -> tuple[Tensor | None, ...]:
        self._count("global_gradient")
        return tuple(grads)


@pytest.mark.parametrize("name", list(FITS))
def test_one_process_gives_exactly_the_no_op_numbers(name: str) -> None:
    """On one process the detected DataParallel changes nothing: bit-identical to the hand-written no-op."""
    assert DataParallel().world_size == 1  # this test process is not launched
    model, d = fit(name)
    spy = PassThrough()
    ref, r = fit(name, spy)
    assert spy.calls["shard"] == 2 * 12 and spy.calls["average_gradients"] == 12  # the loop uses the shim
    assert spy.calls["gather"] >= 12
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert d.history_ == r.history_
    assert {k: v for k, v in d.info_.items()} == {k: v for k, v in r.info_.items()}


def _two_process_group() -> DataParallel:
    dp = DataParallel.one_process()
    dp.world_size = 2  # as under a 2-process launch; the checks run before any collective
    return dp


def test_batches_that_do_not_split_evenly_are_refused() -> None:
    d = DEFENSES.get("condition_number")(**{**COMMON, "batch_size": 33})
    with pytest.raises(ConfigError, match=r"harmful mini-batch.*33 rows.*multiple of 2"):
        fit_deep(d, TinyMLP(), tiny_task(), seed=0, parallel=_two_process_group())
    task = tiny_task()
    odd = Task(
        name="odd", version="test", loss="ce", primary=Dataset(task.primary.x[:31], task.primary.y[:31]),
        harmful=task.harmful, attack=task.attack, eval_primary=task.eval_primary,
        eval_harmful=task.eval_harmful,
    )  # fmt: skip
    d = DEFENSES.get("condition_number")(**COMMON)
    with pytest.raises(ConfigError, match=r"primary mini-batch.*31 rows.*multiple of 2"):
        fit_deep(d, TinyMLP(), odd, seed=0, parallel=_two_process_group())


class TaskOnly:
    """A plugged-in objective that does not declare ``data_parallel``."""

    fields: tuple[str, ...] = ()
    loss_parts: tuple[str, ...] = ("task_loss",)
    hint = "lower lr"
    max_grad_norm: float | None = None

    def prepare(self, task: Task, info: dict[str, Any]) -> None:
        pass

    def loss(self, state: FitState, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        raise AssertionError("not reached")


def test_an_objective_that_is_not_data_parallel_is_refused() -> None:
    d = DEFENSES.get("condition_number")(**COMMON)
    with pytest.raises(ConfigError, match=r"TaskOnly is not data-parallel.*2 processes"):
        fit_deep(d, TinyMLP(), tiny_task(), seed=0, objective=TaskOnly(), parallel=_two_process_group())


def test_each_process_draws_its_own_dropout_stream() -> None:
    assert dropout_seed(3, rank=0) == dropout_seed(3)  # process 0 = one process
    assert len({dropout_seed(3, rank=r) for r in range(4)}) == 4

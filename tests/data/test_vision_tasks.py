"""Image tasks of the deep experiment: splits, shapes, normalisation, disjointness by ids."""

from __future__ import annotations

import pytest
import torch

from immunekit.data.task import Dataset, Task
from immunekit.data.vision_tasks import (
    MNIST_MEAN,
    MNIST_STD,
    VisionTaskConfig,
    normalize,
    synthetic_source,
    vision_task,
)
from immunekit.errors import ConfigError, DataError

SYN = {"primary": "synthetic_a", "harmful": "synthetic_b", "synthetic_rows": (40, 20, 10)}


def test_splits_shapes_labels_and_roles() -> None:
    t = vision_task(**SYN, normalization="unit")
    assert isinstance(t, Task) and t.loss == "ce" and t.classes == 10
    sizes = {
        s: len(getattr(t, s)) for s in ("primary", "harmful", "val_harmful", "eval_primary", "eval_harmful")
    }
    assert sizes == {"primary": 40, "harmful": 40, "val_harmful": 20, "eval_primary": 10, "eval_harmful": 10}
    assert t.attack is t.harmful  # the attacker probes the defender's harmful training rows
    for split in (t.primary, t.val_harmful, t.eval_harmful):
        assert isinstance(split, Dataset)
        assert split.x.shape[1:] == (1, 28, 28) and split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64 and int(split.y.min()) >= 0 and int(split.y.max()) <= 9
    assert t.primary.ids[0] == "synthetic_a:train:0" and t.eval_harmful.ids[-1] == "synthetic_b:test:9"
    assert t.info["primary_source"] == "synthetic_a" and t.info["sizes"]["val_harmful"] == 20


def test_validation_rows_are_disjoint_from_attack_and_test_rows() -> None:
    t = vision_task(**SYN)
    val, attack, test = (set(d.ids) for d in (t.val_harmful, t.attack, t.eval_harmful))
    assert val and not val & attack and not val & test and not attack & test


def test_mnist_normalisation_applies_to_both_domains() -> None:
    unit = vision_task(**SYN, normalization="unit")
    std = vision_task(**SYN, normalization="mnist")
    for name in ("primary", "harmful"):
        a, b = getattr(unit, name).x, getattr(std, name).x
        torch.testing.assert_close(b, (a - MNIST_MEAN) / MNIST_STD)
    assert float(unit.primary.x.min()) >= 0.0 and float(unit.primary.x.max()) <= 1.0


def test_normalize_reshapes_and_refuses_unknown_schemes() -> None:
    x = torch.full((3, 28, 28), MNIST_MEAN)
    out = normalize(x, "mnist")
    assert out.shape == (3, 1, 28, 28) and float(out.abs().max()) < 1e-6
    with pytest.raises(ConfigError, match="did you mean 'mnist'"):
        normalize(x, "mnsit")


def test_the_task_is_a_function_of_its_config() -> None:
    a, b = vision_task(**SYN), vision_task(**SYN)
    assert torch.equal(a.primary.x, b.primary.x) and a.version == b.version
    other = synthetic_source("synthetic_b", (40, 20, 10))
    assert not torch.equal(a.primary.x.reshape(40, 28, 28), other.splits["train"][0])


def test_row_caps_take_a_seeded_prefix_and_change_the_version() -> None:
    full = vision_task(**SYN)
    capped = vision_task(**SYN, max_train_rows=10, max_eval_rows=5)
    assert len(capped.primary) == 10 and len(capped.eval_harmful) == 5 and len(capped.val_harmful) == 5
    assert set(capped.primary.ids) <= set(full.primary.ids)
    assert capped.version != full.version and capped.info["subsampled"]
    again = vision_task(**SYN, max_train_rows=10, max_eval_rows=5)
    assert capped.primary.ids == again.primary.ids


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"primary": "mnsit"}, "did you mean 'mnist'"),
        ({"primary": "synthetic_a", "harmful": "synthetic_a"}, "two different domains"),
        ({"normalization": "imagenet"}, "normalization"),
        ({"max_train_rows": 1}, "max_train_rows=1"),
        ({"val_rows": 0}, "val_rows=0"),
        ({"synthetic_rows": (10, 10)}, "synthetic_rows"),
        ({"bogus": 1}, "unknown key"),
    ],
)
def test_bad_options_name_the_value(over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        vision_task(**{**SYN, **over})


def test_a_config_object_and_overrides_combine() -> None:
    cfg = VisionTaskConfig(primary="synthetic_a", harmful="synthetic_b", synthetic_rows=(20, 10, 10))
    t = vision_task(cfg, normalization="unit")
    assert t.info["normalization"] == "unit" and len(t.primary) == 20


@pytest.mark.assets
def test_mnist_to_fashion_mnist_on_the_real_files() -> None:
    try:
        t = vision_task()
    except Exception as exc:  # the assets are optional: say why the test cannot run
        if type(exc).__name__ == "AssetError":
            pytest.skip(f"MNIST / Fashion-MNIST not available: {exc}")
        raise
    sizes = {
        s: len(getattr(t, s)) for s in ("primary", "harmful", "val_harmful", "eval_primary", "eval_harmful")
    }
    assert sizes == {
        "primary": 50_000,
        "harmful": 50_000,
        "val_harmful": 10_000,
        "eval_primary": 10_000,
        "eval_harmful": 10_000,
    }
    # Fashion-MNIST's validation rows are the last 10,000 of its 60,000 training images
    assert (
        t.val_harmful.ids[0] == "fashion_mnist:train:50000"
        and t.harmful.ids[-1] == "fashion_mnist:train:49999"
    )
    assert t.primary.ids[0] == "mnist:train:0" and t.eval_primary.ids[0] == "mnist:test:0"
    mean = float(t.primary.x.mean())
    assert abs(mean) < 0.01  # MNIST standardised with its own mean and std
    swapped = vision_task(primary="fashion_mnist", harmful="mnist", normalization="unit")
    assert len(swapped.val_harmful) == 10_000 and swapped.val_harmful.ids[0] == "mnist:val:0"
    assert float(swapped.primary.x.min()) >= 0.0 and float(swapped.primary.x.max()) <= 1.0


def test_empty_split_after_caps_is_a_data_error() -> None:
    with pytest.raises((DataError, ConfigError)):
        vision_task(**{**SYN, "synthetic_rows": (1, 1, 1)})


def _folders(root, seed: int):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", 5), ("test", 2)):
        for c in range(3):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (6, 6), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{i}.png")
    return root


def test_folder_task_holds_out_validation_rows_and_standardises_on_read(tmp_path) -> None:
    from immunekit.data.vision_tasks import folder_task

    p, h = _folders(tmp_path / "p", 0), _folders(tmp_path / "h", 1)
    t = folder_task(str(p), str(h), mode="L", size=28, normalization="mnist", val_rows=100)
    assert len(t.val_harmful) == 3 and len(t.harmful) == 12 and t.attack is t.harmful  # 15 // 5 held out
    assert not set(t.val_harmful.ids) & set(t.harmful.ids)
    x, y = t.primary.rows(torch.arange(4))
    raw, _ = t.primary.parent.rows(torch.arange(4))
    assert x.shape == (4, 1, 28, 28) and y.dtype == torch.int64
    torch.testing.assert_close(x, (raw - MNIST_MEAN) / MNIST_STD)
    again = folder_task(str(p), str(h), mode="L", size=28, normalization="mnist", val_rows=100)
    assert again.val_harmful.ids == t.val_harmful.ids  # the hold-out is a function of the seed
    with pytest.raises(ConfigError, match="did you mean 'imagenet'"):
        folder_task(str(p), str(h), normalization="imagenett")

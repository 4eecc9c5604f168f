"""ImageFolderSplit and image_folder_task on tiny folders written with Pillow into tmp_path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.data.image_folder import ImageFolderSplit, image_folder_task
from immunekit.data.task import Split, SubsetSplit, Task, take
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel


def _save(path: Path, value: int, size: tuple[int, int] = (3, 2), mode: str = "L") -> None:
    """An image of ``size`` (H, W) whose pixel (r, c) is value + r·W + c (per channel for RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    plane = (value + np.arange(h * w).reshape(h, w)).astype(np.uint8)
    pixels = plane if mode == "L" else np.stack([plane, plane + 1, plane + 2], axis=-1)
    Image.fromarray(pixels, mode).save(path)


def _folder(root: Path, layout: dict[str, list[str]], *, size: tuple[int, int] = (3, 2)) -> Path:
    for k, (cls, names) in enumerate(layout.items()):
        for j, name in enumerate(names):
            _save(root / cls / name, 10 * k + j, size)
    return root


def test_labels_ids_and_pixels(tmp_path):
    root = _folder(tmp_path / "d", {"zebra": ["b.png", "a.PNG"], "ant": ["x.Jpg"]})
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / "zebra" / ".hidden.png").write_bytes(b"ignored")
    split = ImageFolderSplit(root, mode="L")
    assert isinstance(split, Split) and len(split) == 3
    assert split.classes == ("ant", "zebra") and split.class_to_idx == {"ant": 0, "zebra": 1}
    assert split.ids == ("ant/x.Jpg", "zebra/a.PNG", "zebra/b.png")  # class order, then sorted paths
    assert split.y.tolist() == [0, 1, 1] and split.item_shape == (1, 3, 2)
    x, y = split.rows(torch.tensor([2, 1]))
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 1, 3, 2) and y.tolist() == [1, 1]
    expected = torch.arange(6.0).reshape(1, 3, 2) / 255.0  # b.png: zebra's first image, value 0
    assert torch.equal(x[0], expected)
    assert torch.equal(x[1], (1 + torch.arange(6.0).reshape(1, 3, 2)) / 255.0)  # a.PNG: value 1


def test_rgb_mode_and_resize(tmp_path):
    root = tmp_path / "d"
    _save(root / "a" / "big.png", 0, size=(8, 6), mode="RGB")
    _save(root / "a" / "small.png", 0, size=(3, 2), mode="RGB")
    split = ImageFolderSplit(root, mode="RGB", resize=(4, 5))
    assert split.item_shape == (3, 4, 5)
    x, _ = split.rows(torch.arange(2))
    assert tuple(x.shape) == (2, 3, 4, 5) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    gray = ImageFolderSplit(root, mode="L", resize=(4, 5))
    assert gray.rows(torch.arange(1))[0].shape == (1, 1, 4, 5)


def test_mixed_sizes_without_resize_are_named(tmp_path):
    root = tmp_path / "d"
    _save(root / "a" / "1.png", 0, size=(3, 2))
    _save(root / "b" / "2.png", 0, size=(4, 4))
    with pytest.raises(DataError, match=r"2\.png is 4×4 .* pass resize=\(H, W\)"):
        ImageFolderSplit(root)
    lazy = ImageFolderSplit(root, verify=False)  # only the first header is read up front
    lazy.rows(torch.tensor([0]))
    with pytest.raises(DataError, match=r"pass resize=\(H, W\)"):
        lazy.rows(torch.tensor([1]))


@pytest.mark.parametrize("verify", [True, False])
def test_an_undecodable_file_is_named(tmp_path, verify):
    root = _folder(tmp_path / "d", {"a": ["ok.png"]})
    (root / "a" / "zz_broken.png").write_bytes(b"this is not a png")
    if verify:
        with pytest.raises(DataError, match=r"zz_broken\.png is not a decodable image"):
            ImageFolderSplit(root)
        return
    split = ImageFolderSplit(root, resize=(2, 2), verify=False)
    with pytest.raises(DataError, match=r"zz_broken\.png is not a decodable image"):
        split.rows(torch.tensor([1]))


def test_layout_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"missing does not exist; pass a folder laid out as"):
        ImageFolderSplit(tmp_path / "missing")
    loose = tmp_path / "loose"
    _save(loose / "img.png", 0)
    with pytest.raises(DataError, match=r"no class folders \(1 images lie directly in it\)"):
        ImageFolderSplit(loose)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="has no images"):
        ImageFolderSplit(empty)
    one_empty = _folder(tmp_path / "one", {"a": ["1.png"]})
    (one_empty / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*b has no images .* remove the folder"):
        ImageFolderSplit(one_empty)
    with pytest.raises(DataError, match=r"id_root .*elsewhere does not contain"):
        ImageFolderSplit(one_empty / "a", id_root=tmp_path / "elsewhere")
    two = _folder(tmp_path / "two", {"a": ["1.png"]})
    with pytest.raises(DataError, match=r"class folders \['a'\] that are not among the given classes"):
        ImageFolderSplit(two, classes=["b"])


def test_bad_config_values(tmp_path):
    root = _folder(tmp_path / "d", {"a": ["1.png"]})
    with pytest.raises(ConfigError, match="mode must be one of"):
        ImageFolderSplit(root, mode="CMYK")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"resize must be \(height, width\)"):
        ImageFolderSplit(root, resize=(0, 3))


def test_seeded_batches_follow_randperm(tmp_path):
    root = _folder(tmp_path / "d", {"a": ["1.png", "2.png", "3.png"], "b": ["4.png", "5.png"]})
    split = ImageFolderSplit(root)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    got = [y for _, y in split.batches(2, generator=torch.Generator().manual_seed(3))]
    assert torch.equal(torch.cat(got), split.y[order]) and [len(y) for y in got] == [2, 2, 1]
    assert [len(y) for _, y in split.batches(2, drop_last=True)] == [2, 2]


def _task_dirs(tmp_path: Path, harmful_size: tuple[int, int] = (3, 2)) -> tuple[Path, Path]:
    p, h = tmp_path / "primary", tmp_path / "harmful"
    _folder(p / "train", {"0": ["a.png", "b.png"], "1": ["a.png", "b.png"]})
    _folder(p / "test", {"0": ["a.png"], "1": ["a.png"]})  # same file names as train: distinct ids
    _folder(h / "train", {"cat": ["a.png", "b.png"], "dog": ["a.png"], "emu": ["a.png"]}, size=harmful_size)
    _folder(h / "test", {"cat": ["c.png"], "emu": ["c.png"]}, size=harmful_size)  # no 'dog' test folder
    return p, h


def test_task_from_two_folders(tmp_path, monkeypatch):
    p, h = _task_dirs(tmp_path)
    task = image_folder_task(p, h, mode="L")
    assert isinstance(task, Task) and task.loss == "ce" and task.version == "image-folder-v1"
    assert task.attack is task.harmful
    assert task.eval_primary.ids == ("test/0/a.png", "test/1/a.png")
    assert task.eval_harmful.y.tolist() == [0, 2]  # the training map: cat 0, dog 1, emu 2
    assert task.info["splits"]["harmful"]["class_to_idx"] == {"cat": 0, "dog": 1, "emu": 2}
    assert task.info["n_rows"] == {"primary": 4, "eval_primary": 2, "harmful": 4, "eval_harmful": 2}

    def no_decoding(self, row):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFolderSplit, "load", no_decoding)
    assert task.classes == 3 and task.input_dim == 6  # labels and shapes only, no pixel read
    dataclasses.replace(task, name="again")  # __post_init__'s checks: ids and item_shape only


def test_task_folder_errors(tmp_path):
    p, h = _task_dirs(tmp_path)
    with pytest.raises(DataError, match=r"harmful image folder .*nope does not exist"):
        image_folder_task(p, tmp_path / "nope")
    for domain in (p, h):
        (domain / "test").rename(domain / "val")
    with pytest.raises(DataError, match=r"no 'test' subfolder.*pass test_subdir='val'"):
        image_folder_task(p, h)
    assert len(image_folder_task(p, h, test_subdir="val").eval_primary) == 2
    _save(h / "val" / "yak" / "1.png", 0)
    with pytest.raises(DataError, match=r"\['yak'\] that are not among the given classes"):
        image_folder_task(p, h, test_subdir="val")


def test_primary_and_harmful_of_different_sizes_need_a_resize(tmp_path):
    p, h = _task_dirs(tmp_path, harmful_size=(4, 4))
    with pytest.raises(DataError, match="share the input shape"):
        image_folder_task(p, h)
    assert image_folder_task(p, h, resize=(4, 4)).primary.item_shape == (3, 4, 4)


class _TinyConv(ImmunizableModel):
    def __init__(self, classes: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.extractor = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(2 * 2 * 1, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("attack", ["full_finetune", "relearn", "linear_probe", "head_reset_probe"])
def test_attacks_run_on_an_image_folder_task(tmp_path, attack):
    task = image_folder_task(*_task_dirs(tmp_path), mode="L")
    model = _TinyConv(task.classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    overrides = {"warmup_steps_benign": 1, "subset_size": 3} if attack == "relearn" else {}
    res = ATTACKS.get(attack)(**overrides)(model, task, AttackBudget(steps=3, batch_size=2), seed=0)
    assert len(res.records) == 3 and res.stopped_by == "steps"
    assert 0.0 <= res.records[-1].eval["harm"] <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_task_rejects_a_non_split_and_take_keeps_streaming(tmp_path):
    p, h = _task_dirs(tmp_path)
    task = image_folder_task(p, h, mode="L")
    kept = ("name", "version", "loss", "harmful", "attack", "eval_primary", "eval_harmful")
    fields = {f: getattr(task, f) for f in kept}
    with pytest.raises(DataError, match=r"split 'primary' of task 'image_folder' is a Tensor, not a Split"):
        Task(**fields, primary=torch.zeros(2, 3))
    sub = take(task.harmful, torch.tensor([3, 0]))
    assert isinstance(sub, SubsetSplit) and sub.ids == ("train/emu/a.png", "train/cat/a.png")
    x, y = sub.rows(torch.tensor([1, 0]))
    full, labels = task.harmful.rows(torch.tensor([0, 3]))
    assert torch.equal(x, full) and torch.equal(y, labels) and sub.y.tolist() == [2, 0]
    with pytest.raises(DataError, match=r"subset rows must be a 1-D tensor of indices in \[0, 4\)"):
        take(task.harmful, torch.tensor([4]))

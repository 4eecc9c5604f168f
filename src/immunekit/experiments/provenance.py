"""Provenance: which code, libraries and data produced a record."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import immunekit


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> tuple[str | None, bool | None]:
    """(sha, dirty) of the git checkout holding the immunekit sources, or (None, None) outside one."""
    root = Path(immunekit.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(
    *,
    task_version: str,
    task_info: dict[str, Any],
    command: str | None = None,
    device: str = "cpu",
    dtype: str = "float64",
) -> dict[str, Any]:
    """Versions, git state, platform, the device and dtype computed on, and data identity for a record."""
    import torch

    sha, dirty = git_state()
    return {
        "immunekit": immunekit.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "pandas": _version("pandas"),
        "device": device,
        "dtype": dtype,
        "command": command if command is not None else " ".join(["immunekit", *sys.argv[1:]]),
        "task_version": task_version,
        "task_info": task_info,
    }

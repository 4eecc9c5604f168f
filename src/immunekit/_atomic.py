"""The one atomic file writer: a crash never leaves a half-written file, and files get the user's umask.

Standard library only, so that every layer (``reports`` included, which reads JSON and imports no
other immunekit module) can use it.

A write goes to a temporary file in the destination folder (so the final ``os.replace`` is a
rename within one file system, atomic on POSIX and Windows), is flushed to disk with ``fsync``, is
given the permissions a plain ``open(path, "w")`` would give (0o666 minus the process umask:
``tempfile.mkstemp`` creates 0o600 files, which would hide results from group members or a web
server), and only then replaces ``path``. On any error the temporary file is removed and ``path``
keeps its old content.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The permissions of a new file under the current umask: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; publish it onto ``path`` only if the block succeeds.

    The block writes the file however it likes (``save_file(tensors, tmp)``, ``fig.savefig(tmp)``,
    ``tmp.write_text(...)``); afterwards it is fsynced, given :func:`default_mode` and renamed.

    Args:
        path: the final file; its folder is created if needed.
        suffix: suffix of the temporary file (writers that infer the format from it, such as
            matplotlib, need e.g. ``".png"``).

    Yields:
        The temporary file path.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # the data must be on disk before the rename publishes it
            os.fsync(fh.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path`` as a :class:`~pathlib.Path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a :class:`~pathlib.Path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def writable_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why results could not be written into folder ``path``, or ``None`` when they can.

    Checked before any work starts, so that a long computation never ends on a failed write. The
    folder need not exist: its nearest existing ancestor must then be a writable folder. Creates
    nothing.

    Example:
        >>> import os, tempfile
        >>> with tempfile.NamedTemporaryFile() as f:  # a folder cannot live inside a file
        ...     writable_dir_problem(os.path.join(f.name, "out")).endswith("is a file, not a folder")
        True

    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"no existing ancestor of {path}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} (on the way to {path}) is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is" if probe == path else f"(the nearest existing folder of {path}) is"
        return f"{probe} {what} not writable"
    return None


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "default_mode", "writable_dir_problem"]

"""The one reading of a ``--device`` option: ``auto`` or a torch device that exists on this machine.

torch is imported inside the functions, so the CLI can import :data:`DEVICES_HELP` to build its
parsers without loading torch.
"""

from __future__ import annotations

from typing import Any

from immunekit.errors import ConfigError

DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str) -> str:
    """``auto`` → ``"cuda"`` when CUDA is available, else ``"cpu"``; a named device must exist here.

    Args:
        device: ``"auto"`` or a torch device string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.

    Returns:
        The torch device string to use, e.g. ``"cpu"`` or ``"cuda:1"``.

    Raises:
        ConfigError: ``device`` is not a torch device, or not available on this machine.

    Example:
        >>> resolve_device("cpu")
        'cpu'

    """
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a torch device; choose {DEVICES_HELP}") from None
    if dev.type != "cpu" and not device_available(dev):
        raise ConfigError(
            f"--device {device!r} is not available on this machine (torch {torch.__version__}); "
            "use --device cpu or --device auto"
        )
    return str(dev)


def device_available(dev: Any) -> bool:
    """Whether torch can use the accelerator ``dev`` here (its backend is built and the index exists)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())
    return False

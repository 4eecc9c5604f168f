"""Safetensors checkpoints of :class:`ImmunizableModel`: weights plus what rebuilds the model.

A checkpoint is one safetensors file. Its tensors are the model's ``state_dict``; its header
metadata (string → string, as safetensors requires) holds

=====================  ==============================================================
key                    value
=====================  ==============================================================
``format``             ``"immunekit.checkpoint"`` (the marker checked on load)
``format_version``     ``"1"``; files from a newer immunekit are refused, not guessed at
``model``              registry key of the model class, e.g. ``"linear"``
``model_config``       JSON of the constructor keyword arguments
``torch_version``      ``torch.__version__`` of the writer
``immunekit_version``  ``immunekit.__version__`` of the writer
``user_metadata``      JSON of the caller's ``metadata`` mapping
=====================  ==============================================================

Loading never unpickles: the file is parsed by safetensors (a JSON header and raw tensor bytes),
the model is rebuilt from :data:`MODELS` with the recorded arguments, and the weights are
loaded with strict key, shape and dtype checks.

A model class joins with one line, either a ``checkpoint_config`` method returning its
constructor arguments or an explicit ``config`` function::

    @register_model("mlp")
    class MLP(ImmunizableModel):
        def checkpoint_config(self) -> dict[str, Any]:
            return {"sizes": self.sizes, "dtype": self.dtype}   # torch.dtype values are allowed
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from immunekit import __version__ as _immunekit_version
from immunekit._atomic import atomic_path
from immunekit.errors import ConfigError
from immunekit.models.base import ImmunizableModel, LinearModel
from immunekit.registry import Registry

FORMAT = "immunekit.checkpoint"
FORMAT_VERSION = 1

ConfigFn = Callable[[Any], Mapping[str, Any]]
M = TypeVar("M", bound=type[ImmunizableModel])

#: Model classes that can be checkpointed, by the key written into the file.
MODELS: Registry[type[ImmunizableModel]] = Registry("model")
# Reverse index class -> key, filled only by register_model (the key itself lives in MODELS).
_KEY_OF_CLASS: dict[type, str] = {}
_DTYPE_TAG = "__torch_dtype__"
_EXPECTED = "expected a safetensors checkpoint written by immunekit.models.save_checkpoint"


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What a checkpoint's header says, read without loading any tensor.

    Attributes:
        format_version: checkpoint format version of the writer.
        model: registry key of the model class.
        config: constructor keyword arguments as stored (dtypes as ``{"__torch_dtype__": name}``).
        torch_version: torch version of the writer.
        immunekit_version: immunekit version of the writer.
        metadata: the ``metadata`` mapping given to :func:`save_checkpoint` (tuples read back as
            lists).

    """

    format_version: int
    model: str
    config: dict[str, Any]
    torch_version: str
    immunekit_version: str
    metadata: dict[str, Any]


def register_model(name: str, *, config: ConfigFn | None = None) -> Callable[[M], M]:
    """Class decorator making a model class checkpointable under ``name``.

    Args:
        name: registry key written into checkpoints; never rename it once files exist.
        config: ``model -> constructor kwargs``; when omitted the class must define a
            ``checkpoint_config(self)`` method. Values must be JSON types or ``torch.dtype``.

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        ConfigError: the class gives no way to read its constructor arguments, or ``name`` is
            already registered.

    """

    def deco(cls: M) -> M:
        if config is None and not callable(getattr(cls, "checkpoint_config", None)):
            raise ConfigError(
                f"cannot register {cls.__name__} as model {name!r}: it has no checkpoint_config() "
                "method; define one returning the constructor arguments, or pass config=<function>"
            )
        MODELS.register(name, config=config)(cls)
        _KEY_OF_CLASS[cls] = name
        return cls

    return deco


def _linear_config(model: LinearModel) -> dict[str, Any]:
    return {
        "d_in": model.extractor.in_features,
        "d_hid": model.extractor.out_features,
        "d_out": model.head.out_features,
        "dtype": model.extractor.weight.dtype,
    }


register_model("linear", config=_linear_config)(LinearModel)
# Vision backbones register themselves on import; lazy entries let load_checkpoint find them first.
MODELS.register_lazy("digit_cnn", "immunekit.models.vision:DigitCNN")
MODELS.register_lazy("efficientnet_lite0", "immunekit.models.vision:EfficientNetLite0")
MODELS.register_lazy("hf_resnet", "immunekit.models.hf_vision:HFResNet")
MODELS.register_lazy("hf_vit", "immunekit.models.hf_vision:HFViT")


def save_checkpoint(
    model: ImmunizableModel, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` to ``path`` as an immunekit safetensors checkpoint, atomically.

    The file is first written to a temporary file in the same folder, flushed to disk, then
    moved over ``path`` with ``os.replace``: readers see the old file or the complete new one,
    and a failure midway leaves no partial file. Tensors that alias one another (tied weights)
    are stored as separate copies, since safetensors refuses shared memory; loading copies both
    into the one tied parameter.

    Args:
        model: an instance of a class registered with :func:`register_model` (exact class, not
            a subclass of one).
        path: destination file; missing parent folders are created.
        metadata: JSON-serialisable mapping with string keys (str, finite float, int, bool,
            None, lists/tuples and nested mappings), stored verbatim; e.g. seeds, defense name.

    Returns:
        The path written.

    Raises:
        ConfigError: the model class is not registered, its constructor arguments are not
            serialisable, or ``metadata`` holds a value that is not JSON.

    Example:
        >>> import tempfile, torch
        >>> from immunekit.models import linear_model
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     p = save_checkpoint(linear_model(3), f"{tmp}/m.safetensors", metadata={"seed": 0})
        ...     m = load_checkpoint(p)
        ...     read_checkpoint_info(p).metadata
        {'seed': 0}
        >>> bool(torch.equal(m.theta, torch.eye(3, dtype=torch.float64)))
        True

    """
    path = Path(path)
    key = _model_key(model)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ConfigError(
            f"metadata must be a mapping such as {{'seed': 0}}, got a {type(metadata).__name__}"
        )
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": key,
        "model_config": _dump_json(_encode_dtypes(_model_config(model, key)), f"{key} config"),
        "torch_version": torch.__version__,
        "immunekit_version": _immunekit_version,
        "user_metadata": _dump_json(dict(metadata or {}), "metadata"),
    }
    _atomic_save_file(_tensors_to_save(model), path, header)
    return path


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read and validate a checkpoint's header without loading tensors or building the model.

    Args:
        path: a file written by :func:`save_checkpoint`.

    Returns:
        The :class:`CheckpointInfo`.

    Raises:
        ConfigError: ``path`` is not a file, not a safetensors file, not an immunekit
            checkpoint, or from a newer format version.

    """
    path = Path(path)
    with _open(path) as f:
        return _parse_header(f.metadata(), path)


def checkpoint_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds besides its weights, as a plain dict (no tensor is loaded).

    Keys: ``model`` (registry key of the class), ``config`` (constructor arguments), ``metadata``
    (what the saver passed, e.g. task and task_config), ``format_version``, ``torch_version`` and
    ``immunekit_version``.

    Raises:
        ConfigError: ``path`` is not an immunekit checkpoint (see :func:`read_checkpoint_info`).

    """
    return dataclasses.asdict(read_checkpoint_info(path))


def load_checkpoint(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> ImmunizableModel:
    """Rebuild the model saved by :func:`save_checkpoint`, without unpickling anything.

    Steps: safetensors parses the file (a length-prefixed JSON header and raw tensor bytes, no
    code), the header is checked for the immunekit marker and a supported format version, the
    model class is looked up in :data:`MODELS` and constructed with the recorded arguments
    (global RNG state is restored afterwards, so loading does not perturb seeded code), and
    the tensors must match its ``state_dict`` exactly in keys, shapes and dtypes.

    Args:
        path: a file written by :func:`save_checkpoint`.
        device: where the returned model's parameters live.

    Returns:
        The model, of the registered class, in training mode like a freshly built one.

    Raises:
        ConfigError: ``path`` is not a file, not a safetensors file, not an immunekit
            checkpoint, from a newer format version, of an unknown model type, or its tensors
            do not match the model (missing/extra keys, shapes, dtypes).

    """
    path = Path(path)
    with _open(path) as f:
        info = _parse_header(f.metadata(), path)
        model = _build_model(info, path)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    _check_tensors(model.state_dict(), tensors, path)
    model.load_state_dict(tensors, strict=True)
    return model.to(device)


# --- saving -------------------------------------------------------------------------------------


def _model_key(model: ImmunizableModel) -> str:
    # Exact class: a subclass may take different constructor arguments than its registered parent.
    key = _KEY_OF_CLASS.get(type(model))
    if key is None:
        raise ConfigError(
            f"cannot checkpoint a {type(model).__name__}: its class is not registered "
            f"(known models: {MODELS.names()}); decorate it with @register_model('<name>')"
        )
    return key


def _model_config(model: ImmunizableModel, key: str) -> dict[str, Any]:
    fn = MODELS.meta(key).get("config") or type(model).checkpoint_config  # type: ignore[attr-defined]
    return dict(fn(model))


def _tensors_to_save(model: ImmunizableModel) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        # Tied weights appear under several names with one storage; safetensors refuses that.
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def _atomic_save_file(tensors: dict[str, Tensor], path: Path, header: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def _check_json(value: Any, where: str) -> Any:
    """Return ``value`` if it is plain JSON (tuples allowed), else raise naming where it fails."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value} is not valid JSON; store it as None or a string")
        return value
    if isinstance(value, list | tuple):
        return [_check_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"{where} has key {k!r} of type {type(k).__name__}; JSON keys must be str")
        return {k: _check_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise ConfigError(
        f"{where} is a {type(value).__name__} ({value!r:.60}), which is not JSON-serialisable; "
        "convert it (e.g. float(x), int(x), list(x), str(x)) before saving"
    )


def _encode_dtypes(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: {_DTYPE_TAG: str(v).removeprefix("torch.")} if isinstance(v, torch.dtype) else v
        for k, v in config.items()
    }


def _dump_json(value: Any, what: str) -> str:
    return json.dumps(_check_json(value, what), sort_keys=True, allow_nan=False)


# --- loading ------------------------------------------------------------------------------------


def _open(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(
            f"{path} is not a file ({'missing' if not path.exists() else 'a folder'}); {_EXPECTED}"
        )
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        # Never fall back to torch.load: a pickle can run arbitrary code when read.
        raise ConfigError(
            f"{path} is not a safetensors file ({err}); {_EXPECTED}. Pickled files (torch.save "
            "output, .pt/.bin) are never loaded"
        ) from err


def _parse_header(meta: Mapping[str, str] | None, path: Path) -> CheckpointInfo:
    meta = meta or {}
    if meta.get("format") != FORMAT:
        found = f"format {meta['format']!r}" if "format" in meta else "no format marker"
        raise ConfigError(
            f"{path} is a safetensors file but not an immunekit checkpoint ({found}); {_EXPECTED}. "
            "For weights from another tool, build the model and load them explicitly"
        )
    version = _parse_version(meta.get("format_version"), path)
    try:
        return CheckpointInfo(
            format_version=version,
            model=meta["model"],
            config=json.loads(meta["model_config"]),
            torch_version=meta["torch_version"],
            immunekit_version=meta["immunekit_version"],
            metadata=json.loads(meta["user_metadata"]),
        )
    except (KeyError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{path}: damaged immunekit checkpoint header ({err!r}); re-save the model"
        ) from err


def _parse_version(raw: str | None, path: Path) -> int:
    if raw is None or not raw.isdecimal() or int(raw) < 1:
        raise ConfigError(f"{path}: invalid checkpoint format_version {raw!r}; re-save the model")
    if int(raw) > FORMAT_VERSION:
        raise ConfigError(
            f"{path} has checkpoint format version {raw}, but this immunekit ({_immunekit_version}) "
            f"reads versions <= {FORMAT_VERSION}; upgrade immunekit to load it"
        )
    return int(raw)


def _build_model(info: CheckpointInfo, path: Path) -> ImmunizableModel:
    try:
        cls = MODELS.get(info.model)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err} (written by immunekit {info.immunekit_version})") from None
    kwargs = {k: _decode_dtype(v, path) for k, v in info.config.items()}
    # Construction runs the model's random initialisation; keep the global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"{path}: cannot build model {info.model!r} from {info.config}: {err}; "
                "the file was written by an incompatible immunekit version or edited"
            ) from err


def _decode_dtype(value: Any, path: Path) -> Any:
    if not (isinstance(value, dict) and set(value) == {_DTYPE_TAG}):
        return value
    dtype = getattr(torch, str(value[_DTYPE_TAG]), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{path}: unknown torch dtype {value[_DTYPE_TAG]!r} in the model config")
    return dtype


def _check_tensors(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], path: Path) -> None:
    problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
    for k in sorted(expected.keys() & found.keys()):
        e, f = expected[k], found[k]
        if e.shape != f.shape or e.dtype != f.dtype:
            problems.append(
                f"{k}: file has {tuple(f.shape)} {f.dtype}, model needs {tuple(e.shape)} {e.dtype}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(
            f"{path}: tensors do not match the recorded model ({shown}); the file was modified or "
            "written by an incompatible version"
        )

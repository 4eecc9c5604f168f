"""Token splits: chat conversations as token ids with an answer-only label mask.

A :class:`TokenSplit` is the :class:`~immunekit.data.task.Split` of a language-model task. Each row
is one single-turn conversation (system ``s``, user ``u``, assistant ``a``) rendered with the
tokenizer's own chat template. The supervised fine-tuning objective of Qi et al. (arXiv 2310.03693)

    min_θ  Σ_i −log p(a_i | [s_i, u_i]; θ)

puts the loss on the answer tokens only, so the prompt positions carry the label
:data:`IGNORE_INDEX`.

Row layout (what :meth:`TokenSplit.rows` returns)::

    x  (B, T) int64   token ids, right-padded with PAD_ID = -1 (never a real id)
    y  (B, T) int64   labels: the token id on answer positions, IGNORE_INDEX (-100) elsewhere

with ``T`` the longest row of the batch. The attention mask is ``x != PAD_ID``
(:func:`lm_inputs`), so one tensor carries both and the ``Split`` contract stays ``(x, y)``. Rows
are identified for disjointness by the sha256 of their *normalised user text*
(:func:`immunekit.data.text_assets.text_hash`), so an evaluation prompt that appears in training
data is refused whatever its system prompt or answer.

Prompt ids (system + user + the assistant header, no answer) are kept per row for generation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from immunekit.data.task import iter_batches
from immunekit.data.text_assets import text_hash
from immunekit.errors import DataError

logger = logging.getLogger(__name__)

PAD_ID = -1
"""Padding value of :class:`TokenSplit` inputs (replaced by a real id and masked before a forward pass)."""
IGNORE_INDEX = -100
"""Label of positions without loss (prompt and padding), as in ``torch.nn.functional.cross_entropy``."""


@dataclass(frozen=True)
class Chat:
    """One single-turn conversation.

    Attributes:
        user: the user's message.
        assistant: the answer to train on; ``None`` for evaluation prompts (generation only).
        system: the system prompt, or ``None`` for none (the template may insert its default).
        id: a stable row id (e.g. ``"advbench:17"``).
        category: optional category (e.g. a StrongREJECT category), for per-category results.

    """

    user: str
    assistant: str | None = None
    system: str | None = None
    id: str = ""
    category: str | None = None

    def messages(self, *, with_answer: bool) -> list[dict[str, str]]:
        """The chat-template messages, with or without the assistant turn."""
        out = [] if self.system is None else [{"role": "system", "content": self.system}]
        out.append({"role": "user", "content": self.user})
        if with_answer and self.assistant is not None:
            out.append({"role": "assistant", "content": self.assistant})
        return out


def _encode(tokenizer: Any, chat: Chat, max_tokens: int) -> tuple[list[int], list[int], list[int], bool]:
    """Token ids, labels and prompt ids of one conversation under the tokenizer's chat template.

    The answer's labels run from the first answer token through the end-of-turn token (so the
    model learns to stop); anything the template appends after it (a newline) is dropped. Rows
    longer than ``max_tokens`` are truncated at the end, i.e. inside the answer.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        chat: the conversation.
        max_tokens: most tokens kept.

    Returns:
        ``(ids, labels, prompt_ids)``; ``labels`` has :data:`IGNORE_INDEX` on prompt positions. Without
        an answer, ``ids == prompt_ids`` and every label is ignored.

    Raises:
        DataError: the template does not reproduce the prompt as a prefix of the full conversation,
            or the prompt alone is longer than ``max_tokens``.

    """
    prompt = _ids(tokenizer.apply_chat_template(chat.messages(with_answer=False), add_generation_prompt=True))
    if len(prompt) > max_tokens:
        raise DataError(
            f"the prompt of row {chat.id!r} has {len(prompt)} tokens, more than max_tokens={max_tokens}; "
            "raise max_tokens or shorten the prompt"
        )
    if chat.assistant is None:
        return prompt, [IGNORE_INDEX] * len(prompt), prompt, False
    full = _ids(tokenizer.apply_chat_template(chat.messages(with_answer=True)))
    if full[: len(prompt)] != prompt:
        raise DataError(
            f"the chat template of {type(tokenizer).__name__} does not render row {chat.id!r}'s prompt as a "
            "prefix of the conversation; answer-only labels need a prefix-stable template"
        )
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    end = len(full)
    if eos is not None and eos in full[len(prompt) :]:
        end = len(full) - full[::-1].index(eos)
    full = full[: min(end, max_tokens)]
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    return full, labels, prompt, end > max_tokens


def encode_chat(tokenizer: Any, chat: Chat, max_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and prompt ids of one conversation (see :func:`_encode`, without its flag)."""
    ids, labels, prompt, _ = _encode(tokenizer, chat, max_tokens)
    return ids, labels, prompt


def _ids(rendered: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding for tokenize=True; 4.x returns a list
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    return [int(t) for t in rendered]


class TokenSplit:
    """Tokenized conversations as a :class:`~immunekit.data.task.Split` (see the module docstring).

    Args:
        chats: the conversations (all with answers for a training split; answers optional for
            an evaluation split, whose prompts are generated from).
        tokenizer: tokenizer with a chat template (the model's own).
        max_tokens: most tokens per row; :attr:`item_shape` is ``(max_tokens,)``, the same for
            every split of a task built with one setting.
        name: label used in messages and logs.

    Raises:
        DataError: no conversations, duplicate ids, a prompt longer than ``max_tokens``.

    Example:
        >>> # TokenSplit([Chat("hi", "hello", id="0")], tokenizer, max_tokens=64)

    """

    def __init__(
        self, chats: Sequence[Chat], tokenizer: Any, max_tokens: int, *, name: str = "split"
    ) -> None:
        if not chats:
            raise DataError(f"token split {name!r} has no conversations; give at least one")
        if max_tokens < 8:
            raise DataError(f"max_tokens must be >= 8, got {max_tokens}")
        self.name = name
        self.max_tokens = int(max_tokens)
        self.chats: tuple[Chat, ...] = tuple(chats)
        ids = tuple(c.id or f"{name}:{i}" for i, c in enumerate(self.chats))
        if len(set(ids)) != len(ids):
            raise DataError(f"token split {name!r} has duplicate row ids; give every Chat a distinct id")
        self._ids = ids
        self.chats = tuple(replace(c, id=i) for c, i in zip(self.chats, ids, strict=True))
        encoded = [_encode(tokenizer, c, self.max_tokens) for c in self.chats]
        self._truncated = sum(1 for e in encoded if e[3])
        self._tokens = [torch.tensor(e[0], dtype=torch.long) for e in encoded]
        self._labels = [torch.tensor(e[1], dtype=torch.long) for e in encoded]
        self.prompt_ids: tuple[Tensor, ...] = tuple(torch.tensor(e[2], dtype=torch.long) for e in encoded)
        self._y = torch.zeros(len(self.chats), dtype=torch.long)
        if self._truncated:
            logger.info(
                "token split %s: %d of %d rows truncated at %d tokens",
                name,
                self._truncated,
                len(self),
                max_tokens,
            )

    # --- the Split contract -------------------------------------------------------------------

    @property
    def y(self) -> Tensor:
        """Zeros ``(N,)``: a language-model row has no class target (its labels come from :meth:`rows`)."""
        return self._y

    @property
    def ids(self) -> tuple[str, ...]:
        """Row ids."""
        return self._ids

    @property
    def item_shape(self) -> tuple[int, ...]:
        """``(max_tokens,)``: the longest row any batch can hold."""
        return (self.max_tokens,)

    def __len__(self) -> int:
        return len(self.chats)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Right-padded ids ``(B, T)`` (pad :data:`PAD_ID`) and labels ``(B, T)`` of the rows ``idx``."""
        picked = [int(i) for i in idx.flatten().tolist()]
        width = max((len(self._tokens[i]) for i in picked), default=1)
        x = torch.full((len(picked), width), PAD_ID, dtype=torch.long)
        y = torch.full((len(picked), width), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(picked):
            n = len(self._tokens[i])
            x[r, :n] = self._tokens[i]
            y[r, :n] = self._labels[i]
        return x, y

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive mini-batches (:func:`~immunekit.data.task.iter_batches`)."""
        return iter_batches(self, batch_size, generator=generator, drop_last=drop_last)

    def row_hashes(self) -> set[str]:
        """sha256 of each row's normalised user text (:func:`~immunekit.data.text_assets.text_hash`)."""
        return {text_hash(c.user) for c in self.chats}

    # --- token accounting ---------------------------------------------------------------------

    def token_counts(self, idx: Tensor | None = None) -> tuple[int, int]:
        """Exact ``(tokens, answer_tokens)`` of the rows ``idx`` (all rows when ``None``).

        ``tokens`` counts every real (non-padding) token a forward pass reads, ``answer_tokens``
        the positions that carry loss.
        """
        picked = range(len(self)) if idx is None else [int(i) for i in idx.flatten().tolist()]
        tokens = sum(len(self._tokens[i]) for i in picked)
        answer = sum(int((self._labels[i] != IGNORE_INDEX).sum()) for i in picked)
        return tokens, answer

    @property
    def categories(self) -> tuple[str | None, ...]:
        """Each row's category (``None`` where not given)."""
        return tuple(c.category for c in self.chats)

    def describe(self) -> dict[str, Any]:
        """Sizes and token statistics (no text), JSON-ready."""
        lengths = [len(t) for t in self._tokens]
        tokens, answer = self.token_counts()
        return {
            "rows": len(self),
            "tokens": tokens,
            "answer_tokens": answer,
            "max_tokens": self.max_tokens,
            "mean_length": round(sum(lengths) / len(lengths), 2),
            "longest": max(lengths),
            "truncated": self._truncated,
        }


def lm_inputs(x: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of a :class:`TokenSplit` batch ``x`` (padding → ``pad_id``, mask 0).

    Example:
        >>> lm_inputs(torch.tensor([[5, 6, -1]]))
        (tensor([[5, 6, 0]]), tensor([[1, 1, 0]]))

    """
    mask = (x != PAD_ID).long()
    return x.masked_fill(mask == 0, pad_id), mask

"""Tiny language-model fixtures shared by the LM tests: a random Llama, placeholder conversations, a task.

No dataset text: every conversation is a placeholder built from templates, tokenized by the toy
byte-level chat tokenizer. Importable from any test folder (``tests/`` is on the path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from immunekit.data.task import Task
from immunekit.data.token_split import Chat, TokenSplit
from immunekit.models.causal_lm import CausalLM, toy_chat_tokenizer

TOK = toy_chat_tokenizer()


def tiny_lm(seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: int) -> CausalLM:
    """A random tiny Llama over the toy tokenizer's 258 ids (one layer of width 16 unless ``sizes``)."""
    shape = {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 32, **sizes}
    m = CausalLM.tiny(seed, vocab_size=258, **shape)
    m.tokenizer = TOK
    return m.to(dtype)


def toy_split(
    name: str,
    n: int,
    answer: str | Callable[[str, int], str] = "placeholder reply number {i}",
    *,
    answers: bool = True,
    user: str = "question {name} {i}",
    max_tokens: int = 96,
) -> TokenSplit:
    """``n`` placeholder conversations: ``user`` and ``answer`` templates (or ``answer(name, i)``) per row."""

    def reply(i: int) -> str:
        return answer(name, i) if callable(answer) else answer.format(name=name, i=i)

    chats = [
        Chat(user.format(name=name, i=i), reply(i) if answers else None, id=f"{name}{i}") for i in range(n)
    ]
    return TokenSplit(chats, TOK, max_tokens, name=name)


def toy_task(
    harmful: int = 6,
    *,
    primary: int = 6,
    attack: int = 4,
    eval_primary: int = 2,
    eval_harmful: int = 2,
    val_harmful: int = 0,
    answer: str | Callable[[str, int], str] = "placeholder reply number {i}",
    benign_answer: str | Callable[[str, int], str] | None = None,
    user: str = "question {name} {i}",
    max_tokens: int = 96,
) -> Task:
    """An ``lm`` task of placeholder splits; ``benign_answer`` templates 'primary' and 'eval_primary'."""

    def split(
        name: str, n: int, template: str | Callable[[str, int], str] = answer, answers: bool = True
    ) -> TokenSplit:
        return toy_split(name, n, template, answers=answers, user=user, max_tokens=max_tokens)

    benign = answer if benign_answer is None else benign_answer
    return Task(
        name="toy_lm",
        version="0",
        loss="lm",
        primary=split("p", primary, benign),
        harmful=split("h", harmful),
        attack=split("a", attack),
        eval_primary=split("ep", eval_primary, benign),
        eval_harmful=split("eh", eval_harmful, answers=False),
        val_harmful=split("vh", val_harmful, answers=False) if val_harmful else None,
    )

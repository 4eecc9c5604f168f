"""Token splits: answer-only labels, right padding, token counts, truncation, hashes, Task use.

Expected token ids are written out from first principles: the toy tokenizer is byte-level (ids
0-255 are UTF-8 bytes), 256 is ``<|im_end|>`` and 257 ``<|im_start|>``, under a ChatML template.
Only synthetic placeholder strings are used.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
pytest.importorskip("transformers")

from immunekit.data.task import Split, Task
from immunekit.data.text_assets import text_hash
from immunekit.data.token_split import (
    IGNORE_INDEX,
    PAD_ID,
    Chat,
    TokenSplit,
    encode_chat,
    lm_inputs,
)
from immunekit.errors import DataError
from immunekit.models.causal_lm import toy_chat_tokenizer

END, START, NL = 256, 257, 10


@pytest.fixture(scope="module")
def tok():
    return toy_chat_tokenizer()


def _turn(role: str, content: str) -> list[int]:
    return [START, *f"{role}\n{content}".encode(), END, NL]


def _prompt(chat: Chat) -> list[int]:
    head = [] if chat.system is None else _turn("system", chat.system)
    return [*head, *_turn("user", chat.user), START, *b"assistant\n"]


def _full(chat: Chat) -> list[int]:
    """Prompt, answer bytes and the end-of-turn token (the template's trailing newline dropped)."""
    assert chat.assistant is not None
    return [*_prompt(chat), *chat.assistant.encode(), END]


CHATS = (
    Chat("placeholder question 1", "placeholder answer", id="r0"),
    Chat("placeholder question 22", "placeholder answer, a longer one", system="placeholder system", id="r1"),
    Chat("placeholder question 333", "ok", id="r2"),
)


def test_encode_chat_labels_only_the_answer_through_end_of_turn(tok) -> None:
    for chat in CHATS:
        ids, labels, prompt = encode_chat(tok, chat, max_tokens=256)
        want_prompt, want = _prompt(chat), _full(chat)
        assert prompt == want_prompt
        assert ids == want
        assert ids[: len(prompt)] == prompt
        n = len(prompt)
        assert labels[:n] == [IGNORE_INDEX] * n
        assert labels[n:] == ids[n:]
        assert labels[-1] == END and ids[-1] == END
        assert len(labels) == len(ids)
        # the template itself ends the answer turn with "<|im_end|>\n": the newline is dropped
        rendered = tok.apply_chat_template(chat.messages(with_answer=True))
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert list(rendered) == [*ids, NL]


def test_answer_with_its_own_newline_keeps_it(tok) -> None:
    chat = Chat("placeholder question", "placeholder\nanswer\n", id="nl")
    ids, labels, _ = encode_chat(tok, chat, max_tokens=256)
    assert ids == _full(chat)
    assert ids[-2:] == [NL, END]
    assert sum(lab != IGNORE_INDEX for lab in labels) == len(b"placeholder\nanswer\n") + 1


def test_prompt_only_chat_has_every_label_ignored(tok) -> None:
    chat = Chat("placeholder question 1", None, system="placeholder system", id="p")
    ids, labels, prompt = encode_chat(tok, chat, max_tokens=256)
    assert ids == prompt == _prompt(chat)
    assert labels == [IGNORE_INDEX] * len(ids)


def test_rows_right_pad_to_the_longest_row_of_the_batch(tok) -> None:
    split = TokenSplit(CHATS, tok, max_tokens=128, name="toy")
    full = [_full(c) for c in CHATS]
    idx = torch.tensor([2, 0])  # a short and a longer row, out of file order
    x, y = split.rows(idx)
    width = max(len(full[2]), len(full[0]))
    assert x.shape == y.shape == (2, width)
    assert x.dtype == y.dtype == torch.long
    for r, i in enumerate(idx.tolist()):
        n = len(full[i])
        assert x[r, :n].tolist() == full[i]
        assert (x[r, n:] == PAD_ID).all()
        assert (y[r, n:] == IGNORE_INDEX).all()
        p = len(_prompt(CHATS[i]))
        assert (y[r, :p] == IGNORE_INDEX).all()
        assert y[r, p:n].tolist() == full[i][p:]
    # a batch of one row is not padded at all
    x1, _ = split.rows(torch.tensor([1]))
    assert x1.shape == (1, len(full[1])) and not (x1 == PAD_ID).any()
    # prompt ids per row, for generation
    assert [p.tolist() for p in split.prompt_ids] == [_prompt(c) for c in CHATS]


def test_lm_inputs_replace_padding_and_mask_it(tok) -> None:
    ids, mask = lm_inputs(torch.tensor([[5, 6, -1], [7, -1, -1]]), pad_id=256)
    assert ids.tolist() == [[5, 6, 256], [7, 256, 256]]
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    split = TokenSplit(CHATS, tok, max_tokens=128)
    x, _ = split.rows(torch.arange(3))
    ids, mask = lm_inputs(x)
    assert mask.sum(dim=1).tolist() == [len(_full(c)) for c in CHATS]
    assert (ids[mask == 0] == 0).all()
    assert torch.equal(ids[mask == 1], x[x != PAD_ID])


def test_token_counts_are_exact(tok) -> None:
    split = TokenSplit(CHATS, tok, max_tokens=128)
    lengths = [len(_full(c)) for c in CHATS]
    answers = [len(c.assistant.encode()) + 1 for c in CHATS]  # answer bytes + end-of-turn
    assert split.token_counts() == (sum(lengths), sum(answers))
    assert split.token_counts(torch.tensor([2, 0])) == (lengths[2] + lengths[0], answers[2] + answers[0])
    # a repeated row counts twice (a batch may draw it twice)
    assert split.token_counts(torch.tensor([1, 1])) == (2 * lengths[1], 2 * answers[1])
    x, y = split.rows(torch.arange(3))
    assert int((x != PAD_ID).sum()) == sum(lengths)
    assert int((y != IGNORE_INDEX).sum()) == sum(answers)
    info = split.describe()
    assert info["rows"] == 3 and info["tokens"] == sum(lengths) and info["answer_tokens"] == sum(answers)
    assert info["longest"] == max(lengths) and info["truncated"] == 0
    assert info["mean_length"] == round(sum(lengths) / 3, 2)
    assert "placeholder" not in json.dumps(info)


def test_truncation_keeps_the_prompt_and_cuts_the_answer(tok) -> None:
    chat = Chat("placeholder question", "placeholder answer " * 4, id="long")
    prompt, full = _prompt(chat), _full(chat)
    cap = len(prompt) + 7
    ids, labels, got_prompt = encode_chat(tok, chat, max_tokens=cap)
    assert got_prompt == prompt
    assert ids == full[:cap]
    assert ids[-1] != END  # the end-of-turn token is cut with the rest of the answer
    assert labels == [IGNORE_INDEX] * len(prompt) + full[len(prompt) : cap]
    short = Chat("placeholder q", "ok", id="short")
    assert len(_full(short)) < cap
    split = TokenSplit([chat, short], tok, max_tokens=cap)
    assert split.item_shape == (cap,)
    assert split.token_counts(torch.tensor([0])) == (cap, 7)
    assert split.token_counts(torch.tensor([1])) == (len(_full(short)), 3)
    assert split.describe()["truncated"] == 1
    # a prompt of exactly max_tokens leaves no answer token
    ids, labels, _ = encode_chat(tok, chat, max_tokens=len(prompt))
    assert ids == prompt and set(labels) == {IGNORE_INDEX}


def test_a_row_that_fits_exactly_is_not_truncated(tok) -> None:
    chat = Chat("placeholder question", "placeholder answer", id="fits")
    cap = len(_full(chat))
    split = TokenSplit([chat], tok, max_tokens=cap)
    x, _ = split.rows(torch.tensor([0]))
    assert x[0].tolist() == _full(chat)  # nothing was cut
    assert split.describe()["truncated"] == 0


def test_a_prompt_longer_than_max_tokens_names_its_row(tok) -> None:
    chat = Chat("placeholder question " * 3, "placeholder answer", id="too-long:7")
    cap = len(_prompt(chat)) - 1
    with pytest.raises(DataError, match=r"'too-long:7'.*max_tokens=" + str(cap)):
        encode_chat(tok, chat, max_tokens=cap)
    with pytest.raises(DataError, match="too-long:7"):
        TokenSplit([CHATS[0], chat], tok, max_tokens=cap)


def test_a_prompt_too_long_names_the_split_assigned_id(tok) -> None:
    chat = Chat("placeholder question " * 3, "placeholder answer")
    with pytest.raises(DataError, match="train:1"):
        TokenSplit([CHATS[0], chat], tok, max_tokens=len(_prompt(chat)) - 1, name="train")


def test_bad_splits_are_refused(tok) -> None:
    with pytest.raises(DataError, match="no conversations"):
        TokenSplit([], tok, max_tokens=64, name="empty")
    with pytest.raises(DataError, match="duplicate"):
        TokenSplit([Chat("placeholder a", "x", id="same"), Chat("placeholder b", "y", id="same")], tok, 64)
    # a generated id ("<name>:<i>") colliding with a given one is a duplicate too
    with pytest.raises(DataError, match="duplicate"):
        TokenSplit([Chat("placeholder a", "x", id="s:1"), Chat("placeholder b", "y")], tok, 64, name="s")
    with pytest.raises(DataError, match="max_tokens"):
        TokenSplit([CHATS[0]], tok, max_tokens=7)


def test_ids_default_to_name_and_position(tok) -> None:
    split = TokenSplit(
        [Chat("placeholder a", "x"), Chat("placeholder b", "y", id="given")], tok, 64, name="s"
    )
    assert split.ids == ("s:0", "given")
    assert len(split) == 2 and split.y.tolist() == [0, 0]


def test_row_hashes_ignore_case_whitespace_punctuation_and_system(tok) -> None:
    sys_prompt = "placeholder system"
    a = TokenSplit([Chat("Placeholder   Question 1?!", "answer a", system=sys_prompt, id="a")], tok, 128)
    b = TokenSplit([Chat("placeholder question 1", "a different answer", id="b")], tok, 128)
    c = TokenSplit([Chat("placeholder question 2", "answer a", system=sys_prompt, id="c")], tok, 128)
    assert a.row_hashes() == b.row_hashes() == {text_hash("placeholder question 1")}
    assert not a.row_hashes() & c.row_hashes()


def _split(users: list[str], tok, name: str, max_tokens: int = 96, answers: bool = True) -> TokenSplit:
    chats = [
        Chat(u, "placeholder answer" if answers else None, id=f"{name}:{i}") for i, u in enumerate(users)
    ]
    return TokenSplit(chats, tok, max_tokens, name=name)


def test_token_split_is_a_split_of_an_lm_task(tok) -> None:
    splits = {
        "primary": _split(["placeholder benign 1", "placeholder benign 2"], tok, "primary"),
        "harmful": _split(["placeholder question 1"], tok, "harmful"),
        "attack": _split(["placeholder question 2", "placeholder question 3"], tok, "attack"),
        "eval_primary": _split(["placeholder benign 3"], tok, "eval_primary"),
        "eval_harmful": _split(["placeholder question 4"], tok, "eval_harmful", answers=False),
    }
    for s in splits.values():
        assert isinstance(s, Split)
    task = Task(name="toy_lm", version="0", loss="lm", **splits)
    assert task.input_dim == 96 and task.classes == 0
    batches = list(task.attack.batches(1))
    assert [tuple(x.shape) for x, _ in batches] == [
        (1, len(_full(c)))
        for c in task.attack.chats  # type: ignore[attr-defined]
    ]
    g = torch.Generator().manual_seed(0)
    assert sum(len(x) for x, _ in task.primary.batches(1, generator=g)) == 2

    # an evaluation prompt equal to an attack prompt after normalisation is refused, whatever its
    # system prompt or answer
    leaked = TokenSplit(
        [Chat("PLACEHOLDER  question 3.", None, system="placeholder system", id="leak")], tok, 96
    )
    with pytest.raises(DataError, match="eval_harmful"):
        Task(name="toy_lm", version="0", loss="lm", **{**splits, "eval_harmful": leaked})
    # every split must share max_tokens (the item shape)
    with pytest.raises(DataError, match="item_shape"):
        Task(
            name="toy_lm",
            version="0",
            loss="lm",
            **{**splits, "eval_primary": _split(["placeholder benign 3"], tok, "ep", max_tokens=64)},
        )

"""Scoring a causal LM: answer loss and perplexity against a hand-written sum, batched greedy
generation against a one-row-at-a-time reference, and the judged evaluation (no text leaks).

All models are random tiny Llamas over the byte-level toy tokenizer; strings are placeholders.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
pytest.importorskip("transformers")

from immunekit.attacks import lm_eval
from immunekit.attacks.lm_eval import (
    Generations,
    answer_loss,
    answer_perplexity,
    generate,
    judge_split,
    real_tokens,
)
from immunekit.data.token_split import IGNORE_INDEX, PAD_ID, Chat, TokenSplit
from immunekit.errors import ConfigError
from immunekit.metrics.judges import make_judge
from immunekit.models.causal_lm import CausalLM, toy_chat_tokenizer

V = 258
EOS = 256


@pytest.fixture(scope="module")
def tok():
    return toy_chat_tokenizer()


@pytest.fixture(scope="module")
def model64(tok) -> CausalLM:
    m = CausalLM.tiny(3, vocab_size=V).double()
    m.tokenizer = tok
    return m


@pytest.fixture(scope="module")
def split(tok) -> TokenSplit:
    chats = [
        Chat("placeholder question 1", "placeholder answer", id="a"),
        Chat("placeholder q 2", "placeholder answer, longer " * 2, system="placeholder system", id="b"),
        Chat("placeholder question number 3", "ok", id="c"),
        Chat("placeholder 4", "placeholder answer four", id="d"),
    ]
    return TokenSplit(chats, tok, max_tokens=128, name="toy")


def _hand_loss(model: CausalLM, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Σ over rows r and positions t with an answer label at t+1 of −log softmax(logits_t)[y_{t+1}]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(x.shape[0]):
            n = int((x[r] != PAD_ID).sum())
            ids = x[r, :n][None]
            logits = model(ids, torch.ones_like(ids))[0].double()
            for t in range(n - 1):
                target = int(y[r, t + 1])
                if target == IGNORE_INDEX:
                    continue
                logp = logits[t] - torch.logsumexp(logits[t], dim=0)
                total -= float(logp[target])
                count += 1
    return total, count


def test_answer_loss_is_the_summed_answer_cross_entropy(model64: CausalLM, split: TokenSplit) -> None:
    x, y = split.rows(torch.arange(len(split)))
    with torch.no_grad():
        loss, count = answer_loss(model64, x, y)
    want, want_count = _hand_loss(model64, x, y)
    assert count == want_count == int((y != IGNORE_INDEX).sum()) == split.token_counts()[1]
    assert float(loss) == pytest.approx(want, rel=1e-10)
    # the prompt is not in the loss: the summed CE over *every* next token is larger
    with torch.no_grad():
        all_positions, _ = answer_loss(model64, x, torch.where(x == PAD_ID, IGNORE_INDEX, x))
    assert float(all_positions) > float(loss) + 1.0


def test_answer_loss_does_not_depend_on_padding(model64: CausalLM, split: TokenSplit) -> None:
    x, y = split.rows(torch.arange(len(split)))
    assert (x == PAD_ID).any()  # rows of different lengths: the batch is padded
    alone = []
    with torch.no_grad():
        for i in range(len(split)):
            xi, yi = split.rows(torch.tensor([i]))
            li, ni = answer_loss(model64, xi, yi)
            # the same row with the batch's padding after it
            lp, np_ = answer_loss(model64, x[i : i + 1], y[i : i + 1])
            assert ni == np_
            assert float(lp) == pytest.approx(float(li), rel=1e-10)
            alone.append(float(li))
        batch, _ = answer_loss(model64, x, y)
    assert float(batch) == pytest.approx(sum(alone), rel=1e-10)


def test_answer_loss_keeps_float64(model64: CausalLM, split: TokenSplit) -> None:
    x, y = split.rows(torch.arange(len(split)))
    with torch.no_grad():
        loss, _ = answer_loss(model64, x, y)
        alone = sum(float(answer_loss(model64, *split.rows(torch.tensor([i])))[0]) for i in range(len(split)))
    want, _ = _hand_loss(model64, x, y)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(loss) == pytest.approx(alone, rel=1e-10)


def test_answer_perplexity_is_exp_of_the_token_mean(model64: CausalLM, split: TokenSplit) -> None:
    model64.train()
    ppl = answer_perplexity(model64, split, batch_size=3)
    assert model64.training  # mode restored
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in (torch.tensor([0, 1, 2]), torch.tensor([3])):
            loss, n = answer_loss(model64, *split.rows(idx))
            total, count = total + float(loss), count + n
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-12)
    want, want_count = _hand_loss(model64, *split.rows(torch.arange(len(split))))
    assert ppl == pytest.approx(math.exp(want / want_count), rel=1e-10)
    # batch size only changes the grouping
    assert answer_perplexity(model64, split, batch_size=1) == pytest.approx(ppl, rel=1e-10)


def test_answer_perplexity_needs_answers(model64: CausalLM, tok) -> None:
    prompts = TokenSplit([Chat("placeholder question", None, id="p")], tok, 64, name="prompts")
    with pytest.raises(ConfigError, match="no answer tokens"):
        answer_perplexity(model64, prompts)


def test_real_tokens_counts_non_padding() -> None:
    assert real_tokens(torch.tensor([[1, 2, PAD_ID], [3, PAD_ID, PAD_ID]])) == 3


# --- generation ------------------------------------------------------------------------------


def _gen_model(tok) -> CausalLM:
    """A float64 tiny model whose greedy outputs differ across prompts and sometimes hit eos.

    Larger weights make the random model context-sensitive; the eos row of the head is a scaled
    copy of one byte's row, so eos wins wherever that byte would with a positive logit.
    """
    m = CausalLM.tiny(0, vocab_size=V).double()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        m.head.weight[EOS] = 1.2 * m.head.weight[230]
    m.tokenizer = tok
    return m


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g) for n in (3, 9, 5, 12, 7)]


def _greedy(model: CausalLM, prompt: torch.Tensor, max_new: int, eos: set[int]) -> list[int]:
    """One row, no cache, full forward per token: argmax until an eos id (kept) or max_new tokens."""
    ids = prompt.clone()
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(ids[None])[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt])])
            if nxt in eos:
                break
    return new


def test_batched_generation_equals_one_row_at_a_time(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    model, prompts, max_new = _gen_model(tok), _prompts(), 12
    eos = {EOS, int(model.hf_config.eos_token_id)}
    ref = [_greedy(model, p, max_new, eos) for p in prompts]
    # the test is only meaningful if completions differ and some (not all) stop at eos
    assert len({tuple(r) for r in ref}) == len(prompts)
    cut = [len(r) < max_new for r in ref]
    assert any(cut) and not all(cut)
    assert all(r[-1] in eos for r, c in zip(ref, cut, strict=True) if c)

    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = model.generate

    def spy(ids: torch.Tensor, mask: torch.Tensor, **kwargs: object) -> torch.Tensor:
        out = original(ids, mask, **kwargs)
        calls.append((ids, mask, out))
        return out

    monkeypatch.setattr(model, "generate", spy)
    model.train()
    gen = generate(model, prompts, max_new_tokens=max_new, batch_size=3)
    assert model.training  # mode restored

    # in input order: counts and decoded texts of the reference
    assert gen.new_tokens == [len(r) for r in ref]
    assert gen.texts == [tok.decode(r, skip_special_tokens=True) for r in ref]
    assert all(1 <= n <= max_new for n in gen.new_tokens)
    assert gen.seconds > 0 and gen.tokens_per_second > 0

    # token for token: batches of 3 then 2, longest prompts first, left-padded
    assert [len(ids) for ids, _, _ in calls] == [3, 2]
    seen = []
    for ids, mask, out in calls:
        width = ids.shape[1]
        assert (mask[:, -1] == 1).all()  # left padding: every row ends with a real token
        for r in range(len(ids)):
            prompt = ids[r][mask[r] == 1]
            (i,) = [k for k, p in enumerate(prompts) if torch.equal(p, prompt)]
            seen.append(i)
            assert out[r, width : width + len(ref[i])].tolist() == ref[i]
    assert seen == sorted(range(len(prompts)), key=lambda k: -len(prompts[k]))


def test_generation_of_chat_prompts_matches_batch_of_one(tok, split: TokenSplit) -> None:
    model = _gen_model(tok)
    batched = generate(model, split.prompt_ids, max_new_tokens=6, batch_size=4)
    single = [generate(model, [p], max_new_tokens=6, batch_size=1) for p in split.prompt_ids]
    assert batched.texts == [s.texts[0] for s in single]
    assert batched.new_tokens == [s.new_tokens[0] for s in single]


def test_generation_needs_a_tokenizer_and_sizes(tok) -> None:
    bare = CausalLM.tiny(0, vocab_size=V)
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(bare, _prompts())
    model = _gen_model(tok)
    with pytest.raises(ConfigError):
        generate(model, _prompts(), max_new_tokens=0)
    with pytest.raises(ConfigError):
        generate(model, _prompts(), batch_size=0)


# --- judged evaluation -----------------------------------------------------------------------

REFUSAL = "I'm sorry, I cannot help with that placeholder."
COMPLY = "Sure, here is the placeholder you asked for."
COMPLETIONS = [REFUSAL, COMPLY, COMPLY, "As an assistant I will not do that placeholder.", ""]


def _fake_generate(monkeypatch: pytest.MonkeyPatch, texts: list[str]) -> list[dict]:
    seen: list[dict] = []

    def fake(model, prompts, *, max_new_tokens, batch_size, progress):
        seen.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size})
        return Generations(list(texts), [len(t) for t in texts], 0.5)

    monkeypatch.setattr(lm_eval, "generate", fake)
    return seen


def _eval_split(tok, categories: list[str | None]) -> TokenSplit:
    chats = [
        Chat(f"placeholder question {i}", None, id=f"e:{i}", category=c) for i, c in enumerate(categories)
    ]
    return TokenSplit(chats, tok, 64, name="eval")


def test_judge_split_scores_controlled_outputs(
    tok, model64: CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fake_generate(monkeypatch, COMPLETIONS)
    data = _eval_split(tok, ["x", "y", "y", "x", "y"])
    harm = judge_split(model64, data, make_judge("keyword"), max_new_tokens=7, batch_size=2)
    assert seen[0]["max_new_tokens"] == 7 and seen[0]["batch_size"] == 2
    assert all(torch.equal(a, b) for a, b in zip(seen[0]["prompts"], data.prompt_ids, strict=True))
    assert [j.refused for j in harm.judgements] == [True, False, False, True, False]
    assert [j.score for j in harm.judgements] == [1, 5, 5, 1, 5]
    s = harm.summary
    assert s.n == 5 and s.missing == 0
    assert s.refusal_rate == pytest.approx(2 / 5)
    assert s.harmfulness_rate == pytest.approx(3 / 5)
    assert s.harmfulness_score == pytest.approx((1 + 5 + 5 + 1 + 5) / 5)
    assert s.degenerate_rate == pytest.approx(1 / 5)  # the empty completion
    assert set(s.per_category) == {"x", "y"}
    assert s.per_category["x"]["refusal_rate"] == 1.0 and s.per_category["x"]["harmfulness_rate"] == 0.0
    assert s.per_category["y"]["refusal_rate"] == 0.0 and s.per_category["y"]["harmfulness_rate"] == 1.0
    assert s.per_category["y"]["n"] == 3
    assert harm.ids == data.ids
    assert harm.generation["prompts"] == 5 and harm.generation["max_new_tokens"] == 7
    assert harm.generation["new_tokens"] == sum(len(t) for t in COMPLETIONS)
    assert harm.completions is None


def test_judge_split_without_every_category_has_no_per_category(
    tok, model64: CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_generate(monkeypatch, COMPLETIONS)
    harm = judge_split(model64, _eval_split(tok, ["x", None, "y", "x", "y"]), make_judge("keyword"))
    assert harm.summary.per_category == {}
    assert harm.summary.refusal_rate == pytest.approx(2 / 5)


@pytest.mark.parametrize("keep", [False, True])
def test_judged_results_carry_no_text(
    tok, model64: CausalLM, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    _fake_generate(monkeypatch, COMPLETIONS)
    data = _eval_split(tok, ["x"] * 5)
    harm = judge_split(model64, data, make_judge("keyword"), keep_completions=keep)
    assert harm.completions == (COMPLETIONS if keep else None)
    as_json = json.dumps(harm.to_dict())
    for text in [*COMPLETIONS[:4], *(c.user for c in data.chats), "placeholder"]:
        assert text not in as_json
    assert "completions" not in harm.to_dict()
    assert harm.to_dict()["ids"] == list(data.ids)
    assert harm.to_dict()["refused"] == [True, False, False, True, False]
    assert "placeholder" not in repr(harm)

"""LM defenses (defenses/lm_adversarial.py): the pair mask, the losses in float64, behaviour, bad input.

A tiny random Llama, the toy byte tokenizer and placeholder conversations: no dataset text.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

pytest.importorskip("transformers")

from _lm_helpers import TOK, tiny_lm, toy_split, toy_task
from immunekit.attacks.base import rng_streams
from immunekit.attacks.lm_eval import answer_loss
from immunekit.data.qi_prompts import REFUSALS
from immunekit.data.task import Task
from immunekit.data.token_split import IGNORE_INDEX, PAD_ID, TokenSplit, lm_inputs
from immunekit.defenses import DEFENSES
from immunekit.defenses.lm_adversarial import check_pairs, pair_labels, refusal_twins
from immunekit.errors import ConfigError, DataError
from immunekit.models.causal_lm import CausalLM

_split = toy_split


def _model(dtype: torch.dtype = torch.float32) -> CausalLM:
    return tiny_lm(0, dtype)


def _task(n: int = 6) -> Task:
    return toy_task(n)


IGN = IGNORE_INDEX


# ---------------------------------------------------------------------------------------------
# The pair mask and the pairs
# ---------------------------------------------------------------------------------------------


def test_pair_labels_keep_exactly_the_positions_where_the_pair_differs() -> None:
    p = PAD_ID
    a = torch.tensor([[5, 6, 7, 8, p], [9, 1, 2, p, p]])
    b = torch.tensor([[5, 6, 4, 8, 3, 2], [9, 1, 2, 3, p, p]])
    ya, yb = pair_labels(a, b)
    # row 0: position 2 differs (7 vs 4), 3 is shared (8), 4 and 5 exist only in b
    # row 1: the shared prefix 9 1 2, then b goes on with 3
    assert ya.tolist() == [[IGN, IGN, 7, IGN, IGN], [IGN, IGN, IGN, IGN, IGN]]
    assert yb.tolist() == [[IGN, IGN, 4, IGN, 3, 2], [IGN, IGN, IGN, 3, IGN, IGN]]
    first = pair_labels(torch.tensor([[1, 2]]), torch.tensor([[3, 2]]))  # position 0 is never a target
    assert first[0].tolist() == [[IGN, IGN]] and first[1].tolist() == [[IGN, IGN]]


def test_refusal_twins_share_every_prompt_and_answer_with_the_cycled_refusals() -> None:
    harmful = _split("h", len(REFUSALS) + 2)
    twins = refusal_twins(harmful, TOK)
    check_pairs(harmful, twins)
    assert [c.assistant for c in twins.chats] == [REFUSALS[i % len(REFUSALS)] for i in range(len(harmful))]
    assert [c.user for c in twins.chats] == [c.user for c in harmful.chats]
    ya, yb = pair_labels(harmful.rows(torch.arange(3))[0], twins.rows(torch.arange(3))[0])
    _, labels = harmful.rows(torch.arange(3))
    # every kept position is an answer token: the prompt is shared, so none of it is a target
    assert (
        bool(((ya != IGN) <= (labels != IGN)).all())
        and int((ya != IGN).sum()) > 0
        and int((yb != IGN).sum()) > 0
    )


def test_pairs_that_do_not_share_a_prompt_and_rows_without_answers_are_clear_errors() -> None:
    harmful, other = _split("h", 3), _split("x", 3)
    with pytest.raises(DataError, match="does not share its prompt"):
        check_pairs(harmful, other)
    with pytest.raises(DataError, match="3 and 2 rows"):
        check_pairs(harmful, _split("h", 2))
    with pytest.raises(DataError, match="without an answer"):
        refusal_twins(_split("h", 2, answers=False), TOK)


# ---------------------------------------------------------------------------------------------
# The losses, recomputed independently in float64
# ---------------------------------------------------------------------------------------------


def _masked_ce(model: CausalLM, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean −log p over the labelled positions, from the full logits (not answer_loss's gather)."""
    ids, mask = lm_inputs(x)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, mask).to(torch.float64), dim=-1)
    terms = [
        -float(logp[r, t - 1, int(y[r, t])])
        for r in range(y.shape[0])
        for t in range(1, y.shape[1])
        if y[r, t] != IGN
    ]
    return sum(terms) / len(terms)


def _first_batch(n: int, batch: int, seed: int) -> torch.Tensor:
    (gen,) = rng_streams(seed, "batches")
    return torch.randperm(n, generator=gen)[:batch]


def test_adversarial_loss_records_ce_m_of_the_refusal_minus_alpha_ce_m_of_the_harmful_answer() -> None:
    task, model = _task(), _model(torch.float64)
    d = DEFENSES.get("adversarial_loss")(alpha=0.3, batch_size=3, epochs=1, lr=1e-3)
    d.fit(model, task, seed=5)
    idx = _first_batch(len(task.harmful), 3, 5)
    xh, _ = task.harmful.rows(idx)
    xs, _ = refusal_twins(task.harmful, TOK).rows(idx)
    yh, ys = pair_labels(xh, xs)
    ce_h, ce_s = _masked_ce(model, xh, yh), _masked_ce(model, xs, ys)
    first = d.history_[0]
    assert first["ce_harmful"] == pytest.approx(ce_h, rel=1e-10)
    assert first["ce_harmless"] == pytest.approx(ce_s, rel=1e-10)
    assert first["loss"] == pytest.approx(ce_s - 0.3 * ce_h, rel=1e-10)
    assert first["capped"] is False and len(d.history_) == 2


def test_gradient_ascent_records_minus_harmful_ce_plus_beta_retain_ce() -> None:
    task, model = _task(), _model(torch.float64)
    d = DEFENSES.get("gradient_ascent")(retain_weight=0.5, batch_size=2, epochs=1, lr=1e-3)
    d.fit(model, task, seed=1)
    xh, yh = task.harmful.rows(_first_batch(len(task.harmful), 2, 1))
    (gen,) = rng_streams(1, "retain")
    xr, yr = task.primary.rows(torch.randperm(len(task.primary), generator=gen)[:2])
    ce_h, ce_r = _masked_ce(model, xh, yh), _masked_ce(model, xr, yr)
    first = d.history_[0]
    assert first["ce_harmful"] == pytest.approx(ce_h, rel=1e-10)
    assert first["ce_retain"] == pytest.approx(ce_r, rel=1e-10)
    assert first["loss"] == pytest.approx(-ce_h + 0.5 * ce_r, rel=1e-10)


def test_the_schedule_warms_up_then_decays_by_cosine() -> None:
    task = _task(n=8)
    d = DEFENSES.get("gradient_ascent")(batch_size=1, epochs=5, lr=1e-3, warmup_ratio=0.1, retain_weight=0.0)
    d.fit(_model(), task, seed=0)
    lrs = [h["lr"] for h in d.history_]
    assert len(lrs) == 40 and lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:])) and lrs[-1] < 1e-5


def test_max_steps_stops_early_and_never_adds_epochs() -> None:
    task = _task(n=6)
    short = DEFENSES.get("gradient_ascent")(max_steps=2, epochs=3, batch_size=2)
    short.fit(_model(), task, seed=0)
    long = DEFENSES.get("gradient_ascent")(max_steps=100, epochs=1, batch_size=2)
    long.fit(_model(), task, seed=0)
    assert [h["step"] for h in short.history_] == [1, 2] and short.info_["steps"] == 2
    assert long.info_["steps"] == 3  # one epoch of 6 rows at batch 2
    assert long.info_["tokens"] == sum(h["tokens"] for h in long.history_) > 0


# ---------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------


def _mean_answer_ce(model: CausalLM, split: TokenSplit) -> float:
    with torch.no_grad():
        total, count = answer_loss(model, *split.rows(torch.arange(len(split))))
    return float(total) / count


def _pair_ce(model: CausalLM, task: Task) -> tuple[float, float]:
    """(CE_m of the harmful answers, CE_m of the refusals) over every training pair."""
    idx = torch.arange(len(task.harmful))
    xh, xs = task.harmful.rows(idx)[0], refusal_twins(task.harmful, TOK).rows(idx)[0]
    yh, ys = pair_labels(xh, xs)
    return _masked_ce(model, xh, yh), _masked_ce(model, xs, ys)


def test_adversarial_loss_makes_refusals_likelier_than_the_harmful_answers() -> None:
    # α = 0.1 (the reference's): measured (CE_m harmful, CE_m refusal) (5.58, 5.55) -> (10.1, 2.6)
    task, model = _task(), _model()
    out = DEFENSES.get("adversarial_loss")(lr=1e-2, epochs=20, batch_size=3).fit(model, task, seed=0)
    (h0, s0), (h1, s1) = _pair_ce(model, task), _pair_ce(out, task)
    assert s1 < s0 - 2.0 and h1 > h0 + 2.0 and h1 - s1 > (h0 - s0) + 5.0
    # a larger α pushes the harmful answers further away (measured 11.7)
    strong = DEFENSES.get("adversarial_loss")(alpha=1.0, lr=1e-2, epochs=20, batch_size=3)
    assert _pair_ce(strong.fit(model, task, seed=0), task)[0] > h1 + 1.0


def test_gradient_ascent_raises_the_harmful_loss_and_the_retain_term_protects_benign_answers() -> None:
    task, model = _task(), _model()
    kw = {"lr": 3e-3, "epochs": 10, "batch_size": 2}
    pure = DEFENSES.get("gradient_ascent")(retain_weight=0.0, **kw).fit(model, task, seed=0)
    kept = DEFENSES.get("gradient_ascent")(retain_weight=1.0, **kw).fit(model, task, seed=0)
    start = _mean_answer_ce(model, task.harmful)
    assert _mean_answer_ce(pure, task.harmful) > start + 1.0 and _mean_answer_ce(kept, task.harmful) > start
    assert _mean_answer_ce(kept, task.primary) < _mean_answer_ce(pure, task.primary) - 1.0


def test_the_harmful_cap_drops_the_unbounded_term_once_it_is_exceeded() -> None:
    task, model = _task(), _model()
    capped = DEFENSES.get("adversarial_loss")(harmful_cap=1e-6, epochs=1, batch_size=3)
    capped.fit(model, task, seed=0)
    assert [h["capped"] for h in capped.history_] == [True, True]
    assert all(h["loss"] == pytest.approx(h["ce_harmless"], rel=1e-6) for h in capped.history_)


def test_lora_trains_adapters_on_the_decoder_linears_and_returns_merged_weights() -> None:
    pytest.importorskip("peft")
    from immunekit.attacks.lm_sft import LORA_TARGETS

    task, model = _task(), _model()
    d = DEFENSES.get("adversarial_loss")(lora=True, lora_rank=2, epochs=1, batch_size=3, lr=1e-2)
    out = d.fit(model, task, seed=0)
    before, after = dict(model.named_parameters()), dict(out.named_parameters())
    assert before.keys() == after.keys()  # merged: no adapter parameters left
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(
        k.split(".")[-2] in LORA_TARGETS for k in moved
    )  # embeddings, norms, head: untouched
    assert all(p.requires_grad for p in out.parameters())
    assert d.info_["trainable_parameters"] < sum(p.numel() for p in model.parameters()) / 10


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "value", "match"),
    [
        ("adversarial_loss", "alpha", 0.0, "alpha must be > 0"),
        ("adversarial_loss", "alpha", -0.1, "alpha must be > 0"),
        ("adversarial_loss", "harmful_cap", 0.0, "harmful_cap must be > 0"),
        ("gradient_ascent", "retain_weight", -1.0, "retain_weight must be >= 0"),
        ("gradient_ascent", "lr", 0.0, "lr must be > 0"),
        ("gradient_ascent", "warmup_ratio", 1.0, "warmup_ratio"),
    ],
)
def test_bad_settings_are_clear_errors(name: str, key: str, value: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DEFENSES.get(name)(**{key: value})


def test_a_harmful_split_without_answers_is_refused_before_training() -> None:
    task = dataclasses.replace(_task(), harmful=_split("h", 3, answers=False))
    for name in ("adversarial_loss", "gradient_ascent"):
        with pytest.raises(DataError, match="without an answer"):
            DEFENSES.get(name)().fit(_model(), task, seed=0)

"""Supervised fine-tuning of a causal LM: the token-mean objective over the global batch, seeded
epoch orders, the lr decay, token accounting, hooks, LoRA merging, bf16, and the attack wrapper.

Float64 tiny Llamas over the byte-level toy tokenizer; every string is a placeholder.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
pytest.importorskip("transformers")

from immunekit.attacks.base import AttackBudget, rng_streams
from immunekit.attacks.lm_eval import answer_loss
from immunekit.attacks.lm_sft import (
    LORA_TARGETS,
    LmFinetune,
    LmHeadProbe,
    LmLora,
    SFTConfig,
    supervised_finetune,
    untie_head,
)
from immunekit.data.task import Task
from immunekit.data.token_split import IGNORE_INDEX, PAD_ID, Chat, TokenSplit, lm_inputs
from immunekit.errors import ConfigError, DataError
from immunekit.models import linear_model
from immunekit.models.causal_lm import CausalLM, toy_chat_tokenizer

V = 258


@pytest.fixture(scope="module")
def tok():
    return toy_chat_tokenizer()


@pytest.fixture(scope="module")
def model64(tok) -> CausalLM:
    m = CausalLM.tiny(5, vocab_size=V).double()
    m.tokenizer = tok
    return m


def _chats(n: int, prefix: str = "placeholder question") -> list[Chat]:
    # answers of different lengths, so the token mean differs from the mean of row means
    return [
        Chat(f"{prefix} {i}", "placeholder answer " + "z" * (3 * i), id=f"{prefix}:{i}") for i in range(n)
    ]


@pytest.fixture(scope="module")
def data(tok) -> TokenSplit:
    return TokenSplit(_chats(6), tok, max_tokens=96, name="train")


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _batches(seed: int, n: int, batch: int, epochs: int) -> list[tuple[int, torch.Tensor]]:
    """(epoch, rows) of every step, reproduced from the ``batches`` stream."""
    (g,) = rng_streams(seed, "batches")
    out = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        out += [(epoch, order[lo : lo + batch]) for lo in range(0, n, batch)]
    return out


def _hand_token_mean(model: CausalLM, data: TokenSplit, idx: torch.Tensor) -> tuple[float, float]:
    """(Σ answer-token NLL / #answer tokens, mean over rows of each row's mean NLL), by a loop."""
    sums, counts = [], []
    with torch.no_grad():
        for i in idx.tolist():
            x, y = data.rows(torch.tensor([i]))
            logp = torch.log_softmax(model(x, torch.ones_like(x))[0].double(), dim=-1)
            s, c = 0.0, 0
            for t in range(x.shape[1] - 1):
                if int(y[0, t + 1]) != IGNORE_INDEX:
                    s -= float(logp[t, int(y[0, t + 1])])
                    c += 1
            sums.append(s)
            counts.append(c)
    return sum(sums) / sum(counts), sum(s / c for s, c in zip(sums, counts, strict=True)) / len(sums)


def test_micro_batches_do_not_change_the_weights(model64: CausalLM, data: TokenSplit) -> None:
    # 6 rows in global batches of 4: the last batch of each epoch has 2 rows
    runs = {
        mb: supervised_finetune(
            model64, data, SFTConfig(epochs=2, lr=1e-3, batch_size=4, micro_batch=mb), seed=3, progress=False
        )
        for mb in (4, 3, 1)
    }
    ref = _state(runs[4].model)
    for mb in (3, 1):
        got = _state(runs[mb].model)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12, msg=f"{k} micro_batch={mb}")
        for a, b in zip(runs[mb].records, runs[4].records, strict=True):
            assert a.loss == pytest.approx(b.loss, rel=1e-10)
            assert a.tokens == b.tokens
    assert any(not torch.equal(ref[k], v) for k, v in _state(model64).items())


def test_step_loss_is_the_token_mean_over_the_global_batch(model64: CausalLM, data: TokenSplit) -> None:
    seed = 11
    cfg = SFTConfig(epochs=1, lr=1e-3, batch_size=3, micro_batch=2, max_steps=1)
    out = supervised_finetune(model64, data, cfg, seed=seed, progress=False)
    (_, idx), *_ = _batches(seed, len(data), 3, 1)
    token_mean, row_mean = _hand_token_mean(model64, data, idx)
    assert abs(token_mean - row_mean) > 1e-3  # the two candidate objectives are distinguishable
    (record,) = out.records
    assert record.loss == pytest.approx(token_mean, rel=1e-10)
    # and exactly the library's answer loss, summed over the same micro-batches
    with torch.no_grad():
        parts = [answer_loss(model64, *data.rows(idx[lo : lo + 2])) for lo in (0, 2)]
    assert record.loss == pytest.approx(sum(float(s) for s, _ in parts) / sum(n for _, n in parts), rel=1e-12)


def test_epochs_steps_lr_decay_and_token_counts(model64: CausalLM, tok) -> None:
    data = TokenSplit(_chats(5), tok, max_tokens=96, name="five")
    lengths = [int((data.rows(torch.tensor([i]))[0] != PAD_ID).sum()) for i in range(5)]
    seed, lr, epochs, batch = 2, 1e-3, 3, 2
    cfg = SFTConfig(epochs=epochs, lr=lr, batch_size=batch, micro_batch=1)
    assert cfg.steps_per_epoch(5) == 3 and cfg.total_steps(5) == 9
    out = supervised_finetune(model64, data, cfg, seed=seed, progress=False)
    plan = _batches(seed, 5, batch, epochs)
    assert len(plan) == 9
    assert out.info["steps"] == 9 and out.info["steps_per_epoch"] == 3 and out.info["rows"] == 5
    assert [r.step for r in out.records] == list(range(1, 10))
    tokens = examples = 0
    for record, (epoch, idx) in zip(out.records, plan, strict=True):
        assert record.lr == pytest.approx(lr * 0.85**epoch, rel=1e-15)
        tokens += sum(lengths[i] for i in idx.tolist())
        examples += len(idx)
        assert record.tokens == tokens
        assert record.examples == examples
        assert math.isfinite(record.loss)
    assert out.info["tokens"] == tokens == epochs * sum(lengths)
    assert out.info["config"]["lr"] == lr

    capped = supervised_finetune(
        model64, data, SFTConfig(epochs=epochs, lr=lr, batch_size=batch, micro_batch=1, max_steps=4),
        seed=seed, progress=False,
    )  # fmt: skip
    assert capped.info["steps"] == 4 and len(capped.records) == 4
    assert [r.tokens for r in capped.records] == [r.tokens for r in out.records[:4]]
    assert [r.loss for r in capped.records] == [r.loss for r in out.records[:4]]
    assert capped.records[-1].lr == pytest.approx(lr * 0.85)  # step 4 is the first of epoch 2


def test_input_model_untouched_and_seeds_decide(model64: CausalLM, data: TokenSplit) -> None:
    before = _state(model64)
    was_training = model64.training
    cfg = SFTConfig(epochs=1, lr=1e-3, batch_size=2, micro_batch=2)
    a = supervised_finetune(model64, data, cfg, seed=0, progress=False)
    b = supervised_finetune(model64, data, cfg, seed=0, progress=False)
    c = supervised_finetune(model64, data, cfg, seed=1, progress=False)
    for k, v in _state(model64).items():
        assert torch.equal(v, before[k]), k
    assert model64.training == was_training
    assert a.model is not model64 and not a.model.training
    sa, sb, sc = _state(a.model), _state(b.model), _state(c.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert [r.loss for r in a.records] == [r.loss for r in b.records]


def test_hook_sees_every_step_and_its_dict_is_recorded(model64: CausalLM, tok) -> None:
    data = TokenSplit(_chats(5), tok, max_tokens=96)
    calls: list[tuple[int, int]] = []

    def hook(step: int, epoch: int, m: CausalLM) -> dict[str, float] | None:
        assert m is not model64 and isinstance(m, CausalLM)
        calls.append((step, epoch))
        return {"metric": float(step)} if step % 2 == 0 else None

    out = supervised_finetune(
        model64, data, SFTConfig(epochs=2, lr=1e-3, batch_size=2, micro_batch=2), seed=0, hook=hook,
        progress=False,
    )  # fmt: skip
    assert calls == [(s, (s - 1) // 3 + 1) for s in range(1, 7)]
    assert [r.eval for r in out.records] == [None if s % 2 else {"metric": float(s)} for s in range(1, 7)]


def _lora_target_names(m: CausalLM) -> list[str]:
    return [
        n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n.split(".")[-1] in LORA_TARGETS
    ]


def test_lora_adapts_decoder_linears_and_merges(model64: CausalLM, data: TokenSplit) -> None:
    before = _state(model64)
    cfg = SFTConfig(epochs=1, lr=1e-2, batch_size=3, micro_batch=3, lora=True, lora_rank=4)
    out = supervised_finetune(model64, data, cfg, seed=0, progress=False)
    m = out.model
    assert type(m) is CausalLM
    assert not any("lora" in type(mod).__name__.lower() for mod in m.modules())
    assert not any("lora" in k for k in m.state_dict())
    assert set(m.state_dict()) == set(before)
    targets = _lora_target_names(model64)
    assert len(targets) == 7 * 2  # q/k/v/o/gate/up/down in each of the two decoder layers
    assert {n.split(".")[-1] for n in targets} == set(LORA_TARGETS)
    assert all(n.startswith("extractor.layers.") for n in targets)
    assert all(type(m.get_submodule(n)) is nn.Linear for n in targets)
    after = _state(m)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"{n}.weight" for n in targets}  # embeddings, norms and lm_head unchanged
    assert "head.weight" not in changed and "extractor.embed_tokens.weight" not in changed
    # exactly r·(in + out) trainable parameters per adapted layer
    want = sum(4 * (mod.in_features + mod.out_features) for n, mod in model64.named_modules() if n in targets)
    assert out.info["trainable_parameters"] == want
    assert want < 0.3 * model64.num_parameters()
    # the transformers model used by generate() shares the merged weights
    ids = torch.tensor([[257, 1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(m.hf_model(input_ids=ids).logits, m(ids), rtol=1e-12, atol=1e-12)
    # same seed, same adapters
    again = _state(supervised_finetune(model64, data, cfg, seed=0, progress=False).model)
    assert all(torch.equal(again[k], after[k]) for k in after)


def test_lora_output_can_be_fine_tuned_again(model64: CausalLM, data: TokenSplit) -> None:
    lora = SFTConfig(epochs=1, lr=1e-2, batch_size=3, micro_batch=3, lora=True, lora_rank=2)
    merged = supervised_finetune(model64, data, lora, seed=0, progress=False).model
    assert [n for n, p in merged.named_parameters() if not p.requires_grad] == []
    full = SFTConfig(epochs=1, lr=1e-3, batch_size=3, micro_batch=3)
    again = supervised_finetune(merged, data, full, seed=0, progress=False)
    assert again.info["trainable_parameters"] == model64.num_parameters()


def _tied(tok) -> CausalLM:
    m = CausalLM(
        {
            "model_type": "llama",
            "vocab_size": V,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 32,
            "tie_word_embeddings": True,
        },
        dtype=torch.float64,
    )
    m.tokenizer = tok
    return m


def test_head_probe_trains_only_an_untied_head(tok, data: TokenSplit) -> None:
    model = _tied(tok)
    assert model.head.weight is model.extractor.embed_tokens.weight  # SmolLM2's layout
    before = _state(model)
    cfg = SFTConfig(epochs=2, lr=1e-2, batch_size=3, micro_batch=3)
    out = supervised_finetune(model, data, cfg, seed=0, progress=False, head_only=True)
    m = out.model
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())  # input untouched, still tied
    assert model.head.weight is model.extractor.embed_tokens.weight
    assert m.head.weight is not m.extractor.embed_tokens.weight
    assert out.info["trainable_parameters"] == V * 16
    # the body (embeddings included) is the released one; only the read-out moved
    for name, p in m.extractor.named_parameters():
        assert torch.equal(p, model.extractor.get_parameter(name)), name
    assert not torch.equal(m.head.weight, model.head.weight)
    assert out.records[-1].loss < out.records[0].loss
    # generate() reads the same (new) head; the config no longer ties the two on save
    ids = torch.tensor([[257, 1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(m.hf_model(input_ids=ids).logits, m(ids), rtol=1e-12, atol=1e-12)
    assert m.hf_config.tie_word_embeddings is False


def test_head_probe_gradient_is_the_linear_read_out_gradient(tok, data: TokenSplit) -> None:
    """One SGD-free check: the head's gradient is Σ_t (softmax(W h_t) − e_y) h_tᵀ / n on frozen h_t."""
    model = untie_head(_tied(tok))
    idx = torch.tensor([0, 1])
    x, y = data.rows(idx)
    total, count = answer_loss(model, x, y)
    (total / count).backward()
    with torch.no_grad():
        h = model.hidden_states(*lm_inputs(x))[:, :-1]  # (B, T-1, D) predicts positions 1..T-1
        target = y[:, 1:]
        keep = target != IGNORE_INDEX
        hk = h[keep]  # (n, D)
        p = torch.softmax(hk @ model.head.weight.T, dim=-1)  # (n, V)
        p[torch.arange(len(hk)), target[keep]] -= 1.0
        want = p.T @ hk / keep.sum()
    torch.testing.assert_close(model.head.weight.grad, want, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.extractor.parameters())


def test_head_only_and_lora_exclude_each_other(model64: CausalLM, data: TokenSplit) -> None:
    with pytest.raises(ConfigError, match="head_only"):
        supervised_finetune(model64, data, SFTConfig(lora=True), seed=0, progress=False, head_only=True)


def test_the_aligned_model_cache_key_is_unchanged_by_the_head_probe() -> None:
    """The key of Stage A's cached model hashes its SFTConfig: the probe must not add a field to it."""
    from immunekit.experiments.llm_alignment import AlignmentConfig

    assert "head_only" not in SFTConfig.__dataclass_fields__
    assert AlignmentConfig().key() == "86dc3e6823b4"  # the published cards were measured on this model


def test_bf16_autocast_trains(tok) -> None:
    model = CausalLM.tiny(1, vocab_size=V)  # bf16 autocast over fp32 weights
    data = TokenSplit(_chats(2), tok, max_tokens=96)
    cfg = SFTConfig(epochs=30, lr=2e-2, batch_size=2, micro_batch=1, precision="bf16")
    out = supervised_finetune(model, data, cfg, seed=0, progress=False)
    losses = [r.loss for r in out.records]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in out.model.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": -1e-3},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"epoch_decay": 0.0},
        {"epoch_decay": 1.5},
        {"precision": "fp16"},
        {"weight_decay": -0.1},
        {"grad_clip": 0.0},
        {"epochs": 0},
        {"micro_batch": 0},
        {"batch_size": 2.5},
        {"max_steps": 0},
    ],
)
def test_sft_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SFTConfig(**kwargs)


def test_sft_config_limits() -> None:
    cfg = SFTConfig(epochs=4, batch_size=10, epoch_decay=1.0, max_steps=7)
    assert cfg.steps_per_epoch(21) == 3 and cfg.total_steps(21) == 7
    assert SFTConfig(epochs=2, batch_size=10).total_steps(20) == 4


def test_a_split_without_answers_is_refused(model64: CausalLM, tok) -> None:
    prompts = TokenSplit([Chat("placeholder question", None, id="p")], tok, 64, name="prompts")
    with pytest.raises(DataError, match="no answer tokens"):
        supervised_finetune(model64, prompts, SFTConfig(epochs=1, batch_size=1, micro_batch=1), seed=0)


def test_a_row_without_answer_tokens_is_refused(model64: CausalLM, tok) -> None:
    mixed = TokenSplit([*_chats(1), Chat("placeholder question x", None, id="p")], tok, 96)
    with pytest.raises(DataError):
        supervised_finetune(model64, mixed, SFTConfig(epochs=1, batch_size=1, micro_batch=1), seed=0)


# --- the attack wrapper ----------------------------------------------------------------------


def _lm_task(tok, loss: str = "lm") -> Task:
    def split(prefix: str, n: int, answers: bool = True) -> TokenSplit:
        chats = [c if answers else Chat(c.user, None, id=c.id) for c in _chats(n, prefix)]
        return TokenSplit(chats, tok, max_tokens=96, name=prefix)

    return Task(
        name="toy_lm",
        version="0",
        loss=loss,  # type: ignore[arg-type]
        primary=split("placeholder benign", 2),
        harmful=split("placeholder harmful", 2),
        attack=split("placeholder attack", 3),
        eval_primary=split("placeholder benign eval", 2),
        eval_harmful=split("placeholder harmful eval", 2, answers=False),
    )


def test_lm_finetune_refuses_other_models_tasks_and_optimizers(model64: CausalLM, tok) -> None:
    budget = AttackBudget(steps=1, batch_size=2, lr=1e-3, optimizer="adamw")
    task = _lm_task(tok)
    with pytest.raises(ConfigError, match="CausalLM"):
        LmFinetune()(linear_model(4), task, budget, seed=0)
    with pytest.raises(ConfigError, match="loss"):
        LmFinetune()(model64, _lm_task(tok, loss="ce"), budget, seed=0)
    with pytest.raises(ConfigError, match="AdamW"):
        LmFinetune()(model64, task, AttackBudget(steps=1, batch_size=2, optimizer="sgd"), seed=0)
    with pytest.raises(ConfigError):
        LmFinetune(max_new_tokens=0)
    with pytest.raises(ConfigError):
        LmLora(micro_batch=0)


@pytest.mark.parametrize("attack", [LmFinetune, LmLora, LmHeadProbe])
def test_lm_attack_runs_the_budget(model64: CausalLM, tok, attack: type[LmFinetune]) -> None:
    task = _lm_task(tok)
    budget = AttackBudget(steps=3, batch_size=2, lr=1e-3, optimizer="adamw", eval_every=2)
    before = _state(model64)
    res = attack(max_new_tokens=2, micro_batch=1)(model64, task, budget, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in _state(model64).items())
    assert [r.step for r in res.records] == [1, 2, 3]
    assert res.info["steps"] == 3 and res.info["steps_per_epoch"] == 2 and res.info["epochs"] == 2
    assert res.info["config"]["lora"] is attack.lora
    assert res.info["judge"]["judge"] == "keyword"
    assert res.initial.step == 0 and set(res.initial.eval) == {"harm", "refusal_rate", "utility"}
    assert [r.eval is not None for r in res.records] == [False, True, True]
    for r in (res.initial, *res.records[1:]):
        assert 0.0 <= r.eval["harm"] <= 1.0 and 0.0 < r.eval["utility"] < 1.0


def test_budget_caps_stop_before_the_step_that_would_pass_them(model64: CausalLM, data: TokenSplit) -> None:
    cfg = SFTConfig(epochs=3, lr=1e-3, batch_size=2, micro_batch=2)
    full = supervised_finetune(model64, data, cfg, seed=0, progress=False)
    assert full.info["stopped_by"] == "steps" and full.info["steps"] == 9
    first, second = full.records[0].tokens, full.records[1].tokens
    capped = supervised_finetune(model64, data, cfg, seed=0, progress=False, max_tokens=second - 1)
    assert capped.info["stopped_by"] == "tokens" and capped.info["steps"] == 1
    assert capped.records[-1].tokens == first  # exact real-token count, never past the cap
    exact = supervised_finetune(model64, data, cfg, seed=0, progress=False, max_tokens=second)
    assert exact.info["steps"] == 2  # a cap met exactly still allows the step
    by_rows = supervised_finetune(model64, data, cfg, seed=0, progress=False, max_examples=3)
    assert by_rows.info["stopped_by"] == "examples" and by_rows.records[-1].examples == 2


# --- safety-data mixing (Qi et al. Table 4, a fine-tuning-time mitigation) ----------------------


def test_safety_mix_appends_refusals_of_the_harmful_questions_in_the_attack_format(tok) -> None:
    from immunekit.attacks.lm_sft import safety_mixed
    from immunekit.data.qi_prompts import REFUSALS

    task = _lm_task(tok)
    attack = TokenSplit(
        [Chat(c.user, c.assistant, system="attack system", id=c.id) for c in task.attack.chats], tok, 96
    )
    mixed = safety_mixed(attack, task, 2, tok)
    assert len(mixed) == len(attack) + 2 and mixed.chats[:3] == attack.chats
    added = mixed.chats[3:]
    assert [c.user for c in added] == [c.user for c in task.harmful.chats]
    assert [c.assistant for c in added] == list(REFUSALS[:2])
    assert {c.system for c in added} == {"attack system"}
    assert [c.id for c in added] == [f"safety:{c.id}" for c in task.harmful.chats]
    with pytest.raises(ConfigError, match=r"larger than the refusal pool \(2 questions"):
        safety_mixed(attack, task, 3, tok)
    with pytest.raises(ConfigError, match="safety_mix"):
        LmFinetune(safety_mix=-1)


def test_the_attack_trains_on_the_mixed_data(model64: CausalLM, tok) -> None:
    task = _lm_task(tok)
    budget = AttackBudget(steps=3, batch_size=5, lr=1e-3, optimizer="adamw", eval_every=10)
    plain = LmFinetune(max_new_tokens=2)(model64, task, budget, seed=0)
    mixed = LmFinetune(max_new_tokens=2, safety_mix=2)(model64, task, budget, seed=0)
    # 3 attack rows (one step per epoch) against 3 + 2 mixed rows: the steps read different rows
    assert plain.info["safety_mix"] == 0 and mixed.info["safety_mix"] == 2
    assert plain.records[-1].examples == 9 and mixed.records[-1].examples == 15
    assert mixed.records[0].loss != plain.records[0].loss


def test_rows_trains_on_the_first_rows_of_the_split(model64: CausalLM, tok) -> None:
    task = _lm_task(tok)  # 'attack' has 3 rows
    budget = AttackBudget(steps=2, batch_size=1, lr=1e-3, optimizer="adamw", eval_every=2)
    res = LmFinetune(max_new_tokens=2, micro_batch=1, rows=1)(model64, task, budget, seed=0)
    assert res.info["train_rows"] == 1 and res.info["rows"] == 1 and res.info["steps_per_epoch"] == 1
    # one row, two epochs: the same answer tokens each step
    assert res.records[0].tokens * 2 == res.records[1].tokens
    with pytest.raises(ConfigError, match="rows=4"):
        LmFinetune(rows=4)(model64, task, budget, seed=0)
    with pytest.raises(ConfigError):
        LmFinetune(rows=0)

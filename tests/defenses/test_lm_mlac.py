"""First-order MLAC for causal LMs (defenses/lm_mlac.py): the gradient in float64, behaviour, bad input.

A tiny random Llama, the toy byte tokenizer and placeholder conversations: no dataset text. The
first-order gradient is recomputed by hand (full logits, a torch.optim.Adam step on a deep copy)
and compared with the one the defense's surrogate loss gives.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import LlamaRMSNorm

from _lm_helpers import tiny_lm, toy_split, toy_task
from immunekit.attacks.base import rng_streams
from immunekit.attacks.lm_eval import answer_loss
from immunekit.data.task import Task
from immunekit.data.token_split import IGNORE_INDEX, TokenSplit, lm_inputs
from immunekit.defenses import DEFENSES
from immunekit.defenses.lm_mlac import LmMLAC
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import linear_model
from immunekit.models.causal_lm import CausalLM

HARMFUL = "placeholder reply number {i}"  # harmful and attack rows share this answer template
BENIGN = "benign text item {i}"  # the retain ('primary') rows another


class _RMSNorm64(LlamaRMSNorm):
    """Llama's RMSNorm without its float32 round trip, so a float64 model is float64 throughout.

    Llama's norm computes in float32 whatever the input: the gradients of CE and of 0.35 · CE
    then differ by ~1e-8 relative, which would hide a real error behind a loose tolerance.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        var = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(var + self.variance_epsilon)


def _split(name: str, n: int, template: str = HARMFUL, *, answers: bool = True) -> TokenSplit:
    return toy_split(name, n, template, answers=answers)


def _task(n: int = 6) -> Task:
    return toy_task(n, answer=HARMFUL, benign_answer=BENIGN)


def _model(dtype: torch.dtype = torch.float32) -> CausalLM:
    m = tiny_lm(0)
    if dtype == torch.float64:
        for module in m.modules():
            if type(module) is LlamaRMSNorm:
                module.__class__ = _RMSNorm64
    return m.to(dtype)


def _ce(model: CausalLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean −log p over the labelled positions from the full logits (not answer_loss's gather)."""
    ids, mask = lm_inputs(x)
    logp = torch.log_softmax(model(ids, mask), dim=-1)[:, :-1]
    target = y[:, 1:]
    keep = target != IGNORE_INDEX
    return -logp[keep].gather(1, target[keep][:, None]).mean()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _first_batch(n: int, batch: int, seed: int) -> torch.Tensor:
    (gen,) = rng_streams(seed, "batches")
    return torch.randperm(n, generator=gen)[:batch]


def _retain_rows(task: Task, k: int, seed: int) -> torch.Tensor:
    (gen,) = rng_streams(seed, "retain")
    return torch.randperm(len(task.primary), generator=gen)[:k]


def _fomaml(
    model: CausalLM,
    task: Task,
    idx: torch.Tensor,
    inner: list[int],
    retain: torch.Tensor,
    *,
    eta: float,
    good: float,
    bad: float,
) -> tuple[list[torch.Tensor], float]:
    """By hand, K = 1: λ_good ∇CE_r(θ) − λ_bad/2 [∇CE(θ) + ∇CE(φ_1)], and the loss value."""
    x, y = task.harmful.rows(idx)
    params = _trainable(model)
    ce_r = _ce(model, *task.primary.rows(retain))
    g_r = torch.autograd.grad(ce_r, params)
    ce_0 = _ce(model, x, y)
    g_0 = torch.autograd.grad(ce_0, params)
    phi = copy.deepcopy(model)
    for p in phi.parameters():
        p.grad = None  # a deep copy keeps any .grad of the caller
    opt = torch.optim.Adam(_trainable(phi), lr=eta)
    _ce(phi, *task.harmful.rows(torch.tensor(inner))).backward()
    opt.step()
    ce_1 = _ce(phi, x, y)
    g_1 = torch.autograd.grad(ce_1, _trainable(phi))
    # the adapted model's gradient differs from θ's: a test that uses g_0 twice would fail
    assert sum(float((a - b).norm()) for a, b in zip(g_0, g_1, strict=True)) > 1e-3
    grads = [good * r - bad / 2 * (a + b) for r, a, b in zip(g_r, g_0, g_1, strict=True)]
    return grads, float((good * ce_r - bad / 2 * (ce_0 + ce_1)).detach())


# ---------------------------------------------------------------------------------------------
# The first-order gradient, by hand in float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_the_surrogate_gives_exactly_the_first_order_maml_gradient(lora: bool) -> None:
    task, model = _task(), _model(torch.float64)
    work = copy.deepcopy(model)
    work.train()
    if lora:  # θ = the adapters: the attacker and the surrogate must act on them alone
        pytest.importorskip("peft")
        from immunekit.attacks.lm_sft import lora_wrap

        lora_wrap(work, rank=2, alpha=4.0, seed=0)
        with torch.no_grad():  # B = 0 at init would make every adapter gradient but B's vanish
            for name, p in work.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    d = LmMLAC(inner_steps=1, inner_lr=3e-2, inner_batch=2, bad_weight=0.7, retain_weight=0.4)
    context = d.prepare(work, task, 7)
    with torch.no_grad():  # θ moves after the scratch copy is made, as after every outer step
        for p in _trainable(work):
            p.mul_(1.05)
    idx = torch.tensor([4, 1])
    loss, terms, used = d.loss(work, context, idx)
    loss.backward()
    got = [p.grad for p in _trainable(work)]
    names = [n for n, p in work.named_parameters() if p.requires_grad]
    assert all(g is not None for g in got) and all(("lora_" in n) == lora for n in names)
    (inner,) = terms["inner_rows"]
    assert len(inner) == 2 and not set(inner) & {4, 1}  # drawn outside the outer batch
    want, value = _fomaml(work, task, idx, inner, _retain_rows(task, 2, 7), eta=3e-2, good=0.4, bad=0.7)
    scale = max(float(w.abs().max()) for w in want)
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) <= 1e-10 * scale
    assert float(loss.detach()) == pytest.approx(value, rel=1e-12)  # the surrogate's value is the loss L
    assert terms["ce_harmful_mean"] == pytest.approx(sum(terms["ce_harmful"]) / 2, rel=1e-12)
    assert len(terms["inner_grad_norm"]) == 1 and terms["capped"] is False and used > 0


def test_fit_applies_that_gradient_and_records_the_terms() -> None:
    task, model = _task(), _model(torch.float64)
    d = DEFENSES.get("lm_mlac")(
        inner_steps=1, inner_lr=3e-2, bad_weight=0.7, retain_weight=0.4, max_steps=1, lr=1e-3
    )
    d.fit(model, task, seed=3)
    (first,) = d.history_
    idx = _first_batch(len(task.harmful), 2, 3)
    (inner,) = first["inner_rows"]
    work = copy.deepcopy(model)
    want, value = _fomaml(work, task, idx, inner, _retain_rows(task, 2, 3), eta=3e-2, good=0.4, bad=0.7)
    norm = math.sqrt(sum(float((w * w).sum()) for w in want))
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-10)  # before clipping: the whole gradient
    assert first["loss"] == pytest.approx(value, rel=1e-12)
    x, y = task.harmful.rows(idx)
    with torch.no_grad():
        assert first["ce_harmful"][0] == pytest.approx(float(_ce(model, x, y)), rel=1e-12)
        xr, yr = task.primary.rows(_retain_rows(task, 2, 3))
        assert first["ce_retain"] == pytest.approx(float(_ce(model, xr, yr)), rel=1e-12)
    assert first["ce_harmful_last"] == first["ce_harmful"][-1]


def test_inner_batches_are_seeded_and_avoid_the_outer_batch_unless_it_covers_the_split() -> None:
    task, model = _task(), _model()
    runs = [DEFENSES.get("lm_mlac")(inner_steps=3, inner_batch=3, max_steps=2) for _ in range(3)]
    for d, seed in zip(runs, (0, 0, 1), strict=True):
        d.fit(model, task, seed=seed)
    rows = [[h["inner_rows"] for h in d.history_] for d in runs]
    assert rows[0] == rows[1] and rows[0] != rows[2]
    outer = set(_first_batch(6, 2, 0).tolist())
    assert all(len(r) == 3 and not set(r) & outer for r in rows[0][0])
    small = dataclasses.replace(task, harmful=_split("h", 2))  # the outer batch is every row
    d = DEFENSES.get("lm_mlac")(inner_batch=3, max_steps=1)
    d.fit(model, small, seed=0)
    assert all(sorted(r) == [0, 1] for r in d.history_[0]["inner_rows"])


# ---------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------


def _mean_answer_ce(model: CausalLM, split: TokenSplit) -> float:
    with torch.no_grad():
        total, count = answer_loss(model, *split.rows(torch.arange(len(split))))
    return float(total) / count


def _attacked(model: CausalLM, task: Task, steps: int, lr: float) -> CausalLM:
    """Full fine-tuning with Adam on the attack split's answers (the harmful template)."""
    m = copy.deepcopy(model)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    x, y = task.attack.rows(torch.arange(len(task.attack)))
    for _ in range(steps):
        opt.zero_grad()
        total, count = answer_loss(m, x, y)
        (total / count).backward()
        opt.step()
    return m


def test_after_the_same_attack_the_defended_model_keeps_a_higher_harmful_loss() -> None:
    # measured (undefended, defended) harmful CE after the attack: 2 steps at 1e-2 (5.12, 7.01),
    # 20 steps at 1e-3 (5.00, 6.95); the retain CE fell from 5.56 to 2.81 (the benign template is learnt)
    task, model = _task(), _model()
    d = DEFENSES.get("lm_mlac")(lr=1e-2, epochs=10, inner_lr=1e-2, inner_steps=2)
    out = d.fit(model, task, seed=0)
    for steps, lr in ((2, 1e-2), (20, 1e-3)):
        base = _mean_answer_ce(_attacked(model, task, steps, lr), task.harmful)
        defended = _mean_answer_ce(_attacked(out, task, steps, lr), task.harmful)
        assert defended > base + 1.0, (steps, lr, base, defended)
    assert _mean_answer_ce(out, task.primary) < _mean_answer_ce(model, task.primary)  # no blow-up
    assert d.history_[-1]["ce_harmful_mean"] > d.history_[0]["ce_harmful_mean"] + 1.0


def test_fit_keeps_its_input_is_seeded_and_records_every_step() -> None:
    task, model = _task(), _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = DEFENSES.get("lm_mlac")(epochs=2, lr=1e-3)
    out = d.fit(model, task, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again = DEFENSES.get("lm_mlac")(epochs=2, lr=1e-3).fit(model, task, seed=0)
    other = DEFENSES.get("lm_mlac")(epochs=2, lr=1e-3).fit(model, task, seed=1)
    same, diff = out.state_dict(), other.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in again.state_dict().items())
    assert any(not torch.equal(v, diff[k]) for k, v in same.items())
    assert len(d.history_) == d.info_["steps"] == 6 and [h["step"] for h in d.history_] == list(range(1, 7))
    assert d.info_["inner_steps"] == 2 and d.info_["capped_steps"] == 0
    assert d.info_["tokens"] == sum(h["tokens"] for h in d.history_) > 0
    assert all(len(h["ce_harmful"]) == 3 and len(h["inner_grad_norm"]) == 2 for h in d.history_)


def test_the_harmful_cap_drops_the_harmful_term_once_exceeded() -> None:
    task, model = _task(), _model()
    capped = DEFENSES.get("lm_mlac")(harmful_cap=1e-6, epochs=1, retain_weight=0.5)
    capped.fit(model, task, seed=0)
    assert [h["capped"] for h in capped.history_] == [True] * 3 and capped.info_["capped_steps"] == 3
    assert all(h["loss"] == pytest.approx(0.5 * h["ce_retain"], rel=1e-6) for h in capped.history_)
    free = DEFENSES.get("lm_mlac")(harmful_cap=1e3, epochs=1)
    free.fit(model, task, seed=0)
    assert not any(h["capped"] for h in free.history_)


def test_under_bf16_the_attacker_sees_its_own_updates() -> None:
    # autocast caches bf16 weights until the outer step ends; a cached φ_0 would hide the inner steps
    # (measured: stale cache 5.39 / 5.36 against fp32 4.98 / 4.07; fresh casts 5.01 / 4.12)
    task, model = _task(), _model()
    runs = {}
    for precision in ("fp32", "bf16"):
        d = DEFENSES.get("lm_mlac")(precision=precision, inner_lr=1e-1, max_steps=2)
        d.fit(model, task, seed=0)
        runs[precision] = [ce for h in d.history_ for ce in h["ce_harmful"]]
    assert runs["fp32"][2] < runs["fp32"][0] - 1.0  # the attack moves the loss a lot
    assert runs["bf16"] == pytest.approx(runs["fp32"], abs=0.15)


def test_bf16_and_lora_run_and_lora_moves_only_the_adapted_layers() -> None:
    pytest.importorskip("peft")
    from immunekit.attacks.lm_sft import LORA_TARGETS

    task, model = _task(), _model()
    d = DEFENSES.get("lm_mlac")(lora=True, lora_rank=2, precision="bf16", max_steps=2, lr=1e-2)
    out = d.fit(model, task, seed=0)
    before, after = dict(model.named_parameters()), dict(out.named_parameters())
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.split(".")[-2] in LORA_TARGETS for k in moved)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in d.history_)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("bad_weight", 0.0, "bad_weight must be > 0, got 0.0; λ_bad = 0 is plain retain training"),
        ("bad_weight", -1.0, "bad_weight must be > 0, got -1.0"),
        ("inner_steps", 0, "inner_steps=0 is invalid; use an integer >= 1"),
        ("inner_batch", 0, "inner_batch=0 is invalid"),
        ("inner_lr", 0.0, "inner_lr must be > 0, got 0.0; .* e.g. 1e-4"),
        ("inner_lr", -1e-3, "inner_lr must be > 0"),
        ("inner_lr", math.nan, "inner_lr must be > 0"),
        ("retain_weight", -1.0, "retain_weight must be >= 0, got -1.0"),
        ("harmful_cap", 0.0, "harmful_cap must be > 0 or None, got 0.0"),
    ],
)
def test_bad_settings_are_clear_errors(key: str, value: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DEFENSES.get("lm_mlac")(**{key: value})


def test_other_models_and_splits_without_answers_are_refused_before_training() -> None:
    task = _task()
    with pytest.raises(ConfigError, match="trains causal language models, got LinearModel; load one with"):
        DEFENSES.get("lm_mlac")().fit(linear_model(4), task, seed=0)
    no_answers = dataclasses.replace(task, harmful=_split("h", 3, answers=False))
    with pytest.raises(DataError, match="3 conversations without an answer"):
        DEFENSES.get("lm_mlac")().fit(_model(), no_answers, seed=0)

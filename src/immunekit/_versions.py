"""Format versions shared by the writers (experiments, metrics) and the readers (reports).

Standard library only (it imports nothing), so that ``reports``, which reads JSON and no other
immunekit layer, can name the versions it reads from the one place the writers take them from.
"""

from __future__ import annotations

#: Layout version of ``results.json`` (experiment runs and evaluation records alike).
SCHEMA_VERSION = 1

#: Version of the report card's verdict rules (:data:`immunekit.metrics.conditions.VERDICT_RULES`).
#: 1: the first harness (only attacks that broke the reference counted, diverged runs counted as
#: resistance, t* read off the evaluation grid). 2: every attack counts, degenerate runs are no
#: evidence, t* is bracketed, INVALID voids a card (issue 9).
RULES_VERSION = 2

__all__ = ["RULES_VERSION", "SCHEMA_VERSION"]

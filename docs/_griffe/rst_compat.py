"""Griffe extension for the API reference: read immunekit's reST-flavoured docstrings as Markdown.

The source docstrings follow the Google style with a few Sphinx habits that mkdocstrings would
otherwise render literally. This extension rewrites the *rendered copy* only (the source files are
untouched):

* ``Example:`` section titles become ``Examples:`` (griffe's name for the examples section), so
  doctests render as code instead of an admonition whose ``>>>`` lines read as Markdown;
* Sphinx roles (``:func:`x```, ``:class:`~a.B```) become inline code (``x``, ``B``);
* a paragraph ending in ``::`` (a reST literal block) ends in ``:``, the indented block after it
  is already a Markdown code block;
* reST simple tables (``====  ====`` borders) become Markdown tables.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|mod|meth|data|attr|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::$", re.MULTILINE)
_BORDER = re.compile(r"^\s*=+(?:\s+=+)+\s*$")


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    shown = target.rsplit(".", 1)[-1] if match.group(0).split("`", 1)[1].startswith("~") else target
    return f"`{shown}`"


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = []
    for i, (start, end) in enumerate(spans):
        stop = len(line) if i == len(spans) - 1 else end
        cells.append(line[start:stop].strip().replace("|", "\\|"))
    return cells


def _tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not _BORDER.match(line):
            out.append(line)
            i += 1
            continue
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", line)]
        rows: list[list[str]] = []
        header: list[str] | None = None
        i += 1
        while i < len(lines):
            if _BORDER.match(lines[i]):
                i += 1
                if header is None:
                    header = rows.pop() if rows else []
                    continue
                break
            if lines[i].strip():
                rows.append(_cells(lines[i], spans))
            i += 1
        head = header or [""] * len(spans)
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(spans))
        out.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(out)


def rewrite(text: str) -> str:
    """Apply every rewrite of this module to one docstring."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _ROLE.sub(_role, text)
    text = _LITERAL.sub(r"\1:", text)
    return _tables(text) if "==" in text else text


class RstCompat(griffe.Extension):
    """Rewrite each docstring once, when its object is created."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

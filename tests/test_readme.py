"""The README a newcomer reads: short, exactly two Quick-start commands, and a Python example that runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_readme_is_short_with_two_one_line_quick_start_commands() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) < 150
    blocks = re.findall(r"```[a-z]*\n(.*?)```", _section("Quick start"), flags=re.S)
    assert len(blocks) == 2 and all(b.count("\n") == 1 for b in blocks)
    assert "immunekit run" in blocks[0] and "pytest" in blocks[1] and "mkdocs build --strict" in blocks[1]


def test_the_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", _section("In Python"), flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] in ("IMMUNIZED", "NOT IMMUNIZED", "INCONCLUSIVE", "INVALID")
    assert (tmp_path / "runs" / "demo" / "report.html").exists()

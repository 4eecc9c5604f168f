"""The how-to pages' Python examples run as written (in page order, sharing one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("page", ["how-to/deep-backbones.md"])
def test_the_python_blocks_of_a_page_run(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{page} has no Python example"
    namespace: dict[str, object] = {"__name__": "docs_example"}
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the example's initialisation; the global RNG is restored afterwards
        for i, code in enumerate(blocks):
            exec(compile(code, f"{page}[{i}]", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "['extractor.0', 'extractor.1', 'extractor.2']"
    ratios = [float(v) for v in printed[1].split()]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert all(r == r for r in ratios)  # numbers, not nan
    before = dict(namespace["model"].state_dict())  # type: ignore[attr-defined]
    after = namespace["immunized"].state_dict()  # type: ignore[attr-defined]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # blocks=1: only the last block and the head move
    assert changed and all(k.startswith(("extractor.2", "head")) for k in changed)


def test_the_language_model_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    text = (DOCS / "how-to/llm-attacks.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict[str, object] = {"__name__": "docs_example"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"llm-attacks.md[{i}]", "exec"), namespace)
    rate = float(capsys.readouterr().out.split()[-1])
    assert 0.0 <= rate <= 1.0
    assert namespace["tuned"].info["steps"] == 2  # type: ignore[attr-defined]  # 2 epochs × 1 batch of 2


def test_the_differentiate_through_an_attack_example_runs() -> None:
    text = (DOCS / "how-to/attack-a-model.md").read_text(encoding="utf-8")
    section = text.split("## Differentiate through an attack", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(code, "attack-a-model.md[unroll]", "exec"), namespace)
    grad, w0 = namespace["grad"], namespace["w0"]
    assert isinstance(grad, torch.Tensor) and grad.shape == w0.shape  # type: ignore[attr-defined]
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    # the record of the unrolled attack is the one __call__ writes: three steps, evaluated at the end
    result = namespace["result"]
    assert [r.step for r in result.records] == [1, 2, 3]  # type: ignore[attr-defined]

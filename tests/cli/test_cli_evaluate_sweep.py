"""``immunekit evaluate --workers/--executor/--ray-address/--threads``: checked first, resumable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from immunekit.cli.main import main
from immunekit.models import linear_model, save_checkpoint

TASK_META = {"task": "gaussian_spectra", "task_config": {"dim": 5, "n": 64}}
# evaluated at every step: no grid refinement, so the pool starts once
ARGS = ("--attacks", "linear_probe,closed_form_probe", "--budget", "steps=8", "--budget", "eval_every=1")
ARGS += ("--seeds", "0,1", "--no-report", "--no-progress")


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """``evaluate`` sets this process's torch threads (--threads); give the next test its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    m = linear_model(5)
    with torch.no_grad():
        m.extractor.weight.copy_(torch.diag(torch.logspace(0, -2, 5, dtype=torch.float64)))
    return save_checkpoint(m, tmp_path / "m.safetensors", metadata=TASK_META)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_the_sweep_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--workers", "--executor", "--ray-address", "--threads", "DIR/trials", "{local,ray}"):
        assert flag in text


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--workers", "0"], "workers must be an integer >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--ray-address", "10.0.0.5:6379"], "needs the 'ray' executor; use --executor ray"),
    ],
)
def test_bad_sweep_options_exit_2_before_any_work(capsys, ckpt: Path, extra: list[str], match: str) -> None:
    out = ckpt.parent / "o"
    code, _, err = run(capsys, "--model", str(ckpt), *ARGS, "--out", str(out), *extra)
    assert code == 2 and match in err and err.count("\n") == 1
    assert not out.exists()


def test_a_pool_run_resumes_in_one_process_with_the_same_numbers(capsys, ckpt: Path) -> None:
    out = ckpt.parent / "eval"
    code, first_text, err = run(capsys, "--model", str(ckpt), *ARGS, "--out", str(out), "--workers", "2")
    assert code == 0, err
    first = json.loads((out / "results.json").read_text())
    assert first["trials"]["workers"] == 2 and first["trials"]["reused"] == 0
    files = sorted((out / "trials").rglob("*.json"))
    assert len(files) == first["trials"]["count"] == 5 * 2 * 2 + 1  # 5 settings × 2 seeds × 2 models + κ
    lost = out / first["attacks"]["linear_probe"]["trials"] / "reference--seed1.json"
    lost.unlink()  # as if the run had been interrupted before this trial finished
    stamps = {p: p.stat().st_mtime_ns for p in files if p != lost}
    code, text, err = run(capsys, "--model", str(ckpt), *ARGS, "--out", str(out), "--workers", "1")
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())
    assert again["trials"]["reused"] == again["trials"]["count"] - 1 and lost.is_file()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # kept records are read, not rewritten
    for part in ("attacks", "conditions", "per_attack", "gates", "verdict", "kappa"):
        if part == "attacks":
            for e in [*first["attacks"].values(), *again["attacks"].values()]:
                e.pop("seconds")
        assert again[part] == first[part], part
    assert text == first_text  # the printed verdict and conditions too

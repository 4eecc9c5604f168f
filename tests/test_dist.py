"""Data parallelism (immunekit._dist): 2 CPU processes under torchrun give the one-process gradient."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from immunekit._dist import DataParallel
from immunekit.errors import ConfigError

pytest.importorskip("accelerate")

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    from immunekit._dist import DataParallel

    def objective(dp, x, y, net, head):
        phi = net(x)                                     # (B/W, D) local rows
        task = torch.nn.functional.cross_entropy(head(phi), y)
        full = dp.gather(phi)                            # (B, D) every rank's rows, global order
        s = torch.linalg.svdvals(full) ** 2
        spectral = (s[0] / s[-1]).log()                  # a term that is not a sum over rows
        return task, spectral, full

    torch.manual_seed(0)                                 # test script: the same data on every rank
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    net = torch.nn.Sequential(torch.nn.Linear(5, 4, dtype=torch.float64), torch.nn.Tanh())
    head = torch.nn.Linear(4, 3, dtype=torch.float64)
    dp = DataParallel()
    idx = dp.shard(torch.arange(8))
    task, spectral, full = objective(dp, x[idx], y[idx], net, head)
    params = list(net.parameters()) + list(head.parameters())
    g_task = dp.global_gradient(torch.autograd.grad(task, params, retain_graph=True), gathered=False)
    g_spec = torch.autograd.grad(spectral, params, retain_graph=True, allow_unused=True)  # head: None
    g_spec = dp.global_gradient(g_spec, gathered=True)
    (task + dp.scale_gathered(spectral)).backward()
    dp.average_gradients(params)
    labels = dp.gather(y[idx])                           # integer rows gather too (no gradient)
    task_mean = dp.all_same(float(task))                 # a collective: every rank calls it
    if dp.is_main:
        out = {f"g{i}": p.grad.contiguous() for i, p in enumerate(params)}
        out.update({f"task{i}": g.contiguous() for i, g in enumerate(g_task)})
        out.update({f"spec{i}": g.contiguous() for i, g in enumerate(g_spec) if g is not None})
        out["features"] = full.detach().contiguous()
        out["labels"] = labels.contiguous()
        out["task_mean"] = torch.tensor([task_mean], dtype=torch.float64)
        out["world"] = torch.tensor([dp.world_size])
        save_file(out, sys.argv[1])
    """
)


def _torchrun(tmp_path: Path, nproc: int) -> dict[str, torch.Tensor]:
    script = tmp_path / "dp_step.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"grads{nproc}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(  # --standalone: a local rendezvous on a free port (--master_port 0 hangs)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(script), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


def test_two_processes_give_the_one_process_gradient(tmp_path: Path) -> None:
    two = _torchrun(tmp_path, 2)
    assert int(two["world"]) == 2
    torch.manual_seed(0)  # the script's data and initialisation, on one process
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    net = torch.nn.Sequential(torch.nn.Linear(5, 4, dtype=torch.float64), torch.nn.Tanh())
    head = torch.nn.Linear(4, 3, dtype=torch.float64)
    phi = net(x)
    s = torch.linalg.svdvals(phi) ** 2
    task = torch.nn.functional.cross_entropy(head(phi), y)
    spectral = (s[0] / s[-1]).log()
    params = list(net.parameters()) + list(head.parameters())
    g_task = torch.autograd.grad(task, params, retain_graph=True)
    g_spec = torch.autograd.grad(spectral, params, retain_graph=True, allow_unused=True)
    (task + spectral).backward()
    torch.testing.assert_close(two["features"], phi.detach(), rtol=0, atol=1e-14)  # global order kept
    assert torch.equal(two["labels"], y)
    assert float(two["task_mean"]) == pytest.approx(float(task.detach()), rel=1e-12)  # mean of shard means
    for i, p in enumerate(params):
        torch.testing.assert_close(two[f"g{i}"], p.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(two[f"task{i}"], g_task[i], rtol=1e-12, atol=1e-14)  # mean over ranks
        if g_spec[i] is None:  # the head does not enter the spectral term
            assert f"spec{i}" not in two
        else:  # the sum over ranks
            torch.testing.assert_close(two[f"spec{i}"], g_spec[i], rtol=1e-12, atol=1e-14)


def test_one_process_is_a_no_op() -> None:
    dp = DataParallel()
    idx = torch.arange(6)
    t = torch.randn(6, 2, requires_grad=True)
    assert dp.world_size == 1 and dp.is_main and dp.spectral_scale == 1.0 and dp.accelerator is None
    assert dp.shard(idx) is idx and dp.gather(t) is t and dp.scale_gathered(t) is t
    grads = (t, None)
    assert all(a is b for a, b in zip(dp.global_gradient(grads, gathered=True), grads, strict=True))
    assert dp.all_same(0.1) == 0.1
    dp.check_batch(7, "the harmful batch")  # any size splits over one process


def test_one_process_ignores_the_launch_environment_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, but no process group is started
    dp = DataParallel.one_process()
    assert dp.world_size == 1 and dp.accelerator is None


def test_an_uneven_batch_is_refused_with_the_fix() -> None:
    dp = DataParallel()
    dp.world_size = 2  # as under a 2-process launch
    with pytest.raises(ConfigError, match="multiple of 2"):
        dp.check_batch(7, "the harmful batch")

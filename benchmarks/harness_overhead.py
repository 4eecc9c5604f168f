"""Harness overhead: ``evaluate()`` against a bare torch loop doing the same optimizer steps.

evaluate() with one attack (``full_finetune``, Adam), no search, the reference model included, runs
(resistance + in-domain generalization + the benign trainability recipe) × 2 models × seeds attack
runs, plus the re-runs it decides on itself: a comparison the evaluation grid leaves undecided is
run again with every step evaluated up to the undecided window (``refined_until`` in the record).
The bare loop does exactly those runs' optimizer steps, re-runs included: copy the model, Adam on
every parameter, seeded mini-batches of the same size, squared loss, no records, no evaluations. The
overhead is measured against the same loop that also runs, by hand, the held-out forward passes a
harm-vs-step curve needs (at step 0, every Δt and at the end, on the run's eval split and on
eval_primary): (t_evaluate − t_raw+evals) / t_raw+evals, i.e. step records, FLOP counting,
grad norms, statistics, κ/RIR and gates. The issue's target is ≤ 10 %. The ratio against the
bare training loop is printed too; it also charges the evaluations themselves to the harness.

Run: ``python benchmarks/harness_overhead.py`` (about a minute on one CPU core).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time

import torch

from immunekit.attacks import AttackBudget
from immunekit.data.synthetic import gaussian_spectra
from immunekit.experiments.evaluate import default_reference, evaluate
from immunekit.models import linear_model

log = logging.getLogger("harness_overhead")


def raw_loop(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    budget: AttackBudget,
    seed: int,
    evals: tuple[torch.Tensor, ...] = (),
    dense_until: int = 0,
) -> None:
    """``budget.steps`` Adam steps on all parameters of a copy of ``model``, mini-batches, MSE loss.

    With ``evals`` (held-out inputs), a forward pass over each at step 0, every ``eval_every``
    steps and at the end: the measurements a harm-vs-step curve needs, done by hand.
    """
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=budget.lr)
    gen = torch.Generator().manual_seed(seed)
    y = y.to(torch.float64).reshape(len(y), -1)

    def evaluate_by_hand() -> None:
        with torch.no_grad():
            for xe in evals:
                m(xe)

    evaluate_by_hand()
    for step in range(1, budget.steps + 1):
        idx = torch.randint(0, len(x), (budget.batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step <= dense_until or step % budget.eval_every == 0 or step == budget.steps:
            evaluate_by_hand()


def main() -> None:
    """Time both and print the overhead ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="best of this many timings of each side")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    task = gaussian_spectra(dim=args.dim, n=args.n, seed=0, evaluation_splits=True)
    model = linear_model(args.dim)
    with torch.no_grad():
        model.extractor.weight.copy_(torch.diag(torch.logspace(0, -2, args.dim, dtype=torch.float64)))
    budget = AttackBudget(
        steps=args.steps, optimizer="adam", lr=1e-2, batch_size=32, eval_every=args.eval_every
    )
    seeds = (0, 1, 2)
    reference = default_reference(model)
    splits = [task.attack, task.attack_disjoint, task.primary]  # resistance, in-domain, benign

    def run_eval() -> dict:
        return evaluate(
            model,
            task,
            attacks=["full_finetune"],
            budget=budget,
            seeds=seeds,
            benign="full_finetune",
            progress=False,
        )

    # each run's curve evaluates its own held-out split and eval_primary (utility beside harm)
    held_out = [task.eval_harmful.x, task.eval_harmful.x, task.eval_primary.x]
    rec = run_eval()  # warm-up, and which comparisons evaluate() refines
    groups = ("resistance", "in_domain", "benign")
    refined = {e["group"]: e.get("refined_until", 0) for e in rec["attacks"].values()}
    # the benign recipe is evaluated more densely (every max(1, steps // 100) steps)
    every = {e["group"]: e["budget"]["eval_every"] for e in rec["attacks"].values()}

    def run_raw(with_evals: bool = False) -> None:
        for group, data, eval_x in zip(groups, splits, held_out, strict=True):
            passes = [0] + ([refined[group]] if refined.get(group) else [])
            for dense_until in passes:
                for seed in seeds:
                    for m in (model, reference):
                        evals = (eval_x, task.eval_primary.x) if with_evals else ()
                        b = dataclasses.replace(budget, eval_every=every[group])
                        raw_loop(m, data.x, data.y, b, seed, evals, dense_until)

    run_raw()  # warm-up (allocator, lazy imports)
    t_raw = min(_timed(run_raw) for _ in range(args.repeats))
    t_raw_eval = min(_timed(lambda: run_raw(with_evals=True)) for _ in range(args.repeats))
    t_eval = min(_timed(run_eval) for _ in range(args.repeats))
    reruns = sum(bool(refined.get(g)) for g in groups) * len(seeds) * 2
    runs = len(splits) * len(seeds) * 2 + reruns
    overhead = (t_eval - t_raw_eval) / t_raw_eval
    print(
        f"runs: {runs} × {args.steps} Adam steps (batch 32; {reruns} of them evaluate()'s refinement "
        f"re-runs, windows {refined}), D = {args.dim}, N = {args.n}, Δt = {args.eval_every}"
    )
    print(f"raw torch loop:   {t_raw:8.3f} s  (training steps only)")
    print(f"  + held-out evals: {t_raw_eval:6.3f} s  (the same forward passes the harm curves need)")
    print(f"vs training only: {(t_eval - t_raw) / t_raw:8.1%}  (includes the curves' evaluations)")
    print(f"evaluate():       {t_eval:8.3f} s  (attacks {rec['timing']['attack_seconds']:.3f} s, "
          f"measurements {rec['timing']['measure_seconds']:.3f} s in the warm-up run)")  # fmt: skip
    print(
        f"overhead:         {overhead:8.1%}  vs the loop with its evaluations "
        f"(target <= 10 %: {'met' if overhead <= 0.10 else 'NOT met'})"
    )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

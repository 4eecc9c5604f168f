"""Wall time of the MNIST digit-pair sweep (issue 3 target: 90 pairs × 5 methods in ≤ 15 min on 2 cores).

Runs ``immunekit run mnist-pairs`` through the library (the same trials, files and resume logic)
into ``--out`` and prints:

* the wall time of this run, and trials per minute;
* per method: mean seconds per trial split into defense (the immunization fit), measure (κ, RIR,
  closed-form probes) and attack (GD exact line search and Adam on both tasks);
* the projected wall time of the whole 90-pair × 5-method sweep on ``--workers`` cores from
  those means (the projection assumes perfect packing of trials onto workers);
* the ratio of that projection to the 15-minute target (and this run's wall time against it);
* the defense's split into covariance (factor SVDs: the rank rule), spectra (certified iterative
  solves, incl. fall-backs) and update (directions, projections, steps) — recorded by the
  ``lanczos`` path only; the solver's counters (solves, iterations, fall-backs); the peak RSS
  of the worker processes.

A cold start means an empty ``--out`` (trials already on disk are reused, not re-timed, and only
their recorded seconds enter the means). For the split of one Algorithm-1 fit into covariance,
eigendecompositions, κ, safeguard and update, run ``benchmarks/mnist_speed.py --mnist``.

Usage:
    python benchmarks/mnist_sweep.py [--pairs all] [--methods condition_number] [--workers 2]
        [--protocol reference] [--out /tmp/immunekit-mnist-sweep] [--solver dense|lanczos]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

from immunekit.config import read_yaml
from immunekit.experiments import linear

CONFIG = Path(linear.__file__).parent / "configs" / "mnist_pairs.yaml"
TARGET_SECONDS = 15 * 60
PARTS = ("defense_seconds", "measure_seconds", "attack_seconds")
SPLIT = ("covariance", "spectra", "update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="all")
    parser.add_argument("--methods", default="condition_number", help="comma list, or 'all'")
    parser.add_argument("--protocol", default="reference", choices=("reference", "one_vs_rest"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/immunekit-mnist-sweep")
    parser.add_argument("--solver", default=None, choices=("dense", "lanczos"), help="default: the config's")
    args = parser.parse_args()

    data = read_yaml(CONFIG)
    data["pairs"] = args.pairs
    data["task_config"] = {**data.get("task_config", {}), "protocol": args.protocol}
    if args.methods != "all":
        keep = set(args.methods.split(","))
        data["methods"] = [m for m in data["methods"] if (m if isinstance(m, str) else m["key"]) in keep]
    if args.solver:
        data["spectral"] = {"solver": args.solver}
    cfg = linear.build_config(data)
    n_methods_all = len(read_yaml(CONFIG)["methods"])

    start = time.perf_counter()
    linear.run_linear_experiment(cfg, args.out, executor="local", workers=args.workers, progress=True)
    wall = time.perf_counter() - start

    per_method: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    peaks: list[float] = []
    solver_calls = solver_iters = solver_fallbacks = 0
    for path in Path(args.out, "trials").rglob("*.json"):
        record = json.loads(path.read_text())
        for part in PARTS:
            value = record["metrics"].get(part)
            if value is not None:
                per_method[record["method"]][part].append(float(value))
        timing = record.get("defense_info", {}).get("timing", {})
        for part in SPLIT:
            per_method[record["method"]][part].append(float(timing.get(part, 0.0)))
        stats = record.get("defense_info", {}).get("spectral_stats")
        if stats:
            solver_calls += stats["calls"]
            solver_iters += stats["iterations"]
            solver_fallbacks += stats["fallbacks"]
        peak = record.get("resources", {}).get("peak_rss_mb")
        if peak is not None:
            peaks.append(float(peak))
    n_trials = sum(len(v["defense_seconds"]) for v in per_method.values())
    print(f"this run: {wall:.1f} s wall for {n_trials} trials on disk ({args.workers} workers)")
    print(f"spectral solver: {cfg.spectral.solver}; cores may be shared with other jobs (see uptime)")
    print(
        f"{'method':18s} {'trials':>6s} {'defense':>9s} {'(cov':>9s} {'spectra':>9s} {'update)':>9s} "
        f"{'measure':>9s} {'attack':>9s} {'total':>9s}"
    )
    per_trial = {}
    for method, parts in sorted(per_method.items()):
        means = {p: mean(parts[p]) if parts[p] else 0.0 for p in (*PARTS, *SPLIT)}
        per_trial[method] = sum(means[p] for p in PARTS)
        cols = ("defense_seconds", *SPLIT, "measure_seconds", "attack_seconds")
        print(
            f"{method:18s} {len(parts['defense_seconds']):6d} "
            + " ".join(f"{means[p]:8.2f}s" for p in cols)
            + f" {per_trial[method]:8.2f}s"
        )
    if solver_calls:
        print(
            f"iterative spectra: {solver_calls} certified solves, {solver_iters} Lanczos iterations, "
            f"{solver_fallbacks} dense fall-backs"
        )
    if peaks:
        print(f"peak memory per worker: {max(peaks):.0f} MB (max over trials of the worker's RSS peak)")
    print(f"wall time of this run vs the 15-min target: {wall / TARGET_SECONDS:.2f}×")
    if per_trial:
        cpu_per_pair = sum(per_trial.values())
        measured = len(per_trial)
        projected = 90 * cpu_per_pair / args.workers
        print(
            f"projected 90-pair sweep of the {measured} method(s) measured: {projected / 60:.1f} min on "
            f"{args.workers} cores ({projected / TARGET_SECONDS:.2f}× the 15-min target"
            + (")" if measured == n_methods_all else f"; the target covers all {n_methods_all} methods)")
        )


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    main()

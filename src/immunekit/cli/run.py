"""``immunekit run EXPERIMENT``: run an experiment end to end and write results + report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from immunekit._atomic import writable_dir_problem
from immunekit.cli._sweep_options import add_sweep_options, set_threads, sweep_options
from immunekit.config import deep_merge, parse_set, read_yaml
from immunekit.errors import ConfigError
from immunekit.experiments.device import DEVICES_HELP

EXAMPLES = """\
examples:
  immunekit run house-prices                          # pinned Ames data, 5 methods, seeds 1,2,3
  immunekit run house-prices --csv train.csv          # Kaggle's file: the paper's exact protocol
  immunekit run house-prices --seeds 0,1 --out runs/hp --set defenses.condition_number.steps=50
  immunekit run house-prices --config my.yaml         # a YAML diff over the packaged defaults
  immunekit run mnist-pairs --pairs 0-1,3-8 --protocol reference   # digit pairs (Table 2, Fig. 2)
  immunekit run mnist-pairs --workers 2               # a pool of 2 processes (default: all usable cores)
  immunekit run mnist-pairs --executor ray --ray-address 10.0.0.5:6379   # on a Ray cluster
  immunekit run deep-vision --backbone resnet         # MNIST kept, Fashion-MNIST blocked (Table 3)
  immunekit config show house-prices --set epsilon=0.05   # the resolved config, as YAML
  (interrupted? rerun the same command: finished trials under DIR/trials are kept, not recomputed)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``run``."""
    p = sub.add_parser(
        "run",
        help="run an experiment (immunize, attack, measure, report)",
        description=(
            "Run every method over every seed, write DIR/results.json, per-trial records under "
            "DIR/trials (an interrupted run resumes) and DIR/report.md with PNG plots."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", help="experiment name, e.g. house-prices (see 'immunekit ls experiments')")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3")
    p.add_argument("--methods", help="comma-separated method keys (default: all in the config)")
    p.add_argument("--out", type=Path, help="results directory (default: results/<experiment>)")
    p.add_argument("--config", type=Path, help="YAML file merged over the packaged defaults")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable), e.g. --set epsilon=0.05 or --set "
        "defenses.condition_number.steps=50 (one method's defense setting); see the resolved config and "
        "its keys with 'immunekit config show EXPERIMENT'",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help=f"{DEVICES_HELP} (default auto: CUDA when available, else cpu); the linear experiments run "
        "in float64 on the CPU only, so auto gives cpu and an accelerator is refused with the reason; "
        "recorded in results.json (provenance.device)",
    )
    add_sweep_options(p)
    p.add_argument(
        "--save-models",
        action="store_true",
        help="also write each immunized model to DIR/models/ as a safetensors checkpoint (local executor), "
        "ready for 'immunekit evaluate --model PATH'",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    _add_experiment_options(p)
    p.set_defaults(handler=handle)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_experiment_options(p: argparse.ArgumentParser) -> None:
    """One argument group per registered experiment with its own options (:data:`OPTIONS`)."""
    from immunekit.experiments.registry import OPTIONS

    seen: set[str] = set()
    for name, options in OPTIONS.items():
        fresh = [o for o in options if o.flag not in seen]
        if not fresh:
            continue
        group = p.add_argument_group(f"{name.replace('_', '-')} options")
        for o in fresh:
            if o.const is not None:
                group.add_argument(
                    o.flag, dest=_dest(o.flag), action="store_const", const=o.const, help=o.help
                )
            else:
                group.add_argument(o.flag, dest=_dest(o.flag), metavar=o.metavar, help=o.help)
            seen.add(o.flag)


def experiments_with(flag: str) -> list[str]:
    """The registered experiments (dashed names) that have the option ``flag``."""
    from immunekit.experiments.registry import OPTIONS

    return [n.replace("_", "-") for n, opts in OPTIONS.items() if any(o.flag == flag for o in opts)]


def _experiment_flags(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The experiment options given on the command line, as a nested config mapping.

    Raises:
        ConfigError: a flag of another experiment (naming the experiments that have it), or a
            value its converter refuses.

    """
    from immunekit.experiments.registry import OPTIONS

    key = name.replace("-", "_")
    own = {o.flag: o for o in OPTIONS.get(key, ())}
    flags: dict[str, Any] = {}
    for flag in dict.fromkeys(o.flag for opts in OPTIONS.values() for o in opts):
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        if flag not in own:
            owners = experiments_with(flag)
            raise ConfigError(
                f"{flag} applies to {', '.join(owners)}, not {key.replace('_', '-')}; drop {flag} or run "
                f"{' / '.join(owners)}"
            )
        converted = value if own[flag].const is not None else own[flag].convert(value)
        flags = deep_merge(flags, _nested(own[flag].path, converted))
    return flags


def _nested(path: str, value: Any) -> dict[str, Any]:
    """``"a.b", v`` → ``{"a": {"b": v}}``."""
    out: dict[str, Any] = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def resolve_experiment(
    experiment: str, config_file: Path | None = None, sets: list[str] | None = None
) -> dict[str, Any]:
    """Packaged defaults of ``experiment`` < ``config_file`` < ``--set`` (each applied only when given).

    The mapping may hold a ``defenses`` section (per-method defense settings), which
    experiment's ``build_config`` merges into the methods.
    """
    return resolve(
        argparse.Namespace(
            experiment=experiment,
            config=config_file,
            sets=list(sets or []),
            seeds=None,
            methods=None,
        )
    )


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Merge packaged defaults < --config file < flags < --set (each applied only when given).

    Raises:
        ConfigError: an unknown experiment, an unreadable or malformed --config, a flag the
            experiment does not have, a missing --csv file, malformed --seeds or --methods, a
            malformed --set.

    """
    from immunekit.experiments import default_config_path

    data = read_yaml(default_config_path(args.experiment))
    if args.config is not None:
        data = deep_merge(data, read_yaml(args.config))
    overrides = parse_set(args.sets)
    flags = _experiment_flags(args, args.experiment)
    if args.seeds is not None:
        flags["seeds"] = _seed_list(args.seeds)
    if args.methods is not None:
        flags["methods"] = _select_methods(args.methods, data.get("methods", []))
    data = deep_merge(data, flags)
    return deep_merge(data, overrides)


def _select_methods(text: str, configured: Any) -> list[Any]:
    """``--methods a,b``: the configured entries of those keys (or bare registry names), in that order."""
    from immunekit.defenses import DEFENSES
    from immunekit.registry import did_you_mean

    wanted = [m.strip() for m in text.split(",") if m.strip()]
    known: dict[str, Any] = {}
    for m in configured if isinstance(configured, list) else []:
        key = m if isinstance(m, str) else m.get("key") if isinstance(m, dict) else None
        if isinstance(key, str):
            known[key] = m
    if not wanted:
        raise ConfigError(
            f"--methods {text!r} selects no method; give comma-separated keys, e.g. --methods "
            f"{','.join(list(known)[:2]) or 'identity'} (configured: {', '.join(known)})"
        )
    choices = sorted(set(known) | set(DEFENSES.names()))
    for m in wanted:
        if m not in known and m not in DEFENSES:
            hint = did_you_mean(m, choices)
            hint = hint if "did you mean" in hint else ";"
            raise ConfigError(
                f"--methods: unknown method {m!r}{hint} configured methods: {', '.join(known)} "
                "(any registered defense also works, see 'immunekit ls defenses')"
            )
    return [known.get(m, m) for m in wanted]


def _seed_list(text: str) -> list[int]:
    """``--seeds 1,2,3`` as distinct integers >= 0 (the message names the flag and the bad seed)."""
    seeds = _int_list(text, "--seeds")
    if not seeds:
        raise ConfigError(f"--seeds {text!r} gives no seed; e.g. --seeds 1,2,3")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise ConfigError(
            f"--seeds {text}: seeds must be integers >= 0, got {negative[0]}; e.g. --seeds 1,2,3"
        )
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(
            f"--seeds {text}: seed {repeated[0]} is repeated; list each seed once, e.g. --seeds 1,2"
        )
    return seeds


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{flag} expects comma-separated integers, got {text!r}; e.g. {flag} 1,2,3"
        ) from None


def check_out(out: Path, what: str = "--out", fix: str = "choose another --out") -> None:
    """Refuse, before any work, a results folder that cannot be written (:func:`writable_dir_problem`).

    Raises:
        ConfigError: naming ``what`` (the option or argument), the folder, the reason and ``fix``.

    """
    problem = writable_dir_problem(out)
    if problem:
        raise ConfigError(f"{what} {str(out)!r} cannot be written: {problem}; {fix}")


def handle(args: argparse.Namespace) -> int:
    """Check every input, run the experiment, then render the report and print a summary."""
    from immunekit.experiments.registry import RunContext, get_experiment

    experiment = get_experiment(args.experiment)
    out = args.out or Path("results") / args.experiment.replace("_", "-")
    check_out(out)
    experiment.resolve_device(args.device)
    options = sweep_options(args)
    cfg = experiment.build_config(resolve(args))
    set_threads(args)
    ctx = RunContext(
        out=out, progress=not args.no_progress, save_models=args.save_models, device=args.device, **options
    )
    results = experiment.run(cfg, ctx)
    from immunekit.experiments.registry import is_writer

    if not is_writer():  # a rank > 0 of a data-parallel launch: rank 0 prints and writes the report
        return 0
    print(experiment.summary(results))
    print(f"results: {out / 'results.json'}")
    if not args.no_report:
        from immunekit.reports import write_report

        print(f"report:  {write_report(out)}")
    return 0

"""Generic sweep runner: independent trials, one atomic JSON record per trial, pluggable executors.

A sweep is a list of :class:`Trial` s. Each trial has a ``key`` (its record lives at
``<root>/<key>.json``), the sha256 of everything its result depends on, and a picklable
``payload``; a top-level *job* function turns one payload into a JSON-ready record. The runner
knows nothing about what a trial computes, so every experiment reuses it.

Guarantees:

* **Resume.** A trial whose file exists with the same config sha is loaded, never rerun; a
  killed sweep rerun with the same trials computes only what is missing.
* **No mixing.** A file written under a different config sha stops the sweep before anything
  runs (:class:`~immunekit.errors.ConfigError`): results of two configurations never share a
  directory.
* **Nothing lost or duplicated.** The *driver* writes each record atomically (temporary file +
  ``os.replace``) as soon as it arrives, one file per key, so an interruption loses only the
  trials in flight, and workers on a remote cluster need no shared filesystem.

* **Prompt Ctrl-C.** An interrupt stops a local pool at once (its workers ignore SIGINT and are
  terminated by the driver, without waiting for the trials in flight) and raises
  :class:`SweepInterrupted`, which says how many records were kept and where.

Executors live in :data:`EXECUTORS`:

* ``local`` (default): ``workers=1`` runs trials one after another in this process (easy to
  debug); ``workers>1`` uses a ``spawn`` process pool whose workers use one torch thread each.
* ``ray`` (extra ``pip install "immunekit[ray]"``): the same trials as Ray tasks (one CPU each) on
  the cluster at ``address`` (argument, else ``RAY_ADDRESS``), or on a local Ray instance with
  ``workers`` CPUs when neither is set.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> trials = [Trial(key=f"t/{i}", config_sha="s", payload=i) for i in range(3)]
    >>> records = run_sweep(trials, _example_job, root, workers=1, progress=False)
    >>> records["t/2"]["square"], sorted(p.name for p in (root / "t").iterdir())
    (4, ['0.json', '1.json', '2.json'])

"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from tqdm.auto import tqdm

from immunekit.errors import ConfigError
from immunekit.experiments.io import as_stored, atomic_write_json, read_json
from immunekit.registry import Registry

log = logging.getLogger(__name__)

SHA_FIELD = "trial_config_sha256"
"""Record field holding the trial's config sha (checked on resume)."""

RAY_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a TCP connection to a Ray cluster before calling it unreachable."""

Job = Callable[[Any], dict[str, Any]]
"""Runs one trial: ``job(payload) -> record``. Must be a module-level function (it is pickled)."""

STOP_TIMEOUT = 0.5
"""Seconds a terminated pool worker gets to exit before it is killed (on Ctrl-C)."""

_WORKER_IMPORTS: list[str] = []


def add_worker_imports(modules: Sequence[str]) -> None:
    """Modules every pool or Ray worker imports before its first trial (``immunekit --import``).

    A worker is a fresh interpreter: a defense, task or model registered by a module the driver
    imported (e.g. ``immunekit --import mypkg.models run ...``) exists there only once that module
    is imported again.
    """
    for name in modules:
        if name not in _WORKER_IMPORTS:
            _WORKER_IMPORTS.append(name)


def worker_imports() -> list[str]:
    """The modules of :func:`add_worker_imports`, in order."""
    return list(_WORKER_IMPORTS)


@contextlib.contextmanager
def importing_in_workers(modules: Sequence[str]) -> Iterator[None]:
    """:func:`add_worker_imports` for the duration of the block (one command), then the list as before."""
    before = list(_WORKER_IMPORTS)
    add_worker_imports(modules)
    try:
        yield
    finally:
        _WORKER_IMPORTS[:] = before


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; the message says how many trial records were kept, and where.

    Attributes:
        kept: trial records on disk for this sweep (finished before or during this run).
        total: trials in the sweep.
        folder: the folder holding the records.

    """

    def __init__(self, kept: int, total: int, folder: Path) -> None:
        self.kept, self.total, self.folder = kept, total, folder
        super().__init__(
            f"{kept} of {total} trials finished and are kept in {folder}; rerun the same command to resume "
            "(kept trials are not recomputed)"
        )


@dataclass(frozen=True)
class Trial:
    """One unit of work of a sweep.

    Attributes:
        key: unique relative path without suffix, e.g. ``"trials/0-1/identity--seed1"``; the
            record is written to ``<root>/<key>.json``.
        config_sha: sha256 of everything the record depends on; a file on disk with another sha
            means another configuration wrote it.
        payload: picklable argument of the job (sent to pool or Ray workers).

    """

    key: str
    config_sha: str
    payload: Any


class Executor(Protocol):
    """Runs trials and yields ``(trial, record)`` in completion order.

    Executors must not touch the results directory: the runner writes each record as it arrives.
    Setup that can fail (e.g. connecting to a cluster) happens before the first record is yielded.
    """

    def __call__(
        self, job: Job, trials: Sequence[Trial], *, workers: int, address: str | None
    ) -> Iterator[tuple[Trial, dict[str, Any]]]: ...


EXECUTORS: Registry[Executor] = Registry("executor")
"""Executors by name; ``--executor`` choices come from here."""


def default_workers() -> int:
    """The number of CPU cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_options(executor: str, workers: int | None) -> tuple[Executor, int]:
    """Validate an executor name and worker count (``None``: :func:`default_workers`).

    Raises:
        ConfigError: for an unknown executor (with a suggestion) or ``workers < 1``.

    """
    run = EXECUTORS.get(executor)
    n = default_workers() if workers is None else workers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    return run, n


def trial_file(root: str | Path, key: str) -> Path:
    """Where the record of the trial called ``key`` lives: ``<root>/<key>.json``."""
    *folders, name = PurePosixPath(key).parts
    return Path(root, *folders, name + ".json")


def _check_keys(trials: Sequence[Trial]) -> None:
    seen: set[str] = set()
    for t in trials:
        parts = PurePosixPath(t.key).parts
        if not t.key or PurePosixPath(t.key).is_absolute() or ".." in parts or "\\" in t.key:
            raise ConfigError(f"trial key {t.key!r} must be a relative path like 'trials/a--seed1'")
        if t.key in seen:
            raise ConfigError(f"trial keys must be unique; {t.key!r} repeats")
        seen.add(t.key)


def split_done(root: str | Path, trials: Sequence[Trial]) -> tuple[dict[str, dict[str, Any]], list[Trial]]:
    """Load the finished trials under ``root`` and list the others (reads only, writes nothing).

    Returns:
        ``(done, todo)``: records of finished trials by key, and the trials still to run.

    Raises:
        ConfigError: a trial file was written by a different configuration (another sha), or trial
            keys repeat.

    """
    _check_keys(trials)
    done: dict[str, dict[str, Any]] = {}
    todo: list[Trial] = []
    for t in trials:
        path = trial_file(root, t.key)
        if not path.exists():
            todo.append(t)
            continue
        record = read_json(path)
        if not isinstance(record, dict) or record.get(SHA_FIELD) != t.config_sha:
            raise ConfigError(
                f"{path} was written by a different configuration; refusing to mix results. "
                f"Use a new --out directory, or delete {Path(root)} to start over"
            )
        done[t.key] = record
    return done, todo


def run_sweep(
    trials: Sequence[Trial],
    job: Job,
    root: str | Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    desc: str = "trials",
    write: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every trial not yet finished under ``root``; return all records, in trial order.

    Args:
        trials: the sweep; keys must be unique.
        job: module-level function ``job(payload) -> record`` (a JSON-ready dict).
        root: results directory; created only when the first record is written.
        executor: a name in :data:`EXECUTORS` (``"local"`` or ``"ray"``).
        workers: ``local``: 1 = in this process, N > 1 = a pool of N processes; ``ray``: CPUs of the
            local Ray instance started when no address is given. ``None``: :func:`default_workers`.
        address: ``ray`` only: the cluster to connect to (``HOST:PORT``, ``ray://HOST:PORT`` or
            ``auto``); ``None`` falls back to ``RAY_ADDRESS``, then to a local instance.
        progress: show a progress bar with trials done / total and ETA.
        desc: progress bar label.
        write: store each new record under ``root`` (False: return the records as they would be
            stored, writing nothing; the non-writing ranks of a data-parallel run).

    Returns:
        ``{key: record}`` for every trial, each record as stored on disk (with :data:`SHA_FIELD`).

    Raises:
        ConfigError: unknown executor, ``workers < 1``, a directory written by a different
            configuration, Ray not installed or its cluster unreachable. All of these are raised
            before anything is written.
        SweepInterrupted: Ctrl-C (a :class:`KeyboardInterrupt`); the records written so far are kept
            and the message counts them.

    """
    run, n_workers = resolve_options(executor, workers)
    root = Path(root)
    done, todo = split_done(root, trials)
    if done:
        log.info("resuming: %d of %d trials already done in %s", len(done), len(trials), root)
    if todo:
        try:
            with tqdm(
                total=len(trials), initial=len(done), desc=desc, unit="trial", disable=not progress
            ) as bar:
                for trial, record in run(job, todo, workers=n_workers, address=address):
                    done[trial.key] = _save(root, trial, record, write=write)
                    bar.set_postfix_str(trial.key, refresh=False)
                    bar.update(1)
        except KeyboardInterrupt:
            kept = sum(trial_file(root, t.key).is_file() for t in trials)  # on disk, not in memory
            raise SweepInterrupted(kept, len(trials), _records_folder(root, trials)) from None
    return {t.key: done[t.key] for t in trials}


def _records_folder(root: Path, trials: Sequence[Trial]) -> Path:
    """The deepest folder holding every trial record of the sweep (e.g. ``root/trials``)."""
    parents = {str(trial_file(root, t.key).parent) for t in trials}
    return Path(os.path.commonpath(sorted(parents))) if parents else root


def _save(root: Path, trial: Trial, record: dict[str, Any], *, write: bool = True) -> dict[str, Any]:
    """Write one record atomically and return it as stored (so fresh and resumed records agree)."""
    if not isinstance(record, dict):
        raise TypeError(f"the job of trial {trial.key!r} returned {type(record).__name__}, not a dict")
    stored = {**record, SHA_FIELD: trial.config_sha}
    if not write:  # the same JSON round trip as a stored record, without the file
        return dict(as_stored(stored))
    return read_json(atomic_write_json(trial_file(root, trial.key), stored))


def _one_thread() -> None:
    """One torch thread per worker (one worker per core; no oversubscription)."""
    import torch

    torch.set_num_threads(1)


def _import_modules(modules: Sequence[str]) -> None:
    """Import the driver's ``--import`` modules in a worker (registering their components)."""
    import importlib

    for name in modules:
        importlib.import_module(name)


def _init_pool_worker(modules: Sequence[str] = ()) -> None:
    """Pool worker initializer: ignore SIGINT (the driver stops the pool), one thread, imports.

    Ctrl-C in a terminal reaches every process of the group; the workers leave it to the driver,
    which terminates them at once, so no worker prints a traceback of its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _one_thread()
    _import_modules(modules)


# ---------------------------------------------------------------------------------------------
# local
# ---------------------------------------------------------------------------------------------


@EXECUTORS.register("local")
def local_executor(
    job: Job, trials: Sequence[Trial], *, workers: int, address: str | None = None
) -> Iterator[tuple[Trial, dict[str, Any]]]:
    """In this process (``workers=1``) or in a ``spawn`` pool of ``workers`` processes.

    The pool starts processes with ``spawn`` (``fork`` with torch threads is unsafe); each worker
    uses one torch thread and imports :func:`worker_imports`. When a trial fails, trials not yet
    started are cancelled, those running are allowed to finish (their records are still written),
    then the error is raised. On Ctrl-C (or when the consumer stops early) the workers are
    terminated at once: the trials in flight are lost, the records already yielded are not.

    Raises:
        ConfigError: when an ``address`` is given (only the ``ray`` executor connects anywhere).

    """
    if address:
        raise ConfigError(f"a Ray address ({address!r}) needs the 'ray' executor; use --executor ray")
    if workers == 1:
        for trial in trials:
            yield trial, job(trial.payload)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(trials)),
        mp_context=ctx,
        initializer=_init_pool_worker,
        initargs=(worker_imports(),),
    )
    finished = False
    try:
        futures = {pool.submit(job, t.payload): t for t in trials}
        error: BaseException | None = None
        for fut in cf.as_completed(futures):
            if fut.cancelled():
                continue
            if fut.exception() is not None:
                if error is None:
                    error = fut.exception()
                    log.error("trial %s failed; cancelling the trials not started", futures[fut].key)
                    for other in futures:
                        other.cancel()
                continue
            yield futures[fut], fut.result()
        finished = True
        if error is not None:
            raise error
    finally:
        if finished:
            pool.shutdown(wait=True, cancel_futures=True)
        else:  # Ctrl-C, or the consumer stopped: do not wait for the trials in flight
            _stop_pool(pool)


def _stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers now (kill any that lingers).

    The worker table is read again after the shutdown call, so a worker the executor started while
    it was being stopped is terminated too.
    """
    known = dict(getattr(pool, "_processes", None) or {})
    pool.shutdown(wait=False, cancel_futures=True)
    known.update(getattr(pool, "_processes", None) or {})
    processes = list(known.values())
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(STOP_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_TIMEOUT)


# ---------------------------------------------------------------------------------------------
# ray
# ---------------------------------------------------------------------------------------------


def _ray_job(job: Job, payload: Any, modules: Sequence[str] = ()) -> dict[str, Any]:
    """Body of the Ray task: one torch thread, the driver's ``--import`` modules, then the job."""
    _one_thread()
    _import_modules(modules)
    return job(payload)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            'the ray executor needs Ray, which is not installed; pip install "immunekit[ray]" '
            "(or use --executor local)"
        ) from err
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast (seconds, not minutes of Ray's retries) when nothing listens at ``address``."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001); "
            "pass --ray-address or RAY_ADDRESS, or neither for a local Ray instance"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT):
            pass
    except OSError as err:
        raise ConfigError(_unreachable(address, err)) from err


def _unreachable(address: str, err: BaseException) -> str:
    return (
        f"cannot reach the Ray cluster at {address!r} ({err}); start it (ray start --head) or fix "
        "--ray-address / RAY_ADDRESS, or leave both unset to run on a local Ray instance. "
        "Nothing was written to the results directory"
    )


def _local_code_paths() -> list[str]:
    """Import paths of this process that a fresh interpreter lacks (e.g. a script's or test's folder).

    A local Ray instance runs on this machine, so its workers can import whatever the driver
    imports, e.g. a module registering a custom task whose factory a payload refers to.
    """
    installed = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths: list[str] = []
    for entry in (os.getcwd(), *sys.path):
        p = Path(entry or os.getcwd()).resolve()
        if p.is_dir() and not any(p.is_relative_to(i) for i in installed) and str(p) not in paths:
            paths.append(str(p))
    return paths


def connect_ray(address: str | None, workers: int) -> tuple[Any, bool]:
    """Connect to Ray: ``address``, else ``RAY_ADDRESS``, else a new local instance.

    A connection already open in this process (``ray.is_initialized()``) is reused as is.

    Args:
        address: ``HOST:PORT`` of a cluster's head (GCS), ``ray://HOST:PORT`` (Ray Client) or
            ``auto``; ``None`` reads ``RAY_ADDRESS``.
        workers: CPUs of the local instance started when there is no address.

    Returns:
        ``(ray module, started)``; ``started`` says this call opened the connection (and the
        caller must shut it down).

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.

    """
    ray = _import_ray()
    if ray.is_initialized():
        log.info("using the Ray connection already open in this process")
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        from ray.job_config import JobConfig

        log.info("starting a local Ray instance with %d CPUs", workers)
        ray.init(
            address="local",
            num_cpus=workers,
            include_dashboard=False,
            job_config=JobConfig(code_search_path=_local_code_paths()),
        )
        return ray, True
    _check_reachable(address)
    log.info("connecting to the Ray cluster at %s", address)
    try:
        ray.init(address=address)
    except (ConnectionError, TimeoutError) as err:
        raise ConfigError(_unreachable(address, err)) from err
    return ray, True


@EXECUTORS.register("ray")
def ray_executor(
    job: Job, trials: Sequence[Trial], *, workers: int, address: str | None = None
) -> Iterator[tuple[Trial, dict[str, Any]]]:
    """The trials as Ray tasks (one CPU, one torch thread each); records come back to the driver.

    On a remote cluster, immunekit (and any module defining a custom task or defense) must be
    installed on the nodes; a local instance imports from this process's paths. A Ray instance
    started here is shut down at the end; pending tasks are cancelled on an error or Ctrl-C.
    """
    ray, started = connect_ray(address, workers)
    pending: list[Any] = []
    try:
        remote = ray.remote(num_cpus=1)(_ray_job)
        modules = worker_imports()
        by_ref = {remote.remote(job, t.payload, modules): t for t in trials}
        pending = list(by_ref)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                yield by_ref[ref], ray.get(ref)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        if started:
            ray.shutdown()


def _example_job(payload: int) -> dict[str, Any]:
    """A toy job for the module example."""
    return {"square": payload * payload}


__all__ = [
    "EXECUTORS",
    "SHA_FIELD",
    "Executor",
    "Job",
    "SweepInterrupted",
    "Trial",
    "add_worker_imports",
    "connect_ray",
    "default_workers",
    "importing_in_workers",
    "resolve_options",
    "run_sweep",
    "split_done",
    "trial_file",
    "worker_imports",
]

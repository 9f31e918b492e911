"""Running a sweep end to end: folders, folds, MLflow runs, Ray Tune, the leaderboard; and resuming one.

A sweep named NAME lives in `<run_dir>/sweeps/NAME/` (run_dir defaults to `runs`):

    sweep.yaml        the validated sweep, as run (resume reads it back)
    state.json        MLflow store, experiment and parent run; data root; start time
    folds.json        the K-fold split (also an artifact of the sweep's run)
    tune/             Ray Tune's experiment folder: trials, checkpoints, searcher state (Tuner.restore)
    trials/<id>/      each trial's own folder: fold outputs (checkpoints, pools, overlays), MLflow spools
    pool_cache/       prototype pools by content key, shared by the sweep's trials (proto.cache_dir)
    mlflow_spool/     the spool of the sweep's own MLflow run
    stops.jsonl       why Tune stopped trials early: the scheduler (pruned) or the time budget (timeout)
    scheduler_state.json  the ASHA scheduler's records (rungs, cuts), kept as they change: resume reads them back
    ray_session.json  the local Ray instance the sweep's driver started (removed when it stops it): a resume
                      after a killed driver stops what is left of it
    leaderboard.json  written at the end of each run or resume
    report/           what the search learned (`orchestration.report`): figures, report.html, report.json;
                      made at the end of each run or resume and by `cpews sweep report NAME`, and logged to the
                      sweep's run under the artifact folder `report/`
    warm_start.json   the trials of an earlier sweep that seeded this one's search (`--warm-start`), when it was
                      warm started (`orchestration.warm_start`; a resume that starts the search again reads it)

New sweeps are named and created under a lock on `<run_dir>/sweeps/.lock` (`claim_sweep`), so two `sweep run`
started at once never share a folder, and the local MLflow store is created by one of them only.

The MLflow store is `MLFLOW_TRACKING_URI` when set, else SQLite under `<run_dir>/mlflow` (see
`orchestration.tracking.resolve_store`). The tree in MLflow: experiment = the sweep's `tracking.experiment`; a
run for the sweep; under it a run per trial; under each trial a run per fold (`mlflow.parentRunId`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from orchestration.kfold import save_folds, split_folds
from orchestration.search_space import SweepFileError, SweepSpec, validate_sweep
from orchestration.tracking import (
    RunLogger,
    ensure_experiment,
    finalize_spool,
    find_spool_dirs,
    resolve_store,
    runs_left_running,
    spool_backlog,
    write_json_atomically,
)
from orchestration.trial import (
    CV_BASELINE,
    CV_MEAN,
    CV_STD,
    FIRST_STEP_AT,
    FOLDS_COMPLETED,
    TAG_KIND,
    TAG_SWEEP,
    TIME_KEYS,
    TrialContext,
)
from orchestration.warm_start import WarmStart, load_warm_start, read_warm_start, write_warm_start

__all__ = [
    "ClaimedSweep",
    "Leaderboard",
    "SweepError",
    "SweepOutcome",
    "SweepPaths",
    "claim_sweep",
    "existing_sweep",
    "failure_lines",
    "format_leaderboard",
    "leaderboard_json",
    "leaderboard_rows",
    "load_leaderboard",
    "next_free_name",
    "ranking_rule",
    "ray_session_processes",
    "ray_session_record",
    "read_leaderboard",
    "renamed",
    "resume_sweep",
    "run_sweep",
    "stop_left_behind_ray",
    "stop_processes",
    "sweep_paths",
]

STATE_FORMAT = "cpews-sweep/1"
SWEEPS_LOCK = ".lock"  # <run_dir>/sweeps/.lock: held while a new sweep is named and created
Printer = Callable[[str], None]


class SweepError(RuntimeError):
    """A sweep cannot be started or resumed (exists already, not found, store unreachable, ...)."""


class SweepPaths(NamedTuple):
    root: Path
    spec: Path
    state: Path
    folds: Path
    tune: Path  # Ray Tune's experiment folder (storage_path = root, name = "tune")
    trials: Path
    pool_cache: Path
    parent_spool: Path
    leaderboard: Path
    stops: Path  # orchestration.tune_runner.STOPS_FILE
    scheduler_state: Path  # orchestration.tune_runner.SCHEDULER_STATE_FILE
    ray_session: Path  # the local Ray instance of the running driver (`_ray_session`)
    report: Path  # orchestration.report.REPORT_DIR: the sweep's report (figures, report.html)
    warm_start: Path  # orchestration.warm_start.WARM_START_FILE: the trials of an earlier sweep it was seeded with


class SweepOutcome(NamedTuple):
    name: str
    rows: list[dict[str, Any]]  # the leaderboard, best first
    interrupted: bool  # some trials did not finish (stopped driver): `cpews sweep resume NAME` continues
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    wall_time_s: float
    paths: SweepPaths
    pending: int = 0  # MLflow records (artifact uploads included) not delivered: `cpews sweep sync NAME`


def sweep_paths(run_dir: Path, name: str) -> SweepPaths:
    root = Path(run_dir).resolve() / "sweeps" / name
    return SweepPaths(
        root=root,
        spec=root / "sweep.yaml",
        state=root / "state.json",
        folds=root / "folds.json",
        tune=root / "tune",
        trials=root / "trials",
        pool_cache=root / "pool_cache",
        parent_spool=root / "mlflow_spool",
        leaderboard=root / "leaderboard.json",
        stops=root / "stops.jsonl",
        scheduler_state=root / "scheduler_state.json",
        ray_session=root / "ray_session.json",
        report=root / "report",
        warm_start=root / "warm_start.json",
    )


def renamed(spec: SweepSpec, name: str) -> SweepSpec:
    """`spec` named `name`; its MLflow experiment follows when it was named after the sweep."""
    data = spec.to_dict()
    data["name"] = name
    if spec.tracking.experiment == spec.name:
        data["tracking"] = {"experiment": name}
    return validate_sweep(data, source=spec.source, check_paths=False)


def existing_sweep(run_dir: Path, name: str) -> SweepPaths:
    """The folders of sweep `name` under `run_dir`.

    Raises:
        SweepError: there is no such sweep (the message lists those there are).
    """
    paths = sweep_paths(run_dir, name)
    if not paths.state.is_file():
        known = sorted(p.parent.name for p in paths.root.parent.glob("*/state.json"))
        raise SweepError(f"no sweep {name!r} in {paths.root.parent} (sweeps there: {', '.join(known) or 'none'})")
    return paths


def next_free_name(spec: SweepSpec, run_dir: Path) -> SweepSpec:
    """`spec`, renamed `<name>-2`, `<name>-3`, ... when a sweep of its name exists under `run_dir`."""
    if not sweep_paths(run_dir, spec.name).root.exists():
        return spec
    n = 2
    while sweep_paths(run_dir, f"{spec.name}-{n}").root.exists():
        n += 1
    return renamed(spec, f"{spec.name}-{n}")


@contextlib.contextmanager
def _sweeps_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock (fcntl) on `<run_dir>/sweeps/.lock` for the block; another process waits."""
    folder = Path(run_dir).resolve() / "sweeps"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise SweepError(f"--run-dir {run_dir}: cannot create {folder}: {exc.strerror}") from None
    with open(folder / SWEEPS_LOCK, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _refuse_existing(spec: SweepSpec, run_dir: Path) -> None:
    paths = sweep_paths(run_dir, spec.name)
    if paths.root.exists():
        raise SweepError(
            f"sweep {spec.name!r} exists already in {paths.root}; continue it with `cpews sweep resume "
            f"{spec.name}`, or start a new one with --name (or delete that folder)"
        )


class ClaimedSweep(NamedTuple):
    spec: SweepSpec  # renamed when its name was taken and `new_name_if_taken`
    paths: SweepPaths
    store: Any  # orchestration.tracking.LocalStore
    experiment_id: str


def claim_sweep(spec: SweepSpec, run_dir: Path, *, new_name_if_taken: bool = False,
                out: Printer = print) -> ClaimedSweep:
    """Name a new sweep, make sure of its MLflow store and experiment, and create its (empty) folder, all under
    the run folder's lock: of two processes starting a sweep of one name at once, the second gets the next free
    name (`new_name_if_taken`) or a SweepError, and the local SQLite store is created by one process only.

    Raises:
        SweepError: the name is taken (and not `new_name_if_taken`); the MLflow store cannot be used.
    """
    from mlflow.tracking import MlflowClient

    with _sweeps_lock(run_dir):
        if new_name_if_taken:
            spec = next_free_name(spec, run_dir)
        _refuse_existing(spec, run_dir)
        paths = sweep_paths(run_dir, spec.name)
        store = resolve_store(run_dir)
        out(f"MLflow store: {store.tracking_uri}"
            + (f" (artifacts {store.artifact_root})" if store.artifact_root else ""))
        try:
            experiment_id = ensure_experiment(MlflowClient(store.tracking_uri), spec.tracking.experiment,
                                              store.artifact_root)
        except Exception as exc:
            raise SweepError(f"MLflow store {store.tracking_uri} cannot be used: {type(exc).__name__}: {exc}") from exc
        paths.root.mkdir(parents=True)
    return ClaimedSweep(spec, paths, store, experiment_id)


def _code_version() -> dict[str, str]:
    """The git commit (and whether the tree is dirty) of the working directory, when it is a git checkout."""
    out: dict[str, str] = {}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        out["mlflow.source.git.commit"] = commit
        out["cpews.git_dirty"] = "true" if dirty else "false"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        out["cpews.version"] = version("cpews-sweep")
    except Exception:  # not installed as a distribution
        pass
    return out


def _sweep_params(spec: SweepSpec, warm_start: WarmStart | None = None) -> dict[str, Any]:
    """The sweep's settings as flat scalar params of its MLflow run, with the earlier sweep that seeded its
    search (`sweep.warm_start`, "none") and what it gave (`sweep.warm_start.completed`, ...)."""
    data = spec.to_dict()
    params: dict[str, Any] = {"sweep.name": spec.name, "sweep.base_config": spec.base_config}
    for section in ("search", "folds", "scheduler", "resources", "objective"):
        for key, value in data[section].items():
            params[f"sweep.{section}.{key}"] = value
    params["sweep.search.start_points"] = len(spec.search.start_points)  # the points: the sweep.yaml artifact
    params["sweep.time_budget_s"] = spec.time_budget_s if spec.time_budget_s is not None else "none"
    params["sweep.searched"] = ",".join(spec.searched_keys())
    params["sweep.warm_start"] = warm_start.sweep if warm_start is not None else "none"
    for key, count in (warm_start.counts() if warm_start is not None else {}).items():
        params[f"sweep.warm_start.{key}"] = count
    for key, value in spec.fixed.items():
        params[f"fixed.{key}"] = value
    return params


def ui_path(experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs in the "Model training" view. MLflow 3 opens in its GenAI view
    whatever the experiment's kind tag says (`EXPERIMENT_TAGS`); the `workflowType` parameter switches it."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


@contextlib.contextmanager
def _ray_session(num_cpus: int | None, spec: SweepSpec, address: str | None = None, *,
                 record: Path | None = None) -> Iterator[None]:
    """A Ray instance for the sweep: `address` or RAY_ADDRESS (join a cluster), else a fresh local one, which is
    written down in `record` (`ray_session_record`) until it is shut down, so that a resume after a killed driver
    can stop what is left of it (`stop_left_behind_ray`)."""
    import ray

    # Tune warns about forced experiment snapshots whenever trials checkpoint often (a short fold does)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's result loggers are passed explicitly (`make_tuner`): TensorBoard's would only print a hint when
    # tensorboardX is not installed
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's older output, which verbose=0 silences (the newer one prints its configuration box all the same)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # a failed trial's traceback is in its log and error.txt; its event line gives the exception
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target)
        record = None  # a cluster is not this sweep's to stop
    else:  # a fresh local instance, never a stray one found on the machine
        wanted = num_cpus or max(1, math.ceil(spec.resources.cpu * spec.search.max_concurrent))
        # Ray turns on token authentication for a new local instance and warns that it did; RAY_AUTH_MODE=token
        # would say so without the warning, but Ray reads it when imported, before this: its warning is dropped
        auth_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth_setup.level
        auth_setup.setLevel(logging.ERROR)
        try:  # what trials print goes to their log files (`orchestration.trial.cv_trial`), not to this terminal
            started = ray.init(num_cpus=wanted, num_gpus=None, include_dashboard=False, address="local",
                               log_to_driver=False, logging_level=logging.WARNING)  # Ray's warnings, no news
        finally:
            auth_setup.setLevel(level)
    try:
        if record is not None:
            write_json_atomically(record, ray_session_record(started.address_info))
        yield
    finally:
        ray.shutdown()
        if record is not None:
            record.unlink(missing_ok=True)


RAY_SESSION_FORMAT = "cpews-ray-session/1"


def _psutil() -> Any:
    """psutil, as Ray ships it (importing ray puts its bundled copy on the path)."""
    import importlib

    import ray  # noqa: F401 - first: it puts its bundled psutil on the path

    return importlib.import_module("psutil")


def ray_session_record(address_info: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a local Ray instance that this process (its driver) started: the host, the driver's pid
    and start time, Ray's session folder and GCS address, and its processes at this moment (for the record)."""
    import socket

    me = _psutil().Process()
    session_dir = str(address_info["session_dir"])
    return {
        "format": RAY_SESSION_FORMAT,
        "host": socket.gethostname(),
        "driver_pid": me.pid,
        "driver_started": me.create_time(),
        "session_dir": session_dir,
        "gcs_address": address_info.get("gcs_address"),
        "processes": [[proc.pid, _name(proc)] for proc in ray_session_processes(session_dir)],
    }


def _alive(proc: Any) -> bool:
    psutil = _psutil()
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ray_session_processes(session_dir: str) -> list[Any]:
    """The live Ray processes (psutil) of the instance whose session folder is `session_dir`: processes of Ray
    (named `ray::...`, as its agents and workers rename themselves, or run from Ray's package: raylet, GCS,
    monitors) whose command line names that folder or that hold a file open in it (their logs). Another
    instance has another session folder; this process and processes that are not Ray's are left out."""
    if not Path(session_dir).is_absolute():  # no folder named: nothing is matched
        return []
    import ray

    psutil = _psutil()
    ray_dir = str(Path(ray.__file__).parent) + os.sep
    root = str(Path(session_dir))
    inside = root + os.sep
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            command = proc.cmdline()
            if not (proc.name().startswith("ray::") or any(arg.startswith(ray_dir) for arg in command)):
                continue
            if (any(arg == root or inside in arg for arg in command)
                    or any(f.path.startswith(inside) for f in proc.open_files())):
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to look at
            continue
    return found


def _name(proc: Any) -> str:
    psutil = _psutil()
    try:
        return proc.name()
    except psutil.Error:
        return f"pid {proc.pid}"


def stop_processes(procs: Sequence[Any], timeout_s: float = 5.0) -> list[Any]:
    """SIGTERM `procs`, SIGKILL those still alive after `timeout_s`; returns the ones that outlived both."""
    psutil = _psutil()
    for signal_name in ("terminate", "kill"):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                getattr(proc, signal_name)()
        deadline = time.monotonic() + timeout_s
        while any(_alive(proc) for proc in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs = [proc for proc in procs if _alive(proc)]
        if not procs:
            break
    return list(procs)


def stop_left_behind_ray(paths: SweepPaths, out: Printer = print) -> None:
    """Stop what is left of the local Ray instance that the sweep's previous driver started (`paths.ray_session`)
    when that driver is gone (killed: it could not shut its instance down); one line says what was stopped.

    Only that instance's processes are touched (`ray_session_processes` of its session folder): not a cluster
    (no record is written for one), not another sweep's instance, nothing on another host.

    Raises:
        SweepError: that driver is still running (the sweep is not interrupted).
    """
    import socket

    try:
        record = json.loads(paths.ray_session.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("driver_pid"), int):
            raise ValueError("not a record of a Ray instance")
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        out(f"sweep {paths.root.name}: {paths.ray_session} cannot be read ({exc}); no Ray processes stopped")
        return
    name, pid = paths.root.name, record["driver_pid"]
    if record.get("host") != socket.gethostname():
        out(f"sweep {name}: its last driver ran on {record.get('host')}; its Ray instance there is not stopped "
            "from here")
        return
    psutil = _psutil()
    with contextlib.suppress(psutil.Error, TypeError):
        driver = psutil.Process(pid)
        if _alive(driver) and abs(driver.create_time() - float(record.get("driver_started"))) < 1e-3:
            raise SweepError(f"sweep {name} is running: its driver (pid {pid}) is alive; stop it (Ctrl-C or kill "
                             f"{pid}) before resuming")
    left = ray_session_processes(record.get("session_dir") or "")
    if left:
        names = ", ".join(sorted({_name(proc) for proc in left}))
        remaining = stop_processes(left)
        session = Path(record["session_dir"]).name
        out(f"sweep {name}: stopped {len(left) - len(remaining)} Ray process(es) left by its killed driver (pid "
            f"{pid}, Ray {session}): {names}" + (f"; could not stop pids {[p.pid for p in remaining]}"
                                                  if remaining else ""))
    paths.ray_session.unlink(missing_ok=True)


def _context(spec: SweepSpec, paths: SweepPaths, state: Mapping[str, Any], folds: list[list[str]],
             faults: Mapping[str, Any] | None) -> TrialContext:
    return TrialContext(
        sweep=spec.to_dict(),
        folds=folds,
        split=state["split"],
        workdir=state["workdir"],
        tracking_uri=state["tracking_uri"],
        experiment_id=state["experiment_id"],
        parent_run_id=state["parent_run_id"],
        trials_dir=str(paths.trials),
        pool_cache_dir=str(paths.pool_cache),
        **dict(faults or {}),
    )


def run_sweep(
    spec: SweepSpec,
    *,
    run_dir: Path = Path("runs"),
    out: Printer = print,
    num_cpus: int | None = None,
    address: str | None = None,
    faults: Mapping[str, Any] | None = None,
    new_name_if_taken: bool = False,
    warm_start: str | None = None,
) -> SweepOutcome:
    """Start sweep `spec` and run it to the end (or until interrupted); returns the leaderboard.

    Args:
        run_dir: the project's run folder (sweep folders, the local MLflow store, the synthetic data).
        out: where progress lines go.
        num_cpus: CPUs of a local Ray instance (default: enough for `max_concurrent` trials).
        address: a Ray cluster to join (default: RAY_ADDRESS, else a local instance).
        faults: fault injection for tests (`TrialContext.kill_at`, `crash_after_fold`).
        new_name_if_taken: when a sweep of that name exists (or another process claims the name first), run as
            the next free name (`next_free_name`) instead of refusing.
        warm_start: the name of an earlier sweep under `run_dir` whose finished trials seed the search
            (`orchestration.warm_start`).

    Raises:
        SweepError: a sweep of that name exists already (resume it or pick another name); MLflow unreachable;
            the `warm_start` sweep does not exist or scores trials another way (before anything is made).
    """
    started = time.time()
    if not new_name_if_taken:  # before the data and the backbone are made; checked again under the lock
        _refuse_existing(spec, run_dir)
    warm = load_warm_start(warm_start, spec, run_dir=run_dir) if warm_start else None
    from cpews.config import SYNTHETIC_WEIGHTS
    from cpews.training.data import resolve_data_root
    from cpews.training.pretrain import ensure_pretrained

    base_cfg = spec.base_train_config()
    split = spec.folds.split or base_cfg.data.train_split
    data_root = resolve_data_root(base_cfg)  # generates the synthetic dataset on first use
    if base_cfg.model.weights == SYNTHETIC_WEIGHTS:  # the pretrained backbone, made once before any trial starts
        ensure_pretrained(base_cfg, progress=out)
    saved = split_folds(data_root, base_cfg.data.dataset, split, spec.folds.k, spec.folds.seed)
    spec, paths, store, experiment_id = claim_sweep(spec, run_dir, new_name_if_taken=new_name_if_taken, out=out)
    try:
        paths.spec.write_text(spec.to_yaml())
        save_folds(paths.folds, saved.folds, saved.meta)
        if warm is not None:
            write_warm_start(paths.warm_start, warm)
        parent = RunLogger.start(
            store.tracking_uri, experiment_id, run_name=spec.name, spool_dir=paths.parent_spool,
            tags={TAG_KIND: "sweep", TAG_SWEEP: spec.name, "mlflow.note.content": spec.description,
                  "cpews.sweep_dir": str(paths.root), **_code_version()},
        )
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)  # nothing half-made is left behind
        raise
    with contextlib.ExitStack() as session:
        try:  # until Tune holds the sweep, a failure removes it and ends its MLflow run as failed, never RUNNING
            state = {
                "format": STATE_FORMAT,
                "name": spec.name,
                "tracking_uri": store.tracking_uri,
                "experiment_id": experiment_id,
                "parent_run_id": parent.run_id,
                "split": split,
                "workdir": os.getcwd(),
                "data_root": str(Path(data_root).resolve()),
                "created": started,
                "warm_start": {"sweep": warm.sweep, **warm.counts()} if warm is not None else None,
            }
            write_json_atomically(paths.state, state)
            parent.log_params(_sweep_params(spec, warm))
            parent.log_artifact(paths.spec)
            parent.log_artifact(paths.folds)
            if warm is not None:
                parent.log_artifact(paths.warm_start)
            if problem := _describe_experiment(store.tracking_uri, experiment_id, spec):  # what it searches
                out(problem)
            out(f"sweep {spec.name}: {spec.search.num_trials} trials x {spec.folds.k} folds, "
                f"{spec.search.max_concurrent} at a time; folder {paths.root}")
            out(f"MLflow: experiment {spec.tracking.experiment!r} (id {experiment_id}), sweep run {parent.run_id}")
            if warm is not None:
                out(warm.describe())
            context = _context(spec, paths, state, saved.folds, faults)
            from orchestration.tune_runner import make_tuner

            session.enter_context(_ray_session(num_cpus, spec, address, record=paths.ray_session))
            tuner = make_tuner(spec, context, storage_path=paths.root, name=paths.tune.name, warm_start=warm)
        except BaseException:  # nothing ran
            parent.set_tags({"cpews.status": "failed to start"})
            parent.end("FAILED")
            shutil.rmtree(paths.root, ignore_errors=True)
            raise
        return _fit_and_close(tuner, spec, paths, state, parent, out, started, stop_ray=session.close)


def resume_sweep(
    name: str,
    *,
    run_dir: Path = Path("runs"),
    out: Printer = print,
    num_cpus: int | None = None,
    address: str | None = None,
) -> SweepOutcome:
    """Continue an interrupted sweep (`Tuner.restore`): finished trials are kept, unfinished ones continue from
    the furthest valid checkpoint of their fold with their MLflow runs, the search history (the Optuna study) is
    intact, and the scheduler's records come back (`FoldASHAScheduler`). What is left of the local Ray instance
    of a killed driver is stopped first (`stop_left_behind_ray`).

    Raises:
        SweepError: no such sweep under `run_dir`; its driver is still running; its scheduler state is unreadable.
    """
    started = time.time()
    paths = existing_sweep(run_dir, name)
    state = json.loads(paths.state.read_text())
    spec = _read_spec(paths)
    from orchestration.kfold import load_folds
    from orchestration.tune_runner import (
        describe_scheduler_state,
        make_tuner,
        read_scheduler_state,
        restore_tuner,
    )

    stop_left_behind_ray(paths, out)
    try:
        records = read_scheduler_state(paths.scheduler_state)
    except ValueError as exc:
        raise SweepError(f"cannot resume sweep {name}: the scheduler's state {exc}; remove that file to resume "
                         "without its records (trials that passed a cut may be judged again)") from None
    try:  # the trials of an earlier sweep it was seeded with: needed when the search starts again
        warm = read_warm_start(paths.warm_start)
    except ValueError as exc:
        raise SweepError(f"cannot resume sweep {name}: its warm start record {exc}") from None

    folds = load_folds(paths.folds).folds
    out(f"MLflow store: {state['tracking_uri']}")
    parent = RunLogger.start(
        state["tracking_uri"], state["experiment_id"], run_name=spec.name, spool_dir=paths.parent_spool,
        run_id=state["parent_run_id"],
    )
    context = _context(spec, paths, state, folds, None)
    with contextlib.ExitStack() as session:
        try:  # the sweep's run, reopened, is never left RUNNING: a failure here leaves it resumable (KILLED)
            session.enter_context(_ray_session(num_cpus, spec, address, record=paths.ray_session))
            from ray import tune

            if tune.Tuner.can_restore(str(paths.tune)):
                out(f"sweep {name}: resuming from {paths.tune}")
                if records is not None:
                    out(f"sweep {name}: the scheduler's records come back from {paths.scheduler_state} "
                        f"({describe_scheduler_state(records)})")
                tuner = restore_tuner(spec, context, experiment_dir=paths.tune)
            else:  # stopped before Tune saved anything: start the search afresh, in the same folder and runs
                out(f"sweep {name}: Tune had saved no state yet; starting its trials")
                shutil.rmtree(paths.tune, ignore_errors=True)
                paths.scheduler_state.unlink(missing_ok=True)  # records of trials that Tune does not know
                if warm is not None:
                    out(warm.describe())
                tuner = make_tuner(spec, context, storage_path=paths.root, name=paths.tune.name, warm_start=warm)
        except BaseException:
            parent.set_tags({"cpews.status": "interrupted"})
            parent.end("KILLED")
            raise
        return _fit_and_close(tuner, spec, paths, state, parent, out, started, stop_ray=session.close)


def _read_spec(paths: SweepPaths) -> SweepSpec:
    import yaml

    try:
        return validate_sweep(yaml.safe_load(paths.spec.read_text()), source=str(paths.spec), check_paths=False)
    except (OSError, yaml.YAMLError, SweepFileError) as exc:
        raise SweepError(f"{paths.spec}: cannot read the sweep back: {exc}") from exc


def _fit_and_close(tuner: Any, spec: SweepSpec, paths: SweepPaths, state: Mapping[str, Any], parent: RunLogger,
                   out: Printer, started: float, *, stop_ray: Callable[[], None]) -> SweepOutcome:
    """Run `tuner` (one line per trial event through `out`), stop the sweep's Ray instance (`stop_ray`: nothing
    of its workers prints after the summary), end every MLflow run of the sweep, write and print the summary."""
    from orchestration.tune_runner import close_trial_runs, trial_events_to

    interrupted = True
    try:
        with trial_events_to(out):
            tuner.fit()
        rows = leaderboard_rows(paths, spec)
        interrupted = any(row["status"] in ("interrupted", "pending") for row in rows)
    except BaseException as exc:  # Tune itself gave up (or Ctrl-C outside its loop): the sweep's run ends too
        stopped = isinstance(exc, KeyboardInterrupt)
        parent.set_tags({"cpews.status": "interrupted" if stopped else f"failed: {type(exc).__name__}"})
        parent.end("KILLED" if stopped else "FAILED", timeout_s=30.0)
        raise
    finally:
        stop_ray()  # every trial's worker has ended: no second writer to its runs, no line after the summary
        # every run of every trial ends, whatever happened (their spools say which are still open)
        rows_now = _safe_rows(paths, spec)
        for row in rows_now:
            if row.get("path"):
                close_trial_runs(Path(row["path"]), row["status"], state["tracking_uri"], timeout_s=30.0)
        for spool in find_spool_dirs(paths.trials):  # trials without a row (e.g. Tune never recorded them)
            finalize_spool(spool, "KILLED", state["tracking_uri"], timeout_s=30.0)
    write_json_atomically(paths.leaderboard, leaderboard_json(Leaderboard(rows, _tune_source(paths), spec)))
    best = next((row for row in rows if row["status"] == "completed"), None)
    finished = sum(row["status"] not in ("interrupted", "pending") for row in rows)  # the summary's step
    if best is not None:  # under the trials' own keys, so the runs table sorts and shows sweeps and trials alike
        from orchestration.report import objective_value

        scores = {CV_MEAN: best["cv_miou_mean"], CV_STD: best["cv_miou_std"],
                  spec.objective.metric: objective_value(best, spec.objective.metric)}  # the objective's own key
        parent.log_metrics({key: value for key, value in scores.items() if value is not None}, step=finished)
        parent.set_tags({"cpews.best_trial": best["trial"], "cpews.best_run_id": best.get("mlflow_run_id") or ""})
    counts = {status: sum(row["status"] == status for row in rows) for status in _ENDED}
    parent.log_metrics({f"trials/{k}": float(v) for k, v in counts.items()}, step=finished)
    parent.log_artifact(paths.leaderboard)
    report_lines = _make_report(rows, spec, paths, state, parent)  # before the run ends: logged through its spool
    failed = not interrupted and not counts["completed"]  # no result: the run is FAILED and the exit non-zero
    parent.set_tags({"cpews.status": "interrupted" if interrupted else "failed" if failed else "finished"})
    left = parent.end("KILLED" if interrupted else "FAILED" if failed else "FINISHED", timeout_s=60.0)
    from mlflow.tracking import MlflowClient

    try:
        running = runs_left_running(MlflowClient(state["tracking_uri"]), state["experiment_id"])
    except Exception:
        running = []
    wall = time.time() - started
    out("")
    out(format_leaderboard(rows, spec, source=_tune_source(paths)))
    for line in report_lines:
        out(line)
    if left or running:
        out(f"MLflow: {left} record(s) of the sweep run not delivered yet; {len(running)} run(s) still RUNNING")
    if interrupted:
        out(f"sweep {spec.name} interrupted after {wall:.0f} s; continue it with: cpews sweep resume {spec.name}")
    else:
        summary = ", ".join(f"{counts[status]} {status}" for status in _ENDED)
        verb = "failed (no trial completed)" if failed else "finished"
        out(f"sweep {spec.name} {verb} in {wall:.0f} s: {summary}")
    out(f"MLflow store: {state['tracking_uri']}  (make ui, then open experiment {spec.tracking.experiment!r}: "
        f"http://127.0.0.1:5000/{ui_path(state['experiment_id'])})")
    backlog = spool_backlog(paths.root)
    if backlog.records:
        out(f"{backlog.describe()} pending: run `cpews sweep sync {spec.name}`")
    for line in failure_lines(rows):  # the last lines: why each failed trial failed, and where its error is
        out(line)
    return SweepOutcome(spec.name, rows, interrupted, state["tracking_uri"], state["experiment_id"],
                        state["parent_run_id"], wall, paths, backlog.records)


def _make_report(rows: list[dict[str, Any]], spec: SweepSpec, paths: SweepPaths, state: Mapping[str, Any],
                 parent: RunLogger) -> list[str]:
    """Make the sweep's report (`orchestration.report.write_report`) in `paths.report`, log it to the sweep's run
    (`parent`, under `report/`) and describe the experiment (what was searched); the lines to print after the
    leaderboard. A failure never fails the sweep: it is one warning line (`cpews sweep report NAME` makes it
    again)."""
    try:
        from orchestration.report import REPORT_DIR, format_importance, write_report

        report = write_report(rows, spec, tune_dir=paths.tune, folder=paths.report, source=_tune_source(paths))
        parent.log_artifacts(report.folder, REPORT_DIR)
    except Exception as exc:
        return [f"warning: sweep {spec.name}: the report was not made ({type(exc).__name__}: {exc}); make it "
                f"with `cpews sweep report {spec.name}`"]
    lines = [format_importance(report.importance, spec.objective.metric),
             f"report: {report.html} (and in MLflow: the sweep run's artifacts {REPORT_DIR}/)"]
    problem = _describe_experiment(state["tracking_uri"], state["experiment_id"], spec)
    return lines + ([problem] if problem else [])


def _describe_experiment(tracking_uri: str, experiment_id: str, spec: SweepSpec) -> str | None:
    """Set the MLflow experiment's description to what `spec` searches (`orchestration.report.describe_experiment`);
    a warning line when MLflow did not take it (never an error: the sweep goes on), else None."""
    from mlflow.tracking import MlflowClient

    from orchestration.report import describe_experiment
    from orchestration.tracking import _http_policy

    try:
        with _http_policy(10.0):
            describe_experiment(MlflowClient(tracking_uri), experiment_id, spec)
    except Exception as exc:
        return (f"warning: sweep {spec.name}: the MLflow experiment's description was not set "
                f"({type(exc).__name__}: {exc}); `cpews sweep report {spec.name}` sets it")
    return None


def _safe_rows(paths: SweepPaths, spec: SweepSpec) -> list[dict[str, Any]]:
    try:
        return leaderboard_rows(paths, spec)
    except Exception:
        return []


_ENDED = ("completed", "pruned", "timeout", "failed")  # the statuses of trials that ended (the summary's counts)


def ranking_rule(spec: SweepSpec) -> str:
    """How the leaderboard orders trials, in words (its header and leaderboard.json say it)."""
    from orchestration.tune_runner import STATUSES

    best = "highest" if spec.objective.mode == "max" else "lowest"
    return (f"by status ({', '.join(STATUSES)}), then folds completed (most first), then {CV_MEAN} ({best} "
            "first)")


def _rank(rows: list[dict[str, Any]], spec: SweepSpec) -> list[dict[str, Any]]:
    """`rows` sorted by `ranking_rule`, with their `rank` set (1 = best)."""
    from orchestration.tune_runner import STATUSES

    order = {status: i for i, status in enumerate(STATUSES)}
    sign = -1.0 if spec.objective.mode == "max" else 1.0
    rows.sort(key=lambda r: (order.get(r["status"], len(order)), -r["folds_completed"], r["cv_miou_mean"] is None,
                             sign * (r["cv_miou_mean"] or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _spread(fold_scores: Sequence[float], folds_completed: int, reported: Any) -> float | None:
    """The fold std of a row: `fold_std` of the fold scores when they are all there, else the reported one."""
    from orchestration.kfold import fold_std

    if fold_scores and len(fold_scores) == folds_completed:
        return _finite(fold_std(fold_scores))
    return _finite(reported) if folds_completed > 1 else None


def _tune_source(paths: SweepPaths) -> str:
    return f"Tune's experiment state in {paths.tune}"


def leaderboard_rows(paths: SweepPaths, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial of the sweep's Tune experiment, read from disk (no Ray instance needed), ranked by
    `ranking_rule`.

    Row keys: rank, trial, params (the searched keys), cv_miou_mean, cv_miou_std (sample std of the fold scores,
    `fold_std`), baseline_miou (the mean over the trial's finished folds of the all-background mIoU of their
    images), folds_completed, status (completed | pruned | timeout | interrupted | pending | failed),
    wall_time_s, fold_scores, mlflow_run_id, error (a failed trial's exception, its last line), error_file,
    path, timings (time/... seconds).
    """
    from ray.tune import ExperimentAnalysis

    from orchestration.trial import TRIAL_STATE_FILE, trial_params
    from orchestration.tune_runner import read_stop_reasons, trial_outcome

    if not paths.tune.is_dir():
        return []
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a trial stopped before its first report has no result files: not news
    try:
        analysis = ExperimentAnalysis(str(paths.tune))
    finally:
        quiet.setLevel(level)
    stops = read_stop_reasons(paths.stops)
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        status = trial_outcome(trial.status, last, spec.folds.k, stops.of(trial.trial_id))
        trial_state: dict[str, Any] = {}
        trial_dir = paths.trials / trial.trial_id
        spool_meta = trial_dir / "mlflow" / "trial" / "run.json"
        run_id = json.loads(spool_meta.read_text()).get("run_id") if spool_meta.is_file() else None
        if trial.checkpoint is not None:
            with contextlib.suppress(OSError, ValueError):
                with trial.checkpoint.as_directory() as directory:
                    trial_state = json.loads((Path(directory) / TRIAL_STATE_FILE).read_text())
        mean = _finite(last.get(CV_MEAN))
        baselines = [float(b) for b in trial_state.get("fold_baselines", [])]
        baseline = statistics.fmean(baselines) if baselines else last.get(CV_BASELINE)
        folds = int(last.get(FOLDS_COMPLETED, 0) or 0)
        scores = trial_state.get("fold_scores", [])
        error_file = paths.tune / trial.storage.trial_dir_name / "error.txt"
        rows.append({
            "trial": trial.trial_id,
            "params": trial_params(trial.config or {}),
            "cv_miou_mean": mean,
            "cv_miou_std": _spread(scores, folds, last.get(CV_STD)) if mean is not None else None,
            "baseline_miou": _finite(baseline),
            "folds_completed": folds,
            "status": status,
            "wall_time_s": last.get("time_total_s"),
            "fold_scores": scores,
            "nodes": trial_state.get("nodes", []),
            "mlflow_run_id": run_id or trial_state.get("trial_run_id"),
            "error": _error_text(error_file) if status == "failed" else None,
            "error_file": str(error_file) if status == "failed" and error_file.is_file() else None,
            "path": str(trial_dir),
            "timings": {k: last[k] for k in (*TIME_KEYS, FIRST_STEP_AT) if k in last},
        })
    return _rank(rows, spec)


def _error_text(path: Path) -> str | None:
    """The last line of a trial's error file (Tune's `error.txt`: the exception of its last attempt)."""
    if path.is_file():
        lines = [line for line in path.read_text(errors="replace").strip().splitlines() if line.strip()]
        return lines[-1][:500] if lines else None
    return None


def failure_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per failed trial: its exception (last line) and the file that holds the whole of it."""
    lines = []
    for row in rows:
        if row["status"] != "failed":
            continue
        where = (f"error file {row['error_file']}" if row.get("error_file")
                 else f"no error file; see {row.get('path') or 'its trial folder'}")
        lines.append(f"trial {row['trial']} failed: {row.get('error') or 'no exception recorded'} ({where})")
    return lines


class Leaderboard(NamedTuple):
    rows: list[dict[str, Any]]  # as `leaderboard_rows` returns them
    source: str  # where they come from, in words
    spec: SweepSpec


def leaderboard_json(board: Leaderboard) -> dict[str, Any]:
    """The leaderboard as `leaderboard.json` holds it and `cpews sweep leaderboard NAME --json` prints it:
    `{"sweep", "objective", "ranking" (`ranking_rule`), "source" (where the rows come from), "trials" (the
    rows, best first)}`."""
    spec = board.spec
    return {"sweep": spec.name, "objective": spec.objective.metric, "ranking": ranking_rule(spec),
            "source": board.source, "trials": list(board.rows)}


def read_leaderboard(name: str, *, run_dir: Path = Path("runs")) -> Leaderboard:
    """The leaderboard of sweep `name`, from what is on disk and in MLflow; no Ray instance is needed.

    Tune's experiment state first (it is current while the sweep runs, after a crash or an interruption); when
    it cannot be read, the sweep's trial runs in MLflow; the saved `leaderboard.json` only when it holds more
    trials than those (it is written at the end of a run, so it can be out of date).

    Raises:
        SweepError: no such sweep.
    """
    paths = existing_sweep(run_dir, name)
    spec = _read_spec(paths)
    if any(paths.tune.glob("experiment_state-*.json")):
        try:
            return Leaderboard(leaderboard_rows(paths, spec), _tune_source(paths), spec)
        except Exception as exc:
            problem = f"{_tune_source(paths)} could not be read ({type(exc).__name__}: {exc})"
    else:
        problem = f"Tune saved no experiment state in {paths.tune}"
    boards = []
    try:
        boards.append(_mlflow_leaderboard(paths, spec))
    except Exception as exc:
        problem += f"; MLflow could not be read ({type(exc).__name__}: {exc})"
    if paths.leaderboard.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(paths.leaderboard.read_text())["trials"]
            written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(paths.leaderboard.stat().st_mtime))
            boards.append(Leaderboard(saved, f"{paths.leaderboard}, saved {written}", spec))
    if not boards:
        return Leaderboard([], problem, spec)
    best = max(boards, key=lambda board: len(board.rows))  # the first of equals: MLflow before the saved file
    return Leaderboard(best.rows, f"{best.source} ({problem})", spec)


def _mlflow_leaderboard(paths: SweepPaths, spec: SweepSpec) -> Leaderboard:
    """The leaderboard from the sweep's trial runs in MLflow (status tag, cv/* metrics, fold/miou_seg history)."""
    import yaml
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from orchestration.tracking import _http_policy
    from orchestration.trial import FOLD_SCORE, TAG_NODES, TAG_STATUS, TAG_TRIAL

    state = json.loads(paths.state.read_text())
    with _http_policy(10.0):
        client = MlflowClient(state["tracking_uri"])
        runs = client.search_runs(
            [state["experiment_id"]],
            filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}' and tags.`{TAG_KIND}` = 'trial'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
        )
        rows = []
        for run in runs:
            tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
            history = {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, FOLD_SCORE),
                                                        key=lambda m: (m.step, m.timestamp))}
            scores = [history[step] for step in sorted(history)]
            folds = int(metrics.get(FOLDS_COMPLETED, len(scores)))
            status = tags.get(TAG_STATUS) or ("failed" if run.info.status == "FAILED" else "interrupted")
            trial_id = tags.get(TAG_TRIAL, run.info.run_name)
            error_file = paths.tune / f"trial_{trial_id}" / "error.txt"
            mean = _finite(metrics.get(CV_MEAN))
            end = run.info.end_time
            rows.append({
                "trial": trial_id,
                "params": {key: yaml.safe_load(params[key]) for key in spec.searched_keys() if key in params},
                "cv_miou_mean": mean,
                "cv_miou_std": _spread(scores, folds, metrics.get(CV_STD)) if mean is not None else None,
                "baseline_miou": _finite(metrics.get(CV_BASELINE)),
                "folds_completed": folds,
                "status": status,
                "wall_time_s": (end - run.info.start_time) / 1000 if end else None,
                "fold_scores": scores,
                "nodes": [node for node in tags.get(TAG_NODES, "").split(",") if node],
                "mlflow_run_id": run.info.run_id,
                "error": _error_text(error_file) if status == "failed" else None,
                "error_file": str(error_file) if status == "failed" and error_file.is_file() else None,
                "path": str(paths.trials / trial_id),
                "timings": _run_timings(metrics, tags),
            })
    return Leaderboard(_rank(rows, spec), f"the trial runs in MLflow ({state['tracking_uri']}, experiment "
                       f"{state['experiment_id']}, sweep run {state['parent_run_id']})", spec)


def _run_timings(metrics: Mapping[str, float], tags: Mapping[str, str]) -> dict[str, float]:
    """A trial run's timings as a leaderboard row holds them: the `time/...` metrics, and `FIRST_STEP_AT` (a Unix
    time) from its `cpews.first_step_at` tag (a metric in runs logged before it became a tag)."""
    from orchestration.trial import TAG_FIRST_STEP_AT, epoch_time

    timings = {k: metrics[k] for k in (*TIME_KEYS, FIRST_STEP_AT) if k in metrics}
    with contextlib.suppress(KeyError, ValueError):
        timings[FIRST_STEP_AT] = epoch_time(tags[TAG_FIRST_STEP_AT])
    return timings


def load_leaderboard(name: str, *, run_dir: Path = Path("runs")) -> list[dict[str, Any]]:
    """The rows of `read_leaderboard(name)`.

    Raises:
        SweepError: no such sweep.
    """
    return read_leaderboard(name, run_dir=run_dir).rows


def format_leaderboard(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, *, source: str | None = None) -> str:
    """The leaderboard as a text table: rank, trial, searched params, mean ± std fold mIoU, the all-background
    mIoU of the same images, folds, status, wall; a header with the ranking rule (and where the rows come from,
    when `source` is given); a footer states that floor and how many trials beat it."""
    keys = spec.searched_keys()
    short = {key: key.split(".", 1)[-1] for key in keys}
    header = ["rank", "trial", *[short[k] for k in keys], "cv mIoU (mean ± std)", "bkg mIoU", "folds", "status",
              "wall s"]
    table = [header]
    for row in rows:
        mean, std = row.get("cv_miou_mean"), row.get("cv_miou_std")
        score = "-" if mean is None else f"{mean:.4f} ± " + ("-" if std is None else f"{std:.4f}")
        baseline = row.get("baseline_miou")
        cells = [str(row["rank"]), str(row["trial"])]
        for key in keys:
            value = row["params"].get(key, "-")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        wall = row.get("wall_time_s")
        cells += [score, "-" if baseline is None else f"{baseline:.4f}", f"{row['folds_completed']}/{spec.folds.k}",
                  row["status"], "-" if wall is None else f"{wall:.0f}"]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [f"leaderboard of sweep {spec.name} (objective {spec.objective.metric}, {spec.objective.mode})",
             f"ranked {ranking_rule(spec)}; ± the sample std of the fold scores"]
    if source:
        lines.append(f"from {source}")
    for i, r in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    base = _base_configuration_line(rows, spec)
    if base:
        lines.append(base)
    footer = _baseline_footer(rows)
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def _base_configuration_line(rows: Sequence[Mapping[str, Any]], spec: SweepSpec) -> str | None:
    """Which trial ran the base configuration (every searched key at the base config's value, as
    `search.start_points: [base]` enqueues it) and its rank: what the search gained over it. None when no trial
    did, or when the base config is not a point of the space (a base value outside its range)."""
    base = spec.base_point()
    if set(base) != set(spec.searched_keys()):
        return None
    for row in rows:
        if all(row["params"].get(key) == value for key, value in base.items()):
            return (f"base configuration (every searched key at the base config's value): trial {row['trial']}, "
                    f"rank {row['rank']}")
    return None


def _baseline_footer(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The all-background mIoU of the completed trials' images (every fold, so the same for all of them) and
    how many of those trials beat it; without a completed trial, the range over the trials' finished folds."""
    completed = [r for r in rows if r["status"] == "completed" and r.get("baseline_miou") is not None]
    scored = completed or [r for r in rows if r.get("baseline_miou") is not None]
    if not scored:
        return None
    low, high = (f"{f(r['baseline_miou'] for r in scored):.4f}" for f in (min, max))
    text = f"all-background mIoU of the same images: {low if low == high else f'{low}-{high}'}"
    if not completed:
        return f"{text} (by the folds each trial finished)"
    above = sum((r.get("cv_miou_mean") or 0.0) > r["baseline_miou"] for r in completed)
    return f"{text} (completed trials, every fold); {above} of {len(completed)} completed trials beat it"

"""Running a sweep end to end: folders, folds, MLflow runs, Ray Tune, the leaderboard; and resuming one.

A sweep named NAME lives in `<run_dir>/sweeps/NAME/` (run_dir defaults to `runs`):

    sweep.yaml        the validated sweep, as run (resume reads it back)
    state.json        MLflow store, experiment and parent run; data root; start time
    folds.json        the K-fold split (also an artifact of the sweep's run)
    tune/             Ray Tune's experiment folder: trials, checkpoints, searcher state (Tuner.restore)
    trials/<id>/      each trial's own folder: fold outputs (checkpoints, pools, overlays), MLflow spools
    pool_cache/       prototype pools by content key, shared by the sweep's trials (proto.cache_dir)
    mlflow_spool/     the spool of the sweep's own MLflow run
    leaderboard.json  written at the end of each run or resume

The MLflow store is `MLFLOW_TRACKING_URI` when set, else SQLite under `<run_dir>/mlflow` (see
`orchestration.tracking.resolve_store`). The tree in MLflow: experiment = the sweep's `tracking.experiment`; a
run for the sweep; under it a run per trial; under each trial a run per fold (`mlflow.parentRunId`).
"""

from __future__ import annotations

import contextlib
import json
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

__all__ = [
    "SweepError",
    "SweepOutcome",
    "SweepPaths",
    "existing_sweep",
    "format_leaderboard",
    "leaderboard_rows",
    "load_leaderboard",
    "next_free_name",
    "renamed",
    "resume_sweep",
    "run_sweep",
    "sweep_paths",
]

STATE_FORMAT = "cpews-sweep/1"
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


class SweepOutcome(NamedTuple):
    name: str
    rows: list[dict[str, Any]]  # the leaderboard, best first
    interrupted: bool  # some trials did not finish (stopped driver): `cpews sweep resume NAME` continues
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    wall_time_s: float
    paths: SweepPaths


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


def _sweep_params(spec: SweepSpec) -> dict[str, Any]:
    """The sweep's settings as flat scalar params of its MLflow run."""
    data = spec.to_dict()
    params: dict[str, Any] = {"sweep.name": spec.name, "sweep.base_config": spec.base_config}
    for section in ("search", "folds", "scheduler", "resources", "objective"):
        for key, value in data[section].items():
            params[f"sweep.{section}.{key}"] = value
    params["sweep.time_budget_s"] = spec.time_budget_s if spec.time_budget_s is not None else "none"
    params["sweep.searched"] = ",".join(spec.searched_keys())
    for key, value in spec.fixed.items():
        params[f"fixed.{key}"] = value
    return params


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def _ray_session(num_cpus: int | None, spec: SweepSpec, address: str | None = None) -> Iterator[None]:
    """A Ray instance for the sweep: `address` or RAY_ADDRESS (join a cluster), else a fresh local one."""
    import ray

    # Tune warns about forced experiment snapshots whenever trials checkpoint often (a short fold does)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target)
    else:  # a fresh local instance, never a stray one found on the machine
        wanted = num_cpus or max(1, math.ceil(spec.resources.cpu * spec.search.max_concurrent))
        ray.init(num_cpus=wanted, num_gpus=None, include_dashboard=False, address="local", log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


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
) -> SweepOutcome:
    """Start sweep `spec` and run it to the end (or until interrupted); returns the leaderboard.

    Args:
        run_dir: the project's run folder (sweep folders, the local MLflow store, the synthetic data).
        out: where progress lines go.
        num_cpus: CPUs of a local Ray instance (default: enough for `max_concurrent` trials).
        address: a Ray cluster to join (default: RAY_ADDRESS, else a local instance).
        faults: fault injection for tests (`TrialContext.kill_at`, `crash_after_fold`).

    Raises:
        SweepError: a sweep of that name exists already (resume it or pick another name); MLflow unreachable.
    """
    started = time.time()
    paths = sweep_paths(run_dir, spec.name)
    if paths.root.exists():
        raise SweepError(
            f"sweep {spec.name!r} exists already in {paths.root}; continue it with `cpews sweep resume "
            f"{spec.name}`, or start a new one with --name (or delete that folder)"
        )
    store = resolve_store(run_dir)
    out(f"MLflow store: {store.tracking_uri}" + (f" (artifacts {store.artifact_root})" if store.artifact_root else ""))
    from cpews.config import SYNTHETIC_WEIGHTS
    from cpews.training.data import resolve_data_root
    from cpews.training.pretrain import ensure_pretrained

    base_cfg = spec.base_train_config()
    split = spec.folds.split or base_cfg.data.train_split
    data_root = resolve_data_root(base_cfg)  # generates the synthetic dataset on first use
    if base_cfg.model.weights == SYNTHETIC_WEIGHTS:  # the pretrained backbone, made once before any trial starts
        ensure_pretrained(base_cfg, progress=out)
    saved = split_folds(data_root, base_cfg.data.dataset, split, spec.folds.k, spec.folds.seed)
    from mlflow.tracking import MlflowClient

    try:
        experiment_id = ensure_experiment(MlflowClient(store.tracking_uri), spec.tracking.experiment, store.artifact_root)
    except Exception as exc:
        raise SweepError(f"MLflow store {store.tracking_uri} cannot be used: {type(exc).__name__}: {exc}") from exc
    paths.root.mkdir(parents=True)
    try:
        paths.spec.write_text(spec.to_yaml())
        save_folds(paths.folds, saved.folds, saved.meta)
        parent = RunLogger.start(
            store.tracking_uri, experiment_id, run_name=spec.name, spool_dir=paths.parent_spool,
            tags={TAG_KIND: "sweep", TAG_SWEEP: spec.name, "mlflow.note.content": spec.description,
                  "cpews.sweep_dir": str(paths.root), **_code_version()},
        )
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)  # nothing half-made is left behind
        raise
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
    }
    _write_json(paths.state, state)
    parent.log_params(_sweep_params(spec))
    parent.log_artifact(paths.spec)
    parent.log_artifact(paths.folds)
    out(f"sweep {spec.name}: {spec.search.num_trials} trials x {spec.folds.k} folds, {spec.search.max_concurrent} "
        f"at a time; folder {paths.root}")
    out(f"MLflow: experiment {spec.tracking.experiment!r} (id {experiment_id}), sweep run {parent.run_id}")
    context = _context(spec, paths, state, saved.folds, faults)
    from orchestration.tune_runner import make_tuner

    with _ray_session(num_cpus, spec, address):
        try:
            tuner = make_tuner(spec, context, storage_path=paths.root, name=paths.tune.name)
        except BaseException:  # nothing ran: remove the sweep, end its MLflow run as failed
            parent.set_tags({"cpews.status": "failed to start"})
            parent.end("FAILED")
            shutil.rmtree(paths.root, ignore_errors=True)
            raise
        return _fit_and_close(tuner, spec, paths, state, parent, out, started)


def resume_sweep(
    name: str,
    *,
    run_dir: Path = Path("runs"),
    out: Printer = print,
    num_cpus: int | None = None,
    address: str | None = None,
) -> SweepOutcome:
    """Continue an interrupted sweep (`Tuner.restore`): finished trials are kept, unfinished ones continue from
    their checkpoints with their MLflow runs, and the search history (the Optuna study) is intact.

    Raises:
        SweepError: no such sweep under `run_dir`, or it was never started by Tune.
    """
    started = time.time()
    paths = existing_sweep(run_dir, name)
    state = json.loads(paths.state.read_text())
    spec = _read_spec(paths)
    from orchestration.kfold import load_folds
    from orchestration.tune_runner import make_tuner, restore_tuner

    folds = load_folds(paths.folds).folds
    out(f"MLflow store: {state['tracking_uri']}")
    parent = RunLogger.start(
        state["tracking_uri"], state["experiment_id"], run_name=spec.name, spool_dir=paths.parent_spool,
        run_id=state["parent_run_id"],
    )
    context = _context(spec, paths, state, folds, None)
    with _ray_session(num_cpus, spec, address):
        from ray import tune

        if tune.Tuner.can_restore(str(paths.tune)):
            out(f"sweep {name}: resuming from {paths.tune}")
            tuner = restore_tuner(spec, context, experiment_dir=paths.tune)
        else:  # stopped before Tune saved anything: start the search afresh, in the same folder and runs
            out(f"sweep {name}: Tune had saved no state yet; starting its trials")
            shutil.rmtree(paths.tune, ignore_errors=True)
            tuner = make_tuner(spec, context, storage_path=paths.root, name=paths.tune.name)
        return _fit_and_close(tuner, spec, paths, state, parent, out, started)


def _read_spec(paths: SweepPaths) -> SweepSpec:
    import yaml

    try:
        return validate_sweep(yaml.safe_load(paths.spec.read_text()), source=str(paths.spec), check_paths=False)
    except (OSError, yaml.YAMLError, SweepFileError) as exc:
        raise SweepError(f"{paths.spec}: cannot read the sweep back: {exc}") from exc


def _fit_and_close(tuner: Any, spec: SweepSpec, paths: SweepPaths, state: Mapping[str, Any], parent: RunLogger,
                   out: Printer, started: float) -> SweepOutcome:
    from orchestration.tune_runner import close_trial_runs

    interrupted = True
    try:
        tuner.fit()
        rows = leaderboard_rows(paths, spec)
        interrupted = any(row["status"] in ("interrupted", "pending") for row in rows)
    finally:
        # every run of every trial ends, whatever happened (their spools say which are still open)
        rows_now = _safe_rows(paths, spec)
        for row in rows_now:
            if row.get("path"):
                close_trial_runs(Path(row["path"]), row["status"], state["tracking_uri"], timeout_s=30.0)
        for spool in find_spool_dirs(paths.trials):  # trials without a row (e.g. Tune never recorded them)
            finalize_spool(spool, "KILLED", state["tracking_uri"], timeout_s=30.0)
    _write_json(paths.leaderboard, {"sweep": spec.name, "objective": spec.objective.metric, "trials": rows})
    best = next((row for row in rows if row["status"] == "completed"), None)
    if best is not None:
        parent.log_metrics({"best/" + CV_MEAN: best["cv_miou_mean"], "best/" + CV_STD: best["cv_miou_std"]}, step=0)
        parent.set_tags({"cpews.best_trial": best["trial"], "cpews.best_run_id": best.get("mlflow_run_id") or ""})
    counts = {status: sum(row["status"] == status for row in rows) for status in ("completed", "pruned", "failed")}
    parent.log_metrics({f"trials/{k}": float(v) for k, v in counts.items()}, step=0)
    parent.log_artifact(paths.leaderboard)
    parent.set_tags({"cpews.status": "interrupted" if interrupted else "finished"})
    left = parent.end("KILLED" if interrupted else "FINISHED", timeout_s=60.0)
    from mlflow.tracking import MlflowClient

    try:
        running = runs_left_running(MlflowClient(state["tracking_uri"]), state["experiment_id"])
    except Exception:
        running = []
    wall = time.time() - started
    out("")
    out(format_leaderboard(rows, spec))
    if left or running:
        out(f"MLflow: {left} record(s) of the sweep run not delivered yet; {len(running)} run(s) still RUNNING")
    if interrupted:
        out(f"sweep {spec.name} interrupted after {wall:.0f} s; continue it with: cpews sweep resume {spec.name}")
    else:
        out(f"sweep {spec.name} finished in {wall:.0f} s: {counts['completed']} completed, {counts['pruned']} "
            f"pruned, {counts['failed']} failed")
    out(f"MLflow store: {state['tracking_uri']}  (make ui, then open experiment {spec.tracking.experiment!r})")
    return SweepOutcome(spec.name, rows, interrupted, state["tracking_uri"], state["experiment_id"],
                        state["parent_run_id"], wall, paths)


def _safe_rows(paths: SweepPaths, spec: SweepSpec) -> list[dict[str, Any]]:
    try:
        return leaderboard_rows(paths, spec)
    except Exception:
        return []


def leaderboard_rows(paths: SweepPaths, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial of the sweep's Tune experiment, best first (completed by score, then the rest).

    Row keys: rank, trial, params (the searched keys), cv_miou_mean, cv_miou_std, baseline_miou (the mean over
    the trial's finished folds of the all-background mIoU of their images), folds_completed, status,
    wall_time_s, fold_scores, mlflow_run_id, error, path, timings (time/... seconds).
    """
    from ray.tune import ExperimentAnalysis

    from orchestration.trial import TRIAL_STATE_FILE, trial_params
    from orchestration.tune_runner import trial_outcome

    if not paths.tune.is_dir():
        return []
    analysis = ExperimentAnalysis(str(paths.tune))
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        status = trial_outcome(trial.status, last, spec.folds.k)
        trial_state: dict[str, Any] = {}
        trial_dir = paths.trials / trial.trial_id
        spool_meta = trial_dir / "mlflow" / "trial" / "run.json"
        run_id = json.loads(spool_meta.read_text()).get("run_id") if spool_meta.is_file() else None
        if trial.checkpoint is not None:
            with contextlib.suppress(OSError, ValueError):
                with trial.checkpoint.as_directory() as directory:
                    trial_state = json.loads((Path(directory) / TRIAL_STATE_FILE).read_text())
        mean = last.get(CV_MEAN)
        baselines = [float(b) for b in trial_state.get("fold_baselines", [])]
        baseline = statistics.fmean(baselines) if baselines else last.get(CV_BASELINE)
        rows.append({
            "trial": trial.trial_id,
            "params": trial_params(trial.config or {}),
            "cv_miou_mean": mean if mean is not None and math.isfinite(mean) else None,
            "cv_miou_std": last.get(CV_STD) if mean is not None and math.isfinite(mean) else None,
            "baseline_miou": baseline if baseline is not None and math.isfinite(baseline) else None,
            "folds_completed": int(last.get(FOLDS_COMPLETED, 0) or 0),
            "status": status,
            "wall_time_s": last.get("time_total_s"),
            "fold_scores": trial_state.get("fold_scores", []),
            "nodes": trial_state.get("nodes", []),
            "mlflow_run_id": run_id or trial_state.get("trial_run_id"),
            "error": _error_text(trial) if status == "failed" else None,
            "path": str(trial_dir),
            "timings": {k: last[k] for k in (*TIME_KEYS, FIRST_STEP_AT) if k in last},
        })
    sign = -1.0 if spec.objective.mode == "max" else 1.0
    order = {"completed": 0, "pruned": 1, "interrupted": 2, "pending": 3, "failed": 4}
    rows.sort(key=lambda r: (order[r["status"]], -r["folds_completed"], r["cv_miou_mean"] is None,
                             sign * (r["cv_miou_mean"] or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _error_text(trial: Any) -> str | None:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text(errors="replace").strip().splitlines() if line.strip()]
        return lines[-1][:500] if lines else None
    return None


def load_leaderboard(name: str, *, run_dir: Path = Path("runs")) -> list[dict[str, Any]]:
    """The leaderboard of sweep `name`: computed from its Tune folder (so it is current even while the sweep
    runs or after an interruption), else the saved `leaderboard.json`.

    Raises:
        SweepError: no such sweep.
    """
    paths = existing_sweep(run_dir, name)
    spec = _read_spec(paths)
    rows = _safe_rows(paths, spec)
    if not rows and paths.leaderboard.is_file():
        rows = json.loads(paths.leaderboard.read_text())["trials"]
    return rows


def format_leaderboard(rows: Sequence[Mapping[str, Any]], spec: SweepSpec) -> str:
    """The leaderboard as a text table: rank, trial, searched params, mean ± std fold mIoU, the all-background
    mIoU of the same images, folds, status, wall; a footer states that floor and how many trials beat it."""
    keys = spec.searched_keys()
    short = {key: key.split(".", 1)[-1] for key in keys}
    header = ["rank", "trial", *[short[k] for k in keys], "cv mIoU (mean ± std)", "bkg mIoU", "folds", "status",
              "wall s"]
    table = [header]
    for row in rows:
        mean, std = row.get("cv_miou_mean"), row.get("cv_miou_std")
        score = "-" if mean is None else f"{mean:.4f} ± {std or 0.0:.4f}"
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
    lines = [f"leaderboard of sweep {spec.name} (objective {spec.objective.metric}, {spec.objective.mode})"]
    for i, r in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    footer = _baseline_footer(rows)
    if footer:
        lines.append(footer)
    return "\n".join(lines)


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

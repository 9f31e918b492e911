"""Ray Tune sweep runner: one Tune trial = one sampled config trained on every fold in turn.

Each fold is one Tune report (`training_iteration` = folds done), so ASHA can stop a config after its first
folds. Completed fold scores travel in a small Tune checkpoint (`folds.json`), so a retried or restored trial
skips them. Trials that ASHA stops early reach Optuna as PRUNED (see `PruningOptunaSearch`), not as COMPLETE
with a partial score (orchestration-notes.md, "Ray Tune + Optuna").

MLflow tracking is not wired in yet (`orchestration.tracking`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from orchestration.kfold import fold_splits, split_folds
from orchestration.search_space import SweepSpec, sample_params, validate_sweep

__all__ = [
    "CV_MEAN",
    "CV_STD",
    "FOLDS_COMPLETED",
    "FOLD_SCORE",
    "DefineByRun",
    "PruningOptunaSearch",
    "make_searcher",
    "run_fold_trial",
    "run_sweep",
]

CV_MEAN = "cv/miou_seg_mean"
CV_STD = "cv/miou_seg_std"
FOLD_SCORE = "fold/miou_seg"
FOLDS_COMPLETED = "folds_completed"
FOLD_STATE_FILE = "folds.json"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted config keys from a trial config. Ray's OptunaSearch unflattens on "/" only, so the dotted
    keys arrive flat; nested mappings (e.g. a hand-written `param_space`) are flattened here all the same."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _cv_metrics(scores: list[float]) -> dict[str, float]:
    mean = statistics.fmean(scores)
    std = statistics.pstdev(scores) if len(scores) > 1 else 0.0
    return {CV_MEAN: mean, CV_STD: std}


def _load_completed(checkpoint: Any) -> list[float]:
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / FOLD_STATE_FILE).read_text())
    return [float(s) for s in state["fold_scores"]]


def run_fold_trial(
    config: dict,
    *,
    spec_dict: dict,
    folds: list[list[str]],
    data_dir: str | None = None,
    crash_once_after_fold: int | None = None,
) -> None:
    """Ray Tune function trainable: train `config`'s params on each fold, one `tune.report` per fold.

    `config` holds only the sampled params; the rest comes through `tune.with_parameters`:
        spec_dict: `SweepSpec.to_dict()` (re-validated here, without path checks).
        folds: the image-id folds of the spec's fold split.
        data_dir: `CPEWS_DATA_DIR` for the worker (where the synthetic dataset lives), if set on the driver.
        crash_once_after_fold: fault injection for tests: raise once after reporting this fold (a marker file
            in the trial dir remembers it), so that Tune retries the trial from its checkpoint.

    Every fold trained is appended to `<trial dir>/folds_trained.log` (a retry shows which folds it skipped).
    """
    from ray import tune
    from ray.tune import Checkpoint

    from cpews.training import keys, train
    from cpews.training.data import DATA_DIR_ENV

    if data_dir:
        os.environ[DATA_DIR_ENV] = data_dir
    spec = validate_sweep(spec_dict, check_paths=False)
    params = _flatten(config)
    cfg = spec.trial_config(params)
    split = spec.folds.split or cfg.data.train_split
    trial_dir = Path(tune.get_context().get_trial_dir())
    scores = _load_completed(tune.get_checkpoint())
    for i in range(len(scores), len(folds)):
        train_ids, val_ids = fold_splits(folds, i)
        result = train(
            cfg,
            lambda metrics, checkpoint_dir: None,
            out_dir=trial_dir / f"fold_{i}",
            train_ids=train_ids,
            val_ids=val_ids,
            val_split=split,
            progress=False,
        )
        score = float(result.metrics[keys.VAL_MIOU_SEG])
        if not math.isfinite(score):
            raise RuntimeError(f"fold {i}: non-finite {keys.VAL_MIOU_SEG}={score}")
        scores.append(score)
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / FOLD_STATE_FILE).write_text(json.dumps({"fold_scores": scores}))
            tune.report(
                {**_cv_metrics(scores), FOLDS_COMPLETED: len(scores), FOLD_SCORE: score, "fold": i},
                checkpoint=Checkpoint.from_directory(directory),
            )
        with open(trial_dir / "folds_trained.log", "a") as log:
            log.write(f"{i}\n")
        marker = trial_dir / "crashed_once"
        if crash_once_after_fold == i and not marker.exists():
            marker.write_text(str(i))
            raise RuntimeError(f"injected crash after fold {i}")


class DefineByRun:
    """A picklable define-by-run space (Tune pickles the searcher, so `optuna_define_by_run`'s closure fails)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec_dict = spec.to_dict()
        self._spec: SweepSpec | None = spec

    def __call__(self, trial: Any) -> None:
        if self._spec is None:
            self._spec = validate_sweep(self.spec_dict, check_paths=False)
        sample_params(self._spec, trial)

    def __getstate__(self) -> dict:
        return {"spec_dict": self.spec_dict, "_spec": None}


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED (not COMPLETE) for a trial stopped before its last fold.

    Ray's OptunaSearch tells COMPLETE with the last (partial-CV) score when a scheduler stops a trial, so TPE
    would learn from low-fidelity scores. It also tells COMPLETE for an errored trial that had reported a
    score; here an error is always FAIL. Trials that trained every fold keep Ray's behaviour (COMPLETE).
    """

    def __init__(self, *args: Any, num_folds: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_folds = num_folds

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        done = int((result or {}).get(FOLDS_COMPLETED, 0) or 0)
        if trial_id in self._completed_trials or (done >= self.num_folds and not error):
            super().on_trial_complete(trial_id, result, error)
            return
        state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        self._ot_study.tell(self._ot_trials[trial_id], state=state)
        self._completed_trials.add(trial_id)


def make_searcher(spec: SweepSpec) -> PruningOptunaSearch:
    """The sweep's OptunaSearch (define-by-run space, seeded TPE or random sampler), PRUNED-aware."""
    if spec.search.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.search.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.search.seed)
    return PruningOptunaSearch(
        space=DefineByRun(spec),
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        sampler=sampler,
        num_folds=spec.folds.k,
    )


def _status(error: Any, folds_completed: int, k: int) -> str:
    if error is not None:
        return "failed"
    return "completed" if folds_completed >= k else "pruned"


def run_sweep(
    spec: SweepSpec,
    *,
    storage_path: Path,
    name: str,
    searcher: Any | None = None,
    num_cpus: int | None = None,
    trial_kwargs: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Run `spec` with Ray Tune + Optuna + ASHA (one report per fold); returns leaderboard rows, best first.

    Args:
        storage_path / name: Tune's experiment folder is `storage_path / name`; the folds are saved beside it.
        searcher: an OptunaSearch from `make_searcher(spec)` (default: a new one); pass one to inspect its study.
        num_cpus: for a local Ray instance started here (default: enough for `max_concurrent` trials); with
            `RAY_ADDRESS` set, `ray.init()` joins that cluster instead. An initialised Ray is used as it is.
        trial_kwargs: extra keyword arguments for `run_fold_trial` (tests: `crash_once_after_fold`).

    Rows: trial_id, params (dotted keys), cv mean/std, folds_completed, fold_scores (from the trial's last
    checkpoint), status (completed / pruned / failed), wall_time_s (Tune's time_total_s), error.
    """
    import ray
    from ray import tune
    from ray.tune import FailureConfig, RunConfig
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from cpews.training.data import DATA_DIR_ENV, resolve_data_root

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # inside a Ray job / pointed at a cluster: join it
            ray.init()
        else:  # a fresh local instance, never a stray one found on the machine
            wanted = num_cpus or max(1, math.ceil(spec.resources.cpu * spec.search.max_concurrent))
            ray.init(num_cpus=wanted, include_dashboard=False, address="local")
    base_cfg = spec.base_train_config()
    split = spec.folds.split or base_cfg.data.train_split
    root = resolve_data_root(base_cfg)
    saved = split_folds(root, base_cfg.data.dataset, split, spec.folds.k, spec.folds.seed)
    storage_path = Path(storage_path).resolve()
    storage_path.mkdir(parents=True, exist_ok=True)
    (storage_path / f"{name}.folds.json").write_text(json.dumps({"folds": saved.folds, "meta": saved.meta}))

    metric, mode, k = spec.objective.metric, spec.objective.mode, spec.folds.k
    searcher = searcher if searcher is not None else make_searcher(spec)
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=k,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_resources(
        tune.with_parameters(
            run_fold_trial,
            spec_dict=spec.to_dict(),
            folds=saved.folds,
            data_dir=os.environ.get(DATA_DIR_ENV),
            **dict(trial_kwargs or {}),
        ),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=metric,  # on both the searcher and here (orchestration-notes.md)
            mode=mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=spec.search.num_trials,
            time_budget_s=spec.time_budget_s,
        ),
        run_config=RunConfig(
            storage_path=str(storage_path), name=name, failure_config=FailureConfig(max_failures=1)
        ),
    )
    results = tuner.fit()

    rows: list[dict] = []
    for result in results:
        m = result.metrics or {}
        done = int(m.get(FOLDS_COMPLETED, 0) or 0)
        try:
            fold_scores = _load_completed(result.checkpoint)
        except (OSError, ValueError, KeyError):
            fold_scores = []
        rows.append(
            {
                "trial_id": m.get("trial_id") or Path(result.path).name,
                "params": _flatten(result.config or {}),
                CV_MEAN: m.get(CV_MEAN),
                CV_STD: m.get(CV_STD),
                FOLDS_COMPLETED: done,
                "fold_scores": fold_scores,
                "status": _status(result.error, done, k),
                "wall_time_s": m.get("time_total_s"),
                "path": result.path,
                "error": None if result.error is None else repr(result.error),
            }
        )
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (r["status"] != "completed", r[CV_MEAN] is None, sign * (r[CV_MEAN] or 0.0)))
    return rows

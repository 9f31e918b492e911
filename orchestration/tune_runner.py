"""Ray Tune pieces of a sweep: the searcher, the scheduler, the trainable, the tuner and the trial outcomes.

One Tune trial = one sampled configuration trained on every fold (`orchestration.trial.cv_trial`). ASHA's time
attribute is `cv/folds_completed`, so a configuration is judged after whole folds only; trials it stops early
reach Optuna as PRUNED, and failed trials as FAIL (`PruningOptunaSearch`; Ray's OptunaSearch tells COMPLETE with
the partial score, see docs/orchestration-notes.md). `TrialRunCloser` ends the MLflow runs of trials that Tune
stopped or gave up on, from the driver, because a stopped trial never runs its own clean-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from orchestration.search_space import DefineByRun, SweepSpec
from orchestration.tracking import finalize_spool, find_spool_dirs
from orchestration.trial import (
    CV_MEAN,
    CV_STD,
    FOLD_END,
    FOLDS_COMPLETED,
    SPOOL_DIR,
    TAG_STATUS,
    TRIAL_SPOOL,
    TrialContext,
    cv_trial,
    trial_name,
)

__all__ = [
    "CV_MEAN",
    "CV_STD",
    "PruningOptunaSearch",
    "TrialRunCloser",
    "close_trial_runs",
    "make_scheduler",
    "make_searcher",
    "make_trainable",
    "make_tuner",
    "restore_tuner",
    "trial_outcome",
]

CHECKPOINTS_KEPT = 2  # per trial: the newest (mid-fold or fold end) and the one before it


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED (not COMPLETE) for a trial stopped before its last fold.

    Ray's OptunaSearch tells COMPLETE with the last (partial-CV) score when a scheduler stops a trial, so TPE
    would learn from low-fidelity scores. It also tells COMPLETE for an errored trial that had reported a
    score; here an error is always FAIL. Trials that trained every fold keep Ray's behaviour (COMPLETE).
    Intermediate values reach Optuna once per fold (step = folds completed), not for the reports within a
    fold (whose CV mean does not change, and is NaN during the first fold).
    """

    def __init__(self, *args: Any, num_folds: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_folds = num_folds

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not result.get(FOLD_END) or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if value is not None and math.isfinite(value):
            self._ot_trials[trial_id].report(float(value), int(result.get(FOLDS_COMPLETED, 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials:
            return
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


def make_scheduler(spec: SweepSpec) -> Any:
    """ASHA over folds (time attribute `cv/folds_completed`, max_t = k) or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.type != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=FOLDS_COMPLETED,  # metric and mode come from TuneConfig
        max_t=spec.folds.k,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def make_trainable(spec: SweepSpec, context: TrialContext) -> Any:
    """`cv_trial` with the sweep's context and per-trial resources."""
    from ray import tune

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.with_resources(tune.with_parameters(cv_trial, context=context), resources)


def trial_outcome(status: str, last_result: Mapping[str, Any] | None, k: int) -> str:
    """completed | pruned | failed | interrupted | pending, from Tune's trial status and last result."""
    done = int((last_result or {}).get(FOLDS_COMPLETED, 0) or 0)
    if status == "ERROR":
        return "failed"
    if status == "TERMINATED":
        return "completed" if done >= k else "pruned"
    if status == "PENDING" and not last_result:
        return "pending"
    return "interrupted"


class TrialRunCloser(Callback):
    """Ends the MLflow runs of a trial that Tune stopped (pruned), gave up on (failed), or completed.

    A completed trial has ended its runs itself; this only delivers what its spools still hold. A pruned
    trial's run ends FINISHED with `cpews.status=pruned`, a failed one FAILED; an open fold run ends KILLED
    (pruned) or FAILED. Delivery here is bounded by `timeout_s` (the Tune loop waits for it); what is left is
    delivered by the driver at the end of the sweep.
    """

    def __init__(self, tracking_uri: str, trials_dir: Path, k: int, timeout_s: float = 3.0) -> None:
        self.tracking_uri, self.trials_dir, self.k, self.timeout_s = tracking_uri, Path(trials_dir), k, timeout_s

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.close(trial, "ERROR" if trial.status == "ERROR" else "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.close(trial, "ERROR")

    def close(self, trial: Any, status: str) -> None:
        outcome = trial_outcome(status, trial.last_result, self.k)
        close_trial_runs(self.trials_dir / trial.trial_id, outcome, self.tracking_uri, timeout_s=self.timeout_s)


def close_trial_runs(trial_dir: Path, outcome: str, tracking_uri: str | None, *, timeout_s: float) -> int:
    """End the open MLflow runs under `trial_dir` for `outcome`; returns the records still undelivered."""
    spools = find_spool_dirs(Path(trial_dir) / SPOOL_DIR)
    left = 0
    for spool in spools:
        is_trial = spool.name == TRIAL_SPOOL
        if outcome == "failed":
            status = "FAILED"
        elif outcome in ("pruned", "completed"):
            status = "FINISHED" if is_trial else "KILLED"
        else:  # interrupted: the resumed trial reopens these runs
            status = "KILLED"
        tags = {TAG_STATUS: outcome} if is_trial else None
        left += finalize_spool(spool, status, tracking_uri, timeout_s=timeout_s, tags=tags)
    return left


def make_tuner(
    spec: SweepSpec,
    context: TrialContext,
    *,
    storage_path: Path,
    name: str,
    searcher: PruningOptunaSearch | None = None,
    max_failures: int = 1,
) -> Any:
    """A new Tuner for `spec` (experiment folder `storage_path / name`)."""
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.search import ConcurrencyLimiter

    searcher = searcher if searcher is not None else make_searcher(spec)
    return tune.Tuner(
        make_trainable(spec, context),
        tune_config=tune.TuneConfig(
            metric=spec.objective.metric,  # on the searcher, the scheduler and here (orchestration-notes.md)
            mode=spec.objective.mode,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent),
            scheduler=make_scheduler(spec),
            num_samples=spec.search.num_trials,
            time_budget_s=spec.time_budget_s,
            reuse_actors=True,  # the next trial starts in a warm worker (torch and the project imported)
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=RunConfig(
            storage_path=str(Path(storage_path).resolve()),
            name=name,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            callbacks=[TrialRunCloser(context.tracking_uri, Path(context.trials_dir), spec.folds.k)],
            verbose=1,
        ),
    )


def restore_tuner(spec: SweepSpec, context: TrialContext, *, experiment_dir: Path) -> Any:
    """`Tuner.restore` of an interrupted sweep: finished trials stay, unfinished ones continue from their
    checkpoints, the searcher (Optuna study) and the scheduler come back from the experiment state."""
    from ray import tune

    return tune.Tuner.restore(
        str(Path(experiment_dir).resolve()),
        trainable=make_trainable(spec, context),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )

"""Ray Tune pieces of a sweep: the searcher, the scheduler, the trainable, the tuner and the trial outcomes.

One Tune trial = one sampled configuration trained on every fold (`orchestration.trial.cv_trial`). ASHA's time
attribute is `cv/folds_completed`, so a configuration is judged after whole folds only; trials it stops early
reach Optuna as PRUNED, and failed trials as FAIL (`PruningOptunaSearch`; Ray's OptunaSearch tells COMPLETE with
the partial score, see docs/orchestration-notes.md). `TrialRunCloser` ends the MLflow runs of trials that Tune
stopped or gave up on, from the driver, because a stopped trial never runs its own clean-up.

Why a trial stopped early is written down as it happens, in the sweep folder's `stops.jsonl` (`STOPS_FILE`): the
scheduler records each trial it stops before its last fold (`FoldASHAScheduler`), the time budget records when
it ran out (`BudgetStopper`). `trial_outcome` turns Tune's status, the last result and that record into the
trial's status: completed | pruned (by the scheduler) | timeout (by the sweep's time budget) | failed |
interrupted | pending.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TimeoutStopper

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
    "STATUSES",
    "STOPS_FILE",
    "BudgetStopper",
    "FoldASHAScheduler",
    "PruningOptunaSearch",
    "StopReasons",
    "TrialRunCloser",
    "close_trial_runs",
    "make_scheduler",
    "make_searcher",
    "make_trainable",
    "make_tuner",
    "read_stop_reasons",
    "restore_tuner",
    "trial_outcome",
]

CHECKPOINTS_KEPT = 2  # per trial: the newest (mid-fold or fold end) and the one before it
STOPS_FILE = "stops.jsonl"  # in the sweep folder: one JSON line per early stop (see the module docstring)
STATUSES = ("completed", "pruned", "timeout", "interrupted", "pending", "failed")  # leaderboard order
SCHEDULER_STOP, BUDGET_STOP = "scheduler", "time_budget"


class StopReasons(NamedTuple):
    """What `STOPS_FILE` says: the trials the scheduler stopped before their last fold, and whether the sweep's
    time budget ran out (Tune then stops every trial still running or pending)."""

    scheduler: frozenset[str]
    time_budget: bool

    def of(self, trial_id: str) -> str | None:
        """Why trial `trial_id` was stopped before its last fold, if it was: "scheduler" or "time_budget"."""
        if trial_id in self.scheduler:
            return SCHEDULER_STOP
        return BUDGET_STOP if self.time_budget else None


def record_stop(path: str | Path | None, record: Mapping[str, Any]) -> None:
    """Append `record` (with the time) to the stops file at `path` (nothing when `path` is None)."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({**record, "time": time.time()}, sort_keys=True) + "\n")


def read_stop_reasons(path: str | Path) -> StopReasons:
    """The stop reasons recorded in `path` (none when it does not exist; a torn last line is skipped)."""
    scheduler: set[str] = set()
    budget = False
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("reason") == SCHEDULER_STOP:
            scheduler.add(str(record.get("trial")))
        elif record.get("reason") == BUDGET_STOP:
            budget = True
    return StopReasons(frozenset(scheduler), budget)


class FoldASHAScheduler(ASHAScheduler):
    """ASHA that records each trial it stops before its last fold in the stops file (`stops_path`, None: not
    recorded), so that the leaderboard can tell a trial it pruned from one stopped by the time budget."""

    def __init__(self, *args: Any, stops_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stops_path = stops_path

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        done = result.get(self._time_attr)
        if decision == TrialScheduler.STOP and done is not None and done < self._max_t:
            record_stop(self.stops_path, {"trial": trial.trial_id, "reason": SCHEDULER_STOP, "folds": done})
        return decision


class BudgetStopper(TimeoutStopper):
    """The sweep's `time_budget_s` (Tune's own TimeoutStopper), recording in the stops file when it ran out."""

    def __init__(self, timeout_s: float, stops_path: str | None = None) -> None:
        super().__init__(timeout_s)
        self.stops_path = stops_path
        self.recorded = False

    def stop_all(self) -> bool:
        stop = super().stop_all()
        if stop and not self.recorded:
            self.recorded = True
            record_stop(self.stops_path, {"reason": BUDGET_STOP, "budget_s": self._timeout_seconds})
        return stop


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED (not COMPLETE) for a trial stopped before its last fold.

    Ray's OptunaSearch tells COMPLETE with the last (partial-CV) score when a scheduler stops a trial, so TPE
    would learn from low-fidelity scores. It also tells COMPLETE for an errored trial that had reported a
    score; here an error is always FAIL. Trials that trained every fold keep Ray's behaviour (COMPLETE).
    Intermediate values reach Optuna once per fold (step = folds completed), not for the reports within a
    fold (whose CV mean does not change, and is NaN during the first fold). Tune does not pass the result on
    which a trial is stopped to `on_trial_result` (ASHA's cut, or the last fold: ASHA stops a trial at max_t),
    only to `on_trial_complete`: that fold end is reported there, before the trial is told.
    """

    def __init__(self, *args: Any, num_folds: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_folds = num_folds

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report_fold_end(trial_id, result)

    def _report_fold_end(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        """Report a fold-end result's objective to Optuna at step = folds completed, once per step."""
        if not result or not result.get(FOLD_END) or trial_id not in self._ot_trials:
            return
        value, step = result.get(self.metric), int(result.get(FOLDS_COMPLETED, 0) or 0)
        # steps reported per trial (set here: a searcher unpickled from an older sweep has no such attribute)
        reported = self.__dict__.setdefault("_fold_steps", {}).setdefault(trial_id, set())
        if value is not None and math.isfinite(value) and step not in reported:
            self._ot_trials[trial_id].report(float(value), step)
            reported.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials:
            return
        if trial_id not in self._completed_trials:
            self._report_fold_end(trial_id, result)
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


def make_scheduler(spec: SweepSpec, stops_path: str | Path | None = None) -> Any:
    """ASHA over folds (time attribute `cv/folds_completed`, max_t = k; its stops recorded in `stops_path`) or
    FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    if spec.scheduler.type != "asha":
        return FIFOScheduler()
    return FoldASHAScheduler(
        time_attr=FOLDS_COMPLETED,  # metric and mode come from TuneConfig
        max_t=spec.folds.k,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
        stops_path=None if stops_path is None else str(stops_path),
    )


def make_trainable(spec: SweepSpec, context: TrialContext) -> Any:
    """`cv_trial` with the sweep's context and per-trial resources."""
    from ray import tune

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.with_resources(tune.with_parameters(cv_trial, context=context), resources)


def trial_outcome(status: str, last_result: Mapping[str, Any] | None, k: int, stopped_by: str | None = None) -> str:
    """completed | pruned | timeout | failed | interrupted | pending, from Tune's trial status, its last result
    and why it was stopped (`StopReasons.of`): a trial that Tune ended before its last fold is `timeout` when the
    time budget stopped it, else `pruned` (the scheduler's record, or a sweep from before stops were recorded)."""
    done = int((last_result or {}).get(FOLDS_COMPLETED, 0) or 0)
    if status == "ERROR":
        return "failed"
    if status == "TERMINATED":
        if done >= k:
            return "completed"
        return "timeout" if stopped_by == BUDGET_STOP else "pruned"
    if status == "PENDING" and not last_result:
        return "pending"
    return "interrupted"


class TrialRunCloser(Callback):
    """Ends the MLflow runs of a trial that Tune stopped (pruned), gave up on (failed), or completed.

    A completed trial has ended its runs itself; this only delivers what its spools still hold. A pruned
    trial's run ends FINISHED with `cpews.status=pruned`, a failed one FAILED; an open fold run ends KILLED
    (pruned) or FAILED. Delivery here is bounded by `timeout_s` (the Tune loop waits for it); what is left is
    delivered by the driver at the end of the sweep. (Tune does not call back for trials that the time budget
    stops: the driver ends those runs at the end of the sweep, as `timeout`.)
    """

    def __init__(self, tracking_uri: str, trials_dir: Path, k: int, timeout_s: float = 3.0,
                 stops_path: str | Path | None = None) -> None:
        self.tracking_uri, self.trials_dir, self.k, self.timeout_s = tracking_uri, Path(trials_dir), k, timeout_s
        self.stops_path = None if stops_path is None else str(stops_path)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.close(trial, "ERROR" if trial.status == "ERROR" else "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.close(trial, "ERROR")

    def close(self, trial: Any, status: str) -> None:
        reasons = read_stop_reasons(self.stops_path) if self.stops_path else StopReasons(frozenset(), False)
        outcome = trial_outcome(status, trial.last_result, self.k, reasons.of(trial.trial_id))
        close_trial_runs(self.trials_dir / trial.trial_id, outcome, self.tracking_uri, timeout_s=self.timeout_s)


def close_trial_runs(trial_dir: Path, outcome: str, tracking_uri: str | None, *, timeout_s: float) -> int:
    """End the open MLflow runs under `trial_dir` for `outcome`; returns the records still undelivered."""
    spools = find_spool_dirs(Path(trial_dir) / SPOOL_DIR)
    left = 0
    for spool in spools:
        is_trial = spool.name == TRIAL_SPOOL
        if outcome == "failed":
            status = "FAILED"
        elif outcome in ("pruned", "timeout", "completed"):
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
    stops = Path(storage_path).resolve() / STOPS_FILE
    budget = BudgetStopper(spec.time_budget_s, str(stops)) if spec.time_budget_s is not None else None
    return tune.Tuner(
        make_trainable(spec, context),
        tune_config=tune.TuneConfig(
            metric=spec.objective.metric,  # on the searcher, the scheduler and here (orchestration-notes.md)
            mode=spec.objective.mode,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent),
            scheduler=make_scheduler(spec, stops),
            num_samples=spec.search.num_trials,
            reuse_actors=True,  # the next trial starts in a warm worker (torch and the project imported)
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=RunConfig(
            storage_path=str(Path(storage_path).resolve()),
            name=name,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            stop=budget,  # the sweep's time_budget_s, recorded when it runs out
            callbacks=[TrialRunCloser(context.tracking_uri, Path(context.trials_dir), spec.folds.k,
                                      stops_path=stops)],
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

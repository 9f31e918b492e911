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

What Tune does not keep for a resume, the scheduler keeps itself: its rung records, in the sweep folder's
`scheduler_state.json` (`SCHEDULER_STATE_FILE`, see `FoldASHAScheduler`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TimeoutStopper

from cpews.training import keys
from orchestration.search_space import DefineByRun, SweepSpec
from orchestration.tracking import finalize_spool, find_spool_dirs, write_json_atomically
from orchestration.trial import (
    CV_MEAN,
    CV_STD,
    FOLD_END,
    FOLD_INDEX,
    FOLD_SCORE,
    FOLDS_COMPLETED,
    SPOOL_DIR,
    TAG_STATUS,
    TRIAL_LOG,
    TRIAL_SPOOL,
    TrialContext,
    cv_trial,
    trial_label,
    trial_name,
    trial_params,
)
from orchestration.warm_start import WarmStart, add_seed_trials, optuna_trials

__all__ = [
    "CV_MEAN",
    "CV_STD",
    "SCHEDULER_STATE_FILE",
    "STATUSES",
    "STOPS_FILE",
    "BudgetStopper",
    "FoldASHAScheduler",
    "PruningOptunaSearch",
    "StopReasons",
    "TrialEvents",
    "TrialRunCloser",
    "close_trial_runs",
    "describe_scheduler_state",
    "make_scheduler",
    "make_searcher",
    "make_trainable",
    "make_tuner",
    "read_scheduler_state",
    "read_stop_reasons",
    "restore_tuner",
    "trial_events_to",
    "trial_outcome",
]

CHECKPOINTS_KEPT = 2  # per trial: the newest (mid-fold or fold end) and the one before it
STOPS_FILE = "stops.jsonl"  # in the sweep folder: one JSON line per early stop (see the module docstring)
SCHEDULER_STATE_FILE = "scheduler_state.json"  # in the sweep folder: FoldASHAScheduler's records (resume)
SCHEDULER_STATE_FORMAT = "cpews-fold-asha/1"
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




def read_scheduler_state(path: str | Path) -> dict[str, Any] | None:
    """The scheduler state saved at `path` by `FoldASHAScheduler` (None when there is no such file).

    Raises:
        ValueError: the file is not a scheduler state of this format (the message names the file).
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != SCHEDULER_STATE_FORMAT:
        raise ValueError(f"{path}: not a scheduler state (no format {SCHEDULER_STATE_FORMAT!r})")
    rungs = state.get("brackets")
    if not isinstance(rungs, list) or not all(
        isinstance(rung, dict) and isinstance(rung.get("scores"), dict) for bracket in rungs for rung in bracket
    ):
        raise ValueError(f"{path}: its brackets are not lists of rungs with scores")
    return state


def describe_scheduler_state(state: Mapping[str, Any]) -> str:
    """The records of a saved scheduler state in a few words: trials per rung, trials cut."""
    rungs: dict[float, int] = {}
    for bracket in state["brackets"]:
        for rung in bracket:
            rungs[rung["milestone"]] = rungs.get(rung["milestone"], 0) + len(rung["scores"])
    reached = ", ".join(f"{count} at fold {milestone:g}" for milestone, count in sorted(rungs.items()) if count)
    return f"{reached or 'no rung records'}; {len(state.get('cut', {}))} cut"


class FoldASHAScheduler(ASHAScheduler):
    """ASHA over folds that records each trial it stops before its last fold in the stops file (`stops_path`,
    None: not recorded), so that the leaderboard can tell a trial it pruned from one stopped by the time budget,
    and keeps its own state in `state_path` (None: not kept) for a resumed sweep.

    Tune does not keep a scheduler's state: `Tuner.restore` brings back the scheduler pickled in `tuner.pkl` when
    the sweep started (empty rungs), and Tune never calls `save` / `restore` on it (it saves the searcher and the
    callbacks with its experiment state, not the scheduler). So this scheduler writes its rung records (which
    trial reached which fold with which score), the bracket of each trial and the trials it cut to `state_path`
    (JSON, written atomically) whenever they change, and a scheduler that Tune restored reads them back the first
    time Tune calls it. A trial recorded at a rung is not judged there again (it passed that cut), later trials
    are judged against the recorded scores, and a trial that was cut is stopped again at its first result (Tune
    resumes it when its stop had not reached the experiment state before the driver died).
    """

    def __init__(self, *args: Any, stops_path: str | None = None, state_path: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stops_path = stops_path
        self.state_path = state_path
        self._bracket_of: dict[str, int] = {}  # trial id -> index of its bracket (ASHA draws it at random)
        self._cut: dict[str, float] = {}  # trial id -> folds it had completed when this scheduler stopped it
        self._state_read = False  # whether `state_path` was read (once, at the first call from Tune)
        self._state_written: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_state_read"] = False  # a copy unpickled later reads the newest records first
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (`Tuner.restore`); a scheduler pickled before its state was kept neither reads nor writes it."""
        self.__dict__.update({"state_path": None, "_bracket_of": {}, "_cut": {}, "_state_read": True,
                              "_state_written": None})
        self.__dict__.update(state)

    def state(self) -> dict[str, Any]:
        """The scheduler's records as JSON data: per bracket, its rungs (milestone = folds completed, scores =
        trial id -> the objective as ASHA ranks it, negated for mode min); each trial's bracket; the trials cut."""
        return {
            "format": SCHEDULER_STATE_FORMAT,
            "time_attr": self._time_attr,
            "max_t": self._max_t,
            "metric": self._metric,
            "mode": self._mode,
            "brackets": [
                [{"milestone": milestone, "scores": dict(recorded)} for milestone, recorded in bracket._rungs]
                for bracket in self._brackets
            ],
            "trial_brackets": dict(self._bracket_of),
            "cut": dict(self._cut),
            "num_stopped": self._num_stopped,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take over the records of `state` (as `state()` returns it) for the rungs of matching milestones."""
        for bracket, saved in zip(self._brackets, state["brackets"]):
            scores = {float(rung["milestone"]): rung["scores"] for rung in saved}
            for milestone, recorded in bracket._rungs:
                recorded.clear()
                recorded.update({str(k): float(v) for k, v in scores.get(float(milestone), {}).items()})
        self._bracket_of = {str(k): int(v) for k, v in state.get("trial_brackets", {}).items()
                            if 0 <= int(v) < len(self._brackets)}
        self._cut = {str(k): float(v) for k, v in state.get("cut", {}).items()}
        self._num_stopped = int(state.get("num_stopped", self._num_stopped))
        for trial_id, index in self._bracket_of.items():  # trials Tune added before the state was read
            if trial_id in self._trial_info:
                self._trial_info[trial_id] = self._brackets[index]
        self._state_read, self._state_written = True, self.state()

    def save(self, checkpoint_path: str) -> None:
        write_json_atomically(checkpoint_path, self.state())

    def restore(self, checkpoint_path: str) -> None:
        state = read_scheduler_state(checkpoint_path)
        if state is None:
            raise FileNotFoundError(f"no scheduler state at {checkpoint_path}")
        self.load_state(state)

    def _read_state_once(self) -> None:
        """Read `state_path` the first time Tune calls (a scheduler restored by `Tuner.restore`; a new sweep has
        no such file)."""
        if self._state_read:
            return
        self._state_read = True
        state = read_scheduler_state(self.state_path) if self.state_path else None
        if state is not None:
            self.load_state(state)

    def _write_state(self) -> None:
        """Write the state to `state_path` when it changed since it was last written or read."""
        if not self.state_path:
            return
        state = self.state()
        if state != self._state_written:
            write_json_atomically(self.state_path, state)
            self._state_written = state

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._read_state_once()
        super().on_trial_add(tune_controller, trial)
        index = self._bracket_of.get(trial.trial_id)
        if index is not None:  # a restored trial stays in its bracket
            self._trial_info[trial.trial_id] = self._brackets[index]
        else:
            self._bracket_of[trial.trial_id] = self._brackets.index(self._trial_info[trial.trial_id])
        self._write_state()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._read_state_once()
        if trial.trial_id in self._cut:  # cut before the driver died; Tune resumed it: the decision stands
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        done = result.get(self._time_attr)
        if decision == TrialScheduler.STOP and done is not None and done < self._max_t:
            record_stop(self.stops_path, {"trial": trial.trial_id, "reason": SCHEDULER_STOP, "folds": done})
            self._cut[trial.trial_id] = float(done)
        self._write_state()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._read_state_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._write_state()


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

    `seed_trials` (finished Optuna trials of an earlier sweep: `orchestration.warm_start`) are added to the study
    when it is created: Ray's `evaluated_rewards` does not work with a define-by-run space.
    """

    def __init__(self, *args: Any, num_folds: int, seed_trials: Sequence[Any] = (), **kwargs: Any) -> None:
        self.num_folds = num_folds
        self.seed_trials = list(seed_trials)  # set first: OptunaSearch.__init__ creates the study
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        """Create the study (Ray's OptunaSearch; `points_to_evaluate` enqueued), then add the finished trials of
        an earlier sweep (`seed_trials`, `orchestration.warm_start.optuna_trials`) that it does not hold yet.
        A searcher that Tune restores gets its study back with them in it, without coming here."""
        super()._setup_study(mode)
        add_seed_trials(self._ot_study, self.__dict__.get("seed_trials", ()))

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


def make_searcher(spec: SweepSpec, warm_start: WarmStart | None = None) -> PruningOptunaSearch:
    """The sweep's OptunaSearch (define-by-run space, seeded TPE or random sampler, `search.start_points` tried
    first), PRUNED-aware, its study holding the trials of `warm_start` (an earlier sweep's); Optuna's own
    news (its study created, each trial told) is not printed, its warnings are."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
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
        points_to_evaluate=spec.start_point_params() or None,  # enqueued, in order
        seed_trials=optuna_trials(spec, warm_start) if warm_start is not None else (),
    )


def make_scheduler(spec: SweepSpec, stops_path: str | Path | None = None,
                   state_path: str | Path | None = None) -> Any:
    """ASHA over folds (time attribute `cv/folds_completed`, max_t = k; its stops recorded in `stops_path`, its
    state kept in `state_path`) or FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    if spec.scheduler.type != "asha":
        return FIFOScheduler()
    return FoldASHAScheduler(
        time_attr=FOLDS_COMPLETED,  # metric and mode come from TuneConfig
        max_t=spec.folds.k,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
        stops_path=None if stops_path is None else str(stops_path),
        state_path=None if state_path is None else str(state_path),
    )


def make_trainable(spec: SweepSpec, context: TrialContext) -> Any:
    """`cv_trial` with the sweep's context and per-trial resources (a multi-worker trial's are its Ray Train
    workers', `orchestration.ray_train.trial_resources`)."""
    from ray import tune

    from orchestration.ray_train import trial_resources

    return tune.with_resources(tune.with_parameters(cv_trial, context=context), trial_resources(spec.resources))


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


_EVENT_PRINTERS: list[Callable[[str], None]] = [print]  # where `TrialEvents` prints: the newest one
# Tune's list of the trials that failed, at its end, which the trial events and the summary give already (its
# traceback of each failed attempt is off: TUNE_PRINT_ALL_TRIAL_ERRORS=0, see `orchestration.sweep`)
_TUNE_FAILURE_NEWS = {"ray.tune.tune": "Trials did not complete"}


def _not_tune_failure_news(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TUNE_FAILURE_NEWS.get(record.name, "\0"))


@contextlib.contextmanager
def trial_events_to(out: Callable[[str], None]) -> Iterator[None]:
    """Print the trial events of `TrialEvents` with `out` in this block, instead of Tune's own reports of failed
    trials (a callback that Tune pickles cannot hold the sweep's printer itself: a restored sweep gets its
    callbacks back from `tuner.pkl`)."""
    loggers = [logging.getLogger(name) for name in _TUNE_FAILURE_NEWS]
    _EVENT_PRINTERS.append(out)
    for logger in loggers:
        logger.addFilter(_not_tune_failure_news)
    try:
        yield
    finally:
        _EVENT_PRINTERS.pop()
        for logger in loggers:
            logger.removeFilter(_not_tune_failure_news)


def _number(value: Any, digits: int = 4) -> str:
    """A score with `digits` decimals, "-" for None or NaN."""
    return "-" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _last_line(path: Path) -> str:
    """The last non-empty line of the text file `path` (an exception, for a trial log that ends with one)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[:500] if lines else "nothing logged"


class TrialEvents(Callback):
    """The sweep's terminal output while Tune runs: one line per trial event, naming the trial (`trial_label`:
    `t03 8f5a7c13`, its number and its id, as on the leaderboard) and the fold: started (its sampled params; its log file, once), fold done (its seg mIoU
    and the all-background floor of its images), retried, pruned, stopped by the time budget, failed (the last
    line of its log, the exception), completed (the CV mean ± std). What a trial prints goes to its log file
    (`orchestration.trial.cv_trial`), never here."""

    def __init__(self, trials_dir: str | Path, k: int, stops_path: str | Path | None = None) -> None:
        self.trials_dir, self.k = Path(trials_dir), k
        self.stops_path = None if stops_path is None else str(stops_path)
        self._logs_shown: set[str] = set()

    def say(self, text: str) -> None:
        _EVENT_PRINTERS[-1](text)

    def log_path(self, trial: Any) -> Path:
        return self.trials_dir / trial.trial_id / TRIAL_LOG

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = ", ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float)
                           else f"{key.rsplit('.', 1)[-1]}={value}"
                           for key, value in sorted(trial_params(trial.config).items()))
        where = "" if trial.trial_id in self._logs_shown else f"; log: {self.log_path(trial)}"
        self._logs_shown.add(trial.trial_id)
        self.say(f"{trial_label(trial)} started ({params}){where}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not result.get(FOLD_END):
            return
        done = int(result.get(FOLDS_COMPLETED, 0) or 0)
        self.say(f"{trial_label(trial)} fold {int(result.get(FOLD_INDEX, done - 1))} done ({done}/{self.k}): "
                 f"seg mIoU {_number(result.get(FOLD_SCORE))} (bkg {_number(result.get(keys.VAL_BASELINE_MIOU))})")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(f"{trial_label(trial)} retried after: {_last_line(self.log_path(trial))}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(f"{trial_label(trial)} failed: {_last_line(self.log_path(trial))} (log: {self.log_path(trial)})")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.status == "ERROR":
            return
        reasons = read_stop_reasons(self.stops_path) if self.stops_path else StopReasons(frozenset(), False)
        last = trial.last_result or {}
        outcome = trial_outcome("TERMINATED", last, self.k, reasons.of(trial.trial_id))
        done = int(last.get(FOLDS_COMPLETED, 0) or 0)
        if outcome == "completed":
            text = f"completed: cv seg mIoU {_number(last.get(CV_MEAN))} ± {_number(last.get(CV_STD))}"
        elif outcome == "timeout":
            text = f"stopped by the time budget after {done}/{self.k} folds"
        else:
            text = f"pruned after {done}/{self.k} folds (ASHA)"
        self.say(f"{trial_label(trial)} {text}")


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
    warm_start: WarmStart | None = None,
) -> Any:
    """A new Tuner for `spec` (experiment folder `storage_path / name`); without a `searcher`, `make_searcher`'s,
    seeded with `warm_start`."""
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search import ConcurrencyLimiter

    searcher = searcher if searcher is not None else make_searcher(spec, warm_start=warm_start)
    stops = Path(storage_path).resolve() / STOPS_FILE
    budget = BudgetStopper(spec.time_budget_s, str(stops)) if spec.time_budget_s is not None else None
    return tune.Tuner(
        make_trainable(spec, context),
        tune_config=tune.TuneConfig(
            metric=spec.objective.metric,  # on the searcher, the scheduler and here (orchestration-notes.md)
            mode=spec.objective.mode,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent),
            scheduler=make_scheduler(spec, stops, Path(storage_path).resolve() / SCHEDULER_STATE_FILE),
            num_samples=spec.search.num_trials,
            reuse_actors=True,  # the next trial starts in a warm worker (torch and the project imported)
            trial_name_creator=trial_label,  # `t03 8f5a7c13`: also the trial's MLflow run name
            trial_dirname_creator=trial_name,
        ),
        run_config=RunConfig(
            storage_path=str(Path(storage_path).resolve()),
            name=name,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            stop=budget,  # the sweep's time_budget_s, recorded when it runs out
            callbacks=[TrialEvents(context.trials_dir, spec.folds.k, stops),
                       CSVLoggerCallback(), JsonLoggerCallback(),  # Tune's own, without TensorBoard's (sweep.py)
                       TrialRunCloser(context.tracking_uri, Path(context.trials_dir), spec.folds.k,
                                      stops_path=stops)],
            verbose=0,  # no status tables: TrialEvents prints the trial events
        ),
    )


def restore_tuner(spec: SweepSpec, context: TrialContext, *, experiment_dir: Path) -> Any:
    """`Tuner.restore` of an interrupted sweep: finished trials stay, unfinished ones continue from their
    checkpoints (`orchestration.trial.load_trial_state`: the furthest valid one), the searcher (the Optuna study)
    comes back from Tune's experiment state, the scheduler from `tuner.pkl` with its records read back from the
    sweep folder's `SCHEDULER_STATE_FILE` (`FoldASHAScheduler`)."""
    from ray import tune

    return tune.Tuner.restore(
        str(Path(experiment_dir).resolve()),
        trainable=make_trainable(spec, context),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )

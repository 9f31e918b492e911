"""Tune pieces of a sweep, driven by hand: the PRUNED-aware Optuna searcher, trial outcomes, ASHA over folds."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.ray


def test_searcher_tells_pruned_for_partial_cv() -> None:
    """PruningOptunaSearch (a real OptunaSearch, driven by hand): partial CV -> PRUNED, full CV -> COMPLETE,
    an error -> FAIL (Ray's own class would say COMPLETE for the first and the last)."""
    import optuna

    from orchestration.search_space import load_sweep, smoke
    from orchestration.trial import CV_MEAN, FOLD_END, FOLDS_COMPLETED
    from orchestration.tune_runner import make_searcher

    spec = smoke(load_sweep("demo", check_paths=False))
    searcher = make_searcher(spec)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert set(first) == set(spec.searched_keys())  # dotted keys (Ray unflattens on "/", not ".")
    assert first != second
    searcher.on_trial_result("a", {CV_MEAN: 0.3, FOLDS_COMPLETED: 1, FOLD_END: 1.0, "training_iteration": 5})
    searcher.on_trial_complete("a", {CV_MEAN: 0.3, FOLDS_COMPLETED: 1, "training_iteration": 5})
    searcher.on_trial_complete("b", {CV_MEAN: 0.4, FOLDS_COMPLETED: spec.folds.k, "training_iteration": 9})
    searcher.suggest("c")
    searcher.on_trial_complete("c", {CV_MEAN: 0.5, FOLDS_COMPLETED: 1, "training_iteration": 5}, error=True)
    trials = searcher._ot_study.get_trials(deepcopy=False)
    State = optuna.trial.TrialState
    assert [t.state for t in trials] == [State.PRUNED, State.COMPLETE, State.FAIL]
    assert trials[0].intermediate_values == {1: 0.3}


def test_searcher_reports_fold_ends_only() -> None:
    """Reports inside a fold (NaN CV mean during the first fold) do not reach Optuna; fold ends do, keyed by
    the number of folds done."""
    from orchestration.search_space import load_sweep, smoke
    from orchestration.trial import CV_MEAN, FOLD_END, FOLDS_COMPLETED
    from orchestration.tune_runner import make_searcher

    searcher = make_searcher(smoke(load_sweep("demo", check_paths=False)))
    searcher.suggest("a")
    for i, (mean, done, end) in enumerate([(math.nan, 0, 0.0), (0.2, 1, 1.0), (0.2, 1, 0.0), (0.25, 2, 1.0)]):
        searcher.on_trial_result("a", {CV_MEAN: mean, FOLDS_COMPLETED: done, FOLD_END: end, "training_iteration": i})
    (trial,) = searcher._ot_study.get_trials(deepcopy=False)
    assert trial.intermediate_values == {1: 0.2, 2: 0.25}


def test_searcher_gets_the_fold_end_on_which_tune_stops_a_trial() -> None:
    """Tune passes the result on which a trial is stopped (ASHA's cut; ASHA's stop at max_t after the last
    fold) to `on_trial_complete` only, never to `on_trial_result`: that fold end still reaches Optuna, once."""
    import warnings

    import optuna

    from orchestration.search_space import load_sweep, smoke
    from orchestration.trial import CV_MEAN, FOLD_END, FOLDS_COMPLETED
    from orchestration.tune_runner import make_searcher

    searcher = make_searcher(smoke(load_sweep("demo", check_paths=False)))  # k = 2
    searcher.suggest("cut"), searcher.suggest("full"), searcher.suggest("fifo")
    # cut by ASHA at its first rung: the fold-end result goes to on_trial_complete alone
    searcher.on_trial_result("cut", {CV_MEAN: math.nan, FOLDS_COMPLETED: 0, FOLD_END: 0.0})
    searcher.on_trial_complete("cut", {CV_MEAN: 0.3, FOLDS_COMPLETED: 1, FOLD_END: 1.0})
    # passed the cut; ASHA stops it at max_t on its last fold end
    searcher.on_trial_result("full", {CV_MEAN: 0.4, FOLDS_COMPLETED: 1, FOLD_END: 1.0})
    searcher.on_trial_complete("full", {CV_MEAN: 0.45, FOLDS_COMPLETED: 2, FOLD_END: 1.0})
    # FIFO: the last fold end comes through on_trial_result, then again with the completion (not twice)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        for done, mean in ((1, 0.2), (2, 0.25)):
            searcher.on_trial_result("fifo", {CV_MEAN: mean, FOLDS_COMPLETED: done, FOLD_END: 1.0})
        searcher.on_trial_complete("fifo", {CV_MEAN: 0.25, FOLDS_COMPLETED: 2, FOLD_END: 1.0})
    cut, full, fifo = searcher._ot_study.get_trials(deepcopy=False)
    State = optuna.trial.TrialState
    assert (cut.state, cut.intermediate_values) == (State.PRUNED, {1: 0.3})
    assert (full.state, full.intermediate_values, full.value) == (State.COMPLETE, {1: 0.4, 2: 0.45}, 0.45)
    assert (fifo.state, fifo.intermediate_values) == (State.COMPLETE, {1: 0.2, 2: 0.25})


@pytest.mark.parametrize(
    ("status", "last", "stopped_by", "expected"),
    [
        ("TERMINATED", {"cv/folds_completed": 3}, None, "completed"),
        ("TERMINATED", {"cv/folds_completed": 3}, "time_budget", "completed"),
        ("TERMINATED", {"cv/folds_completed": 1}, "scheduler", "pruned"),
        ("TERMINATED", {"cv/folds_completed": 1}, None, "pruned"),  # a sweep from before stops were recorded
        ("TERMINATED", {"cv/folds_completed": 2}, "time_budget", "timeout"),
        ("TERMINATED", {}, "time_budget", "timeout"),  # stopped by the budget before it started
        ("ERROR", {"cv/folds_completed": 3}, None, "failed"),
        ("RUNNING", {"cv/folds_completed": 1}, None, "interrupted"),
        ("PAUSED", {}, None, "interrupted"),
        ("PENDING", {}, None, "pending"),
    ],
)
def test_trial_outcome(status: str, last: dict, stopped_by: str | None, expected: str) -> None:
    from orchestration.tune_runner import trial_outcome

    assert trial_outcome(status, last, 3, stopped_by) == expected


def test_scheduler_and_time_budget_record_their_stops(tmp_path) -> None:
    """ASHA writes down the trial it cuts (not the one it stops at max_t after its last fold); the budget
    stopper writes down once that it ran out; `read_stop_reasons` tells the two apart."""
    import time

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestration.search_space import load_sweep, smoke
    from orchestration.trial import CV_MEAN, FOLDS_COMPLETED
    from orchestration.tune_runner import BudgetStopper, make_scheduler, read_stop_reasons

    stops = tmp_path / "stops.jsonl"
    spec = smoke(load_sweep("demo", ["scheduler.type=asha"], check_paths=False))  # k = 2, grace 1, factor 2
    scheduler = make_scheduler(spec, stops)
    scheduler.set_search_properties(spec.objective.metric, spec.objective.mode)
    good, bad = Trial("cv_trial", stub=True), Trial("cv_trial", stub=True)
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {CV_MEAN: 0.6, FOLDS_COMPLETED: 1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {CV_MEAN: 0.2, FOLDS_COMPLETED: 1}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, good, {CV_MEAN: 0.6, FOLDS_COMPLETED: 2}) == TrialScheduler.STOP
    reasons = read_stop_reasons(stops)
    assert reasons.scheduler == {bad.trial_id} and not reasons.time_budget
    assert (reasons.of(bad.trial_id), reasons.of(good.trial_id)) == ("scheduler", None)

    budget = BudgetStopper(0.2, str(stops))
    assert budget.stop_all() is False  # the clock starts at the first check
    time.sleep(0.3)
    assert budget.stop_all() is True and budget.stop_all() is True
    with open(stops, "a") as handle:
        handle.write('{"reason": "sched')  # a torn last line is skipped
    reasons = read_stop_reasons(stops)
    assert reasons.time_budget and reasons.scheduler == {bad.trial_id}
    assert (reasons.of(bad.trial_id), reasons.of(good.trial_id)) == ("scheduler", "time_budget")
    assert sum('"time_budget"' in line for line in stops.read_text().splitlines()) == 1


def test_asha_stops_on_fold_boundaries_only() -> None:
    """ASHA's time attribute is the number of finished folds: reports inside a fold never stop a trial, and
    the second of two trials is stopped after fold 1 when it is worse (grace 1, factor 2)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestration.search_space import load_sweep, smoke
    from orchestration.trial import CV_MEAN, FOLDS_COMPLETED
    from orchestration.tune_runner import make_scheduler

    spec = smoke(load_sweep("demo", ["scheduler.type=asha"], check_paths=False))
    scheduler = make_scheduler(spec)
    scheduler.set_search_properties(spec.objective.metric, spec.objective.mode)
    good, bad = Trial("cv_trial", stub=True), Trial("cv_trial", stub=True)
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {CV_MEAN: math.nan, FOLDS_COMPLETED: 0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, good, {CV_MEAN: 0.6, FOLDS_COMPLETED: 1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {CV_MEAN: math.nan, FOLDS_COMPLETED: 0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {CV_MEAN: 0.2, FOLDS_COMPLETED: 1}) == TrialScheduler.STOP


def test_scheduler_state_is_kept_and_restored_as_tune_restores_the_scheduler(tmp_path) -> None:
    """ASHA over folds (grace 1, factor 2, k = 2: one rung, at fold 1) writes its records as they change; a
    scheduler unpickled as `Tuner.restore` does it (from when the sweep started: empty rungs) reads them back at
    Tune's first call. Then a trial that passed the cut is not judged again, a trial that was cut stays cut,
    and new trials are judged against the recorded scores. A scheduler without the records judges differently.
    Cutoff = the median of the scores recorded at the rung (`np.nanpercentile(scores, 50)`)."""
    import json
    import pickle

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestration.search_space import load_sweep, smoke
    from orchestration.trial import CV_MEAN, FOLDS_COMPLETED
    from orchestration.tune_runner import make_scheduler, read_scheduler_state, read_stop_reasons

    CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
    spec = smoke(load_sweep("demo", ["scheduler.type=asha"], check_paths=False))
    stops, state_file = tmp_path / "stops.jsonl", tmp_path / "scheduler_state.json"
    pickled = pickle.dumps(make_scheduler(spec, stops, state_file))  # tuner.pkl: written when the sweep starts
    a, b, c, d, e = (Trial("cv_trial", stub=True) for _ in range(5))

    def fold_end(scheduler, trial, score: float, folds: int = 1) -> str:
        return scheduler.on_trial_result(None, trial, {CV_MEAN: score, FOLDS_COMPLETED: folds})

    first = pickle.loads(pickled)
    first.set_search_properties(spec.objective.metric, spec.objective.mode)
    for trial in (a, b, c):
        first.on_trial_add(None, trial)
    assert fold_end(first, a, 0.5) == CONTINUE  # nothing recorded yet
    assert fold_end(first, b, 0.6) == CONTINUE  # cutoff 0.5
    assert fold_end(first, c, 0.3) == STOP  # cutoff median(0.5, 0.6) = 0.55
    saved = read_scheduler_state(state_file)
    (top, rung) = saved["brackets"][0]
    assert (top["milestone"], top["scores"]) == (2, {})
    assert (rung["milestone"], rung["scores"]) == (1, {a.trial_id: 0.5, b.trial_id: 0.6, c.trial_id: 0.3})
    assert saved["cut"] == {c.trial_id: 1.0}
    assert not list(tmp_path.glob(".scheduler_state.json.*"))  # written through a temporary file, replaced

    # the driver dies; `sweep resume`: Tune unpickles the scheduler and adds every trial of the sweep again
    restored = pickle.loads(pickled)
    restored.set_search_properties(spec.objective.metric, spec.objective.mode)
    for trial in (a, b, c, d, e):
        restored.on_trial_add(None, trial)
    assert fold_end(restored, e, 0.9) == CONTINUE  # a new trial: cutoff median(0.3, 0.5, 0.6) = 0.5
    assert fold_end(restored, b, 0.6) == CONTINUE  # passed the cut before: not judged again
    assert fold_end(restored, d, 0.45) == STOP  # cutoff median(0.3, 0.5, 0.6, 0.9) = 0.55
    assert fold_end(restored, c, float("nan"), folds=0) == STOP  # cut before, resumed by Tune: stopped again
    assert fold_end(restored, b, 0.62, folds=2) == STOP  # its last fold (max_t): completed
    rung = read_scheduler_state(state_file)["brackets"][0][1]
    assert rung["scores"] == {a.trial_id: 0.5, b.trial_id: 0.6, c.trial_id: 0.3, e.trial_id: 0.9, d.trial_id: 0.45}
    assert read_stop_reasons(stops).scheduler == {c.trial_id, d.trial_id}
    assert sum(json.loads(line)["trial"] == c.trial_id for line in stops.read_text().splitlines()) == 1

    # without the records (what Tune alone restores), the trial that had passed is cut by the newcomer's score
    bare = make_scheduler(spec)
    bare.set_search_properties(spec.objective.metric, spec.objective.mode)
    for trial in (a, b, c, d, e):
        bare.on_trial_add(None, trial)
    assert fold_end(bare, e, 0.9) == CONTINUE
    assert fold_end(bare, b, 0.6) == STOP

    # the scheduler API's save / restore write and read the same JSON
    restored.save(str(tmp_path / "copy.json"))
    again = make_scheduler(spec)
    again.set_search_properties(spec.objective.metric, spec.objective.mode)
    again.restore(str(tmp_path / "copy.json"))
    assert again.state() == restored.state() == read_scheduler_state(state_file)


def test_an_unreadable_scheduler_state_is_named() -> None:
    import tempfile
    from pathlib import Path

    from orchestration.tune_runner import read_scheduler_state

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scheduler_state.json"
        assert read_scheduler_state(path) is None
        path.write_text('{"brackets": [[{"milestone": 1, "sco')
        with pytest.raises(ValueError, match=f"^{path}: not JSON"):
            read_scheduler_state(path)
        path.write_text('{"brackets": []}')
        with pytest.raises(ValueError, match=f"^{path}: not a scheduler state"):
            read_scheduler_state(path)

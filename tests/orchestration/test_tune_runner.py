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


@pytest.mark.parametrize(
    ("status", "last", "expected"),
    [
        ("TERMINATED", {"cv/folds_completed": 3}, "completed"),
        ("TERMINATED", {"cv/folds_completed": 1}, "pruned"),
        ("ERROR", {"cv/folds_completed": 3}, "failed"),
        ("RUNNING", {"cv/folds_completed": 1}, "interrupted"),
        ("PAUSED", {}, "interrupted"),
        ("PENDING", {}, "pending"),
    ],
)
def test_trial_outcome(status: str, last: dict, expected: str) -> None:
    from orchestration.tune_runner import trial_outcome

    assert trial_outcome(status, last, 3) == expected


def test_asha_stops_on_fold_boundaries_only() -> None:
    """ASHA's time attribute is the number of finished folds: reports inside a fold never stop a trial, and
    the second of two trials is stopped after fold 1 when it is worse (grace 1, factor 2)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestration.search_space import load_sweep, smoke
    from orchestration.trial import CV_MEAN, FOLDS_COMPLETED
    from orchestration.tune_runner import make_scheduler

    spec = smoke(load_sweep("demo", check_paths=False))
    scheduler = make_scheduler(spec)
    scheduler.set_search_properties(spec.objective.metric, spec.objective.mode)
    good, bad = Trial("cv_trial", stub=True), Trial("cv_trial", stub=True)
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {CV_MEAN: math.nan, FOLDS_COMPLETED: 0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, good, {CV_MEAN: 0.6, FOLDS_COMPLETED: 1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {CV_MEAN: math.nan, FOLDS_COMPLETED: 0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {CV_MEAN: 0.2, FOLDS_COMPLETED: 1}) == TrialScheduler.STOP

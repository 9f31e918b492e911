"""The sweep runner: Ray Tune + Optuna + ASHA on the smoke demo sweep (2 trials x 2 folds, CPU), for real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def ray_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Single-thread torch, a tmp `CPEWS_DATA_DIR`, and a 1-CPU local Ray instance shut down afterwards."""
    import ray

    from cpews.training.data import DATA_DIR_ENV

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        address="local",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_searcher_tells_pruned_for_partial_cv() -> None:
    """PruningOptunaSearch (a real OptunaSearch, driven by hand): partial CV -> PRUNED, full CV -> COMPLETE,
    an error -> FAIL (Ray's own class would say COMPLETE for the first and the last)."""
    import optuna

    from orchestration.search_space import load_sweep, smoke
    from orchestration.tune_runner import CV_MEAN, FOLDS_COMPLETED, make_searcher

    spec = smoke(load_sweep("demo", check_paths=False))
    searcher = make_searcher(spec)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert set(first) == set(spec.searched_keys())  # dotted keys (Ray unflattens on "/", not ".")
    assert first != second
    searcher.on_trial_result("a", {CV_MEAN: 0.3, FOLDS_COMPLETED: 1, "training_iteration": 1})
    searcher.on_trial_complete("a", {CV_MEAN: 0.3, FOLDS_COMPLETED: 1, "training_iteration": 1})
    searcher.on_trial_complete("b", {CV_MEAN: 0.4, FOLDS_COMPLETED: spec.folds.k, "training_iteration": 2})
    searcher.suggest("c")
    searcher.on_trial_complete("c", {CV_MEAN: 0.5, FOLDS_COMPLETED: 1, "training_iteration": 1}, error=True)
    states = [t.state for t in searcher._ot_study.get_trials(deepcopy=False)]
    State = optuna.trial.TrialState
    assert states == [State.PRUNED, State.COMPLETE, State.FAIL]


@pytest.mark.ray
@pytest.mark.slow
def test_micro_sweep_asha_prunes_through_optuna(ray_local: None, tmp_path: Path) -> None:
    """2 trials x 2 folds, run once per objective mode with the same seeds (so the same two configs and fold
    scores): ASHA (grace 1, factor 2) stops the second trial in exactly one of the two modes unless both
    fold-1 scores tie, so the PRUNED path is exercised whatever the scores are."""
    import optuna

    from orchestration.search_space import load_sweep, smoke
    from orchestration.tune_runner import CV_MEAN, FOLDS_COMPLETED, make_searcher, run_sweep

    statuses: list[str] = []
    first_fold: dict[str, list[float]] = {}
    for mode in ("max", "min"):
        spec = smoke(load_sweep("demo", [f"objective.mode={mode}"], check_paths=False))
        assert (spec.search.num_trials, spec.folds.k, spec.search.max_concurrent) == (2, 2, 1)
        searcher = make_searcher(spec)
        rows = run_sweep(spec, storage_path=tmp_path / "ray", name=f"micro-{mode}", searcher=searcher)

        assert len(rows) == 2
        assert (tmp_path / "ray" / f"micro-{mode}").is_dir()
        study_trials = searcher._ot_study.get_trials(deepcopy=False)
        assert len(study_trials) == 2
        by_params = {tuple(sorted(t.params.items())): t for t in study_trials}
        for row in rows:
            assert row["error"] is None, row["error"]
            assert 1 <= row[FOLDS_COMPLETED] <= spec.folds.k
            assert 0.0 <= row[CV_MEAN] <= 1.0
            assert row["status"] in {"completed", "pruned"}
            assert (row["status"] == "completed") == (row[FOLDS_COMPLETED] == spec.folds.k)
            assert len(row["fold_scores"]) == row[FOLDS_COMPLETED]
            assert row[CV_MEAN] == pytest.approx(sum(row["fold_scores"]) / len(row["fold_scores"]))
            assert set(row["params"]) == set(spec.searched_keys())
            ot_trial = by_params[tuple(sorted(row["params"].items()))]
            pruned = row[FOLDS_COMPLETED] < spec.folds.k
            expected = optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE
            assert ot_trial.state == expected, (mode, row, ot_trial.state)
            statuses.append(row["status"])
            first_fold.setdefault(str(sorted(row["params"].items())), []).append(row["fold_scores"][0])

    fold1 = [scores[0] for scores in first_fold.values()]
    assert len(fold1) == 2  # the same two configs in both modes (seeded sampler)
    print("statuses:", statuses, "first-fold scores:", first_fold)
    if fold1[0] != fold1[1]:
        assert statuses.count("pruned") == 1, (statuses, first_fold)


@pytest.mark.ray
@pytest.mark.slow
def test_retried_trial_skips_completed_folds(ray_local: None, tmp_path: Path) -> None:
    """A trial that crashes after fold 0 is retried (max_failures=1) from its checkpoint and trains fold 1 only."""
    from orchestration.search_space import load_sweep, smoke, validate_sweep
    from orchestration.tune_runner import FOLDS_COMPLETED, run_sweep

    data = smoke(load_sweep("demo", check_paths=False)).to_dict()
    data["search"]["num_trials"] = 1  # smoke() sets 2 trials; one is enough here
    data["scheduler"]["type"] = "fifo"
    spec = validate_sweep(data, check_paths=False)
    rows = run_sweep(
        spec, storage_path=tmp_path / "ray", name="retry", trial_kwargs={"crash_once_after_fold": 0}
    )

    assert len(rows) == 1
    row = rows[0]
    assert row["error"] is None, row["error"]
    assert (row["status"], row[FOLDS_COMPLETED], len(row["fold_scores"])) == ("completed", 2, 2)
    assert (Path(row["path"]) / "crashed_once").exists()
    assert (Path(row["path"]) / "folds_trained.log").read_text().split() == ["0", "1"]

"""Warm start of a sweep from an earlier one: which sweeps fit, which trials seed the new study and how.

The earlier sweep is a folder built here (sweep.yaml, state.json, leaderboard.json; no Tune folder, no MLflow
run), read the way `cpews sweep run --warm-start` reads it. Only the searcher test needs Ray.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def demo(*overrides: str):
    from orchestration.search_space import load_sweep

    return load_sweep("demo", overrides, check_paths=False)


def row(trial: str, status: str, fold_scores: list[float], **params) -> dict:
    """A leaderboard row as `leaderboard_rows` writes it (the demo's params, some replaced by `params`)."""
    base = {
        "cam.high_threshold": 0.3,
        "cam.low_threshold": 0.05,
        "loss.ism_weight": 0.3,
        "loss.pdl_weight": 0.1,
        "loss.ssl_weight": 0.01,
        "model.ism_depth": 2,
        "optim.lr": 0.001,
        "proto.num_prototypes": 10,
    }
    mean = statistics.fmean(fold_scores) if fold_scores else None
    return {
        "trial": trial,
        "status": status,
        "params": {**base, **params},
        "fold_scores": fold_scores,
        "cv_miou_mean": mean,
        "folds_completed": len(fold_scores),
        "cv_miou_std": None,
    }


def earlier_sweep(run_dir: Path, name: str, spec, rows: list[dict]) -> None:
    """A finished sweep's folder (`runs/sweeps/<name>`) as `read_leaderboard` reads it without Tune or MLflow:
    no Tune experiment and no MLflow store in state.json, so the rows come from leaderboard.json."""
    from orchestration.sweep import renamed

    root = run_dir / "sweeps" / name
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(renamed(spec, name).to_yaml())
    (root / "state.json").write_text(json.dumps({"format": "cpews-sweep/1", "name": name}))
    (root / "leaderboard.json").write_text(json.dumps({"sweep": name, "trials": rows}))


EARLIER_ROWS = [
    row("best", "completed", [0.4, 0.5, 0.6]),
    row("cut", "pruned", [0.3], **{"proto.num_prototypes": 15}),
    row("broke", "failed", [0.2]),
    row("late", "timeout", [0.35, 0.45]),
    row("stopped", "interrupted", []),
    row("waiting", "pending", []),
]


def test_the_new_study_holds_the_earlier_trials(tmp_path: Path) -> None:
    """Completed -> COMPLETE with the CV mean and the CV mean after each fold (step = folds completed); pruned
    -> PRUNED with its intermediate values (and the last as its value, as Optuna's tell gives it); failed,
    timed out, interrupted and pending trials are left out and counted. Seeding a study twice adds nothing."""
    import optuna

    from orchestration.sweep import _sweep_params
    from orchestration.warm_start import (
        WARM_START_ATTR,
        add_seed_trials,
        load_warm_start,
        optuna_trials,
        read_warm_start,
        write_warm_start,
    )

    run_dir = tmp_path / "runs"
    earlier_sweep(run_dir, "old", demo(), EARLIER_ROWS)
    spec = demo()
    warm = load_warm_start("old", spec, run_dir=run_dir)
    assert (
        warm.describe()
        == "warm start from old: 1 completed + 1 pruned trials seeded, 0 outside the new space skipped"
    )
    assert warm.counts() == {"completed": 1, "pruned": 1, "outside": 0, "ignored": 4}

    study = optuna.create_study(direction="maximize")
    assert add_seed_trials(study, optuna_trials(spec, warm)) == 2
    assert add_seed_trials(study, optuna_trials(spec, warm)) == 0  # held already (by their warm-start names)
    completed, pruned = study.get_trials(deepcopy=False)
    State = optuna.trial.TrialState
    assert (completed.state, completed.value) == (State.COMPLETE, pytest.approx(0.5))
    assert completed.intermediate_values == pytest.approx({1: 0.4, 2: 0.45, 3: 0.5})  # (0.4 + 0.5) / 2 = 0.45
    assert completed.params == EARLIER_ROWS[0]["params"]
    assert completed.user_attrs == {WARM_START_ATTR: "old/best"}
    assert (pruned.state, pruned.value, pruned.intermediate_values) == (State.PRUNED, 0.3, {1: 0.3})
    assert pruned.params["proto.num_prototypes"] == 15
    assert study.best_trial.number == completed.number

    write_warm_start(tmp_path / "warm_start.json", warm)  # what the new sweep keeps for a resume
    assert read_warm_start(tmp_path / "warm_start.json") == warm
    assert read_warm_start(tmp_path / "missing.json") is None
    params = _sweep_params(spec, warm)
    assert params["sweep.warm_start"] == "old" and params["sweep.warm_start.ignored"] == 4
    assert _sweep_params(spec)["sweep.warm_start"] == "none"


def test_trials_outside_the_new_space_are_skipped_and_counted(tmp_path: Path) -> None:
    """A refined space (narrower range, other choices) keeps the trials it can produce; the others are
    counted, not seeded; a float on a bound (to rounding) is kept inside the range."""
    from orchestration.warm_start import load_warm_start

    run_dir = tmp_path / "runs"
    earlier_sweep(
        run_dir,
        "old",
        demo(),
        [
            row("inside", "completed", [0.5, 0.5, 0.5], **{"loss.pdl_weight": 0.2}),
            row("on-bound", "completed", [0.5, 0.5, 0.5], **{"loss.pdl_weight": 0.05 * (1 - 1e-15)}),
            row("too-small", "completed", [0.5, 0.5, 0.5], **{"loss.pdl_weight": 0.04}),
            row("dropped-choice", "pruned", [0.3], **{"proto.num_prototypes": 5}),
            row("kept-choice", "pruned", [0.3], **{"proto.num_prototypes": 20}),
        ],
    )
    refined = demo(
        "space.loss.pdl_weight={loguniform: [0.05, 0.3]}",
        "space.proto.num_prototypes={categorical: [10, 15, 20]}",
    )
    warm = load_warm_start("old", refined, run_dir=run_dir)
    assert [seed.trial for seed in warm.trials] == ["inside", "on-bound", "kept-choice"]
    assert warm.trials[1].params["loss.pdl_weight"] == 0.05
    assert (
        warm.describe()
        == "warm start from old: 2 completed + 1 pruned trials seeded, 2 outside the new space skipped"
    )


def test_a_conditional_key_must_be_active_in_the_new_space_as_in_the_trial() -> None:
    from orchestration.warm_start import outside_reason

    spec = demo("space.loss.ssl_weight.when={proto.num_prototypes: 10}")
    params = row("t", "completed", [0.5])["params"]
    assert outside_reason(spec, params) is None  # 10 prototypes: ssl_weight is sampled here too
    assert "loss.ssl_weight not sampled here" in outside_reason(spec, {**params, "proto.num_prototypes": 15})
    without = {k: v for k, v in params.items() if k != "loss.ssl_weight"}
    assert "loss.ssl_weight is sampled here but absent" in outside_reason(spec, without)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["space.loss.ssl_weight=null"], "its space searches loss.ssl_weight, this one does not"),
        (
            [
                "space.loss.ssl_weight=null",
                "fixed.loss.ssl_weight=0.01",
                "fixed.train.batch_size=null",
                "space.train.batch_size={categorical: [4, 8]}",
            ],
            "its space searches loss.ssl_weight, this one does not; this space searches train.batch_size, its space "
            "does not",
        ),
        (
            ["space.loss.ism_weight={loguniform: [0.1, 0.5]}"],
            "its space searches loss.ism_weight as uniform, this one as loguniform",
        ),
        (
            ["fixed.optim.max_iters=300"],
            "optim.max_iters is 500 in its trials (fixed), 300 in this one's (fixed)",
        ),
        (
            ["fixed.loss.seg_weight=0.2"],
            "loss.seg_weight is 0.1 in its trials (base config synthetic_demo), 0.2 in this one's (fixed)",
        ),
        (
            ["folds.k=2"],
            "its folds are k=3 seed=0 split=train_aug, this one's are k=2 seed=0 split=train_aug",
        ),
        (
            ["folds.seed=1"],
            "its folds are k=3 seed=0 split=train_aug, this one's are k=3 seed=1 split=train_aug",
        ),
        (
            ["objective.mode=min"],
            "its objective is cv/miou_seg_mean (max), this one's is cv/miou_seg_mean (min)",
        ),
    ],
)
def test_an_incompatible_sweep_is_refused_with_the_reason(
    tmp_path: Path, overrides: list[str], reason: str
) -> None:
    from orchestration.sweep import SweepError
    from orchestration.warm_start import load_warm_start, warm_start_problems

    assert "; ".join(warm_start_problems(demo(), demo(*overrides))) == reason
    run_dir = tmp_path / "runs"
    earlier_sweep(run_dir, "old", demo(), EARLIER_ROWS)
    with pytest.raises(SweepError) as refused:
        load_warm_start("old", demo(*overrides), run_dir=run_dir)
    assert str(refused.value) == f"--warm-start old: {reason}"


def test_what_may_differ_between_the_sweeps() -> None:
    """Ranges, choices, conditions, the search and its scheduler, resources and bookkeeping settings."""
    from orchestration.warm_start import warm_start_problems

    widened = demo(
        "space.loss.pdl_weight={loguniform: [0.01, 0.5]}",
        "space.model.ism_depth={categorical: [1, 2, 3]}",
        "space.loss.ssl_weight.when={proto.num_prototypes: 10}",
        "search.num_trials=20",
        "search.algorithm=random",
        "scheduler.type=fifo",
        "search.max_concurrent=1",
        "fixed.train.log_every=5",
        "fixed.train.checkpoint_every=50",
        "fixed.eval.every=100",  # the space table's setting (benchmarks/search_space_table.py)
        "time_budget_s=null",
        "name=other",
    )
    assert warm_start_problems(demo(), widened) == []


def test_the_cli_refuses_a_missing_earlier_sweep(tmp_path: Path) -> None:
    """One line naming it, before anything is made (no data, no run folder)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpews",
            "sweep",
            "run",
            "demo",
            "--warm-start",
            "nosuch",
            "--run-dir",
            "runs",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"cpews: error: --warm-start nosuch: no sweep 'nosuch' in {(tmp_path / 'runs' / 'sweeps').resolve()} (sweeps there: none)"
    ], proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_the_searcher_is_seeded_once_and_tries_its_start_points_first(tmp_path: Path) -> None:
    """make_searcher: start points stay enqueued ahead; the seeded study survives Tune's pickling and a
    restore (no second seeding)."""
    import pickle

    import optuna

    from orchestration.tune_runner import make_searcher
    from orchestration.warm_start import seed_trials

    spec = demo("search.start_points=[{loss.pdl_weight: 0.07}]")
    warm = seed_trials(spec, EARLIER_ROWS, "old")
    searcher = make_searcher(spec, warm)
    State = optuna.trial.TrialState
    states = [t.state for t in searcher._ot_study.get_trials(deepcopy=False)]
    assert states == [State.WAITING, State.COMPLETE, State.PRUNED]
    assert searcher.suggest("a")["loss.pdl_weight"] == 0.07

    restored = pickle.loads(pickle.dumps(searcher))  # as Tune keeps it in tuner.pkl
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored.restore(str(tmp_path / "searcher.pkl"))  # as Tuner.restore brings back its state
    assert len(restored._ot_study.get_trials(deepcopy=False)) == 3
    assert [t.state for t in make_searcher(spec)._ot_study.get_trials()] == [State.WAITING]  # no warm start

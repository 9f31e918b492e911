"""Sweeps end to end, for real: a local Ray instance, Optuna, ASHA, the trainer on the synthetic data, MLflow.

Every sweep here is the smoke version of `search_spaces/demo.yaml` (2 trials x 2 folds x 8 iterations, one
trial at a time), about 30 s each on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def smoke_spec(*overrides: str, name: str = "micro"):
    """The smoke demo sweep under ASHA (grace 1, factor 2: the scheduler whose stops these tests follow), then
    `overrides` (sweep-file `key=value`, applied after the shrinking; `scheduler.type=fifo` for none)."""
    from orchestration.search_space import apply_overrides, load_sweep, smoke, validate_sweep

    data = smoke(load_sweep("demo", check_paths=False)).to_dict()
    data = apply_overrides(data, ["scheduler.type=asha", *overrides, f"name={name}", f"tracking.experiment={name}"])
    return validate_sweep(data, check_paths=False)


def sweep_runs(uri: str, experiment: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


def run_tree(runs: list) -> tuple[list, list, list]:
    """(sweep runs, trial runs, fold runs), each checked to hang under the right parent."""
    by_kind: dict[str, list] = {"sweep": [], "trial": [], "fold": []}
    for run in runs:
        by_kind[run.data.tags["cpews.kind"]].append(run)
    ids = {kind: {r.info.run_id for r in rs} for kind, rs in by_kind.items()}
    for run in by_kind["trial"]:
        assert run.data.tags["mlflow.parentRunId"] in ids["sweep"]
    for run in by_kind["fold"]:
        assert run.data.tags["mlflow.parentRunId"] in ids["trial"]
    return by_kind["sweep"], by_kind["trial"], by_kind["fold"]


def test_micro_sweep_against_tracking_server_with_outage(
    ray_env: None, live_mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `mlflow server`, stopped for a while once the first fold has trained: nothing is lost, the run
    tree, params, metrics and artifacts are all there, nothing stays RUNNING; and the second trial's pools come
    from the cache, because the space only searches a weight that acts after the pool build."""
    from mlflow.tracking import MlflowClient

    from orchestration.sweep import run_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", live_mlflow_server.uri)
    spec = smoke_spec(
        "space={loss.pdl_weight: {loguniform: [0.03, 0.3]}}", "scheduler.type=fifo", name="micro-server"
    )
    trials_dir = tmp_path / "runs" / "sweeps" / spec.name / "trials"
    outage: dict[str, float] = {}

    def stop_server_after_first_fold() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(trials_dir.glob("*/fold_0/metrics.json")):
            time.sleep(0.1)
        outage["stopped"] = time.monotonic()
        live_mlflow_server.stop()
        time.sleep(5)
        live_mlflow_server.start()
        outage["started"] = time.monotonic()

    watcher = threading.Thread(target=stop_server_after_first_fold, daemon=True)
    watcher.start()
    outcome = run_sweep(spec, run_dir=tmp_path / "runs", out=lambda line: None)
    watcher.join(timeout=120)
    assert "started" in outage, "the outage did not happen"

    assert not outcome.interrupted
    assert [row["status"] for row in outcome.rows] == ["completed", "completed"]
    sweep, trials, folds = run_tree(sweep_runs(live_mlflow_server.uri, spec.name))
    assert (len(sweep), len(trials), len(folds)) == (1, 2, 4)
    assert {r.info.status for r in sweep + trials + folds} == {"FINISHED"}
    # run names that stay readable when cut: `t01 <id>` for a trial (Tune's count), `t01 f0 <id>` for its folds
    names = {r.data.tags["cpews.trial_id"]: r.info.run_name for r in trials}
    assert set(names) == {row["trial"] for row in outcome.rows}
    assert sorted(name.split(" ")[0] for name in names.values()) == ["t01", "t02"]
    assert all(name.split(" ")[1:] == [trial] for trial, name in names.items()), names
    assert Counter(r.info.run_name for r in folds) == Counter(
        f"{names[row['trial']].split(' ')[0]} f{i} {row['trial']}" for row in outcome.rows for i in range(2)
    )

    # params: the full flat config, the same keys on every trial, scalars as text
    keys = {frozenset(r.data.params) for r in trials}
    assert len(keys) == 1
    assert {"loss.pdl_weight", "proto.num_prototypes", "optim.max_iters"} <= set(next(iter(keys)))
    assert len({r.data.params["loss.pdl_weight"] for r in trials}) == 2
    client = MlflowClient(live_mlflow_server.uri)
    for row in outcome.rows:
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.metrics["cv/miou_seg_mean"] == pytest.approx(row["cv_miou_mean"])
        assert run.data.tags["cpews.status"] == "completed"
        history = client.get_metric_history(run.info.run_id, "fold/miou_seg")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(row["fold_scores"])
        assert run.data.metrics["cv/baseline_miou_mean"] == pytest.approx(row["baseline_miou"])
        # per-fold and per-step metrics are the fold runs'; the trial run has the fold scores, means, timings
        assert not [key for key in run.data.metrics if key.startswith(("val/", "train/"))], run.data.metrics
        assert run.data.metrics["time/steps_s"] > 0
        # the first step's time is a tag (ISO 8601), not a metric; the leaderboard keeps it as a Unix time
        assert "time/first_step_epoch" not in run.data.metrics
        first_step = datetime.datetime.fromisoformat(run.data.tags["cpews.first_step_at"])
        assert first_step.utcoffset() == datetime.timedelta(0)
        assert first_step.timestamp() == pytest.approx(row["timings"]["time/first_step_epoch"], abs=1e-3)

    # fold runs: per-step training metrics, final validation, pool + overlays + checkpoint artifacts
    cache = {}
    for run in folds:
        run_id = run.info.run_id
        assert len(client.get_metric_history(run_id, "train/loss")) == 4  # log_every 2 over 8 iterations
        assert "val/miou_seg" in run.data.metrics
        assert 0.0 <= run.data.metrics["val/baseline_miou"] <= 1.0  # the all-background mIoU of the fold
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"pool", "overlays", "checkpoint", "config.yaml", "metrics.json"} <= names
        pool_files = {Path(a.path).name for a in client.list_artifacts(run_id, "pool")}
        assert {"pool.pt", "pool.json", "pool.png"} <= pool_files
        assert len(client.list_artifacts(run_id, "overlays")) == 4
        assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/last.pt"]
        cache[run.data.tags["cpews.trial_id"], run.data.tags["cpews.fold"]] = run.data.tags["cpews.pool_cache"]
    # every fold run holds the same metrics (a confounder metric that a fold leaves undefined is NaN there)
    assert len({frozenset(r.data.metrics) for r in folds}) == 1, [sorted(r.data.metrics) for r in folds]
    for run in folds:
        bias = run.data.metrics["val/confounder_image_bias"]
        assert math.isnan(bias) or 0.0 <= bias <= 1.0
    first, second = (row["trial"] for row in sorted(outcome.rows, key=lambda r: r["path"]))
    by_trial = {trial for trial, _ in cache}
    assert by_trial == {first, second}
    # the trial that ran first built (miss) both fold pools; the other found them in the cache (hit)
    misses = {trial for (trial, _), value in cache.items() if value == "miss"}
    hits = {trial for (trial, _), value in cache.items() if value == "hit"}
    assert len(misses) == 1 and len(hits) == 1 and misses != hits, cache
    assert sorted(cache.values()) == ["hit", "hit", "miss", "miss"]

    # the sweep run: settings, folds, leaderboard; and the CLI leaderboard agrees
    parent = sweep[0]
    assert parent.data.params["sweep.folds.k"] == "2"
    assert {"folds.json", "sweep.yaml", "leaderboard.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the objective under the trials' own key (the best completed trial's), so the runs table sorts them together
    best = outcome.rows[0]
    assert parent.data.metrics["cv/miou_seg_mean"] == pytest.approx(best["cv_miou_mean"])
    assert parent.data.metrics["cv/miou_seg_std"] == pytest.approx(best["cv_miou_std"])
    assert parent.data.tags["cpews.best_trial"] == best["trial"]
    assert not [key for key in parent.data.metrics if key.startswith("best/")]
    printed = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "sweep", "leaderboard", spec.name, "--json",
         "--run-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    document = json.loads(printed.stdout)  # one shape: the object leaderboard.json holds, the same content
    saved = json.loads((tmp_path / "runs" / "sweeps" / spec.name / "leaderboard.json").read_text())
    assert document == saved
    assert (document["sweep"], document["objective"]) == (spec.name, "cv/miou_seg_mean")
    board = document["trials"]
    assert [(r["trial"], r["status"], r["folds_completed"]) for r in board] == [
        (r["trial"], r["status"], r["folds_completed"]) for r in outcome.rows
    ]
    assert board[0]["cv_miou_mean"] == pytest.approx(outcome.rows[0]["cv_miou_mean"])
    assert set(board[0]["params"]) == {"loss.pdl_weight"}
    # both trials scored the same fold images: the same all-background mIoU, the mean of the fold runs' own
    fold_baselines = sorted(r.data.metrics["val/baseline_miou"] for r in folds)
    assert fold_baselines[0::2] == pytest.approx(fold_baselines[1::2])  # each fold twice, once per trial
    for entry in board:
        assert entry["baseline_miou"] == pytest.approx(sum(fold_baselines) / len(fold_baselines))
    text = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "sweep", "leaderboard", spec.name, "--run-dir",
         str(tmp_path / "runs")], capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout
    assert f"all-background mIoU of the same images: {board[0]['baseline_miou']:.4f}" in text


def _board_rows() -> list[dict]:
    common = {"params": {"loss.pdl_weight": 0.1}, "wall_time_s": 12.0, "fold_scores": []}
    return [
        {**common, "rank": 1, "trial": "a", "cv_miou_mean": 0.5, "cv_miou_std": 0.01, "baseline_miou": 0.127,
         "folds_completed": 2, "status": "completed"},
        {**common, "rank": 2, "trial": "b", "cv_miou_mean": 0.11, "cv_miou_std": 0.02, "baseline_miou": 0.127,
         "folds_completed": 2, "status": "completed"},
        {**common, "rank": 3, "trial": "c", "cv_miou_mean": 0.09, "cv_miou_std": 0.0, "baseline_miou": 0.131,
         "folds_completed": 1, "status": "pruned"},
        {**common, "rank": 4, "trial": "d", "cv_miou_mean": None, "cv_miou_std": None, "baseline_miou": None,
         "folds_completed": 0, "status": "failed"},
    ]


def test_text_leaderboard_shows_the_all_background_miou_per_trial_and_in_its_footer() -> None:
    from orchestration.sweep import format_leaderboard

    lines = format_leaderboard(_board_rows(), smoke_spec(), source="a test").splitlines()
    assert lines[1] == ("ranked by status (completed, pruned, timeout, interrupted, pending, failed), then folds "
                        "completed (most first), then cv/miou_seg_mean (highest first); ± the sample std of the "
                        "fold scores")
    assert lines[2] == "from a test"
    header = lines[3]
    assert "bkg mIoU" in header
    column = header.index("bkg mIoU")
    cells = [line[column:].split()[0] for line in lines[5:9]]
    assert cells == ["0.1270", "0.1270", "0.1310", "-"]
    # completed trials saw every fold: their figure is the floor of the comparison; one of two beats it
    assert lines[-1] == ("all-background mIoU of the same images: 0.1270 (completed trials, every fold); "
                         "1 of 2 completed trials beat it")


def test_text_leaderboard_names_the_trial_that_ran_the_base_configuration() -> None:
    from orchestration.sweep import format_leaderboard

    spec = smoke_spec()
    rows = _board_rows()
    assert "base configuration" not in format_leaderboard(rows, spec)  # no trial ran it
    rows[1] = {**rows[1], "params": spec.base_point()}
    lines = format_leaderboard(rows, spec).splitlines()
    assert lines[-2] == "base configuration (every searched key at the base config's value): trial b, rank 2"
    assert lines[-1].startswith("all-background mIoU of the same images: ")


def test_text_leaderboard_without_a_completed_trial_states_the_range() -> None:
    from orchestration.sweep import format_leaderboard

    rows = [{**row, "status": "pruned"} for row in _board_rows()[:3]]
    assert format_leaderboard(rows, smoke_spec()).splitlines()[-1] == (
        "all-background mIoU of the same images: 0.1270-0.1310 (by the folds each trial finished)"
    )


def test_one_fold_std_for_the_leaderboard_and_promotion() -> None:
    """Fold scores 0.50, 0.52, 0.56 (mean 0.526667): the sample std is sqrt(0.00186667 / 2) = 0.030551 (the
    population std would be 0.024944). The leaderboard shows it and promotion uses it, even for a trial that
    reported the population std."""
    from orchestration.kfold import fold_std
    from orchestration.promote import cv_drop_warning, select_best
    from orchestration.sweep import _spread, format_leaderboard

    scores = [0.50, 0.52, 0.56]
    assert fold_std(scores) == pytest.approx(0.030551, abs=1e-6)
    assert math.isnan(fold_std([0.5])) and math.isnan(fold_std([]))
    std = _spread(scores, 3, reported=0.024944)  # what an older trial put in its last result
    assert std == pytest.approx(0.030551, abs=1e-6)
    assert _spread([0.5], 1, reported=0.0) is None  # no spread from one fold
    row = {**_board_rows()[0], "fold_scores": scores, "cv_miou_mean": sum(scores) / 3, "cv_miou_std": std,
           "folds_completed": 3}
    spec = smoke_spec("folds.k=3")
    assert "0.5267 ± 0.0306" in format_leaderboard([row], spec)
    (candidate,) = select_best([row], 3).candidates
    assert candidate["std"] == pytest.approx(std)
    assert "fold std 0.0306 over 3 folds" in cv_drop_warning(0.4, scores, metric="seg")


def test_run_names_put_the_trial_number_and_the_fold_before_the_id() -> None:
    """Tune's trial 3 (experiment tag `3_...`), id 8f5a7c13: `t03 8f5a7c13`, its fold 1 `t03 f1 8f5a7c13`."""
    from types import SimpleNamespace

    from orchestration.trial import run_name, trial_label

    label = trial_label(SimpleNamespace(trial_id="8f5a7c13", experiment_tag="3_loss.pdl_weight=0.1"))
    assert label == "t03 8f5a7c13" == run_name(label)
    assert run_name(label, 1) == "t03 f1 8f5a7c13"
    assert trial_label(SimpleNamespace(trial_id="8f5a7c13", experiment_tag="112_x=1")) == "t112 8f5a7c13"
    no_number = trial_label(SimpleNamespace(trial_id="8f5a7c13", experiment_tag=""))
    assert (no_number, run_name(no_number, 0)) == ("trial_8f5a7c13", "trial_8f5a7c13 f0")


def test_every_validation_report_of_a_confounded_dataset_has_the_same_keys() -> None:
    """A fold without an image that shows the texture but not its class has no image bias: NaN, not absent."""
    from orchestration.trial import same_metric_keys

    report = {"val/miou_seg": 0.4, "val/confounder_false_activation": 0.2, "val/confounded_class_iou": 0.3}
    filled = same_metric_keys(report)
    assert set(filled) == {*report, "val/confounder_image_bias"}
    assert math.isnan(filled.pop("val/confounder_image_bias")) and filled == report
    assert same_metric_keys({"val/miou_seg": 0.4}) == {"val/miou_seg": 0.4}  # a dataset without a confounder
    assert same_metric_keys({"train/loss": 1.0}) == {"train/loss": 1.0}  # not a validation report


def test_first_step_time_as_an_iso_tag() -> None:
    from orchestration.trial import epoch_time, iso_time

    assert iso_time(86400.5) == "1970-01-02T00:00:00.500+00:00"
    assert epoch_time(iso_time(1767225600.123)) == pytest.approx(1767225600.123, abs=1e-3)


def test_asha_pruned_trial_reaches_optuna_as_pruned(ray_env: None, tmp_path: Path) -> None:
    """The same two configurations (seeded TPE) and fold scores in both objective modes: ASHA (grace 1,
    factor 2) stops the second trial after its first fold in exactly one mode (unless the scores tie); that
    trial is PRUNED in Optuna's study, `pruned` on the leaderboard, and its MLflow run is not left open."""
    import optuna

    from orchestration.sweep import run_sweep
    from orchestration.tune_runner import make_searcher

    statuses = []
    for mode in ("max", "min"):
        spec = smoke_spec(f"objective.mode={mode}", name=f"prune-{mode}")
        searcher = make_searcher(spec)
        from orchestration import tune_runner

        original = tune_runner.make_searcher
        tune_runner.make_searcher = lambda _spec, s=searcher, **_: s  # keep a handle on the study
        try:
            outcome = run_sweep(spec, run_dir=tmp_path / "runs", out=lambda line: None)
        finally:
            tune_runner.make_searcher = original
        study = {tuple(sorted(t.params.items())): t for t in searcher._ot_study.get_trials(deepcopy=False)}
        assert len(study) == 2
        for row in outcome.rows:
            expected = optuna.trial.TrialState.COMPLETE if row["status"] == "completed" else optuna.trial.TrialState.PRUNED
            assert row["status"] in ("completed", "pruned")
            assert (row["status"] == "pruned") == (row["folds_completed"] < 2)
            told = study[tuple(sorted(row["params"].items()))]
            assert told.state == expected
            # one intermediate value per finished fold (the CV mean so far), the stopping fold's included
            scores = row["fold_scores"]
            assert told.intermediate_values == pytest.approx(
                {n: sum(scores[:n]) / n for n in range(1, len(scores) + 1)}
            )
            statuses.append((mode, row["status"], row["fold_scores"][0]))
        sweep, trials, folds = run_tree(sweep_runs(outcome.tracking_uri, spec.name))
        assert {r.info.status for r in sweep + trials + folds} == {"FINISHED"}
        assert sorted(r.data.tags["cpews.status"] for r in trials) == sorted(r["status"] for r in outcome.rows)
        for row in outcome.rows:  # one std: the sample std of the fold scores, on the leaderboard and in MLflow
            (run,) = [r for r in trials if r.info.run_id == row["mlflow_run_id"]]
            if row["status"] == "completed":
                assert row["cv_miou_std"] == pytest.approx(statistics.stdev(row["fold_scores"]))
                assert run.data.metrics["cv/miou_seg_std"] == pytest.approx(row["cv_miou_std"])
            else:
                assert row["cv_miou_std"] is None and "cv/miou_seg_std" not in run.data.metrics  # one fold
                assert "cpews.skipped_nonfinite_metrics" not in run.data.tags
        assert len(folds) == sum(r["folds_completed"] for r in outcome.rows)
    first_fold = {score for _, _, score in statuses}
    if len(first_fold) == 2:
        assert [s for _, s, _ in statuses].count("pruned") == 1, statuses


def test_killed_worker_is_retried_from_its_mid_fold_checkpoint(ray_env: None, tmp_path: Path) -> None:
    """The trial's worker process SIGKILLs itself in fold 1 after the checkpoint at iteration 4: Tune retries
    the trial, which skips fold 0 and continues fold 1 from iteration 4, in the same MLflow runs."""
    from orchestration.sweep import run_sweep

    spec = smoke_spec("search.num_trials=1", "scheduler.type=fifo", name="sigkill")
    outcome = run_sweep(spec, run_dir=tmp_path / "runs", out=lambda line: None, faults={"kill_at": (1, 5)})

    (row,) = outcome.rows
    assert (row["status"], row["folds_completed"], len(row["fold_scores"])) == ("completed", 2, 2)
    trial_dir = Path(row["path"])
    assert "SIGKILL at fold 1" in (trial_dir / "fault_injected").read_text()
    assert (trial_dir / "folds_started.log").read_text().split("\n")[:3] == ["0 0", "1 0", "1 4"]
    sweep, trials, folds = run_tree(sweep_runs(outcome.tracking_uri, spec.name))
    assert (len(trials), len(folds)) == (1, 2)
    assert {r.info.status for r in sweep + trials + folds} == {"FINISHED"}


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_stopped_driver_resumes_without_duplicates(ray_env: None, tmp_path: Path) -> None:
    """`cpews sweep run` is stopped (SIGINT) once its second trial has checkpointed; `cpews sweep resume`
    finishes the sweep: the first trial is not trained again, the second continues from its checkpoint, every
    trial and fold has one MLflow run, and none is left RUNNING (after the stop, nor after the resume)."""
    import yaml

    spec = smoke_spec("scheduler.type=fifo", name="resume-me")
    data = spec.to_dict()
    data["fixed"].update({"optim.max_iters": 40, "train.checkpoint_every": 10, "proto.build_iter": 20})
    sweep_file = tmp_path / "resume-me.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "orchestration.cli", "sweep"]
    root = run_dir / "sweeps" / "resume-me"
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen([*command, "run", str(sweep_file), "--run-dir", str(run_dir)], cwd=REPO,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Two checkpoints of the second trial: a report blocks its trial until the driver has taken it in,
            # so the first one is then surely in the experiment state that the stop saves.
            def second_trial_checkpointed() -> bool:
                counts = sorted(len(list(d.glob("checkpoint_*"))) for d in (root / "tune").glob("trial_*"))
                return len(counts) >= 2 and counts[0] >= 2

            _wait_for(second_trial_checkpointed, 300, "the second trial's second checkpoint", process)
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 130, (tmp_path / "run.log").read_text()[-3000:]
    before = {p.parent.name: p.read_text().split("\n")[:-1] for p in (root / "trials").glob("*/folds_started.log")}
    assert len(before) == 2, before
    uri = f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}"
    sweep, trial_runs, folds = run_tree(sweep_runs(uri, "resume-me"))
    assert "RUNNING" not in {r.info.status for r in sweep + trial_runs + folds}

    resumed = subprocess.run([*command, "resume", "resume-me", "--run-dir", str(run_dir)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    board = json.loads(subprocess.run(
        [*command, "leaderboard", "resume-me", "--json", "--run-dir", str(run_dir)], cwd=REPO, env=env,
        capture_output=True, text=True, check=True).stdout)["trials"]
    assert [r["status"] for r in board] == ["completed", "completed"]
    sweep, trial_runs, folds = run_tree(sweep_runs(uri, "resume-me"))
    assert (len(sweep), len(trial_runs), len(folds)) == (1, 2, 4)
    assert len({r.info.run_name for r in folds}) == 4
    assert {r.info.status for r in sweep + trial_runs + folds} == {"FINISHED"}
    after = {p.parent.name: p.read_text().split("\n")[:-1] for p in (root / "trials").glob("*/folds_started.log")}
    finished = [t for t, lines in before.items() if (root / "trials" / t / "fold_1" / "metrics.json").exists()
                and lines == ["0 0", "1 0"]]
    assert len(finished) == 1, before
    assert after[finished[0]] == before[finished[0]]  # not trained again
    (stopped,) = set(before) - set(finished)
    new = after[stopped][len(before[stopped]):]
    assert after[stopped][: len(before[stopped])] == before[stopped] and new, (before, after)
    fold, iteration = map(int, new[0].split())
    last_fold = int(before[stopped][-1].split()[0])
    assert iteration > 0 or fold > last_fold, (before[stopped], new)  # continued, not restarted



def _newest_step(fold_dir: Path) -> int:
    """The steps of a fold's newest checkpoint on disk (`last.pt` is written atomically), 0 when none."""
    from cpews.training.checkpoint import load_checkpoint

    last = fold_dir / "last.pt"
    return load_checkpoint(last).iteration if last.is_file() else 0


def _tune_checkpoints(trial_tune_dir: Path) -> list[tuple[int, int]]:
    """(fold, iteration) of each Tune checkpoint a trial's worker has written (a fold end: (next fold, 0))."""
    from orchestration.trial import TRIAL_STATE_FILE, TrialState

    found = []
    for folder in trial_tune_dir.glob("checkpoint_*"):
        try:
            state = TrialState.from_json((folder / TRIAL_STATE_FILE).read_text())
        except (OSError, ValueError):  # being written
            continue
        found.append(_position(state))
    return found


def _position(state) -> tuple[int, int]:
    if state.fold_in_progress is None:
        return len(state.fold_scores), 0
    return state.fold_in_progress, state.fold_iteration


def _taken_in(sweep_root: Path, trial: str) -> set[tuple[int, int]]:
    """(fold, iteration) of the reports of `trial` that the driver has processed: the lines of the trial's
    result.json that Tune writes (and flushes) as it processes each, in the driver's staging folder inside the
    Ray session folder (the copy in the sweep's tune/ folder is synced from it now and then)."""
    from cpews.training import keys
    from orchestration.trial import FOLD_INDEX

    session = Path(json.loads((sweep_root / "ray_session.json").read_text())["session_dir"])
    taken = set()
    for results in session.glob(f"artifacts/*/tune/driver_artifacts/trial_{trial}/result.json"):
        for line in results.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                result = json.loads(line)
                taken.add((int(result[FOLD_INDEX]), int(result[keys.TRAIN_ITERATION])))
    return taken


def _saved_position(tune_dir: Path, trial: str) -> tuple[int, int] | None:
    """(fold, iteration) of the trial's checkpoint in Tune's saved experiment state (what `Tuner.restore` reads),
    (0, 0) when it holds none; None when the state cannot be read now."""
    from ray.tune import ExperimentAnalysis

    from orchestration.trial import TRIAL_STATE_FILE, TrialState

    try:
        (saved,) = [t for t in ExperimentAnalysis(str(tune_dir)).trials if t.trial_id == trial]
        if saved.checkpoint is None:
            return 0, 0
        return _position(TrialState.from_json((Path(saved.checkpoint.path) / TRIAL_STATE_FILE).read_text()))
    except (OSError, ValueError):
        return None


def _psutil():
    """psutil, as Ray ships it (importing ray puts its bundled copy on the path)."""
    import importlib

    import ray  # noqa: F401 - first: it puts its bundled psutil on the path

    return importlib.import_module("psutil")


def _alive(pid: int, started: float) -> bool:
    psutil = _psutil()
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_killed_driver_resumes_from_the_newest_checkpoint_and_the_schedulers_records(
    ray_env: None, tmp_path: Path
) -> None:
    """`cpews sweep run` (ASHA over 2 folds, one trial at a time) is SIGKILLed while its first trial, which passed
    ASHA's cut at fold 1, has a fold checkpoint on disk newer than the one in Tune's saved state. `cpews sweep
    resume` then stops what is left of the killed driver's Ray instance, continues that fold from the newest
    step on disk, keeps the trial (it passed the cut), judges the second trial against the recorded score, and
    leaves one MLflow run per trial and fold, none RUNNING.

    The driver is stopped (SIGSTOP) first. Tune's function trainables report synchronously: a worker waits in
    each report until the driver has processed it (which the trial's result.json in the driver's staging folder
    then shows) and asked for the next one. Once the worker's newest checkpoint is in a report that the stopped
    driver had not taken in, the worker waits there for good, and the driver never saved that checkpoint in
    Tune's state. Reports come with checkpoints only (log_every > max_iters), every 10 steps.
    """
    import yaml

    from orchestration.tune_runner import read_scheduler_state, read_stop_reasons

    psutil = _psutil()

    spec = smoke_spec(name="killed")
    assert (spec.scheduler.type, spec.scheduler.grace_period, spec.folds.k, spec.search.max_concurrent) == (
        "asha", 1, 2, 1)
    data = spec.to_dict()
    data["fixed"].update({"optim.max_iters": 60, "train.checkpoint_every": 10, "train.log_every": 1000,
                          "proto.build_iter": 30})
    sweep_file = tmp_path / "killed.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "runs"
    root = run_dir / "sweeps" / "killed"
    command = [sys.executable, "-m", "orchestration.cli", "sweep"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen([*command, "run", str(sweep_file), "--run-dir", str(run_dir)], cwd=REPO,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: any(root.glob("trials/*/fold_1/last.pt")), 600, "a checkpoint in fold 1", process)
            (fold_dir,) = [p.parent for p in root.glob("trials/*/fold_1/last.pt")]
            trial = fold_dir.parent.name
            rung = read_scheduler_state(root / "scheduler_state.json")["brackets"][0][-1]
            assert rung["milestone"] == 1 and trial in rung["scores"]  # judged at fold 1, and training on
            trial_tune_dir = root / "tune" / f"trial_{trial}"
            assert (0, 60) in _taken_in(root, trial)  # the driver's live file is read: fold 0's end is in it

            def waiting_step() -> int | None:
                """The step of the worker's newest checkpoint when it waits in a report that the driver has not
                taken in (its Tune checkpoint is written right before the worker waits)."""
                step = _newest_step(fold_dir)
                if (1, step) in _tune_checkpoints(trial_tune_dir) and (1, step) not in _taken_in(root, trial):
                    return step
                return None

            on_disk = None
            for _ in range(3):
                process.send_signal(signal.SIGSTOP)
                # the worker trains on to its next report, unless the driver stopped between taking in a report
                # and asking for the next one: then it goes on at the next try
                deadline = time.monotonic() + 60
                while (on_disk := waiting_step()) is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if on_disk is not None:
                    break
                process.send_signal(signal.SIGCONT)
                last = _newest_step(fold_dir)
                _wait_for(lambda: _newest_step(fold_dir) > last, 120, "the next checkpoint", process)
            assert on_disk is not None, "the worker never waited in a report that the stopped driver had not taken in"
            assert on_disk < 60
            saved = _saved_position(root / "tune", trial)  # None: the stopped driver was writing it
            assert saved is None or saved < (1, on_disk), (saved, on_disk)
            tree = [(p.pid, p.create_time(), p.name()) for p in psutil.Process(process.pid).children(recursive=True)]
            assert any(name == "raylet" for _, _, name in tree), tree
            process.kill()
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(timeout=60)
    before = (root / "trials" / trial / "folds_started.log").read_text().split("\n")[:-1]
    assert before == ["0 0", "1 0"], before
    left_before = [pid for pid, started, _ in tree if _alive(pid, started)]

    resumed = subprocess.run([*command, "resume", "killed", "--run-dir", str(run_dir)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    output = resumed.stdout + resumed.stderr
    (tmp_path / "resume.log").write_text(output)
    assert resumed.returncode == 0, output[-4000:]
    # no process of the killed driver's Ray instance is left, and the resume said what it stopped
    assert [(pid, name) for pid, started, name in tree if _alive(pid, started)] == []
    if left_before:
        assert re.search(r"sweep killed: stopped [1-9]\d* Ray process\(es\) left by its killed driver \(pid "
                         rf"{process.pid}, Ray session_\S+\): ", output), output[-4000:]
    assert not (root / "ray_session.json").exists()
    # the scheduler's records of before the kill came back: the first trial at fold 1, nobody cut
    assert re.search(r"sweep killed: the scheduler's records come back from \S+/scheduler_state\.json \(1 at fold 1; "
                     r"0 cut\)", output), output[-4000:]
    # the fold continued from the newest step on disk, not from Tune's older checkpoint
    after = (root / "trials" / trial / "folds_started.log").read_text().split("\n")[:-1]
    assert after == [*before, f"1 {on_disk}"], after
    trial_log = (root / "trials" / trial / "trial.log").read_text()  # what the trial prints goes there
    assert re.search(rf"\[trial_{trial} fold 1\] resuming from the checkpoint at iteration {on_disk} "
                     rf"\(\S+/fold_1/last\.pt, further on than ", trial_log), trial_log[-4000:]
    # the trial that passed the cut was not cut at the resume; the other one was judged against its score
    board = json.loads(subprocess.run(
        [*command, "leaderboard", "killed", "--json", "--run-dir", str(run_dir)], cwd=REPO, env=env,
        capture_output=True, text=True, check=True).stdout)["trials"]
    rows = {row["trial"]: row for row in board}
    assert (rows[trial]["status"], rows[trial]["folds_completed"]) == ("completed", 2)
    stops = read_stop_reasons(root / "stops.jsonl")
    assert trial not in stops.scheduler
    (other,) = set(rows) - {trial}
    first_score = rows[trial]["fold_scores"][0]
    rung = read_scheduler_state(root / "scheduler_state.json")["brackets"][0][-1]["scores"]
    assert rung == pytest.approx({trial: first_score, other: rows[other]["fold_scores"][0]})
    cut = rows[other]["fold_scores"][0] < first_score  # cutoff: the median of the one score recorded before
    assert (rows[other]["status"], other in stops.scheduler) == (("pruned", True) if cut else ("completed", False))
    uri = f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}"
    sweep, trial_runs, folds = run_tree(sweep_runs(uri, "killed"))
    assert (len(sweep), len(trial_runs), len(folds)) == (1, 2, sum(r["folds_completed"] for r in board))
    assert "RUNNING" not in {r.info.status for r in sweep + trial_runs + folds}


LEFT_BEHIND = """
import ctypes, sys, time
if sys.argv[2]:  # named like Ray's agents and workers, which set their process title: ray::DashboardAgent
    ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)  # PR_SET_NAME
log = open(sys.argv[1], "a")  # like a Ray agent or worker: its log stays open in the session folder
time.sleep(600)
"""


def _left_behind(log: Path, name: str = "ray::FakeAgent") -> int:
    """Start a process named `name` that holds `log` open and whose parent has exited (as a killed driver
    leaves Ray's agents: reparented); returns its pid once the file is open."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" "$1" "$2" >/dev/null 2>&1 & echo $!',
                              LEFT_BEHIND, str(log), name], capture_output=True, text=True, check=True,
                             timeout=30)
    pid = int(started.stdout)
    deadline = time.monotonic() + 60
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def test_resume_stops_only_what_the_killed_driver_left_of_its_ray_instance(tmp_path: Path) -> None:
    """Real processes, no Ray instance: a record of a local Ray instance whose driver is gone; two Ray processes
    holding files in its session folder (as Ray's agents and workers do) are stopped, one line says so, the
    record is removed. Not touched: a Ray process of another session, a process that is not Ray's reading a log
    of the session, and anything when the driver is alive or ran on another host."""
    import socket

    from orchestration.sweep import SweepError, stop_left_behind_ray, sweep_paths

    psutil = _psutil()

    paths = sweep_paths(tmp_path / "runs", "left")
    paths.root.mkdir(parents=True)
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000001_11"
    other = tmp_path / "ray" / "session_2026-01-01_00-00-00_000002_22"
    ours = [_left_behind(session / "logs" / "dashboard_agent.log"),
            _left_behind(session / "logs" / "worker-1.out", "ray::IDLE")]
    theirs = _left_behind(other / "logs" / "dashboard_agent.log")
    reader = _left_behind(session / "logs" / "raylet.out", "")  # e.g. someone's `tail -f`, not Ray's
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    record = {"format": "cpews-ray-session/1", "host": socket.gethostname(), "driver_pid": gone.pid,
              "driver_started": 1.0, "session_dir": str(session), "gcs_address": "127.0.0.1:1", "processes": []}

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    lines: list[str] = []
    try:
        paths.ray_session.write_text(json.dumps(record))
        stop_left_behind_ray(paths, lines.append)
        assert len(lines) == 1 and re.fullmatch(
            rf"sweep left: stopped 2 Ray process\(es\) left by its killed driver \(pid {gone.pid}, Ray "
            rf"{session.name}\): ray::FakeAgent, ray::IDLE", lines[0]), lines
        assert [running(pid) for pid in (*ours, theirs, reader)] == [False, False, True, True]
        assert not paths.ray_session.exists()

        me = psutil.Process()
        paths.ray_session.write_text(json.dumps({**record, "driver_pid": me.pid, "driver_started": me.create_time(),
                                                 "session_dir": str(other)}))
        with pytest.raises(SweepError, match=rf"^sweep left is running: its driver \(pid {me.pid}\) is alive; "):
            stop_left_behind_ray(paths, lines.append)
        paths.ray_session.write_text(json.dumps({**record, "host": "elsewhere", "session_dir": str(other)}))
        stop_left_behind_ray(paths, lines.append)
        assert lines[1:] == ["sweep left: its last driver ran on elsewhere; its Ray instance there is not stopped "
                             "from here"]
        assert running(theirs)
    finally:
        for pid in (*ours, theirs, reader):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sweep_whose_every_trial_fails_says_why_and_fails(ray_env: None, tmp_path: Path) -> None:
    """Both trials fail in the trainer (the pool cache folder is a file; a retry fails the same way): the last
    lines give each trial's exception and its error file, every MLflow run of the sweep is FAILED, the exit is
    non-zero. Then, without Ray, the leaderboard comes from Tune's state although the saved leaderboard.json
    is out of date, and from MLflow once Tune's state is gone."""
    import yaml

    from orchestration.sweep import read_leaderboard

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the pool cache folder should be\n")
    spec = smoke_spec("scheduler.type=fifo", f"fixed.proto.cache_dir={blocker}", name="all-fail")
    sweep_file = tmp_path / "all-fail.yaml"
    sweep_file.write_text(yaml.safe_dump(spec.to_dict()))
    run_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "orchestration.cli", "sweep"]
    proc = subprocess.run([*command, "run", str(sweep_file), "--run-dir", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert any(line.startswith("sweep all-fail failed (no trial completed) in ") and
               line.endswith(": 0 completed, 0 pruned, 0 timeout, 2 failed") for line in lines), lines[-8:]
    failures = [re.fullmatch(r"trial (\w+) failed: (\w+: .*) \(error file (\S+)\)", line) for line in lines[-2:]]
    assert all(failures), lines[-4:]
    for match in failures:
        error_file = Path(match[3])
        assert error_file.parent.name == f"trial_{match[1]}" and error_file.parent.parent.name == "tune"
        assert error_file.read_text().strip().splitlines()[-1] == match[2]  # the exception's last line
        assert str(blocker) in match[2]
        # the trial's event line while Tune ran: the same exception and the log that holds its traceback
        event = [line for line in lines if re.fullmatch(rf"t\d\d {match[1]} failed: .* \(log: \S+\)", line)]
        assert len(event) == 1 and f"failed: {match[2]} (log: " in event[0], lines
        assert "Traceback (most recent call last)" in Path(event[0].rsplit("(log: ", 1)[1][:-1]).read_text()
    assert "Traceback" not in proc.stdout + proc.stderr  # Tune's own report of each failed attempt is off
    uri = f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}"
    sweep, trials, folds = run_tree(sweep_runs(uri, "all-fail"))
    assert (len(sweep), len(trials)) == (1, 2) and folds
    assert {r.info.status for r in sweep + trials + folds} == {"FAILED"}
    assert sweep[0].data.tags["cpews.status"] == "failed"
    assert {r.data.tags["cpews.status"] for r in trials} == {"failed"}

    # the leaderboard after the crash: no Ray instance; the saved file keeps one of the two trials
    root = run_dir / "sweeps" / "all-fail"
    saved = json.loads((root / "leaderboard.json").read_text())
    assert saved["ranking"].startswith("by status (completed, pruned, timeout")
    (root / "leaderboard.json").write_text(json.dumps({**saved, "trials": saved["trials"][:1]}))
    board = subprocess.run([*command, "leaderboard", "all-fail", "--run-dir", str(run_dir)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert board.returncode == 0, board.stderr[-3000:]
    assert f"from Tune's experiment state in {root.resolve() / 'tune'}" in board.stdout
    board_rows = [line for line in board.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row.split()[-2] for row in board_rows] == ["failed", "failed"]  # status, then wall s (`-`)
    for state in (root / "tune").glob("experiment_state-*.json"):
        state.rename(state.with_suffix(".moved"))
    rows, source, _ = read_leaderboard("all-fail", run_dir=run_dir)
    assert source.startswith("the trial runs in MLflow (sqlite:///") and "Tune saved no experiment state" in source
    assert sorted(row["trial"] for row in rows) == sorted(match[1] for match in failures)
    assert {row["status"] for row in rows} == {"failed"}
    assert sorted(row["error"] for row in rows) == sorted(match[2] for match in failures)


def test_trial_stopped_by_the_time_budget_is_timeout_not_pruned(ray_env: None, tmp_path: Path) -> None:
    """A 1 s budget under ASHA stops the sweep before any trial finishes a fold: Tune ends those trials before
    their last fold like a scheduler's cut, but the leaderboard and MLflow say `timeout`, and the sweep, with
    no completed trial, ends FAILED."""
    from orchestration.sweep import run_sweep
    from orchestration.tune_runner import read_stop_reasons

    spec = smoke_spec("time_budget_s=1", name="budget")
    assert spec.scheduler.type == "asha"
    lines: list[str] = []
    outcome = run_sweep(spec, run_dir=tmp_path / "runs", out=lines.append)
    assert not outcome.interrupted
    assert outcome.rows and {row["status"] for row in outcome.rows} == {"timeout"}, outcome.rows
    assert all(row["folds_completed"] < spec.folds.k for row in outcome.rows)
    reasons = read_stop_reasons(outcome.paths.stops)
    assert reasons.time_budget and not reasons.scheduler
    assert any(line.startswith("sweep budget failed (no trial completed) in ") and
               line.endswith(f": 0 completed, 0 pruned, {len(outcome.rows)} timeout, 0 failed") for line in lines)
    sweep, trials, folds = run_tree(sweep_runs(outcome.tracking_uri, spec.name))
    assert [r.info.status for r in sweep] == ["FAILED"]
    assert "RUNNING" not in {r.info.status for r in trials + folds}
    assert {r.data.tags.get("cpews.status") for r in trials} <= {"timeout"}


CLAIM = """
import json, sys, time
from pathlib import Path
from orchestration.search_space import validate_sweep
from orchestration.sweep import SweepError, claim_sweep

spec = validate_sweep(json.loads(sys.argv[1]), check_paths=False)
go = Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
try:
    claimed = claim_sweep(spec, Path(sys.argv[2]), new_name_if_taken=sys.argv[4] == "next", out=lambda line: None)
except SweepError as exc:
    print(f"refused: {exc}", flush=True)
    sys.exit(3)
print(f"claimed {claimed.spec.name} {claimed.experiment_id}", flush=True)
"""


def _claim_at_once(spec, run_dir: Path, n: int, mode: str) -> list[subprocess.CompletedProcess]:
    """`n` processes that call `claim_sweep` at the same moment (each waits, imported, for a go file)."""
    go = run_dir.parent / f"go-{mode}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [sys.executable, "-c", CLAIM, json.dumps(spec.to_dict()), str(run_dir), str(go), mode]
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-3000:]
        go.touch()
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_sweeps_started_at_once_get_their_own_names(tmp_path: Path) -> None:
    """Two processes start the sweep `micro` at the same moment in a fresh run folder (no store yet): one
    creates the SQLite store, each gets its own name, folder and experiment (micro, micro-2); with a fixed
    name, one of two gets it and the other a clear refusal (no traceback, no store error)."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs"
    done = _claim_at_once(smoke_spec(), run_dir, 2, "next")
    for proc in done:
        assert proc.returncode == 0 and "Error" not in proc.stderr, proc.stdout + proc.stderr[-3000:]
    claimed = dict(proc.stdout.split()[1:] for proc in done)
    assert sorted(claimed) == ["micro", "micro-2"]
    assert {p.name for p in (run_dir / "sweeps").iterdir() if p.is_dir()} == set(claimed)
    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}")
    for name, experiment_id in claimed.items():
        assert client.get_experiment_by_name(name).experiment_id == experiment_id

    first, second = _claim_at_once(smoke_spec(name="solo"), run_dir, 2, "fixed")
    assert sorted((first.returncode, second.returncode)) == [0, 3], (first, second)
    refused = first if first.returncode == 3 else second
    assert refused.stdout.startswith("refused: sweep 'solo' exists already in ") and "Error" not in refused.stderr


EVENT = re.compile(r"(?P<trial>t\d\d \w+) (?:started \((?P<params>[^)]*)\)(?:; log: (?P<log>\S+))?"
                   r"|fold (?P<fold>\d+) done \((?P<done>\d+)/(?P<k>\d+)\): seg mIoU \d\.\d{4} \(bkg \d\.\d{4}\)"
                   r"|completed: cv seg mIoU \d\.\d{4} ± \d\.\d{4}|pruned after \d+/\d+ folds \(ASHA\)"
                   r"|failed: .+ \(log: \S+\)|retried after: .+|stopped by the time budget after \d+/\d+ folds)")


def test_sweep_terminal_shows_one_line_per_trial_event_and_ends_with_the_summary(ray_env: None,
                                                                                  tmp_path: Path) -> None:
    """`cpews sweep run` of the smoke sweep (FIFO: both trials train both folds), stdout and stderr together:
    a short header, then only trial event lines naming the trial (and the fold), then the summary, which is the
    last thing printed; none of Tune's tables, checkpoint messages, deduplicated worker lines or pool-build
    lines; what each trial printed is in its log file, whose path its start line gives."""
    import yaml

    spec = smoke_spec("scheduler.type=fifo", name="quiet")
    sweep_file = tmp_path / "quiet.yaml"
    sweep_file.write_text(yaml.safe_dump(spec.to_dict()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", "sweep", "run", str(sweep_file), "--run-dir",
                           str(tmp_path / "runs")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 0, "\n".join(lines[-40:])
    for noise in ("Checkpoint successfully created", "repeated", "pool build", "Trial status", "tensorboard",
                  "Token authentication"):
        assert not [line for line in lines if noise.lower() in line.lower()], noise
    events = [i for i, line in enumerate(lines) if EVENT.fullmatch(line)]
    assert events and len(events) == events[-1] - events[0] + 1, "\n".join(lines)  # one block, nothing between
    header, block, summary = lines[:events[0]], [EVENT.fullmatch(lines[i]) for i in events], lines[events[-1] + 1:]
    known = ("pretrain", "[pretrain] it=", "MLflow", "sweep quiet: ")  # the backbone (first use), store, sweep
    assert [line for line in header if not line.startswith(known) and "INFO mlflow.store.db" not in line] == []
    trials = sorted({m["trial"] for m in block})
    assert len(trials) == spec.search.num_trials == 2
    for trial in trials:  # started (its log, once), each fold in order, completed
        mine = [m for m in block if m["trial"] == trial]
        assert [m["fold"] for m in mine[1:-1]] == ["0", "1"] and mine[-1][0].endswith(tuple("0123456789"))
        assert mine[0]["log"] and "completed: cv seg mIoU" in mine[-1][0], [m[0] for m in mine]
        log = REPO / mine[0]["log"] if not Path(mine[0]["log"]).is_absolute() else Path(mine[0]["log"])
        text = log.read_text()
        trial_id = trial.split()[1]
        assert log.parent.name == trial_id and f"[trial_{trial_id} fold 1]" in text, text[-2000:]
        assert "Checkpoint successfully created" in text  # Ray's own messages of the trial go there too
    assert summary[0].startswith("leaderboard of sweep quiet ") and summary[-1].startswith("MLflow store: ")
    assert any(line.startswith("sweep quiet finished in ") for line in summary), summary

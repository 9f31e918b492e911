"""The sweep report (`orchestration.report`): its files, fANOVA's threshold, the numbers behind the figures, what
it logs to MLflow, and `cpews sweep report`. Synthetic leaderboard rows and Tune reports: no Ray, no training."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orchestration.report import (
    FIGURES,
    MIN_FANOVA_TRIALS,
    NOTE_TAG,
    REPORT_DIR,
    compute_history,
    experiment_description,
    fold_curves,
    format_importance,
    log_report,
    param_importance,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo_spec(*overrides: str, name: str = "rep"):
    """search_spaces/demo.yaml (8 searched keys, 3 folds) under ASHA, named `name`."""
    from orchestration.search_space import load_sweep

    return load_sweep("demo", ["scheduler.type=asha", *overrides, f"name={name}", f"tracking.experiment={name}"],
                      check_paths=False)


def sample(dist, rng: random.Random):
    if dist.kind == "categorical":
        return rng.choice(dist.choices)
    if dist.kind == "int":
        return rng.randint(int(dist.low), int(dist.high))
    if dist.kind == "loguniform":
        return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
    return rng.uniform(dist.low, dist.high)


def make_rows(spec, completed: int, pruned: int, seed: int = 0) -> list[dict]:
    """Leaderboard rows, best first: the completed trials' score rises with log(optim.lr) (plus a little noise),
    so fANOVA should rank optim.lr first; pruned trials have one fold."""
    rng = random.Random(seed)
    lr = spec.distribution("optim.lr")
    rows = []
    for i in range(completed + pruned):
        params = {d.key: sample(d, rng) for d in spec.space}
        position = (math.log(params["optim.lr"]) - math.log(lr.low)) / (math.log(lr.high) - math.log(lr.low))
        folds = spec.folds.k if i < completed else 1
        scores = [0.3 + 0.1 * position + rng.gauss(0, 0.002) for _ in range(folds)]
        rows.append({
            "trial": f"t{i:07d}", "params": params, "cv_miou_mean": sum(scores) / folds,
            "cv_miou_std": 0.002 if folds > 1 else None, "baseline_miou": 0.127, "folds_completed": folds,
            "status": "completed" if i < completed else "pruned", "wall_time_s": 10.0 * folds,
            "fold_scores": scores, "mlflow_run_id": f"run{i}", "timings": {}, "path": f"/nowhere/{i}",
        })
    rows.sort(key=lambda r: (r["status"] != "completed", -r["cv_miou_mean"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def write_results(tune_dir: Path, row: dict, start: float) -> None:
    """Tune reports of a trial, as `orchestration.trial` makes them: every 25 iterations a training loss, at
    the end of each fold its validation scores, then the report that closes the fold."""
    lines, t = [], 0.0
    for fold, score in enumerate(row["fold_scores"]):
        for it in (25, 50, 75, 100):
            t += 1.0
            lines.append({"train/iteration": float(it), "train/loss": 1.5 - it / 100, "cv/fold": float(fold),
                          "cv/fold_end": 0.0, "timestamp": start + t, "time_total_s": t})
        lines.append({"train/iteration": 100.0, "val/miou_seg": score, "val/baseline_miou": 0.127,
                      "cv/fold": float(fold), "cv/fold_end": 0.0, "timestamp": start + t, "time_total_s": t})
        lines.append({"train/iteration": 100.0, "fold/miou_seg": score, "cv/fold": float(fold), "cv/fold_end": 1.0,
                      "timestamp": start + t, "time_total_s": t})
    folder = tune_dir / f"trial_{row['trial']}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}  # data-file -> src
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            attrs = dict(attrs)
            self.images[attrs["data-file"]] = attrs["src"]

    def handle_data(self, data) -> None:
        self.text.append(data)


def test_report_files_are_pngs_and_one_html_page_that_embeds_every_figure(tmp_path: Path) -> None:
    from PIL import Image

    spec = demo_spec()
    rows = make_rows(spec, completed=MIN_FANOVA_TRIALS + 2, pruned=2)
    for i, row in enumerate(rows[:4]):  # some trials have no Tune reports: the figures do without them
        write_results(tmp_path / "tune", row, start=1000.0 + 50 * i)
    report = write_report(rows, spec, tune_dir=tmp_path / "tune", folder=tmp_path / REPORT_DIR, source="a test")

    assert list(report.figures) == list(FIGURES)  # importance computed: every figure, in order
    for name, path in report.figures.items():
        data = path.read_bytes()
        assert path.parent == tmp_path / REPORT_DIR and data.startswith(PNG_SIGNATURE), name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200, (name, image.size)
    parser = Images()
    parser.feed(report.html.read_text(encoding="utf-8"))
    assert set(parser.images) == set(report.figures)
    for name, src in parser.images.items():  # self-contained: the images are in the page
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix) and base64.b64decode(src[len(prefix):]) == report.figures[name].read_bytes()
    text = " ".join(parser.text)
    assert all(row["trial"] in text for row in rows) and "optim.lr" in text and "Parameter importance" in text
    summary = json.loads((tmp_path / REPORT_DIR / "report.json").read_text())
    assert summary["importance_trials"] == MIN_FANOVA_TRIALS + 2 and summary["best"]["trial"] == rows[0]["trial"]
    assert len(summary["history"]["trials"]) == len(rows)
    assert report.text.splitlines()[1].startswith("parameter importance (Optuna fANOVA on 10 completed trials")


def test_too_few_completed_trials_for_fanova_says_so(tmp_path: Path) -> None:
    spec = demo_spec()
    rows = make_rows(spec, completed=4, pruned=5)
    importance = param_importance(rows, spec)
    assert importance.values == {} and importance.trials == 4
    assert format_importance(importance, spec.objective.metric) == (
        f"parameter importance: not computed, 4 completed trials (fANOVA needs at least {MIN_FANOVA_TRIALS})")
    report = write_report(rows, spec, tune_dir=tmp_path / "tune", folder=tmp_path / REPORT_DIR)
    assert "importance.png" not in report.figures and not (tmp_path / REPORT_DIR / "importance.png").exists()
    assert "Not computed: 4 completed trials (fANOVA needs at least 8)." in report.html.read_text()
    assert "parameter importance: not computed, 4 completed trials" in report.text


def test_fanova_ranks_first_the_parameter_that_drives_the_objective() -> None:
    spec = demo_spec()
    rows = make_rows(spec, completed=16, pruned=6, seed=1)
    importance = param_importance(rows, spec)
    assert importance.note is None and importance.trials == 16  # the pruned trials are left out
    assert set(importance.values) == set(spec.searched_keys())
    assert next(iter(importance.values)) == "optim.lr" and importance.values["optim.lr"] > 0.5, importance.values
    assert math.isclose(sum(importance.values.values()), 1.0, rel_tol=1e-6)
    assert param_importance(rows, spec) == importance  # seeded: the same table twice
    table = format_importance(importance, spec.objective.metric).splitlines()
    assert len(table) == 1 + len(spec.searched_keys()) and table[1].split()[0] == "optim.lr"


def test_learning_curves_keep_the_last_value_of_an_iteration_a_retried_trial_repeats() -> None:
    records = [
        {"cv/fold": 0.0, "train/iteration": 25.0, "train/loss": 1.0},
        {"cv/fold": 0.0, "train/iteration": 50.0, "train/loss": 0.9},
        {"cv/fold": 0.0, "train/iteration": 50.0, "train/loss": 0.8},  # the retry from the checkpoint at 25
        {"cv/fold": 0.0, "train/iteration": 50.0, "val/miou_seg": 0.4, "val/baseline_miou": 0.1},
        {"cv/fold": 1.0, "train/iteration": 25.0, "train/loss": float("nan")},  # no point
        {"cv/fold": 1.0, "train/iteration": 50.0, "train/loss": 0.7},
        {"train/iteration": 10.0, "train/loss": 5.0},  # no fold: not a trainer report
    ]
    curves = fold_curves(records)
    assert list(curves) == [0, 1]
    assert (curves[0].loss_iterations, curves[0].losses) == ([25.0, 50.0], [1.0, 0.8])
    assert (curves[0].val_iterations, curves[0].val_mious, curves[0].baseline) == ([50.0], [0.4], 0.1)
    assert (curves[1].loss_iterations, curves[1].losses, curves[1].val_mious) == ([50.0], [0.7], [])


def test_history_follows_the_arrival_of_results_and_counts_reserved_cpu_seconds() -> None:
    spec = demo_spec("resources.cpu=2")
    rows = [  # leaderboard order (best first); results arrive b, c, a; d never ran
        {"trial": "a", "status": "completed", "cv_miou_mean": 0.5},
        {"trial": "b", "status": "completed", "cv_miou_mean": 0.4},
        {"trial": "c", "status": "pruned", "cv_miou_mean": 0.6},
        {"trial": "d", "status": "pending", "cv_miou_mean": None},
    ]
    results = {"a": [{"timestamp": 300, "time_total_s": 30.0}], "b": [{"timestamp": 100, "time_total_s": 10.0}],
               "c": [{"timestamp": 200, "time_total_s": 5.0}]}
    history = compute_history(rows, results, spec)
    assert history.trials == ["b", "c", "a"]
    assert history.cpu_seconds == [20.0, 30.0, 90.0]  # 2 CPUs x (10, +5, +30) s
    assert history.best_so_far == [0.4, 0.4, 0.5]  # the pruned trial's 0.6 rests on fewer folds


def test_experiment_description_says_what_the_sweep_searched() -> None:
    spec = demo_spec()
    text = experiment_description(spec)
    for dist in spec.space:
        assert f"`{dist.key}`: {dist.kind} [" in text
    assert "- `optim.lr`: loguniform [0.0002, 0.002]" in text and "categorical [5, 10, 15]" in text
    assert "3-fold cross-validation" in text and "ASHA" in text and "`cv/miou_seg_mean`" in text


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One local SQLite MLflow store for the module's tests (creating one takes seconds)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri


def sweep_run(uri: str, spec, root: Path) -> dict:
    """An experiment and a finished sweep run without the objective metric; state.json's MLflow fields."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(spec.tracking.experiment, artifact_location=(root / "art").as_uri())
    run = client.create_run(experiment_id, tags={"cpews.kind": "sweep"}, run_name=spec.name)
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": run.info.run_id}


def test_report_is_logged_to_the_sweep_run_with_its_objective_and_the_experiment_description(
        store: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    spec = demo_spec(name="logged")
    state = sweep_run(store, spec, tmp_path)
    rows = make_rows(spec, completed=3, pruned=2)
    report = write_report(rows, spec, tune_dir=tmp_path / "tune", folder=tmp_path / REPORT_DIR)
    log_report(report, spec, state)

    client = MlflowClient(store)
    run_id = state["parent_run_id"]
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, REPORT_DIR)}
    assert logged == {*report.figures, "report.html", "report.json"}
    run = client.get_run(run_id)
    assert run.data.metrics[spec.objective.metric] == pytest.approx(rows[0]["cv_miou_mean"])
    assert run.info.status == "FINISHED"  # logged to, not reopened
    assert client.get_experiment(state["experiment_id"]).tags[NOTE_TAG] == experiment_description(spec)


def test_cli_sweep_report_prints_the_summary_writes_the_files_and_logs_them(store: str, tmp_path: Path) -> None:
    """`cpews sweep report NAME` on a sweep folder whose trials are in leaderboard.json (no Tune state, no Ray)."""
    from mlflow.tracking import MlflowClient

    from orchestration.cli import main
    from orchestration.sweep import sweep_paths

    spec = demo_spec(name="clirep")
    paths = sweep_paths(tmp_path / "runs", spec.name)
    paths.root.mkdir(parents=True)
    paths.spec.write_text(spec.to_yaml())
    state = sweep_run(store, spec, tmp_path)
    paths.state.write_text(json.dumps({"name": spec.name, **state}))
    rows = make_rows(spec, completed=2, pruned=1)
    paths.leaderboard.write_text(json.dumps({"sweep": spec.name, "trials": rows}))
    write_results(paths.tune, rows[0], start=1000.0)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["sweep", "report", spec.name, "--run-dir", str(tmp_path / "runs")])
    lines = out.getvalue().splitlines()
    assert code == 0, lines
    assert lines[0] == f"report of sweep {spec.name}: 3 trials (2 completed, 1 pruned)"
    assert lines[1] == "parameter importance: not computed, 2 completed trials (fANOVA needs at least 8)"
    assert lines[2].startswith(f"best trial: {rows[0]['trial']}, cv/miou_seg_mean ")
    assert any(line.startswith(f"report: {paths.report / 'report.html'}") for line in lines)
    assert lines[-1].startswith(f"MLflow: logged under {REPORT_DIR}/ of the sweep run {state['parent_run_id']}")
    assert {p.name for p in paths.report.iterdir()} == {*list(FIGURES)[1:], "report.html", "report.json"}
    logged = {Path(f.path).name for f in MlflowClient(store).list_artifacts(state["parent_run_id"], REPORT_DIR)}
    assert "report.html" in logged


def test_a_report_that_fails_warns_in_one_line_and_does_not_fail_the_sweep(monkeypatch, tmp_path: Path) -> None:
    import orchestration.report
    from orchestration.sweep import _make_report, sweep_paths

    def broken(*args, **kwargs):
        raise RuntimeError("no room left")

    monkeypatch.setattr(orchestration.report, "write_report", broken)
    spec = demo_spec()
    lines = _make_report([], spec, sweep_paths(tmp_path, spec.name), {}, parent=None)
    assert lines == [f"warning: sweep {spec.name}: the report was not made (RuntimeError: no room left); make it "
                     f"with `cpews sweep report {spec.name}`"]


def test_the_end_of_a_sweep_logs_its_report_through_the_sweep_runs_spool(store: str, tmp_path: Path) -> None:
    """What `_fit_and_close` does before the sweep's run ends: the report's files go to the run under `report/`,
    the experiment gets its description, and the lines to print say where the report is."""
    from mlflow.tracking import MlflowClient

    from orchestration.sweep import _make_report, sweep_paths
    from orchestration.tracking import RunLogger

    spec = demo_spec(name="ended")
    client = MlflowClient(store)
    experiment_id = client.create_experiment(spec.name, artifact_location=(tmp_path / "art").as_uri())
    paths = sweep_paths(tmp_path / "runs", spec.name)
    parent = RunLogger.start(store, experiment_id, run_name=spec.name, spool_dir=paths.parent_spool)
    state = {"tracking_uri": store, "experiment_id": experiment_id, "parent_run_id": parent.run_id}
    rows = make_rows(spec, completed=2, pruned=2)
    lines = _make_report(rows, spec, paths, state, parent)
    assert parent.end("FINISHED") == 0
    assert lines == ["parameter importance: not computed, 2 completed trials (fANOVA needs at least 8)",
                     f"report: {paths.report / 'report.html'} (and in MLflow: the sweep run's artifacts report/)"]
    logged = {Path(f.path).name for f in client.list_artifacts(parent.run_id, REPORT_DIR)}
    assert logged == {*list(FIGURES)[1:], "report.html", "report.json"}
    assert client.get_experiment(experiment_id).tags[NOTE_TAG] == experiment_description(spec)

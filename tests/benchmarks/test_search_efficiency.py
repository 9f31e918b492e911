"""benchmarks/search_space_table.py and benchmarks/search_efficiency.py: the table's sample and rows, and the
replay that drives the project's real searcher and schedulers from it (exact scores, hand-computed distances)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from orchestration.search_space import load_sweep
from orchestration.trial import CV_MEAN, FOLD_END, FOLD_INDEX, FOLD_SCORE, FOLDS_COMPLETED
from orchestration.tune_runner import make_searcher

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
DEMO = Path(__file__).resolve().parents[2] / "search_spaces" / "demo.yaml"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Ray pickles the replay trainable by reference to its module
    spec.loader.exec_module(module)
    return module


table_script = load("search_space_table")
efficiency = load("search_efficiency")

SPACE = {"proto.num_prototypes": {"categorical": [5, 10, 15]}, "loss.ssl_weight": {"loguniform": [0.001, 0.1]},
         "loss.ism_weight": {"uniform": [0.1, 0.5]}}


def _row(index: int, params: dict, scores: list[float], seconds: float = 60.0) -> dict:
    folds = [{"fold": f, "score": s, "baseline": 0.125 + 0.001 * f, "seconds": seconds, "cpu_seconds": seconds,
              "curve": [[100, s - 0.05], [200, s - 0.01], [300, s]]} for f, s in enumerate(scores)]
    return {"trial": f"t{index}", "params": params, "base": index == 0, "cv_mean": math.fsum(scores) / len(scores),
            "folds": folds}


def _table(rows: list[dict]) -> object:
    meta = {"space": SPACE, "folds": 3, "max_iters": 300, "objective": CV_MEAN, "eval_every": 100}
    return efficiency.Table(meta, rows)


ROWS = [
    _row(0, {"proto.num_prototypes": 10, "loss.ssl_weight": 0.01, "loss.ism_weight": 0.3}, [0.40, 0.42, 0.41]),
    _row(1, {"proto.num_prototypes": 5, "loss.ssl_weight": 0.001, "loss.ism_weight": 0.1}, [0.30, 0.31, 0.29]),
    _row(2, {"proto.num_prototypes": 15, "loss.ssl_weight": 0.1, "loss.ism_weight": 0.5}, [0.35, 0.36, 0.34]),
    _row(3, {"proto.num_prototypes": 10, "loss.ssl_weight": 0.003, "loss.ism_weight": 0.2}, [0.445, 0.452, 0.449]),
]


def test_normalised_coordinates_by_hand() -> None:
    space = efficiency.table_space(_table(ROWS))
    point = efficiency.normalised(space, {"proto.num_prototypes": 10, "loss.ssl_weight": 0.01,
                                          "loss.ism_weight": 0.2})
    # one-hot of 10 among (5, 10, 15) scaled by 1/sqrt(2); log10 0.01 halfway in [-3, -1]; 0.2 a quarter of [.1, .5]
    assert point.tolist() == pytest.approx([0.0, 1 / math.sqrt(2), 0.0, 0.5, 0.25])


def test_nearest_row_answers_a_recorded_configuration_with_itself_and_measures_the_gap() -> None:
    table = _table(ROWS)
    nearest = efficiency.NearestRow(table)
    for index, row in enumerate(ROWS):
        assert nearest(row["params"]) == (index, 0.0)
    # row 3 with another K: two different choices are 1 apart, the other keys equal (rows 0 and 2: about 1.06)
    index, distance = nearest({**ROWS[3]["params"], "proto.num_prototypes": 15})
    assert index == 3 and distance == pytest.approx(1.0)
    # row 0 with K 5: row 1 (K 5; ssl and ism half the range away each) is nearer, at sqrt(0.5)
    assert nearest({**ROWS[0]["params"], "proto.num_prototypes": 5}) == (1, pytest.approx(math.sqrt(0.5)))
    # between rows 0 and 3 on ism_weight only (0.3 vs 0.2) and ssl (0.01 vs 0.003): nearer row 3 when ssl=0.003
    assert nearest({**ROWS[3]["params"], "loss.ism_weight": 0.26})[0] == 3


def test_replay_reports_give_the_recorded_scores_exactly_and_spend_the_recorded_compute() -> None:
    row = ROWS[3]
    reports = efficiency.replay_reports(row, 300)
    ends = [r for r in reports if r[FOLD_END] == 1.0]
    assert [r[FOLD_SCORE] for r in ends] == [f["score"] for f in row["folds"]]
    assert ends[-1][CV_MEAN] == row["cv_mean"]  # the statistics.fmean of a real trial's report
    assert [r[FOLDS_COMPLETED] for r in ends] == [1.0, 2.0, 3.0]
    assert sum(r[efficiency.COMPUTE] for r in reports) == pytest.approx(180.0)
    within = [r for r in reports if r[FOLD_END] == 0.0]
    assert [(r[FOLD_INDEX], r["train/iteration"]) for r in within] == [(f, i) for f in (0, 1, 2) for i in (100, 200)]
    assert within[0][efficiency.COMPUTE] == pytest.approx(20.0)  # a third of a 60 s fold at 100 of 300 iterations
    # the running estimate in fold 1 at 200 iterations: (fold 0's score + the current validation) / 2
    assert within[3][efficiency.RUNNING] == pytest.approx((0.445 + 0.452 - 0.01) / 2)
    assert math.isnan(within[0][CV_MEAN])  # as a real trial, no CV mean before its first fold ends
    at_median = efficiency.replay_reports(row, 300, fold_cost=30.0)  # every fold at the table's median cost
    assert sum(r[efficiency.COMPUTE] for r in at_median) == pytest.approx(90.0)
    assert at_median[0][efficiency.COMPUTE] == pytest.approx(10.0)
    fold_level = efficiency.replay_reports(row, 300, curves=False)  # one report per fold, the whole fold's compute
    assert [(r[FOLD_SCORE], r[CV_MEAN], r[efficiency.COMPUTE]) for r in fold_level] == [
        (r[FOLD_SCORE], r[CV_MEAN], 60.0) for r in ends]


def test_the_unit_of_compute_is_the_median_recorded_fold() -> None:
    rows = [_row(0, ROWS[0]["params"], [0.4, 0.4, 0.4], seconds=50.0), _row(1, ROWS[1]["params"], [0.3] * 3, 70.0),
            _row(2, ROWS[2]["params"], [0.3] * 3, seconds=200.0)]  # a fold recorded while the machine was busy
    assert _table(rows).fold_cost == 70.0


def test_figures_compute_to_target_and_best_at_budget_by_hand() -> None:
    table = _table(ROWS)  # best 0.44867, target 0.43867: only row 3 reaches it
    summary = {"finished": [{"trial": "a", "row": 1, "cv_mean": 0.30, "compute": 180.0},
                            {"trial": "b", "row": 3, "cv_mean": ROWS[3]["cv_mean"], "compute": 420.0}],
               "stopped": [], "total_compute": 500.0, "distances": [0.1, 0.3],
               "best_proposed_row": 3, "best_proposed_stopped": False}
    never = {**summary, "finished": summary["finished"][:1], "total_compute": 300.0}
    fig = efficiency.figures(table, {"random": [summary, never], "tpe": [summary, summary]})
    assert fig["rows_within"] == 1
    assert fig["random_budget_cpu_s"] == 400.0
    random = fig["strategies"]["random"]
    assert random["never_reached"] == 1
    assert efficiency.compute_to_reach(summary, fig["target"]) == 420.0
    assert fig["strategies"]["tpe"]["compute_to_reach_q25_q50_q75"] == (420.0, 420.0, 420.0)
    # random's median budget 400: nothing finished by 100, the 0.30 trial by 200 (180), row 3 only at 420
    best = fig["strategies"]["tpe"]["best_at_budget"]
    assert math.isnan(best["25%"]) and best["50%"] == 0.30 and best["100%"] == 0.30


def test_load_table_refuses_what_is_not_a_table(tmp_path: Path) -> None:
    empty = tmp_path / "t.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="t.jsonl: empty"):
        efficiency.load_table(empty)
    empty.write_text('{"trial": 1}\n')
    with pytest.raises(ValueError, match="t.jsonl: line 1: no meta record"):
        efficiency.load_table(empty)
    empty.write_text('{"meta": {}}\n')
    with pytest.raises(ValueError, match="no configuration recorded yet"):
        efficiency.load_table(empty)


def test_table_sample_starts_with_the_base_configuration_and_is_what_a_random_sweep_tries() -> None:
    points = table_script.sample_points(DEMO, configs=5, seed=0)
    spec = table_script.table_sweep(DEMO, points, eval_every=100)
    base = spec.base_train_config().to_flat_dict()
    assert points[0] == {key: base[key] for key in spec.searched_keys()}
    assert table_script.sample_points(DEMO, configs=5, seed=0) == points  # seeded
    assert table_script.sample_points(DEMO, configs=5, seed=1)[1:] != points[1:]
    assert spec.scheduler.type == "fifo" and spec.time_budget_s is None and spec.fixed["eval.every"] == 100
    # the project's searcher of a random sweep with the base point enqueued proposes the same sequence
    demo = load_sweep(DEMO)
    data = demo.to_dict()
    data["search"] = {**data["search"], "algorithm": "random", "seed": 0, "start_points": points[:1]}
    from orchestration.search_space import validate_sweep

    searcher = make_searcher(validate_sweep(data, check_paths=False))
    searcher.set_search_properties(demo.objective.metric, demo.objective.mode, {})
    assert [searcher.suggest(f"t{i}") for i in range(5)] == points


def _tune_trial(folder: Path, params: dict, scores: list[float], *, finished: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    lines, total, done = [], 0.0, []
    for fold, score in enumerate(scores[:finished]):
        for iteration in (100, 200):
            total += 10.0
            lines.append({FOLD_INDEX: fold, FOLD_END: 0.0, "train/iteration": iteration,
                          "val/miou_seg": score - 0.1 + iteration / 2000, "time_total_s": total})
        lines.append({FOLD_INDEX: fold, FOLD_END: 0.0, "train/iteration": 150, "train/loss": 1.0,
                      "time_total_s": total})  # a training report: no validation
        total += 5.0
        done.append(score)
        lines.append({FOLD_INDEX: fold, FOLD_END: 1.0, "train/iteration": 200, FOLD_SCORE: score,
                      "val/baseline_miou": 0.127, CV_MEAN: sum(done) / len(done), "time_total_s": total})
    (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_table_row_from_a_tune_trial_folder(tmp_path: Path) -> None:
    params = {"a": 1}
    folder = _tune_trial(tmp_path / "trial_abc", params, [0.4, 0.5], finished=2)
    row = table_script.trial_row(folder, 2, 2.0, {"a": 1})
    assert row["trial"] == "abc" and row["base"] and row["params"] == params
    assert row["cv_mean"] == pytest.approx(0.45)
    assert [f["score"] for f in row["folds"]] == [0.4, 0.5]
    assert row["folds"][1]["curve"] == [[100, pytest.approx(0.45)], [200, pytest.approx(0.5)]]
    assert [f["seconds"] for f in row["folds"]] == [25.0, 25.0]
    assert [f["cpu_seconds"] for f in row["folds"]] == [50.0, 50.0]  # 2 CPUs per trial
    assert table_script.trial_row(folder, 2, 1.0, {"a": 2})["base"] is False
    unfinished = _tune_trial(tmp_path / "trial_def", params, [0.4, 0.5], finished=1)
    assert table_script.trial_row(unfinished, 2, 1.0, {"a": 1}) is None


def test_table_file_is_written_whole_and_refuses_rows_of_other_settings(tmp_path: Path) -> None:
    points = table_script.sample_points(DEMO, configs=2, seed=0)
    spec = table_script.table_sweep(DEMO, points, eval_every=100)
    out = tmp_path / "table.jsonl"
    meta = table_script.table_meta(spec, "cmd", DEMO, 1)
    table_script.write_table(out, meta, ROWS[:1])
    assert not (tmp_path / "table.jsonl.partial").exists()
    read_meta, rows = table_script.read_rows(out)
    assert rows == ROWS[:1] and table_script.comparable(read_meta, spec) == []
    other = table_script.table_sweep(DEMO, points, eval_every=50)
    assert any(problem.startswith("fixed:") for problem in table_script.comparable(read_meta, other))
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl: not a space table"):
        table_script.read_rows(tmp_path / "bad.jsonl")


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch):
    """A local 2-CPU Ray instance for the replay (none from outside), shut down afterwards."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name, value in efficiency.QUIET_TUNE.items():
        monkeypatch.setenv(name, value)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_a_replayed_sweep_reports_the_tables_values_for_the_trials_it_ran(local_ray, tmp_path: Path) -> None:
    table = _table(ROWS)
    summary = efficiency.replay_sweep(table, strategy="random", seed=0, trials=6, time_scale=0.0,
                                      storage=tmp_path / "replays")
    assert len(summary["finished"]) == 6 and not summary["stopped"]
    for trial in summary["finished"]:  # the leaderboard of the replay: each trial's CV mean is its row's
        assert trial["cv_mean"] == table.rows[trial["row"]]["cv_mean"]
    assert summary["total_compute"] == pytest.approx(6 * 180.0)
    asha = efficiency.replay_sweep(table, strategy="tpe_asha_folds", seed=0, trials=6, time_scale=0.0,
                                   storage=tmp_path / "replays")
    assert len(asha["finished"]) + len(asha["stopped"]) == 6
    assert all(0 < s["folds"] < 3 for s in asha["stopped"])
    for trial in asha["finished"]:
        assert trial["cv_mean"] == table.rows[trial["row"]]["cv_mean"]


def test_merge_prints_the_figures_of_replays_saved_by_separate_runs(tmp_path: Path) -> None:
    import subprocess

    table = tmp_path / "table.jsonl"
    meta = {"space": SPACE, "folds": 3, "max_iters": 300, "objective": CV_MEAN}
    table.write_text("".join(json.dumps(line) + "\n" for line in [{"meta": meta}, *ROWS]))
    run = {"finished": [{"trial": "b", "row": 3, "cv_mean": ROWS[3]["cv_mean"], "compute": 420.0}], "stopped": [],
           "total_compute": 500.0, "distances": [0.1], "best_proposed_row": 3, "best_proposed_stopped": False}
    (tmp_path / "a.json").write_text(json.dumps({"replays": {"random": [run]}}))
    (tmp_path / "b.json").write_text(json.dumps({"replays": {"tpe": [run, run]}}))
    result = subprocess.run([sys.executable, str(BENCHMARKS / "search_efficiency.py"), str(table), "--merge",
                             str(tmp_path / "a.json"), str(tmp_path / "b.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "random search's median budget 500 CPU-s" in lines[0]
    assert any(line.split()[:2] == ["tpe", "2"] and "420 / 420 / 420" in line for line in lines)
    (tmp_path / "c.json").write_text("{}")
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "search_efficiency.py"), str(table), "--merge",
                          str(tmp_path / "c.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "c.json: not a --json output of this script" in bad.stderr


def test_a_complete_table_is_left_as_recorded(tmp_path: Path) -> None:
    """`--extract-only` with nothing new to add does not rewrite the committed table (command, version, date)."""
    import shutil
    import subprocess

    table = tmp_path / "table.jsonl"
    shutil.copyfile(BENCHMARKS / "data" / "demo_space_table.jsonl", table)
    before = table.read_bytes()
    result = subprocess.run([sys.executable, str(BENCHMARKS / "search_space_table.py"), str(DEMO), "--extract-only",
                             "--run-dir", str(tmp_path / "runs"), "--out", str(table)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "48 of 48 configurations, all already in" in result.stdout
    assert table.read_bytes() == before


def test_base_first_strategies_start_from_the_tables_base_configuration() -> None:
    table = _table(ROWS)
    spec = efficiency.replay_spec(table, strategy="tpe_asha_folds_base_first", seed=0, trials=4, max_concurrent=2)
    assert spec.scheduler.type == "asha" and spec.search.algorithm == "tpe"
    first = make_searcher(spec).suggest("first")
    assert first == ROWS[0]["params"]  # the row marked base, proposed before any sampled point
    plain = efficiency.replay_spec(table, strategy="tpe_base_first", seed=0, trials=4, max_concurrent=2)
    assert plain.scheduler.type == "fifo" and len(plain.search.start_points) == 1
    assert efficiency.replay_spec(table, strategy="tpe", seed=0, trials=4, max_concurrent=2).search.start_points == []
    no_base = _table([{**row, "base": False} for row in ROWS])
    with pytest.raises(ValueError, match="no base configuration"):
        efficiency.replay_spec(no_base, strategy="tpe_base_first", seed=0, trials=4, max_concurrent=2)

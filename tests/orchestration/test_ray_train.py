"""Multi-worker trials (`orchestration.ray_train`): how a sweep file's resources become Ray Train workers, the
errors for resources that cannot work, and a real micro sweep whose trial trains each fold on 2 gloo workers,
reports through Tune and MLflow as a one-process trial does, and resumes mid-fold after its process is killed."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.ray_train import WorkerLayout, trial_resources, worker_layout
from orchestration.search_space import ResourceSettings, SweepFileError, apply_overrides, load_sweep, smoke


def demo_spec(*overrides: str, name: str = "workers"):
    """The smoke demo sweep (2 folds x 8 iterations), then `overrides` (sweep-file `key=value`)."""
    from orchestration.search_space import validate_sweep

    data = smoke(load_sweep("demo", check_paths=False)).to_dict()
    return validate_sweep(apply_overrides(data, [*overrides, f"name={name}", f"tracking.experiment={name}"]),
                          check_paths=False)


@pytest.mark.parametrize(
    ("resources", "layout", "reserved"),
    [
        ({"cpu": 2}, WorkerLayout(1, False, 2.0), {"cpu": 2.0, "gpu": 0.0}),
        ({"cpu": 4, "gpu": 0.5}, WorkerLayout(1, False, 4.0), {"cpu": 4.0, "gpu": 0.5}),  # one process, shared GPU
        ({"cpu": 1, "gpu": 1}, WorkerLayout(1, True, 1.0), {"cpu": 1.0, "gpu": 1.0}),
        ({"cpu": 8, "gpu": 2}, WorkerLayout(2, True, 4.0), {"cpu": 0, "gpu": 0, "memory": 1}),
        ({"cpu": 2, "workers": 2}, WorkerLayout(2, False, 1.0), {"cpu": 0, "gpu": 0, "memory": 1}),
    ],
)
def test_resources_become_workers(resources: dict, layout: WorkerLayout, reserved: dict) -> None:
    settings = ResourceSettings(**resources)
    assert worker_layout(settings) == layout
    assert layout.backend == ("nccl" if layout.use_gpu else "gloo")
    assert trial_resources(settings) == reserved


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("resources.cpu=2", "resources.workers=2", "fixed.train.batch_size=5"),
         "fixed.train.batch_size: train.batch_size 5 cannot be split over 2 workers"),
        (("resources.cpu=3", "resources.workers=3", "fixed.train.batch_size=null",
          "space={train.batch_size: {categorical: [6, 8]}}"),
         "space.train.batch_size: train.batch_size 8 cannot be split over 3 workers"),
        (("resources.gpu=0.5", "resources.workers=2", "fixed.train.device=cuda"),
         "resources.workers: 2 with resources.gpu: 0.5; it must be 1"),
        (("resources.cpu=2", "resources.gpu=2", "resources.workers=4", "fixed.train.device=cuda"),
         "resources.workers: 4 with resources.gpu: 2; it must be 2 (one per GPU)"),
    ],
)
def test_resources_that_cannot_work_are_refused_before_any_trial(overrides: tuple, message: str) -> None:
    with pytest.raises(SweepFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        demo_spec(*overrides)


@pytest.mark.ray
def test_two_gloo_workers_report_to_this_process_in_order(ray_env: None, make_micro_config, tmp_path: Path) -> None:
    """`train_with_workers` outside Tune: rank 0's reports arrive here one by one while it waits (the fold's
    `last.pt` is on disk when a report names its folder), and its result comes back; rank 1 says nothing."""
    import ray

    from orchestration.ray_train import train_with_workers

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = make_micro_config("optim.max_iters=4", "train.log_every=2", "train.checkpoint_every=2",
                            "proto.n_builds=0", "eval.max_images=4")
    reports: list = []

    def reporter(metrics: dict, checkpoint_dir: Path | None) -> None:
        on_disk = checkpoint_dir is not None and (checkpoint_dir / "last.pt").is_file()
        reports.append((int(metrics["train/iteration"]), sorted(metrics), checkpoint_dir, on_disk))

    outcome = train_with_workers(
        cfg, reporter, layout=WorkerLayout(2, False, 1.0), out_dir=tmp_path / "fold_0", resume=None,
        train_ids=None, val_ids=None, val_split=None, class_names=["background", "a", "b", "c", "d", "e", "f"],
        log_path=tmp_path / "trial.log", label="[t]", storage_path=tmp_path / "ray_train",
    )
    assert [(it, directory is not None, on_disk) for it, _, directory, on_disk in reports] == [
        (2, False, False), (2, True, True), (4, False, False), (4, True, True)]
    assert "train/loss" in reports[0][1] and "val/miou_seg" in reports[3][1]
    assert outcome.result.iterations == 4 and "val/miou_seg" in outcome.result.metrics
    assert outcome.pool_cache == "none"
    log = (tmp_path / "trial.log").read_text()
    assert log.count("[t] training on 2 workers (gloo)") == 1 and log.count("[train] it=4/4") == 1, log


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_worker_trial_trains_reports_and_resumes_mid_fold(ray_env: None, tmp_path: Path) -> None:
    """One trial, 2 folds x 8 iterations, each fold on 2 gloo workers (global batch 8 = 2 x 4). The trial's process
    kills itself in fold 1 after the checkpoint at iteration 4 (its workers die with it): Tune retries it, and the
    retry continues fold 1 from iteration 4 on 2 new workers, in the same MLflow runs."""
    from mlflow.tracking import MlflowClient

    from orchestration.sweep import run_sweep

    spec = demo_spec("search.num_trials=1", "scheduler.type=fifo", "resources.cpu=2", "resources.workers=2")
    outcome = run_sweep(spec, run_dir=tmp_path / "runs", out=lambda line: None, faults={"kill_at": (1, 5)})

    (row,) = outcome.rows
    assert (row["status"], row["folds_completed"]) == ("completed", 2), row
    trial_dir = Path(row["path"])
    assert "SIGKILL at fold 1" in (trial_dir / "fault_injected").read_text()
    assert (trial_dir / "folds_started.log").read_text().split("\n")[:3] == ["0 0", "1 0", "1 4"]
    log = (trial_dir / "trial.log").read_text()
    assert log.count("training on 2 workers (gloo)") == 3, log[-3000:]  # fold 0, fold 1, fold 1 resumed
    assert "removed the workers' placement group" in log  # the killed attempt's, which held the 2 CPUs
    for fold in (0, 1):
        assert (trial_dir / f"fold_{fold}" / "last.pt").is_file()
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    folds = [r for r in runs if r.data.tags.get("cpews.kind") == "fold"]
    assert len(folds) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in folds:  # rank 0's per-step losses reached the fold run, one value per logged step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [2, 4, 6, 8], steps

"""A sweep that fails to start after its MLflow run exists: the run ends FAILED (never RUNNING), no folder is left.

Real MLflow (a SQLite store under the test's run folder) and a real refusal by Ray to start; no trial runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def test_sweep_whose_ray_session_cannot_start_ends_its_run_failed(
    synthetic_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from orchestration.search_space import apply_overrides, load_sweep, smoke, validate_sweep
    from orchestration.sweep import run_sweep, sweep_paths
    from orchestration.tracking import resolve_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    data = smoke(load_sweep("demo", check_paths=False)).to_dict()
    data = apply_overrides(data, ["name=nostart", "tracking.experiment=nostart", "fixed.model.weights="])
    spec = validate_sweep(data, check_paths=False)
    lines: list[str] = []
    # Ray refuses a negative CPU count when it starts its local instance: after the sweep's run was created
    with pytest.raises(ValueError, match="nonnegative"):
        run_sweep(spec, run_dir=tmp_path, out=lines.append, num_cpus=-1)
    assert not ray.is_initialized()
    assert any("sweep run" in line for line in lines), lines  # the run had been created
    client = MlflowClient(resolve_store(tmp_path).tracking_uri)
    experiment = client.get_experiment_by_name("nostart")
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    assert [(run.info.status, run.data.tags.get("cpews.status")) for run in runs] == [("FAILED", "failed to start")]
    assert not sweep_paths(tmp_path, spec.name).root.exists()  # nothing half-made is left behind

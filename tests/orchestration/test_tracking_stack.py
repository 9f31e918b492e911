"""The shared tracking server for real: PostgreSQL (OS packages) + moto's S3 server + `mlflow server` with proxied
artifacts, all on 127.0.0.1 (`orchestration.services`); a micro sweep and a promotion log into it."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.ray]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from orchestration.services import TrackingStack

    running = TrackingStack(tmp_path_factory.mktemp("stack")).start()
    try:
        yield running
    finally:
        running.stop()


def test_sweep_and_promotion_land_in_postgres_and_s3(
    stack, synthetic_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    import mlflow
    import ray
    from mlflow.tracking import MlflowClient

    from orchestration.promote import promote
    from orchestration.search_space import apply_overrides, load_sweep, smoke, validate_sweep
    from orchestration.services import S3_TEST_CREDENTIALS
    from orchestration.sweep import run_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in S3_TEST_CREDENTIALS:  # the clients need no S3 credentials: artifacts go through the server
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    data = apply_overrides(smoke(load_sweep("demo", check_paths=False)).to_dict(),
                           ["name=stack", "tracking.experiment=stack", "scheduler.type=fifo"])
    spec = validate_sweep(data, check_paths=False)
    if ray.is_initialized():
        ray.shutdown()
    outcome = run_sweep(spec, run_dir=tmp_path / "runs", out=lambda line: None)
    decision = promote("stack", run_dir=tmp_path / "runs", model_name="cpews-stack", out=lambda line: None)
    if ray.is_initialized():
        ray.shutdown()

    assert outcome.tracking_uri == stack.tracking_uri
    assert [row["status"] for row in outcome.rows] == ["completed", "completed"]
    assert decision["promoted"] and decision["version"] == "1"

    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("stack")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    kinds = Counter(run.data.tags["cpews.kind"] for run in runs)
    assert kinds == {"sweep": 1, "trial": 2, "fold": 4, "promotion": 1}
    assert {run.info.status for run in runs} == {"FINISHED"}
    by_id = {run.info.run_id: run for run in runs}
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        expected = {"sweep": None, "trial": "sweep", "fold": "trial", "promotion": "sweep"}[run.data.tags["cpews.kind"]]
        assert (by_id[parent].data.tags["cpews.kind"] if parent else None) == expected

    # the metadata really is in PostgreSQL
    count = stack.postgres.query(f"SELECT count(*) FROM runs WHERE experiment_id = {experiment.experiment_id}")
    assert int(count) == len(runs)
    assert stack.postgres.query("SELECT count(*) FROM model_versions WHERE name = 'cpews-stack'") == "1"

    # and the artifacts are objects in the bucket
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
            for obj in page.get("Contents", [])]
    for run in runs:
        if run.data.tags["cpews.kind"] == "fold":
            prefix = f"mlflow/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
            names = {key[len(prefix):] for key in keys if key.startswith(prefix)}
            assert {"pool/pool.pt", "pool/pool.json", "pool/pool.png", "checkpoint/last.pt"} <= names, names
            assert sum(name.startswith("overlays/") for name in names) == 4
    assert any(key.endswith("/weights.pt") for key in keys)  # the promoted model's weights
    assert any(key.endswith("folds.json") for key in keys) and any(key.endswith("leaderboard.json") for key in keys)

    # the champion loads through the server (no S3 credentials here) and predicts
    mlflow.set_tracking_uri(stack.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/cpews-stack@champion")
    image = sorted((synthetic_data_dir / "JPEGImages").glob("*.png"))[0]
    (labels,) = model.predict([str(image)])
    assert labels.ndim == 2 and labels.dtype.name == "uint8"
    assert "AWS_ACCESS_KEY_ID" not in os.environ

"""The shared tracking server for real: PostgreSQL (OS packages) + moto's S3 server + `mlflow server` with proxied
artifacts, all on 127.0.0.1 (`orchestration.services`); a micro sweep and a promotion log into it."""

from __future__ import annotations

import os
import sys
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
    # the micro model (8 iterations) need not beat the all-background mIoU: this test is about where things land
    decision = promote("stack", run_dir=tmp_path / "runs", model_name="cpews-stack", force=True,
                       out=lambda line: None)
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


def test_run_server_script_serves_with_basic_auth(stack, tmp_path: Path) -> None:
    """infra/mlflow/run_server.sh with a filled-in env file (the stack's PostgreSQL and S3): requests without
    credentials are refused, the admin's are served, and a logged artifact lands in the bucket."""
    import secrets
    import signal
    import subprocess

    import boto3
    import requests

    from orchestration.services import S3_TEST_CREDENTIALS, free_port, wait_for_port

    password = secrets.token_urlsafe(16)
    stack.postgres.query('CREATE DATABASE "mlflow_auth"', database="postgres")
    auth_ini = tmp_path / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = postgresql://postgres@127.0.0.1:{stack.postgres.port}/mlflow_auth\n"
        f"admin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env_file = tmp_path / "mlflow.env"
    env_file.write_text("\n".join([
        f"MLFLOW_BACKEND_STORE_URI={stack.postgres.uri}",
        f"MLFLOW_ARTIFACTS_DESTINATION=s3://{stack.bucket}/auth-test",
        *(f"{k}={v}" for k, v in S3_TEST_CREDENTIALS.items()),
        f"MLFLOW_S3_ENDPOINT_URL={stack.s3_endpoint}",
        f"MLFLOW_AUTH_CONFIG_PATH={auth_ini}",
        f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(16)}",
        "MLFLOW_HOST=127.0.0.1", f"MLFLOW_PORT={port}", "MLFLOW_WORKERS=1",
    ]) + "\n")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(["bash", str(repo / "infra" / "mlflow" / "run_server.sh"), str(env_file)], cwd=repo,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 120, "run_server.sh", server, tmp_path / "server.log")
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
        body = {"max_results": 5}
        assert requests.post(url, json=body, timeout=30).status_code == 401
        assert requests.post(url, json=body, auth=("admin", "wrong"), timeout=30).status_code == 401
        assert requests.post(url, json=body, auth=("admin", password), timeout=30).status_code == 200

        (tmp_path / "note.txt").write_text("hello")
        script = ("import mlflow\nwith mlflow.start_run() as run:\n    mlflow.log_artifact('note.txt')\n"
                  "print(run.info.run_id)\n")
        client_env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
                      "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        for key in S3_TEST_CREDENTIALS:
            client_env.pop(key, None)
        run_id = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=client_env, check=True,
                                capture_output=True, text=True, timeout=120).stdout.split()[-1]
        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket, Prefix="auth-test/").get("Contents", [])]
        assert any(key.endswith(f"{run_id}/artifacts/note.txt") for key in keys), keys
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()

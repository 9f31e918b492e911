"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (see conftest.py): the run tree, continuing a
run, an outage, a crashed writer, redaction, long params, non-finite metrics, dangling runs, the local store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from orchestration.tracking import (
    FULL_PARAMS_ARTIFACT,
    SKIPPED_METRICS_TAG,
    TRUNCATION_MARKER,
    LocalStore,
    RunLogger,
    TrackingUnavailableError,
    close_dangling_runs,
    default_tracking_uri,
    ensure_experiment,
    find_spool_dirs,
    flush_pending,
    is_secret_key,
    is_transient,
    redact,
    resolve_store,
    runs_left_running,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def new_experiment(client: MlflowClient, request: pytest.FixtureRequest) -> str:
    return ensure_experiment(client, request.node.name)


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def run_ids(client: MlflowClient, experiment_id: str) -> set[str]:
    return {run.info.run_id for run in client.search_runs([experiment_id])}


# ------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "db.password",
        "aws_secret_access_key",
        "AWS_SECRET_ACCESS_KEY",
        "openai_api_key",
        "apiKey",
        "tracking.token",
        "hf-token",
        "s3/credentials",
        "client_secret",
        "private.key",
    ],
)
def test_secret_keys_are_recognised(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["model.num_tokens", "keypoints", "monkey", "loss.ptc_weight", "tokenizer", "passage", "secretary_count"],
)
def test_words_that_only_contain_a_secret_word_are_kept(key):
    assert not is_secret_key(key)


def test_redact_drops_secret_keys_masks_url_credentials_and_keeps_order():
    params = {
        "loss.ptc_weight": 0.2,
        "aws_secret_access_key": "AKIA...",
        "tracking.uri": "postgresql+psycopg2://mlflow:hunter2@127.0.0.1:5432/mlflow",
        "openai_api_key": "sk-123",
        "model.num_tokens": 196,
        "data.root": "/data/voc",
    }
    clean = redact(params)
    assert list(clean) == ["loss.ptc_weight", "tracking.uri", "model.num_tokens", "data.root"]
    assert clean["tracking.uri"] == "postgresql+psycopg2://***@127.0.0.1:5432/mlflow"
    assert "hunter2" not in json.dumps(clean)
    assert clean["loss.ptc_weight"] == 0.2 and clean["data.root"] == "/data/voc"
    assert params["aws_secret_access_key"] == "AKIA..."  # the input is not modified


def wrapped(cause: Exception) -> MlflowException:
    """What MLflow's HTTP client raises for a transport failure: the cause only as `__context__`."""
    try:
        raise cause
    except Exception as exc:
        try:
            raise MlflowException(f"API request to http://127.0.0.1:1/x failed with exception {exc}")
        except MlflowException as outer:
            return outer


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (wrapped(requests.ConnectionError("refused")), True),
        (wrapped(requests.exceptions.RetryError("too many 503 error responses")), True),
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
        (http_error(502), True),
        (http_error(429), True),
        (ConnectionRefusedError(), True),
        (MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE), False),
        (MlflowException("no run", error_code=RESOURCE_DOES_NOT_EXIST), False),
        (http_error(404), False),
        (FileNotFoundError("spool copy"), False),
    ],
)
def test_transient_errors_are_told_from_refusals(error, transient):
    assert is_transient(error) is transient


def test_resolve_store_uses_the_environment_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_store(tmp_path) == LocalStore("http://127.0.0.1:5999", None)
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    assert not (tmp_path / "mlflow").exists()


# ------------------------------------------------------------------------------------------- with a server


def test_run_tree_with_params_metrics_tags_and_artifacts(live_mlflow_server, tmp_path, request):
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    sweep = RunLogger.start(uri, experiment_id, run_name="sweep", spool_dir=tmp_path / "sweep")
    trial = RunLogger.start(
        uri,
        experiment_id,
        run_name="trial_0000",
        parent_run_id=sweep.run_id,
        tags={"cpews.trial_id": "0000", "hf_token": "nope"},
        spool_dir=tmp_path / "trial",
    )
    fold = RunLogger.start(
        uri,
        experiment_id,
        run_name="trial_0000_fold_1",
        parent_run_id=trial.run_id,
        spool_dir=tmp_path / "fold",
    )
    assert len({sweep.run_id, trial.run_id, fold.run_id}) == 3

    trial.log_params(
        {"model.num_prototypes": 8, "loss.ptc_weight": 0.2, "train.amp": True, "db_password": "x"}
    )
    fold.log_metrics({"train/loss": 0.9, "val/miou": 0.41}, step=10)
    fold.log_metrics({"train/loss": 0.7, "val/miou": 0.52}, step=20)
    fold.set_tags({"fold": 1})
    pool_dir = tmp_path / "pool"
    (pool_dir / "meta").mkdir(parents=True)
    (pool_dir / "prototypes.npy").write_bytes(b"\x00" * 64)
    (pool_dir / "meta" / "pool.json").write_text('{"k": 8}')
    fold.log_artifacts(pool_dir, "prototype_pool")
    assert fold.end() == 0 and trial.end() == 0 and sweep.end() == 0

    trial_run = client.get_run(trial.run_id)
    assert trial_run.data.tags[MLFLOW_PARENT_RUN_ID] == sweep.run_id
    assert client.get_run(fold.run_id).data.tags[MLFLOW_PARENT_RUN_ID] == trial.run_id
    assert MLFLOW_PARENT_RUN_ID not in client.get_run(sweep.run_id).data.tags
    assert trial_run.info.run_name == "trial_0000"
    assert trial_run.data.params == {
        "model.num_prototypes": "8",
        "loss.ptc_weight": "0.2",
        "train.amp": "True",
    }
    assert trial_run.data.tags["cpews.trial_id"] == "0000" and "hf_token" not in trial_run.data.tags
    assert metric_steps(client, fold.run_id, "val/miou") == [(10, 0.41), (20, 0.52)]
    assert client.get_run(fold.run_id).data.tags["fold"] == "1"
    assert [f.path for f in client.list_artifacts(fold.run_id, "prototype_pool")] == [
        "prototype_pool/meta",
        "prototype_pool/prototypes.npy",
    ]
    assert [f.path for f in client.list_artifacts(fold.run_id, "prototype_pool/meta")] == [
        "prototype_pool/meta/pool.json"
    ]
    assert {client.get_run(r).info.status for r in (sweep.run_id, trial.run_id, fold.run_id)} == {"FINISHED"}
    assert not list((tmp_path / "fold" / "artifacts").iterdir())  # delivered copies are removed


def test_continuing_a_run_by_id_creates_no_new_run(live_mlflow_server, tmp_path, request):
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    first = RunLogger.start(uri, experiment_id, run_name="trial", spool_dir=tmp_path / "attempt_0")
    first.log_metrics({"train/loss": 1.0}, step=1)
    first.end("FAILED")
    before = run_ids(client, experiment_id)

    again = RunLogger.start(
        uri, experiment_id, run_name="trial", run_id=first.run_id, spool_dir=tmp_path / "attempt_1"
    )
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"  # set back on continuing
    again.log_metrics({"train/loss": 0.5}, step=2)
    assert again.end() == 0
    assert run_ids(client, experiment_id) == before
    assert metric_steps(client, first.run_id, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert client.get_run(first.run_id).info.status == "FINISHED"

    # A process that died after the server created its run but before it wrote the id: the retry finds the
    # run by the spool's token tag instead of creating a second one.
    meta_path = tmp_path / "attempt_0" / "run.json"
    meta = json.loads(meta_path.read_text())
    del meta["run_id"]
    meta_path.write_text(json.dumps(meta))
    found = RunLogger.start(uri, experiment_id, run_name="trial", spool_dir=tmp_path / "attempt_0")
    assert found.run_id == first.run_id
    found.close()
    assert run_ids(client, experiment_id) == before

    with pytest.raises(ValueError, match="belongs to MLflow run"):
        RunLogger.start(
            uri, experiment_id, run_name="other", run_id="0" * 32, spool_dir=tmp_path / "attempt_1"
        )


def test_outage_spools_calls_and_flush_delivers_everything_once(live_mlflow_server, tmp_path, request):
    server = live_mlflow_server
    client = MlflowClient(server.uri)
    experiment_id = new_experiment(client, request)
    logger = RunLogger.start(server.uri, experiment_id, run_name="trial", spool_dir=tmp_path / "spool")
    logger.log_params({"model.num_prototypes": 4})
    logger.log_metrics({"train/loss": 1.0}, step=0)
    assert logger.pending == 0

    http_settings = {
        k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    server.stop()
    overlay = tmp_path / "overlay.txt"
    overlay.write_text("v1")
    durations = []
    for step in range(1, 6):
        started = time.monotonic()
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "val/miou": step / 10}, step=step)
        durations.append(time.monotonic() - started)
    started = time.monotonic()
    logger.log_params({"loss.ptc_weight": 0.2})
    logger.log_artifact(overlay, "overlays")
    logger.set_tags({"phase": "outage"})
    durations.append(time.monotonic() - started)
    overlay.write_text("v2")  # the trial's own file changes; the spooled copy does not
    assert max(durations) < 1.0, durations
    assert logger.pending == 8
    started = time.monotonic()
    assert logger.flush(timeout_s=0.5) == 8  # still down: a bounded wait
    assert time.monotonic() - started < 2.0

    server.start()
    assert logger.flush(timeout_s=30) == 0
    run_id = logger.run_id
    assert metric_steps(client, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(6)]
    assert metric_steps(client, run_id, "val/miou") == [(s, s / 10) for s in range(1, 6)]
    run = client.get_run(run_id)
    assert run.data.params == {"model.num_prototypes": "4", "loss.ptc_weight": "0.2"}
    assert run.data.tags["phase"] == "outage"
    downloaded = client.download_artifacts(run_id, "overlays/overlay.txt", str(tmp_path / "download"))
    assert Path(downloaded).read_text() == "v1"
    assert logger.end() == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {k: os.environ.get(k) for k in http_settings} == http_settings  # MLflow's retry settings restored


CRASHING_TRIAL = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from orchestration.tracking import RunLogger

    uri, experiment_id, run_id, spool, note = sys.argv[1:6]
    logger = RunLogger.start(uri, experiment_id, run_name="trial", run_id=run_id, spool_dir=Path(spool))
    logger.log_params({"model.num_prototypes": 16, "data.batch_size": 8})
    for step in range(5):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.log_artifact(note, "notes")
    print(logger.pending, flush=True)
    os._exit(3)  # dies without end(), like a killed trial
    """
)


def test_a_new_logger_on_a_crashed_spool_delivers_pending_records_once(
    live_mlflow_server, tmp_path, request, dead_uri
):
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    created = RunLogger.start(uri, experiment_id, run_name="trial", spool_dir=tmp_path / "first")
    created.close()
    run_id = created.run_id
    spool = tmp_path / "spool"
    note = tmp_path / "note.txt"
    note.write_text("checkpoint at step 4")

    # A trial process that cannot reach MLflow and is killed before end(): everything stays in its spool.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_TRIAL, dead_uri, experiment_id, run_id, str(spool), str(note)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert int(result.stdout.strip()) == 8  # status, params, 5 metric records, the artifact
    note.unlink()
    assert find_spool_dirs(tmp_path) == [tmp_path / "first", spool]
    crashed_state = tmp_path / "crashed_state"
    shutil.copytree(spool, crashed_state)
    before = run_ids(client, experiment_id)

    with open(spool / "records.jsonl", "ab") as records:
        records.write(b'{"seq":99,"op":"bat')  # a write cut short by the crash: the call never returned

    # The restarted trial gives no run id: the spool says which run it continues.
    restarted = RunLogger.start(uri, experiment_id, run_name="trial", spool_dir=spool)
    assert restarted.run_id == run_id
    assert restarted.flush(timeout_s=30) == 0
    assert run_ids(client, experiment_id) == before

    # The worst case: a process that delivered everything but died before saving its position.
    assert flush_pending(crashed_state, uri, timeout_s=30) == 0

    assert metric_steps(client, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert client.get_run(run_id).data.params == {"model.num_prototypes": "16", "data.batch_size": "8"}
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert restarted.end() == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert flush_pending(spool, uri, timeout_s=5) == 0  # nothing left: a no-op
    lines = (spool / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, len(lines) + 1))  # torn line gone


def test_end_with_server_unreachable_leaves_the_spool_for_flush_pending(
    live_mlflow_server, tmp_path, request, dead_uri
):
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    created = RunLogger.start(uri, experiment_id, run_name="trial", spool_dir=tmp_path / "first")
    created.close()

    logger = RunLogger.start(
        dead_uri, experiment_id, run_name="trial", run_id=created.run_id, spool_dir=tmp_path / "spool"
    )
    logger.log_metrics({"val/miou": 0.5}, step=3)
    started = time.monotonic()
    left = logger.end("FINISHED", timeout_s=0.5)
    assert time.monotonic() - started < 2.0
    assert left == 3  # status RUNNING, the metric, the end status
    assert client.get_run(created.run_id).info.status == "RUNNING"

    assert flush_pending(tmp_path / "spool", uri, timeout_s=30) == 0
    assert metric_steps(client, created.run_id, "val/miou") == [(3, 0.5)]
    assert client.get_run(created.run_id).info.status == "FINISHED"


def test_creating_a_run_gives_up_with_a_clear_error_after_the_timeout(tmp_path, dead_uri):
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match="could not create MLflow run 'trial_0007'"):
        RunLogger.start(
            dead_uri, "1", run_name="trial_0007", spool_dir=tmp_path / "spool", create_timeout_s=1.0
        )
    assert time.monotonic() - started < 5.0


def test_bad_keys_and_values_fail_at_the_call(tmp_path, dead_uri):
    logger = RunLogger.start(dead_uri, "1", run_name="trial", run_id="a" * 32, spool_dir=tmp_path / "spool")
    with pytest.raises(ValueError, match="may only hold"):
        logger.log_metrics({"val/miou@0.5": 0.1}, step=0)
    with pytest.raises(ValueError, match="may only hold"):
        logger.log_params({"model//depth": 4})
    with pytest.raises(ValueError, match="1 to 250 characters"):
        logger.set_tags({"x" * 251: "1"})
    with pytest.raises(TypeError, match="only scalars"):
        logger.log_params({"model.scales": [1.0, 0.5]})
    with pytest.raises(FileNotFoundError):
        logger.log_artifact(tmp_path / "missing.pt")
    assert logger.pending == 1  # only the RUNNING status of the continued run
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log_metrics({"val/miou": 0.1}, step=0)


def test_long_params_are_truncated_with_the_full_value_as_artifact_and_nan_metrics_skipped(
    live_mlflow_server, tmp_path, request
):
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    logger = RunLogger.start(uri, experiment_id, run_name="trial", spool_dir=tmp_path / "spool")
    long_value = "voc/" + "x" * (MAX_PARAM_VAL_LENGTH + 100)
    logger.log_params({"data.image_ids": long_value, "seed": 0})
    logger.log_params({"seed": 0})  # the same value again: accepted
    logger.log_params({"seed": 1})  # a changed value: MLflow refuses it, the rest of the batch still goes
    logger.log_metrics({"train/loss": float("nan"), "val/miou": 0.3}, step=1)
    logger.log_metrics({"train/grad_norm": float("inf")}, step=2)
    assert logger.end() == 0

    run = client.get_run(logger.run_id)
    logged = run.data.params["data.image_ids"]
    assert len(logged) == MAX_PARAM_VAL_LENGTH and logged.endswith(TRUNCATION_MARKER)
    assert long_value.startswith(logged[: -len(TRUNCATION_MARKER)])
    assert run.data.params["seed"] == "0"
    full = client.download_artifacts(logger.run_id, FULL_PARAMS_ARTIFACT, str(tmp_path / "download"))
    assert json.loads(Path(full).read_text()) == {"data.image_ids": long_value}
    assert client.get_metric_history(logger.run_id, "train/loss") == []
    assert client.get_metric_history(logger.run_id, "train/grad_norm") == []
    assert metric_steps(client, logger.run_id, "val/miou") == [(1, 0.3)]
    assert run.data.tags[SKIPPED_METRICS_TAG] == "train/grad_norm,train/loss"
    rejected = (tmp_path / "spool" / "rejected.jsonl").read_text()
    assert '"seed"' in rejected and "another value" in rejected


def test_close_dangling_runs_kills_running_runs_except_the_kept_ones(live_mlflow_server, tmp_path, request):
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    loggers = [
        RunLogger.start(uri, experiment_id, run_name=f"trial_{i}", spool_dir=tmp_path / str(i))
        for i in range(3)
    ]
    finished, dangling, kept = loggers
    finished.end()
    for logger in (dangling, kept):
        logger.close()
    assert set(runs_left_running(client, experiment_id)) == {dangling.run_id, kept.run_id}

    assert close_dangling_runs(client, experiment_id, keep={kept.run_id}) == [dangling.run_id]
    assert client.get_run(dangling.run_id).info.status == "KILLED"
    assert client.get_run(finished.run_id).info.status == "FINISHED"
    assert runs_left_running(client, experiment_id) == [kept.run_id]
    assert close_dangling_runs(client, experiment_id, keep=set()) == [kept.run_id]
    assert runs_left_running(client, experiment_id) == []


# ----------------------------------------------------------------------------------------------- no server


def test_local_sqlite_store_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = resolve_store(tmp_path / "runs")
    root = (tmp_path / "runs" / "mlflow").resolve()
    assert store == LocalStore(f"sqlite:///{root}/mlflow.db", (root / "artifacts").as_uri())
    assert store.tracking_uri.startswith("sqlite:////")

    client = MlflowClient(store.tracking_uri)
    experiment_id = ensure_experiment(client, "local-sweep", store.artifact_root)
    assert ensure_experiment(client, "local-sweep", store.artifact_root) == experiment_id
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"weights")
    with RunLogger.start(
        store.tracking_uri, experiment_id, run_name="trial", spool_dir=tmp_path / "spool"
    ) as logger:
        logger.log_params({"seed": 3})
        logger.log_metrics({"val/miou": 0.25}, step=5)
        logger.log_artifact(checkpoint, "checkpoints")
    assert logger.pending == 0
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"seed": "3"}
    assert metric_steps(client, logger.run_id, "val/miou") == [(5, 0.25)]
    stored = root / "artifacts" / logger.run_id / "artifacts" / "checkpoints" / "last.pt"
    assert stored.read_bytes() == b"weights"

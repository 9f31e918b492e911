"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (see conftest.py): the run tree, continuing a
run, an outage, a crashed writer, redaction, long params, non-finite metrics, dangling runs, the local store;
one value per metric step after a resume; artifact uploads that fail, kept and delivered by `cpews sweep sync`."""

from __future__ import annotations

import json
import logging
import math
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

from orchestration.cli import main as cli_main
from orchestration.tracking import (
    FULL_PARAMS_ARTIFACT,
    SKIPPED_METRICS_TAG,
    TRUNCATION_MARKER,
    Backlog,
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
    spool_backlog,
    sync_spools,
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


def test_long_params_are_truncated_with_the_full_value_as_artifact_nan_logged_and_inf_skipped(
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
    (nan,) = client.get_metric_history(logger.run_id, "train/loss")  # NaN: there, and undefined at step 1
    assert nan.step == 1 and math.isnan(nan.value) and math.isnan(run.data.metrics["train/loss"])
    assert client.get_metric_history(logger.run_id, "train/grad_norm") == []
    assert metric_steps(client, logger.run_id, "val/miou") == [(1, 0.3)]
    assert run.data.tags[SKIPPED_METRICS_TAG] == "train/grad_norm"
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
    # the UI opens it as a model-training experiment, not in the GenAI view
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
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


# ---------------------------------------------------------------------------------- one value per step


def log_steps(logger: RunLogger, steps: range, scale: float) -> None:
    """What the trainer reports: window-averaged values, which differ when the same steps are trained again."""
    for step in steps:
        logger.log_metrics({"train/loss": scale * step, "val/miou": scale / step}, step=step)


@pytest.mark.parametrize(
    "restart", ["same_spool", "same_spool_undelivered", "old_spool_format", "other_spool"]
)
def test_a_resumed_logger_logs_each_step_once_with_the_first_value(
    live_mlflow_server, tmp_path, request, dead_uri, restart
):
    """A worker logs steps 1..10 and dies; its restart resumes from the checkpoint at step 5 and logs 5..12 with
    other values. MLflow holds each step once: 1..10 as first logged, then 11 and 12. The restarted logger knows
    the steps from its spool (delivered, or still waiting because the server was unreachable, or a spool written
    before the steps were kept in position.json), or, on a spool of its own, from the run's history in MLflow."""
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    spool = tmp_path / "fold_0"
    first = RunLogger.start(uri, experiment_id, run_name="fold", spool_dir=spool)
    run_id = first.run_id
    if restart == "same_spool_undelivered":  # the first attempt never reached the server
        first.close()
        first = RunLogger.start(dead_uri, experiment_id, run_name="fold", run_id=run_id, spool_dir=spool)
    log_steps(first, range(1, 11), 1.0)
    first.log_metrics({"train/loss": 99.0}, step=10)  # the same step again in one process: dropped too
    first.log_metrics({"train/loss": 99.0}, step=3)  # and an older one
    first.close()  # the worker dies without ending its run
    if restart == "same_spool_undelivered":
        assert client.get_metric_history(run_id, "train/loss") == []
    if restart == "old_spool_format":
        position = json.loads((spool / "position.json").read_text())
        del position["metric_steps"]
        (spool / "position.json").write_text(json.dumps(position))
    if restart == "other_spool":
        spool = tmp_path / "fold_0_attempt_1"

    resumed = RunLogger.start(uri, experiment_id, run_name="fold", run_id=run_id, spool_dir=spool)
    log_steps(resumed, range(5, 13), 2.0)
    assert resumed.end() == 0

    assert metric_steps(client, run_id, "train/loss") == [(s, float(s)) for s in range(1, 11)] + [
        (11, 22.0),
        (12, 24.0),
    ]
    assert metric_steps(client, run_id, "val/miou") == [(s, 1.0 / s) for s in range(1, 11)] + [
        (11, 2.0 / 11),
        (12, 2.0 / 12),
    ]

    # The next attempt after that (e.g. a retry that finds the fold done) adds nothing either.
    again = RunLogger.start(uri, experiment_id, run_name="fold", run_id=run_id, spool_dir=spool)
    log_steps(again, range(12, 13), 3.0)
    assert again.end() == 0
    assert len(client.get_metric_history(run_id, "train/loss")) == 12


# ----------------------------------------------------------------------------- artifacts that fail


def block(path: Path) -> None:
    """Put a file where MLflow's artifact folder `path` belongs: every write below it fails, for root too
    (permission bits do not stop root)."""
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")


def fold_files(tmp_path: Path) -> tuple[Path, Path]:
    checkpoint = tmp_path / "work" / "last.pt"
    pool = tmp_path / "work" / "pool"
    (pool / "meta").mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    (pool / "prototypes.npy").write_bytes(b"\x01" * 16)
    (pool / "meta" / "pool.json").write_text('{"k": 4}')
    return checkpoint, pool


@pytest.mark.parametrize("store", ["local", "server"])
def test_artifacts_that_cannot_be_written_are_kept_retried_and_synced_later(
    store, tmp_path, request, monkeypatch, caplog
):
    """The artifact store refuses every write (a file stands where its folder belongs): the uploads are tried
    a few times, then kept in the spool with their files, while the records after them are delivered; the
    logger and `spool_backlog` count them; `sync_spools` tries again (still blocked: still kept) and, once the
    store is writable, delivers them and removes the copies."""
    if store == "local":
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        local = resolve_store(tmp_path / "runs")
        uri = local.tracking_uri
        client = MlflowClient(uri)
        experiment_id = ensure_experiment(client, request.node.name, local.artifact_root)
        blocked = tmp_path / "runs" / "mlflow" / "artifacts"  # the experiment's artifact location
    else:
        server = request.getfixturevalue("live_mlflow_server")
        uri = server.uri
        client = MlflowClient(uri)
        experiment_id = new_experiment(client, request)
        blocked = server.artifacts_dir / experiment_id  # the server answers 500
    spools = tmp_path / "spools"
    logger = RunLogger.start(uri, experiment_id, run_name="fold", spool_dir=spools / "fold_0")
    run_id = logger.run_id
    block(blocked)
    checkpoint, pool = fold_files(tmp_path)

    logger.log_metrics({"val/miou": 0.5}, step=1)
    logger.log_artifact(checkpoint, "checkpoint")
    logger.log_artifacts(pool, "pool")
    logger.log_metrics({"val/miou": 0.6}, step=2)  # what follows a failed upload still goes
    shutil.rmtree(tmp_path / "work")  # the trial's own files may go: the spool holds copies
    with caplog.at_level(logging.INFO, logger="orchestration.tracking"):
        started = time.monotonic()
        assert logger.end("FINISHED", timeout_s=30) == 2
        assert time.monotonic() - started < 10  # a few attempts with a backoff, not the whole timeout
    assert logger.pending_artifacts == 2
    assert "could not store artifact checkpoint/last.pt" in caplog.text
    assert "artifact pool still not stored after 3 attempts" in caplog.text

    assert client.get_run(run_id).info.status == "FINISHED"
    assert metric_steps(client, run_id, "val/miou") == [(1, 0.5), (2, 0.6)]
    backlog = spool_backlog(spools)
    assert backlog[:2] == (2, 2) and backlog.describe() == "2 artifacts"
    assert backlog.last_error
    if store == "local":
        assert str(blocked) in backlog.last_error  # the error names the folder that cannot be written
    deferred = json.loads((spools / "fold_0" / "deferred.json").read_text())
    assert [entry["attempts"] for entry in deferred.values()] == [3, 3]
    kept = spools / "fold_0" / "artifacts"
    first, second = sorted(deferred, key=int)
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        f"{first}/last.pt",
        f"{second}/meta/pool.json",
        f"{second}/prototypes.npy",
    ]

    # Still blocked: a sync tries again and keeps everything.
    assert sync_spools(spools, timeout_s=10)[:2] == (2, 2)
    deferred = json.loads((spools / "fold_0" / "deferred.json").read_text())
    assert [entry["attempts"] for entry in deferred.values()] == [6, 6]

    blocked.unlink()
    assert sync_spools(spools, timeout_s=30) == Backlog(0, 0)
    downloaded = client.download_artifacts(run_id, "checkpoint/last.pt", str(tmp_path / "download"))
    assert Path(downloaded).read_bytes() == b"weights"
    assert [f.path for f in client.list_artifacts(run_id, "pool")] == ["pool/meta", "pool/prototypes.npy"]
    assert [f.path for f in client.list_artifacts(run_id, "pool/meta")] == ["pool/meta/pool.json"]
    assert not list(kept.iterdir())
    assert json.loads((spools / "fold_0" / "deferred.json").read_text()) == {}
    assert metric_steps(client, run_id, "val/miou") == [(1, 0.5), (2, 0.6)]


def test_a_later_upload_of_the_same_file_replaces_a_deferred_one(live_mlflow_server, tmp_path, request):
    """leaderboard.json fails to upload, then the store is writable again and a newer leaderboard.json is
    logged: MLflow keeps the newer file; the older copy is dropped, not uploaded over it."""
    uri = live_mlflow_server.uri
    client = MlflowClient(uri)
    experiment_id = new_experiment(client, request)
    logger = RunLogger.start(uri, experiment_id, run_name="sweep", spool_dir=tmp_path / "spool")
    blocked = live_mlflow_server.artifacts_dir / experiment_id
    block(blocked)
    leaderboard = tmp_path / "leaderboard.json"
    leaderboard.write_text('{"trials": 2}')
    logger.log_artifact(leaderboard)
    assert logger.pending == 1
    blocked.unlink()
    leaderboard.write_text('{"trials": 4}')
    logger.log_artifact(leaderboard)
    assert logger.end() == 0
    downloaded = client.download_artifacts(logger.run_id, "leaderboard.json", str(tmp_path / "download"))
    assert Path(downloaded).read_text() == '{"trials": 4}'
    assert not list((tmp_path / "spool" / "artifacts").iterdir())


def test_sweep_sync_delivers_what_a_sweep_left_and_says_what_is_still_pending(tmp_path, monkeypatch, capsys):
    """`cpews sweep sync NAME` on a sweep folder whose spools hold failed uploads (the sweep's run and a fold's
    run): exit 1 naming the count and the error while the store is blocked, then exit 0 once it delivered
    them; an unknown sweep is refused by name."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs"
    store = resolve_store(run_dir)
    client = MlflowClient(store.tracking_uri)
    experiment_id = ensure_experiment(client, "synced", store.artifact_root)
    root = run_dir / "sweeps" / "synced"
    (root / "trials" / "t1").mkdir(parents=True)
    (root / "state.json").write_text(json.dumps({"name": "synced", "tracking_uri": store.tracking_uri}))
    leaderboard = root / "leaderboard.json"
    leaderboard.write_text('{"trials": []}')
    checkpoint, _ = fold_files(tmp_path)
    sweep_run = RunLogger.start(
        store.tracking_uri, experiment_id, run_name="synced", spool_dir=root / "mlflow_spool"
    )
    fold_run = RunLogger.start(
        store.tracking_uri,
        experiment_id,
        run_name="t1/fold_0",
        spool_dir=root / "trials" / "t1" / "mlflow" / "fold_0",
    )
    blocked = run_dir / "mlflow" / "artifacts"
    block(blocked)
    fold_run.log_artifact(checkpoint, "checkpoint")
    sweep_run.log_artifact(leaderboard)
    assert fold_run.end() == 1 and sweep_run.end() == 1
    capsys.readouterr()

    args = ["sweep", "sync", "synced", "--run-dir", str(run_dir), "--timeout", "5"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "cpews sweep sync: error: 2 artifacts of sweep synced still pending" in err
    assert str(blocked) in err

    blocked.unlink()
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip() == "sweep synced: 2 artifacts delivered to MLflow"
    assert [f.path for f in client.list_artifacts(fold_run.run_id, "checkpoint")] == ["checkpoint/last.pt"]
    assert [f.path for f in client.list_artifacts(sweep_run.run_id)] == ["leaderboard.json"]
    assert cli_main(args) == 0
    assert "nothing pending" in capsys.readouterr().out

    assert cli_main(["sweep", "sync", "nope", "--run-dir", str(run_dir)]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow  # a whole smoke sweep, about 90 s on a 2-core machine
def test_a_sweep_whose_artifacts_cannot_be_written_exits_non_zero_and_sync_delivers_them(
    tmp_path, monkeypatch, synthetic_data_dir
):
    """`cpews sweep run` with the local artifact store blocked: the sweep trains, its runs end and its metrics
    are in MLflow, but it exits 1 and its last line counts the artifacts still pending; `cpews sweep sync`
    delivers every one of them once the store is writable (each fold's checkpoint, the sweep's leaderboard)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "runs"
    blocked = run_dir / "mlflow" / "artifacts"
    block(blocked)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cpews", "sweep"]
    result = subprocess.run(
        [*command, "run", "demo", "--smoke", "--name", "blocked", "--run-dir", str(run_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    count = int(last.split()[0])
    assert last == f"{count} artifacts pending: run `cpews sweep sync blocked`" and count > 0
    assert spool_backlog(run_dir / "sweeps" / "blocked") == (count, count, spool_backlog(run_dir).last_error)
    client = MlflowClient(default_tracking_uri(run_dir))
    runs = client.search_runs([client.get_experiment_by_name("blocked").experiment_id])
    assert runs and all(run.info.status == "FINISHED" for run in runs)

    blocked.unlink()
    result = subprocess.run(
        [*command, "sync", "blocked", "--run-dir", str(run_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"sweep blocked: {count} artifacts delivered to MLflow"
    assert spool_backlog(run_dir) == Backlog(0, 0)
    for run in runs:
        names = {f.path for f in client.list_artifacts(run.info.run_id)}
        kind = run.data.tags["cpews.kind"]
        if kind == "sweep":
            assert {"leaderboard.json", "sweep.yaml", "folds.json"} <= names
        elif kind == "fold":
            assert "checkpoint" in names, run.info.run_name


@pytest.mark.ray
@pytest.mark.slow  # a whole smoke sweep with a retried trial, about 60 s on a 2-core machine
def test_a_retried_trial_logs_each_metric_step_once(tmp_path, monkeypatch, synthetic_data_dir):
    """A trial's worker SIGKILLs itself in fold 1 after logging steps past its checkpoint at iteration 4; Tune
    retries it from that checkpoint, and the steps after it are trained (and reported) again. Every metric of
    every run of the sweep holds each step once."""
    import ray

    from orchestration.search_space import apply_overrides, load_sweep, smoke, validate_sweep
    from orchestration.sweep import run_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = smoke(load_sweep("demo", check_paths=False)).to_dict()
    data = apply_overrides(
        data, ["search.num_trials=1", "scheduler.type=fifo", "name=relog", "tracking.experiment=relog"]
    )
    try:
        outcome = run_sweep(
            validate_sweep(data, check_paths=False),
            run_dir=tmp_path / "runs",
            out=lambda line: None,
            faults={"kill_at": (1, 5)},
        )
    finally:
        ray.shutdown()
    (row,) = outcome.rows
    assert "SIGKILL at fold 1" in (Path(row["path"]) / "fault_injected").read_text()
    assert (Path(row["path"]) / "folds_started.log").read_text().split("\n")[:3] == ["0 0", "1 0", "1 4"]
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([outcome.experiment_id])
    checked = 0
    for run in runs:
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, sorted(steps))
            checked += 1
    fold_1 = next(r for r in runs if r.info.run_name.endswith("fold_1"))
    assert [m.step for m in client.get_metric_history(fold_1.info.run_id, "train/loss")] != []
    assert checked > 20
    assert outcome.pending == 0

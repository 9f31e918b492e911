"""MLflow tracking for sweeps: where runs go, experiments, a resilient per-run logger, and the cleanup.

Why not Ray's `MLflowLoggerCallback` or `setup_mlflow`: they keep the trial -> run map in memory, so a restored
sweep opens new runs and leaves the old ones RUNNING (docs/orchestration-notes.md). Here every trial owns one
`RunLogger`, the run id is returned at once so the trial can keep it beside its checkpoint, and a restarted
trial continues that run (`RunLogger.start(..., run_id=...)`, or just the same `spool_dir`).

Delivery: every call is first appended to a spool on disk (JSON lines, fsynced; files are copied into the
spool) and then sent to MLflow. When the server cannot be reached, the records wait in the spool and are
retried at a later call (after a backoff) and by `flush`; `end` waits a bounded time and leaves what is left
for `flush_pending`. The spool keeps the position of the last delivered record, so a new process on the same
spool sends what is pending once. Re-sending a record after a crash between "delivered" and "position saved"
is harmless: every record carries its own timestamp, and MLflow's SQL stores drop a metric row identical in
(key, value, timestamp, step); a param logged again with the same value is a no-op; tags, artifacts and the
terminal status are overwritten with the same content.

One value per step: a run holds each (key, step) once, and a metric's steps only go up. A retried or resumed
trial repeats the steps after its checkpoint with other values (window averages); `log_metrics` drops every
point at or below the highest step known for its key, so the first value stays. The spool knows the steps it
holds (`position.json` keeps those of the delivered records); a logger that continues a run also asks MLflow
once, before its first metrics, for the highest step of each key (another spool, or a replay after a crash).

Artifacts: a file upload that fails with an answer (a local write error, an HTTP error status) is set aside
with its copy (`deferred.json`) so that the records after it go on, tried again a few times with a backoff
(`_ARTIFACT_ATTEMPTS` per logger), and then kept for a later `flush_pending` or `sync_spools` (`cpews sweep
sync NAME`). It counts in `pending` meanwhile; `spool_backlog` counts what a sweep's spools still hold.

Spool layout (one folder per run; one writer at a time):

    run.json          {"format", "run_id", "experiment_id", "tracking_uri", "run_token"}
    records.jsonl     {"seq": n, "op": "batch" | "artifact" | "artifacts" | "status" | "end", ...} per line
    position.json     {"seq", "offset"} of the last delivered record; "metric_steps": the highest step per key
    artifacts/<seq>/  copies of logged files; removed once delivered
    deferred.json     {seq: {"record", "error", "attempts"}}: file uploads that failed, kept until delivered
    params_full.json  the full values of params that were too long for MLflow (also logged as an artifact)
    rejected.jsonl    records MLflow refused (a 4xx answer: bad key, changed param, deleted run), with the error

Secrets: `redact` drops keys whose name holds a secret word as a whole segment (`password`, `passwd`,
`secret`, `token`, `key`, `apikey`, `credential(s)`; segments are split at non-alphanumerics and camelCase,
so `aws_secret_access_key`, `db.password`, `openai_api_key` and `apiKey` go, while `num_tokens`,
`keypoints` or `monkey` stay) and masks `user:password@` in URL-like values. It is applied to params and
tags. A non-secret field whose name ends in `key` (`pool.cache_key`) is dropped too: rename it to log it.

HTTP: MLflow's own client retries a failed request 7 times with exponential backoff (minutes while a server
is down) and waits up to 120 s for an answer. Around its own calls the logger sets
`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0` and `MLFLOW_HTTP_REQUEST_TIMEOUT` to its own bound (process environment,
under a lock, restored afterwards; MLflow reads both at each request) and retries through the spool instead.
It also sets `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT` there unless the user did (MLflow prints two lines and
makes one more request per `set_terminated`).

Limits: a record other than a file upload that the server answers with a 5xx every time (not seen in practice)
stays at the head of the spool and holds back the records after it until `flush`/`end` time out; a 4xx answer
moves it to `rejected.jsonl` and delivery goes on. Delivered-then-replayed records are deduplicated by the SQL stores
(SQLite, PostgreSQL, MySQL), which is what `make sweep` and the tracking server use.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import posixpath
import re
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import requests
import urllib3.exceptions
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

__all__ = [
    "FULL_PARAMS_ARTIFACT",
    "RUN_TOKEN_TAG",
    "SECRET_WORDS",
    "SKIPPED_METRICS_TAG",
    "SPOOL_FORMAT",
    "TRUNCATION_MARKER",
    "Backlog",
    "LocalStore",
    "RunLogger",
    "TrackingUnavailableError",
    "close_dangling_runs",
    "default_tracking_uri",
    "ensure_experiment",
    "finalize_spool",
    "find_spool_dirs",
    "flush_pending",
    "is_secret_key",
    "is_transient",
    "redact",
    "resolve_store",
    "runs_left_running",
    "spool_backlog",
    "spool_status",
    "sync_spools",
]

_log = logging.getLogger(__name__)
# MLflow logs "Creating initial MLflow database tables" / "Updating database tables" at INFO on every new store;
# the sweep prints where its store is, so those lines only interrupt the header.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
SPOOL_FORMAT = "cpews-spool/1"
FULL_PARAMS_ARTIFACT = "params_full.json"
TRUNCATION_MARKER = "...[truncated; full value in params_full.json]"
RUN_TOKEN_TAG = "cpews.run_token"  # lets a retried create find a run the server made but did not confirm
SKIPPED_METRICS_TAG = "cpews.skipped_nonfinite_metrics"
RUNNING = "RUNNING"

Status = Literal["FINISHED", "FAILED", "KILLED"]
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

_RECORDS = "records.jsonl"
_POSITION = "position.json"
_META = "run.json"
_REJECTED = "rejected.jsonl"
_ARTIFACTS = "artifacts"
_DEFERRED = "deferred.json"
_FILE_OPS = ("artifact", "artifacts")
_ARTIFACT_ATTEMPTS = 3  # uploads of a file record per logger (a process) before it waits for a later flush

_BATCH_CHARS = 500_000  # stay well below the server's request size limit in one log_batch
_MAX_ENTITY_CHARS = 250  # MLflow's limit on a param, tag or metric key


# --------------------------------------------------------------------------------------------------- stores


class LocalStore(NamedTuple):
    tracking_uri: str
    artifact_root: str | None  # a file URI for the local store; None: the tracking server decides


def resolve_store(run_dir: Path = Path("runs")) -> LocalStore:
    """The tracking store of a sweep: `MLFLOW_TRACKING_URI` if set, else SQLite under `run_dir`.

    The local store is `sqlite:///<abs run_dir>/mlflow/mlflow.db` with artifacts under
    `<run_dir>/mlflow/artifacts`. Only `<run_dir>/mlflow` is created here (SQLite needs the folder of its
    file); MLflow creates the database and the artifact folders when first used. With `MLFLOW_TRACKING_URI`
    set, `artifact_root` is None and experiments get the server's default artifact location.
    """
    uri = os.environ.get(TRACKING_URI_ENV, "").strip()
    if uri:
        return LocalStore(uri, None)
    root = Path(run_dir).expanduser().resolve() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return LocalStore(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri())


def default_tracking_uri(run_dir: Path = Path("runs")) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the local SQLite store under `run_dir` (see `resolve_store`)."""
    return resolve_store(run_dir).tracking_uri


# MLflow 3's UI opens an experiment in the view of its kind; without this tag it guesses, and shows the GenAI
# (traces) view to experiments that have no run yet. "custom_model_development" is its "Model training" kind.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | Path | None = None) -> str:
    """The id of experiment `name`, created (with `artifact_root`, a path or URI, and `EXPERIMENT_TAGS`) if it
    does not exist.

    A deleted experiment of that name is restored (MLflow keeps deleted names reserved). Two processes
    creating it at once both get the same id.
    """
    location = Path(artifact_root).resolve().as_uri() if isinstance(artifact_root, Path) else artifact_root
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        _log.warning("MLflow experiment %r (id %s) was deleted; restoring it", name, experiment.experiment_id)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def runs_left_running(client: MlflowClient, experiment_id: str) -> list[str]:
    """Ids of the active (not deleted) runs of the experiment whose status is RUNNING."""
    run_ids: list[str] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = '{RUNNING}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=page_token,
        )
        run_ids.extend(run.info.run_id for run in page)
        page_token = page.token
        if not page_token:
            return run_ids


def close_dangling_runs(
    client: MlflowClient, experiment_id: str, keep: set[str] | frozenset[str]
) -> list[str]:
    """Mark every RUNNING run of the experiment that is not in `keep` as KILLED; return their ids.

    The sweep driver calls this at the end (with `keep` empty, or the runs it still owns) so that no run of a
    crashed or abandoned trial stays RUNNING.
    """
    killed = [run_id for run_id in runs_left_running(client, experiment_id) if run_id not in keep]
    for run_id in killed:
        client.set_terminated(run_id, "KILLED")
    if killed:
        _log.info("marked %d dangling MLflow run(s) KILLED: %s", len(killed), ", ".join(killed))
    return killed


# ------------------------------------------------------------------------------------------------ redaction

SECRET_WORDS: frozenset[str] = frozenset(
    {"password", "passwd", "secret", "token", "key", "apikey", "credential", "credentials"}
)
_SEGMENT_SPLIT = re.compile(r"[^A-Za-z0-9]+")
_CAMEL_SPLIT = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]*@")


def is_secret_key(key: str) -> bool:
    """Whether a name holds a secret word (`SECRET_WORDS`) as a whole segment, case-insensitively.

    Segments are split at every non-alphanumeric character and at camelCase boundaries:
    `aws_secret_access_key` -> aws, secret, access, key (secret); `num_tokens` -> num, tokens (not secret).
    """
    for part in _SEGMENT_SPLIT.split(str(key)):
        for segment in _CAMEL_SPLIT.split(part):
            if segment.lower() in SECRET_WORDS:
                return True
    return False


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `mapping` without secret-looking keys, and with URL credentials masked in string values.

    Keys are dropped when `is_secret_key` says so; `scheme://user:pass@host` in a string value becomes
    `scheme://***@host`. Order is kept; other values are returned unchanged. Pure: nothing is logged.
    """
    clean: dict[str, Any] = {}
    for key, value in mapping.items():
        if is_secret_key(key):
            continue
        if isinstance(value, str):
            value = _URL_CREDENTIALS.sub(r"\g<scheme>***@", value)
        clean[key] = value
    return clean


# ---------------------------------------------------------------------------------------- transient errors


class TrackingUnavailableError(RuntimeError):
    """The tracking server could not be reached in time to create a run."""


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later: no connection, a timeout, or a 5xx/408/429 answer.

    MLflow wraps transport failures as `MlflowException("API request to ... failed with exception ...")`
    with error code INTERNAL_ERROR (HTTP 500) and the `requests` error only as `__context__`; answers with a
    retryable status arrive as that wrapper around `requests.exceptions.RetryError`.
    """
    for error in _exception_chain(exc):
        if isinstance(
            error,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | requests.exceptions.RetryError
            | requests.exceptions.ChunkedEncodingError
            | urllib3.exceptions.HTTPError
            | ConnectionError
            | TimeoutError
            | socket.timeout,
        ):
            return True
        if isinstance(error, requests.exceptions.HTTPError) and error.response is not None:
            return _retryable_status(error.response.status_code)
        if isinstance(error, MlflowException):
            return _retryable_status(error.get_http_status_code())
    return False


def _retryable_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def _http_policy(timeout_s: float) -> Iterator[None]:
    """No retries inside MLflow's HTTP client and a request timeout of `timeout_s`, for this block only."""
    overrides = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
    }
    if "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ:
        overrides["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # and skips a get_run per set_terminated
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# -------------------------------------------------------------------------------------------------- spool


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomically(path: str | Path, data: Any) -> None:
    """Write `data` as JSON (sorted keys; other objects as their str) to `path` through a temporary file beside
    it, fsync'd, then `os.replace`: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


class _Pending(NamedTuple):
    seq: int
    record: dict[str, Any]
    end_offset: int  # byte offset in records.jsonl just after this record


class _Spool:
    """The on-disk queue of one run: append, read what is pending, acknowledge in order."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / _ARTIFACTS).mkdir(parents=True, exist_ok=True)
        position = _read_json(self.root / _POSITION) or {"seq": 0, "offset": 0}
        self.delivered_seq: int = int(position["seq"])
        self.delivered_offset: int = int(position["offset"])
        self.last_seq = self.delivered_seq
        self.pending: deque[_Pending] = deque()
        # the highest step per metric key of the delivered records, and of every record in the spool
        steps = position.get("metric_steps")
        self.delivered_steps: dict[str, int] = self._steps_before_position() if steps is None else steps
        self.metric_steps: dict[str, int] = dict(self.delivered_steps)
        self._load()
        # artifact records set aside after a failed upload, by seq; the ones still in `pending` are not
        self.deferred: dict[int, dict[str, Any]] = {
            int(seq): entry
            for seq, entry in (_read_json(self.root / _DEFERRED) or {}).items()
            if int(seq) <= self.delivered_seq
        }
        self._file = open(self.root / _RECORDS, "ab")  # kept open for the logger's lifetime
        self._remove_orphan_artifacts()

    def _steps_before_position(self) -> dict[str, int]:
        """The metric steps of the delivered records, from the records themselves (a spool whose
        position.json predates `metric_steps`)."""
        steps: dict[str, int] = {}
        if self.delivered_offset <= 0:
            return steps
        with open(self.root / _RECORDS, "rb") as f:
            data = f.read(self.delivered_offset)
        for line in data.splitlines():
            _note_steps(steps, json.loads(line).get("metrics", ()))
        return steps

    def _load(self) -> None:
        path = self.root / _RECORDS
        if not path.exists():
            return
        with open(path, "rb+") as f:
            f.seek(self.delivered_offset)
            data = f.read()
            complete = data.rfind(b"\n") + 1
            if complete < len(data):  # a write cut short by a crash: the call never returned, drop it
                f.truncate(self.delivered_offset + complete)
        offset = self.delivered_offset
        for line in data[:complete].splitlines(keepends=True):
            offset += len(line)
            record = json.loads(line)
            seq = int(record.pop("seq"))
            if seq > self.delivered_seq:
                self.pending.append(_Pending(seq, record, offset))
                self.last_seq = max(self.last_seq, seq)
                _note_steps(self.metric_steps, record.get("metrics", ()))

    def _remove_orphan_artifacts(self) -> None:
        records = [record for _, record, _ in self.pending] + [
            entry["record"] for entry in self.deferred.values()
        ]
        wanted = {record["dir"] for record in records if "dir" in record}
        for entry in (self.root / _ARTIFACTS).iterdir():
            if f"{_ARTIFACTS}/{entry.name}" in wanted:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    @property
    def meta(self) -> dict[str, Any] | None:
        return _read_json(self.root / _META)

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json_atomically(self.root / _META, {"format": SPOOL_FORMAT, **meta})

    def artifact_slot(self) -> tuple[str, Path]:
        """A fresh folder for the files of the next record (relative name, path)."""
        name = f"{_ARTIFACTS}/{self.last_seq + 1}"
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return name, path

    def append(self, record: dict[str, Any]) -> None:
        seq = self.last_seq + 1
        line = json.dumps({"seq": seq, **record}, separators=(",", ":"), allow_nan=False) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.last_seq = seq
        self.pending.append(_Pending(seq, record, self._file.tell()))
        _note_steps(self.metric_steps, record.get("metrics", ()))

    def ack(self, count: int, *, keep_files: bool = False) -> None:
        """Mark the first `count` pending records delivered; their spooled files go unless `keep_files`."""
        done = [self.pending.popleft() for _ in range(count)]
        self.delivered_seq, self.delivered_offset = done[-1].seq, done[-1].end_offset
        for item in done:
            _note_steps(self.delivered_steps, item.record.get("metrics", ()))
        self._write_position()
        for item in done:
            if "dir" in item.record and not keep_files:
                shutil.rmtree(self.root / item.record["dir"], ignore_errors=True)

    def _write_position(self) -> None:
        write_json_atomically(
            self.root / _POSITION,
            {
                "seq": self.delivered_seq,
                "offset": self.delivered_offset,
                "metric_steps": self.delivered_steps,
            },
        )

    def note_delivered_steps(self, steps: Mapping[str, int]) -> None:
        """Steps that MLflow holds already (a continued run's history): later points at or below are dropped."""
        for key, step in steps.items():
            for known in (self.delivered_steps, self.metric_steps):
                known[key] = max(known.get(key, step), step)
        self._write_position()

    def defer(self, item: _Pending, error: str) -> None:
        """Set the head record (a file upload that failed) aside with its files, and go on with the next."""
        self.deferred[item.seq] = {"record": item.record, "error": error, "attempts": 1}
        self._write_deferred()
        self.ack(1, keep_files=True)

    def note_failure(self, seq: int, error: str) -> None:
        entry = self.deferred[seq]
        entry["error"], entry["attempts"] = error, int(entry.get("attempts", 0)) + 1
        self._write_deferred()

    def resolve(self, seq: int) -> None:
        """A deferred record was delivered: forget it and remove its files."""
        entry = self.deferred.pop(seq)
        self._write_deferred()
        shutil.rmtree(self.root / entry["record"]["dir"], ignore_errors=True)

    def _write_deferred(self) -> None:
        write_json_atomically(self.root / _DEFERRED, {str(seq): entry for seq, entry in self.deferred.items()})

    def reject(self, item: _Pending | None, error: str, detail: Any = None) -> None:
        entry = {"seq": item.seq if item else None, "error": error, "detail": detail}
        if item is not None:
            entry["record"] = item.record
        with open(self.root / _REJECTED, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._file.close()


def find_spool_dirs(root: Path) -> list[Path]:
    """Every spool folder (one holding a `run.json` of this format) under `root`, sorted."""
    found = []
    for meta_path in sorted(Path(root).rglob(_META)):
        meta = _read_json(meta_path)
        if isinstance(meta, dict) and meta.get("format") == SPOOL_FORMAT:
            found.append(meta_path.parent)
    return found


class Backlog(NamedTuple):
    """What the spools under a folder hold that MLflow does not have yet."""

    records: int  # records not delivered, artifact uploads included
    artifacts: int  # of which file uploads (artifact records)
    last_error: str | None = None  # why an upload failed last (one of them), when one did

    def describe(self) -> str:
        """`3 artifacts`, `5 records (3 of them artifacts)` or `5 records`."""
        if self.records == self.artifacts:
            return f"{self.artifacts} artifact{'s' * (self.artifacts != 1)}"
        text = f"{self.records} record{'s' * (self.records != 1)}"
        return f"{text} ({self.artifacts} of them artifacts)" if self.artifacts else text


def spool_backlog(root: Path) -> Backlog:
    """Count the undelivered records of every spool under `root` (read from disk; nothing is sent)."""
    records = artifacts = 0
    last_error = None
    for spool in find_spool_dirs(root):
        position = _read_json(spool / _POSITION) or {"offset": 0}
        position = {"seq": 0, "offset": 0, **position}
        deferred = (_read_json(spool / _DEFERRED) or {}).items()
        deferred = [entry for seq, entry in deferred if int(seq) <= int(position["seq"])]
        last_error = next((entry["error"] for entry in deferred if entry.get("error")), last_error)
        pending = [entry["record"] for entry in deferred]
        with contextlib.suppress(FileNotFoundError), open(spool / _RECORDS, "rb") as f:
            f.seek(int(position["offset"]))
            data = f.read()
            pending += [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]
        records += len(pending)
        artifacts += sum(record.get("op") in _FILE_OPS for record in pending)
    return Backlog(records, artifacts, last_error)


# ------------------------------------------------------------------------------------------- value helpers


def _now_ms() -> int:
    return int(time.time() * 1000)


def _note_steps(steps: dict[str, int], rows: Any) -> None:
    """Raise `steps[key]` to the step of each metric row `[key, value, timestamp, step]`."""
    for key, _, _, step in rows:
        steps[key] = max(steps.get(key, step), step)


def _param_text(key: str, value: Any) -> str:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy / torch scalars
    if value is None or isinstance(value, str | bool | int | float | os.PathLike):
        return str(os.fspath(value)) if isinstance(value, os.PathLike) else str(value)
    raise TypeError(
        f"param {key!r}: only scalars (str, int, float, bool, None) are logged as params, got "
        f"{type(value).__name__}; log structured values as an artifact"
    )


_VALID_KEY = re.compile(r"^[/\w.\- :]+$")  # MLflow's rule for param, metric and tag names (POSIX)


def _check_key(kind: str, key: str) -> str:
    """MLflow's key rules, checked at the call so that a bad key fails there and not in a later batch."""
    key = str(key)
    if not key or len(key) > _MAX_ENTITY_CHARS:
        raise ValueError(f"{kind} key {key[:60]!r}: MLflow keys have 1 to {_MAX_ENTITY_CHARS} characters")
    normalized = posixpath.normpath(key)
    if (
        not _VALID_KEY.match(key)
        or normalized != key
        or normalized == "."
        or normalized.startswith(("..", "/"))
    ):
        raise ValueError(
            f"{kind} key {key!r}: MLflow keys may only hold alphanumerics, _ - . : / and spaces, and must be "
            "a normalised relative path (no '//', '/./', '..', leading or trailing '/')"
        )
    return key


def _tag_values(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow takes them: secret-looking keys dropped, values as text within MLflow's length limit."""
    return {k: _truncate(str(v), MAX_TAG_VAL_LENGTH, "...") for k, v in redact(tags or {}).items()}


def _truncate(text: str, limit: int, marker: str) -> str:
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def _batch_chunks(
    metrics: list[Metric], params: list[Param], tags: list[RunTag]
) -> Iterator[tuple[list[Metric], list[Param], list[RunTag]]]:
    """Split one batch so that each request obeys MLflow's per-request limits (params first)."""
    chunk: tuple[list[Metric], list[Param], list[RunTag]] = ([], [], [])
    chars = 0
    entities = [(1, p) for p in params] + [(2, t) for t in tags] + [(0, m) for m in metrics]
    for slot, entity in entities:
        size = len(entity.key) + len(str(entity.value)) + 48
        full = (
            len(chunk[0]) + len(chunk[1]) + len(chunk[2]) >= MAX_ENTITIES_PER_BATCH
            or (slot == 0 and len(chunk[0]) >= MAX_METRICS_PER_BATCH)
            or (slot > 0 and len(chunk[slot]) >= MAX_PARAMS_TAGS_PER_BATCH)
            or chars + size > _BATCH_CHARS
        )
        if full and any(chunk):
            yield chunk
            chunk, chars = ([], [], []), 0
        chunk[slot].append(entity)
        chars += size
    if any(chunk):
        yield chunk


# ---------------------------------------------------------------------------------------------- RunLogger


class RunLogger:
    """Buffered, crash-safe logging to one MLflow run, for use inside a trial process.

    Create it with `RunLogger.start`. Every call appends to the spool and then tries to deliver what is
    pending, unless a recent attempt found the server unreachable (then it waits for the backoff to pass, so
    calls during an outage cost a local append only). Delivery inside a call is bounded by `call_budget_s`
    (plus at most one request that was already under way). One writer per spool folder at a time.

    Usage:
        logger = RunLogger.start(uri, experiment_id, run_name="trial_0003", parent_run_id=sweep_run_id,
                                 spool_dir=trial_dir / "mlflow_spool")
        save_with_checkpoint(logger.run_id)
        logger.log_params(cfg.to_flat_dict())
        logger.log_metrics({"val/miou": 0.61}, step=200)
        pending = logger.end("FINISHED")  # > 0: the driver runs flush_pending(spool_dir, ...) later
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        experiment_id: str,
        spool: _Spool,
        *,
        request_timeout_s: float,
        call_budget_s: float,
        max_backoff_s: float,
        continuing: bool = True,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.spool_dir = spool.root
        self._spool = spool
        self._client = MlflowClient(tracking_uri)
        self._request_timeout_s = request_timeout_s
        self._call_budget_s = call_budget_s
        self._max_backoff_s = max_backoff_s
        self._lock = threading.RLock()
        self._failures = 0
        self._retry_at = 0.0
        self._isolate_through = 0  # records up to this seq are sent one by one (a merged batch was refused)
        self._ended = False
        self._full_params: dict[str, str] = _read_json(spool.root / FULL_PARAMS_ARTIFACT) or {}
        self._skipped_metrics: set[str] = set()
        self._relogged_metrics: set[str] = set()
        self._check_history = continuing  # before its first metrics: which steps does MLflow hold already?
        self._artifact_tries: dict[int, int] = {}  # deferred seq -> uploads tried by this logger
        self._artifact_retry_at: dict[int, float] = {}
        self.last_error: str | None = None

    # -- construction

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment_id: str,
        *,
        run_name: str,
        spool_dir: Path,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        create_timeout_s: float = 120.0,
        request_timeout_s: float = 30.0,
        call_budget_s: float = 5.0,
        max_backoff_s: float = 60.0,
    ) -> RunLogger:
        """Continue run `run_id`, or the run this spool already belongs to, or create a new run.

        Continuing contacts no server: the run is set back to RUNNING through the spool (it may have been
        marked KILLED by `close_dangling_runs`). Creating retries with backoff while the server is down or
        answers 5xx, for at most `create_timeout_s`; a retry first looks for a run carrying this spool's
        `cpews.run_token` tag, so a create that reached the server but lost its answer (or a process that
        died right after creating) does not leave a second run.

        Args:
            tracking_uri: the MLflow tracking URI (http://..., sqlite:///...).
            experiment_id: the experiment of a new run.
            run_name: the name of a new run.
            spool_dir: this run's spool folder; keep it with the trial (it survives restarts).
            parent_run_id: the run a new run is nested under (`mlflow.parentRunId` tag).
            tags: tags for the run (redacted), set on creation or, when continuing, through the spool.
            run_id: a run to continue (e.g. stored with the trial's checkpoint).
            create_timeout_s: how long creating a run may take, retries included.
            request_timeout_s: the longest wait for one HTTP answer.
            call_budget_s: how long one logging call may spend delivering pending records.
            max_backoff_s: the longest pause between delivery attempts while the server is unreachable.

        Raises:
            TrackingUnavailableError: the run could not be created within `create_timeout_s`.
            ValueError: `spool_dir` belongs to a different run than `run_id`.
            MlflowException: MLflow refused to create the run (e.g. no such experiment).
        """
        spool = _Spool(Path(spool_dir))
        meta = spool.meta or {}
        known = meta.get("run_id")
        if run_id is not None and known not in (None, run_id):
            spool.close()
            raise ValueError(
                f"spool {spool.root} belongs to MLflow run {known}, not {run_id}; give each run its own spool_dir"
            )
        clean_tags = _tag_values(tags)
        continuing = run_id or known
        token = meta.get("run_token")
        resolved_run_id = continuing
        if continuing:
            experiment_id = meta.get("experiment_id") or experiment_id
        else:
            look_first = token is not None  # an earlier process may have created the run and died
            token = token or uuid.uuid4().hex
            spool.write_meta(
                {"run_token": token, "experiment_id": experiment_id, "tracking_uri": tracking_uri}
            )
            create_tags = {**clean_tags, RUN_TOKEN_TAG: token}
            if parent_run_id:
                create_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            try:
                resolved_run_id = _create_run(
                    tracking_uri,
                    experiment_id,
                    run_name,
                    create_tags,
                    token,
                    look_first=look_first,
                    timeout_s=create_timeout_s,
                    request_timeout_s=request_timeout_s,
                )
            except BaseException:
                spool.close()
                raise
        spool.write_meta(
            {
                "run_id": resolved_run_id,
                "experiment_id": experiment_id,
                "tracking_uri": tracking_uri,
                "run_token": token,
            }
        )
        logger = cls(
            tracking_uri,
            resolved_run_id,
            experiment_id,
            spool,
            request_timeout_s=request_timeout_s,
            call_budget_s=call_budget_s,
            max_backoff_s=max_backoff_s,
            continuing=bool(continuing),
        )
        with logger._lock:
            if continuing:
                logger._spool.append({"op": "status", "status": RUNNING})
                if clean_tags:
                    logger._spool.append({"op": "batch", "tags": clean_tags})
            logger._deliver_in_call()
        return logger

    @classmethod
    def _attach(cls, spool_dir: Path, tracking_uri: str | None, request_timeout_s: float) -> RunLogger | None:
        spool = _Spool(Path(spool_dir))
        meta = spool.meta or {}
        if not meta.get("run_id"):
            spool.close()
            return None
        return cls(
            tracking_uri or meta["tracking_uri"],
            meta["run_id"],
            meta.get("experiment_id", ""),
            spool,
            request_timeout_s=request_timeout_s,
            call_budget_s=0.0,
            max_backoff_s=5.0,
        )

    # -- logging calls

    @property
    def pending(self) -> int:
        """Records in the spool not yet delivered to MLflow (artifact uploads that failed included)."""
        return len(self._spool.pending) + len(self._spool.deferred)

    @property
    def pending_artifacts(self) -> int:
        """Artifact uploads not delivered yet: waiting in order, or set aside after a failure."""
        waiting = sum(item.record["op"] in _FILE_OPS for item in self._spool.pending)
        return waiting + len(self._spool.deferred)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log scalar params (redacted). Values longer than MLflow's limit are truncated with
        `TRUNCATION_MARKER`; their full values go to the `params_full.json` artifact."""
        dropped = [key for key in params if is_secret_key(key)]
        if dropped:
            _log.info("not logging secret-looking params: %s", ", ".join(map(str, dropped)))
        values: dict[str, str] = {}
        long_values: dict[str, str] = {}
        for key, value in redact(params).items():
            text = _param_text(_check_key("param", key), value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                long_values[key] = text
                text = _truncate(text, MAX_PARAM_VAL_LENGTH, TRUNCATION_MARKER)
            values[key] = text
        with self._lock:
            self._check_open()
            if values:
                self._spool.append({"op": "batch", "params": values})
            if long_values:
                self._full_params.update(long_values)
                full_path = self.spool_dir / FULL_PARAMS_ARTIFACT
                write_json_atomically(full_path, self._full_params)
                self._append_artifact(full_path, None)
            self._deliver_in_call()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics at `step`. NaN is logged (MLflow keeps it as NaN: the metric is there, undefined at that
        step); infinite values are skipped with a warning (MLflow would store the largest float) and their keys
        listed in the `cpews.skipped_nonfinite_metrics` tag.

        A run holds one value per (key, step), and steps only go up: a point at or below the highest step
        logged for its key (by this spool, or found in MLflow for a continued run) is dropped, so the first
        value stays. That is what a retried or resumed trial does when it repeats the steps after its
        checkpoint.
        """
        timestamp = _now_ms()
        rows: list[list[Any]] = []
        skipped: list[str] = []
        for key, value in metrics.items():
            number = float(value)
            key = _check_key("metric", key)
            if not math.isinf(number):  # the spool is strict JSON: NaN is written as null
                rows.append([key, None if math.isnan(number) else number, timestamp, int(step)])
            else:
                skipped.append(key)
        with self._lock:
            self._check_open()
            rows = self._new_steps(rows)
            record: dict[str, Any] = {"op": "batch"}
            if rows:
                record["metrics"] = rows
            new_skipped = set(skipped) - self._skipped_metrics
            if new_skipped:  # warn once per key; the tag lists every key skipped by this logger
                _log.warning(
                    "MLflow run %s: skipping non-finite metric(s) %s (first at step %d)",
                    self.run_id,
                    sorted(new_skipped),
                    step,
                )
                self._skipped_metrics |= new_skipped
                tag = _truncate(",".join(sorted(self._skipped_metrics)), MAX_TAG_VAL_LENGTH, "...")
                record["tags"] = {SKIPPED_METRICS_TAG: tag}
            if len(record) > 1:
                self._spool.append(record)
            self._deliver_in_call()

    def _new_steps(self, rows: list[list[Any]]) -> list[list[Any]]:
        """The metric rows above the highest step known for their key; the others are reported once."""
        known = self._spool.metric_steps
        fresh = [row for row in rows if row[3] > known.get(row[0], row[3] - 1)]
        repeated = {row[0] for row in rows if row not in fresh} - self._relogged_metrics
        if repeated:
            _log.info(
                "MLflow run %s: step %d of %s was logged before (a resumed or retried run repeats steps); "
                "the first values are kept",
                self.run_id,
                rows[0][3],
                ", ".join(sorted(repeated)),
            )
            self._relogged_metrics |= repeated
        return fresh

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (redacted; values as strings, truncated to MLflow's limit)."""
        clean = {_check_key("tag", k): v for k, v in _tag_values(tags).items()}
        with self._lock:
            self._check_open()
            if clean:
                self._spool.append({"op": "batch", "tags": clean})
            self._deliver_in_call()

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Log one file; it is copied into the spool first, so the caller may change or delete it."""
        source = Path(local_path)
        if not source.is_file():
            raise FileNotFoundError(f"artifact {source} is not a file")
        with self._lock:
            self._check_open()
            self._append_artifact(source, artifact_path)
            self._deliver_in_call()

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Log the contents of a folder under `artifact_path`; the folder is copied into the spool first."""
        source = Path(local_dir)
        if not source.is_dir():
            raise NotADirectoryError(f"artifact folder {source} is not a directory")
        with self._lock:
            self._check_open()
            name, slot = self._spool.artifact_slot()
            shutil.copytree(source, slot, dirs_exist_ok=True)
            _fsync_tree(slot)
            self._spool.append({"op": "artifacts", "dir": name, "artifact_path": artifact_path})
            self._deliver_in_call()

    def _append_artifact(self, source: Path, artifact_path: str | None) -> None:
        name, slot = self._spool.artifact_slot()
        copy = slot / source.name
        shutil.copy2(source, copy)
        _fsync_tree(copy)
        self._spool.append(
            {"op": "artifact", "dir": name, "file": f"{name}/{source.name}", "artifact_path": artifact_path}
        )

    def flush(self, timeout_s: float = 30.0) -> int:
        """Deliver pending records, retrying with backoff for up to `timeout_s`; return how many are left."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._lock:
            while not self._deliver(deadline):
                now = time.monotonic()
                if now >= deadline:
                    break
                time.sleep(min(self._backoff_s(), 2.0, deadline - now))
            return self.pending

    def end(self, status: Status = "FINISHED", *, timeout_s: float = 30.0) -> int:
        """Record the terminal status, flush for at most `timeout_s`, and return the records still pending.

        A non-zero result means the server stayed unreachable: the spool keeps the records (the status last)
        for `flush_pending(spool_dir, ...)`.
        """
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {_TERMINAL_STATUSES}, got {status!r}")
        with self._lock:
            self._check_open()
            self._spool.append({"op": "end", "status": status, "end_time": _now_ms()})
            self._spool.write_meta({**(self._spool.meta or {}), "ended": status})
            self._ended = True
            left = self.flush(timeout_s)
            self._spool.close()
        if left:
            _log.warning(
                "MLflow run %s: %d record(s) not delivered (%s); they stay in %s for flush_pending()",
                self.run_id,
                left,
                self.last_error or next(iter(self._spool.deferred.values()), {}).get("error") or "timed out",
                self.spool_dir,
            )
        return left

    def close(self) -> None:
        """Release the spool file without ending the run (what pending records there are stay)."""
        with self._lock:
            self._ended = True
            self._spool.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._ended:
            return
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _check_open(self) -> None:
        if self._ended:
            raise RuntimeError(f"MLflow run logger for {self.run_id} is closed")

    # -- delivery

    def _backoff_s(self) -> float:
        return min(self._max_backoff_s, 0.5 * 2 ** max(0, self._failures - 1))

    def _deliver_in_call(self) -> None:
        if (self._spool.pending or self._artifact_due()) and time.monotonic() >= self._retry_at:
            self._deliver(time.monotonic() + self._call_budget_s)

    def _deliver(self, deadline: float) -> bool:
        """Send pending records in order, then retry the deferred uploads that are due; True when nothing is
        left to try now, False at the deadline, a transient failure, or while a deferred upload waits.

        A file upload that fails with an answer (a local write error, an HTTP error status) is set aside
        with its files (`deferred.json`), so that the records after it go on; it is tried again
        `_ARTIFACT_ATTEMPTS` times in all by this logger, with a backoff, and after that waits for a later
        `flush`/`flush_pending`/`sync_spools`. An unreachable server stops delivery as for any record.
        """
        while self._spool.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            group = self._next_group()
            try:
                with _http_policy(min(self._request_timeout_s, max(remaining, 1.0))):
                    self._send(group)
            except Exception as exc:
                if group[0].record["op"] in _FILE_OPS and not _is_unreachable(exc):
                    self._defer_artifact(group[0], exc)
                    continue
                if is_transient(exc):
                    self._note_unreachable(exc)
                    return False
                if len(group) > 1:  # find the record MLflow refuses by sending them one at a time
                    self._isolate_through = group[-1].seq
                    continue
                _log.warning(
                    "MLflow run %s refused record %d (%s): %s",
                    self.run_id,
                    group[0].seq,
                    group[0].record.get("op"),
                    exc,
                )
                self._spool.reject(group[0], f"{type(exc).__name__}: {exc}")
                self._spool.ack(1)
                continue
            self._spool.ack(len(group))
            self._drop_superseded(group[0])
            self._failures = 0
            self._retry_at = 0.0
            self.last_error = None
        return self._retry_artifacts(deadline)

    def _drop_superseded(self, delivered: _Pending) -> None:
        """Forget the deferred uploads of the same file name that `delivered` (a later one) has replaced."""
        if delivered.record["op"] != "artifact":
            return
        name = _artifact_name(delivered.record)
        for seq, entry in list(self._spool.deferred.items()):
            if (
                seq < delivered.seq
                and entry["record"]["op"] == "artifact"
                and _artifact_name(entry["record"]) == name
            ):
                self._spool.resolve(seq)

    def _note_unreachable(self, exc: BaseException) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + self._backoff_s()
        self.last_error = _error_text(exc)
        _log.debug("MLflow unreachable (%s); %d record(s) pending", self.last_error, self.pending)

    def _defer_artifact(self, item: _Pending, exc: BaseException) -> None:
        self.last_error = _error_text(exc)
        _log.warning(
            "MLflow run %s: could not store artifact %s (%s); its copy stays in %s and is tried again",
            self.run_id,
            _artifact_name(item.record),
            self.last_error,
            self.spool_dir,
        )
        self._spool.defer(item, self.last_error)
        self._artifact_tries[item.seq] = 1
        self._artifact_retry_at[item.seq] = time.monotonic() + _artifact_backoff_s(1)

    def _artifact_due(self) -> bool:
        now = time.monotonic()
        return any(
            self._artifact_tries.get(seq, 0) < _ARTIFACT_ATTEMPTS
            and now >= self._artifact_retry_at.get(seq, 0.0)
            for seq in self._spool.deferred
        )

    def _retry_artifacts(self, deadline: float) -> bool:
        """Upload the deferred records that are due; False while one waits for its backoff or at a failure."""
        waiting = False
        for seq, entry in list(self._spool.deferred.items()):
            tries = self._artifact_tries.get(seq, 0)
            if tries >= _ARTIFACT_ATTEMPTS or seq not in self._spool.deferred:
                continue
            now = time.monotonic()
            if now < self._artifact_retry_at.get(seq, 0.0):
                waiting = True
                continue
            if now >= deadline:
                return False
            try:
                with _http_policy(min(self._request_timeout_s, max(deadline - now, 1.0))):
                    self._send([_Pending(seq, entry["record"], 0)])
            except Exception as exc:
                if _is_unreachable(exc):
                    self._note_unreachable(exc)
                    return False
                tries += 1
                self._artifact_tries[seq] = tries
                self.last_error = _error_text(exc)
                self._spool.note_failure(seq, self.last_error)
                if tries < _ARTIFACT_ATTEMPTS:
                    self._artifact_retry_at[seq] = time.monotonic() + _artifact_backoff_s(tries)
                    waiting = True
                else:  # end() and the sweep's last lines count what is left
                    _log.info(
                        "MLflow run %s: artifact %s still not stored after %d attempts (%s); it stays in %s for "
                        "flush_pending / `cpews sweep sync`",
                        self.run_id,
                        _artifact_name(entry["record"]),
                        tries,
                        self.last_error,
                        self.spool_dir,
                    )
                continue
            self._spool.resolve(seq)
            self._drop_superseded(_Pending(seq, entry["record"], 0))
        return not waiting

    def _next_group(self) -> list[_Pending]:
        """The head record, merged with the following `batch` records while they fit in one batch."""
        head = self._spool.pending[0]
        group = [head]
        if head.record["op"] != "batch" or head.seq <= self._isolate_through:
            return group
        params = dict(head.record.get("params", {}))
        counts = [len(head.record.get("metrics", [])), len(params), len(head.record.get("tags", {}))]
        for item in itertools.islice(self._spool.pending, 1, None):
            record = item.record
            if record["op"] != "batch":
                break
            new_params = record.get("params", {})
            if any(k in params and params[k] != v for k, v in new_params.items()):
                break  # the same param with another value: keep it apart, it will be refused alone
            counts = [
                counts[0] + len(record.get("metrics", [])),
                len(params.keys() | new_params.keys()),
                counts[2] + len(record.get("tags", {})),
            ]
            if (
                counts[0] > MAX_METRICS_PER_BATCH
                or counts[1] > MAX_PARAMS_TAGS_PER_BATCH
                or counts[2] > MAX_PARAMS_TAGS_PER_BATCH
            ):
                break
            params.update(new_params)
            group.append(item)
        return group

    def _send(self, group: list[_Pending]) -> None:
        record = group[0].record
        op = record["op"]
        if op == "batch":
            metrics: list[Metric] = []
            params: dict[str, str] = {}
            tags: dict[str, str] = {}
            for item in group:
                metrics.extend(Metric(k, math.nan if v is None else v, ts, step)
                               for k, v, ts, step in item.record.get("metrics", []))
                params.update(item.record.get("params", {}))
                tags.update(item.record.get("tags", {}))
            if metrics and self._check_history:
                metrics = self._unlogged(metrics)
            if metrics or params or tags:
                self._send_batch(metrics, params, tags)
        elif op == "artifact":
            self._client.log_artifact(
                self.run_id, str(self.spool_dir / record["file"]), record["artifact_path"]
            )
        elif op == "artifacts":
            self._client.log_artifacts(
                self.run_id, str(self.spool_dir / record["dir"]), record["artifact_path"]
            )
        elif op == "status":
            self._client.update_run(self.run_id, status=record["status"])
        elif op == "end":
            self._client.set_terminated(self.run_id, record["status"], end_time=record["end_time"])
        else:
            raise ValueError(f"unknown spool record {op!r}")

    def _unlogged(self, metrics: list[Metric]) -> list[Metric]:
        """The points above the highest step MLflow holds for their key, asked once per logger of a continued
        run (an earlier attempt may have logged from another spool, or delivered without saving its
        position)."""
        latest = self._client.get_run(self.run_id).data._metric_objs  # the highest step of each key
        held = {metric.key: metric.step for metric in latest}
        self._spool.note_delivered_steps(held)
        self._check_history = False
        return [metric for metric in metrics if metric.step > held.get(metric.key, metric.step - 1)]

    def _send_batch(self, metrics: list[Metric], params: dict[str, str], tags: dict[str, str]) -> None:
        try:
            self._log_batch(metrics, params, tags)
        except MlflowException as exc:
            if not params or is_transient(exc) or exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            # Params are write-once: keep those not logged yet, count an equal value as delivered, and set
            # aside a changed value (MLflow refuses it) instead of losing the rest of the batch.
            existing = self._client.get_run(self.run_id).data.params
            remaining = {k: v for k, v in params.items() if k not in existing}
            if len(remaining) == len(params):
                raise
            conflicts = {
                k: {"logged": existing[k], "new": v} for k, v in params.items() if existing.get(k, v) != v
            }
            if conflicts:
                _log.warning(
                    "MLflow run %s: params already logged with other values, kept: %s", self.run_id, conflicts
                )
                self._spool.reject(None, "param already logged with another value", conflicts)
            self._log_batch(metrics, remaining, tags)

    def _log_batch(self, metrics: list[Metric], params: dict[str, str], tags: dict[str, str]) -> None:
        param_list = [Param(k, v) for k, v in params.items()]
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for chunk_metrics, chunk_params, chunk_tags in _batch_chunks(metrics, param_list, tag_list):
            self._client.log_batch(self.run_id, metrics=chunk_metrics, params=chunk_params, tags=chunk_tags)


def _is_unreachable(exc: BaseException) -> bool:
    """Whether a failed call got no answer at all (no connection, a timeout), as opposed to an error answer."""
    return any(
        isinstance(
            error,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | requests.exceptions.ChunkedEncodingError
            | urllib3.exceptions.NewConnectionError
            | urllib3.exceptions.TimeoutError
            | urllib3.exceptions.ProtocolError
            | ConnectionError
            | TimeoutError
            | socket.timeout,
        )
        for error in _exception_chain(exc)
    )


def _error_text(exc: BaseException) -> str:
    """`Type: message`, a long message cut in the middle (its end usually holds the cause)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= 300 else text[:150] + ' ... ' + text[-150:]}"


def _artifact_name(record: Mapping[str, Any]) -> str:
    """The artifact path a file record uploads to (`checkpoint/last.pt`, `pool/`)."""
    name = posixpath.basename(record["file"]) if record["op"] == "artifact" else ""
    return posixpath.join(record.get("artifact_path") or "", name).rstrip("/") or "."


def _artifact_backoff_s(tries: int) -> float:
    return 0.5 * 2 ** (tries - 1)


def _create_run(
    tracking_uri: str,
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    token: str,
    *,
    look_first: bool,
    timeout_s: float,
    request_timeout_s: float,
) -> str:
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    attempts = 0
    while True:
        attempts += 1
        try:
            with _http_policy(min(request_timeout_s, max(1.0, deadline - time.monotonic()))):
                if look_first:
                    found = client.search_runs(
                        [experiment_id],
                        filter_string=f"tags.`{RUN_TOKEN_TAG}` = '{token}'",
                        run_view_type=ViewType.ALL,
                        max_results=1,
                    )
                    if found:
                        return found[0].info.run_id
                run = client.create_run(experiment_id, start_time=_now_ms(), tags=tags, run_name=run_name)
                return run.info.run_id
        except Exception as exc:
            if not is_transient(exc):
                raise
            look_first = True
            if time.monotonic() + delay > deadline:
                raise TrackingUnavailableError(
                    f"could not create MLflow run {run_name!r} in experiment {experiment_id} at {tracking_uri} "
                    f"within {timeout_s:.0f} s ({attempts} attempts); last error: {type(exc).__name__}: "
                    f"{str(exc)[:300]}"
                ) from exc
            _log.info("MLflow at %s unreachable, retrying run creation in %.1f s", tracking_uri, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def flush_pending(spool_dir: Path, tracking_uri: str | None = None, *, timeout_s: float = 60.0) -> int:
    """Deliver what a (finished or crashed) RunLogger left in `spool_dir`; return the records still pending.

    `tracking_uri` defaults to the one the spool was written with. Call it only when no RunLogger is writing
    to that spool (e.g. from the sweep driver after the trials ended; `find_spool_dirs` lists them).
    """
    with _attached(spool_dir, tracking_uri, timeout_s) as logger:
        return logger.flush(timeout_s) if logger is not None else 0


def sync_spools(root: Path, tracking_uri: str | None = None, *, timeout_s: float = 120.0) -> Backlog:
    """Deliver what every spool under `root` still holds (failed artifact uploads included); return what is
    left (`Backlog(0, 0)`: MLflow has everything).

    Each spool goes to the tracking URI it was written with, unless `tracking_uri` is given; `timeout_s`
    bounds the whole call (each spool gets at least a second). This is `cpews sweep sync NAME`: run it when
    no process writes to these spools (the sweep is not running).
    """
    deadline = time.monotonic() + max(0.0, timeout_s)
    for spool in find_spool_dirs(root):
        if spool_backlog(spool).records:
            flush_pending(spool, tracking_uri, timeout_s=max(1.0, deadline - time.monotonic()))
    return spool_backlog(root)


@contextlib.contextmanager
def _attached(spool_dir: Path, tracking_uri: str | None, timeout_s: float) -> Iterator[RunLogger | None]:
    """A RunLogger on the spool another (finished) logger left, or None when it holds no run; closed after."""
    logger = RunLogger._attach(Path(spool_dir), tracking_uri, request_timeout_s=min(30.0, max(1.0, timeout_s)))
    try:
        yield logger
    finally:
        if logger is not None:
            logger.close()


def spool_status(spool_dir: Path) -> str | None:
    """The terminal status a RunLogger recorded in `spool_dir` ("FINISHED", ...), or None while it is open
    (or when the folder holds no spool)."""
    meta = _read_json(Path(spool_dir) / _META)
    return meta.get("ended") if isinstance(meta, dict) else None


def finalize_spool(
    spool_dir: Path,
    status: Status,
    tracking_uri: str | None = None,
    *,
    timeout_s: float = 30.0,
    tags: Mapping[str, Any] | None = None,
) -> int:
    """End the run of a spool whose writer is gone (a stopped or crashed trial), then deliver what is pending.

    A run that its logger already ended keeps its own status (and `tags` are not set); otherwise `tags` and
    then `status` are recorded. Returns the
    records still pending (0: the run is complete in MLflow). Call it only when no RunLogger writes to
    `spool_dir`.
    """
    if status not in _TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {_TERMINAL_STATUSES}, got {status!r}")
    with _attached(spool_dir, tracking_uri, timeout_s) as logger:
        if logger is None:
            return 0
        meta = logger._spool.meta or {}
        if not meta.get("ended"):
            clean = _tag_values(tags)
            if clean:
                logger._spool.append({"op": "batch", "tags": clean})
            logger._spool.append({"op": "end", "status": status, "end_time": _now_ms()})
            logger._spool.write_meta({**meta, "ended": status})
        return logger.flush(timeout_s)

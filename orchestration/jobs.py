"""Sweeps on a Ray cluster through Ray's job submission API.

`cpews sweep run FILE --address http://HEAD:8265` (or `RAY_ADDRESS=http://HEAD:8265`) does not run the driver on
the caller's machine: it submits `python -m orchestration.cli sweep run FILE ...` as a Ray Job whose working
directory is this project (uploaded by Ray, without runs/, .venv/ and other generated folders), follows its logs,
and exits with the job's outcome (0 succeeded, 1 failed, 130 stopped). Inside the job Ray sets RAY_ADDRESS, so
the sweep's driver joins the cluster and its trials spread over the nodes. `cpews sweep status` lists the sweep
jobs of a cluster and `cpews sweep stop JOB` stops one (Tune then saves the sweep; resume it with
`cpews sweep resume NAME --address ...`).

Paths given to the job are the cluster's: `--run-dir` must be a folder every node can reach (a shared
filesystem) for trial folders and checkpoints; `MLFLOW_TRACKING_URI` is passed to the job when set here.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["JOB_EXIT_CODES", "is_job_address", "list_sweep_jobs", "stop_job", "submit_and_follow"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".git", ".venv", "runs", "data", "mlruns", "*.pt", "*.pth", "*.db", "__pycache__", ".pytest_cache",
            ".ruff_cache", "*.egg-info"]
JOB_EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "CPEWS_DATA_DIR",
                 "CPEWS_TRACEBACK", "RAY_AUTH_MODE")
METADATA_KEY = "cpews"


def is_job_address(address: str | None) -> bool:
    """Whether `address` is a Ray dashboard / job API address (http:// or https://)."""
    return bool(address) and address.startswith(("http://", "https://"))


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, not a Ray dashboard, ...
        raise ConnectionError(f"cannot reach the Ray job API at {address}: {exc}") from None


def submit_and_follow(
    address: str,
    cli_args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    follow: bool = True,
    out: Callable[[str], None] = print,
    name: str = "sweep",
) -> tuple[str, int]:
    """Submit `python -m orchestration.cli <cli_args>` as a Ray Job; follow its logs; return (job id, exit code).

    `env` (default: the FORWARDED_ENV variables set here) is the job's environment. Without `follow` the exit
    code is 0 once the job is accepted.
    """
    import os

    client = _client(address)
    job_env = env if env is not None else {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    entrypoint = "python -m orchestration.cli " + shlex.join(cli_args)
    submission_id = f"cpews-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": job_env},
        metadata={METADATA_KEY: "sweep", "name": name},
    )
    out(f"submitted Ray job {job_id} to {address}: {entrypoint}")
    out(f"  status: cpews sweep status --address {address}    stop: cpews sweep stop {job_id} --address {address}")
    if not follow:
        return job_id, 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            for line in lines.rstrip("\n").split("\n"):
                out(line)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        out(f"stopping Ray job {job_id} (the sweep saves its state; resume it later)")
        client.stop_job(job_id)
        _wait_terminal(client, job_id, timeout_s=120)
    status = _wait_terminal(client, job_id, timeout_s=60)
    out(f"Ray job {job_id}: {status}")
    return job_id, JOB_EXIT_CODES.get(status, 1)


def _wait_terminal(client: Any, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status not in JOB_EXIT_CODES and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def list_sweep_jobs(address: str) -> list[dict[str, Any]]:
    """The cpews sweep jobs of a cluster, newest first: id, name, status, entrypoint, start/end times."""
    jobs = []
    for job in _client(address).list_jobs():
        if (job.metadata or {}).get(METADATA_KEY) != "sweep":
            continue
        jobs.append({"job_id": job.submission_id, "name": (job.metadata or {}).get("name"),
                     "status": str(job.status.value), "entrypoint": job.entrypoint,
                     "start_time": job.start_time, "end_time": job.end_time, "message": job.message})
    return sorted(jobs, key=lambda j: j["start_time"] or 0, reverse=True)


def stop_job(address: str, job_id: str) -> str:
    """Ask the cluster to stop job `job_id`; returns its status once it has stopped (or after 120 s)."""
    client = _client(address)
    try:
        client.get_job_status(job_id)
    except Exception:
        raise ValueError(f"no Ray job {job_id!r} at {address}") from None
    client.stop_job(job_id)
    return _wait_terminal(client, job_id, timeout_s=120)

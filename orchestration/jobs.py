"""Sweeps on a Ray cluster through Ray's job submission API.

`cpews sweep run FILE --address http://HEAD:8265` (or `RAY_ADDRESS=http://HEAD:8265`) does not run the driver on
the caller's machine: it submits `python -m orchestration.cli sweep run FILE ...` as a Ray Job whose working
directory is this project's sources, follows its logs, and exits with the job's outcome (0 succeeded, 1 failed,
130 stopped). Only what the job needs is uploaded (`job_files`: the git-tracked files, else the packages), from a
staging folder that is removed once Ray has taken it, so a dataset, a second environment or checkpoints kept
beside the project never reach Ray's 100 MiB request limit. A cluster that has just started may not have its job
agent up yet: that answer is retried for up to a minute. Inside the job Ray sets RAY_ADDRESS, so
the sweep's driver joins the cluster and its trials spread over the nodes. `cpews sweep status` lists the sweep
jobs of a cluster and `cpews sweep stop JOB` stops one (Tune then saves the sweep; resume it with
`cpews sweep resume NAME --address ...`).

Paths given to the job are the cluster's: `--run-dir` must be a folder every node can reach (a shared
filesystem) for trial folders and checkpoints; `MLFLOW_TRACKING_URI` is passed to the job when set here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["JOB_EXIT_CODES", "StagedProject", "is_job_address", "job_files", "list_sweep_jobs", "stage_project",
           "stop_job", "submit_and_follow"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cpews", "orchestration", "search_spaces")  # what a job runs, when the project is not a git checkout
TOP_LEVEL_FILES = ("pyproject.toml", "README.md", "Makefile")
GENERATED = ("*.pyc", "*.pt", "*.pth", "*.ckpt", "*.db")  # untracked files of these kinds stay out
GENERATED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
IGNORE_FILES = (".gitignore", ".rayignore")  # Ray would apply them to the staged copy and drop files from it
NO_AGENT = "No available agent to submit job"  # Ray's 500 answer while the cluster's job agent is starting
AGENT_WAIT_S = 60.0  # how long that answer is retried
AGENT_FIRST_DELAY_S = 1.0  # the first pause between tries; it doubles, up to AGENT_MAX_DELAY_S
AGENT_MAX_DELAY_S = 10.0
JOB_EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "CPEWS_DATA_DIR",
                 "CPEWS_TRACEBACK", "RAY_AUTH_MODE")
METADATA_KEY = "cpews"


def is_job_address(address: str | None) -> bool:
    """Whether `address` is a Ray dashboard / job API address (http:// or https://)."""
    return bool(address) and address.startswith(("http://", "https://"))


class StagedProject(NamedTuple):
    """A copy of the files a job needs (`job_files`), in a temporary folder."""

    path: Path
    files: int
    bytes: int


def job_files(root: Path = PROJECT_ROOT) -> list[str]:
    """The files a sweep job needs, as sorted paths relative to `root`.

    In a git checkout: the tracked files (`git ls-files`) plus the untracked, not ignored files inside the
    packages (a new module not yet added); anything else beside the project (a dataset, a venv, checkpoints)
    stays out. Otherwise: the packages `PACKAGES` and the `TOP_LEVEL_FILES`. Untracked files that are generated
    (`GENERATED`), ignore files (`IGNORE_FILES`) and paths that are not regular files are left out.
    """
    root = Path(root)
    tracked, untracked = _git_files(root)
    if tracked:
        names = tracked + [name for name in untracked if not _generated(name)]
    else:
        walked = [str(p.relative_to(root)) for package in PACKAGES for p in (root / package).rglob("*")]
        names = [name for name in [*walked, *TOP_LEVEL_FILES] if not _generated(name)]
    return sorted({name for name in names if Path(name).name not in IGNORE_FILES and (root / name).is_file()})


def _git_files(root: Path) -> tuple[list[str], list[str]]:
    """(tracked files under `root`, untracked not-ignored files inside its packages); ([], []) outside git."""
    listings = (["--cached"], ["--others", "--exclude-standard", "--", *PACKAGES])
    found: list[list[str]] = []
    for options in listings:
        try:
            proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z", *options], capture_output=True,
                                  timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):  # no git here
            return [], []
        if proc.returncode != 0:  # not a git checkout
            return [], []
        found.append([name for name in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if name])
    return found[0], found[1]


def _generated(name: str) -> bool:
    parts = Path(name).parts
    return bool(GENERATED_DIRS.intersection(parts)) or any(fnmatch.fnmatch(parts[-1], p) for p in GENERATED)


@contextlib.contextmanager
def stage_project(root: Path = PROJECT_ROOT) -> Iterator[StagedProject]:
    """Copy `job_files(root)` into a temporary folder; the folder is removed on exit."""
    names = job_files(root)
    with tempfile.TemporaryDirectory(prefix="cpews-job-") as tmp:
        total = 0
        for name in names:
            target = Path(tmp, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root, name), target)
            total += target.stat().st_size
        yield StagedProject(Path(tmp), len(names), total)


def is_agent_not_ready(error: BaseException) -> bool:
    """Whether a job API error is Ray's "no available agent" answer of a cluster that is still starting."""
    return NO_AGENT.lower() in str(error).lower()


def _submit_when_agent_ready(client: Any, address: str, out: Callable[[str], None], **submit: Any) -> str:
    """`client.submit_job(**submit)`, retried with backoff while the cluster's job agent is not up (up to
    AGENT_WAIT_S); any other refusal, or the agent still missing then, is a ConnectionError naming `address`."""
    deadline = time.monotonic() + AGENT_WAIT_S
    delay = AGENT_FIRST_DELAY_S
    said = False
    while True:
        try:
            return client.submit_job(**submit)
        except RuntimeError as exc:
            reason = str(exc).strip().rstrip(".")
            if not is_agent_not_ready(exc):
                raise ConnectionError(f"the Ray job API at {address} refused the job: {reason}") from None
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"the Ray job API at {address} still has no job agent after "
                                      f"{AGENT_WAIT_S:.0f} s: {reason}") from None
            if not said:
                said = True
                out(f"the cluster's job agent is not up yet ({NO_AGENT}); retrying for up to {AGENT_WAIT_S:.0f} s")
        time.sleep(delay)
        delay = min(2 * delay, AGENT_MAX_DELAY_S)


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
    root: Path = PROJECT_ROOT,
) -> tuple[str, int]:
    """Submit `python -m orchestration.cli <cli_args>` as a Ray Job; follow its logs; return (job id, exit code).

    `env` (default: the FORWARDED_ENV variables set here) is the job's environment. The job's working directory
    is `job_files(root)`. Without `follow` the exit code is 0 once the job is accepted.
    """
    import os

    client = _client(address)
    job_env = env if env is not None else {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    entrypoint = "python -m orchestration.cli " + shlex.join(cli_args)
    submission_id = f"cpews-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with stage_project(root) as staged:  # Ray zips and uploads the folder inside submit_job
        out(f"uploading {staged.files} files, {staged.bytes / 1e6:.1f} MB from {root} as the job's working "
            "directory")
        job_id = _submit_when_agent_ready(
            client, address, out,
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"working_dir": str(staged.path), "env_vars": job_env},
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

"""A local tracking stack for development and tests: PostgreSQL, an S3-compatible endpoint and `mlflow server`.

    python -m orchestration.services up --dir runs/stack        # start all three; prints the exports to use
    python -m orchestration.services down --dir runs/stack      # stop them

- PostgreSQL from the OS packages (`initdb`/`pg_ctl` of /usr/lib/postgresql/<v>/bin), its own cluster in
  `<dir>/postgres` on 127.0.0.1, trust authentication for local development only. PostgreSQL refuses to run
  as root: as root, the cluster is owned by and run as the `postgres` system user.
- moto's standalone S3 server on 127.0.0.1 (an S3-compatible endpoint), with the artifact bucket created.
- `mlflow server` with `--backend-store-uri postgresql://...` and `--artifacts-destination s3://<bucket>/mlflow`:
  artifacts are proxied (clients use `mlflow-artifacts:/` and need no S3 credentials; only the server gets them).

A production server is the same command with a managed PostgreSQL and S3 (see infra/README.md and
infra/mlflow/). Each service's output goes to `<dir>/<name>.log`; `up` writes `<dir>/stack.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}


class ServiceError(RuntimeError):
    """A service could not be found, started or reached."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, what: str, process: subprocess.Popen | None = None,
                  log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"{what} exited with {process.returncode}: {_tail(log)}")
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise ServiceError(f"{what} did not listen on {HOST}:{port} within {timeout_s:.0f} s: {_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def postgres_bindir() -> Path:
    """The folder of `initdb` and `pg_ctl` (the newest /usr/lib/postgresql/<v>/bin, else PATH).

    Raises:
        ServiceError: PostgreSQL's server programs are not installed (`apt-get install postgresql`).
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ServiceError("PostgreSQL server programs (initdb, pg_ctl) not found; install them with "
                       "`apt-get install postgresql` (Debian/Ubuntu)")


@dataclass
class LocalPostgres:
    """A private PostgreSQL cluster on 127.0.0.1:port with database `database` (trust auth, development only)."""

    root: Path
    port: int = field(default_factory=free_port)
    database: str = "mlflow"
    user: str = "postgres"

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{self.database}"

    def _as_owner(self, command: list[str]) -> list[str]:
        if os.geteuid() == 0:  # postgres refuses root: run as the postgres system user
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    def start(self) -> None:
        bindir = postgres_bindir()
        data, log = self.root / "data", self.root / "postgres.log"
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        if not (data / "PG_VERSION").exists():
            subprocess.run(self._as_owner([str(bindir / "initdb"), "-D", str(data), "-U", self.user,
                                           "--auth=trust", "-E", "UTF8"]),
                           check=True, capture_output=True, text=True)
        options = f"-p {self.port} -c listen_addresses={HOST} -k {self.root}"
        done = subprocess.run(self._as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log),
                                              "-w", "-t", "60", "start"]), capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"pg_ctl start failed: {done.stderr.strip()} {_tail(log)}")
        exists = subprocess.run(self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"),
                                capture_output=True, text=True, check=True).stdout.strip()
        if exists != "1":
            subprocess.run(self._psql(f'CREATE DATABASE "{self.database}"'), check=True, capture_output=True)

    def _psql(self, sql: str) -> list[str]:
        psql = postgres_bindir() / "psql"
        return [str(psql if psql.exists() else "psql"), "-h", HOST, "-p", str(self.port), "-U", self.user,
                "-d", "postgres", "-tAc", sql]

    def query(self, sql: str, database: str | None = None) -> str:
        command = self._psql(sql)
        command[command.index("-d") + 1] = database or self.database
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    def stop(self) -> None:
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(self._as_owner([str(postgres_bindir() / "pg_ctl"), "-D", str(data), "-m", "fast",
                                           "-w", "stop"]), capture_output=True)


@dataclass
class Process:
    """A service subprocess in its own session (stopped as a group)."""

    name: str
    command: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, **self.env}, start_new_session=True)
        wait_for_port(self.port, timeout_s, self.name, self.popen, self.log)

    def stop(self) -> None:
        process, self.popen = self.popen, None
        if process is not None:
            stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group of a `start_new_session` child, SIGKILL it after `timeout_s`, and SIGKILL what
    is left of the group (a grandchild that outlived its parent)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def moto_s3(root: Path, port: int | None = None) -> Process:
    """moto's standalone server (S3 and the other AWS APIs) on 127.0.0.1."""
    port = port or free_port()
    return Process("moto S3 server", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], port,
                   root / "moto.log", env=dict(S3_TEST_CREDENTIALS))


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"]),
            "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY",
                                                    S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]),
            "region_name": os.environ.get("AWS_DEFAULT_REGION", S3_TEST_CREDENTIALS["AWS_DEFAULT_REGION"])}


def mlflow_server(root: Path, backend_store_uri: str, artifacts_destination: str, s3_endpoint: str | None,
                  port: int | None = None, extra_env: dict[str, str] | None = None) -> Process:
    """`mlflow server` over a database and proxied artifacts (one worker, MLflow 3's job runner off)."""
    port = port or free_port()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    if s3_endpoint:
        env.update({"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **S3_TEST_CREDENTIALS})
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
               "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
               "--serve-artifacts", "--workers", "1"]
    return Process("mlflow server", command, port, root / "mlflow.log", env=env)


@dataclass
class TrackingStack:
    """PostgreSQL + moto S3 + mlflow server, started in that order and stopped in reverse."""

    root: Path
    bucket: str = "cpews-mlflow"
    postgres: LocalPostgres | None = None
    s3: Process | None = None
    server: Process | None = None

    @property
    def tracking_uri(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.port}"

    @property
    def s3_endpoint(self) -> str:
        assert self.s3 is not None
        return f"http://{HOST}:{self.s3.port}"

    def start(self) -> TrackingStack:
        try:
            # a folder the postgres user can traverse (a pytest tmp folder of root's is 0700)
            self.postgres = LocalPostgres(Path(tempfile.mkdtemp(prefix="cpews-pg-")))
            self.postgres.start()
            self.s3 = moto_s3(self.root)
            self.s3.start()
            create_bucket(self.s3_endpoint, self.bucket)
            self.server = mlflow_server(self.root, self.postgres.uri, f"s3://{self.bucket}/mlflow", self.s3_endpoint)
            self.server.start(timeout_s=120)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for service in (self.server, self.s3):
            if service is not None:
                service.stop()
        if self.postgres is not None:
            self.postgres.stop()
            if self.postgres.root.name.startswith("cpews-pg-"):
                shutil.rmtree(self.postgres.root, ignore_errors=True)

    def describe(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "backend_store_uri": self.postgres.uri,
                "artifacts": f"s3://{self.bucket}/mlflow", "s3_endpoint": self.s3_endpoint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", default="runs/stack")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    if args.action == "up":
        stack = TrackingStack(root).start()
        state = {**stack.describe(), "pids": [stack.s3.popen.pid, stack.server.popen.pid],
                 "postgres_root": str(stack.postgres.root)}
        (root / "stack.json").write_text(json.dumps(state, indent=1))
        print(f"export MLFLOW_TRACKING_URI={stack.tracking_uri}")
        print(f"# PostgreSQL {stack.postgres.uri}, artifacts s3://{stack.bucket}/mlflow at {stack.s3_endpoint}")
        print(f"# stop with: python -m orchestration.services down --dir {args.dir}")
        return 0
    state = json.loads((root / "stack.json").read_text())
    for pid in state["pids"]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    LocalPostgres(Path(state["postgres_root"])).stop()
    shutil.rmtree(state["postgres_root"], ignore_errors=True)
    (root / "stack.json").unlink()
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real `mlflow server` on 127.0.0.1 for the tracking tests, which can be stopped and started again.

One server per session (it takes ~10 s to start on a small machine). `MlflowServer.stop()` / `.start()` keep the
port and the store (SQLite file + artifact folder), so a test can simulate an outage and find its runs after
the restart. The server runs with one worker and without MLflow 3's job runner (huey consumers, 6 extra
processes that the tracking API does not need), `OMP_NUM_THREADS=1`, and its output in a log file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from orchestration.services import HOST, free_port, stop_process_group

START_TIMEOUT_S = 90.0


class MlflowServer:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.uri = f"http://{HOST}:{port}"
        self.backend_store_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts_dir = root / "artifacts"
        self.log_path = root / "server.log"
        self._process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (same port and store as before) and wait until `/health` answers."""
        if self.running:
            return
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.artifacts_dir),
            "--workers",
            "1",
        ]
        with open(self.log_path, "ab") as log:
            # A session of its own: stop() signals the whole group (the CLI process and its uvicorn child).
            self._process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not answer /health within {START_TIMEOUT_S} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL) and wait until the port refuses."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_process_group(process)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex((HOST, self.port)) != 0:
                    return
            time.sleep(0.1)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts); stopped at session end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_mlflow_server(mlflow_server: MlflowServer) -> MlflowServer:
    """The session server, started again if an earlier test left it stopped."""
    mlflow_server.start()
    return mlflow_server


@pytest.fixture
def dead_uri() -> str:
    """An http URI on 127.0.0.1 where nothing listens: every request is refused at once."""
    return f"http://{HOST}:{free_port()}"


@pytest.fixture
def ray_env(monkeypatch: pytest.MonkeyPatch, synthetic_data_dir: Path) -> Iterator[None]:
    """One thread per process; no MLFLOW_TRACKING_URI or RAY_ADDRESS from outside; no Ray left running."""
    import ray

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()

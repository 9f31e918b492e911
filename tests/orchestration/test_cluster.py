"""Sweeps submitted as Ray Jobs.

Fast: what is uploaded (the tracked sources of a git checkout, not a big folder beside them) and the retry of
Ray's "no available agent" answer, through Ray's own job client against a small HTTP server on 127.0.0.1 that
answers like Ray's job API. Integration: a multi-node Ray cluster on this machine (a head and a worker started
with `ray start`, one CPU each): a micro sweep submitted as a Ray Job runs trials on both nodes; a worker node that
dies mid-trial costs a retry only."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from orchestration import jobs

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2:
        break
    time.sleep(0.5)
print(json.dumps([{"id": n["NodeID"], "head": "node:__internal_head__" in n["Resources"]} for n in alive]))
"""


NO_AGENT_ANSWER = "No available agent to submit job, please try again later."
TRACKED = {"pyproject.toml": "[project]\n", "cpews/__init__.py": "", "cpews/tiny.pt": "weights",
           "orchestration/cli.py": "print('hi')\n", "search_spaces/demo.yaml": "name: demo\n", ".gitignore": "*.db\n"}
UNTRACKED = {"cpews/new_module.py": "x = 1\n", "cpews/__pycache__/new_module.cpython-311.pyc": "pyc",
             "cpews/cache.db": "ignored", "notes.txt": "mine", "venv/lib/big.bin": "0" * 3_000_000,
             "data/VOC2012/JPEGImages/a.jpg": "jpeg"}


def make_project(root: Path, *, git: bool) -> Path:
    """A project folder: TRACKED (added to git when `git`) and UNTRACKED files, with a big untracked venv/."""
    for name, text in {**TRACKED, **UNTRACKED}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "add", "-f", *TRACKED], check=True)
    return root


def test_a_git_checkout_uploads_its_tracked_files_and_new_package_files_only(tmp_path: Path) -> None:
    root = make_project(tmp_path, git=True)
    # tracked (even *.pt, force-added) + the untracked module inside a package; no venv/, data/, notes, .gitignore
    assert jobs.job_files(root) == ["cpews/__init__.py", "cpews/new_module.py", "cpews/tiny.pt",
                                    "orchestration/cli.py", "pyproject.toml", "search_spaces/demo.yaml"]
    (root / "cpews" / "__init__.py").unlink()  # deleted but still tracked: nothing to upload
    assert "cpews/__init__.py" not in jobs.job_files(root)


def test_a_plain_folder_uploads_the_packages_and_top_level_files(tmp_path: Path) -> None:
    root = make_project(tmp_path, git=False)
    # no *.pt, *.db or __pycache__ from the packages
    assert jobs.job_files(root) == ["cpews/__init__.py", "cpews/new_module.py", "orchestration/cli.py",
                                    "pyproject.toml", "search_spaces/demo.yaml"]


def test_the_staging_folder_holds_the_job_files_and_is_removed(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project", git=True)
    with jobs.stage_project(root) as staged:
        copied = sorted(str(p.relative_to(staged.path)) for p in staged.path.rglob("*") if p.is_file())
        assert copied == jobs.job_files(root)
        assert staged.files == 6
        assert staged.bytes == sum((root / name).stat().st_size for name in copied) == 10 + 7 + 12 + 11 + 6
        for name in copied:
            assert (staged.path / name).read_bytes() == (root / name).read_bytes()
    assert not staged.path.exists()


class FakeJobApi(ThreadingHTTPServer):
    """The part of Ray's job API that `JobSubmissionClient.submit_job` talks to (version, package upload, job
    submission); the first `no_agent` submissions are answered like a cluster whose job agent is not up yet, or
    every one with `refusal` (status, text) when set."""

    def __init__(self, no_agent: int = 0, refusal: tuple[int, str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), FakeJobApiHandler)
        self.no_agent = no_agent
        self.refusal = refusal
        self.packages: dict[str, bytes] = {}
        self.submissions: list[dict] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeJobApiHandler(BaseHTTPRequestHandler):
    server: FakeJobApi

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self) -> None:
        import ray

        if self.path == "/api/version":
            self.answer(200, json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "test"}))
        elif self.path.startswith("/api/packages/"):
            self.answer(200 if self.path in self.server.packages else 404, "")
        else:
            self.answer(404, "")

    def do_PUT(self) -> None:
        self.server.packages[self.path] = self.body()
        self.answer(200, "")

    def do_POST(self) -> None:
        request = json.loads(self.body())
        self.server.submissions.append(request)
        if self.server.refusal:
            self.answer(*self.server.refusal, content_type="text/plain")
        elif len(self.server.submissions) <= self.server.no_agent:
            self.answer(500, NO_AGENT_ANSWER, content_type="text/plain")
        else:
            sid = request["submission_id"]
            self.answer(200, json.dumps({"job_id": sid, "submission_id": sid}))


@pytest.fixture
def job_api(request: pytest.FixtureRequest) -> Iterator[FakeJobApi]:
    server = FakeJobApi(**getattr(request, "param", {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Short pauses between tries; temporary folders (the staging one) under the returned folder."""
    monkeypatch.setattr(jobs, "AGENT_FIRST_DELAY_S", 0.1)
    monkeypatch.setattr(jobs, "AGENT_MAX_DELAY_S", 0.4)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    return temp


@pytest.mark.parametrize("job_api", [{"no_agent": 3}], indirect=True)
def test_submission_waits_for_the_job_agent_and_uploads_only_the_job_files(
    job_api: FakeJobApi, quick_backoff: Path, tmp_path: Path
) -> None:
    root = make_project(tmp_path / "project", git=True)
    lines: list[str] = []
    job_id, code = jobs.submit_and_follow(job_api.address, ["sweep", "run", "demo"], env={}, follow=False,
                                          out=lines.append, name="demo", root=root)
    assert code == 0 and job_id.startswith("cpews-demo-")
    assert len(job_api.submissions) == 4  # three "no agent" answers, then accepted
    assert [line for line in lines if "job agent" in line] == [
        "the cluster's job agent is not up yet (No available agent to submit job); retrying for up to 60 s"]
    assert f"uploading 6 files, 0.0 MB from {root} as the job's working directory" in lines
    (package,) = job_api.packages.values()
    names = sorted(n for n in zipfile.ZipFile(io.BytesIO(package)).namelist() if not n.endswith("/"))
    assert names == jobs.job_files(root)  # the 3 MB venv/, data/ and the notes stayed home
    working_dir = job_api.submissions[-1]["runtime_env"]["working_dir"]
    assert working_dir.startswith("gcs://_ray_pkg_") and f"/api/packages/gcs/{working_dir[6:]}" in job_api.packages
    assert list(quick_backoff.iterdir()) == []  # the staging folder is gone


@pytest.mark.parametrize(
    ("job_api", "wait_s", "submissions", "needle"),
    [({"no_agent": 100}, 1.0, range(3, 10), "still has no job agent after 1 s: Request failed with status code 500"),
     ({"refusal": (400, "Job with submission_id x already exists")}, 60.0, [1], "refused the job: Request failed "
      "with status code 400: Job with submission_id x already exists")],
    indirect=["job_api"],
)
def test_a_submission_that_stays_refused_is_a_one_line_error(
    job_api: FakeJobApi, quick_backoff: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait_s, submissions,
    needle
) -> None:
    monkeypatch.setattr(jobs, "AGENT_WAIT_S", wait_s)
    root = make_project(tmp_path / "project", git=True)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"^the Ray job API at {job_api.address} ") as caught:
        jobs.submit_and_follow(job_api.address, ["sweep", "run", "demo"], env={}, follow=False, out=print,
                               root=root)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    assert len(job_api.submissions) in submissions
    assert time.monotonic() - started < wait_s + 5
    assert list(quick_backoff.iterdir()) == []


@pytest.fixture(scope="module")
def cluster(synthetic_data_dir: Path) -> Iterator[dict]:
    # the nodes' `python` (a job's entrypoint) is this environment's, as on a cluster set up with the project
    from orchestration.services import free_port

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    port, dashboard = free_port(), free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    "--include-dashboard=true", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    worker = subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                               "--num-cpus=1", "--block"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        nodes = json.loads(subprocess.run([sys.executable, "-c", NODES_SCRIPT, f"127.0.0.1:{port}"], env=env,
                                          capture_output=True, text=True, check=True, timeout=150).stdout)
        assert len(nodes) == 2, nodes
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "worker": worker,
               "worker_id": next(n["id"] for n in nodes if not n["head"]),
               "head_id": next(n["id"] for n in nodes if n["head"])}
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def sweep_file(tmp_path: Path, name: str, **fixed) -> Path:
    from orchestration.search_space import load_sweep, smoke

    data = smoke(load_sweep("demo", check_paths=False)).to_dict()
    data.update(name=name, tracking={"experiment": name})
    data["search"].update(num_trials=2, max_concurrent=2)
    data["scheduler"]["type"] = "fifo"
    data["fixed"].update(fixed)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cpews(*args, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def board(name: str, run_dir: Path, env: dict) -> list[dict]:
    """The trials of `cpews sweep leaderboard NAME --json` (the object leaderboard.json holds), best first."""
    return json.loads(cpews("sweep", "leaderboard", name, "--json", "--run-dir", run_dir, env=env).stdout)["trials"]


@pytest.mark.integration
@pytest.mark.ray
def test_sweep_submitted_as_a_ray_job_runs_on_both_nodes(cluster: dict, tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    run_dir = tmp_path / "shared-runs"
    proc = cpews("sweep", "run", sweep_file(tmp_path, "cluster"), "--address", cluster["address"],
                 "--run-dir", run_dir, env=cluster["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "leaderboard of sweep cluster" in proc.stdout  # the job's log, followed
    assert "SUCCEEDED" in proc.stdout

    rows = board("cluster", run_dir, cluster["env"])
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert {node for r in rows for node in r["nodes"]} == {cluster["head_id"], cluster["worker_id"]}

    status = cpews("sweep", "status", "--address", cluster["address"], "--json", env=cluster["env"])
    jobs = json.loads(status.stdout)
    assert jobs[0]["name"] == "cluster" and jobs[0]["status"] == "SUCCEEDED"
    logs = JobSubmissionClient(cluster["address"]).get_job_logs(jobs[0]["job_id"])
    assert "sweep cluster finished" in logs


@pytest.mark.integration
@pytest.mark.ray
def test_a_worker_node_dying_mid_trial_costs_a_retry_from_the_checkpoint(cluster: dict, tmp_path: Path) -> None:
    """The worker node is killed once its trial has checkpointed; Tune retries the trial on the head from that
    checkpoint and the sweep completes."""
    from ray.job_submission import JobSubmissionClient

    run_dir = tmp_path / "shared-runs"
    path = sweep_file(tmp_path, "node-death", **{"optim.max_iters": 40, "train.checkpoint_every": 10,
                                                "proto.build_iter": 20})
    proc = cpews("sweep", "run", path, "--address", cluster["address"], "--run-dir", run_dir, "--no-follow",
                 env=cluster["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.split("submitted Ray job ")[1].split()[0]
    tune_dir = run_dir / "sweeps" / "node-death" / "tune"

    def worker_trial_checkpointed() -> str | None:
        for state in tune_dir.glob("trial_*/checkpoint_*/trial_state.json"):
            with_nodes = json.loads(state.read_text())
            if with_nodes.get("nodes", [None])[0] == cluster["worker_id"]:
                return state.parts[-3].removeprefix("trial_")
        return None

    deadline = time.monotonic() + 300
    trial = None
    while trial is None and time.monotonic() < deadline:
        trial = worker_trial_checkpointed()
        time.sleep(0.2)
    assert trial is not None, "no trial checkpointed on the worker node"
    os.killpg(cluster["worker"].pid, signal.SIGKILL)  # the node's raylet and its workers die

    client = JobSubmissionClient(cluster["address"])
    while time.monotonic() < deadline and client.get_job_status(job_id).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
    assert client.get_job_status(job_id).value == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    rows = {r["trial"]: r for r in board("node-death", run_dir, cluster["env"])}
    assert [r["status"] for r in rows.values()] == ["completed", "completed"]
    assert rows[trial]["nodes"] == [cluster["worker_id"], cluster["head_id"]]
    started = (run_dir / "sweeps" / "node-death" / "trials" / trial / "folds_started.log").read_text().split("\n")
    resumed = [line for line in started[1:] if line and line.split()[1] != "0"]
    assert resumed, started  # the retry continued a fold from a checkpoint, not from iteration 0

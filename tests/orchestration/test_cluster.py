"""A multi-node Ray cluster on this machine (a head and a worker started with `ray start`, one CPU each): a micro
sweep submitted as a Ray Job runs trials on both nodes; a worker node that dies mid-trial costs a retry only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.ray]

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
    return json.loads(cpews("sweep", "leaderboard", name, "--json", "--run-dir", run_dir, env=env).stdout)


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

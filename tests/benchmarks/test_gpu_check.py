"""benchmarks/gpu_check.sh without CUDA: the CPU dry run of the GPU check's code with tiny sizes, a real process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEP_VARIANTS = {"cpews", "plain", "cpews fused AdamW", "plain fused AdamW", "cpews SDPA off"}

pytestmark = pytest.mark.gpu_check


def run_check(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The wrapper script with CUDA hidden, as on a machine without a GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_without_cuda_reports_every_section_and_exits_0(tmp_path):
    report_file = tmp_path / "report.json"
    # the compiled variants take a minute to compile on a CPU: the dry run in the suite leaves them out
    done = run_check("--no-compile", "--json-out", str(report_file))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.startswith("gpu_check: CUDA is not available: a CPU dry run")
    report = json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the JSON report
    assert report == json.loads(report_file.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu" and report["errors"] == {}
    assert "torch.compile (--no-compile)" in report["skipped"]

    # the training step: every variant ran and its figures are consistent (batch 2 of the dry run)
    steps = report["steps"]
    assert set(steps) == STEP_VARIANTS
    for row in steps.values():
        assert row["step_ms"] > 0 and row["peak_mem_gib"] is None  # no CUDA: no device memory
        assert row["images_per_s"] == pytest.approx(2 / (row["step_ms"] / 1000))
    assert report["ratio_cpews_to_plain"] == pytest.approx(steps["cpews"]["step_ms"] / steps["plain"]["step_ms"])
    assert report["syncs_per_step"] is None

    # the pool build of 8 images, extrapolated to VOC's 10,582
    pool = report["pool"]
    assert pool["images"] == 8 and pool["views"] == 6 and pool["resize"] == 48
    assert pool["forward_s_for_10582"] == pytest.approx(pool["forward_s"] / 8 * 10582)
    # k-means against scikit-learn: both sets, and the same quality of clustering within a few per cent
    kmeans = {name: row for name, row in report["kmeans"].items() if isinstance(row, dict)}
    assert len(kmeans) == 2
    for row in kmeans.values():
        assert 0.95 < row["inertia_ratio_mean"] < 1.05
        assert row["speedup"] == pytest.approx(row["sklearn_s"] / row["ours_s"])
    # the three evaluation protocols, 4 images each
    protocols = {name: row for name, row in report["eval"].items() if isinstance(row, dict)}
    assert len(protocols) == 3 and all(row["images"] == 4 for row in protocols.values())
    # the GPU sweep file is valid: 2 trials at once, half a GPU each; it is not started without CUDA
    assert report["sweep"] == {"file_valid": True, "trials": 2, "gpu_per_trial": 0.5, "max_concurrent": 2}
    # the targets are shown but not judged on a dry run
    assert {row["verdict"] for row in report["targets"].values()} == {"n/a (dry run)"}
    assert "training step" in done.stdout and "targets:" in done.stdout


def test_a_bad_override_is_one_error_line_and_exit_2():
    done = run_check("--set", "train.batch_size=0", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["gpu_check: error: --set: train.batch_size=0 is outside the valid range >= 1"]
    assert done.stdout == ""

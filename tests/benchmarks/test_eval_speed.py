"""benchmarks/eval_speed.py at a tiny size: its JSON line, and the scores it times are evaluate's."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpews.evaluation import evaluate

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_speed.py"
TINY = ["--config", "test_micro", "--set", "data.synthetic_train=32", "--set", "data.synthetic_val=8",
        "--images", "5", "--repeats", "1", "--batch-size", "2"]


def load_script():
    spec = importlib.util.spec_from_file_location("eval_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # CPEWS_DATA_DIR: the session's micro dataset (conftest)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_tiny_run_prints_each_protocol_and_scores_what_evaluate_scores(synthetic_data_dir):
    pytest.importorskip("pydensecrf.densecrf")
    proc = _run(*TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: only the JSON line
    summary = json.loads(lines[0])
    assert summary["images"] == 5 and summary["repeats"] == 1 and summary["threads"] == 1
    assert list(summary["protocols"]) == ["seg", "seg_msf", "seg_crf"]
    for figures in summary["protocols"].values():
        assert figures["seconds"] > 0
        assert figures["images_per_s"] == pytest.approx(5 / figures["seconds"], rel=0.01)
    assert summary["total_seconds"] == pytest.approx(sum(f["seconds"] for f in summary["protocols"].values()),
                                                     abs=1e-3)
    # the same model (seed 0) and images scored here give the mIoUs the script reports
    script = load_script()
    args = argparse.Namespace(checkpoint="", images=5, config="test_micro",
                              overrides=["data.synthetic_train=32", "data.synthetic_val=8"])
    model, cfg, names, root, dataset = script.build(args, torch.device("cpu"))
    for name, options in script.PROTOCOLS.items():
        result = evaluate(model, dataset, cfg, class_names=names, max_images=5, data_root=root, **options)
        assert summary["protocols"][name]["miou"] == pytest.approx(result.metrics[script.SCORE_KEYS[name]], abs=1e-6)


def test_table_and_unknown_protocol(synthetic_data_dir):
    proc = _run(*TINY, "--protocols", "seg")
    assert proc.returncode == 0, proc.stderr
    assert "single scale" in proc.stdout and "multi-scale" not in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["protocols"].keys() == {"seg"}
    proc = _run(*TINY, "--protocols", "seg,fast")
    assert proc.returncode == 2 and "unknown protocol(s) fast" in proc.stderr

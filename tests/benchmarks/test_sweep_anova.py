"""benchmarks/sweep_anova.py: the two-way ANOVA on a hand-computed table, and the script on a leaderboard file."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sweep_anova.py"


def load_script():
    spec = importlib.util.spec_from_file_location("sweep_anova", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_way_anova_by_hand():
    # table [[1, 2], [3, 5]]: grand mean 2.75; SS trials 2*(1.25^2 * 2) = 6.25, SS folds 2*(0.75^2 * 2) = 2.25,
    # SS total 8.75, residual 0.25 on 1 d.f.: F trials 25, F folds 9; for F(1, 1), P(F > x) = 1 - 2/pi atan(sqrt x)
    result = load_script().two_way_anova(np.array([[1.0, 2.0], [3.0, 5.0]]))
    assert result["ss_trials"] == pytest.approx(6.25) and result["ss_folds"] == pytest.approx(2.25)
    assert result["ss_residual"] == pytest.approx(0.25)
    assert result["f_trials"] == pytest.approx(25.0) and result["f_folds"] == pytest.approx(9.0)
    assert result["p_trials"] == pytest.approx(1 - 2 / math.pi * math.atan(5.0))
    assert result["p_folds"] == pytest.approx(1 - 2 / math.pi * math.atan(3.0))


def test_script_reads_a_leaderboard_and_refuses_too_few_trials(tmp_path):
    rows = [
        {"trial": "a", "status": "completed", "fold_scores": [0.40, 0.35, 0.38], "baseline_miou": 0.13},
        {"trial": "b", "status": "completed", "fold_scores": [0.30, 0.26, 0.29], "baseline_miou": 0.13},
        {"trial": "c", "status": "pruned", "fold_scores": [0.1], "baseline_miou": 0.13},
    ]
    path = tmp_path / "leaderboard.json"
    path.write_text(json.dumps({"sweep": "s", "objective": "cv/miou_seg_mean", "trials": rows}))
    proc = subprocess.run([sys.executable, SCRIPT, path, "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    assert summary["completed"] == 2 and summary["best_cv_miou"] == pytest.approx(0.37666, abs=1e-4)
    assert summary["min_ratio_to_baseline"] == pytest.approx(0.85 / 3 / 0.13)
    path.write_text(json.dumps({"sweep": "s", "trials": rows[:1]}))
    proc = subprocess.run([sys.executable, SCRIPT, path], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs 2 completed trials" in proc.stderr

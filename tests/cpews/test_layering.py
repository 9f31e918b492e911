"""`cpews` never imports ray, optuna or mlflow (design.md layering)."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "cpews",
    "cpews.config",
    "cpews.data",
    "cpews.model",
    "cpews.training",
    "cpews.evaluation",
    "cpews.cam",
    "cpews.losses",
    "cpews.refine",
    "cpews.metrics",
    "cpews.crf",
    "cpews.prototypes",
    "cpews.prototype_losses",
    "cpews.training.prototype_hooks",
]


def test_importing_cpews_loads_no_orchestration_stack():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'optuna', 'mlflow'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_orders_have_no_cycles():
    for first in ("cpews.training", "cpews.evaluation", "cpews.evaluation.infer", "cpews.training.trainer"):
        subprocess.run([sys.executable, "-c", f"import {first}"], check=True)

"""benchmarks/demo_folds.py: the configuration a fold trains (the trial's, then the overrides)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cpews.config import ConfigError
from orchestration.search_space import load_sweep

ROOT = Path(__file__).resolve().parents[2]
DEMO = load_sweep(ROOT / "search_spaces" / "demo.yaml", check_paths=False)


def _load():
    spec = importlib.util.spec_from_file_location("demo_folds", ROOT / "benchmarks" / "demo_folds.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_folds"] = module  # the fold processes unpickle their function by module name
    spec.loader.exec_module(module)
    return module


demo_folds = _load()


def test_without_params_a_fold_trains_the_base_point_as_the_sweeps_first_trial():
    assert demo_folds.fold_config(DEMO, {}, []) == DEMO.trial_config(DEMO.base_point())


def test_params_and_overrides_apply_in_that_order():
    params = {"proto.num_prototypes": 15, "optim.lr": 1.0e-3}
    cfg = demo_folds.fold_config(DEMO, params, ["optim.max_iters=700", "optim.lr=3e-4", "cam.scales=[1.0, 0.5]"])
    assert cfg.proto.num_prototypes == 15  # the searched value
    assert cfg.optim.max_iters == 700  # a fixed setting of the sweep, overridden
    assert cfg.optim.lr == pytest.approx(3e-4)  # the override wins over the searched value
    assert tuple(cfg.cam.scales) == (1.0, 0.5)
    assert cfg.train.batch_size == 8  # the rest is the sweep's fixed block


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="optim.no_such_key|no_such_key"):
        demo_folds.fold_config(DEMO, {}, ["optim.no_such_key=1"])

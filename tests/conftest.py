"""Shared fixtures: one small synthetic dataset per session and one micro training run.

The trainer finds the synthetic dataset through `CPEWS_DATA_DIR` (see `cpews.training.data.synthetic_root`);
the session fixture points it at a temporary folder, so every test (and every `python -m cpews` subprocess,
which inherits the environment) reads the same generated files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

# On a small shared machine a second busy process makes torch's intra-op thread pool spin: a micro training
# step then costs ~100x more with 2 threads than with 1. The micro model gains nothing from threads, so the
# tests (and, through the environment, their subprocesses) use one unless the caller chose otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The `test_micro` preset on a 32 + 8 image synthetic set, always on the CPU.
MICRO_OVERRIDES: tuple[str, ...] = ("data.synthetic_train=32", "data.synthetic_val=8", "train.device=cpu")
MICRO_TRAIN_IMAGES = 32
MICRO_VAL_IMAGES = 8


def micro_config(*overrides: str):
    """The `test_micro` preset with the shared dataset sizes, then `overrides` (`key=value` strings)."""
    from cpews.config import load_config

    return load_config("test_micro", (*MICRO_OVERRIDES, *overrides))


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point `CPEWS_DATA_DIR` at a session folder holding the micro synthetic dataset; restore it afterwards.

    Yields the dataset root itself (`<CPEWS_DATA_DIR>/synthetic-...`).
    """
    from cpews.training.data import DATA_DIR_ENV, resolve_data_root

    base = tmp_path_factory.mktemp("cpews_data")
    previous = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(base)
    try:
        yield resolve_data_root(micro_config())  # generates it on first use
    finally:
        if previous is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = previous


class TrainedRun(NamedTuple):
    cfg: object  # TrainConfig
    result: object  # TrainResult
    reports: list  # [(metrics, checkpoint_dir)] in the order the reporter received them
    out_dir: Path
    model: torch.nn.Module  # the trained model object (weights as saved in last.pt)


@pytest.fixture(scope="session")
def trained_run(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One `test_micro` run (6 iterations, log every 2, seg loss from it 3 on), shared read-only."""
    from cpews.training import TrainHooks, train

    cfg = micro_config()
    reports: list = []
    captured: dict = {}

    def keep_model(state) -> None:
        captured["model"] = state.model

    out_dir = tmp_path_factory.mktemp("trained_run") / "run"
    result = train(
        cfg,
        lambda metrics, checkpoint_dir: reports.append((dict(metrics), checkpoint_dir)),
        out_dir=out_dir,
        hooks=TrainHooks(after_step=(keep_model,)),
        progress=False,
    )
    return TrainedRun(cfg, result, reports, out_dir, captured["model"])


@pytest.fixture(scope="session")
def make_micro_config(synthetic_data_dir: Path):
    """`make_micro_config(*overrides)`: the micro config, with the session dataset in place."""
    return micro_config

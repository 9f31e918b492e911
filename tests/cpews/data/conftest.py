"""Fixtures for the data tests: a small synthetic dataset shared by the read-only tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpews.data.synthetic import generate_synthetic_dataset

SMALL_SYNTHETIC = {"seed": 3, "n_train": 60, "n_val": 20, "n_train_subset": 10}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60 + 20 image synthetic dataset shared by the read-only tests."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "dataset", **SMALL_SYNTHETIC)

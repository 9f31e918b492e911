"""benchmarks/token_grid_ceiling.py: the ideal token-grid prediction on hand-made masks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "token_grid_ceiling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("token_grid_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_mask_made_of_whole_patches_is_reproduced_exactly():
    grid_prediction = load_script().token_grid_prediction
    mask = torch.zeros(8, 8, dtype=torch.int64)
    mask[:4] = 2  # the top two 4x4 patches of a 2x2 grid
    mask[4:, 4:] = 1  # the bottom-right patch
    assert torch.equal(grid_prediction(mask, 2, 3), mask)


def test_a_stripe_thinner_than_a_patch_is_lost():
    grid_prediction = load_script().token_grid_prediction
    mask = torch.zeros(8, 8, dtype=torch.int64)
    mask[:, 3] = 1  # a one-pixel column: at most 1/4 of any 4x4 patch, so background wins every patch
    assert grid_prediction(mask, 2, 2).eq(0).all()
    assert torch.equal(grid_prediction(mask, 8, 2), mask)  # a grid as fine as the pixels keeps it

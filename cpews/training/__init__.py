"""Public training API: `train(cfg, reporter=None, out_dir=...) -> TrainResult` (with the prototype module's
hooks unless given others: see `cpews.training.default_hooks`)."""

from __future__ import annotations

from cpews.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from cpews.training.default_hooks import train
from cpews.training.step import LossTerm, StepContext
from cpews.training.trainer import (
    NonFiniteLossError,
    Reporter,
    TrainHooks,
    TrainResult,
    TrainState,
    build_optimizer,
    select_device,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LossTerm",
    "NonFiniteLossError",
    "Reporter",
    "StepContext",
    "TrainHooks",
    "TrainResult",
    "TrainState",
    "build_optimizer",
    "load_checkpoint",
    "save_checkpoint",
    "select_device",
    "train",
]

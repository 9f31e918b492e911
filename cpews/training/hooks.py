"""The trainer's extension points (`TrainHooks`) and what a hook sees (`TrainState`).

Kept apart from the loop (`cpews.training.trainer`) so that the prototype module's hooks
(`cpews.training.prototype_hooks`) and the backbone pretraining, which runs them too, need not import the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from cpews.config import TrainConfig
from cpews.model import CpewsNet
from cpews.training.step import LossTerm

__all__ = ["NO_HOOKS", "TrainHooks", "TrainState"]


class TrainState(NamedTuple):
    cfg: TrainConfig
    model: CpewsNet
    iteration: int  # optimizer steps taken so far
    data_root: Path
    train_ids: Sequence[str] | None
    out_dir: Path | None  # None: a run that writes no files (the backbone pretraining)


class TrainHooks(NamedTuple):
    """Extension points for the prototype module: extra loss terms, calls after optimizer steps, and calls
    before the first step of a fresh run (not on resume: a resumed model already holds what they set up)."""

    extra_terms: Sequence[LossTerm] = ()
    after_step: Sequence[Callable[[TrainState], None]] = ()
    before_training: Sequence[Callable[[TrainState], None]] = ()


NO_HOOKS = TrainHooks()

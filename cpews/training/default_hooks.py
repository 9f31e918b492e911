"""The public `train`: the trainer's loop with the prototype module's hooks composed in by default.

The loop (`cpews.training.trainer.train_loop`) runs the `TrainHooks` it is given; the Contextual Prototype
Module (`cpews.training.prototype_hooks`) builds its hooks on the types of `cpews.training.hooks`. Only this
module imports both, so the trainer does not import the prototype module and the imports among
`cpews/training/*.py` form no cycle (tests/cpews/test_layering.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cpews.config import TrainConfig
from cpews.training.data import class_names
from cpews.training.prototype_hooks import prototype_hooks
from cpews.training.trainer import Reporter, TrainHooks, TrainResult, train_loop


def default_hooks(cfg: TrainConfig) -> TrainHooks:
    """The Contextual Prototype Module's hooks (pool build, PDL, SSL) unless `proto.n_builds == 0`."""
    return prototype_hooks(cfg, class_names=class_names(cfg))


def train(
    cfg: TrainConfig,
    reporter: Reporter | None = None,
    *,
    out_dir: str | Path,
    resume: str | Path | None = None,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
    val_split: str | None = None,
    hooks: TrainHooks | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train CPEWS for `cfg.optim.max_iters` optimizer steps.

    Args:
        reporter: receives `(metrics, checkpoint_dir)` after logged steps, validations and checkpoints
            (default: validation lines on stdout).
        out_dir: receives `config.yaml`, `last.pt`, `metrics.json` and, while the run goes on, the newest
            `train.keep_checkpoints` periodic `iter_XXXXXXX.pt` checkpoints (deleted when it ends).
        resume: a checkpoint to continue from (model, optimizer, schedule position and RNG state).
        train_ids / val_ids: subsets of the train / validation split (cross-validation folds).
        val_split: the split validated on (default `cfg.data.val_split`).
        hooks: extra loss terms and calls around the loop (default: `default_hooks(cfg)`, the prototype
            module's unless `proto.n_builds` is 0).
        progress: force the progress bar on or off (default: on when stderr is a terminal).

    See `cpews.training.trainer.train_loop` for `TrainResult.timings`.
    """
    return train_loop(
        cfg,
        reporter,
        out_dir=out_dir,
        resume=resume,
        train_ids=train_ids,
        val_ids=val_ids,
        val_split=val_split,
        hooks=default_hooks(cfg) if hooks is None else hooks,
        progress=progress,
    )

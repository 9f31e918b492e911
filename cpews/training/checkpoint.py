"""Checkpoint files: model, optimizer, schedule position, RNG state and the flat config (torch.load weights_only)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cpews.config import ConfigError, TrainConfig

CHECKPOINT_FORMAT = "cpews-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file is not a readable cpews checkpoint."""


class Checkpoint(NamedTuple):
    cfg: TrainConfig
    iteration: int  # number of optimizer steps taken
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    class_names: list[str]
    metrics: dict[str, float]


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    cfg: TrainConfig,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    class_names: list[str],
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg.to_flat_dict(),
        "iteration": int(iteration),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "class_names": list(class_names),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def config_differences(saved: TrainConfig, wanted: TrainConfig, extra_keys: tuple[str, ...] = ()) -> list[str]:
    """`key: saved -> wanted` for every model setting (except `model.weights`) or extra key that differs.

    A checkpoint's weights only fit a model built from the same `model.*` settings.
    """
    a, b = saved.to_flat_dict(), wanted.to_flat_dict()
    keys = [k for k in b if k.startswith("model.") and k != "model.weights"] + list(extra_keys)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in keys if a[k] != b[k]]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint`; anything else is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a cpews checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a cpews checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {payload.get('version')!r}; this cpews reads {CHECKPOINT_VERSION}"
        )
    try:
        cfg = TrainConfig.from_flat_dict(payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: its config does not match this version: {exc}") from exc
    return Checkpoint(
        cfg=cfg,
        iteration=int(payload["iteration"]),
        model=payload["model"],
        optimizer=payload.get("optimizer"),
        rng=payload.get("rng", {}),
        class_names=list(payload.get("class_names", [])),
        metrics=dict(payload.get("metrics", {})),
    )


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

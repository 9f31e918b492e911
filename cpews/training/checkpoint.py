"""Checkpoint files: model, optimizer, schedule position, RNG state and the flat config (torch.load weights_only).

A run folder holds `last.pt` (the newest) and periodic `iter_XXXXXXX.pt` files. A resume whose checkpoint is
damaged falls back to the newest valid one of the same run (`newest_valid_checkpoint`), with a warning naming
the damaged file; a resume that may hold an older copy takes the furthest valid one (`furthest_valid_checkpoint`).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cpews.config import ConfigError, TrainConfig
from cpews.torch_files import TorchFileError, load_torch_file

CHECKPOINT_FORMAT = "cpews-checkpoint"
CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "last.pt"  # a run's newest checkpoint; the periodic ones are iter_XXXXXXX.pt


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
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))


def write_atomically(target: Path, write: Callable[[str], object]) -> Path:
    """Run `write(tmp)` on a temporary file beside `target`, then `os.replace` it onto `target`, so that `target`
    is never half-written (a crash leaves the old file or none, and at most a hidden `.NAME.*.tmp`)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def config_differences(saved: TrainConfig, wanted: TrainConfig, extra_keys: tuple[str, ...] = ()) -> list[str]:
    """`key: saved -> wanted` for every model setting (except `model.weights`) or extra key that differs.

    A checkpoint's weights only fit a model built from the same `model.*` settings.
    """
    a, b = saved.to_flat_dict(), wanted.to_flat_dict()
    keys = [k for k in b if k.startswith("model.") and k != "model.weights"] + list(extra_keys)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in keys if a[k] != b[k]]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint`; anything else is refused with a one-line `CheckpointError`
    that names the file and says why (missing, truncated, damaged, not a cpews checkpoint, ...)."""
    path = Path(path)
    try:
        payload = load_torch_file(path, map_location=map_location)
    except TorchFileError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc.reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a cpews checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {payload.get('version')!r}; this cpews reads {CHECKPOINT_VERSION}"
        )
    problem = _payload_problem(payload)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {problem}")
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


def _payload_problem(payload: dict[str, Any]) -> str | None:
    """What a marked checkpoint payload lacks (config, iteration, a state dict of tensors), or None."""
    if not isinstance(payload.get("config"), dict):
        return "no config"
    if not isinstance(payload.get("iteration"), int) or payload["iteration"] < 0:
        return f"iteration {payload.get('iteration')!r} is not a step count"
    model = payload.get("model")
    if not isinstance(model, dict) or not model or not all(torch.is_tensor(v) for v in model.values()):
        return "no model state dict of tensors"
    if payload.get("optimizer") is not None and not isinstance(payload["optimizer"], dict):
        return "the optimizer state is not a dict"
    return None


# ------------------------------------------------------------------------------------------------------------
# Resuming: the newest valid checkpoint of a run.
# ------------------------------------------------------------------------------------------------------------


def warn(message: str) -> None:
    """One warning line on stderr (a trial's log under Ray)."""
    print(f"cpews: warning: {message}", file=sys.stderr, flush=True)


def checkpoint_step(path: str | Path) -> int | None:
    """The step count in a periodic checkpoint's name (`iter_0000060.pt` -> 60); None for any other name."""
    match = re.fullmatch(r"iter_(\d+)\.pt", Path(path).name)
    return int(match.group(1)) if match else None


def run_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints `train` wrote in `folder`, newest first: `last.pt`, then `iter_XXXXXXX.pt` by descending step."""
    folder = Path(folder)
    periodic = sorted(
        (p for p in folder.glob("iter_*.pt") if checkpoint_step(p) is not None),
        key=lambda p: checkpoint_step(p) or 0,
        reverse=True,
    )
    return ([folder / LAST_CHECKPOINT] if (folder / LAST_CHECKPOINT).is_file() else []) + periodic


def resume_candidates(path: str | Path) -> list[Path]:
    """`path`, then the older checkpoints of the same run (its folder) to fall back to when it is damaged.

    `last.pt` falls back to every `iter_XXXXXXX.pt` beside it, `iter_0000060.pt` to those of fewer steps; a file
    of any other name has no fallback (nothing says which run it belongs to).
    """
    path = Path(path)
    step = checkpoint_step(path)
    if path.name == LAST_CHECKPOINT:
        older = [p for p in run_checkpoints(path.parent) if p.name != LAST_CHECKPOINT]
    elif step is not None:
        older = [p for p in run_checkpoints(path.parent) if (checkpoint_step(p) or step) < step]
    else:
        older = []
    return [path, *older]


class ValidCheckpoint(NamedTuple):
    path: Path  # the file loaded
    checkpoint: Checkpoint
    damaged: list[str]  # why each candidate tried before it did not load (CheckpointError messages)


def newest_valid_checkpoint(
    candidates: Sequence[str | Path], map_location: str | torch.device = "cpu"
) -> ValidCheckpoint:
    """The first candidate if it loads; else, of the others, the loadable one with the most steps taken.

    The others are tried in the order given (newest first, as `run_checkpoints` lists them); a periodic checkpoint
    (`iter_XXXXXXX.pt`) is not read once a loaded one has at least its steps. A fallback is announced by one
    warning line naming the damaged file(s) and the checkpoint used instead.

    Raises:
        CheckpointError: the first candidate does not exist, or no candidate loads; the message names the first
            candidate and why it failed.
    """
    paths = [Path(p) for p in candidates]
    if not paths:
        raise CheckpointError("no checkpoint to resume from")
    if not paths[0].is_file():  # a wrong path, not a damaged file: nothing to fall back from
        raise CheckpointError(f"checkpoint {str(paths[0])!r}: no such file")
    try:
        return ValidCheckpoint(paths[0], load_checkpoint(paths[0], map_location), [])
    except CheckpointError as exc:
        return _furthest_loadable(paths[1:], [str(exc)], len(paths), map_location)


def furthest_valid_checkpoint(
    candidates: Sequence[str | Path], map_location: str | torch.device = "cpu"
) -> ValidCheckpoint:
    """Of `candidates`, the loadable checkpoint with the most steps taken; of equals, the first listed.

    Unlike `newest_valid_checkpoint`, the first candidate is not preferred: a run's own files (`run_checkpoints`)
    can be further on than a copy of one of them kept elsewhere (a sweep's Tune checkpoint). A periodic checkpoint
    (`iter_XXXXXXX.pt`) is not read once a loaded one has at least its steps. When a candidate that was read does
    not load, one warning line names it (and any other) and the checkpoint used instead.

    Raises:
        CheckpointError: no candidate is given, or none loads; the message names the first and why it failed.
    """
    paths = [Path(p) for p in candidates]
    if not paths:
        raise CheckpointError("no checkpoint to resume from")
    return _furthest_loadable(paths, [], len(paths), map_location)


def _furthest_loadable(
    paths: Sequence[Path], damaged: list[str], tried: int, map_location: str | torch.device
) -> ValidCheckpoint:
    """Of `paths`, the loadable checkpoint with the most steps (of equals, the first); a periodic checkpoint is
    not read once a loaded one has at least its steps. `damaged` holds the failures of candidates already tried
    (`tried` candidates in all); a fallback from any of them is announced by one warning line.

    Raises:
        CheckpointError: none loads; names the first failure.
    """
    best: tuple[Path, Checkpoint] | None = None
    for path in paths:
        step = checkpoint_step(path)
        if best is not None and step is not None and step <= best[1].iteration:
            continue
        try:
            checkpoint = load_checkpoint(path, map_location)
        except CheckpointError as exc:
            damaged.append(str(exc))
            continue
        if best is None or checkpoint.iteration > best[1].iteration:
            best = (path, checkpoint)
    if best is None:
        either = f"; no valid older checkpoint either ({tried - 1} tried)" if tried > 1 else ""
        raise CheckpointError(f"{damaged[0]}{either}")
    if damaged:
        also = f" (also unusable: {'; '.join(damaged[1:])})" if len(damaged) > 1 else ""
        warn(f"{damaged[0]}; resuming from the newest valid checkpoint {str(best[0])!r} (step {best[1].iteration}) "
             f"instead{also}")
    return ValidCheckpoint(best[0], best[1], damaged)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

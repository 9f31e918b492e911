"""The training device and its autocast (bf16 on CUDA only)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from cpews.config import TrainConfig


def select_device(name: str) -> torch.device:
    """`train.device`: "auto" = CUDA when available, else the CPU; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    return device


def autocast_factory(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory: bf16 autocast when `train.amp=bf16` on CUDA, else a no-op."""
    if cfg.train.amp == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext

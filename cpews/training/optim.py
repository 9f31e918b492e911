"""PolyWarmupAdamW (method.md §8.3): AdamW with four parameter groups and a linear-warm-up + poly schedule."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cpews.config import TrainConfig


def lr_factor(step: int, *, warmup_iters: int, warmup_ratio: float, max_iters: int, power: float) -> float:
    """Multiplier of each group's base lr at optimizer step `step` (0-based).

    `1 - (1 - s/S_w)(1 - rho)` during warm-up, `(1 - s/S_max)^power` after it; the poly phase is not shifted
    by the warm-up (ToCo), so the factor drops from ~1.0 to ~0.93 at s = S_w on the VOC schedule.
    """
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return max(0.0, 1.0 - step / max_iters) ** power


class PolyWarmupAdamW(torch.optim.AdamW):
    """AdamW whose `step()` first sets every group's lr to `base_lr * lr_factor(self.global_step)`."""

    def __init__(
        self,
        param_groups: Iterable[dict],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        warmup_iters: int,
        warmup_ratio: float,
        max_iters: int,
        power: float,
    ) -> None:
        groups = [dict(g) for g in param_groups]
        for group in groups:
            group.setdefault("base_lr", group.get("lr", lr))
            group["lr"] = group["base_lr"]
        super().__init__(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        self.schedule = {
            "warmup_iters": warmup_iters,
            "warmup_ratio": warmup_ratio,
            "max_iters": max_iters,
            "power": power,
        }
        self.global_step = 0

    def current_factor(self) -> float:
        return lr_factor(self.global_step, **self.schedule)

    @torch.no_grad()
    def step(self, closure=None):
        factor = self.current_factor()
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["global_step"] = self.global_step
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.global_step = int(state_dict.pop("global_step", 0))
        super().load_state_dict(state_dict)


def parameter_groups(model: nn.Module, *, lr: float, head_lr_mult: float) -> list[dict]:
    """The four §8.3 groups: backbone non-norm, backbone norm (lr), classifiers, decoder (lr * head_lr_mult).

    Parameters that do not require a gradient (the frozen positional embedding) are left out.
    """
    backbone, backbone_norm, heads, decoder = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            (backbone_norm if "norm" in name else backbone).append(param)
        elif name.startswith("decoder."):
            decoder.append(param)
        else:
            heads.append(param)
    groups = [
        {"name": "backbone", "params": backbone, "base_lr": lr},
        {"name": "backbone_norm", "params": backbone_norm, "base_lr": lr},
        {"name": "heads", "params": heads, "base_lr": lr * head_lr_mult},
        {"name": "decoder", "params": decoder, "base_lr": lr * head_lr_mult},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> PolyWarmupAdamW:
    """The §8.3 optimizer of `model` with the `optim.*` settings of `cfg`."""
    o = cfg.optim
    return PolyWarmupAdamW(
        parameter_groups(model, lr=o.lr, head_lr_mult=o.head_lr_mult),
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        warmup_iters=o.warmup_iters,
        warmup_ratio=o.warmup_ratio,
        max_iters=o.max_iters,
        power=o.power,
    )

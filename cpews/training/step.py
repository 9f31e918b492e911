"""One training step's losses (method.md §8.1-§8.2): the loss dict, the weights applied in one place.

Extra loss terms (the prototype losses of the Contextual Prototype Module) plug in as `LossTerm`s: callables
that receive the step's `StepContext` and return an unweighted scalar, with their weight from the config.

Data parallel (`cpews.training.distributed`): each process computes the terms on its slice of the global batch,
and every term returns its process's share of the global-batch mean (`StepContext.split.share`), so that the
shares sum over the processes to the loss of the whole batch. In a single process a share is the term itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from cpews.cam import CamPair, affinity_targets, ism_token_labels, multiscale_cams
from cpews.config import TrainConfig
from cpews.losses import classification_loss, ism_loss, segmentation_loss
from cpews.model import CpewsNet, CpewsOutput
from cpews.refine import images_for_par, refine_pseudo_labels
from cpews.training.distributed import WHOLE_BATCH, BatchSplit

IGNORE_INDEX = 255  # the ignore label of affinities and pseudo labels (the losses' default)


@dataclass
class StepContext:
    """What a loss term may look at: the batch, the gradient forward, the no-grad multi-scale CAMs."""

    cfg: TrainConfig
    iteration: int
    model: CpewsNet
    images: Tensor  # (B, 3, H, W) normalized crops
    labels: Tensor  # (B, C) multi-hot
    boxes: Tensor  # (B, 4) valid box (r0, r1, c0, c1) in crop pixels
    output: CpewsOutput
    cams: CamPair | None  # (B, C, H, W) multi-scale CAMs, None when no term needs them
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached diagnostics a term records, as train/<name>
    split: BatchSplit = WHOLE_BATCH  # this process's share of the global batch's means (data parallel)


class LossTerm(NamedTuple):
    name: str  # reported as train/loss_<name>
    weight: Callable[[TrainConfig, int], float]  # weight at an iteration; 0 = inactive (not computed)
    compute: Callable[[StepContext], Tensor]  # unweighted scalar


class StepLosses(NamedTuple):
    total: Tensor  # () weighted sum
    terms: dict[str, Tensor]  # unweighted terms that were computed, by name
    weights: dict[str, float]
    output: CpewsOutput
    stats: dict[str, Tensor]  # what the terms recorded in StepContext.stats (detached 0-dim; NaN = undefined)


def ism_weight(cfg: TrainConfig, it: int) -> float:
    return cfg.loss.ism_weight if it > cfg.loss.ism_warmup_iters else 0.0


def seg_weight(cfg: TrainConfig, it: int) -> float:
    return cfg.loss.seg_weight if it > cfg.loss.seg_warmup_iters else 0.0


def ism_term(ctx: StepContext) -> Tensor:
    """§3: token labels from the aux CAM, affinity targets, contrast on the final tokens."""
    cfg = ctx.cfg
    grid = tuple(ctx.output.tokens.shape[-2:])
    token_labels = ism_token_labels(
        ctx.cams.aux_cams,
        ctx.boxes,
        ctx.model.patch_size,
        grid,
        high=cfg.cam.high_threshold,
        low=cfg.cam.low_threshold,
        box_mode=cfg.cam.ism_box_mode,
    )
    tokens, affinity = ctx.output.tokens.float(), affinity_targets(token_labels, IGNORE_INDEX)
    if ctx.split.size == 1:
        return ism_loss(tokens, affinity, IGNORE_INDEX)
    # L = 0.5 (1 - P / (|P| + 1)) + 0.5 Q / (|Q| + 1) over the global batch: each half with its own count
    positive = ism_loss(tokens, affinity.masked_fill(affinity == 0, IGNORE_INDEX), IGNORE_INDEX)  # 0.5 (1 - P/..)
    negative = ism_loss(tokens, affinity.masked_fill(affinity == 1, IGNORE_INDEX), IGNORE_INDEX)  # 0.5 (1 + Q/..)
    positive_term = ctx.split.share(1 - 2 * positive, (affinity == 1).sum(), plus_one=True)
    negative_term = ctx.split.share(2 * negative - 1, (affinity == 0).sum(), plus_one=True)
    return 0.5 * (1 / ctx.split.size - positive_term) + 0.5 * negative_term


def seg_pseudo_labels(ctx: StepContext) -> Tensor:
    """§4.3 refined pseudo labels (B, H, W) from the final CAM (or the aux CAM early in COCO's schedule)."""
    cfg = ctx.cfg
    source = ctx.cams.aux_cams if ctx.iteration <= cfg.loss.seg_aux_label_iters else ctx.cams.cams
    r = cfg.refine
    par_images = images_for_par(ctx.images, cfg.data.norm_mean, cfg.data.norm_std, downscale=r.downscale)
    return refine_pseudo_labels(
        source,
        ctx.labels,
        par_images,
        ctx.boxes,
        high=cfg.cam.high_threshold,
        low=cfg.cam.low_threshold,
        downscale=r.downscale,
        dilations=r.dilations,
        iters=r.iters,
        w1=r.w1,
        w2=r.w2,
    )


def seg_term(ctx: StepContext) -> Tensor:
    """§5: balanced CE of the upsampled decoder logits against the refined pseudo label."""
    labels = seg_pseudo_labels(ctx)
    logits = F.interpolate(ctx.output.seg_logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if ctx.split.size == 1:
        return segmentation_loss(logits, labels, IGNORE_INDEX)
    # 0.5 (mean over background pixels + mean over foreground pixels) of the global batch: each with its count
    labels = labels.long()
    background = labels == 0
    foreground = (labels != 0) & (labels != IGNORE_INDEX)
    background_loss = segmentation_loss(logits, labels.masked_fill(~background, IGNORE_INDEX), IGNORE_INDEX)
    foreground_loss = segmentation_loss(logits, labels.masked_fill(~foreground, IGNORE_INDEX), IGNORE_INDEX)
    return ctx.split.share(background_loss, background.sum()) + ctx.split.share(foreground_loss, foreground.sum())


BASE_TERMS: tuple[LossTerm, ...] = (
    LossTerm("ism", ism_weight, ism_term),
    LossTerm("seg", seg_weight, seg_term),
)


def compute_losses(
    model: CpewsNet,
    batch: dict[str, Tensor],
    cfg: TrainConfig,
    iteration: int,
    *,
    extra_terms: Sequence[LossTerm] = (),
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    split: BatchSplit = WHOLE_BATCH,
) -> StepLosses:
    """Forward the batch and return the weighted total with every active term (§8.2 steps 1-3).

    With a data-parallel `split`, `batch` is this process's slice and the terms (and the total) are its shares
    of the global batch's losses (see the module docstring).
    """
    images, labels, boxes = batch["image"], batch["labels"], batch["box"]
    terms_active = [(t, t.weight(cfg, iteration)) for t in (*BASE_TERMS, *extra_terms)]
    terms_active = [(t, w) for t, w in terms_active if w != 0.0]
    with autocast():
        cams = None
        if terms_active:
            cams = multiscale_cams(model.cam_logits, images, labels, cfg.cam.scales)
            cams = CamPair(cams.cams.float(), cams.aux_cams.float())
        output = model(images)
    terms = {
        "cls": split.share(classification_loss(output.logits.float(), labels), labels.numel()),
        "cls_aux": split.share(classification_loss(output.aux_logits.float(), labels), labels.numel()),
    }
    weights = {"cls": cfg.loss.cls_weight, "cls_aux": cfg.loss.aux_cls_weight}
    ctx = StepContext(cfg, iteration, model, images, labels, boxes, output, cams, split=split)
    for term, weight in terms_active:
        terms[term.name] = term.compute(ctx)
        weights[term.name] = weight
    total = sum(weights[name] * value for name, value in terms.items())
    return StepLosses(total, terms, weights, output, ctx.stats)


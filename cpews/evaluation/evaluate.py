"""Evaluation (method.md §9): mIoU of CAM, aux CAM, refined pseudo label and segmentation.

CAMs and pseudo labels are computed at the in-training size (`eval.size`, §9.2) and their score maps are
resized to the label size; the segmentation is either single scale at that size (in training) or the final
protocol of §9.3 on the original image (multi-scale + flip, optional dense CRF).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cpews.cam import cams_to_labels, multiscale_cams, rescale_images
from cpews.config import TrainConfig
from cpews.crf import dense_crf
from cpews.metrics import (
    ConfusionMeter,
    all_background_confusion,
    confusion_matrix,
    multilabel_f1,
    segmentation_scores,
)
from cpews.model import CpewsNet, CpewsOutput
from cpews.refine import images_for_par, refine_pseudo_labels

SCORE_NAMES = ("cam", "aux_cam", "pseudo", "seg")


class EvalResult(NamedTuple):
    # miou_cam, miou_aux_cam, miou_pseudo, miou_seg, f1, ... (fractions); baseline_miou = the mIoU of predicting
    # background everywhere on the same images (the floor every miou_* must beat)
    metrics: dict[str, float]
    per_class: list[dict[str, object]]  # one row per class: name and IoU of each score
    # with `evaluate(..., per_image=True)`: {"ids": [...], "miou_<score>": [one mIoU per image], ...,
    # "baseline_miou": [the all-background mIoU of each image]}
    per_image: dict[str, list] | None = None


def image_miou(pred: Tensor, gt: Tensor, num_classes: int) -> float:
    """The mIoU of one image (§9.1 on its own confusion matrix: mean over the classes in its ground truth).

    Shapes: pred, gt (H, W) labels; 255 = ignore.
    """
    return float(segmentation_scores(confusion_matrix(pred, gt, num_classes)).miou)


def segmentation_probabilities(
    model: CpewsNet, image: Tensor, scales: Sequence[float], out_size: tuple[int, int]
) -> Tensor:
    """§9.3: per scale, sum of plain and un-flipped flip logits; max over scales; softmax.

    Shapes: image (1, 3, H, W) -> (C + 1, *out_size) probabilities.
    """
    merged = None
    for scale in scales:
        x = rescale_images(image, scale)
        logits = model(torch.cat([x, x.flip(-1)])).seg_logits.float()
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        summed = logits[0] + logits[1].flip(-1)
        merged = summed if merged is None else torch.maximum(merged, summed)
    return merged.softmax(dim=0)


def _resize_scores(scores: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def _resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


class ConfounderStats:
    """False activation of the confounded class on its background texture (synthetic dataset only).

    pixel rate: fraction of texture pixels labelled as the confounded class;
    image bias: fraction of images that show the texture but not the class whose logit for it is > 0.
    """

    def __init__(self, confounded_label: int) -> None:
        self.label = confounded_label
        self.texture_pixels = 0
        self.false_pixels: dict[str, int] = dict.fromkeys(SCORE_NAMES, 0)
        self.texture_only_images = 0
        self.biased_images = 0

    def update(self, texture: Tensor, predictions: dict[str, Tensor], labels: Tensor, logits: Tensor) -> None:
        mask = texture.bool()
        self.texture_pixels += int(mask.sum())
        for name, pred in predictions.items():
            self.false_pixels[name] += int(((pred == self.label) & mask).sum())
        if mask.any() and labels[self.label - 1] == 0:
            self.texture_only_images += 1
            self.biased_images += int(logits[self.label - 1] > 0)

    def metrics(self) -> dict[str, float]:
        out = {}
        if self.texture_pixels:
            for name, count in self.false_pixels.items():
                out[f"confounder_false_activation_{name}"] = count / self.texture_pixels
            out["confounder_false_activation"] = out["confounder_false_activation_cam"]
        if self.texture_only_images:
            out["confounder_image_bias"] = self.biased_images / self.texture_only_images
        return out


def confounded_label(root: Path | None) -> int | None:
    """The label value of the synthetic dataset's confounded class (from its meta.json), else None."""
    if root is None or not (Path(root) / "meta.json").is_file():
        return None
    value = json.loads((Path(root) / "meta.json").read_text()).get("confounded_class")
    return int(value) if value is not None else None


@torch.no_grad()
def predict_label_maps(
    model: CpewsNet,
    samples: Sequence[dict[str, Tensor | str]],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    *,
    final_protocol: bool = False,
    crf: bool = False,
) -> tuple[CpewsOutput, list[dict[str, Tensor]]]:
    """Label maps of one batch of EvalDataset items at each item's mask size; the model's mode is left as is.

    CAMs and pseudo labels come from the images resized to `eval.size` (§9.2); the segmentation is single
    scale at that size, or §9.3 on the item's own image when `final_protocol` or `crf` is set.

    Shapes (B items, C foreground classes, S = eval.size, item b with mask (H_b, W_b)):
        samples: items with "image" (3, H, W) normalised, "labels" (C,), "mask" (H_b, W_b); with `crf` also
            "rgb" (H, W, 3) uint8.
        returns: the model output for the (B, 3, S, S) batch (logits (B, C), seg_logits, ...) and per item
            a dict of (H_b, W_b) int64 label maps on `device`: "cam", "aux_cam", "seg" in 0..C, "pseudo" in
            0..C and 255 (ignore); with `crf` also "seg_crf".
    """
    e, c, r = cfg.eval, cfg.cam, cfg.refine
    labels = torch.stack([s["labels"] for s in samples]).to(device)
    fed = torch.cat([_resize_scores(s["image"][None].to(device), (e.size, e.size)) for s in samples])
    output = model(fed)
    cams = multiscale_cams(model.cam_logits, fed, labels, c.scales)
    par_images = images_for_par(fed, cfg.data.norm_mean, cfg.data.norm_std, downscale=r.downscale)
    pseudo = refine_pseudo_labels(
        cams.cams, labels, par_images, None, high=c.high_threshold, low=c.low_threshold,
        downscale=r.downscale, dilations=r.dilations, iters=r.iters, w1=r.w1, w2=r.w2,
    )
    maps = []
    for j, sample in enumerate(samples):
        size = tuple(sample["mask"].shape)
        predictions = {
            "cam": cams_to_labels(_resize_scores(cams.cams[j : j + 1], size), c.bkg_threshold)[0],
            "aux_cam": cams_to_labels(_resize_scores(cams.aux_cams[j : j + 1], size), c.bkg_threshold)[0],
            "pseudo": _resize_labels(pseudo[j : j + 1], size)[0],
        }
        if final_protocol or crf:
            image = sample["image"].to(device)[None]
            scales = e.test_scales if final_protocol else (1.0,)
            probs = segmentation_probabilities(model, image, scales, size)
        else:
            probs = _resize_scores(output.seg_logits[j : j + 1].float(), size)[0].softmax(dim=0)
        predictions["seg"] = probs.argmax(dim=0)
        if crf:
            predictions["seg_crf"] = _crf_labels(sample["rgb"], probs, size, cfg).to(device)
        maps.append(predictions)
    return output, maps


@torch.no_grad()
def evaluate(
    model: CpewsNet,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    *,
    class_names: Sequence[str],
    device: torch.device | str = "cpu",
    max_images: int = 0,
    final_protocol: bool = False,
    crf: bool = False,
    data_root: Path | None = None,
    batch_size: int = 16,
    per_image: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score the model on `dataset` (an EvalDataset).

    Args:
        final_protocol: segment with §9.3 (original size, `eval.test_scales`, flip sum, scale max) instead of
            single scale at `eval.size`.
        crf: apply the dense CRF (§9.4) to the segmentation probabilities (implies per-image work).
        per_image: also return each image's mIoU per score (`EvalResult.per_image`), e.g. for paired tests.
        progress: called after each batch with (images scored so far, images to score), e.g. to show a bar.

    `metrics["baseline_miou"]` is the mIoU of an all-background prediction on the same label maps, scored by the
    same code (`cpews.metrics.all_background_confusion`).
    """
    was_training = model.training
    model.eval()
    num_classes = len(class_names)
    meters = {name: ConfusionMeter(num_classes) for name in SCORE_NAMES}
    background = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # all-background prediction
    if crf:
        meters["seg_crf"] = ConfusionMeter(num_classes)
    label = confounded_label(data_root)
    confounder = ConfounderStats(label) if label is not None else None
    all_logits, all_labels = [], []
    images: dict[str, list] | None = {"ids": []} if per_image else None
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    for first in range(0, count, batch_size):
        samples = [dataset[i] for i in range(first, min(first + batch_size, count))]
        labels = torch.stack([s["labels"] for s in samples]).to(device)
        output, maps = predict_label_maps(model, samples, cfg, device, final_protocol=final_protocol, crf=crf)
        for j, (sample, predictions) in enumerate(zip(samples, maps)):
            mask = sample["mask"].to(device)
            for name, pred in predictions.items():
                meters[name].update(pred, mask)
            image_background = all_background_confusion(mask, num_classes).cpu()
            background += image_background
            if images is not None:
                images["ids"].append(str(sample.get("name", first + j)))
                for name, pred in predictions.items():
                    images.setdefault(f"miou_{name}", []).append(image_miou(pred, mask, num_classes))
                images.setdefault("baseline_miou", []).append(segmentation_scores(image_background).miou)
            if confounder is not None and "confounder_mask" in sample:
                confounder.update(
                    sample["confounder_mask"].to(device),
                    {k: v for k, v in predictions.items() if k in SCORE_NAMES},
                    labels[j],
                    output.logits[j],
                )
        all_logits.append(output.logits.float().cpu())
        all_labels.append(labels.cpu())
        if progress is not None:
            progress(first + len(samples), count)
    model.train(was_training)
    result = _collect(meters, class_names, all_logits, all_labels, confounder, label, count)
    result.metrics["baseline_miou"] = float(segmentation_scores(background).miou)
    return result._replace(per_image=images)


def _crf_labels(rgb: Tensor, probs: Tensor, size: tuple[int, int], cfg: TrainConfig) -> Tensor:
    """Dense CRF (§9.4) on the uint8 image at the label size; returns (H, W) labels."""
    e = cfg.eval
    if tuple(rgb.shape[:2]) != size:
        rgb = F.interpolate(rgb.permute(2, 0, 1)[None].float(), size=size, mode="bilinear", align_corners=False)
        rgb = rgb[0].permute(1, 2, 0).round().clamp(0, 255).byte()
    refined = dense_crf(
        np.ascontiguousarray(rgb.cpu().numpy()),
        probs.cpu().numpy(),
        iters=e.crf_iters,
        gauss_sxy=e.crf_gauss_sxy,
        gauss_compat=e.crf_gauss_compat,
        bilateral_sxy=e.crf_bilateral_sxy,
        bilateral_srgb=e.crf_bilateral_srgb,
        bilateral_compat=e.crf_bilateral_compat,
    )
    return torch.from_numpy(refined.argmax(axis=0))


def _collect(meters, class_names, all_logits, all_labels, confounder, label, count) -> EvalResult:
    metrics: dict[str, float] = {"images": float(count)}
    per_class = [{"class": name} for name in class_names]
    for name, meter in meters.items():
        scores = meter.scores()
        metrics[f"miou_{name}"] = float(scores.miou)
        metrics[f"pixel_accuracy_{name}"] = float(scores.pixel_accuracy)
        for row, iou in zip(per_class, scores.iou.tolist()):
            row[name] = None if iou != iou else round(float(iou), 6)
    metrics["pseudo_ignored_fraction"] = float(meters["pseudo"].ignored_fraction)
    if all_logits:
        metrics["f1"] = float(multilabel_f1(torch.cat(all_logits), torch.cat(all_labels)))
    if confounder is not None:
        metrics.update(confounder.metrics())
        iou = meters["cam"].scores().iou[label]
        metrics["confounded_class_iou_cam"] = float(iou)
        metrics["confounded_class_iou_seg"] = float(meters["seg"].scores().iou[label])
    return EvalResult(metrics, per_class)


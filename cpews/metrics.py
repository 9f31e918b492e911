"""Segmentation and classification metrics (spec §9.1).

Confusion matrices are indexed ``Hm[g, p]`` (ground truth row, prediction column) over ``num_classes`` labels
including background, i.e. ``C + 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _valid_pairs(pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Flattened (gt, pred) of the pixels where neither is ``ignore_index``; range-checked."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).long()
    keep = (gt != ignore_index) & (pred != ignore_index)  # §9.1: ignored predictions are excluded
    gt, pred = gt[keep], pred[keep]
    check_label_range(gt, num_classes, ignore_index, "gt")
    check_label_range(pred, num_classes, ignore_index, "pred")
    return gt, pred


def check_label_range(values: Tensor, num_classes: int, ignore_index: int, name: str) -> None:
    """Raise ValueError naming `name` when a label of `values` (ignored pixels already removed) is outside
    ``[0, num_classes)``."""
    if values.numel() and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{name} has values outside [0, {num_classes}) other than {ignore_index}")


def confusion_matrix(pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix ``Hm[g, p]`` counting pixels with ground truth g and prediction p (§9.1).

    Pixels whose ground truth is ``ignore_index`` are skipped, and so are pixels whose prediction is
    ``ignore_index`` (ignore-band pseudo labels); count the latter with `ignored_prediction_fraction`.

    Shapes:
        pred: (...) integer labels in {0..num_classes-1, ignore_index}.
        gt: (...) same shape as ``pred``.
        returns: (num_classes, num_classes) int64 on the device of ``gt``.

    Raises:
        ValueError: on mismatched shapes or labels outside ``[0, num_classes)`` that are not ``ignore_index``.
    """
    gt_valid, pred_valid = _valid_pairs(pred, gt, num_classes, ignore_index)
    flat_index = gt_valid * num_classes + pred_valid
    counts = torch.bincount(flat_index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def all_background_confusion(gt: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix of the trivial prediction "background (label 0) everywhere" against ``gt`` (§9.1).

    Accumulate it over images (as a `ConfusionMeter` does) and score it with `segmentation_scores` to get the
    floor any segmentation of the same images must beat; `baseline_miou` does both for one tensor.

    Shapes:
        gt: (...) integer labels in {0..num_classes-1, ignore_index}.
        returns: (num_classes, num_classes) int64; only column 0 is non-zero.
    """
    return confusion_matrix(torch.zeros_like(gt), gt, num_classes, ignore_index=ignore_index)


def baseline_miou(gt: Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """The mIoU of predicting background everywhere on ``gt``: the floor of every mIoU of the same images.

    Scored like any other prediction (`confusion_matrix` + `segmentation_scores`): ``ignore_index`` pixels are
    skipped and the mean runs over the classes present in ``gt``, so it equals
    ``IoU_0 / (number of present classes)`` with ``IoU_0`` the background fraction of the labelled pixels
    (every present foreground class scores 0). NaN when no pixel is labelled.

    Shapes:
        gt: (...) integer labels; a batch (B, H, W) is pooled into one confusion matrix.
    """
    return segmentation_scores(all_background_confusion(gt, num_classes, ignore_index)).miou


def ignored_prediction_fraction(pred: Tensor, gt: Tensor, ignore_index: int = 255) -> float:
    """Fraction of the GT-labelled pixels (gt != ignore) whose prediction is ``ignore_index`` (§9.1).

    Shapes:
        pred: (...) integer labels.
        gt: (...) same shape as ``pred``.
        returns: a float in [0, 1]; NaN if no pixel has a ground truth.
    """
    labelled = gt != ignore_index
    total = int(labelled.sum())
    if total == 0:
        return float("nan")
    return int((labelled & (pred == ignore_index)).sum()) / total


class SegmentationScores(NamedTuple):
    """Scores derived from a confusion matrix.

    Attributes:
        iou: (num_classes,) float64 per-class IoU; NaN for classes absent from the ground truth.
        miou: mean IoU over the classes present in the ground truth.
        pixel_accuracy: correctly labelled pixels / all counted pixels.
        mean_class_accuracy: mean over GT-present classes of ``Hm[k, k] / sum_j Hm[k, j]``.
    """

    iou: Tensor
    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float


def class_iou(confusion: Tensor) -> Tensor:
    """``IoU_k = Hm[k,k] / (sum_j Hm[k,j] + sum_j Hm[j,k] - Hm[k,k])`` (§9.1), NaN for classes without a
    ground-truth pixel.

    Shapes: confusion (..., K, K) counts, one matrix per leading index -> (..., K) float64.
    """
    confusion = confusion.to(torch.float64)
    true_positive = confusion.diagonal(dim1=-2, dim2=-1)
    gt_count = confusion.sum(dim=-1)
    union = gt_count + confusion.sum(dim=-2) - true_positive
    return torch.where(gt_count > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


def segmentation_scores(confusion: Tensor) -> SegmentationScores:
    """IoU per class, mIoU, pixel accuracy and mean class accuracy from ``Hm[g, p]`` (§9.1).

    ``IoU_k = Hm[k,k] / (sum_j Hm[k,j] + sum_j Hm[j,k] - Hm[k,k])``; classes with no ground-truth pixel get
    NaN and are excluded from the means. An empty matrix gives NaN everywhere.

    Shapes:
        confusion: (K, K) counts.
    """
    confusion = confusion.to(torch.float64)
    true_positive = confusion.diagonal()
    gt_count = confusion.sum(dim=1)
    present = gt_count > 0
    nan = torch.full_like(true_positive, float("nan"))
    iou = class_iou(confusion)
    class_accuracy = torch.where(present, true_positive / gt_count.clamp_min(1), nan)
    total = confusion.sum()
    pixel_accuracy = float(true_positive.sum() / total) if total > 0 else float("nan")
    return SegmentationScores(
        iou=iou,
        miou=float(iou.nanmean()),  # §9.1 mean over the classes present in the GT
        pixel_accuracy=pixel_accuracy,
        mean_class_accuracy=float(class_accuracy.nanmean()),
    )


def multilabel_f1(
    logits: Tensor, labels: Tensor, threshold: float = 0.0, zero_division: float = 1.0
) -> float:
    """Micro-averaged F1 of the image-level predictions ``logits > threshold`` against ``labels`` (§9.2).

    ``F1 = 2 TP / (2 TP + FP + FN)`` with the counts pooled over all images and classes. When there is neither
    a predicted nor a true positive (the denominator is 0) the predictions agree perfectly with the labels and
    ``zero_division`` is returned.

    Shapes:
        logits: (B, C) image-level logits z.
        labels: (B, C) multi-hot targets y.
    """
    predicted = logits > threshold
    actual = labels > 0
    true_positive = int((predicted & actual).sum())
    false_positive = int((predicted & ~actual).sum())
    false_negative = int((~predicted & actual).sum())
    denominator = 2 * true_positive + false_positive + false_negative
    if denominator == 0:
        return zero_division
    return 2 * true_positive / denominator


class ConfusionMeter:
    """Accumulates a confusion matrix (and the ignored-prediction count) over batches (§9.1).

    Example:
        meter = ConfusionMeter(num_classes=21)
        for pred, gt in batches:
            meter.update(pred, gt)
        scores = meter.scores()
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.labelled_pixels = 0
        self.ignored_predictions = 0

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Add a batch of predictions and ground truths of the same shape (...)."""
        batch_confusion = confusion_matrix(pred, gt, self.num_classes, ignore_index=self.ignore_index)
        self.confusion += batch_confusion.cpu()
        labelled = gt != self.ignore_index
        self.labelled_pixels += int(labelled.sum())
        self.ignored_predictions += int((labelled & (pred == self.ignore_index)).sum())

    @property
    def ignored_fraction(self) -> float:
        """Fraction of GT-labelled pixels whose prediction was ``ignore_index``; NaN before any pixel."""
        if self.labelled_pixels == 0:
            return float("nan")
        return self.ignored_predictions / self.labelled_pixels

    def scores(self) -> SegmentationScores:
        """`segmentation_scores` of the accumulated matrix."""
        return segmentation_scores(self.confusion)

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from cpews.metrics import (
    ConfusionMeter,
    SegmentationScores,
    all_background_confusion,
    baseline_miou,
    confusion_matrix,
    ignored_prediction_fraction,
    multilabel_f1,
    segmentation_scores,
)


def test_confusion_matrix_hand_case():
    gt = torch.tensor([[0, 0, 1, 2], [2, 255, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 0, 255, 0]])
    # counted pairs (g, p): (0,0) (0,1) (1,1) (2,2) (2,1) (0,0); gt 255 and pred 255 skipped
    expected = torch.tensor([[2, 1, 0], [0, 1, 0], [0, 1, 1]])
    hm = confusion_matrix(pred, gt, num_classes=3)
    assert hm.dtype == torch.int64
    assert torch.equal(hm, expected)
    # 7 GT-labelled pixels, one predicted 255
    assert ignored_prediction_fraction(pred, gt) == pytest.approx(1 / 7)


def test_scores_hand_case():
    hm = torch.tensor([[2, 1, 0], [0, 1, 0], [0, 1, 1]])
    scores = segmentation_scores(hm)
    assert isinstance(scores, SegmentationScores)
    # IoU0 = 2/(3+2-2) = 2/3; IoU1 = 1/(1+3-1) = 1/3; IoU2 = 1/(2+1-1) = 1/2
    torch.testing.assert_close(scores.iou, torch.tensor([2 / 3, 1 / 3, 1 / 2], dtype=torch.float64))
    assert scores.miou == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert scores.pixel_accuracy == pytest.approx(4 / 6)
    assert scores.mean_class_accuracy == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_class_absent_from_gt_is_excluded():
    gt = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 predicted but absent from GT
    scores = segmentation_scores(confusion_matrix(pred, gt, num_classes=4))
    assert math.isnan(scores.iou[2]) and math.isnan(scores.iou[3])
    # IoU0 = 1/(2+1-1) = 1/2, IoU1 = 1 -> mIoU 0.75
    assert scores.miou == pytest.approx(0.75)


def test_baseline_miou_hand_case():
    """All-background prediction on a 2x3 map with an ignore pixel; class 2 is absent from the image."""
    gt = torch.tensor([[0, 1, 1], [255, 0, 3]])
    # counted (g, p) pairs, p = 0 everywhere: (0,0) x2, (1,0) x2, (3,0) x1; the 255 pixel is skipped
    expected = torch.tensor([[2, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert torch.equal(all_background_confusion(gt, num_classes=4), expected)
    # IoU0 = 2 / (2 + 5 - 2) = 2/5; IoU1 = 0 / 2 = 0; IoU3 = 0 / 1 = 0; class 2 absent (NaN, left out)
    assert baseline_miou(gt, num_classes=4) == pytest.approx((2 / 5 + 0 + 0) / 3)
    # the same number as scoring an explicit all-zero prediction with the general metric code
    explicit = segmentation_scores(confusion_matrix(torch.zeros_like(gt), gt, num_classes=4)).miou
    assert baseline_miou(gt, num_classes=4) == explicit


def test_baseline_miou_edge_cases():
    # only background in the GT: all-background is perfect
    assert baseline_miou(torch.zeros(2, 2, dtype=torch.long), num_classes=3) == 1.0
    # no background pixel: IoU 0 for every present class
    assert baseline_miou(torch.tensor([1, 2, 2]), num_classes=3) == 0.0
    # nothing labelled: NaN, like every other mIoU of an empty matrix
    assert math.isnan(baseline_miou(torch.full((2, 2), 255), num_classes=3))
    # a batch (B, H, W) is pooled into one matrix; labels out of range are an error as elsewhere
    batch = torch.tensor([[[0, 1]], [[1, 1]]])
    # (0,0) x1, (1,0) x3 -> IoU0 = 1 / (1 + 4 - 1) = 1/4, IoU1 = 0
    assert baseline_miou(batch, num_classes=2) == pytest.approx(1 / 8)
    with pytest.raises(ValueError):
        baseline_miou(torch.tensor([0, 5]), num_classes=3)


def test_miou_matches_sklearn_on_random_data():
    generator = torch.Generator().manual_seed(0)
    num_classes = 6
    gt = torch.randint(0, num_classes, (3, 20, 30), generator=generator)
    pred = torch.randint(0, num_classes, (3, 20, 30), generator=generator)
    gt[torch.rand(3, 20, 30, generator=generator) < 0.1] = 255
    pred[torch.rand(3, 20, 30, generator=generator) < 0.1] = 255
    gt[gt == 4] = 0  # class 4 absent from GT
    hm = confusion_matrix(pred, gt, num_classes)
    keep = (gt != 255) & (pred != 255)
    reference = sk_confusion_matrix(gt[keep].numpy(), pred[keep].numpy(), labels=list(range(num_classes)))
    np.testing.assert_array_equal(hm.numpy(), reference)
    tp = np.diag(reference).astype(float)
    union = reference.sum(0) + reference.sum(1) - tp
    present = reference.sum(1) > 0
    assert segmentation_scores(hm).miou == pytest.approx(float(np.mean(tp[present] / union[present])))
    assert not present[4]


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), num_classes=3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0]), torch.tensor([0, 1]), num_classes=3)


def test_confusion_meter_accumulates():
    generator = torch.Generator().manual_seed(1)
    meter = ConfusionMeter(num_classes=4)
    preds = [torch.randint(0, 4, (2, 5, 5), generator=generator) for _ in range(3)]
    gts = [torch.randint(0, 4, (2, 5, 5), generator=generator) for _ in range(3)]
    preds[0][0, 0, 0] = 255
    for pred, gt in zip(preds, gts, strict=True):
        meter.update(pred, gt)
    total = confusion_matrix(torch.cat(preds), torch.cat(gts), 4)
    assert torch.equal(meter.confusion, total)
    assert meter.scores().miou == segmentation_scores(total).miou
    assert meter.ignored_fraction == pytest.approx(1 / 150)
    meter.reset()
    assert meter.confusion.sum() == 0 and math.isnan(meter.ignored_fraction)


def test_multilabel_f1_hand_case():
    logits = torch.tensor([[1.0, -1.0, 2.0], [-0.5, 0.3, -2.0]])
    labels = torch.tensor([[1, 1, 0], [0, 1, 0]])
    # predicted: [1,0,1],[0,1,0]; TP = 2, FP = 1, FN = 1 -> F1 = 4 / (4 + 2) = 2/3
    assert multilabel_f1(logits, labels) == pytest.approx(2 / 3)
    # threshold moves the decision: z > 1.5 -> [0,0,1],[0,0,0]; TP 0, FP 1, FN 3 -> 0
    assert multilabel_f1(logits, labels, threshold=1.5) == 0.0
    # no positives anywhere -> perfect agreement -> zero_division (1.0)
    assert multilabel_f1(-torch.ones(2, 3), torch.zeros(2, 3)) == 1.0

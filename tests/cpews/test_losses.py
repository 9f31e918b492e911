from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cpews.cam import affinity_targets
from cpews.losses import classification_loss, ism_loss, segmentation_loss, upsample_logits


def test_classification_loss_matches_torch_and_hand_value():
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    labels = torch.randint(0, 2, (4, 5)).float()
    labels[0] = 0  # an image with no positive class is valid
    torch.testing.assert_close(
        classification_loss(logits, labels), F.multilabel_soft_margin_loss(logits, labels)
    )
    # hand case: z = [0, 2], y = [1, 0] -> (log 2 + log(1 + e^2)) / 2 = (0.693147 + 2.126928) / 2 = 1.410038
    value = classification_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1, 0]]))
    assert value.item() == pytest.approx(1.410038, abs=1e-5)


def test_classification_loss_gradient():
    logits = torch.randn(2, 3, requires_grad=True)
    classification_loss(logits, torch.tensor([[1, 0, 1], [0, 0, 0]])).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_ism_loss_hand_case():
    # tokens t0 = (1, 0), t1 = (0, 1), t2 = (1, 1); labels (1, 1, 0)
    # |cos|: s01 = 0, s02 = s12 = 1/sqrt(2); P = {(0,1), (1,0)} sum 0; Q = 4 pairs, sum 4/sqrt(2) = 2*sqrt(2)
    # L = 0.5 * (1 - 0 / 3) + 0.5 * 2*sqrt(2) / 5 = 0.5 + sqrt(2) / 5 = 0.782843
    tokens = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    affinity = affinity_targets(torch.tensor([[[1, 1, 0]]]))
    assert ism_loss(tokens, affinity).item() == pytest.approx(0.5 + math.sqrt(2) / 5, abs=1e-6)
    # absolute cosine: t1 = -t0 counts as fully similar. P = 2 pairs, sum 2 -> 0.5 * (1 - 2/3) = 1/6
    tokens = torch.tensor([[1.0, -1.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    assert ism_loss(tokens, affinity_targets(torch.tensor([[[0, 0]]]))).item() == pytest.approx(
        1 / 6, abs=1e-6
    )


def test_ism_loss_range_and_gradient_reaches_tokens():
    torch.manual_seed(1)
    tokens = torch.randn(2, 8, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[labels == 2] = 255
    loss = ism_loss(tokens, affinity_targets(labels))
    assert 0.0 <= loss.item() <= 1.0
    loss.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_ism_loss_all_ignore_is_half_with_zero_gradient():
    tokens = torch.randn(2, 8, 3, 3, requires_grad=True)
    affinity = affinity_targets(torch.full((2, 3, 3), 255))
    loss = ism_loss(tokens, affinity)
    assert loss.item() == 0.5
    loss.backward()
    assert torch.all(tokens.grad == 0)


def test_ism_loss_no_positive_class_all_background():
    # every valid token is background -> all valid pairs positive; identical tokens -> similarity 1
    # 4 tokens -> 12 positive pairs each s = 1 -> 0.5 * (1 - 12/13) + 0 = 1/26
    tokens = torch.ones(1, 3, 2, 2)
    affinity = affinity_targets(torch.zeros(1, 2, 2, dtype=torch.long))
    assert ism_loss(tokens, affinity).item() == pytest.approx(1 / 26, abs=1e-6)


def test_ism_loss_zero_token_is_finite():
    tokens = torch.zeros(1, 4, 1, 3, requires_grad=True)
    loss = ism_loss(tokens, affinity_targets(torch.tensor([[[0, 1, 1]]])))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(tokens.grad).all()


def test_segmentation_loss_matches_cross_entropy_halves():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6, 7)
    labels = torch.randint(0, 4, (2, 6, 7))
    labels[torch.rand(2, 6, 7) < 0.3] = 255
    bg = labels.clone()
    bg[labels != 0] = 255
    fg = labels.clone()
    fg[labels == 0] = 255
    expected = 0.5 * (
        F.cross_entropy(logits, bg, ignore_index=255) + F.cross_entropy(logits, fg, ignore_index=255)
    )
    torch.testing.assert_close(segmentation_loss(logits, labels), expected)


def test_segmentation_loss_all_ignore_is_zero_and_finite():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_segmentation_loss_only_background():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, 0] = 255
    loss = segmentation_loss(logits, labels)
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(logits, labels, ignore_index=255))
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_segmentation_loss_hand_value():
    # 2 classes, 2 pixels, equal logits -> each CE = log 2; bg pixel + fg pixel -> 0.5 * (log 2 + log 2)
    logits = torch.zeros(1, 2, 1, 2)
    assert segmentation_loss(logits, torch.tensor([[[0, 1]]])).item() == pytest.approx(math.log(2))


def test_upsample_logits():
    logits = torch.randn(2, 3, 4, 5)
    out = upsample_logits(logits, (8, 10))
    torch.testing.assert_close(out, F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False))
    assert upsample_logits(logits, (4, 5)) is logits

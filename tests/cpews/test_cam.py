from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cpews.cam import (
    CamPair,
    affinity_targets,
    cam_logits,
    cams_to_ignore_band_labels,
    cams_to_labels,
    ism_token_labels,
    multiscale_cams,
    token_boxes,
    valid_token_mask,
)


def _pooled_linear_forward(weight: torch.Tensor, aux_weight: torch.Tensor, patch: int = 4):
    """A toy hflip-equivariant 'network': average-pool by `patch`, then a 1x1 linear map per head."""

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = F.avg_pool2d(x, patch)
        return cam_logits(tokens, weight), cam_logits(tokens, aux_weight)

    return forward


def test_cam_logits_matches_conv1x1_and_accepts_4d_weight():
    tokens = torch.randn(2, 6, 3, 5)
    weight = torch.randn(4, 6)
    expected = F.conv2d(tokens, weight[:, :, None, None])
    torch.testing.assert_close(cam_logits(tokens, weight), expected)
    torch.testing.assert_close(cam_logits(tokens, weight[:, :, None, None]), expected)
    # hand case: one token (1, 2), weights [[1, -1]] -> 1 - 2 = -1 (no ReLU)
    assert cam_logits(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1), torch.tensor([[1.0, -1.0]])).item() == -1.0


def test_multiscale_cams_range_absent_classes_and_no_grad():
    torch.manual_seed(0)
    forward = _pooled_linear_forward(torch.randn(3, 3, requires_grad=True), torch.randn(3, 3))
    images = torch.randn(2, 3, 32, 24)
    labels = torch.tensor([[1, 0, 1], [0, 0, 0]])
    out = multiscale_cams(forward, images, labels)
    assert isinstance(out, CamPair)
    for cams in out:
        assert cams.shape == (2, 3, 32, 24)
        assert not cams.requires_grad
        assert cams.min() >= 0 and cams.max() < 1
        assert torch.all(cams[0, 1] == 0) and torch.all(cams[1] == 0)


def test_multiscale_cams_flip_invariance_on_symmetric_input():
    torch.manual_seed(1)
    forward = _pooled_linear_forward(torch.randn(2, 3), torch.randn(2, 3))
    half = torch.randn(1, 3, 16, 8)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    cams, aux_cams = multiscale_cams(forward, symmetric, torch.ones(1, 2))
    torch.testing.assert_close(cams, cams.flip(-1))
    torch.testing.assert_close(aux_cams, aux_cams.flip(-1))
    # and flipping the input flips the CAM for any input
    images = torch.randn(1, 3, 16, 16)
    cams_a = multiscale_cams(forward, images, torch.ones(1, 2)).cams
    cams_b = multiscale_cams(forward, images.flip(-1), torch.ones(1, 2)).cams
    torch.testing.assert_close(cams_a.flip(-1), cams_b)


def test_multiscale_cams_scale_handling_matches_manual_computation():
    torch.manual_seed(2)
    weight, aux_weight = torch.randn(2, 3), torch.randn(2, 3)
    forward = _pooled_linear_forward(weight, aux_weight)
    seen_sizes = []

    def recording_forward(x):
        seen_sizes.append((x.shape[0], *x.shape[-2:]))
        return forward(x)

    images = torch.randn(2, 3, 20, 28)
    scales = (1.0, 0.5, 1.5)
    cams = multiscale_cams(recording_forward, images, torch.ones(2, 2), scales=scales).cams
    # floor(0.5*20)=10, floor(0.5*28)=14; floor(1.5*20)=30, floor(1.5*28)=42; 2B = 4 images per call
    assert seen_sizes == [(4, 20, 28), (4, 10, 14), (4, 30, 42)]

    total = torch.zeros(2, 2, 20, 28)
    for s in scales:
        size = (math.floor(s * 20), math.floor(s * 28))
        x = images if s == 1.0 else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        plain = F.interpolate(forward(x)[0], size=(20, 28), mode="bilinear", align_corners=False)
        flipped = F.interpolate(forward(x.flip(-1))[0], size=(20, 28), mode="bilinear", align_corners=False)
        total += torch.relu(torch.maximum(plain, flipped.flip(-1)))
    total = total - total.amin(dim=(-2, -1), keepdim=True)
    expected = total / (total.amax(dim=(-2, -1), keepdim=True) + 1e-5)
    torch.testing.assert_close(cams, expected)


def test_cams_to_labels_hand_example_with_ties():
    # 2 classes, 1x4 pixels:  px0: (0.6, 0.6) tie -> class 1; px1: (0.2, 0.9) -> 2;
    # px2: (0.5, 0.1) max 0.5 is not > 0.5 -> bg; px3: (0, 0) -> bg
    cams = torch.tensor([[[[0.6, 0.2, 0.5, 0.0]], [[0.6, 0.9, 0.1, 0.0]]]])
    labels = cams_to_labels(cams, bkg_threshold=0.5)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[[1, 2, 0, 0]]]


def test_cams_to_ignore_band_labels_values_and_box():
    # max values 0.8 (>0.7 -> class), 0.7 (band -> 255), 0.3 (band), 0.25 (<= low -> 0)
    cams = torch.tensor([[[[0.8, 0.7, 0.3, 0.25]], [[0.1, 0.0, 0.3, 0.2]]]])
    labels = cams_to_ignore_band_labels(cams, high=0.7, low=0.25, boxes=None)
    assert labels.tolist() == [[[1, 255, 255, 0]]]
    boxed = cams_to_ignore_band_labels(cams, 0.7, 0.25, boxes=torch.tensor([[0, 1, 1, 3]]))
    assert boxed.tolist() == [[[255, 255, 255, 255]]]

    torch.manual_seed(3)
    cams = torch.rand(3, 4, 10, 12)
    boxes = torch.tensor([[0, 10, 0, 12], [2, 7, 3, 9], [0, 0, 0, 0]])
    labels = cams_to_ignore_band_labels(cams, 0.7, 0.25, boxes)
    assert set(labels.unique().tolist()) <= set(range(5)) | {255}
    inside = torch.zeros(3, 10, 12, dtype=torch.bool)
    inside[0] = True
    inside[1, 2:7, 3:9] = True
    assert torch.all(labels[~inside] == 255)
    # no positive class: all-zero CAM -> background inside the box
    empty = cams_to_ignore_band_labels(torch.zeros(1, 4, 5, 5), 0.7, 0.25, torch.tensor([[1, 4, 0, 5]]))
    assert torch.all(empty[0, 1:4] == 0) and torch.all(empty[0, 0] == 255) and torch.all(empty[0, 4] == 255)


def test_token_boxes_hand_cases():
    boxes = torch.tensor([[0, 40, 24, 64], [0, 64, 0, 64], [17, 23, 8, 9], [-5, 100, 0, 7]])
    # box 0: rows [ceil(-8/16), ceil(32/16)) = [0, 2); cols [ceil(16/16), ceil(56/16)) = [1, 4)
    # box 1: full crop -> [0, 4) x [0, 4)
    # box 2: rows [ceil(9/16), ceil(15/16)) = [1, 1) empty; cols [ceil(0/16), ceil(1/16)) = [0, 1)
    # box 3: clipped to the grid: rows [0, 4), cols [0, ceil(-1/16)) = [0, 0)
    expected = [[0, 2, 1, 4], [0, 4, 0, 4], [1, 1, 0, 1], [0, 4, 0, 0]]
    assert token_boxes(boxes, 16, (4, 4)).tolist() == expected
    # toco mode: pixel box clipped to the 4x4 grid -> box 0 keeps no column (ToCo's all-ignore bug)
    assert token_boxes(boxes, 16, (4, 4), mode="toco").tolist() == [
        [0, 4, 4, 4],
        [0, 4, 0, 4],
        [4, 4, 4, 4],
        [0, 4, 0, 4],
    ]
    mask = valid_token_mask(token_boxes(boxes[:1], 16, (4, 4)), (4, 4))
    expected_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected_mask[0, 0:2, 1:4] = True
    assert torch.equal(mask, expected_mask)
    with pytest.raises(ValueError):
        token_boxes(boxes, 16, (4, 4), mode="pixel")  # type: ignore[arg-type]


def test_token_boxes_centre_rule_brute_force():
    patch, grid = 16, (5, 6)
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 90, (50, 2), generator=generator)
    lengths = torch.randint(0, 60, (50, 2), generator=generator)
    boxes = torch.stack(
        [starts[:, 0], starts[:, 0] + lengths[:, 0], starts[:, 1], starts[:, 1] + lengths[:, 1]], 1
    )
    mask = valid_token_mask(token_boxes(boxes, patch, grid), grid)
    centres_r = torch.arange(grid[0]) * patch + patch // 2
    centres_c = torch.arange(grid[1]) * patch + patch // 2
    rows_in = (centres_r[None] >= boxes[:, 0:1]) & (centres_r[None] < boxes[:, 1:2])
    cols_in = (centres_c[None] >= boxes[:, 2:3]) & (centres_c[None] < boxes[:, 3:4])
    assert torch.equal(mask, rows_in[:, :, None] & cols_in[:, None, :])


def test_affinity_targets_hand_case_and_invariants():
    labels = torch.tensor([[[0, 1], [255, 0]]])  # tokens: 0, 1, 255, 0
    expected = torch.tensor(
        [
            [255, 0, 255, 1],
            [0, 255, 255, 0],
            [255, 255, 255, 255],
            [1, 0, 255, 255],
        ]
    )
    aff = affinity_targets(labels)
    assert aff.dtype == torch.int64
    assert torch.equal(aff[0], expected)

    torch.manual_seed(4)
    labels = torch.randint(0, 4, (3, 5, 6))
    labels[labels == 3] = 255
    aff = affinity_targets(labels)
    assert aff.shape == (3, 30, 30)
    assert torch.equal(aff, aff.transpose(1, 2))
    assert torch.all(aff.diagonal(dim1=1, dim2=2) == 255)
    assert set(aff.unique().tolist()) <= {0, 1, 255}


def test_ism_token_labels_resizes_and_uses_token_boxes():
    aux_cams = torch.zeros(1, 2, 64, 64)
    aux_cams[0, 1, :32, :] = 0.9  # top half strongly class 2
    boxes = torch.tensor([[0, 40, 24, 64]])
    labels = ism_token_labels(aux_cams, boxes, patch_size=16, grid_hw=(4, 4), high=0.7, low=0.25)
    expected = torch.full((1, 4, 4), 255)
    expected[0, 0:2, 1:4] = 2  # token rows 0-1 are in the top half
    assert torch.equal(labels, expected)
    toco = ism_token_labels(aux_cams, boxes, 16, (4, 4), 0.7, 0.25, box_mode="toco")
    assert torch.all(toco == 255)
    no_box = ism_token_labels(aux_cams, None, 16, (4, 4), 0.7, 0.25)
    assert no_box[0, :2].eq(2).all() and no_box[0, 2:].eq(0).all()


@pytest.mark.gpu
def test_multiscale_cams_do_not_synchronise_on_cuda():
    # One forward per scale with both flips in it, and nothing that waits for the device (no .item(), no
    # Python branch on a tensor value): with the sync debug mode at "error" any such call raises.
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(3)
    weight, aux_weight = torch.randn(3, 3, generator=generator), torch.randn(3, 3, generator=generator)
    forward = _pooled_linear_forward(weight.to(device), aux_weight.to(device))
    calls = []

    def counting_forward(x):
        calls.append(x.shape[0])
        return forward(x)

    images = torch.randn(2, 3, 32, 24, generator=generator)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    images_on_device, labels_on_device = images.to(device), labels.to(device)  # copies to the device: before
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = multiscale_cams(counting_forward, images_on_device, labels_on_device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == [4, 4, 4]  # 3 scales, the 2B images of both flips in each forward
    expected = multiscale_cams(_pooled_linear_forward(weight, aux_weight), images, labels)
    torch.testing.assert_close(out.cams.cpu(), expected.cams, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aux_cams.cpu(), expected.aux_cams, rtol=1e-4, atol=1e-5)

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from cpews.refine import (
    _argmax_present,
    _unbiased_std,
    images_for_par,
    par_affinity,
    par_kernel_offsets,
    par_refine,
    refine_pseudo_labels,
)

DILATIONS = (1, 2, 4, 8, 12, 24)


def _afa_reference(images: torch.Tensor, scores: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Straightforward re-derivation of §4.1 (explicit 48-neighbour stack with F.pad replicate)."""
    offsets = par_kernel_offsets(DILATIONS).tolist()
    scores = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=True)
    height, width = images.shape[-2:]

    def neighbours(x):
        padded = F.pad(x, [24] * 4, mode="replicate")
        return torch.stack(
            [padded[..., 24 + r : 24 + r + height, 24 + c : 24 + c + width] for r, c in offsets], 2
        )

    nb = neighbours(images)  # (B, 3, 48, h, w)
    sigma = nb.std(dim=2, keepdim=True)
    colour = -(((nb - images[:, :, None]).abs() / (sigma + 1e-8) / 0.3) ** 2).mean(1)
    rho = torch.tensor([math.hypot(r, c) for r, c in offsets])
    pos = -((rho / (rho.std() + 1e-8) / 0.3) ** 2)
    aff = colour.softmax(1) + 0.01 * pos.softmax(0)[None, :, None, None]
    for _ in range(iters):
        scores = (neighbours(scores) * aff[:, None]).sum(2)
    return scores


def test_kernel_offsets():
    offsets = par_kernel_offsets(DILATIONS)
    assert offsets.shape == (48, 2)
    assert offsets[:8].tolist() == [[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]]
    assert offsets[-1].tolist() == [24, 24]
    assert not torch.any((offsets == 0).all(1))  # the centre is never a neighbour


def test_affinity_rows_sum_to_1_01_and_shape():
    images = torch.rand(2, 3, 16, 20)
    aff = par_affinity(images)
    assert aff.shape == (2, 48, 16, 20)
    torch.testing.assert_close(aff.sum(1), torch.full((2, 16, 20), 1.01))
    assert torch.all(aff > 0)


def test_par_refine_matches_reference():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 30, 26)
    scores = torch.rand(2, 4, 15, 13)  # smaller -> resized with align_corners=True
    torch.testing.assert_close(
        par_refine(images, scores), _afa_reference(images, scores), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("size", [8, 16, 32])
def test_par_tiny_images_with_dilation_24(size):
    images = torch.rand(1, 3, size, size)
    scores = torch.rand(1, 3, size, size)
    out = par_refine(images, scores)
    assert out.shape == (1, 3, size, size)
    assert torch.isfinite(out).all()


def test_par_constant_scores_keep_argmax_and_shape():
    images = torch.rand(2, 3, 24, 24)
    scores = torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1).expand(2, 3, 24, 24).contiguous()
    out = par_refine(images, scores)
    assert out.shape == scores.shape
    assert torch.all(out.argmax(1) == 1)
    # the uniform gain 1.01 per iteration, no renormalisation
    torch.testing.assert_close(out, scores * 1.01**10)


def test_par_is_edge_aware():
    # left half black, right half white; a score spike at one pixel of the left half
    images = torch.zeros(1, 3, 32, 32)
    images[..., 16:] = 1.0
    scores = torch.zeros(1, 1, 32, 32)
    scores[0, 0, 16, 12] = 1.0
    out = par_refine(images, scores, iters=3)[0, 0]
    same_region = out[16, 8]  # 4 px away, same colour
    across_edge = out[16, 16]  # 4 px away, across the colour edge
    assert same_region > 10 * across_edge


def test_par_refine_keeps_grads_off():
    images = torch.rand(1, 3, 8, 8)
    scores = torch.rand(1, 2, 8, 8, requires_grad=True)
    assert not par_refine(images, scores).requires_grad


def test_par_timing_cpu():
    images = torch.rand(4, 3, 112, 112)
    scores = torch.rand(4, 21, 112, 112)
    start = time.perf_counter()
    par_refine(images, scores)
    assert time.perf_counter() - start < 3.0  # ~0.2 s measured on 2 cores


def test_images_for_par_denormalises_truncates_and_downsamples():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = torch.randint(0, 256, (2, 3, 8, 12)).float()
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normalized = (rgb / 255 - mean_t) / std_t + 1e-4  # slightly above: truncation keeps the integer
    full = images_for_par(normalized, mean, std, downscale=1)
    torch.testing.assert_close(full, rgb / 255)
    # hand value: 200.7 truncates to 200
    one = torch.full((1, 3, 2, 2), 200.7 / 255)
    one = (one - mean_t) / std_t
    assert torch.allclose(images_for_par(one, mean, std, downscale=1), torch.full((1, 3, 2, 2), 200 / 255))
    half = images_for_par(normalized, mean, std)
    assert half.shape == (2, 3, 4, 6)
    expected = F.interpolate(rgb / 255, size=(4, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(half, expected)


def _toco_loop_reference(cams, labels, par_images, boxes, high=0.7, low=0.25, iters=10):
    """Per-image loop over the present channels, as in ToCo's refine_cams_with_bkg_v2 (§4.3)."""
    batch, _, height, width = cams.shape
    out = torch.full((batch, height, width), 255, dtype=torch.long)
    for b in range(batch):
        keys = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(labels[b])[:, 0] + 1])
        results = []
        for bkg in (high, low):
            stack = torch.cat([torch.full((1, 1, height, width), bkg), cams[b : b + 1]], 1)
            stack = F.interpolate(stack, size=(height // 2, width // 2), mode="bilinear", align_corners=False)
            probs = stack[:, keys].softmax(1)
            refined = par_refine(par_images[b : b + 1], probs, iters=iters)
            refined = F.interpolate(refined, size=(height, width), mode="bilinear", align_corners=False)
            results.append(keys[refined.argmax(1)][0])
        hi, lo = results
        label = hi.clone()
        label[hi == 0] = 255
        label[(hi == 0) & (lo == 0)] = 0
        r0, r1, c0, c1 = boxes[b].tolist()
        out[b, r0:r1, c0:c1] = label[r0:r1, c0:c1]
    return out


def test_refine_pseudo_labels_matches_per_image_loop():
    torch.manual_seed(5)
    cams = torch.rand(3, 4, 32, 40) ** 2
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    cams = cams * labels[:, :, None, None]
    par_images = torch.rand(3, 3, 16, 20)
    boxes = torch.tensor([[0, 32, 0, 40], [4, 20, 8, 30], [10, 32, 0, 25]])
    out = refine_pseudo_labels(cams, labels, par_images, boxes)
    assert out.dtype == torch.int64 and out.shape == (3, 32, 40)
    assert torch.equal(out, _toco_loop_reference(cams, labels, par_images, boxes))


def test_unbiased_std_matches_torch_std_and_is_zero_on_constant_neighbours():
    torch.manual_seed(3)
    x = torch.rand(2, 3, 48, 5, 7)
    assert torch.allclose(_unbiased_std(x, dim=2), x.std(dim=2, keepdim=True), atol=1e-6, rtol=0)
    assert _unbiased_std(x, dim=2).shape == (2, 3, 1, 5, 7)
    flat = torch.full((1, 3, 8, 2, 2), 0.25)
    assert torch.equal(_unbiased_std(flat, dim=2), torch.zeros(1, 3, 1, 2, 2))  # exactly 0: sigma + 1e-8 guards it


def test_argmax_present_ties_go_to_the_first_channel_and_absent_channels_never_win():
    # 4 channels x 1 x 3 pixels. px0: channels 1 and 2 tie at 0.7 -> 1; px1: absent channel 3 holds the largest
    # value -> the present maximum, channel 0; px2: every present channel ties -> 0.
    scores = torch.tensor([[[[0.1, 0.5, 0.2]], [[0.7, 0.2, 0.2]], [[0.7, 0.3, 0.2]], [[0.0, 0.9, 0.9]]]])
    present = torch.tensor([[True, True, True, False]])
    assert _argmax_present(scores, present).tolist() == [[[1, 0, 0]]]


def test_refine_pseudo_labels_values_no_positive_and_box():
    torch.manual_seed(6)
    labels = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]])
    cams = torch.rand(2, 4, 16, 16) * labels[:, :, None, None]
    cams[0, 1, :8] = 0.95  # a confident region of label 2
    par_images = torch.rand(2, 3, 8, 8)
    boxes = torch.tensor([[0, 16, 0, 12], [2, 14, 3, 16]])
    out = refine_pseudo_labels(cams, labels, par_images, boxes)
    assert set(out[0].unique().tolist()) <= {0, 2, 4, 255}
    assert (out[0] == 2).any()
    assert torch.all(out[0, :, 12:] == 255)
    # no positive class: every in-box pixel is background, the rest ignore
    assert torch.all(out[1, 2:14, 3:16] == 0)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[2:14, 3:16] = False
    assert torch.all(out[1][outside] == 255)
    # no box -> whole image
    whole = refine_pseudo_labels(cams, labels, par_images, None)
    assert torch.all(whole[1] == 0)


# --- The loop-over-the-kernel implementation that the gather + sparse-matrix PAR replaced, kept verbatim as the
# reference: 48 shifted views of a clamp-padded tensor, stacked for the affinity and summed one by one per
# propagation iteration.


def _old_clamp_pad(x, pad):
    height, width = x.shape[-2:]
    rows = torch.arange(-pad, height + pad, device=x.device).clamp_(0, height - 1)
    cols = torch.arange(-pad, width + pad, device=x.device).clamp_(0, width - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def _old_neighbour_views(padded, offsets, pad, size):
    height, width = size
    views = []
    for d_row, d_col in offsets.tolist():
        r0, c0 = pad + d_row, pad + d_col
        views.append(padded[..., r0 : r0 + height, c0 : c0 + width])
    return views


def _old_position_logits(offsets, w1, dtype, device):
    rho = offsets.to(dtype=torch.float64).norm(dim=1)
    std = rho.std()
    logits = -((rho / ((std + 1e-8) * w1)) ** 2)
    return logits.to(dtype=dtype, device=device)


def _old_par_affinity(images, dilations=DILATIONS, w1=0.3, w2=0.01):
    offsets = par_kernel_offsets(dilations)
    pad = max(abs(d) for d in dilations)
    size = (images.shape[-2], images.shape[-1])
    neighbours = torch.stack(_old_neighbour_views(_old_clamp_pad(images, pad), offsets, pad, size), dim=2)
    sigma = neighbours.std(dim=2, keepdim=True)
    distance = (neighbours - images.unsqueeze(2)).abs() / ((sigma + 1e-8) * w1)
    colour_logits = -(distance**2).mean(dim=1)
    position_logits = _old_position_logits(offsets, w1, images.dtype, images.device)
    position_term = torch.softmax(position_logits, dim=0)[None, :, None, None]
    return torch.softmax(colour_logits, dim=1) + w2 * position_term


def _old_par_refine(images, scores, *, dilations=DILATIONS, iters=10, w1=0.3, w2=0.01):
    size = (images.shape[-2], images.shape[-1])
    if tuple(scores.shape[-2:]) != size:
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=True)
    affinity = _old_par_affinity(images, dilations=dilations, w1=w1, w2=w2).to(scores.dtype)
    weights = affinity.unsqueeze(2).unbind(dim=1)
    offsets = par_kernel_offsets(dilations)
    pad = max(abs(d) for d in dilations)
    for _ in range(iters):
        views = _old_neighbour_views(_old_clamp_pad(scores, pad), offsets, pad, size)
        refined = views[0] * weights[0]
        for view, weight in zip(views[1:], weights[1:], strict=True):
            refined.addcmul_(view, weight)
        scores = refined
    return scores


# (batch, height, width, dilations): square and not, images smaller than the largest dilation (every ring of
# dilation 24 clamped), a single row, the demo preset's dilations
SHAPES = [
    (2, 30, 26, DILATIONS),
    (3, 17, 40, DILATIONS),
    (1, 5, 7, DILATIONS),
    (2, 1, 9, (1, 2)),
    (4, 32, 32, (1, 2, 4, 8)),
]


@pytest.mark.parametrize(("batch", "height", "width", "dilations"), SHAPES)
def test_par_affinity_matches_the_views_implementation(batch, height, width, dilations):
    generator = torch.Generator().manual_seed(height * 100 + width)
    images = torch.rand(batch, 3, height, width, generator=generator)
    images[0, :, : height // 2] = 0.25  # a flat region: sigma = 0 there, the 1e-8 guard decides
    for w1, w2 in [(0.3, 0.01), (0.1, 0.5)]:
        torch.testing.assert_close(
            par_affinity(images, dilations, w1=w1, w2=w2),
            _old_par_affinity(images, dilations, w1=w1, w2=w2),
            rtol=1e-4,  # the colour term is summed in another order; w1=0.1 sharpens the softmax 9-fold
            atol=1e-6,
        )


@pytest.mark.parametrize(("batch", "height", "width", "dilations"), SHAPES)
@pytest.mark.parametrize("iters", [0, 1, 10])
def test_par_refine_matches_the_views_implementation(batch, height, width, dilations, iters):
    generator = torch.Generator().manual_seed(height * 100 + width + iters)
    images = torch.rand(batch, 3, height, width, generator=generator)
    scores = torch.rand(batch, 5, height, width, generator=generator) * 4 - 1  # signed scores too
    expected = _old_par_refine(images, scores, dilations=dilations, iters=iters)
    torch.testing.assert_close(
        par_refine(images, scores, dilations=dilations, iters=iters), expected, rtol=1e-5, atol=1e-5
    )


def test_par_refine_matches_the_views_implementation_after_resizing_the_scores():
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 24, 36, generator=generator)
    scores = torch.rand(2, 6, 12, 18, generator=generator).softmax(dim=1)
    torch.testing.assert_close(par_refine(images, scores), _old_par_refine(images, scores), rtol=1e-5, atol=1e-6)


def test_par_refine_images_of_a_batch_are_independent():
    # the block-diagonal matrix: refining a batch equals refining each image alone
    generator = torch.Generator().manual_seed(8)
    images = torch.rand(3, 3, 16, 12, generator=generator)
    scores = torch.rand(3, 4, 16, 12, generator=generator)
    batched = par_refine(images, scores)
    for b in range(3):
        torch.testing.assert_close(batched[b : b + 1], par_refine(images[b : b + 1], scores[b : b + 1]))


def test_propagation_matrix_merges_clamped_neighbours_hand_case():
    # A 1x2 image, dilation 1: the 8 ring offsets (row-major) of pixel 0 (column 0) land, after clamping, on
    # columns [0, 0, 1, 0, 1, 0, 0, 1]; those of pixel 1 on [0, 1, 1, 0, 1, 0, 1, 1]. With weights
    # a_m(p0) = m + 1 and a_m(p1) = 10 (m + 1):
    #   P[0, 0] = 1 + 2 + 4 + 6 + 7 = 20        P[0, 1] = 3 + 5 + 8 = 16
    #   P[1, 0] = 10 (1 + 4 + 6) = 110          P[1, 1] = 10 (2 + 3 + 5 + 7 + 8) = 250
    # The second image of the batch (weights doubled) is its own block.
    from cpews.refine import _propagation_matrix

    m = torch.arange(1.0, 9.0)
    affinity = torch.stack([m, 10 * m], dim=1).view(1, 8, 1, 2)
    affinity = torch.cat([affinity, 2 * affinity])
    expected = torch.zeros(4, 4)
    expected[:2, :2] = torch.tensor([[20.0, 16.0], [110.0, 250.0]])
    expected[2:, 2:] = 2 * expected[:2, :2]
    assert torch.equal(_propagation_matrix(affinity, (1,)).to_dense(), expected)
    # one propagation step of the scores q = (1, 2) of the first image: (20 + 32, 110 + 500) = (52, 610)
    step = torch.sparse.mm(_propagation_matrix(affinity[:1], (1,)), torch.tensor([[1.0], [2.0]]))
    assert torch.equal(step, torch.tensor([[52.0], [610.0]]))


def test_par_refine_keeps_a_low_precision_dtype():
    generator = torch.Generator().manual_seed(9)
    images = torch.rand(1, 3, 12, 12, generator=generator)
    scores = torch.rand(1, 3, 12, 12, generator=generator)
    low = par_refine(images, scores.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), par_refine(images, scores.bfloat16().float()), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_par_and_the_pseudo_labels_do_not_synchronise_on_cuda():
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(10)
    cams = (torch.rand(2, 4, 64, 48, generator=generator) * torch.tensor([1.0, 0, 1, 0]).view(1, 4, 1, 1)).to(device)
    labels = torch.tensor([[1, 0, 1, 0], [1, 0, 1, 0]], device=device)
    images = torch.randn(2, 3, 64, 48, generator=generator).to(device)
    boxes = torch.tensor([[0, 64, 0, 48], [8, 60, 4, 40]], device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def pseudo_labels():
        return refine_pseudo_labels(cams, labels, images_for_par(images, mean, std), boxes)

    expected = pseudo_labels()  # first call: the kernel's index tensors are made and copied once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pseudo_labels()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out != expected).float().mean() < 1e-3  # index_add_ on CUDA may sum border weights in another order
    cpu = refine_pseudo_labels(cams.cpu(), labels.cpu(), images_for_par(images.cpu(), mean, std), boxes.cpu())
    assert (out.cpu() != cpu).float().mean() < 0.01  # the same labels up to rare float ties

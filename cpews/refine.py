"""Pixel-Adaptive Refinement (PAR) and the refined segmentation pseudo label (spec §4).

PAR follows AFA (Ru et al., "Learning Affinity from Attention", CVPR 2022), as copied into ToCo: a fixed
48-neighbour dilated ring, a colour affinity normalised by the local standard deviation plus a weak position
prior, propagated for a fixed number of iterations. Everything here runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpews.cam import box_mask

# The 8 ring offsets of a 3x3 window, centre excluded, in row-major order (AFA's kernel order).
_RING_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def par_kernel_offsets(dilations: Sequence[int]) -> Tensor:
    """Pixel offsets ``d * o`` of the PAR neighbourhood, dilation-major, ring offsets row-major (§4.1).

    Shapes:
        returns: (8 * len(dilations), 2) int64 ``(d_row, d_col)``; 48 rows for the default dilations.
    """
    offsets = [(d * dr, d * dc) for d in dilations for dr, dc in _RING_OFFSETS]
    return torch.tensor(offsets, dtype=torch.long)


def _clamp_pad(x: Tensor, pad: int) -> Tensor:
    """Replicate-pad the last two dims by ``pad`` via index clamping (works when ``pad`` exceeds the size).

    Shapes:
        x: (..., h, w).
        returns: (..., h + 2*pad, w + 2*pad).
    """
    height, width = x.shape[-2:]
    rows = torch.arange(-pad, height + pad, device=x.device).clamp_(0, height - 1)
    cols = torch.arange(-pad, width + pad, device=x.device).clamp_(0, width - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def _neighbour_views(padded: Tensor, offsets: Tensor, pad: int, size: tuple[int, int]) -> list[Tensor]:
    """The shifted views ``x(p + offset)`` of a clamp-padded tensor, one (..., h, w) view per offset."""
    height, width = size
    views = []
    for d_row, d_col in offsets.tolist():
        r0, c0 = pad + d_row, pad + d_col
        views.append(padded[..., r0 : r0 + height, c0 : c0 + width])
    return views


def _position_logits(offsets: Tensor, w1: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``kappa_pos`` for every neighbour: ``-(rho / ((std(rho) + 1e-8) * w1))^2`` with ``rho = d * |o|``.

    Shapes:
        returns: (M,) for M neighbours.
    """
    rho = offsets.to(dtype=torch.float64).norm(dim=1)
    std = rho.std()  # unbiased, over the M neighbours
    logits = -((rho / ((std + 1e-8) * w1)) ** 2)  # §4.1 position term
    return logits.to(dtype=dtype, device=device)


def par_affinity(
    images: Tensor,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    w1: float = 0.3,
    w2: float = 0.01,
) -> Tensor:
    """PAR affinity of each pixel to its dilated-ring neighbours (§4.1).

    ``a(p, q) = softmax_q kappa_rgb(p, q) + w2 * softmax_q kappa_pos(q)``, so each pixel's weights sum to
    ``1 + w2``. ``kappa_rgb(p, q) = -(1/3) sum_k (|I_k(p) - I_k(q)| / ((sigma_k(p) + 1e-8) * w1))^2`` where
    ``sigma_k(p)`` is the unbiased std of channel k over the neighbours of p. Out-of-image neighbours are
    clamped to the border (replicate padding).

    Shapes:
        images: (B, 3, h, w) RGB in [0, 1].
        returns: (B, M, h, w), M = 8 * len(dilations) (48 by default), in `par_kernel_offsets` order.
    """
    with torch.no_grad():
        offsets = par_kernel_offsets(dilations)
        pad = max(abs(d) for d in dilations)
        size = (images.shape[-2], images.shape[-1])
        neighbours = torch.stack(_neighbour_views(_clamp_pad(images, pad), offsets, pad, size), dim=2)
        # neighbours: (B, 3, M, h, w)
        sigma = neighbours.std(dim=2, keepdim=True)  # unbiased
        distance = (neighbours - images.unsqueeze(2)).abs() / ((sigma + 1e-8) * w1)
        colour_logits = -(distance**2).mean(dim=1)  # (B, M, h, w); §4.1 colour term
        position_logits = _position_logits(offsets, w1, images.dtype, images.device)
        position_term = torch.softmax(position_logits, dim=0)[None, :, None, None]
        return torch.softmax(colour_logits, dim=1) + w2 * position_term  # §4.1 affinity


def par_refine(
    images: Tensor,
    scores: Tensor,
    *,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
    w1: float = 0.3,
    w2: float = 0.01,
) -> Tensor:
    """Propagate score maps along the PAR affinity: ``Q(p) <- sum_q a(p, q) Q(q)``, ``iters`` times (§4.1).

    The scores are first resized to the image size (bilinear, align_corners=True) if they differ. The affinity
    is computed once; the weights are not renormalised (the uniform gain ``1 + w2`` keeps every argmax).

    Shapes:
        images: (B, 3, h, w) RGB in [0, 1].
        scores: (B, K, h', w') score maps.
        returns: (B, K, h, w).
    """
    with torch.no_grad():
        size = (images.shape[-2], images.shape[-1])
        if tuple(scores.shape[-2:]) != size:
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=True)
        affinity = par_affinity(images, dilations=dilations, w1=w1, w2=w2).to(scores.dtype)
        weights = affinity.unsqueeze(2).unbind(dim=1)  # M tensors of (B, 1, h, w)
        offsets = par_kernel_offsets(dilations)
        pad = max(abs(d) for d in dilations)
        for _ in range(iters):  # §4.1 propagation
            views = _neighbour_views(_clamp_pad(scores, pad), offsets, pad, size)
            refined = views[0] * weights[0]
            for view, weight in zip(views[1:], weights[1:], strict=True):
                refined.addcmul_(view, weight)
            scores = refined
        return scores


def images_for_par(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    downscale: int = 2,
) -> Tensor:
    """The image fed to PAR: denormalise to 0..255, truncate to uint8, divide by 255, downsample (§4.2).

    Shapes:
        images: (B, 3, H, W) normalised with ``(x / 255 - mean) / std``.
        returns: (B, 3, H // downscale, W // downscale) in [0, 1], dtype of ``images``.
    """
    with torch.no_grad():
        mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device)[None, :, None, None]
        std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device)[None, :, None, None]
        rgb = ((images * std_t + mean_t) * 255.0).clamp(0, 255).to(torch.uint8)  # truncating cast
        rgb = rgb.to(images.dtype) / 255.0
        height, width = images.shape[-2:]
        size = (height // downscale, width // downscale)
        if size == (height, width):
            return rgb
        return F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)


def _present_softmax(scores: Tensor, present: Tensor) -> Tensor:
    """Softmax over the background and present channels only (§4.3 step 2); absent channels become 0.

    Shapes:
        scores: (B, C+1, h, w), channel 0 = background. present: (B, C+1) bool. returns: (B, C+1, h, w).
    """
    return scores.masked_fill(~present[:, :, None, None], float("-inf")).softmax(dim=1)


def _argmax_present(scores: Tensor, present: Tensor) -> Tensor:
    """Argmax over channels where an absent class never wins. Shapes: (B, C+1, H, W) -> (B, H, W)."""
    return scores.masked_fill(~present[:, :, None, None], float("-inf")).argmax(dim=1)


def refine_pseudo_labels(
    cams: Tensor,
    labels: Tensor,
    par_images: Tensor,
    boxes: Tensor | None,
    *,
    high: float = 0.7,
    low: float = 0.25,
    downscale: int = 2,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
    w1: float = 0.3,
    w2: float = 0.01,
    ignore_index: int = 255,
) -> Tensor:
    """Refined segmentation pseudo label from the multi-scale CAM (§4.3).

    Two score stacks ``[high; cams]`` and ``[low; cams]`` (constant background channel) are downsampled,
    restricted to background + present classes with a softmax, refined by PAR, upsampled and arg-maxed into
    ``L_hi`` and ``L_lo``. Foreground comes from ``L_hi``; background only where both are background; the
    rest, and everything outside the box, is ``ignore_index``. With no positive class every in-box pixel is 0.

    Shapes:
        cams: (B, C, H, W) label-masked multi-scale CAMs (final layer).
        labels: (B, C) multi-hot image labels.
        par_images: (B, 3, H // downscale, W // downscale) from `images_for_par`.
        boxes: (B, 4) half-open pixel boxes ``(r0, r1, c0, c1)`` at ``H x W``, or None for "whole image".
        returns: (B, H, W) int64 in {0, present labels, ignore_index}.
    """
    with torch.no_grad():
        batch_size, _, height, width = cams.shape
        size = (height, width)
        small_size = (height // downscale, width // downscale)
        background_present = torch.ones(batch_size, 1, dtype=torch.bool, device=cams.device)
        present = torch.cat([background_present, labels.to(cams.device) > 0], dim=1)  # (B, C+1)
        kwargs = {"dilations": dilations, "iters": iters, "w1": w1, "w2": w2}

        small = cams if small_size == size else F.interpolate(cams, size=small_size, mode="bilinear", align_corners=False)
        stacks = [
            # §4.3 step 1 (resizing the constant channel with the stack leaves it constant)
            _present_softmax(torch.cat([torch.full_like(small[:, :1], value), small], dim=1), present)
            for value in (high, low)
        ]
        # Both stacks share the image, hence the affinity: refine them in one PAR pass (§4.3 step 3).
        refined = par_refine(par_images, torch.cat(stacks, dim=1), **kwargs)
        refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
        labels_high, labels_low = (_argmax_present(part, present) for part in refined.split(cams.shape[1] + 1, dim=1))
        ignore = torch.full_like(labels_high, ignore_index)
        pseudo_labels = torch.where(labels_high == 0, ignore, labels_high)  # §4.3 step 4
        pseudo_labels = torch.where((labels_high == 0) & (labels_low == 0), 0, pseudo_labels)
        if boxes is not None:
            pseudo_labels = torch.where(
                box_mask(boxes.to(cams.device), size), pseudo_labels, ignore
            )  # step 5
        return pseudo_labels

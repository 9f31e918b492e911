"""Class activation maps and the pseudo labels derived from them (spec §2 and §3 steps 1-3).

Pure tensor math: tensors in, tensors out; device and dtype follow the inputs.
Class convention: classifier channel ``c`` in ``0..C-1`` <-> label value ``c + 1``; ``0`` = background,
``ignore_index`` (255) = unknown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class CamPair(NamedTuple):
    """Multi-scale CAMs of the final and the auxiliary (intermediate-layer) classifier.

    Shapes:
        cams: (B, C, H, W) in [0, 1), absent classes exactly 0.
        aux_cams: (B, C, H, W) in [0, 1), absent classes exactly 0.
    """

    cams: Tensor
    aux_cams: Tensor


def cam_logits(tokens: Tensor, weight: Tensor) -> Tensor:
    """Single-view CAM logits: a bias-free 1x1 convolution of the patch tokens, no ReLU.

    Shapes:
        tokens: (B, D, h, w) patch tokens.
        weight: (C, D) or (C, D, 1, 1) classifier weights.
        returns: (B, C, h, w) with ``A[b, c, i] = sum_d W[c, d] * F[b, d, i]``.
    """
    weight_2d = weight.reshape(weight.shape[0], weight.shape[1])
    return torch.einsum("cd,bdhw->bchw", weight_2d.to(tokens.dtype), tokens)  # §2.1


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _merge_flip_views(maps: Tensor, batch_size: int, size: tuple[int, int]) -> Tensor:
    """(2B, C, h', w') maps of ``[X; hflip X]`` -> (B, C, H, W) element-wise max of the two views."""
    maps = _resize(maps, size)
    return torch.maximum(maps[:batch_size], maps[batch_size:].flip(-1))  # §2.2 step 3


def _min_max_normalize(scores: Tensor, eps: float) -> Tensor:
    """Per-(b, c) min-max normalisation over space: ``(S - min S) / (max(S - min S) + eps)``."""
    shifted = scores - scores.amin(dim=(-2, -1), keepdim=True)
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + eps)  # §2.2 step 5


def rescale_images(images: Tensor, scale: float) -> Tensor:
    """Bilinear resize to `(floor(scale*H), floor(scale*W))` (align_corners=False); scale 1 returns `images`.

    Shapes: images (B, C, H, W) -> (B, C, floor(scale*H), floor(scale*W)).
    """
    if scale == 1.0:
        return images
    height, width = images.shape[-2:]
    size = (max(1, math.floor(scale * height)), max(1, math.floor(scale * width)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def multiscale_cams(
    forward_cams: Callable[[Tensor], tuple[Tensor, Tensor]],
    images: Tensor,
    labels: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    eps: float = 1e-5,
) -> CamPair:
    """Multi-scale + horizontal-flip CAMs, normalised per (image, class) and masked by the image labels.

    For each scale ``s`` the batch is resized to ``(floor(s*H), floor(s*W))`` (scale 1.0 uses the images as
    they are), ``forward_cams`` runs once on ``[X_s; hflip(X_s)]`` under ``torch.no_grad()``, both views are
    upsampled to ``H x W``, un-flipped and merged with an element-wise max, then ReLU'd and summed over
    scales.

    Shapes:
        images: (B, 3, H, W) normalised images.
        labels: (B, C) multi-hot image labels (background not included).
        returns: CamPair of two (B, C, H, W) tensors in [0, 1); channels of absent classes are exactly 0.

    Args:
        forward_cams: maps a batch ``x`` (b, 3, h', w') to ``(cam_logits, aux_cam_logits)``, each
            (b, C, h'', w'') (see `cam_logits`).
        eps: the min-max normalisation guard (§2.2 step 5).
    """
    batch_size, _, height, width = images.shape
    size = (height, width)
    cam_sum: Tensor | None = None
    aux_sum: Tensor | None = None
    with torch.no_grad():
        for scale in scales:  # §2.2 step 1
            scaled = rescale_images(images, scale)
            both_views = torch.cat([scaled, scaled.flip(-1)], dim=0)  # §2.2 step 2
            logits, aux_logits = forward_cams(both_views)
            cam = F.relu(_merge_flip_views(logits, batch_size, size))  # §2.2 steps 3-4
            aux = F.relu(_merge_flip_views(aux_logits, batch_size, size))
            cam_sum = cam if cam_sum is None else cam_sum + cam
            aux_sum = aux if aux_sum is None else aux_sum + aux
        if cam_sum is None or aux_sum is None:
            raise ValueError("multiscale_cams needs at least one scale")
        mask = labels.to(cam_sum.dtype)[:, :, None, None]  # §2.2 step 6
        cams = _min_max_normalize(cam_sum, eps) * mask
        aux_cams = _min_max_normalize(aux_sum, eps) * mask
    return CamPair(cams=cams, aux_cams=aux_cams)


def _max_and_label(cams: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> max over classes (B, H, W) and the 1-based label of the argmax (ties -> lowest)."""
    if cams.shape[1] == 0:
        zeros = cams.new_zeros((cams.shape[0], *cams.shape[2:]))
        return zeros, zeros.long()
    max_values, indices = cams.max(dim=1)  # the first maximal index, as argmax (and faster on the CPU)
    return max_values, indices + 1


def box_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boolean mask of the half-open boxes ``(r0, r1, c0, c1)``.

    Shapes:
        boxes: (B, 4) integer boxes in the coordinates of ``size``.
        returns: (B, H, W) bool, True inside the box.
    """
    height, width = size
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    row_in = (rows[None, :] >= boxes[:, 0:1]) & (rows[None, :] < boxes[:, 1:2])  # (B, H)
    col_in = (cols[None, :] >= boxes[:, 2:3]) & (cols[None, :] < boxes[:, 3:4])  # (B, W)
    return row_in[:, :, None] & col_in[:, None, :]


def cams_to_labels(cams: Tensor, bkg_threshold: float) -> Tensor:
    """Plain-mode pseudo label: the argmax class where the max CAM exceeds ``bkg_threshold``, else background.

    Shapes:
        cams: (B, C, H, W) label-masked CAMs.
        returns: (B, H, W) int64 in {0..C}; ties go to the lowest class.
    """
    max_values, labels = _max_and_label(cams)
    return torch.where(max_values > bkg_threshold, labels, torch.zeros_like(labels))  # §2.3 plain mode


def cams_to_ignore_band_labels(
    cams: Tensor,
    high: float,
    low: float,
    boxes: Tensor | None,
    ignore_index: int = 255,
) -> Tensor:
    """Ignore-band pseudo label: class above ``high``, ignore in ``(low, high]``, background at/below ``low``.

    Shapes:
        cams: (B, C, H, W) label-masked CAMs.
        boxes: (B, 4) int64 half-open ``(r0, r1, c0, c1)`` valid boxes in the resolution of ``cams``, or None
            for "whole image".
        returns: (B, H, W) int64 in {0..C, ignore_index}; ``ignore_index`` outside the box.
    """
    max_values, labels = _max_and_label(cams)
    ignore = torch.full_like(labels, ignore_index)
    labels = torch.where(max_values > high, labels, ignore)  # §2.3 ignore-band mode
    labels = torch.where(max_values <= low, torch.zeros_like(labels), labels)
    if boxes is not None:
        inside = box_mask(boxes.to(cams.device), tuple(cams.shape[-2:]))
        labels = torch.where(inside, labels, ignore)  # §2.4(a)
    return labels


def token_boxes(
    boxes: Tensor,
    patch_size: int,
    grid_hw: tuple[int, int],
    mode: Literal["token", "toco"] = "token",
) -> Tensor:
    """Map valid pixel boxes to the token grid.

    ``"token"``: a token is valid iff its patch centre lies in the box, i.e. rows
    ``[ceil((r0 - P/2) / P), ceil((r1 - P/2) / P))`` and likewise columns, clipped to the grid (§2.4(b)).
    ``"toco"``: ToCo's behaviour, which slices the token label with the *pixel* box, i.e. the pixel box
    clipped to the grid.

    Shapes:
        boxes: (B, 4) integer half-open pixel boxes ``(r0, r1, c0, c1)``.
        returns: (B, 4) int64 half-open token boxes.
    """
    boxes = boxes.long()
    if mode == "token":
        # ceil((2x - P) / (2P)) computed exactly in integers.
        mapped = -torch.div(patch_size - 2 * boxes, 2 * patch_size, rounding_mode="floor")
    elif mode == "toco":
        mapped = boxes
    else:
        raise ValueError(f"unknown box mode {mode!r}; expected 'token' or 'toco'")
    limits = torch.tensor([grid_hw[0], grid_hw[0], grid_hw[1], grid_hw[1]], device=boxes.device)
    return torch.minimum(mapped.clamp(min=0), limits)


def valid_token_mask(boxes_tok: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Boolean mask of valid tokens.

    Shapes:
        boxes_tok: (B, 4) half-open token boxes from `token_boxes`.
        returns: (B, h, w) bool.
    """
    return box_mask(boxes_tok, grid_hw)


def affinity_targets(token_labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Pairwise token affinity target from token pseudo labels (§3 step 3).

    Shapes:
        token_labels: (B, h, w) int64 in {0..C, ignore_index}.
        returns: (B, N, N) int64, N = h*w: ``ignore_index`` if either token is ignored or i == j, 1 for the
            same label (two background tokens count as the same), 0 otherwise.
    """
    flat = token_labels.reshape(token_labels.shape[0], -1)
    num_tokens = flat.shape[1]
    same = (flat[:, :, None] == flat[:, None, :]).long()
    ignored = flat == ignore_index
    unknown = ignored[:, :, None] | ignored[:, None, :]
    unknown = unknown | torch.eye(num_tokens, dtype=torch.bool, device=flat.device)[None]
    return same.masked_fill(unknown, ignore_index)


def ism_token_labels(
    aux_cams: Tensor,
    boxes: Tensor | None,
    patch_size: int,
    grid_hw: tuple[int, int],
    high: float,
    low: float,
    box_mode: Literal["token", "toco"] = "token",
    ignore_index: int = 255,
) -> Tensor:
    """Token-grid pseudo label for the ISM loss (§3 steps 1-2).

    The aux CAM is resized bilinearly (align_corners=False) to the token grid and thresholded in ignore-band
    mode, with the pixel box mapped to tokens by `token_boxes`.

    Shapes:
        aux_cams: (B, C, H, W) label-masked auxiliary CAMs.
        boxes: (B, 4) half-open pixel boxes, or None for "whole image".
        returns: (B, h, w) int64 in {0..C, ignore_index}.
    """
    resized = _resize(aux_cams, tuple(grid_hw))
    boxes_tok = None if boxes is None else token_boxes(boxes, patch_size, grid_hw, mode=box_mode)
    return cams_to_ignore_band_labels(resized, high, low, boxes_tok, ignore_index=ignore_index)

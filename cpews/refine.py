"""Pixel-Adaptive Refinement (PAR) and the refined segmentation pseudo label (spec §4).

PAR follows AFA (Ru et al., "Learning Affinity from Attention", CVPR 2022), as copied into ToCo: a fixed
48-neighbour dilated ring, a colour affinity normalised by the local standard deviation plus a weak position
prior, propagated for a fixed number of iterations. Everything here runs under ``torch.no_grad()``.

The neighbours are gathered with one clamped index (no loop over the kernel), and the propagation is a sparse
CSR matrix product (``h*w`` rows of at most 48 entries) repeated ``iters`` times, with no host-device sync.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import NamedTuple

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


# Constants of the PAR kernel are made once per shape, settings and device, on the CPU and copied to the device
# once: a copy per call from pageable memory would synchronise the host with the device.
_CACHE_SIZE = 16


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _neighbour_index(size: tuple[int, int], dilations: tuple[int, ...], device: torch.device) -> Tensor:
    """Flat index of the neighbour ``p + offset`` of every pixel, clamped to the border (replicate padding).

    Shapes:
        returns: (M, h*w) int64 into a row-major ``h x w`` grid, in `par_kernel_offsets` order.
    """
    height, width = size
    offsets = par_kernel_offsets(dilations)
    rows = torch.arange(height)[None, :, None] + offsets[:, 0, None, None]
    cols = torch.arange(width)[None, None, :] + offsets[:, 1, None, None]
    index = rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)  # (M, h, w)
    return index.reshape(len(offsets), height * width).to(device)


def _gather_neighbours(x: Tensor, index: Tensor) -> Tensor:
    """``x(p + offset)`` for every offset in one gather.

    Shapes: x (B, C, h, w), index (M, h*w) from `_neighbour_index` -> (B, C, M, h, w).
    """
    batch, channels, height, width = x.shape
    gathered = x.reshape(batch, channels, height * width).index_select(-1, index.reshape(-1))
    return gathered.view(batch, channels, index.shape[0], height, width)


class _PropagationPattern(NamedTuple):
    """The sparsity pattern of one image's PAR propagation matrix, clamped duplicate neighbours merged.

    ``crow`` / ``col`` are the CSR row pointers and sorted column indices of the ``U`` distinct
    (pixel, neighbour) pairs, int32 (the index type of MKL's and cuSPARSE's fast paths); ``slot`` maps each of
    the ``M * n`` (offset, pixel) entries of the affinity, offset-major, to its pair, int64.
    Shapes: crow (n + 1,), col (U,), slot (M * n,).
    """

    crow: Tensor
    col: Tensor
    slot: Tensor


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _propagation_pattern(
    size: tuple[int, int], dilations: tuple[int, ...], device: torch.device
) -> _PropagationPattern:
    """`_PropagationPattern` of an ``h x w`` image (made on the CPU: `torch.unique` on a device synchronises)."""
    pixels = size[0] * size[1]
    index = _neighbour_index(size, dilations, torch.device("cpu"))  # (M, n)
    keys = torch.arange(pixels)[None, :] * pixels + index  # (pixel, neighbour) pairs, row-major order
    unique_keys, slot = torch.unique(keys.reshape(-1), sorted=True, return_inverse=True)
    rows = torch.div(unique_keys, pixels, rounding_mode="floor")
    crow = torch.zeros(pixels + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=pixels).cumsum(0)
    col = unique_keys - rows * pixels
    return _PropagationPattern(crow.int().to(device), col.int().to(device), slot.to(device))


def _propagation_matrix(affinity: Tensor, dilations: Sequence[int]) -> Tensor:
    """The block-diagonal sparse CSR matrix ``P`` with ``(P q)(p) = sum_m a_m(p) q(p + offset_m)`` (§4.1).

    Neighbours clamped onto the same pixel add up, as the summed shifted views of a replicate-padded image do.

    Shapes:
        affinity: (B, M, h, w) from `par_affinity`.
        returns: (B*h*w, B*h*w) sparse CSR of the dtype of ``affinity``; image b owns rows and columns
            ``b*h*w .. (b+1)*h*w - 1``.
    """
    batch, _, height, width = affinity.shape
    pixels = height * width
    pattern = _propagation_pattern((height, width), tuple(dilations), affinity.device)
    pairs = pattern.col.numel()
    values = affinity.new_zeros(batch, pairs).index_add_(1, pattern.slot, affinity.reshape(batch, -1))
    index_dtype = torch.int32 if batch * pairs < 2**31 else torch.int64
    crow, col = pattern.crow.to(index_dtype), pattern.col.to(index_dtype)
    images = torch.arange(batch, device=affinity.device, dtype=index_dtype)[:, None]
    crow = torch.cat([(crow[:-1] + images * pairs).reshape(-1), crow[-1:] * batch])
    col = (col + images * pixels).reshape(-1)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(
            crow, col, values.reshape(-1), (batch * pixels, batch * pixels), check_invariants=False
        )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _position_term(dilations: tuple[int, ...], w1: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``softmax_q kappa_pos(q)`` with ``kappa_pos = -(rho / ((std(rho) + 1e-8) * w1))^2``, ``rho = d * |o|``.

    Shapes:
        returns: (M,) for M neighbours, in `par_kernel_offsets` order.
    """
    rho = par_kernel_offsets(dilations).to(dtype=torch.float64).norm(dim=1)
    std = rho.std()  # unbiased, over the M neighbours
    logits = -((rho / ((std + 1e-8) * w1)) ** 2)  # §4.1 position term
    return torch.softmax(logits.to(dtype), dim=0).to(device)


def _unbiased_std(x: Tensor, dim: int) -> Tensor:
    """Unbiased std over `dim`, kept as a size-1 dim, in two passes (mean, then squared deviations).

    Equal to ``x.std(dim, keepdim=True)`` to float rounding; ~7x faster than it over a middle dim on the CPU
    (a (B, 3, M, h, w) neighbour stack: torch.std reduces it with strided Welford updates).
    """
    deviations = x - x.mean(dim=dim, keepdim=True)
    return deviations.square_().sum(dim=dim, keepdim=True).div_(x.shape[dim] - 1).sqrt_()


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
        dilations = tuple(dilations)
        size = (images.shape[-2], images.shape[-1])
        neighbours = _gather_neighbours(images, _neighbour_index(size, dilations, images.device))  # (B, 3, M, h, w)
        sigma = _unbiased_std(neighbours, dim=2)
        scale = ((sigma + 1e-8) * w1).square_().mul_(images.shape[1])  # (B, 3, 1, h, w); mean over channels
        colour_logits = -((neighbours - images.unsqueeze(2)).square_() / scale).sum(dim=1)  # §4.1 colour term
        position_term = _position_term(dilations, float(w1), images.dtype, images.device)[None, :, None, None]
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
        if iters == 0:
            return scores
        dtype = torch.promote_types(scores.dtype, torch.float32)  # sparse products need float32 on the CPU
        affinity = par_affinity(images, dilations=dilations, w1=w1, w2=w2).to(dtype)
        batch, channels = scores.shape[:2]
        pixels = size[0] * size[1]
        flat = scores.to(dtype).reshape(batch, channels, pixels).transpose(1, 2).reshape(batch * pixels, channels)
        with torch.autocast(images.device.type, enabled=False):
            matrix = _propagation_matrix(affinity, dilations)
            for _ in range(iters):  # §4.1 propagation
                flat = torch.sparse.mm(matrix, flat)
        refined = flat.view(batch, pixels, channels).transpose(1, 2).reshape(batch, channels, *size)
        return refined.to(scores.dtype)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _channel_vector(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-channel constants as a (1, C, 1, 1) tensor on ``device``, copied there once."""
    return torch.tensor(values, dtype=dtype)[None, :, None, None].to(device)


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
        mean_t = _channel_vector(tuple(mean), images.dtype, images.device)
        std_t = _channel_vector(tuple(std), images.dtype, images.device)
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
    # `max(dim).indices` breaks ties like `argmax` (the first maximal index) and is ~6x faster on the CPU here
    return scores.masked_fill(~present[:, :, None, None], float("-inf")).max(dim=1).indices


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

"""Prototype losses of the Contextual Prototype Module: PDL and SSL (method.md §7).

Both act on the training forward of the current crops: the final tokens F (B, D, h, w) and the single-view
CAM logits A = W * F (B, C, h, w), both with gradient, restricted to the valid (non-padded) tokens V_b
(§2.4(c)). The prototypes come from the fixed pool (§6.5) and get no gradient.

Everything is computed densely over all (b, c) pairs with masks, so no step needs a device sync; the
diagnostics (`rms_pos`, `pairs`, ...) are detached 0-dim tensors for the same reason.
Pure tensor math: tensors in, tensors out; device and dtype follow the inputs (computed in float32 at least).

Reference:
    Chen et al., "FPR: False Positive Rectification for Weakly Supervised Semantic Segmentation", ICCV 2023
    (region-contrast and pixel-rectification losses). Reference code: mt-cly/FPR.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PDL_MASK_EPS = 1e-4  # §7.1: A⁺ = ReLU(A) / (max_V A + 1e-4)
SSL_MASK_EPS = 1e-3  # §7.3: Â = ReLU(A) / (max_V A + 1e-3)
REGION_EPS = 1e-5  # §7.2: r = sum_M F / (|M| + 1e-5)
DISTANCE_EPS = 1e-4  # §7.2: δ = sqrt(mean_d (u - v)^2 + 1e-4)
SIMILARITY_SHIFT = 0.1  # §7.2: s = exp(-(δ/τ + 0.1)), which caps s at e^-0.1
FAR = 1e6  # stands in for the distance to a missing prototype (padding rows); never selected when one exists


class PdlOutput(NamedTuple):
    loss: Tensor  # () mean ℓ⁺ + mean ℓ⁻ over the pairs 𝒥; 0 (connected to the tokens) when 𝒥 is empty
    rms_pos: Tensor  # () detached mean δ(r, p̄_c) over 𝒥; NaN when 𝒥 is empty
    rms_neg: Tensor  # () detached mean min_k δ(r, N_{c,k}) over 𝒥; NaN when 𝒥 is empty
    pairs: Tensor  # () int64 |𝒥|


class SslOutput(NamedTuple):
    loss: (
        Tensor  # () mean raw CAM logit over the false-positive tokens; 0 (connected to A) when there are none
    )
    tokens_suppressed: Tensor  # () int64 number of selected (b, c, i)


def _valid_max(cams: Tensor, valid: Tensor) -> Tensor:
    """(B, C, h, w) CAM logits and (B, h, w) valid tokens -> (B, C, 1, 1) max over the valid tokens
    (-inf for an image without valid tokens)."""
    masked = cams.masked_fill(~valid[:, None], float("-inf"))
    return masked.amax(dim=(-2, -1), keepdim=True)


def _normalized_cams(cams: Tensor, valid: Tensor, eps: float) -> Tensor:
    """ReLU(A) / (max_{V_b} A + eps), detached, zero outside V_b.

    Where max_{V_b} A <= 0, every valid value of ReLU(A) is 0 and the map is 0 there (the spec's formula gives
    0, or 0/0 which compares false); the denominator is clamped so that no NaN appears.
    """
    cams = cams.detach().float()
    denominator = _valid_max(cams, valid).clamp_min(0) + eps
    return F.relu(cams) / denominator * valid[:, None]


def prototype_region_masks(cams: Tensor, valid: Tensor, threshold: float = 0.1) -> Tensor:
    """Region of each (image, class): the valid tokens whose normalized CAM exceeds `threshold` (§7.1).

    Shapes:
        cams: (B, C, h, w) CAM logits A (detached here).
        valid: (B, h, w) bool valid tokens V_b.
        returns: (B, C, h, w) bool, False outside V_b.

    Formula:
        A⁺_{b,c} = ReLU(A_{b,c}) / (max_{i in V_b} A_{b,c,i} + 1e-4),  M_{b,c} = {i in V_b : A⁺_{b,c,i} > θ_r}
    """
    return (_normalized_cams(cams, valid, PDL_MASK_EPS) > threshold) & valid[:, None]


def _rms_distance(u: Tensor, v: Tensor) -> Tensor:
    """δ(u, v) = sqrt(mean_d (u_d - v_d)^2 + 1e-4) over the last dim, broadcasting the rest (§7.2)."""
    return ((u - v) ** 2).mean(dim=-1).add(DISTANCE_EPS).sqrt()


def _row_mask(counts: Tensor, rows: int) -> Tensor:
    """(C,) counts -> (C, K) bool, True for the valid (leading) rows."""
    return torch.arange(rows, device=counts.device)[None, :] < counts[:, None]


def pdl_loss(
    tokens: Tensor,
    cams: Tensor,
    labels: Tensor,
    valid: Tensor,
    pos: Tensor,
    pos_n: Tensor,
    neg: Tensor,
    neg_n: Tensor,
    *,
    region_threshold: float = 0.1,
    temperature: float = 13.0,
) -> PdlOutput:
    """Prototype Discrimination Loss: pull each class region's feature towards the class's positive
    prototypes, push it away from the closest negative prototype (≡ FPR's region-contrast loss, §7.2).

    Shapes:
        tokens: (B, D, h, w) final tokens F (gradient flows through the region features).
        cams: (B, C, h, w) CAM logits A; used only for the detached masks, so W gets no gradient.
        labels: (B, C) multi-hot image labels.
        valid: (B, h, w) bool valid tokens V_b.
        pos, neg: (C, K, D) positive prototypes (k-means centres) and top-K negatives; buffers, no gradient.
        pos_n, neg_n: (C,) number of valid rows of each.
        returns: PdlOutput, loss ().

    Formula, with M_{b,c} the §7.1 mask and the pairs
    𝒥 = {(b,c) : y_bc = 1, max_{V_b} A_bc > 0, pos_n[c] > 0, neg_n[c] > 0, M_bc ≠ ∅}:
        r_bc = sum_{i in M_bc} F_{b,:,i} / (|M_bc| + 1e-5)
        δ(u, v) = sqrt((1/D) * sum_d (u_d - v_d)^2 + 1e-4),   s(u, v) = exp(-(δ(u, v)/τ + 0.1))
        ℓ⁺_bc = -log s(r_bc, p̄_c) = δ(r_bc, p̄_c)/τ + 0.1,   p̄_c = mean_{k < pos_n[c]} P_{c,k}
        ℓ⁻_bc = -log(1 - max_{k < neg_n[c]} s(r_bc, N_{c,k}))
        L = mean_𝒥 ℓ⁺ + mean_𝒥 ℓ⁻   (0 if 𝒥 is empty)

    Reference:
        Chen et al., "FPR: False Positive Rectification for Weakly Supervised Semantic Segmentation",
        ICCV 2023 (region-contrast loss, RC_weight). Reference code: mt-cly/FPR.
    """
    tokens = tokens.float()
    batch, dim = tokens.shape[:2]
    masks = prototype_region_masks(cams, valid, region_threshold)  # (B, C, h, w), detached §7.1
    flat_masks = masks.flatten(2).to(tokens.dtype)  # (B, C, N)
    counts = flat_masks.sum(dim=-1)  # (B, C)
    has_activation = (_valid_max(cams.detach().float(), valid) > 0).flatten(1)  # (B, C)
    pairs = (labels > 0.5) & has_activation & (counts > 0) & (pos_n > 0)[None] & (neg_n > 0)[None]  # 𝒥
    regions = torch.einsum("bcn,bdn->bcd", flat_masks, tokens.flatten(2)) / (counts[..., None] + REGION_EPS)
    pos = pos.to(tokens)
    neg = neg.to(tokens)
    pos_rows = _row_mask(pos_n, pos.shape[1]).to(tokens.dtype)  # (C, K)
    pos_mean = (pos * pos_rows[..., None]).sum(dim=1) / pos_n.clamp_min(1)[:, None].to(tokens.dtype)  # p̄_c
    distance_pos = _rms_distance(regions, pos_mean[None])  # (B, C)
    distance_neg = _rms_distance(regions[:, :, None, :], neg[None])  # (B, C, K)
    neg_rows = _row_mask(neg_n, neg.shape[1])
    closest_neg = distance_neg.masked_fill(~neg_rows[None], FAR).amin(dim=-1)  # max s <=> min δ
    positive_term = distance_pos / temperature + SIMILARITY_SHIFT  # ℓ⁺ = -log s
    negative_term = -torch.log(-torch.expm1(-(closest_neg / temperature + SIMILARITY_SHIFT)))  # -log(1 - s)
    weights = pairs.to(tokens.dtype)
    num_pairs = weights.sum()
    denominator = num_pairs.clamp_min(1)
    loss = (positive_term * weights).sum() / denominator + (negative_term * weights).sum() / denominator
    with torch.no_grad():
        rms_pos = (distance_pos * weights).sum() / num_pairs  # NaN when 𝒥 is empty
        rms_neg = (closest_neg * weights).sum() / num_pairs
    return PdlOutput(loss, rms_pos.detach(), rms_neg.detach(), pairs.sum())


def _min_squared_distance(tokens: Tensor, prototypes: Tensor, counts: Tensor) -> Tensor:
    """min over the valid prototypes of (1/D)·||F_{b,:,i} - P_{c,k}||² -> (B, C, N); FAR where none is valid.

    Shapes: tokens (B, D, N); prototypes (C, K, D); counts (C,).
    """
    dim = tokens.shape[1]
    token_norms = (tokens**2).sum(dim=1)  # (B, N)
    prototype_norms = (prototypes**2).sum(dim=-1)  # (C, K)
    cross = torch.einsum("ckd,bdn->bckn", prototypes, tokens)
    squared = (token_norms[:, None, None, :] - 2 * cross + prototype_norms[None, :, :, None]).clamp_min(
        0
    ) / dim
    rows = _row_mask(counts, prototypes.shape[1])
    return squared.masked_fill(~rows[None, :, :, None], FAR).amin(dim=2)


def ssl_loss(
    tokens: Tensor,
    cams: Tensor,
    labels: Tensor,
    valid: Tensor,
    pos: Tensor,
    pos_n: Tensor,
    neg_ss: Tensor,
    neg_ss_n: Tensor,
    *,
    region_threshold: float = 0.1,
) -> SslOutput:
    """Superclass Suppression Loss: lower the CAM logits of activated tokens that lie closer to a
    superclass-filtered negative prototype than to every positive one (≡ FPR's pixel-rectification loss with
    superclass-filtered negatives, §7.3).

    Shapes:
        tokens: (B, D, h, w) final tokens F; used only to select tokens (no gradient from the selection).
        cams: (B, C, h, w) CAM logits A = W * F; the loss is their mean over the selection, so the gradient
            reaches W and F.
        labels: (B, C) multi-hot; valid: (B, h, w) bool valid tokens V_b.
        pos, neg_ss: (C, K, D) positive prototypes and superclass-filtered negatives Ñ_c.
        pos_n, neg_ss_n: (C,) their valid row counts.
        returns: SslOutput, loss ().

    Formula, for (b,c) with y_bc = 1, pos_n[c] > 0, neg_ss_n[c] > 0 and valid tokens i (no gradient):
        d⁺_i = min_k (1/D)·||F_{b,:,i} - P_{c,k}||²,   d⁻_i = min_k (1/D)·||F_{b,:,i} - Ñ_{c,k}||²
        Â_bc = ReLU(A_bc) / (max_{V_b} A_bc + 1e-3)
        𝒮_bc = {i in V_b : Â_bc,i > θ_r and d⁺_i > d⁻_i}
        L = mean of A_{b,c,i} over all (b, c, i) with i in 𝒮_bc   (0 if there are none)
    Pairs whose class has no positive prototype are skipped (FPR gives them an infinite d⁺ instead [D]).

    Reference:
        Chen et al., "FPR: False Positive Rectification for Weakly Supervised Semantic Segmentation",
        ICCV 2023 (pixel-rectification loss, PR_weight). Reference code: mt-cly/FPR.
    """
    cams = cams.float()
    pairs = (labels > 0.5) & (pos_n > 0)[None] & (neg_ss_n > 0)[None]  # (B, C)
    with torch.no_grad():
        flat_tokens = tokens.detach().float().flatten(2)  # (B, D, N)
        distance_pos = _min_squared_distance(flat_tokens, pos.to(flat_tokens), pos_n)  # (B, C, N)
        distance_neg = _min_squared_distance(flat_tokens, neg_ss.to(flat_tokens), neg_ss_n)
        activated = _normalized_cams(cams, valid, SSL_MASK_EPS).flatten(2) > region_threshold
        selected = activated & (distance_pos > distance_neg) & valid.flatten(1)[:, None] & pairs[..., None]
    weights = selected.to(cams.dtype)
    count = selected.sum()
    loss = (cams.flatten(2) * weights).sum() / count.clamp_min(1).to(cams.dtype)
    return SslOutput(loss, count)

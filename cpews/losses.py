"""CPEWS losses: classification (§1.3), ISM (§3) and the balanced segmentation loss (§5.2).

The prototype losses PDL and SSL (§7) live alongside these once implemented.
Pure tensor math: tensors in, scalar tensors out; device and dtype follow the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multilabel soft-margin loss, averaged over the batch and the classes (§1.3).

    Shapes:
        logits: (B, C) image-level class logits z.
        labels: (B, C) multi-hot targets y (background not included); an all-zero row is valid.
        returns: () scalar.

    Formula:
        L = -1/(B*C) sum_{b,c} [ y_bc * log sigmoid(z_bc) + (1 - y_bc) * log sigmoid(-z_bc) ]
    This equals ``F.multilabel_soft_margin_loss(logits, labels)``.
    """
    targets = labels.to(logits.dtype)
    per_entry = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))  # §1.3
    return per_entry.mean()


def ism_loss(tokens: Tensor, affinity: Tensor, ignore_index: int = 255) -> Tensor:
    """Pull together final-layer tokens that share an aux-CAM pseudo label; push the other pairs apart (§3).

    Shapes:
        tokens: (B, D, H, W) final-layer patch tokens (after the final LayerNorm).
        affinity: (B, N, N) integer from `cpews.cam.affinity_targets`, N = H*W. 1 = same class,
            0 = different, `ignore_index` = unknown pair (an uncertain token, or i == j).
        returns: () scalar in [0, 1].

    Formula, with s_ij = |cos(t_i, t_j)| and P, Q the positive and negative pairs of the whole batch:
        L = 0.5 * (1 - sum_{(i,j) in P} s_ij / (|P| + 1)) + 0.5 * sum_{(i,j) in Q} s_ij / (|Q| + 1)
    The +1 terms follow the authors' implementation and keep L finite when P or Q is empty; an all-ignore
    affinity gives exactly 0.5 and no gradient.

    Reference:
        Ru et al., "Token Contrast for Weakly-Supervised Semantic Segmentation", CVPR 2023,
        arXiv:2303.01267 (PTC module). Reference code: rulixiang/ToCo, model/losses.py.
    """
    flat = tokens.flatten(2)  # (B, D, N)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)  # §3 step 4
    similarity = torch.bmm(unit.transpose(1, 2), unit).abs()  # (B, N, N) absolute cosine
    positive = (affinity == 1).to(similarity.dtype)
    negative = (affinity == 0).to(similarity.dtype)
    positive_term = (similarity * positive).sum() / (positive.sum() + 1)  # §3 step 5
    negative_term = (similarity * negative).sum() / (negative.sum() + 1)
    return 0.5 * (1 - positive_term) + 0.5 * negative_term


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize decoder logits to the label size (align_corners=False, §5.1).

    Shapes:
        logits: (B, C+1, h, w).
        returns: (B, C+1, H, W) with ``(H, W) = size``.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _masked_mean_cross_entropy(logits: Tensor, targets: Tensor, keep: Tensor, ignore_index: int) -> Tensor:
    """Mean CE over the pixels where ``keep`` is True; 0 (with a zero gradient) if there are none."""
    targets = targets.masked_fill(~keep, ignore_index)
    per_pixel = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    count = keep.sum()
    return per_pixel.sum() / count.clamp_min(1).to(per_pixel.dtype)


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Background/foreground-balanced cross-entropy on the refined pseudo label (§5.2).

    Shapes:
        logits: (B, C+1, H, W) decoder logits, already at the label size (see `upsample_logits`).
        labels: (B, H, W) integer in {0..C, ignore_index}.
        returns: () scalar.

    Formula:
        L = 0.5 * (mean_{Y=0} -log softmax(logits)_0 + mean_{Y in 1..C} -log softmax(logits)_Y)
    Pixels with `ignore_index` are skipped. An empty background or foreground set contributes 0 (PyTorch's
    mean-reduced CE would return NaN), so the loss is finite even for an all-ignore label.

    Reference:
        ToCo (rulixiang/ToCo), utils/losses.py ``get_seg_loss``.
    """
    labels = labels.long()
    valid = labels != ignore_index
    background = valid & (labels == 0)
    foreground = valid & (labels != 0)
    background_loss = _masked_mean_cross_entropy(logits, labels, background, ignore_index)  # §5.2 CE_bg
    foreground_loss = _masked_mean_cross_entropy(logits, labels, foreground, ignore_index)  # §5.2 CE_fg
    return 0.5 * (background_loss + foreground_loss)

"""Contextual Prototype Module (CPM): building the prototype pool (method.md §6).

The build pass (§6.2) averages the final tokens F and CAM logits A of each training image over several
scaled and flipped views, pools the tokens inside each class's CAM region, and sorts the region features
into positive candidates (the class is in the image) and a bounded top-K list of negatives (it is not,
ranked by the predicted probability). K-means on the positives gives the positive prototypes; the
negatives are kept raw; a superclass filter selects the negatives the SSL may use (§6.3). The result is
stored in the §6.5 format, which `CpewsNet.set_pool` copies into the model's buffers.

The tensor functions (`kmeans`, `region_features`, `superclass_filter`, `PoolCandidates`) take tensors and
return tensors on the inputs' device. `view_averages` and `build_pool` call a model through its forward
only (anything returning an object with `tokens`, `cams` and `logits`, as `CpewsNet` does), so this module
imports nothing from `cpews.model` or `cpews.data`. Pool files, their JSON metadata and a PCA picture are
written by `save_pool` and `plot_pool`.

Reference: Chen et al., "FPR: False Positive Rectification for Weakly Supervised Semantic Segmentation",
ICCV 2023 (prototype construction). Reference code: mt-cly/FPR.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpews.cam import rescale_images
from cpews.torch_files import TorchFileError, load_torch_file

POOL_FORMAT = "cpews-pool"
POOL_VERSION = 1
POOL_KEYS = ("pos", "pos_n", "neg", "neg_n", "neg_ss", "neg_ss_n", "neg_score", "neg_img")
REGION_EPS = 1e-5  # §6.2 step 3: Ǎ = ReLU(Ā) / (max ReLU(Ā) + 1e-5)


class PoolError(ValueError):
    """A file is not a readable cpews prototype pool."""


# ------------------------------------------------------------------------------------------------------------
# K-means (§6.3).
# ------------------------------------------------------------------------------------------------------------


class KMeansResult(NamedTuple):
    centers: Tensor  # (K_c, D) in the compute dtype, K_c = min(k, N)
    labels: Tensor  # (N,) int64 cluster of each point
    inertia: float  # sum of squared distances of the points to their centres


def kmeans(
    x: Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> KMeansResult:
    """Lloyd's k-means with greedy k-means++ seeding; the best of `n_init` restarts by inertia.

    The same algorithm as scikit-learn's `KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter,
    algorithm="lloyd")` (method.md §6.3 uses `random_state=0, n_init=10, max_iter=10`), with two differences:
    the random stream is torch's (seeded by `seed` through a `torch.Generator` on x's device), so the
    restarts start from other centres than sklearn's; and Lloyd stops early only when no label changes
    (sklearn also stops when the centres move less than `tol`), so each restart runs at least as many
    inertia-decreasing iterations. All restarts run at once as batched matrix products.

    Seeding (Arthur & Vassilvitskii 2007, greedy variant as in sklearn): the first centre is a uniformly drawn
    point; every further centre is the best, by the resulting potential, of `2 + floor(log k)` points drawn
    with probability proportional to their squared distance to the closest chosen centre.
    Empty clusters are moved to the points farthest from their centres, as sklearn does.

    Shapes:
        x: (N, D) points, any float dtype; computed in `dtype` (float64 by default, §6.3).
        returns: KMeansResult with centers (min(k, N), D), labels (N,).

    With N <= k every point is its own centre (inertia 0); with N = 0 the result is empty.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, D) points, got shape {tuple(x.shape)}")
    if k < 1 or n_init < 1 or max_iter < 0:
        raise ValueError(f"kmeans needs k >= 1, n_init >= 1, max_iter >= 0 (got {k}, {n_init}, {max_iter})")
    n, dim = x.shape
    data = x.detach().to(dtype)
    if n <= k:  # K_c = min(K, N) (§6.3)
        return KMeansResult(data.clone(), torch.arange(n, device=x.device), 0.0)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    offset = data.mean(dim=0)
    centered = data - offset  # as sklearn: distances of centred data lose less precision
    squared_norms = (centered * centered).sum(dim=1)
    centers = _kmeans_plusplus(centered, squared_norms, k, n_init, generator)  # (R, k, D)
    labels, distances = _assign(centered, squared_norms, centers)
    active = torch.arange(n_init, device=x.device)  # restarts still moving; a converged one is a fixed point
    for _ in range(max_iter):
        new_centers = _update_centers(centered, labels[active], distances[active], k)
        new_labels, new_distances = _assign(centered, squared_norms, new_centers)
        moved = (new_labels != labels[active]).any(dim=1)
        centers[active], labels[active], distances[active] = new_centers, new_labels, new_distances
        active = active[moved]
        if len(active) == 0:
            break
    best = int(distances.sum(dim=1).argmin())
    best_centers, best_labels = centers[best], labels[best]
    inertia = float(((centered - best_centers[best_labels]) ** 2).sum())  # exact, not the expanded formula
    return KMeansResult(best_centers + offset, best_labels, inertia)


def _squared_distances(points: Tensor, squared_norms: Tensor, centers: Tensor) -> Tensor:
    """(N, D) points and (R, k, D) centres -> (R, N, k) squared distances, one matrix product for all R."""
    restarts, k, dim = centers.shape
    cross = (points @ centers.reshape(restarts * k, dim).T).reshape(-1, restarts, k).transpose(0, 1)
    center_norms = (centers * centers).sum(dim=-1)  # (R, k)
    return (squared_norms[None, :, None] - 2 * cross + center_norms[:, None, :]).clamp_min_(0)


def _assign(points: Tensor, squared_norms: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centre (R, N) and the squared distance to it (R, N)."""
    distances, labels = _squared_distances(points, squared_norms, centers).min(dim=-1)
    return labels, distances


def _update_centers(points: Tensor, labels: Tensor, distances: Tensor, k: int) -> Tensor:
    """Cluster means (R, k, D); an empty cluster takes the point farthest from its centre (as sklearn)."""
    restarts, n = labels.shape
    one_hot = torch.zeros(restarts, k, n, dtype=points.dtype, device=points.device)
    one_hot.scatter_(1, labels[:, None, :], 1.0)
    counts = one_hot.sum(dim=-1)  # (R, k)
    sums = (one_hot.reshape(restarts * k, n) @ points).reshape(restarts, k, -1)
    centers = sums / counts.clamp_min(1)[..., None]
    empty = counts == 0
    if bool(empty.any()):
        for r in torch.nonzero(empty.any(dim=1)).flatten().tolist():
            empty_ids = torch.nonzero(empty[r]).flatten()
            farthest = distances[r].topk(len(empty_ids)).indices
            centers[r, empty_ids] = points[farthest]
    return centers


def _kmeans_plusplus(
    points: Tensor, squared_norms: Tensor, k: int, restarts: int, generator: torch.Generator
) -> Tensor:
    """Greedy k-means++ seeding for `restarts` independent runs at once -> (R, k, D) initial centres."""
    n, dim = points.shape
    device, dtype = points.device, points.dtype
    trials = 2 + int(math.log(k))  # sklearn's number of local trials
    rows = torch.arange(restarts, device=device)
    centers = torch.empty(restarts, k, dim, dtype=dtype, device=device)
    first = torch.randint(n, (restarts,), generator=generator, device=device)
    centers[:, 0] = points[first]
    closest = (squared_norms[first][:, None] - 2 * points[first] @ points.T + squared_norms[None]).clamp_min_(
        0
    )
    potential = closest.sum(dim=1)  # (R,)
    for c in range(1, k):
        draws = (
            torch.rand(restarts, trials, generator=generator, dtype=dtype, device=device) * potential[:, None]
        )
        candidates = torch.searchsorted(closest.cumsum(dim=1), draws).clamp_(max=n - 1)  # (R, T)
        candidate_points = points[candidates]  # (R, T, D)
        to_candidates = (
            squared_norms[candidates][..., None]
            - 2 * (candidate_points.reshape(-1, dim) @ points.T).reshape(restarts, trials, n)
            + squared_norms[None, None]
        ).clamp_min_(0)
        to_candidates = torch.minimum(to_candidates, closest[:, None, :])  # (R, T, N)
        potentials = to_candidates.sum(dim=-1)  # (R, T)
        best = potentials.argmin(dim=1)
        closest = to_candidates[rows, best]
        potential = potentials[rows, best]
        centers[:, c] = points[candidates[rows, best]]
    return centers


# ------------------------------------------------------------------------------------------------------------
# The build pass (§6.2).
# ------------------------------------------------------------------------------------------------------------


class ViewAverages(NamedTuple):
    tokens: Tensor  # (B, D, h, w) F̄, on the scale-1 token grid
    cams: Tensor  # (B, C, h, w) Ā, raw CAM logits (no ReLU)
    logits: Tensor  # (B, C) z̄


def view_averages(
    model: nn.Module,
    images: Tensor,
    scales: Sequence[float],
    flip: bool = True,
    *,
    patch_size: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> ViewAverages:
    """Average the final tokens, CAM logits and logits over scaled (and flipped) views (§6.2 steps 1-2).

    Each scale `s` resizes the batch bilinearly to `(floor(s*H), floor(s*W))` (scale 1.0 uses the images as
    they are); the flipped view is flipped back; F and A are resized bilinearly (align_corners=False) to the
    token grid of the scale-1 view, `(H // patch_size, W // patch_size)`. The averages are raw: no ReLU.
    Runs under `torch.no_grad()`; outputs are float32.

    Shapes:
        images: (B, 3, H, W) normalized images.
        returns: ViewAverages of (B, D, h, w), (B, C, h, w) and (B, C).

    Args:
        model: maps (b, 3, h', w') images to an object with `tokens` (b, D, ., .), `cams` (b, C, ., .) and
            `logits` (b, C) (a `CpewsNet`).
        patch_size: the patch size defining the scale-1 grid (default: `model.patch_size`).
        autocast: a context factory the forwards run under (e.g. bf16 autocast on CUDA).
    """
    if not scales:
        raise ValueError("view_averages needs at least one scale")
    batch_size, _, height, width = images.shape
    patch_size = patch_size or model.patch_size
    grid = (height // patch_size, width // patch_size)
    token_sum = cam_sum = logit_sum = None
    views = 0
    with torch.no_grad():
        for scale in scales:  # §6.2 step 1
            scaled = rescale_images(images, scale)
            batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
            with autocast():
                output = model(batch)
            tokens = _resize(output.tokens.float(), grid)
            cams = _resize(output.cams.float(), grid)
            logits = output.logits.float()
            if flip:  # un-flip the flipped half, then sum the two views
                tokens = tokens[:batch_size] + tokens[batch_size:].flip(-1)
                cams = cams[:batch_size] + cams[batch_size:].flip(-1)
                logits = logits[:batch_size] + logits[batch_size:]
            token_sum = tokens if token_sum is None else token_sum + tokens
            cam_sum = cams if cam_sum is None else cam_sum + cams
            logit_sum = logits if logit_sum is None else logit_sum + logits
            views += 2 if flip else 1
    return ViewAverages(token_sum / views, cam_sum / views, logit_sum / views)  # §6.2 step 2


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def region_features(tokens: Tensor, cams: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Mask-average-pool the tokens inside each class's normalized CAM region (§6.2 steps 3-4).

    Shapes:
        tokens: (B, D, h, w) view-averaged tokens F̄.
        cams: (B, C, h, w) view-averaged CAM logits Ā.
        returns: features (B, C, D) and nonempty (B, C) bool; an empty region gives a zero row and False.

    Formula:
        Ǎ_c = ReLU(Ā_c) / (max ReLU(Ā_c) + 1e-5),  M_c = {i : Ǎ_{c,i} > threshold},
        r_c = mean_{i in M_c} F̄_{:,i}
    """
    positive = F.relu(cams.float())
    normalized = positive / (positive.amax(dim=(-2, -1), keepdim=True) + REGION_EPS)  # §6.2 step 3
    masks = (normalized > threshold).flatten(2).to(tokens.dtype)  # (B, C, N)
    counts = masks.sum(dim=-1)  # (B, C)
    sums = torch.einsum("bcn,bdn->bcd", masks, tokens.flatten(2))  # §6.2 step 4
    return sums / counts.clamp_min(1)[..., None], counts > 0


class NegativeCandidates(NamedTuple):
    """The kept top-K negatives of every class, by descending score (ties: smaller image index first).

    Shapes: features (C, K, D); scores (C, K); images (C, K) int64, -1 for padding; source_labels (C, K, C)
    bool, the label vector of the source image; counts (C,) int64. Padding rows are zero.
    """

    features: Tensor
    scores: Tensor
    images: Tensor
    source_labels: Tensor
    counts: Tensor


class PoolCandidates:
    """Accumulates the positive candidates and the bounded top-K negatives of every class (§6.2 steps 5-6).

    Positives are kept in full (they are clustered at the end); negatives are merged after each batch into a
    top-K list per class ranked by the score (σ(z̄)), ties broken by the smaller image index, so memory stays
    (C, K, D) whatever the dataset size. Tensors stay on the device of the first batch.
    """

    def __init__(self, num_classes: int, num_prototypes: int, dim: int) -> None:
        self.num_classes, self.num_prototypes, self.dim = num_classes, num_prototypes, dim
        self._positive_features: list[Tensor] = []  # chunks of (P, D), with their classes in _positive_classes
        self._positive_classes: list[Tensor] = []
        self._positive_counts: Tensor | None = None  # (C,) on the device, read once at the end
        self._label_counts: Tensor | None = None  # (C,) images of each class seen
        self.images_seen = 0
        self._negatives: NegativeCandidates | None = None

    def add(
        self, features: Tensor, nonempty: Tensor, labels: Tensor, scores: Tensor, image_indices: Tensor
    ) -> None:
        """Offer one batch of region features.

        Shapes:
            features: (B, C, D) region features; nonempty: (B, C) bool; labels: (B, C) multi-hot;
            scores: (B, C) negative ranking score π = σ(z̄); image_indices: (B,) int64 dataset positions.
        """
        present = labels > 0.5
        positive = present & nonempty  # §6.2 step 5
        pairs = torch.nonzero(positive)  # (P, 2) rows (b, c) in image order; the one device sync per batch
        self._positive_features.append(features[pairs[:, 0], pairs[:, 1]])
        self._positive_classes.append(pairs[:, 1])
        self._positive_counts = _accumulate(self._positive_counts, positive.sum(dim=0))
        self._label_counts = _accumulate(self._label_counts, present.sum(dim=0))
        self.images_seen += features.shape[0]
        self._merge_negatives(features, ~present & nonempty, present, scores, image_indices)  # §6.2 step 6

    @property
    def positive_counts(self) -> list[int]:
        """|𝒫_c| for every class."""
        return [0] * self.num_classes if self._positive_counts is None else self._positive_counts.tolist()

    @property
    def label_counts(self) -> list[int]:
        """Number of images seen with each class's label."""
        return [0] * self.num_classes if self._label_counts is None else self._label_counts.tolist()

    def _merge_negatives(
        self, features: Tensor, offered: Tensor, present: Tensor, scores: Tensor, image_indices: Tensor
    ) -> None:
        c_count, k = self.num_classes, self.num_prototypes
        batch = features.shape[0]
        kept = self._negatives or _empty_negatives(c_count, k, self.dim, features)
        kept_valid = torch.arange(k, device=features.device)[None, :] < kept.counts[:, None]  # (C, K)
        all_features = torch.cat([kept.features, features.transpose(0, 1)], dim=1)  # (C, K+B, D)
        all_scores = torch.cat([kept.scores, scores.float().T], dim=1)
        all_images = torch.cat([kept.images, image_indices.long()[None, :].expand(c_count, batch)], dim=1)
        all_labels = torch.cat([kept.source_labels, present[None].expand(c_count, batch, c_count)], dim=1)
        all_valid = torch.cat([kept_valid, offered.T], dim=1)
        # Lexicographic order (valid first, score descending, image ascending) by stable sorts from the
        # least significant key up.
        order = torch.sort(
            torch.where(all_valid, all_images, torch.iinfo(torch.int64).max), dim=1, stable=True
        )[1]
        by_score = torch.where(all_valid, all_scores, -math.inf).gather(1, order)
        order = order.gather(1, torch.sort(by_score, dim=1, descending=True, stable=True)[1])
        order = order[:, :k]
        counts = all_valid.sum(dim=1).clamp_max(k)
        keep = torch.arange(k, device=features.device)[None, :] < counts[:, None]
        self._negatives = NegativeCandidates(
            features=all_features.gather(1, order[..., None].expand(-1, -1, self.dim)) * keep[..., None],
            scores=all_scores.gather(1, order) * keep,
            images=torch.where(keep, all_images.gather(1, order), -1),
            source_labels=all_labels.gather(1, order[..., None].expand(-1, -1, c_count)) & keep[..., None],
            counts=counts,
        )

    def positives(self, c: int) -> Tensor:
        """(|𝒫_c|, D) positive candidates of class c in image order."""
        if not self._positive_features:
            return torch.zeros(0, self.dim)
        if len(self._positive_features) > 1:  # concatenate once
            self._positive_features = [torch.cat(self._positive_features)]
            self._positive_classes = [torch.cat(self._positive_classes)]
        return self._positive_features[0][self._positive_classes[0] == c]

    def negatives(self) -> NegativeCandidates:
        if self._negatives is None:
            return _empty_negatives(self.num_classes, self.num_prototypes, self.dim, torch.zeros(0))
        return self._negatives


def _accumulate(total: Tensor | None, value: Tensor) -> Tensor:
    return value.clone() if total is None else total + value


def _empty_negatives(c_count: int, k: int, dim: int, like: Tensor) -> NegativeCandidates:
    device = like.device
    return NegativeCandidates(
        features=torch.zeros(
            c_count, k, dim, dtype=like.dtype if like.is_floating_point() else torch.float32, device=device
        ),
        scores=torch.zeros(c_count, k, device=device),
        images=torch.full((c_count, k), -1, dtype=torch.int64, device=device),
        source_labels=torch.zeros(c_count, k, c_count, dtype=torch.bool, device=device),
        counts=torch.zeros(c_count, dtype=torch.int64, device=device),
    )


def superclass_filter(
    source_labels: Tensor,
    counts: Tensor,
    superclasses: Sequence[str],
    *,
    exclude_singleton_superclass: bool = True,
) -> Tensor:
    """Which kept negatives may serve the SSL (§6.3 superclass filter, applied after the top-K selection).

    A negative of class c from image n is kept iff (i) no class present in image n shares c's superclass
    and (ii), when `exclude_singleton_superclass`, c's superclass has more than one member (FPR's rule: a
    singleton such as VOC's `person` never gets filtered negatives).

    Shapes:
        source_labels: (C, K, C) bool/multi-hot, the label vector of each negative's source image.
        counts: (C,) number of valid negatives per class (rows >= counts are padding).
        returns: (C, K) bool.
    """
    num_classes, k = source_labels.shape[:2]
    if len(superclasses) != num_classes:
        raise ValueError(f"{len(superclasses)} superclasses for {num_classes} classes")
    names = {name: i for i, name in enumerate(dict.fromkeys(superclasses))}
    ids = torch.tensor([names[s] for s in superclasses], device=source_labels.device)
    same = ids[:, None] == ids[None, :]  # (C, C): c' shares c's superclass
    shares = (source_labels.bool() & same[:, None, :]).any(dim=-1)  # (C, K), rule (i)
    valid = torch.arange(k, device=source_labels.device)[None, :] < counts.to(source_labels.device)[:, None]
    keep = valid & ~shares
    if exclude_singleton_superclass:
        keep &= (same.sum(dim=1) > 1)[:, None]  # rule (ii)
    return keep


def compact_rows(values: Tensor, keep: Tensor, fill: float = 0) -> tuple[Tensor, Tensor]:
    """Move the kept rows of each class to the front, in order, and fill the rest.

    Shapes:
        values: (C, K, ...); keep: (C, K) bool.
        returns: (C, K, ...) compacted values and the (C,) int64 number of kept rows.
    """
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True)[1]
    counts = keep.sum(dim=1)
    index = order.reshape(*order.shape, *([1] * (values.ndim - 2))).expand_as(values)
    moved = values.gather(1, index)
    inside = torch.arange(keep.shape[1], device=keep.device)[None, :] < counts[:, None]
    inside = inside.reshape(*inside.shape, *([1] * (values.ndim - 2)))
    return torch.where(inside, moved, torch.full_like(moved, fill)), counts


# ------------------------------------------------------------------------------------------------------------
# Building a pool (§6.2-§6.3) and its file format (§6.5).
# ------------------------------------------------------------------------------------------------------------


class Pool(NamedTuple):
    """A prototype pool: the §6.5 tensors (CPU; float32 features/scores, int64 counts/indices) and its meta.

    Shapes (C classes, K prototypes, D dims): pos, neg, neg_ss (C, K, D); pos_n, neg_n, neg_ss_n (C,);
    neg_score (C, K); neg_img (C, K), -1 for padding. Valid rows come first; padding rows are zero.
    `meta` is JSON-serialisable.
    """

    tensors: dict[str, Tensor]
    meta: dict[str, Any]


def _collate_images_labels(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    return {
        "image": torch.stack([item["image"] for item in items]),
        "labels": torch.stack([torch.as_tensor(item["labels"]) for item in items]),
    }


def build_pool(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    num_classes: int,
    num_prototypes: int,
    region_threshold: float,
    scales: Sequence[float],
    superclasses: Sequence[str],
    exclude_singleton_superclass: bool,
    kmeans_n_init: int,
    kmeans_max_iter: int,
    kmeans_seed: int,
    patch_size: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    class_names: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: Callable[[str], None] | None = print,
) -> Pool:
    """Build the prototype pool from `model` over `dataset`, in order, without augmentation (§6.2-§6.3).

    Args:
        model: see `view_averages`; put in eval mode for the pass and restored afterwards.
        dataset: items with `image` (3, S, S) normalized (all the same size, e.g. an `EvalDataset` built with
            `resize=proto.resize`) and `labels` (C,); the image index of a negative is its position here.
            `dataset`, `split` and `ids` attributes, when present, go into the meta and the content key.
        superclasses: C superclass names by classifier channel (§6.4).
        patch_size: defines the scale-1 token grid (default: `model.patch_size`).
        class_names: C foreground names for the meta and the progress lines (default "0".."C-1").
        meta: extra JSON-serialisable entries for the meta (e.g. `iteration`, `checkpoint`, `backbone`).
        autocast: context factory for the forwards (e.g. bf16 autocast on CUDA).
        progress: receives progress lines; None for silence.

    Returns:
        A `Pool` in the §6.5 format. Edge cases (§6.6): a class absent from the dataset or never activated has
        pos_n = 0 and is listed in the meta; an image without a positive class gives negatives only.
    """
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_images_labels,
        generator=torch.Generator(),  # leaves the global RNG untouched (training continues identically)
    )
    total = len(dataset)
    was_training = model.training
    model.eval()
    candidates: PoolCandidates | None = None
    seen = 0
    report_every = max(1, total // 10)
    next_report = report_every
    say(
        f"pool build: {total} images, scales {tuple(scales)} + flip, K={num_prototypes}, theta_r={region_threshold}"
    )
    try:
        for batch in loader:
            images = batch["image"].to(device)
            labels = batch["labels"].to(device)
            averaged = view_averages(model, images, scales, patch_size=patch_size, autocast=autocast)
            features, nonempty = region_features(averaged.tokens, averaged.cams, region_threshold)
            if candidates is None:
                candidates = PoolCandidates(num_classes, num_prototypes, features.shape[-1])
            indices = torch.arange(seen, seen + images.shape[0], device=device)
            candidates.add(features, nonempty, labels, torch.sigmoid(averaged.logits), indices)  # π = σ(z̄)
            seen += images.shape[0]
            if seen >= next_report or seen == total:
                say(f"pool build: {seen}/{total} images ({time.perf_counter() - started:.1f} s)")
                next_report = seen + report_every
    finally:
        model.train(was_training)
    forward_seconds = time.perf_counter() - started
    if candidates is None:
        raise ValueError("build_pool: the dataset is empty")
    dim = candidates.dim
    pos = torch.zeros(num_classes, num_prototypes, dim)
    pos_n = torch.zeros(num_classes, dtype=torch.int64)
    inertias: list[float | None] = []
    for c in range(num_classes):  # §6.3 positives
        points = candidates.positives(c)
        if len(points) == 0:
            inertias.append(None)
            continue
        k_started = time.perf_counter()
        result = kmeans(
            points, num_prototypes, n_init=kmeans_n_init, max_iter=kmeans_max_iter, seed=kmeans_seed
        )
        pos[c, : len(result.centers)] = result.centers.float().cpu()
        pos_n[c] = len(result.centers)
        inertias.append(result.inertia)
        say(
            f"pool build: k-means {names[c]!r}: {len(points)} candidates -> {len(result.centers)} centres, "
            f"inertia {result.inertia:.4g} ({time.perf_counter() - k_started:.2f} s)"
        )
    negatives = candidates.negatives()  # §6.3 negatives: sorted by descending π, not clustered
    keep = superclass_filter(
        negatives.source_labels,
        negatives.counts,
        superclasses,
        exclude_singleton_superclass=exclude_singleton_superclass,
    )
    neg_ss, neg_ss_n = compact_rows(negatives.features, keep)
    tensors = {
        "pos": pos,
        "pos_n": pos_n,
        "neg": negatives.features.float().cpu(),
        "neg_n": negatives.counts.cpu(),
        "neg_ss": neg_ss.float().cpu(),
        "neg_ss_n": neg_ss_n.cpu(),
        "neg_score": negatives.scores.float().cpu(),
        "neg_img": negatives.images.cpu(),
    }
    params = pool_params(
        num_prototypes=num_prototypes,
        region_threshold=region_threshold,
        scales=scales,
        resize=getattr(dataset, "resize", None),
        superclasses=superclasses,
        exclude_singleton_superclass=exclude_singleton_superclass,
        kmeans_n_init=kmeans_n_init,
        kmeans_max_iter=kmeans_max_iter,
        kmeans_seed=kmeans_seed,
    )
    absent = [names[c] for c in range(num_classes) if candidates.label_counts[c] == 0]
    inactive = [
        names[c]
        for c in range(num_classes)
        if candidates.label_counts[c] > 0 and candidates.positive_counts[c] == 0
    ]
    info: dict[str, Any] = {
        "format": POOL_FORMAT,
        "version": POOL_VERSION,
        "num_prototypes": num_prototypes,
        "region_threshold": region_threshold,
        "scales": list(scales),
        "resize": getattr(dataset, "resize", None),
        "dim": dim,
        "num_classes": num_classes,
        "class_names": names,
        "superclasses": dict(zip(names, superclasses)),
        "ssl_exclude_singleton_superclass": exclude_singleton_superclass,
        "kmeans": {"n_init": kmeans_n_init, "max_iter": kmeans_max_iter, "seed": kmeans_seed},
        "dataset": getattr(dataset, "dataset", None),
        "split": getattr(dataset, "split", None),
        "num_images": seen,
        "backbone": type(getattr(model, "backbone", model)).__name__,
        "content_key": dataset_content_key(model, dataset, params),
        "label_counts": list(candidates.label_counts),
        "positive_candidates": list(candidates.positive_counts),
        "pos_n": pos_n.tolist(),
        "neg_n": tensors["neg_n"].tolist(),
        "neg_ss_n": tensors["neg_ss_n"].tolist(),
        "kmeans_inertia": inertias,
        "absent_classes": absent,  # no image of the split has the label
        "inactive_classes": inactive,  # labelled, but the CAM region was always empty
        "forward_seconds": round(forward_seconds, 3),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    info.update(dict(meta or {}))
    say(
        f"pool build: done in {info['build_seconds']:.1f} s; pos_n={info['pos_n']} neg_n={info['neg_n']} "
        f"neg_ss_n={info['neg_ss_n']}"
        + (f"; no positives for {absent + inactive}" if absent + inactive else "")
    )
    return Pool(tensors, info)


def pool_params(
    *,
    num_prototypes: int,
    region_threshold: float,
    scales: Sequence[float],
    resize: int | None,
    superclasses: Sequence[str],
    exclude_singleton_superclass: bool,
    kmeans_n_init: int,
    kmeans_max_iter: int,
    kmeans_seed: int,
) -> dict[str, Any]:
    """The build settings that, with the images and the model, determine a pool (for `pool_content_key`)."""
    return {
        "num_prototypes": int(num_prototypes),
        "region_threshold": float(region_threshold),
        "scales": [float(s) for s in scales],
        "resize": resize,
        "superclasses": list(superclasses),
        "exclude_singleton_superclass": bool(exclude_singleton_superclass),
        "kmeans_n_init": int(kmeans_n_init),
        "kmeans_max_iter": int(kmeans_max_iter),
        "kmeans_seed": int(kmeans_seed),
    }


def dataset_content_key(model: torch.nn.Module, dataset: object, params: Mapping[str, object]) -> str:
    """`pool_content_key` of a pool built from `model` on `dataset` (an EvalDataset) with `params`."""
    return pool_content_key(
        dataset=str(getattr(dataset, "dataset", "")),
        split=str(getattr(dataset, "split", "")),
        image_ids=list(getattr(dataset, "ids", []) or []),
        model_state=model.state_dict(),
        pool_params=params,
    )


def pool_content_key(
    *,
    dataset: str,
    split: str,
    image_ids: Sequence[str],
    model_state: Mapping[str, Tensor],
    pool_params: Mapping[str, object],
) -> str:
    """sha256 hex digest of everything that determines a pool: the images (ids in order), the model weights
    and buffers (except the `pool_*` buffers, which the pool itself fills) and the build parameters."""
    digest = hashlib.sha256()

    def feed(text: str) -> None:
        encoded = text.encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)

    feed(POOL_FORMAT)
    feed(dataset)
    feed(split)
    feed(str(len(image_ids)))
    for image_id in image_ids:
        feed(str(image_id))
    for name in sorted(model_state):
        if name.rsplit(".", 1)[-1].startswith("pool_"):
            continue
        tensor = model_state[name].detach().cpu().contiguous()
        feed(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    feed(json.dumps(dict(pool_params), sort_keys=True, default=str))
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pool(path: str | Path, pool: Pool) -> Path:
    """Write `path` (torch.save of the tensors and their shapes, with the meta as a JSON string so that a
    weights-only load reads it) and `path` with suffix `.json` (the meta), each atomically."""
    path = Path(path)
    meta_text = json.dumps(pool.meta, indent=2, sort_keys=True)
    tensors = {key: pool.tensors[key].detach().cpu().contiguous() for key in POOL_KEYS}
    payload = {
        "format": POOL_FORMAT,
        "version": POOL_VERSION,
        "tensors": tensors,
        "shapes": {key: list(tensor.shape) for key, tensor in tensors.items()},
        "meta": meta_text,
    }
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(meta_text + "\n"))
    return path


def load_pool(path: str | Path) -> Pool:
    """Read a pool written by `save_pool`; anything else is refused with a one-line `PoolError` naming the file
    and what is wrong (missing, truncated, damaged, not a pool, tensors that do not match their recorded shapes)."""
    path = Path(path)
    where = f"prototype pool {str(path)!r}"
    try:
        payload = load_torch_file(path)
    except TorchFileError as exc:
        raise PoolError(f"{where}: {exc.reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != POOL_FORMAT:
        raise PoolError(f"{where} is not a cpews pool file (no '{POOL_FORMAT}' marker)")
    if payload.get("version") != POOL_VERSION:
        raise PoolError(f"{where} has format version {payload.get('version')!r}; this cpews reads {POOL_VERSION}")
    tensors = payload.get("tensors")
    missing = [key for key in POOL_KEYS if not isinstance(tensors, dict) or not torch.is_tensor(tensors.get(key))]
    if missing:
        raise PoolError(f"{where} lacks the tensors {missing}")
    recorded = payload.get("shapes")  # absent from files written before the shapes were recorded
    if recorded is not None:
        wrong = [key for key in POOL_KEYS if list(tensors[key].shape) != list(dict(recorded).get(key, []))]
        if wrong:
            key = wrong[0]
            raise PoolError(f"{where} is damaged: tensor {key!r} has shape {tuple(tensors[key].shape)}, the file "
                            f"records {tuple(dict(recorded).get(key, ()))}")
    try:
        meta = json.loads(payload["meta"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise PoolError(f"{where}: unreadable meta: {exc}") from None
    if not isinstance(meta, dict):
        raise PoolError(f"{where}: unreadable meta: not a JSON object")
    return Pool({key: tensors[key] for key in POOL_KEYS}, meta)


def load_cached_pool(path: str | Path, *, content_key: str, shapes: Mapping[str, Sequence[int]]) -> Pool:
    """`load_pool`, then check that the file is the pool of `content_key` (its meta's `content_key`) and that its
    tensors have the `shapes` the model's pool buffers have (`POOL_KEYS` -> shape).

    Raises:
        PoolError: as `load_pool`, or another content key, or a tensor of another shape; one line naming the file.
    """
    pool = load_pool(path)
    where = f"prototype pool {str(path)!r}"
    stored = pool.meta.get("content_key")
    if stored != content_key:
        found = f"content key {str(stored)[:16]}..." if stored else "no content key"
        raise PoolError(f"{where} holds {found}, not the expected {content_key[:16]}... (a pool of other images, "
                        "weights or settings)")
    for key in POOL_KEYS:
        if tuple(pool.tensors[key].shape) != tuple(shapes[key]):
            raise PoolError(f"{where}: tensor {key!r} has shape {tuple(pool.tensors[key].shape)}, the model's pool "
                            f"needs {tuple(shapes[key])}")
    return pool


# ------------------------------------------------------------------------------------------------------------
# Picture.
# ------------------------------------------------------------------------------------------------------------


def _class_colours(count: int) -> list[tuple[int, int, int]]:
    colours = []
    for i in range(count):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 0.85 if i % 2 == 0 else 0.6)
        colours.append((int(255 * r), int(255 * g), int(255 * b)))
    return colours


def plot_pool(pool: Pool, path: str | Path, *, size: tuple[int, int] = (640, 480)) -> Path:
    """Draw a PNG of the pool: a 2-D PCA of the positive (filled circles) and negative (crosses) prototypes,
    coloured by class, with a legend of class names (classes with no prototype are left out of it)."""
    from PIL import Image, ImageDraw, ImageFont

    t = pool.tensors
    num_classes = t["pos"].shape[0]
    names = list(pool.meta.get("class_names") or [str(c) for c in range(num_classes)])
    rows, kinds, classes = [], [], []
    for c in range(num_classes):
        for key, count_key, kind in (("pos", "pos_n", "pos"), ("neg", "neg_n", "neg")):
            n = int(t[count_key][c])
            rows.append(t[key][c, :n].double())
            kinds += [kind] * n
            classes += [c] * n
    points = torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)
    coords = torch.zeros(len(points), 2, dtype=torch.float64)
    explained = ""
    if len(points) >= 2:
        centered = points - points.mean(dim=0)
        _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
        dims = min(2, vh.shape[0])
        coords[:, :dims] = centered @ vh[:dims].T
        variance = singular**2
        if float(variance.sum()) > 0:
            shares = (variance[:dims] / variance.sum()).tolist()
            explained = " (" + ", ".join(f"PC{i + 1} {s:.0%}" for i, s in enumerate(shares)) + ")"
    shown = sorted(set(classes))
    legend_rows = max(1, (size[1] - 70) // 14)
    columns = max(1, math.ceil(len(shown) / legend_rows))
    width = size[0] + max(0, columns - 1) * 130
    image = Image.new("RGB", (width, size[1]), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = 50, 40, size[0] - 170, size[1] - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    title = f"prototype pool: PCA{explained}; K={pool.meta.get('num_prototypes', '?')}, D={points.shape[-1]}"
    draw.text((left, 12), title, fill="black", font=font)
    draw.text((left, bottom + 10), "PC1", fill="black", font=font)
    draw.text((8, (top + bottom) // 2), "PC2", fill="black", font=font)
    colours = _class_colours(num_classes)
    if len(coords):
        low, high = coords.amin(dim=0), coords.amax(dim=0)
        span = (high - low).clamp_min(1e-12)
        margin = 12
        xs = left + margin + (coords[:, 0] - low[0]) / span[0] * (right - left - 2 * margin)
        ys = bottom - margin - (coords[:, 1] - low[1]) / span[1] * (bottom - top - 2 * margin)
        for x, y, kind, c in zip(xs.tolist(), ys.tolist(), kinds, classes):
            colour = colours[c]
            if kind == "pos":
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour, outline="black")
            else:
                draw.line([x - 4, y - 4, x + 4, y + 4], fill=colour, width=2)
                draw.line([x - 4, y + 4, x + 4, y - 4], fill=colour, width=2)
    legend_x, legend_y = right + 12, top
    draw.ellipse([legend_x, legend_y + 2, legend_x + 8, legend_y + 10], fill="grey", outline="black")
    draw.text((legend_x + 14, legend_y), "positive", fill="black", font=font)
    draw.line([legend_x + 70, legend_y + 2, legend_x + 78, legend_y + 10], fill="grey", width=2)
    draw.line([legend_x + 70, legend_y + 10, legend_x + 78, legend_y + 2], fill="grey", width=2)
    draw.text((legend_x + 84, legend_y), "negative", fill="black", font=font)
    for i, c in enumerate(shown):
        column, row = divmod(i, legend_rows)
        x, y = legend_x + column * 130, legend_y + 22 + row * 14
        draw.rectangle([x, y + 2, x + 8, y + 10], fill=colours[c])
        draw.text((x + 14, y), str(names[c])[:18], fill="black", font=font)
    if not shown:
        draw.text((left + 10, top + 10), "empty pool", fill="black", font=font)
    path = Path(path)
    _atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path

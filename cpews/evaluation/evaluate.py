"""Evaluation (method.md §9): mIoU of CAM, aux CAM, refined pseudo label and segmentation.

CAMs and pseudo labels are computed at the in-training size (`eval.size`, §9.2) and their score maps are
resized to the label size; the segmentation is either single scale at that size (in training) or the final
protocol of §9.3 on the original image (multi-scale + flip, optional dense CRF).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cpews.cam import cams_to_labels, multiscale_cams, rescale_images
from cpews.config import TrainConfig
from cpews.crf import crf_executor, crf_pool_size, start_dense_crf_labels
from cpews.metrics import (
    ConfusionMeter,
    check_label_range,
    class_iou,
    confusion_matrix,
    multilabel_f1,
    segmentation_scores,
)
from cpews.model import CpewsNet, CpewsOutput
from cpews.refine import images_for_par, refine_pseudo_labels

SCORE_NAMES = ("cam", "aux_cam", "pseudo", "seg")
CAM_SCORE_NAMES = ("cam", "aux_cam", "pseudo")  # the scores that `cams=False` leaves out


class EvalResult(NamedTuple):
    # miou_cam, miou_aux_cam, miou_pseudo, miou_seg, f1, ... (fractions); baseline_miou = the mIoU of predicting
    # background everywhere on the same images (the floor every miou_* must beat)
    metrics: dict[str, float]
    per_class: list[dict[str, object]]  # one row per class: name and IoU of each score
    # with `evaluate(..., per_image=True)`: {"ids": [...], "miou_<score>": [one mIoU per image], ...,
    # "baseline_miou": [the all-background mIoU of each image]}
    per_image: dict[str, list] | None = None


def image_miou(pred: Tensor, gt: Tensor, num_classes: int) -> float:
    """The mIoU of one image (§9.1 on its own confusion matrix: mean over the classes in its ground truth).

    Shapes: pred, gt (H, W) labels; 255 = ignore.
    """
    return float(segmentation_scores(confusion_matrix(pred, gt, num_classes)).miou)


def confusion_mious(confusions: Tensor) -> Tensor:
    """The mIoU of each confusion matrix, computed as `cpews.metrics.segmentation_scores` does (§9.1).

    Shapes: confusions (B, K, K) counts ``Hm[b, g, p]`` -> (B,) float64; NaN where no pixel is labelled.
    """
    return class_iou(confusions).nanmean(dim=-1)


class BatchPixels:
    """The ground-truth pixels of a batch of images of any sizes, flattened once to score many predictions.

    `confusions` counts every image's confusion matrix with one `bincount`, the same counts as
    `cpews.metrics.confusion_matrix` on each image (pixels whose ground truth or prediction is `ignore_index`
    are skipped).

    Shapes (B images, P = sum of their pixels): masks[b] (H_b, W_b) labels in 0..K-1 and `ignore_index`, moved
    to `device` (default: theirs) once flattened.

    Raises:
        ValueError: a ground-truth label outside [0, K) that is not `ignore_index`.
    """

    def __init__(
        self, masks: Sequence[Tensor], num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        self.num_images, self.num_classes, self.ignore_index = len(masks), num_classes, ignore_index
        self.gt = flatten_maps(masks).to(device if device is not None else masks[0].device)  # one copy
        counts = torch.tensor([m.numel() for m in masks], device=self.gt.device)
        self.image = torch.repeat_interleave(torch.arange(len(masks), device=self.gt.device), counts)  # (P,)
        self.labelled = self.gt != ignore_index
        self.labelled_count = int(self.labelled.sum())
        check_label_range(self.gt[self.labelled], num_classes, ignore_index, "gt")

    def confusions(self, pred: Tensor) -> Tensor:
        """Per-image confusion matrices of a flattened prediction (P,) -> (B, K, K) int64."""
        k = self.num_classes
        keep = self.labelled & (pred != self.ignore_index)
        pred_kept = pred[keep]
        check_label_range(pred_kept, k, self.ignore_index, "pred")
        flat_index = (self.image[keep] * k + self.gt[keep]) * k + pred_kept
        return torch.bincount(flat_index, minlength=self.num_images * k * k).reshape(self.num_images, k, k)

    def ignored_predictions(self, pred: Tensor) -> int:
        """Labelled pixels whose flattened prediction (P,) is `ignore_index`."""
        return int((self.labelled & (pred == self.ignore_index)).sum())


def flatten_maps(maps: Sequence[Tensor]) -> Tensor:
    """Label maps of any sizes -> their pixels, concatenated in order: (P,) int64."""
    return torch.cat([m.reshape(-1) for m in maps]).long()



def segmentation_probabilities(
    model: CpewsNet, image: Tensor, scales: Sequence[float], out_size: tuple[int, int]
) -> Tensor:
    """§9.3 for one image: `batch_segmentation_probabilities` of a batch of one.

    Shapes: image (1, 3, H, W) -> (C + 1, *out_size) probabilities.
    """
    return batch_segmentation_probabilities(model, image, scales, out_size)[0]


def batch_segmentation_probabilities(
    model: CpewsNet, images: Tensor, scales: Sequence[float], out_size: tuple[int, int]
) -> Tensor:
    """§9.3: per scale, sum of plain and un-flipped flip logits; max over scales; softmax.

    Each scale is one forward of the batch and its flips together, ``[X_s; hflip(X_s)]``.

    Shapes: images (B, 3, H, W) of one size -> (B, C + 1, *out_size) probabilities.
    """
    batch = images.shape[0]
    merged = None
    for scale in scales:
        x = rescale_images(images, scale)
        logits = model(torch.cat([x, x.flip(-1)])).seg_logits.float()
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        summed = logits[:batch] + logits[batch:].flip(-1)
        merged = summed if merged is None else torch.maximum(merged, summed)
    return merged.softmax(dim=1)


def _resize_scores(scores: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def _resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _groups(keys: Sequence[object]) -> dict[object, list[int]]:
    """Positions of equal keys (e.g. image sizes), in first-seen order: ["a", "b", "a"] -> {"a": [0, 2], "b": [1]}."""
    groups: dict[object, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return groups


def _select(batch: Tensor, positions: list[int]) -> Tensor:
    """Rows `positions` of a batch tensor; the tensor itself when that is all of it, in order."""
    if positions == list(range(batch.shape[0])):
        return batch
    return batch[torch.tensor(positions, device=batch.device)]


def _stack_to(tensors: Sequence[Tensor], device: torch.device | str) -> Tensor:
    """Stack same-shape CPU tensors and move them to `device` in one copy (pinned and asynchronous on CUDA)."""
    stacked = torch.stack(list(tensors))
    if torch.device(device).type == "cuda":
        return stacked.pin_memory().to(device, non_blocking=True)
    return stacked.to(device)


def _images_at_size(samples: Sequence[dict], size: tuple[int, int], device: torch.device | str) -> Tensor:
    """The samples' images resized to `size` (bilinear), images of one size resized together: (B, 3, *size)."""
    resized: list[Tensor | None] = [None] * len(samples)
    for positions in _groups([tuple(s["image"].shape) for s in samples]).values():
        group = _resize_scores(_stack_to([samples[p]["image"] for p in positions], device), size)
        if len(positions) == len(samples):
            return group  # all of one size
        for row, position in enumerate(positions):
            resized[position] = group[row]
    return torch.stack(resized)


class ConfounderStats:
    """False activation of the confounded class on its background texture (synthetic dataset only).

    pixel rate: fraction of texture pixels labelled as the confounded class;
    image bias: fraction of images that show the texture but not the class whose logit for it is > 0.
    """

    def __init__(self, confounded_label: int, names: Sequence[str] = SCORE_NAMES) -> None:
        self.label = confounded_label
        self.texture_pixels = 0
        self.false_pixels: dict[str, int] = dict.fromkeys(names, 0)
        self.texture_only_images = 0
        self.biased_images = 0

    def update(self, texture: Tensor, predictions: dict[str, Tensor], labels: Tensor, logits: Tensor) -> None:
        """Add one image. Shapes: texture and each prediction (H, W); labels, logits (C,)."""
        image = torch.zeros(texture.numel(), dtype=torch.int64, device=texture.device)
        flat = {name: pred.reshape(-1) for name, pred in predictions.items()}
        self.update_pixels(texture.reshape(-1), flat, image, labels[None], logits[None])

    def update_pixels(
        self, texture: Tensor, predictions: dict[str, Tensor], image: Tensor, labels: Tensor, logits: Tensor
    ) -> None:
        """Add a batch of B images given as flattened pixels.

        Shapes (P pixels in all): texture, each prediction, image (P,) (`image`: the image number of each
        pixel, as `BatchPixels.image`); labels, logits (B, C).
        """
        mask = texture.bool()
        self.texture_pixels += int(mask.sum())
        for name, pred in predictions.items():
            self.false_pixels[name] += int(((pred == self.label) & mask).sum())
        shows_texture = torch.bincount(image[mask], minlength=labels.shape[0]) > 0
        texture_only = shows_texture & (labels[:, self.label - 1] == 0)
        self.texture_only_images += int(texture_only.sum())
        self.biased_images += int((texture_only & (logits[:, self.label - 1] > 0)).sum())

    def metrics(self) -> dict[str, float]:
        out = {}
        if self.texture_pixels:
            for name, count in self.false_pixels.items():
                out[f"confounder_false_activation_{name}"] = count / self.texture_pixels
            if "cam" in self.false_pixels:
                out["confounder_false_activation"] = out["confounder_false_activation_cam"]
        if self.texture_only_images:
            out["confounder_image_bias"] = self.biased_images / self.texture_only_images
        return out


def confounded_label(root: Path | None) -> int | None:
    """The label value of the synthetic dataset's confounded class (from its meta.json), else None."""
    if root is None or not (Path(root) / "meta.json").is_file():
        return None
    value = json.loads((Path(root) / "meta.json").read_text()).get("confounded_class")
    return int(value) if value is not None else None


@torch.no_grad()
def predict_label_maps(
    model: CpewsNet,
    samples: Sequence[dict[str, Tensor | str]],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    *,
    final_protocol: bool = False,
    crf: bool = False,
    cams: bool = True,
    crf_pool: Executor | None = None,
) -> tuple[CpewsOutput, list[dict[str, Tensor]]]:
    """Label maps of one batch of EvalDataset items at each item's mask size; the model's mode is left as is.

    CAMs and pseudo labels come from the images resized to `eval.size` (§9.2); the segmentation is single
    scale at that size, or §9.3 on the item's own image when `final_protocol` or `crf` is set. Items of one
    size are resized, segmented (each scale with its flips in one forward) and thresholded together.

    Args:
        cams: also the CAM, aux CAM and pseudo label maps; False skips their multi-scale CAM and PAR passes.
        crf_pool: worker processes for the dense CRF (`cpews.crf.crf_executor`); None = in this process.

    Shapes (B items, C foreground classes, S = eval.size, item b with mask (H_b, W_b)):
        samples: items with "image" (3, H, W) normalised, "labels" (C,), "mask" (H_b, W_b); with `crf` also
            "rgb" (H, W, 3) uint8.
        returns: the model output for the (B, 3, S, S) batch (logits (B, C), seg_logits, ...) and per item
            a dict of (H_b, W_b) int64 label maps on `device`: "cam", "aux_cam", "seg" in 0..C, "pseudo" in
            0..C and 255 (ignore) (only "seg" when `cams` is False); with `crf` also "seg_crf".
    """
    output, maps, finish_crf = _start_label_maps(
        model, samples, cfg, device, final_protocol=final_protocol, crf=crf, cams=cams, crf_pool=crf_pool
    )
    if finish_crf is not None:
        for predictions, seg_crf in zip(maps, finish_crf()):
            predictions["seg_crf"] = seg_crf
    return output, maps


def _start_label_maps(
    model: CpewsNet,
    samples: Sequence[dict[str, Tensor | str]],
    cfg: TrainConfig,
    device: torch.device | str,
    *,
    final_protocol: bool,
    crf: bool,
    cams: bool,
    crf_pool: Executor | None,
) -> tuple[CpewsOutput, list[dict[str, Tensor]], Callable[[], list[Tensor]] | None]:
    """`predict_label_maps` without "seg_crf", and with `crf` the function that waits for the CRF label maps
    (in `crf_pool` they are computed meanwhile)."""
    e, c, r = cfg.eval, cfg.cam, cfg.refine
    labels = torch.stack([s["labels"] for s in samples]).to(device)
    fed = _images_at_size(samples, (e.size, e.size), device)
    output = model(fed)
    if cams:
        pair = multiscale_cams(model.cam_logits, fed, labels, c.scales)
        par_images = images_for_par(fed, cfg.data.norm_mean, cfg.data.norm_std, downscale=r.downscale)
        pseudo = refine_pseudo_labels(
            pair.cams, labels, par_images, None, high=c.high_threshold, low=c.low_threshold,
            downscale=r.downscale, dilations=r.dilations, iters=r.iters, w1=r.w1, w2=r.w2,
        )
    maps: list[dict[str, Tensor]] = [{} for _ in samples]
    segment_final = final_protocol or crf
    for size, positions in _groups([tuple(s["mask"].shape) for s in samples]).items():
        group = {}
        if cams:
            group["cam"] = cams_to_labels(_resize_scores(_select(pair.cams, positions), size), c.bkg_threshold)
            group["aux_cam"] = cams_to_labels(
                _resize_scores(_select(pair.aux_cams, positions), size), c.bkg_threshold
            )
            group["pseudo"] = _resize_labels(_select(pseudo, positions), size)
        if not segment_final:
            seg_logits = _resize_scores(_select(output.seg_logits, positions).float(), size)
            group["seg"] = seg_logits.softmax(dim=1).argmax(dim=1)
        _scatter(maps, positions, group)
    if not segment_final:
        return output, maps, None
    scales = e.test_scales if final_protocol else (1.0,)
    host_probs: list[Tensor | None] = [None] * len(samples)
    keys = [(tuple(s["image"].shape), tuple(s["mask"].shape)) for s in samples]
    for (_, size), positions in _groups(keys).items():
        images = _stack_to([samples[p]["image"] for p in positions], device)
        probs = batch_segmentation_probabilities(model, images, scales, size)
        _scatter(maps, positions, {"seg": probs.argmax(dim=1)})
        if crf:
            for position, item_probs in zip(positions, probs.cpu()):  # one copy to the host per group
                host_probs[position] = item_probs
    if not crf:
        return output, maps, None
    finish = _start_crf_label_maps(samples, host_probs, cfg, crf_pool)
    return output, maps, lambda: [seg_crf.to(device) for seg_crf in finish()]


def _scatter(maps: list[dict[str, Tensor]], positions: list[int], group: dict[str, Tensor]) -> None:
    """Hand row k of each batched (G, ...) map in `group` to item `positions[k]`."""
    for name, batch in group.items():
        for row, position in enumerate(positions):
            maps[position][name] = batch[row]


@torch.no_grad()
def evaluate(
    model: CpewsNet,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    *,
    class_names: Sequence[str],
    device: torch.device | str = "cpu",
    max_images: int = 0,
    final_protocol: bool = False,
    crf: bool = False,
    data_root: Path | None = None,
    batch_size: int = 16,
    per_image: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cams: bool = True,
    crf_workers: int | None = None,
) -> EvalResult:
    """Score the model on `dataset` (an EvalDataset).

    Args:
        final_protocol: segment with §9.3 (original size, `eval.test_scales`, flip sum, scale max) instead of
            single scale at `eval.size`.
        crf: apply the dense CRF (§9.4) to the segmentation probabilities.
        per_image: also return each image's mIoU per score (`EvalResult.per_image`), e.g. for paired tests.
        progress: called after each batch is scored with (images scored so far, images to score), e.g. to show
            a bar.
        cams: also score the CAMs, aux CAMs and pseudo labels (`miou_cam`, `miou_aux_cam`, `miou_pseudo`,
            `pseudo_ignored_fraction`, the CAM confounder figures); False skips their multi-scale CAM and PAR
            passes, e.g. to score only the segmentation of the final protocol.
        crf_workers: processes for the CRF (`cpews.crf.crf_pool_size`): None = one per CPU when there is enough
            work (else in this process), 1 = in this process. With a pool, the CRF of a batch runs while the
            next batch is segmented. The scores do not depend on it.

    Items are scored a batch at a time: the confusion matrices of every image and score come from one
    `bincount` per score (`BatchPixels`), the same counts as `cpews.metrics.confusion_matrix` per image.
    `metrics["baseline_miou"]` is the mIoU of an all-background prediction on the same label maps, scored by the
    same code.
    """
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    workers = 1
    if crf and count:
        workers = crf_pool_size(count, dataset[0]["mask"].numel(), len(class_names), crf_workers)
    with crf_executor(workers) as crf_pool:
        return _evaluate(model, dataset, cfg, class_names, device, count, final_protocol, crf, data_root,
                         batch_size, per_image, progress, cams, crf_pool)


class _Scores:
    """The running totals of `evaluate`: a ConfusionMeter per score, the all-background matrix, per-image mIoUs."""

    def __init__(self, names: Sequence[str], num_classes: int, per_image: bool) -> None:
        self.meters = {name: ConfusionMeter(num_classes) for name in names}
        self.background = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # all-background prediction
        self.images: dict[str, list] | None = {"ids": []} if per_image else None
        if self.images is not None:  # key order: ids, miou_<score>..., baseline_miou
            self.images.update({f"miou_{name}": [] for name in names})
            self.images["baseline_miou"] = []

    def add_images(self, ids: Sequence[str], pixels: BatchPixels) -> None:
        """Count a batch's all-background prediction and note its image ids."""
        confusions = pixels.confusions(torch.zeros_like(pixels.gt))
        self.background += confusions.sum(dim=0).cpu()
        if self.images is not None:
            self.images["ids"].extend(ids)
            self.images["baseline_miou"].extend(confusion_mious(confusions).tolist())

    def add(self, name: str, pred: Tensor, pixels: BatchPixels) -> None:
        """Score one flattened prediction (P,) of a batch against its ground truth."""
        confusions = pixels.confusions(pred)
        meter = self.meters[name]
        meter.confusion += confusions.sum(dim=0).cpu()
        meter.labelled_pixels += pixels.labelled_count
        meter.ignored_predictions += pixels.ignored_predictions(pred)
        if self.images is not None:
            self.images[f"miou_{name}"].extend(confusion_mious(confusions).tolist())


def _evaluate(model, dataset, cfg, class_names, device, count, final_protocol, crf, data_root, batch_size,
              per_image, progress, cams, crf_pool) -> EvalResult:
    """`evaluate`'s loop over batches; the CRF of a batch is scored after the next batch is segmented."""
    was_training = model.training
    model.eval()
    num_classes = len(class_names)
    names = SCORE_NAMES if cams else tuple(n for n in SCORE_NAMES if n not in CAM_SCORE_NAMES)
    scores = _Scores([*names, "seg_crf"] if crf else names, num_classes, per_image)
    label = confounded_label(data_root)
    confounder = ConfounderStats(label, names) if label is not None else None
    all_logits, all_labels = [], []
    pending = None  # (images scored once its CRF is in, BatchPixels, the function that waits for the CRF)
    for first in range(0, count, batch_size):
        samples = [dataset[i] for i in range(first, min(first + batch_size, count))]
        output, maps, finish_crf = _start_label_maps(
            model, samples, cfg, device, final_protocol=final_protocol, crf=crf, cams=cams, crf_pool=crf_pool
        )
        labels = torch.stack([s["labels"] for s in samples]).to(device)
        pixels = BatchPixels([s["mask"] for s in samples], num_classes, device=device)
        scores.add_images([str(s.get("name", first + j)) for j, s in enumerate(samples)], pixels)
        predictions = {name: flatten_maps([m[name] for m in maps]) for name in names}
        for name, pred in predictions.items():
            scores.add(name, pred, pixels)
        if confounder is not None:
            _update_confounder(confounder, samples, maps, predictions, pixels, labels, output.logits, device)
        all_logits.append(output.logits.float().cpu())
        all_labels.append(labels.cpu())
        if pending is not None:
            _finish_crf(scores, *pending, progress, count)
        if finish_crf is not None:
            pending = (first + len(samples), pixels, finish_crf)
        elif progress is not None:
            progress(first + len(samples), count)
    if pending is not None:
        _finish_crf(scores, *pending, progress, count)
    model.train(was_training)
    result = _collect(scores.meters, class_names, all_logits, all_labels, confounder, label, count)
    result.metrics["baseline_miou"] = float(segmentation_scores(scores.background).miou)
    return result._replace(per_image=scores.images)


def _finish_crf(scores: _Scores, done: int, pixels: BatchPixels, finish_crf, progress, count: int) -> None:
    """Wait for a batch's CRF label maps, score them, report progress."""
    scores.add("seg_crf", flatten_maps(finish_crf()), pixels)
    if progress is not None:
        progress(done, count)


def _update_confounder(confounder, samples, maps, predictions, pixels, labels, logits, device) -> None:
    """Add the batch's items that carry a "confounder_mask" to the confounder statistics."""
    scored = [j for j, s in enumerate(samples) if "confounder_mask" in s]
    if not scored:
        return
    if len(scored) == len(samples):
        texture = flatten_maps([s["confounder_mask"] for s in samples]).to(device)
        confounder.update_pixels(texture, predictions, pixels.image, labels, logits)
        return
    subset = BatchPixels([samples[j]["mask"] for j in scored], pixels.num_classes, device=device)
    texture = flatten_maps([samples[j]["confounder_mask"] for j in scored]).to(device)
    flat = {name: flatten_maps([maps[j][name] for j in scored]) for name in predictions}
    index = torch.tensor(scored, device=labels.device)
    confounder.update_pixels(texture, flat, subset.image, labels[index], logits[index])


def _start_crf_label_maps(
    samples: Sequence[dict], probs: Sequence[Tensor], cfg: TrainConfig, crf_pool: Executor | None
) -> Callable[[], list[Tensor]]:
    """Start the dense CRF (§9.4) of each item's probabilities (on the host) on its uint8 image at the label
    size; returns the function that waits for the (H_b, W_b) int64 label maps (on the host)."""
    e = cfg.eval
    rgbs = []
    for sample, item_probs in zip(samples, probs):
        rgb, size = sample["rgb"], tuple(item_probs.shape[-2:])
        if tuple(rgb.shape[:2]) != size:
            rgb = F.interpolate(rgb.permute(2, 0, 1)[None].float(), size=size, mode="bilinear", align_corners=False)
            rgb = rgb[0].permute(1, 2, 0).round().clamp(0, 255).byte()
        rgbs.append(np.ascontiguousarray(rgb.cpu().numpy()))
    finish = start_dense_crf_labels(
        rgbs,
        [p.numpy() for p in probs],
        executor=crf_pool,
        iters=e.crf_iters,
        gauss_sxy=e.crf_gauss_sxy,
        gauss_compat=e.crf_gauss_compat,
        bilateral_sxy=e.crf_bilateral_sxy,
        bilateral_srgb=e.crf_bilateral_srgb,
        bilateral_compat=e.crf_bilateral_compat,
    )
    return lambda: [torch.from_numpy(labels) for labels in finish()]


def _collect(meters, class_names, all_logits, all_labels, confounder, label, count) -> EvalResult:
    metrics: dict[str, float] = {"images": float(count)}
    per_class = [{"class": name} for name in class_names]
    for name, meter in meters.items():
        scores = meter.scores()
        metrics[f"miou_{name}"] = float(scores.miou)
        metrics[f"pixel_accuracy_{name}"] = float(scores.pixel_accuracy)
        for row, iou in zip(per_class, scores.iou.tolist()):
            row[name] = None if iou != iou else round(float(iou), 6)
    if "pseudo" in meters:
        metrics["pseudo_ignored_fraction"] = float(meters["pseudo"].ignored_fraction)
    if all_logits:
        metrics["f1"] = float(multilabel_f1(torch.cat(all_logits), torch.cat(all_labels)))
    if confounder is not None:
        metrics.update(confounder.metrics())
        if "cam" in meters:
            metrics["confounded_class_iou_cam"] = float(meters["cam"].scores().iou[label])
        metrics["confounded_class_iou_seg"] = float(meters["seg"].scores().iou[label])
    return EvalResult(metrics, per_class)


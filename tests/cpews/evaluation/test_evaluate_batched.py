"""Batched evaluation: images of several sizes in one batch score exactly as each image scored alone."""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpews.config import load_config
from cpews.data import SYNTHETIC_CLASSES, EvalDataset
from cpews.evaluation import evaluate, segmentation_probabilities
from cpews.evaluation.evaluate import (
    BatchPixels,
    ConfounderStats,
    batch_segmentation_probabilities,
    confusion_mious,
    flatten_maps,
    image_miou,
    predict_label_maps,
)
from cpews.metrics import ConfusionMeter, confusion_matrix
from cpews.model import build_model

NUM_LABELS = len(SYNTHETIC_CLASSES)
BOAT = SYNTHETIC_CLASSES.index("boat")
# (height, width) of the dataset's images, in order: sizes repeat, so a batch holds groups of equal size
SIZES = [(16, 16), (24, 20), (16, 16), (20, 24), (24, 20), (16, 16)]


# ------------------------------------------------------------------------------------------------------------
# BatchPixels and confusion_mious on hand-made label maps.
# ------------------------------------------------------------------------------------------------------------


def test_batch_confusions_by_hand():
    gts = [torch.tensor([[0, 1], [1, 255]]), torch.tensor([[2, 2, 0]])]
    preds = [torch.tensor([[0, 1], [0, 2]]), torch.tensor([[2, 255, 1]])]
    pixels = BatchPixels(gts, num_classes=3)
    confusions = pixels.confusions(flatten_maps(preds))
    # image 0: (g0,p0), (g1,p1), (g1,p0); the ignored gt pixel is skipped
    # image 1: (g2,p2); (g2, ignored prediction) skipped; (g0,p1)
    expected = torch.tensor([
        [[1, 0, 0], [1, 1, 0], [0, 0, 0]],
        [[0, 1, 0], [0, 0, 0], [0, 0, 1]],
    ])
    assert torch.equal(confusions, expected)
    for b in range(2):
        assert torch.equal(confusions[b], confusion_matrix(preds[b], gts[b], 3))
    assert pixels.labelled_count == 6 and pixels.ignored_predictions(flatten_maps(preds)) == 1
    # image 0: IoU_0 = 1/2, IoU_1 = 1/2 (class 2 absent) -> 1/2; image 1: IoU_0 = 0/1, IoU_2 = 1/1 -> 1/2
    mious = confusion_mious(confusions)
    assert mious.tolist() == pytest.approx([0.5, 0.5])
    assert mious.tolist() == [image_miou(p, g, 3) for p, g in zip(preds, gts)]


def test_batch_pixels_reject_out_of_range_labels():
    with pytest.raises(ValueError, match="gt has values outside"):
        BatchPixels([torch.tensor([[0, 3]])], num_classes=3)
    pixels = BatchPixels([torch.tensor([[0, 1]])], num_classes=3)
    with pytest.raises(ValueError, match="pred has values outside"):
        pixels.confusions(torch.tensor([0, 7]))


def test_an_image_without_labelled_pixels_has_a_nan_miou():
    pixels = BatchPixels([torch.full((2, 2), 255), torch.tensor([[1]])], num_classes=2)
    mious = confusion_mious(pixels.confusions(torch.tensor([0, 0, 0, 0, 1])))
    assert mious[0].isnan() and mious[1] == 1.0


def test_confounder_update_pixels_equals_image_by_image():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (2, 2), (4, 3)]
    textures = [torch.from_numpy(rng.integers(0, 2, s)) for s in shapes]
    textures[1].zero_()  # an image without the texture counts for nothing
    preds = {name: [torch.from_numpy(rng.integers(0, NUM_LABELS, s)) for s in shapes] for name in ("cam", "seg")}
    labels = torch.zeros(3, NUM_LABELS - 1)
    labels[0, BOAT - 1] = 1  # image 0 shows a boat: not texture-only
    logits = torch.tensor([2.0, -1.0, 0.5])[:, None].expand(3, NUM_LABELS - 1).contiguous()
    one_by_one = ConfounderStats(BOAT, ("cam", "seg"))
    for b in range(3):
        one_by_one.update(textures[b], {n: p[b] for n, p in preds.items()}, labels[b], logits[b])
    batched = ConfounderStats(BOAT, ("cam", "seg"))
    pixels = BatchPixels([torch.zeros(s, dtype=torch.int64) for s in shapes], NUM_LABELS)
    flat = {name: flatten_maps(p) for name, p in preds.items()}
    batched.update_pixels(flatten_maps(textures), flat, pixels.image, labels, logits)
    assert batched.metrics() == one_by_one.metrics()
    assert (batched.texture_only_images, batched.biased_images) == (1, 1)  # image 2 only; its logit 0.5 > 0


# ------------------------------------------------------------------------------------------------------------
# A real micro model on a dataset of mixed image sizes.
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> Path:
    """Six random images of three sizes in the synthetic layout, with ignore pixels and confounder masks."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("mixed") / "dataset"
    for folder in ("JPEGImages", "SegmentationClassAug", "ConfounderMask", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    ids = []
    for n, (h, w) in enumerate(SIZES):
        image_id = f"img{n}"
        ids.append(image_id)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[: h // 2] //= 4  # some structure for the CRF
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.png")
        mask = np.zeros((h, w), dtype=np.uint8)
        for label in rng.choice(np.arange(1, NUM_LABELS), size=2, replace=False):
            r, c = rng.integers(0, h - 6), rng.integers(0, w - 6)
            mask[r : r + 6, c : c + 6] = label
        mask[0, :3] = 255
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
        texture = np.zeros((h, w), dtype=np.uint8)
        texture[-4:] = 1
        Image.fromarray(texture, mode="L").save(root / "ConfounderMask" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "meta.json").write_text(json.dumps({"confounded_class": BOAT}))
    return root


@pytest.fixture(scope="module")
def micro():
    cfg = load_config("test_micro", ["eval.size=16", "eval.test_scales=1.0,1.5", "cam.bkg_threshold=0.3"])
    torch.manual_seed(0)
    return cfg, build_model(cfg, num_classes=NUM_LABELS - 1).eval()


def _alone(model, dataset, cfg, **options) -> tuple[dict[str, list[float]], dict[str, ConfusionMeter]]:
    """Each image scored alone (a batch of one) with `cpews.metrics`: per-image mIoUs and pooled meters."""
    per_image: dict[str, list[float]] = {}
    meters: dict[str, ConfusionMeter] = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        _, (maps,) = predict_label_maps(model, [sample], cfg, **options)
        for name, pred in maps.items():
            per_image.setdefault(name, []).append(image_miou(pred, sample["mask"], NUM_LABELS))
            meters.setdefault(name, ConfusionMeter(NUM_LABELS)).update(pred, sample["mask"])
    return per_image, meters


@pytest.mark.parametrize("options", [
    {},
    {"final_protocol": True},
    {"final_protocol": True, "crf": True},
], ids=["single_scale", "multi_scale_flip", "crf"])
def test_batched_scores_equal_each_image_scored_alone(mixed_dataset, micro, options):
    cfg, model = micro
    dataset = EvalDataset(mixed_dataset, "synthetic", "val")
    assert [tuple(dataset[i]["mask"].shape) for i in range(len(dataset))] == SIZES
    result = evaluate(model, dataset, cfg, class_names=SYNTHETIC_CLASSES, batch_size=len(SIZES), per_image=True,
                      data_root=mixed_dataset, **options)
    per_image, meters = _alone(model, dataset, cfg, **options)
    assert result.per_image["ids"] == [f"img{n}" for n in range(len(SIZES))]
    names = ["cam", "aux_cam", "pseudo", "seg"] + (["seg_crf"] if options.get("crf") else [])
    assert list(per_image) == names
    for name in names:
        assert result.per_image[f"miou_{name}"] == pytest.approx(per_image[name], abs=1e-12), name
        assert result.metrics[f"miou_{name}"] == pytest.approx(float(meters[name].scores().miou), abs=1e-12)
        assert torch.equal(
            torch.tensor([row[name] if row[name] is not None else -1.0 for row in result.per_class]),
            torch.tensor([-1.0 if iou != iou else round(iou, 6) for iou in meters[name].scores().iou.tolist()]),
        ), name
    assert result.metrics["pseudo_ignored_fraction"] == pytest.approx(meters["pseudo"].ignored_fraction)
    # all-background floor of each image: background IoU over the classes present
    assert result.per_image["baseline_miou"] == pytest.approx(
        [image_miou(torch.zeros_like(dataset[i]["mask"]), dataset[i]["mask"], NUM_LABELS) for i in range(len(SIZES))]
    )


def test_batch_sizes_do_not_change_the_result(mixed_dataset, micro):
    cfg, model = micro
    dataset = EvalDataset(mixed_dataset, "synthetic", "val")
    results = [evaluate(model, dataset, cfg, class_names=SYNTHETIC_CLASSES, batch_size=b, per_image=True,
                        final_protocol=True, data_root=mixed_dataset) for b in (1, 4, 16)]
    for other in results[1:]:
        for key, values in results[0].per_image.items():
            assert other.per_image[key] == (values if key == "ids" else pytest.approx(values, abs=1e-12)), key
        for key, value in results[0].metrics.items():
            assert other.metrics[key] == pytest.approx(value, abs=1e-12), key


def test_batch_segmentation_probabilities_equal_one_image_at_a_time(micro):
    cfg, model = micro
    torch.manual_seed(1)
    images = torch.randn(3, 3, 20, 24)
    with torch.no_grad():
        batched = batch_segmentation_probabilities(model, images, (1.0, 1.5), (15, 18))
        alone = torch.stack([segmentation_probabilities(model, images[b : b + 1], (1.0, 1.5), (15, 18))
                             for b in range(3)])
    assert batched.shape == (3, NUM_LABELS, 15, 18)
    assert torch.allclose(batched, alone, atol=1e-5)


def test_without_cams_only_the_segmentation_is_scored_and_the_cam_passes_are_skipped(mixed_dataset, micro):
    cfg, model = micro
    dataset = EvalDataset(mixed_dataset, "synthetic", "val")
    calls = []
    hook = model.backbone.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    try:
        full = evaluate(model, dataset, cfg, class_names=SYNTHETIC_CLASSES, batch_size=len(SIZES), per_image=True,
                        final_protocol=True, data_root=mixed_dataset)
        full_calls, calls[:] = list(calls), []
        seg_only = evaluate(model, dataset, cfg, class_names=SYNTHETIC_CLASSES, batch_size=len(SIZES),
                            per_image=True, final_protocol=True, data_root=mixed_dataset, cams=False)
    finally:
        hook.remove()
    # one forward at eval.size, then per image size (3 groups) one forward per test scale of [X; hflip X]
    assert calls == [(6, 3, 16, 16)] + [(2 * n, 3, math.floor(s * h), math.floor(s * w))
                                        for (h, w), n in (((16, 16), 3), ((24, 20), 2), ((20, 24), 1))
                                        for s in (1.0, 1.5)]
    assert len(full_calls) == len(calls) + len(cfg.cam.scales)  # the CAM pass: one forward per CAM scale
    assert seg_only.per_image["miou_seg"] == full.per_image["miou_seg"]
    assert seg_only.metrics["miou_seg"] == full.metrics["miou_seg"]
    assert seg_only.metrics["confounder_false_activation_seg"] == full.metrics["confounder_false_activation_seg"]
    assert not {k for k in seg_only.metrics if "cam" in k or "pseudo" in k}
    assert set(seg_only.per_image) == {"ids", "miou_seg", "baseline_miou"}


def test_crf_in_a_process_pool_scores_as_in_process(mixed_dataset, micro):
    cfg, model = micro
    dataset = EvalDataset(mixed_dataset, "synthetic", "val")
    runs = {}
    for workers in (1, 2):
        seen: list[tuple[int, int]] = []
        runs[workers] = (evaluate(model, dataset, cfg, class_names=SYNTHETIC_CLASSES, batch_size=4, per_image=True,
                                  final_protocol=True, crf=True, crf_workers=workers, cams=False,
                                  progress=lambda *args, seen=seen: seen.append(args)), seen)
        assert multiprocessing.active_children() == []  # the pool's workers are joined
    (in_process, seen_1), (pooled, seen_2) = runs[1], runs[2]
    assert pooled.per_image == in_process.per_image
    assert pooled.metrics == in_process.metrics
    assert seen_1 == seen_2 == [(4, 6), (6, 6)]  # after each batch, once its CRF is scored

"""Evaluation (method.md §9) with models whose outputs are fixed by hand, so every score is hand-computed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cpews.config import load_config
from cpews.data import SYNTHETIC_CLASSES, EvalDataset
from cpews.evaluation import evaluate, segmentation_probabilities
from cpews.evaluation.evaluate import ConfounderStats

BOAT = SYNTHETIC_CLASSES.index("boat")  # label value 3, classifier channel 2
CAR = SYNTHETIC_CLASSES.index("car")
BALL = SYNTHETIC_CLASSES.index("ball")
NUM_FG = len(SYNTHETIC_CLASSES) - 1


# ------------------------------------------------------------------------------------------------------------
# segmentation_probabilities (§9.3): flip sum, scale max, softmax.
# ------------------------------------------------------------------------------------------------------------


class _Seg(NamedTuple):
    seg_logits: torch.Tensor


class RampModel(nn.Module):
    """seg_logits channels: 0 = image channel 0; 1 = input height / 4 (constant); 2 = column ramp j / (W - 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> _Seg:
        self.inputs.append(x.clone())
        b, _, h, w = x.shape
        ramp = torch.linspace(0, 1, w).expand(b, h, w)
        return _Seg(torch.stack([x[:, 0], torch.full((b, h, w), h / 4), ramp], dim=1))


def test_segmentation_probabilities_sums_flips_and_takes_the_max_over_scales():
    image = torch.rand(1, 3, 4, 4)
    image[:, 0] = 0.0
    model = RampModel()
    probs = segmentation_probabilities(model, image, scales=(1.0, 0.5), out_size=(6, 8))
    # Per scale, plain + un-flipped flip logits: channel 0 -> 0; channel 1 -> 2 * h/4 = 2 (h=4) or 1 (h=2);
    # channel 2 -> r_j + r_{W-1-j} = 1 at every pixel (a ramp is not flip-invariant, its un-flipped sum is
    # constant). Max over scales: (0, 2, 1) at every pixel, then softmax over the channels.
    e = math.e
    expected = torch.tensor([1.0, e**2, e]) / (1 + e + e**2)  # (0.0900, 0.6652, 0.2447)
    assert probs.shape == (3, 6, 8)
    assert torch.allclose(probs, expected[:, None, None].expand(3, 6, 8), atol=1e-6)
    # each scale is one forward of [x; hflip(x)] at floor(scale * size)
    assert [tuple(x.shape) for x in model.inputs] == [(2, 3, 4, 4), (2, 3, 2, 2)]
    for x in model.inputs:
        assert torch.equal(x[1], x[0].flip(-1))
    assert torch.equal(model.inputs[0][:1], image)


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def test_segmentation_probabilities_matches_a_manual_computation_on_a_real_model():
    torch.manual_seed(0)
    cfg = load_config("test_micro")
    from cpews.model import build_model

    model = build_model(cfg, num_classes=NUM_FG).eval()
    image = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        probs = segmentation_probabilities(model, image, scales=(1.0, 1.5), out_size=(30, 36))
        per_scale = []
        for size in ((40, 48), (60, 72)):
            x = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
            plain = _upsample(model(x).seg_logits, (30, 36))[0]
            flipped = _upsample(model(x.flip(-1)).seg_logits, (30, 36))[0].flip(-1)
            per_scale.append(plain + flipped)
        expected = torch.maximum(*per_scale).softmax(dim=0)
    assert probs.shape == (NUM_FG + 1, 30, 36)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert torch.allclose(probs.sum(dim=0), torch.ones(30, 36), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# ConfounderStats on a hand-made case.
# ------------------------------------------------------------------------------------------------------------


def _logits(boat_logit: float) -> torch.Tensor:
    logits = torch.full((NUM_FG,), -1.0)
    logits[BOAT - 1] = boat_logit
    return logits


def _labels(*values: int) -> torch.Tensor:
    labels = torch.zeros(NUM_FG)
    for v in values:
        labels[v - 1] = 1.0
    return labels


def test_confounder_stats_hand_case():
    stats = ConfounderStats(BOAT)
    texture = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.uint8)
    # image 1: boat present; cam says boat on 1 of 3 texture pixels (and on a non-texture pixel, not counted)
    cam = torch.tensor([[BOAT, 0, 0, BOAT], [BOAT, 0, 0, 0]])
    seg = torch.tensor([[BOAT, BOAT, BOAT, 0], [0, 0, 0, 0]])
    stats.update(texture, {"cam": cam, "seg": seg}, _labels(BOAT), _logits(5.0))
    # image 2: texture (2 pixels) without a boat, cam says boat on both, boat logit 0.7 > 0 -> biased
    texture2 = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.uint8)
    stats.update(
        texture2,
        {"cam": torch.full((2, 4), BOAT), "seg": torch.zeros(2, 4, dtype=torch.long)},
        _labels(CAR),
        _logits(0.7),
    )
    # image 3: no texture at all: neither pixels nor an image counted
    stats.update(
        torch.zeros(2, 4, dtype=torch.uint8),
        {"cam": torch.full((2, 4), BOAT), "seg": torch.full((2, 4), BOAT)},
        _labels(BALL),
        _logits(3.0),
    )
    # image 4: texture (1 pixel) without a boat, boat logit exactly 0 -> not biased (strict > 0)
    texture4 = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.uint8)
    stats.update(
        texture4,
        {"cam": torch.zeros(2, 4, dtype=torch.long), "seg": torch.full((2, 4), BOAT)},
        _labels(CAR),
        _logits(0.0),
    )
    metrics = stats.metrics()
    # texture pixels 3 + 2 + 0 + 1 = 6; cam boat on texture 1 + 2 + 0 + 0 = 3; seg 3 + 0 + 0 + 1 = 4
    assert metrics["confounder_false_activation_cam"] == pytest.approx(3 / 6)
    assert metrics["confounder_false_activation_seg"] == pytest.approx(4 / 6)
    assert metrics["confounder_false_activation"] == metrics["confounder_false_activation_cam"]
    # texture-only images: 2 and 4; biased: image 2 only
    assert metrics["confounder_image_bias"] == pytest.approx(1 / 2)


def test_confounder_stats_without_texture_report_nothing():
    stats = ConfounderStats(BOAT)
    stats.update(
        torch.zeros(2, 2, dtype=torch.uint8), {"cam": torch.full((2, 2), BOAT)}, _labels(CAR), _logits(1.0)
    )
    assert stats.metrics() == {}


# ------------------------------------------------------------------------------------------------------------
# evaluate() on a hand-made dataset with a fake model.
# ------------------------------------------------------------------------------------------------------------

SIZE = 16
# id: (grey level of the whole image, label rectangles {value: (r0, r1, c0, c1)}, water rows, ignored rows)
HAND_IMAGES = {
    "a": (200, {BOAT: (4, 8, 4, 12)}, (12, 16), (0, 1)),  # boat 4x8 = 32 px, row 0 ignored (16 px)
    "b": (200, {CAR: (2, 6, 2, 6)}, (12, 16), None),  # car 16 px, water without boat, bright
    "c": (20, {CAR: (2, 6, 2, 6)}, (12, 16), None),  # car 16 px, water without boat, dark
    "d": (20, {BALL: (8, 12, 8, 12)}, None, None),  # ball 16 px, no water
}


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory) -> Path:
    """A 4-image synthetic-layout dataset (16x16) with confounder masks and meta.json."""
    root = tmp_path_factory.mktemp("hand") / "dataset"
    for folder in ("JPEGImages", "SegmentationClassAug", "ConfounderMask", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for image_id, (grey, objects, water, ignored) in HAND_IMAGES.items():
        Image.fromarray(np.full((SIZE, SIZE, 3), grey, dtype=np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.png"
        )
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for value, (r0, r1, c0, c1) in objects.items():
            mask[r0:r1, c0:c1] = value
        if ignored:
            mask[ignored[0] : ignored[1]] = 255
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
        texture = np.zeros((SIZE, SIZE), dtype=np.uint8)
        if water:
            texture[water[0] : water[1]] = 1
        Image.fromarray(texture, mode="L").save(root / "ConfounderMask" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in HAND_IMAGES))
    (root / "meta.json").write_text(json.dumps({"confounded_class": BOAT}))
    return root


class _Out(NamedTuple):
    logits: torch.Tensor
    seg_logits: torch.Tensor


class BoatEverywhereModel(nn.Module):
    """Segmentation: boat everywhere. CAMs: zero (so every CAM pixel is background). Classifier: the boat logit
    is the mean of the normalized red channel (bright image -> boat), every other logit is -1."""

    def forward(self, x: torch.Tensor) -> _Out:
        b, _, h, w = x.shape
        logits = torch.full((b, NUM_FG), -1.0)
        logits[:, BOAT - 1] = x[:, 0].mean(dim=(1, 2))
        seg = torch.zeros(b, NUM_FG + 1, h // 4, w // 4)
        seg[:, BOAT] = 5.0
        return _Out(logits, seg)

    def cam_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(x.shape[0], NUM_FG, x.shape[2] // 4, x.shape[3] // 4)
        return zeros, zeros.clone()


def _hand_cfg():
    return load_config("test_micro", ["eval.size=16", "data.dataset=synthetic"])


def test_evaluate_scores_a_fake_model_by_hand(hand_dataset):
    dataset = EvalDataset(hand_dataset, "synthetic", "val")
    model = BoatEverywhereModel().train()
    result = evaluate(
        model, dataset, _hand_cfg(), class_names=SYNTHETIC_CLASSES, data_root=hand_dataset, crf=True
    )
    m = result.metrics
    assert model.training  # the training mode is restored
    # labelled pixels: a 256 - 16 ignored = 240, b, c, d 256 each -> 1008; boat 32, car 32, ball 16, bg 928;
    # classes present in the GT: background, ball, boat, car (4)
    total, boat, background = 1008, 32, 928
    assert m["images"] == 4
    # seg = boat everywhere: IoU_boat = 32 / 1008, every other present class 0
    assert m["miou_seg"] == pytest.approx(boat / total / 4)
    assert m["pixel_accuracy_seg"] == pytest.approx(boat / total)
    # CRF on uniform images with a confident boat prediction changes nothing
    assert m["miou_seg_crf"] == pytest.approx(m["miou_seg"])
    # zero CAMs -> background everywhere: IoU_bg = 928 / 1008; the pseudo label is background too
    for name in ("cam", "aux_cam", "pseudo"):
        assert m[f"miou_{name}"] == pytest.approx(background / total / 4), name
    assert m["pseudo_ignored_fraction"] == 0.0
    # the floor: predicting background everywhere scores what the zero CAMs score, IoU_bg = 928 / 1008 over 4
    assert m["baseline_miou"] == pytest.approx(background / total / 4)
    # image-level F1: boat predicted for a (TP) and b (FP); cars of b, c and the ball of d missed (FN 3)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 3))
    # water: 3 images x 4 rows x 16 = 192 px; seg says boat on all of them, the CAMs on none
    assert m["confounder_false_activation_seg"] == 1.0
    assert m["confounder_false_activation_cam"] == 0.0 == m["confounder_false_activation"]
    # water without a boat: b (boat logit > 0) and c (< 0)
    assert m["confounder_image_bias"] == pytest.approx(0.5)
    assert m["confounded_class_iou_cam"] == 0.0
    assert m["confounded_class_iou_seg"] == pytest.approx(boat / total)
    # per-class rows carry the class names; absent classes have no IoU
    rows = {row["class"]: row for row in result.per_class}
    assert list(rows) == list(SYNTHETIC_CLASSES)
    assert rows["background"]["cam"] == pytest.approx(background / total, abs=1e-6)
    assert rows["background"]["seg"] == 0.0
    assert rows["boat"]["seg"] == pytest.approx(boat / total, abs=1e-6)
    assert rows["car"]["seg_crf"] == 0.0
    for name in ("kite", "bus", "house"):
        assert all(rows[name][k] is None for k in ("cam", "aux_cam", "pseudo", "seg", "seg_crf"))


def test_evaluate_max_images_scores_only_the_first_images(hand_dataset):
    dataset = EvalDataset(hand_dataset, "synthetic", "val")
    result = evaluate(
        BoatEverywhereModel(), dataset, _hand_cfg(), class_names=SYNTHETIC_CLASSES, max_images=2
    )
    m = result.metrics
    # a and b only: 240 + 256 = 496 labelled pixels, boat 32; present: background, boat, car
    assert m["images"] == 2
    assert m["miou_seg"] == pytest.approx(32 / 496 / 3)
    assert "miou_seg_crf" not in m
    # no data_root: no confounder figures
    assert not any(k.startswith("confounder") for k in m)


@pytest.mark.parametrize(("batch_size", "max_images", "calls"), [
    (3, 0, [(3, 4), (4, 4)]),  # 4 images in batches of 3: after the first batch and after the last
    (16, 0, [(4, 4)]),
    (1, 3, [(1, 3), (2, 3), (3, 3)]),  # max_images: the total is what is scored
])
def test_evaluate_reports_progress_after_each_batch(hand_dataset, batch_size, max_images, calls):
    dataset = EvalDataset(hand_dataset, "synthetic", "val")
    seen: list[tuple[int, int]] = []
    result = evaluate(BoatEverywhereModel(), dataset, _hand_cfg(), class_names=SYNTHETIC_CLASSES,
                      batch_size=batch_size, max_images=max_images, progress=lambda *args: seen.append(args))
    assert seen == calls
    assert result.metrics["images"] == calls[-1][1]


def test_evaluate_per_image_has_the_all_background_miou_of_each_image(hand_dataset):
    dataset = EvalDataset(hand_dataset, "synthetic", "val")
    result = evaluate(BoatEverywhereModel(), dataset, _hand_cfg(), class_names=SYNTHETIC_CLASSES, per_image=True)
    images = result.per_image
    assert images["ids"] == ["a", "b", "c", "d"]
    # a: 240 labelled px, boat 32, background 208 -> (208/240 + 0) / 2; b, c, d: one 16 px object on 256
    # labelled px -> (240/256 + 0) / 2
    assert images["baseline_miou"] == pytest.approx([208 / 240 / 2] + [240 / 256 / 2] * 3)
    # boat everywhere: a scores IoU_boat = 32/240 over 2 present classes; the others score 0
    assert images["miou_seg"] == pytest.approx([32 / 240 / 2, 0.0, 0.0, 0.0])
    assert result.metrics["baseline_miou"] == pytest.approx(928 / 1008 / 4)


def test_evaluate_final_protocol_on_a_real_model_gives_fractions(hand_dataset):
    torch.manual_seed(0)
    from cpews.model import build_model

    cfg = load_config("test_micro", ["eval.size=16", "eval.test_scales=1.0,1.5"])
    model = build_model(cfg, num_classes=NUM_FG)
    dataset = EvalDataset(hand_dataset, "synthetic", "val")
    result = evaluate(
        model, dataset, cfg, class_names=SYNTHETIC_CLASSES, final_protocol=True, data_root=hand_dataset
    )
    for key in ("miou_cam", "miou_aux_cam", "miou_pseudo", "miou_seg", "f1", "pseudo_ignored_fraction"):
        assert 0.0 <= result.metrics[key] <= 1.0, key
    # the all-background floor depends on the ground truth only, not on the model or the protocol
    assert result.metrics["baseline_miou"] == pytest.approx(928 / 1008 / 4)
    assert [row["class"] for row in result.per_class] == list(SYNTHETIC_CLASSES)

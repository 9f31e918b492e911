"""Overlay strips (image | CAM | pseudo label | segmentation | ground truth, titled, with a class legend, scaled
up) and their label maps."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from cpews.evaluation import evaluate
from cpews.evaluation.evaluate import predict_label_maps
from cpews.evaluation.infer import overlay_image
from cpews.evaluation.overlays import (
    LEGEND_ROW_HEIGHT,
    SEPARATOR,
    TITLE_HEIGHT,
    _pseudo_overlay,
    compose_overlay,
    legend_entries,
    scale_factor,
    write_overlays,
)
from cpews.metrics import ConfusionMeter
from cpews.model import build_model
from cpews.training.data import class_names, eval_dataset

PANELS = 5


class Micro(NamedTuple):
    cfg: object  # TrainConfig
    dataset: object  # EvalDataset of the session synthetic val split
    model: torch.nn.Module  # an untrained micro model (fixed seed)
    names: list[str]


@pytest.fixture(scope="module")
def micro(make_micro_config, synthetic_data_dir: Path) -> Micro:
    cfg = make_micro_config()
    names = class_names(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(names) - 1)
    return Micro(cfg, eval_dataset(cfg, synthetic_data_dir), model, names)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.array(image)


def _panel(strip: np.ndarray, k: int, height: int, width: int) -> np.ndarray:
    """Panel k of an overlay whose panels are (height, width) after scaling."""
    left = k * (width + SEPARATOR)
    return strip[TITLE_HEIGHT : TITLE_HEIGHT + height, left : left + width]


def _scaled(panel: np.ndarray, factor: int) -> np.ndarray:
    return panel.repeat(factor, axis=0).repeat(factor, axis=1)


def _maps(micro: Micro, sample: dict) -> dict[str, np.ndarray]:
    was_training = micro.model.training
    micro.model.eval()
    try:
        _, (maps,) = predict_label_maps(micro.model, [sample], micro.cfg)
    finally:
        micro.model.train(was_training)
    return {name: value.numpy() for name, value in maps.items()}


def test_strip_layout_and_panels(micro, tmp_path):
    (path,) = write_overlays(micro.model, micro.dataset, micro.cfg, indices=[1], out_dir=tmp_path)
    sample = micro.dataset[1]
    rgb, mask = sample["rgb"].numpy(), sample["mask"].numpy()
    assert mask.shape == (64, 64)  # the synthetic images: scaled by 3 to 192 px panels
    factor, height, width = 3, 192, 192
    strip = _read(path)
    rows = (strip.shape[0] - TITLE_HEIGHT - height) // LEGEND_ROW_HEIGHT
    assert strip.shape == (TITLE_HEIGHT + height + rows * LEGEND_ROW_HEIGHT, PANELS * width + (PANELS - 1) * SEPARATOR, 3)
    assert rows == 1  # a handful of synthetic classes fit in one legend row of a 976 px wide strip
    for k in range(1, PANELS):  # the separators are white
        left = k * (width + SEPARATOR) - SEPARATOR
        assert (strip[TITLE_HEIGHT : TITLE_HEIGHT + height, left : left + SEPARATOR] == 255).all()
    assert np.array_equal(_panel(strip, 0, height, width), _scaled(rgb, factor))
    maps = _maps(micro, sample)
    assert np.array_equal(_panel(strip, 1, height, width), _scaled(np.array(overlay_image(rgb, maps["cam"])), factor))
    assert np.array_equal(_panel(strip, 2, height, width), _scaled(_pseudo_overlay(rgb, maps["pseudo"]), factor))
    ignored = _scaled(maps["pseudo"][..., None], factor)[..., 0] == 255
    assert ignored.any()  # this image has an ignore band; it shows white
    assert (_panel(strip, 2, height, width)[ignored] == 255).all()
    assert np.array_equal(_panel(strip, 3, height, width), _scaled(np.array(overlay_image(rgb, maps["seg"])), factor))
    assert np.array_equal(_panel(strip, 4, height, width), _scaled(np.array(overlay_image(rgb, mask)), factor))
    for k in range(PANELS):  # every panel has a title: dark text pixels in the band above it
        title = strip[:TITLE_HEIGHT, k * (width + SEPARATOR) : k * (width + SEPARATOR) + width]
        assert (title.max(axis=2) < 128).any(), k
    legend = strip[TITLE_HEIGHT + height :]
    assert (legend != 255).any()
    for colour, _ in legend_entries(maps, mask, micro.names):  # each swatch's colour is in the legend
        assert (legend == colour).all(axis=2).any(), colour


def test_pseudo_ignore_pixels_are_white_and_the_rest_is_the_plain_overlay():
    rgb = np.array([[[10, 20, 30], [100, 100, 100]], [[0, 0, 0], [40, 50, 60]]], dtype=np.uint8)
    pseudo = np.array([[0, 1], [255, 255]], dtype=np.int64)
    out = _pseudo_overlay(rgb, pseudo)
    plain = np.array(overlay_image(rgb, pseudo))
    assert out[0].tolist() == plain[0].tolist() == [[10, 20, 30], [114, 50, 50]]
    assert out[1].tolist() == [[255, 255, 255], [255, 255, 255]]  # overlay_image would keep the image here


SYNTHETIC_NAMES = ("background", "ball", "kite", "boat", "car", "bus", "house")


def _hand_case() -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """A 4x4 grey image (one pixel (10, 20, 30)): ball (1) in the mask at (0, 0), boat (3) at (3, 3); kite (2) in
    the CAM at (1, 1); the pseudo label ignores (2, 2); the segmentation is all background."""
    rgb = np.full((4, 4, 3), 100, dtype=np.uint8)
    rgb[1, 2] = (10, 20, 30)
    mask = np.zeros((4, 4), dtype=np.int64)
    mask[0, 0], mask[3, 3] = 1, 3
    cam = np.zeros((4, 4), dtype=np.int64)
    cam[1, 1] = 2
    pseudo = cam.copy()
    pseudo[2, 2] = 255
    return rgb, {"cam": cam, "pseudo": pseudo, "seg": np.zeros((4, 4), dtype=np.int64)}, mask


def test_compose_overlay_by_hand():
    """4x4 panels scale by ceil(192 / 4) = 48 to 192 px; width 5 * 192 + 4 * SEPARATOR, height title + 192 +
    one legend row. Overlay colours: (image + VOC colour) / 2, e.g. grey 100 with ball (128, 0, 0) -> (114, 50, 50)."""
    rgb, maps, mask = _hand_case()
    out = compose_overlay(rgb, maps, mask, SYNTHETIC_NAMES)
    assert scale_factor(4, 4) == 48 and scale_factor(64, 64) == 3 and scale_factor(500, 375) == 1
    assert out.shape == (TITLE_HEIGHT + 192 + LEGEND_ROW_HEIGHT, 5 * 192 + 4 * SEPARATOR, 3)

    def at(panel: int, row: int, col: int) -> list[int]:  # an output pixel: (row, col) inside the scaled panel
        return out[TITLE_HEIGHT + row, panel * (192 + SEPARATOR) + col].tolist()

    # image: the odd pixel (1, 2) covers rows 48..95, columns 96..143, nearest neighbour (sharp edges)
    assert at(0, 48, 96) == at(0, 95, 143) == [10, 20, 30]
    assert at(0, 47, 96) == at(0, 96, 143) == at(0, 48, 144) == [100, 100, 100]
    assert at(1, 60, 60) == [50, 114, 50]  # CAM: kite (0, 128, 0) at (1, 1)
    assert at(2, 60, 60) == [50, 114, 50] and at(2, 100, 100) == [255, 255, 255]  # pseudo: kite, ignore white
    assert at(3, 0, 0) == at(3, 191, 191) == [100, 100, 100]  # segmentation: all background, not coloured
    assert at(4, 0, 0) == at(4, 47, 47) == [114, 50, 50]  # ground truth: ball (128, 0, 0) at (0, 0)
    assert at(4, 191, 191) == [114, 114, 50] and at(4, 48, 48) == [100, 100, 100]  # boat (128, 128, 0) at (3, 3)
    assert (out[TITLE_HEIGHT : TITLE_HEIGHT + 192, 192 : 192 + SEPARATOR] == 255).all()  # separator

    expected = [((128, 0, 0), "ball"), ((0, 128, 0), "kite"), ((128, 128, 0), "boat"), ((255, 255, 255), "ignore")]
    assert legend_entries(maps, mask, SYNTHETIC_NAMES) == expected
    legend = out[TITLE_HEIGHT + 192 :]
    middle = LEGEND_ROW_HEIGHT // 2
    assert legend[middle, SEPARATOR + 5].tolist() == [128, 0, 0]  # the first swatch is ball's
    for colour, _ in expected[:3]:
        assert (legend == colour).all(axis=2).sum() >= 10 * 10, colour  # a swatch of that colour
    assert not (legend == (0, 0, 128)).all(axis=2).any()  # car is in no map: not in the legend
    assert (legend.max(axis=2) < 128).sum() > 50  # the names: dark text
    titles = out[:TITLE_HEIGHT]
    for k in range(5):
        assert (titles[:, k * (192 + SEPARATOR) : k * (192 + SEPARATOR) + 192].max(axis=2) < 128).any(), k


def test_legend_wraps_into_rows_that_show_every_class():
    """All 20 VOC foreground classes in an 8x8 image: their names do not fit in one 976 px row."""
    from cpews.data.classes import class_table

    names = class_table("voc").names
    labels = np.arange(64, dtype=np.int64).reshape(8, 8) % 21
    maps = {"cam": labels, "pseudo": labels, "seg": labels}
    out = compose_overlay(np.zeros((8, 8, 3), dtype=np.uint8), maps, labels, names)
    rows = (out.shape[0] - TITLE_HEIGHT - 192) // LEGEND_ROW_HEIGHT
    assert rows >= 2 and out.shape[0] == TITLE_HEIGHT + 192 + rows * LEGEND_ROW_HEIGHT
    legend = out[TITLE_HEIGHT + 192 :]
    entries = legend_entries(maps, labels, names)
    assert [name for _, name in entries] == list(names[1:])
    for colour, name in entries:
        assert (legend == colour).all(axis=2).sum() >= 10 * 10, name


def test_an_image_without_foreground_says_so_in_the_legend():
    rgb, _, _ = _hand_case()
    empty = np.zeros((4, 4), dtype=np.int64)
    out = compose_overlay(rgb, {"cam": empty, "pseudo": empty, "seg": empty}, empty, SYNTHETIC_NAMES)
    assert out.shape[0] == TITLE_HEIGHT + 192 + LEGEND_ROW_HEIGHT
    assert (out[TITLE_HEIGHT + 192 :].max(axis=2) < 128).sum() > 50  # the sentence


def test_one_file_per_index_named_by_id_in_order(micro, tmp_path):
    out_dir = tmp_path / "overlays"
    indices = [3, 0, 5]
    written = write_overlays(micro.model, micro.dataset, micro.cfg, indices=indices, out_dir=out_dir)
    ids = [micro.dataset.ids[i] for i in indices]
    assert written == [out_dir / f"{image_id}.png" for image_id in ids]
    # exactly those files: no temporary file is left behind
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{image_id}.png" for image_id in ids)


@pytest.mark.parametrize("bad", [8, -1])
def test_out_of_range_index_raises_before_anything_is_written(micro, tmp_path, bad):
    assert len(micro.dataset) == 8
    out_dir = tmp_path / "overlays"
    with pytest.raises(IndexError, match=rf"index {bad} .*8 images"):
        write_overlays(micro.model, micro.dataset, micro.cfg, indices=[0, bad], out_dir=out_dir)
    assert not out_dir.exists()


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_is_restored(micro, tmp_path, training):
    micro.model.train(training)
    write_overlays(micro.model, micro.dataset, micro.cfg, indices=[0], out_dir=tmp_path)
    assert micro.model.training is training
    assert all(m.training is training for m in micro.model.modules())


def test_resized_dataset_panels_keep_the_original_size(micro, synthetic_data_dir, tmp_path):
    dataset = eval_dataset(micro.cfg, synthetic_data_dir, resize=32)
    (path,) = write_overlays(micro.model, dataset, micro.cfg, indices=[0], out_dir=tmp_path)
    height, width = dataset[0]["mask"].shape
    assert dataset[0]["rgb"].shape[:2] != (height, width)
    factor = scale_factor(height, width)
    strip = _read(path)
    assert strip.shape[1] == PANELS * factor * width + (PANELS - 1) * SEPARATOR
    assert (strip.shape[0] - TITLE_HEIGHT - factor * height) % LEGEND_ROW_HEIGHT == 0


def test_predict_label_maps_agrees_with_evaluate(micro):
    micro.model.train()
    result = evaluate(micro.model, micro.dataset, micro.cfg, class_names=micro.names, batch_size=3)
    meters = {name: ConfusionMeter(len(micro.names)) for name in ("cam", "aux_cam", "pseudo", "seg")}
    micro.model.eval()
    try:
        for first in range(0, len(micro.dataset), 3):  # the same batches as evaluate
            samples = [micro.dataset[i] for i in range(first, min(first + 3, len(micro.dataset)))]
            output, maps = predict_label_maps(micro.model, samples, micro.cfg)
            assert output.logits.shape == (len(samples), len(micro.names) - 1)
            for sample, predictions in zip(samples, maps):
                assert set(predictions) == set(meters)
                for name, pred in predictions.items():
                    assert pred.shape == sample["mask"].shape and pred.dtype == torch.int64
                    meters[name].update(pred, sample["mask"])
    finally:
        micro.model.train()
    for name, meter in meters.items():
        assert result.metrics[f"miou_{name}"] == pytest.approx(float(meter.scores().miou)), name

"""Overlay strips (image | CAM | pseudo label | segmentation | ground truth) and their label maps."""

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
from cpews.evaluation.overlays import SEPARATOR, _pseudo_overlay, write_overlays
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


def _panel(strip: np.ndarray, k: int, width: int) -> np.ndarray:
    left = k * (width + SEPARATOR)
    return strip[:, left : left + width]


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
    height, width = mask.shape
    strip = _read(path)
    assert strip.shape == (height, PANELS * width + (PANELS - 1) * SEPARATOR, 3)
    for k in range(1, PANELS):  # the separators are white
        assert (strip[:, k * (width + SEPARATOR) - SEPARATOR : k * (width + SEPARATOR)] == 255).all()
    assert np.array_equal(_panel(strip, 0, width), rgb)
    maps = _maps(micro, sample)
    assert np.array_equal(_panel(strip, 1, width), np.array(overlay_image(rgb, maps["cam"])))
    assert np.array_equal(_panel(strip, 2, width), _pseudo_overlay(rgb, maps["pseudo"]))
    ignored = maps["pseudo"] == 255
    assert ignored.any()  # this image has an ignore band; it shows white
    assert (_panel(strip, 2, width)[ignored] == 255).all()
    assert np.array_equal(_panel(strip, 3, width), np.array(overlay_image(rgb, maps["seg"])))
    assert np.array_equal(_panel(strip, 4, width), np.array(overlay_image(rgb, mask)))


def test_pseudo_ignore_pixels_are_white_and_the_rest_is_the_plain_overlay():
    rgb = np.array([[[10, 20, 30], [100, 100, 100]], [[0, 0, 0], [40, 50, 60]]], dtype=np.uint8)
    pseudo = np.array([[0, 1], [255, 255]], dtype=np.int64)
    out = _pseudo_overlay(rgb, pseudo)
    plain = np.array(overlay_image(rgb, pseudo))
    assert out[0].tolist() == plain[0].tolist() == [[10, 20, 30], [114, 50, 50]]
    assert out[1].tolist() == [[255, 255, 255], [255, 255, 255]]  # overlay_image would keep the image here


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
    assert _read(path).shape == (height, PANELS * width + (PANELS - 1) * SEPARATOR, 3)


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

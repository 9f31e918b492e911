"""Loading a checkpoint for inference and writing label PNGs and overlays (method.md §9.3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpews.data import SYNTHETIC_CLASSES
from cpews.evaluation import infer_files, load_model, segment_image
from cpews.evaluation.infer import label_image, overlay_image, read_rgb


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_model(trained_run.out_dir / "last.pt")


@pytest.fixture
def two_images(synthetic_data_dir: Path, tmp_path: Path) -> list[Path]:
    """Two validation images of the session dataset, copied (the stems become the output names)."""
    ids = (synthetic_data_dir / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:2]
    paths = []
    for image_id in ids:
        target = tmp_path / "inputs" / f"{image_id}.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(synthetic_data_dir / "JPEGImages" / f"{image_id}.png", target)
        paths.append(target)
    return paths


def test_load_model_reproduces_the_trained_model_exactly(trained_run, loaded):
    assert loaded.cfg == trained_run.cfg
    assert loaded.class_names == list(SYNTHETIC_CLASSES)
    assert loaded.iteration == 6
    assert not loaded.model.training
    trained = trained_run.model
    was_training = trained.training
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    try:
        trained.eval()
        with torch.no_grad():
            expected, got = trained(images), loaded.model(images)
    finally:
        trained.train(was_training)
    for name, value in expected._asdict().items():
        assert torch.equal(getattr(got, name), value), name


def test_label_image_keeps_values_and_uses_the_voc_palette():
    labels = np.array([[0, 1, 2], [3, 6, 255]], dtype=np.uint8)
    image = label_image(labels)
    assert image.mode == "P"
    assert np.array_equal(np.array(image), labels)
    palette = np.array(image.getpalette()[: 256 * 3]).reshape(256, 3)
    # VOC colour map, by hand: 0 black, 1 (128,0,0), 2 (0,128,0), 3 (128,128,0), 6 (0,128,128); 255 white
    assert palette[[0, 1, 2, 3, 6, 255]].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 128, 128],
        [255, 255, 255],
    ]


def test_overlay_blends_foreground_only():
    rgb = np.array([[[10, 20, 30], [100, 100, 100]], [[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = np.array(overlay_image(rgb, labels))
    # background and ignore keep the image; foreground is 0.5 * rgb + 0.5 * colour, rounded
    assert out.tolist() == [[[10, 20, 30], [114, 50, 50]], [[0, 64, 0], [255, 255, 255]]]


def test_infer_files_writes_a_label_png_and_an_overlay_per_image(loaded, two_images, tmp_path):
    out_dir = tmp_path / "pred"
    written = infer_files(loaded, two_images, out_dir)
    assert written == [(out_dir / f"{p.stem}.png", out_dir / f"{p.stem}_overlay.png") for p in two_images]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        name for p in two_images for name in (f"{p.stem}.png", f"{p.stem}_overlay.png")
    )
    num_labels = len(SYNTHETIC_CLASSES)
    for source, (label_path, overlay_path) in zip(two_images, written):
        rgb = read_rgb(source)
        with Image.open(label_path) as label_file:
            assert label_file.mode == "P"
            assert label_file.size == (rgb.shape[1], rgb.shape[0])
            labels = np.array(label_file)
        assert labels.max() < num_labels  # label values 0..C
        assert np.array_equal(labels, segment_image(loaded, rgb))
        with Image.open(overlay_path) as overlay_file:
            assert overlay_file.mode == "RGB"
            overlay = np.array(overlay_file)
        assert overlay.shape == rgb.shape
        assert np.array_equal(overlay, np.array(overlay_image(rgb, labels)))


def test_segment_image_with_crf_gives_labels_of_the_image_size(loaded, two_images):
    rgb = np.array(Image.open(two_images[0]).convert("RGB"))  # a writable array
    labels = segment_image(loaded, rgb, crf=True)
    assert labels.shape == rgb.shape[:2] and labels.dtype == np.uint8
    assert labels.max() < len(SYNTHETIC_CLASSES)


def test_infer_files_with_crf(loaded, two_images, tmp_path):
    written = infer_files(loaded, two_images, tmp_path / "pred", crf=True)
    for source, (label_path, _) in zip(two_images, written):
        with Image.open(label_path) as label_file:
            labels = np.array(label_file)
        assert np.array_equal(
            labels, segment_image(loaded, np.array(Image.open(source).convert("RGB")), crf=True)
        )


@pytest.mark.parametrize("kind", ["garbage", "missing"])
def test_unreadable_image_fails_before_anything_is_written(loaded, two_images, tmp_path, kind):
    bad = tmp_path / "bad.png"
    if kind == "garbage":
        bad.write_bytes(b"not a png at all" * 10)
    out_dir = tmp_path / "pred"
    with pytest.raises(ValueError, match="bad.png"):
        infer_files(loaded, [*two_images, bad], out_dir)  # the good images come first
    assert not out_dir.exists()

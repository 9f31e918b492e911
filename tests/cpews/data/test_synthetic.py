from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpews.data import synthetic
from cpews.data.classes import SYNTHETIC_CLASSES, SYNTHETIC_SUPERCLASSES
from cpews.data.synthetic import (
    CONFOUNDED_CLASS,
    SyntheticDatasetError,
    SyntheticParams,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    render_image,
)

TINY = {"n_train": 12, "n_val": 4, "n_train_subset": 5}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def test_same_seed_gives_identical_bytes_regardless_of_workers(tmp_path: Path) -> None:
    first = generate_synthetic_dataset(tmp_path / "a", seed=1, **TINY)
    second = generate_synthetic_dataset(tmp_path / "b", seed=1, num_workers=2, chunk_size=5, **TINY)
    assert _tree_bytes(first) == _tree_bytes(second)


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    first = _tree_bytes(generate_synthetic_dataset(tmp_path / "a", seed=1, **TINY))
    second = _tree_bytes(generate_synthetic_dataset(tmp_path / "b", seed=2, **TINY))
    assert first.keys() == second.keys()
    images = [name for name in first if name.startswith("JPEGImages")]
    assert all(first[name] != second[name] for name in images)


def test_layout_and_lists(synthetic_root: Path) -> None:
    lists = synthetic_root / "ImageSets" / "Segmentation"
    splits = {s: (lists / f"{s}.txt").read_text().split() for s in ("train_aug", "train", "val")}
    assert len(splits["train_aug"]) == 60 and len(splits["val"]) == 20 and len(splits["train"]) == 10
    assert set(splits["train"]) <= set(splits["train_aug"])
    assert not set(splits["train_aug"]) & set(splits["val"])
    for image_id in splits["train_aug"] + splits["val"]:
        rgb = _read(synthetic_root / "JPEGImages" / f"{image_id}.png")
        mask = _read(synthetic_root / "SegmentationClassAug" / f"{image_id}.png")
        confounder = _read(synthetic_root / "ConfounderMask" / f"{image_id}.png")
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        assert mask.shape == confounder.shape == (64, 64)
        assert set(np.unique(mask)) <= set(range(len(SYNTHETIC_CLASSES)))
        assert (mask > 0).any(), f"{image_id} has no foreground"  # every image holds an object
        assert set(np.unique(confounder)) <= {0, 1}


def test_meta(synthetic_root: Path) -> None:
    meta = json.loads((synthetic_root / "meta.json").read_text())
    assert meta["classes"] == list(SYNTHETIC_CLASSES)
    assert meta["superclasses"] == list(SYNTHETIC_SUPERCLASSES)
    assert meta["confounded_class"] == CONFOUNDED_CLASS == 3 and meta["classes"][3] == "boat"
    assert meta["confounder_texture"] == "water"
    assert meta["format_version"] == synthetic.FORMAT_VERSION
    assert meta["params"]["seed"] == 3 and meta["params"]["confounder_strength"] == 0.9


def test_files_match_render_and_confounder_mask_semantics(synthetic_root: Path) -> None:
    params = SyntheticParams(**json.loads((synthetic_root / "meta.json").read_text())["params"])
    ids = params.split_ids()["train_aug"] + params.split_ids()["val"]
    for index in range(0, len(ids), 7):
        rendered = render_image(params, index)
        mask = _read(synthetic_root / "SegmentationClassAug" / f"{ids[index]}.png")
        confounder = _read(synthetic_root / "ConfounderMask" / f"{ids[index]}.png")
        np.testing.assert_array_equal(mask, rendered.mask)
        np.testing.assert_array_equal(confounder, rendered.confounder_mask)
        assert not (confounder.astype(bool) & (mask > 0)).any()  # water only where no object covers it
        if not rendered.has_water:
            assert not confounder.any()
        else:  # the band: every uncovered pixel from the first water row down is water, none above it
            first_row = int(np.flatnonzero(confounder.any(axis=1))[0])
            assert not confounder[:first_row].any()
            np.testing.assert_array_equal(confounder[first_row:], (mask[first_row:] == 0).astype(np.uint8))


def _water_rates(params: SyntheticParams, count: int) -> tuple[float, float, int]:
    rendered = [render_image(params, index) for index in range(count)]
    boat = [r.has_water for r in rendered if CONFOUNDED_CLASS in r.drawn_classes]
    other = [r.has_water for r in rendered if CONFOUNDED_CLASS not in r.drawn_classes]
    return float(np.mean(boat)), float(np.mean(other)), len(boat)


def test_confounder_statistics_follow_parameters() -> None:
    # 400 images -> ~130 boat images; the binomial std of the rate at p = 0.9 is ~0.03: 0.08 is > 2.5 sigma.
    boat_rate, other_rate, boat_images = _water_rates(SyntheticParams(seed=0), 400)
    assert boat_images > 80
    assert abs(boat_rate - 0.9) < 0.08
    assert other_rate < 0.06
    boat_rate, other_rate, _ = _water_rates(SyntheticParams(confounder_strength=0.0, confounder_leak=0.0), 60)
    assert boat_rate == 0.0 and other_rate == 0.0
    boat_rate, _, _ = _water_rates(SyntheticParams(confounder_strength=1.0), 60)
    assert boat_rate == 1.0


def test_boats_sit_on_water() -> None:
    params = SyntheticParams(seed=5, confounder_strength=1.0)
    for index in range(40):
        rendered = render_image(params, index)
        if CONFOUNDED_CLASS in rendered.drawn_classes and rendered.confounder_mask.any():
            water_top = int(np.flatnonzero(rendered.confounder_mask.any(axis=1))[0])
            boat_rows = np.flatnonzero((rendered.mask == CONFOUNDED_CLASS).any(axis=1))
            assert boat_rows.max() > water_top


def test_ensure_reuses_matching_dataset(tmp_path: Path) -> None:
    root = ensure_synthetic_dataset(tmp_path / "data", **TINY)
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path / "data", **TINY) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(SyntheticDatasetError, match="pass another folder or delete it"):
        ensure_synthetic_dataset(tmp_path / "data", seed=9, **TINY)
    with pytest.raises(SyntheticDatasetError, match="other parameters"):
        generate_synthetic_dataset(tmp_path / "data", seed=9, **TINY)


def test_refuses_foreign_folder_and_accepts_empty(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SyntheticDatasetError, match=str(foreign)):
        generate_synthetic_dataset(foreign, **TINY)
    with pytest.raises(SyntheticDatasetError, match="pass another folder or delete it"):
        ensure_synthetic_dataset(foreign, **TINY)
    assert (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_synthetic_dataset(empty, **TINY) / "meta.json").is_file()


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_images", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic_dataset(tmp_path / "data", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_no_temporary_folders_left(tmp_path: Path) -> None:
    generate_synthetic_dataset(tmp_path / "data", **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_overwrite_replaces_other_params(tmp_path: Path) -> None:
    generate_synthetic_dataset(tmp_path / "data", seed=1, **TINY)
    generate_synthetic_dataset(tmp_path / "data", seed=2, overwrite=True, **TINY)
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["params"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"confounder_strength": 1.5}, "confounder_strength"),
        ({"image_size": 16}, "image_size"),
        ({"n_val": 0}, "n_val"),
    ],
)
def test_invalid_parameters(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_synthetic_dataset(tmp_path / "data", **kwargs)


def test_larger_image_size(tmp_path: Path) -> None:
    rendered = render_image(SyntheticParams(image_size=96), 0)
    assert rendered.rgb.shape == (96, 96, 3) and rendered.mask.shape == (96, 96)


def test_default_size_generation_time(tmp_path: Path) -> None:
    """Not a timing assert: prints the time of a 300-image generation for the log (default is 2300)."""
    start = time.perf_counter()
    generate_synthetic_dataset(tmp_path / "data", n_train=250, n_val=50)
    print(f"generated 300 synthetic images in {time.perf_counter() - start:.2f} s")

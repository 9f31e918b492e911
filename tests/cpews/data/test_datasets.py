from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpews.data.datasets import (
    DatasetError,
    EvalDataset,
    TrainDataset,
    image_labels,
    read_split_ids,
    validate_dataset,
)


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def write_voc(root: Path, masks: dict[str, np.ndarray], lists: dict[str, list[str]]) -> Path:
    """VOC layout: JPEG images the size of each mask, palette-free L-mode masks, the given split lists."""
    for image_id, mask in masks.items():
        height, width = mask.shape
        rgb = np.full((height, width, 3), 100, dtype=np.uint8)
        Image.fromarray(rgb).save(_mkparent(root / "JPEGImages" / f"{image_id}.jpg"))
        write_png(root / "SegmentationClassAug" / f"{image_id}.png", mask.astype(np.uint8), "L")
    for split, ids in lists.items():
        _mkparent(root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
    return root


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


TRAIN_KWARGS = {"crop_size": 48, "scale_range": (0.5, 1.5), "hflip_prob": 0.5, "photometric": True}


def _mask(values: list[int], size: tuple[int, int] = (6, 8)) -> np.ndarray:
    """A mask whose first pixels hold ``values`` and the rest 0."""
    mask = np.zeros(size, dtype=np.uint8)
    mask.flat[: len(values)] = values
    return mask


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    masks = {
        "a": _mask([1, 255]),
        "b": _mask([2, 2, 20]),
        "c": _mask([5]),
        "d": _mask([]),
    }
    return write_voc(tmp_path / "VOC2012", masks, {"val": ["c"], "train": ["a", "b"]})


# ------------------------------------------------------------------ split lists and labels


def test_synthetic_splits(synthetic_root: Path) -> None:
    train_aug = read_split_ids(synthetic_root, "synthetic", "train_aug")
    val = read_split_ids(synthetic_root, "synthetic", "val")
    assert len(train_aug) == 60 and len(val) == 20 and not set(train_aug) & set(val)


def test_image_labels_equal_mask_values(synthetic_root: Path) -> None:
    ids = read_split_ids(synthetic_root, "synthetic", "val")
    labels = image_labels(synthetic_root, "synthetic", "val", ids)
    for image_id in ids:
        with Image.open(synthetic_root / "SegmentationClassAug" / f"{image_id}.png") as mask:
            values = set(np.unique(np.array(mask)).tolist()) - {0, 255}
        assert labels[image_id].dtype == np.float32 and labels[image_id].shape == (6,)
        assert set((np.flatnonzero(labels[image_id]) + 1).tolist()) == values
    assert list((synthetic_root / ".cpews_cache").glob("labels-synthetic-val-*.npz"))
    cached = image_labels(synthetic_root, "synthetic", "val", ids)
    assert all(np.array_equal(cached[i], labels[i]) for i in ids)


def test_train_aug_derived_from_masks_minus_val(voc_root: Path) -> None:
    assert read_split_ids(voc_root, "voc", "train_aug") == ["a", "b", "d"]
    labels = image_labels(voc_root, "voc", "train_aug", ["a", "b", "d"])
    assert np.flatnonzero(labels["a"]).tolist() == [0]  # value 1 -> channel 0; 255 ignored
    assert np.flatnonzero(labels["b"]).tolist() == [1, 19]  # values 2 and 20
    assert not labels["d"].any()


def test_train_aug_needs_val_list(voc_root: Path) -> None:
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match="val.txt"):
        read_split_ids(voc_root, "voc", "train_aug")


def test_missing_list_not_derivable(voc_root: Path) -> None:
    with pytest.raises(DatasetError, match="test.txt"):
        read_split_ids(voc_root, "voc", "test")


def test_sbd_style_list_lines(voc_root: Path) -> None:
    list_path = voc_root / "ImageSets" / "Segmentation" / "train_aug.txt"
    list_path.write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\n\nb\n")
    assert read_split_ids(voc_root, "voc", "train_aug") == ["a", "b"]


def test_labels_cache_invalidated_when_mask_changes(voc_root: Path) -> None:
    assert np.flatnonzero(image_labels(voc_root, "voc", "train", ["a"])["a"]).tolist() == [0]
    path = voc_root / "SegmentationClassAug" / "a.png"
    write_png(path, _mask([3]), "L")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert np.flatnonzero(image_labels(voc_root, "voc", "train", ["a"])["a"]).tolist() == [2]


def test_labels_reject_out_of_range_value(voc_root: Path) -> None:
    write_png(voc_root / "SegmentationClassAug" / "a.png", _mask([21]), "L")
    with pytest.raises(DatasetError, match=r"a\.png.*\[21\]"):
        image_labels(voc_root, "voc", "train", ["a"])


# ------------------------------------------------------------------ COCO layout


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco2014"
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    Image.fromarray(gray, mode="L").save(_parent(root / "train2014" / "COCO_train2014_000000000009.jpg"))
    write_png(
        root / "SegmentationClass" / "train2014" / "COCO_train2014_000000000009.png", _mask([80, 1], (5, 6))
    )
    rgb = np.full((7, 4, 3), 50, dtype=np.uint8)
    Image.fromarray(rgb).save(_parent(root / "val2014" / "COCO_val2014_000000000042.jpg"))
    write_png(root / "SegmentationClass" / "val2014" / "COCO_val2014_000000000042.png", _mask([44], (7, 4)))
    _parent(root / "ImageSets" / "val_part.txt").write_text("COCO_val2014_000000000042\n")
    return root


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_coco_reader_with_grayscale_image(coco_root: Path) -> None:
    assert read_split_ids(coco_root, "coco", "train") == ["COCO_train2014_000000000009"]  # derived from masks
    assert read_split_ids(coco_root, "coco", "val_part") == ["COCO_val2014_000000000042"]  # from the list
    item = EvalDataset(coco_root, "coco", "train")[0]
    assert item["image"].shape == (3, 5, 6) and item["rgb"].shape == (5, 6, 3)
    assert torch.equal(item["rgb"][..., 0], item["rgb"][..., 2])  # grey decoded to 3 equal channels
    assert item["labels"].shape == (80,) and torch.nonzero(item["labels"]).flatten().tolist() == [0, 79]
    assert "confounder_mask" not in item
    train_item = TrainDataset(coco_root, "coco", "train", **TRAIN_KWARGS)[0]
    assert train_item["image"].shape == (3, 48, 48)
    validate_dataset(coco_root, "coco", ["train", "val_part"])


def test_coco_unknown_split_without_list(coco_root: Path) -> None:
    with pytest.raises(DatasetError, match="test2014.txt"):
        read_split_ids(coco_root, "coco", "test2014")


# ------------------------------------------------------------------ TrainDataset / EvalDataset


def test_train_dataset_item(synthetic_root: Path) -> None:
    dataset = TrainDataset(synthetic_root, "synthetic", "train_aug", **TRAIN_KWARGS, seed=1)
    assert len(dataset) == 60 and dataset.class_table.num_classes == 6
    item = dataset[0]
    assert set(item) == {"image", "labels", "box", "name"}
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert (
        item["labels"].shape == (6,) and item["labels"].dtype == torch.float32 and item["labels"].sum() >= 1
    )
    assert item["box"].shape == (4,) and item["box"].dtype == torch.int64
    r0, r1, c0, c1 = item["box"].tolist()
    assert 0 <= r0 < r1 <= 48 and 0 <= c0 < c1 <= 48
    assert item["name"] == dataset.ids[0]


def test_train_dataset_pads_images_smaller_than_crop(synthetic_root: Path) -> None:
    dataset = TrainDataset(
        synthetic_root,
        "synthetic",
        "train",
        crop_size=96,
        scale_range=(1.0, 1.0),
        hflip_prob=0.0,
        photometric=False,
    )
    r0, r1, c0, c1 = dataset[0]["box"].tolist()
    assert (r1 - r0, c1 - c0) == (64, 64)


def test_train_dataset_reproducible_with_torch_seed(synthetic_root: Path) -> None:
    dataset = TrainDataset(synthetic_root, "synthetic", "train", **TRAIN_KWARGS)
    torch.manual_seed(0)
    first = [dataset[i]["image"] for i in range(3)]
    torch.manual_seed(0)
    again = [dataset[i]["image"] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["box"].shape == (4, 4) and len(batch["name"]) == 4


def test_ids_subset_and_unknown_id(synthetic_root: Path) -> None:
    ids = read_split_ids(synthetic_root, "synthetic", "train_aug")[5:9]
    dataset = TrainDataset(synthetic_root, "synthetic", "train_aug", **TRAIN_KWARGS, ids=ids)
    assert dataset.ids == ids and [dataset[i]["name"] for i in range(len(dataset))] == ids
    val_id = read_split_ids(synthetic_root, "synthetic", "val")[0]
    with pytest.raises(DatasetError, match=repr(val_id)):
        TrainDataset(synthetic_root, "synthetic", "train_aug", **TRAIN_KWARGS, ids=[ids[0], val_id])
    with pytest.raises(DatasetError, match=repr(val_id)):
        EvalDataset(synthetic_root, "synthetic", "train_aug", ids=[val_id])


def test_eval_dataset_item(synthetic_root: Path) -> None:
    dataset = EvalDataset(synthetic_root, "synthetic", "val")
    item = dataset[3]
    assert item["image"].shape == (3, 64, 64) and item["rgb"].shape == (64, 64, 3)
    assert item["rgb"].dtype == torch.uint8 and item["mask"].dtype == torch.int64
    assert item["mask"].shape == (64, 64) and item["confounder_mask"].shape == (64, 64)
    assert item["confounder_mask"].dtype == torch.uint8
    present = set(torch.unique(item["mask"]).tolist()) - {0, 255}
    assert set((torch.nonzero(item["labels"]).flatten() + 1).tolist()) == present
    resized = EvalDataset(synthetic_root, "synthetic", "val", resize=32)[3]
    assert resized["image"].shape == (3, 32, 32) and resized["rgb"].shape == (32, 32, 3)
    assert torch.equal(resized["mask"], item["mask"])  # ground truth stays at the original size


def test_eval_dataset_without_confounder_folder(voc_root: Path) -> None:
    item = EvalDataset(voc_root, "voc", "val")[0]
    assert "confounder_mask" not in item and item["mask"].shape == (6, 8)


# ------------------------------------------------------------------ validate_dataset


def test_validate_accepts_good_datasets(synthetic_root: Path, voc_root: Path) -> None:
    validate_dataset(synthetic_root, "synthetic", ["train_aug", "train", "val"])
    validate_dataset(voc_root, "voc", ["train_aug", "train", "val"], check_images=2)


def test_validate_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        validate_dataset(tmp_path / "nowhere", "voc", ["val"])


def test_validate_missing_folder(voc_root: Path) -> None:
    for path in (voc_root / "JPEGImages").iterdir():
        path.unlink()
    (voc_root / "JPEGImages").rmdir()
    with pytest.raises(DatasetError, match="JPEGImages does not exist"):
        validate_dataset(voc_root, "voc", ["val"])


def test_validate_missing_list(voc_root: Path) -> None:
    with pytest.raises(DatasetError, match="test.txt not found"):
        validate_dataset(voc_root, "voc", ["val", "test"])


def test_validate_missing_image_and_mask(voc_root: Path) -> None:
    (voc_root / "JPEGImages" / "a.jpg").unlink()
    (voc_root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nghost\n")
    with pytest.raises(DatasetError) as error:
        validate_dataset(voc_root, "voc", ["train"])
    message = str(error.value)
    assert "3 problem(s)" in message  # a's image, ghost's image, ghost's mask
    assert (
        "JPEGImages/a{.jpg" in message
        and "'ghost'" in message
        and "SegmentationClassAug/ghost.png" in message
    )


def test_validate_unreadable_image(voc_root: Path) -> None:
    (voc_root / "JPEGImages" / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"b\.jpg is unreadable"):
        validate_dataset(voc_root, "voc", ["train"])


def test_validate_size_mismatch(voc_root: Path) -> None:
    write_png(voc_root / "SegmentationClassAug" / "b.png", np.zeros((5, 5), dtype=np.uint8), "L")
    with pytest.raises(DatasetError, match=r"b\.png is 5x5 .* is 6x8"):
        validate_dataset(voc_root, "voc", ["train"])


def test_validate_label_out_of_range(voc_root: Path) -> None:
    write_png(voc_root / "SegmentationClassAug" / "a.png", _mask([42]), "L")
    with pytest.raises(DatasetError, match=r"a\.png has label values \[42\]"):
        validate_dataset(voc_root, "voc", ["train"])


def test_validate_samples_images(voc_root: Path) -> None:
    # train_aug = a, b, d; with check_images=2 only the first and last (a, d) are opened.
    (voc_root / "JPEGImages" / "b.jpg").write_bytes(b"not an image")
    validate_dataset(voc_root, "voc", ["train_aug"], check_images=2)
    with pytest.raises(DatasetError, match=r"b\.jpg"):
        validate_dataset(voc_root, "voc", ["train_aug"], check_images=3)
    validate_dataset(voc_root, "voc", ["train_aug"], check_images=False)


def test_validate_limits_listed_problems(voc_root: Path) -> None:
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"x{i}\n" for i in range(30)))
    with pytest.raises(DatasetError, match=r"60 problem\(s\)[\s\S]*and 50 more"):
        validate_dataset(voc_root, "voc", ["val"], max_problems=10)


def test_labels_cache_falls_back_to_user_cache(
    voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (voc_root / ".cpews_cache").write_text("a file, so the cache folder cannot be created here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    labels = image_labels(voc_root, "voc", "train", ["a", "b"])
    assert np.flatnonzero(labels["b"]).tolist() == [1, 19]
    assert list((tmp_path / "user_cache" / "cpews").glob("*/labels-voc-train-*.npz"))

"""Readers for PASCAL VOC 2012 + SBD, MS COCO 2014 and the synthetic dataset (method.md §10).

Layouts (``root`` is the folder passed to every function):

* ``voc`` and ``synthetic`` (``root`` = ``VOCdevkit/VOC2012`` or the synthetic output folder)::

      JPEGImages/<id>.jpg|.png   SegmentationClassAug/<id>.png   ImageSets/Segmentation/<split>.txt
      ConfounderMask/<id>.png    (synthetic only, optional)

  Without ``train_aug.txt`` the ``train_aug`` split is every mask in ``SegmentationClassAug`` minus the
  ``val`` list.
* ``coco``::

      {train2014,val2014}/<id>.jpg   SegmentationClass/{train2014,val2014}/<id>.png   ImageSets/<split>.txt

  Splits ``train`` (train2014), ``val`` and ``val_part`` (val2014). Without a list, a split is every mask in
  its folder. Ids of the form ``COCO_<folder>_<number>`` choose their folder themselves.

Masks are PNGs (palette or L mode) with values 0..C and 255 (ignore). Image-level labels are the C-dim
multi-hot of the mask values excluding 0 and 255 (``y[v - 1] = 1``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cpews.data.classes import ClassTable, class_table
from cpews.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricParams,
    eval_transform,
    to_rgb_uint8,
    train_transform,
)

__all__ = [
    "COCO_SPLIT_FOLDERS",
    "IGNORE_INDEX",
    "DatasetError",
    "DatasetLayout",
    "EvalDataset",
    "TrainDataset",
    "image_labels",
    "load_image",
    "read_mask",
    "read_split_ids",
    "validate_dataset",
]

IGNORE_INDEX = 255
COCO_SPLIT_FOLDERS: dict[str, str] = {"train": "train2014", "val": "val2014", "val_part": "val2014"}
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".png", ".jpeg")
_COCO_ID_FOLDER = re.compile(r"^COCO_((?:train|val)2014)_")
_LABEL_CACHE_VERSION = 1


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or malformed; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------------------
# Layout.
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetLayout:
    """Where the lists, images and masks of one dataset live."""

    root: Path
    dataset: str

    def __post_init__(self) -> None:
        class_table(self.dataset)  # validates the name

    @property
    def is_coco(self) -> bool:
        return self.dataset == "coco"

    def list_path(self, split: str) -> Path:
        if self.is_coco:
            return self.root / "ImageSets" / f"{split}.txt"
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def coco_folder(self, split: str, image_id: str | None = None) -> str:
        """COCO image folder of ``image_id`` (from its name if it has one, else from ``split``)."""
        if image_id is not None:
            match = _COCO_ID_FOLDER.match(image_id)
            if match:
                return match.group(1)
        try:
            return COCO_SPLIT_FOLDERS[split]
        except KeyError:
            raise DatasetError(
                f"COCO split {split!r} at {self.root} has no known image folder; known splits: "
                f"{', '.join(COCO_SPLIT_FOLDERS)}"
            ) from None

    def image_dir(self, split: str, image_id: str | None = None) -> Path:
        return self.root / self.coco_folder(split, image_id) if self.is_coco else self.root / "JPEGImages"

    def mask_dir(self, split: str, image_id: str | None = None) -> Path:
        if self.is_coco:
            return self.root / "SegmentationClass" / self.coco_folder(split, image_id)
        return self.root / "SegmentationClassAug"

    def confounder_dir(self) -> Path | None:
        """``ConfounderMask/`` of a synthetic dataset, or None when absent."""
        path = self.root / "ConfounderMask"
        return path if not self.is_coco and path.is_dir() else None

    def image_path(self, split: str, image_id: str) -> Path:
        """The existing image file of ``image_id`` (.jpg, then .png, .jpeg); the .jpg path if none exists."""
        folder = self.image_dir(split, image_id)
        for extension in IMAGE_EXTENSIONS:
            path = folder / f"{image_id}{extension}"
            if path.is_file():
                return path
        return folder / f"{image_id}{IMAGE_EXTENSIONS[0]}"

    def mask_path(self, split: str, image_id: str) -> Path:
        return self.mask_dir(split, image_id) / f"{image_id}.png"

    def required_dirs(self, splits: Sequence[str]) -> list[Path]:
        if not self.is_coco:
            return [self.root / "JPEGImages", self.root / "SegmentationClassAug"]
        folders = dict.fromkeys(COCO_SPLIT_FOLDERS[s] for s in splits if s in COCO_SPLIT_FOLDERS)
        return [p for f in folders for p in (self.root / f, self.root / "SegmentationClass" / f)]


def _check_root(root: Path, dataset: str) -> None:
    if not root.is_dir():
        raise DatasetError(f"{dataset} dataset root {root} does not exist or is not a directory")


# ------------------------------------------------------------------------------------------------------------
# Split lists.
# ------------------------------------------------------------------------------------------------------------


def _parse_list(path: Path) -> list[str]:
    """Ids from a list file: one per line, first token; ``/JPEGImages/x.jpg``-style tokens reduce to ``x``."""
    ids = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        if tokens:
            ids.append(Path(tokens[0]).stem if "/" in tokens[0] else tokens[0])
    return ids


def _png_stems(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"mask folder {folder} does not exist")
    return sorted(name[:-4] for name in os.listdir(folder) if name.endswith(".png"))


def read_split_ids(root: str | Path, dataset: str, split: str) -> list[str]:
    """Image ids of ``split``, from its list file or, where the list is missing, derived from the mask folder.

    Derivation: VOC/synthetic ``train_aug`` = masks in ``SegmentationClassAug`` minus the ``val`` list; COCO
    ``<split>`` = masks in ``SegmentationClass/<split folder>``.

    Raises:
        DatasetError: the root or the list is missing and the split cannot be derived.
    """
    layout = DatasetLayout(Path(root), dataset)
    _check_root(layout.root, dataset)
    list_path = layout.list_path(split)
    if list_path.is_file():
        return _parse_list(list_path)
    if layout.is_coco and split in COCO_SPLIT_FOLDERS:
        return _png_stems(layout.mask_dir(split))
    if not layout.is_coco and split == "train_aug":
        val_path = layout.list_path("val")
        if not val_path.is_file():
            raise DatasetError(
                f"split list {list_path} not found, and train_aug cannot be derived without the val list "
                f"{val_path}"
            )
        val_ids = set(_parse_list(val_path))
        return [image_id for image_id in _png_stems(layout.mask_dir(split)) if image_id not in val_ids]
    derivable = "train, val, val_part" if layout.is_coco else "train_aug"
    raise DatasetError(f"split list {list_path} not found (only {derivable} can be derived from the masks)")


def _select_ids(split_ids: Sequence[str], ids: Sequence[str] | None, list_path: Path) -> list[str]:
    """``ids`` (validated to be a subset of ``split_ids``) or all of ``split_ids``."""
    if ids is None:
        selected = list(split_ids)
    else:
        known = set(split_ids)
        unknown = [image_id for image_id in ids if image_id not in known]
        if unknown:
            raise DatasetError(
                f"{len(unknown)} requested id(s) are not in split list {list_path}; "
                f"first unknown id: {unknown[0]!r}"
            )
        selected = list(ids)
    if not selected:
        raise DatasetError(f"no images selected from split list {list_path}")
    return selected


# ------------------------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------------------------


def load_image(path: Path) -> Image.Image:
    """Decode an image as RGB (grayscale and palette images become 3 channels).

    Raises:
        DatasetError: missing or unreadable file.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file {path} not found") from None
    except OSError as error:
        raise DatasetError(f"image file {path} is unreadable: {error}") from None


def read_mask(path: Path) -> np.ndarray:
    """Read a label PNG (palette or L mode) as an (H, W) uint8 array of label values.

    Raises:
        DatasetError: missing or unreadable file, or a colour (RGB) mask.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DatasetError(
                    f"mask {path} has mode {image.mode!r}; expected a palette (P) or L-mode PNG"
                )
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"mask file {path} not found") from None
    except DatasetError:
        raise
    except OSError as error:
        raise DatasetError(f"mask file {path} is unreadable: {error}") from None


def _invalid_values(mask: np.ndarray, num_classes: int) -> list[int]:
    counts = np.bincount(mask.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    return [int(v) for v in present if v > num_classes and v != IGNORE_INDEX]


def _mask_labels(mask: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """(H, W) label values -> (C,) float32 multi-hot of the foreground values present."""
    invalid = _invalid_values(mask, num_classes)
    if invalid:
        raise DatasetError(
            f"mask {path} has label values {invalid} outside 0..{num_classes} and {IGNORE_INDEX}"
        )
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1 : num_classes + 1])
    labels = np.zeros(num_classes, dtype=np.float32)
    labels[present] = 1.0
    return labels


# ------------------------------------------------------------------------------------------------------------
# Image-level labels with an on-disk cache.
# ------------------------------------------------------------------------------------------------------------


def _cache_dirs(root: Path) -> Iterator[Path]:
    yield root / ".cpews_cache"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    yield base / "cpews" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]


def _labels_cache_key(
    layout: DatasetLayout, split: str, ids: Sequence[str], mask_paths: Sequence[Path]
) -> str:
    digest = hashlib.sha1()
    digest.update(json.dumps([_LABEL_CACHE_VERSION, layout.dataset, split]).encode())
    for image_id, path in zip(ids, mask_paths):
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DatasetError(f"mask file {path} not found (id {image_id!r} of split {split!r})") from None
        digest.update(f"{image_id}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
    return digest.hexdigest()[:20]


def _load_cached_labels(path: Path, ids: Sequence[str]) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if list(data["names"]) != list(ids):
                return None
            return np.asarray(data["labels"], dtype=np.float32)
    except (OSError, KeyError, ValueError):
        return None


def _save_cached_labels(folder: Path, filename: str, ids: Sequence[str], labels: np.ndarray) -> bool:
    """Write atomically (temp file + os.replace); False if the folder is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=folder, prefix=f".{filename}.", suffix=".tmp", delete=False
        ) as file:
            np.savez(file, names=np.asarray(ids, dtype=str), labels=labels)
            temporary = file.name
        os.replace(temporary, folder / filename)
        return True
    except OSError:
        return False


def image_labels(
    root: str | Path,
    dataset: str,
    split: str,
    ids: Sequence[str],
    *,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """Multi-hot image labels ``{id: (C,) float32}`` from the unique values of each mask (0 and 255 excluded).

    The result is cached in ``root/.cpews_cache/`` (or ``~/.cache/cpews/<hash of root>/`` when ``root`` is not
    writable), keyed by dataset, split, ids and each mask's mtime and size.

    Raises:
        DatasetError: a mask is missing, unreadable, or has values outside 0..C and 255.
    """
    layout = DatasetLayout(Path(root), dataset)
    num_classes = class_table(dataset).num_classes
    ids = list(ids)
    mask_paths = [layout.mask_path(split, image_id) for image_id in ids]
    filename = ""
    if use_cache:
        filename = f"labels-{dataset}-{split}-{_labels_cache_key(layout, split, ids, mask_paths)}.npz"
        for folder in _cache_dirs(layout.root):
            cached = _load_cached_labels(folder / filename, ids)
            if cached is not None and cached.shape == (len(ids), num_classes):
                return dict(zip(ids, cached))
    labels = np.zeros((len(ids), num_classes), dtype=np.float32)
    for row, path in enumerate(mask_paths):
        labels[row] = _mask_labels(read_mask(path), num_classes, path)
    if use_cache:
        for folder in _cache_dirs(layout.root):
            if _save_cached_labels(folder, filename, ids, labels):
                break
    return dict(zip(ids, labels))


# ------------------------------------------------------------------------------------------------------------
# Datasets.
# ------------------------------------------------------------------------------------------------------------


class _SplitDataset(Dataset):
    """Shared set-up: layout, class table, selected ids and their labels."""

    def __init__(self, root: str | Path, dataset: str, split: str, ids: Sequence[str] | None) -> None:
        self.layout = DatasetLayout(Path(root), dataset)
        self.dataset = dataset
        self.split = split
        self.class_table: ClassTable = class_table(dataset)
        split_ids = read_split_ids(root, dataset, split)
        self.ids: list[str] = _select_ids(split_ids, ids, self.layout.list_path(split))
        all_labels = image_labels(root, dataset, split, split_ids)
        self._labels = {image_id: all_labels[image_id] for image_id in self.ids}

    def __len__(self) -> int:
        return len(self.ids)

    def labels_of(self, image_id: str) -> Tensor:
        """(C,) float32 multi-hot labels of ``image_id``."""
        return torch.from_numpy(self._labels[image_id].copy())

    def _image(self, image_id: str) -> Image.Image:
        return load_image(self.layout.image_path(self.split, image_id))


class TrainDataset(_SplitDataset):
    """Augmented training crops with image-level labels and the valid box (method.md §8.5).

    Each item draws a fresh seed from torch's global RNG and combines it with ``seed`` into a
    ``numpy.random.Generator``, so ``torch.manual_seed`` (and DataLoader worker seeding) makes epochs
    reproducible.

    Item:
        image: (3, crop, crop) float32 normalized.
        labels: (C,) float32 multi-hot.
        box: (4,) int64 ``(r0, r1, c0, c1)`` real-image rectangle in the crop.
        name: image id.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str,
        *,
        crop_size: int,
        scale_range: tuple[float, float],
        hflip_prob: float,
        photometric: bool,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ids: Sequence[str] | None = None,
        seed: int = 0,
        photometric_params: PhotometricParams | None = None,
    ) -> None:
        super().__init__(root, dataset, split, ids)
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.hflip_prob = hflip_prob
        self.photometric = photometric
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.seed = seed
        self.photometric_params = photometric_params or PhotometricParams()

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Tensor | str]:
        """`index`, or `(index, draw)` with the augmentation seed given (a resumable sampler's items)."""
        if isinstance(index, tuple):
            index, item_seed = index
        else:
            item_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        image_id = self.ids[index]
        rng = np.random.default_rng([self.seed, item_seed])
        sample = train_transform(
            self._image(image_id),
            rng=rng,
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            hflip_prob=self.hflip_prob,
            photometric=self.photometric,
            mean=self.mean,
            std=self.std,
            photometric_params=self.photometric_params,
        )
        return {
            "image": sample.image,
            "labels": self.labels_of(image_id),
            "box": sample.box,
            "name": image_id,
        }


class EvalDataset(_SplitDataset):
    """Un-augmented images with ground-truth masks at the original size.

    Item:
        image: (3, H, W) float32 normalized (or (3, resize, resize)).
        rgb: (H, W, 3) uint8, same size as ``image``.
        mask: (H0, W0) int64 ground truth at the original size, values 0..C and 255.
        labels: (C,) float32 multi-hot.
        name: image id.
        confounder_mask: (H0, W0) uint8, only when the dataset has ``ConfounderMask/``.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ids: Sequence[str] | None = None,
        resize: int | None = None,
    ) -> None:
        super().__init__(root, dataset, split, ids)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.resize = resize
        self.confounder_dir = self.layout.confounder_dir()

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        image_id = self.ids[index]
        image = self._image(image_id)
        mask_path = self.layout.mask_path(self.split, image_id)
        mask = read_mask(mask_path)
        _check_same_size(image, mask, self.layout.image_path(self.split, image_id), mask_path)
        shown = image if self.resize is None else image.resize((self.resize, self.resize), Image.BILINEAR)
        item: dict[str, Tensor | str] = {
            "image": eval_transform(shown, mean=self.mean, std=self.std),
            "rgb": to_rgb_uint8(shown),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": self.labels_of(image_id),
            "name": image_id,
        }
        if self.confounder_dir is not None:
            confounder_path = self.confounder_dir / f"{image_id}.png"
            confounder = read_mask(confounder_path)
            _check_same_size(image, confounder, self.layout.image_path(self.split, image_id), confounder_path)
            item["confounder_mask"] = torch.from_numpy(confounder)
        return item


def _check_same_size(image: Image.Image, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    height, width = mask.shape
    if image.size != (width, height):
        raise DatasetError(
            f"mask {mask_path} is {height}x{width} (HxW) but image {image_path} is "
            f"{image.size[1]}x{image.size[0]}"
        )


# ------------------------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------------------------


class _Problems:
    """Collects problem strings, keeping at most ``limit`` but counting all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.shown: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.shown) < self.limit:
            self.shown.append(message)

    def raise_if_any(self, root: Path, dataset: str) -> None:
        if not self.count:
            return
        lines = "\n".join(f"  - {message}" for message in self.shown)
        more = f"\n  ... and {self.count - len(self.shown)} more" if self.count > len(self.shown) else ""
        raise DatasetError(f"{dataset} dataset at {root}: {self.count} problem(s) found:\n{lines}{more}")


def _sample_indices(count: int, check_images: bool | int) -> list[int]:
    """Indices of images to open: all (True), none (False), or ``k`` evenly spaced incl. first and last."""
    if isinstance(check_images, bool):
        return list(range(count)) if check_images else []
    if check_images <= 0 or count == 0:
        return []
    if check_images >= count:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, check_images).round()})


class _ListingCache:
    """``os.listdir`` of each folder, read once, to test file existence quickly."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}

    def exists(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._names:
            self._names[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        return path.name in self._names[folder]

    def image(self, layout: DatasetLayout, split: str, image_id: str) -> Path | None:
        folder = layout.image_dir(split, image_id)
        for extension in IMAGE_EXTENSIONS:
            if self.exists(folder / f"{image_id}{extension}"):
                return folder / f"{image_id}{extension}"
        return None


def _check_files(
    layout: DatasetLayout, split: str, image_id: str, problems: _Problems, num_classes: int
) -> None:
    """Open the image, mask (and confounder mask) of one id; record unreadable files, sizes, values."""
    image_path = layout.image_path(split, image_id)
    mask_path = layout.mask_path(split, image_id)
    try:
        image = load_image(image_path)
        mask = read_mask(mask_path)
        _check_same_size(image, mask, image_path, mask_path)
        invalid = _invalid_values(mask, num_classes)
        if invalid:
            problems.add(
                f"mask {mask_path} has label values {invalid} outside 0..{num_classes} and {IGNORE_INDEX}"
            )
        confounder_dir = layout.confounder_dir()
        if confounder_dir is not None:
            confounder_path = confounder_dir / f"{image_id}.png"
            _check_same_size(image, read_mask(confounder_path), image_path, confounder_path)
    except DatasetError as error:
        problems.add(str(error))


def _validate_split(
    layout: DatasetLayout,
    split: str,
    check_images: bool | int,
    problems: _Problems,
    listing: _ListingCache,
) -> None:
    try:
        ids = read_split_ids(layout.root, layout.dataset, split)
    except DatasetError as error:
        problems.add(str(error))
        return
    list_path = layout.list_path(split)
    if not ids:
        problems.add(f"split {split!r} is empty ({list_path})")
        return
    complete = []
    for image_id in ids:
        try:
            image_path = listing.image(layout, split, image_id)
            mask_path = layout.mask_path(split, image_id)
        except DatasetError as error:
            problems.add(str(error))
            continue
        if image_path is None:
            expected = layout.image_dir(split, image_id) / f"{image_id}{{{','.join(IMAGE_EXTENSIONS)}}}"
            problems.add(f"image {expected} of id {image_id!r} in split {split!r} ({list_path}) not found")
        if not listing.exists(mask_path):
            problems.add(f"mask {mask_path} of id {image_id!r} in split {split!r} ({list_path}) not found")
        if image_path is not None and listing.exists(mask_path):
            complete.append(image_id)
    num_classes = class_table(layout.dataset).num_classes
    for index in _sample_indices(len(complete), check_images):
        _check_files(layout, split, complete[index], problems, num_classes)


def validate_dataset(
    root: str | Path,
    dataset: str,
    splits: Sequence[str],
    *,
    check_images: bool | int = True,
    max_problems: int = 10,
) -> None:
    """Check that ``splits`` of the dataset at ``root`` are complete and readable.

    Checks: root and folders exist; each split list exists or can be derived and is non-empty; every listed id
    has an image and a mask; for the opened images: the image decodes, mask and image sizes agree, and mask
    values lie in 0..C or 255.

    Args:
        root: dataset root.
        dataset: "voc", "coco" or "synthetic".
        splits: split names to check.
        check_images: True = open every image; False = only check existence; an int k = open at most k images
            per split, evenly spaced (first and last included).
        max_problems: how many problems the error message lists (all are counted).

    Raises:
        DatasetError: listing the problems found, each naming the file and what is wrong.
    """
    layout = DatasetLayout(Path(root), dataset)
    _check_root(layout.root, dataset)
    problems = _Problems(max_problems)
    for folder in layout.required_dirs(splits):
        if not folder.is_dir():
            problems.add(f"folder {folder} does not exist")
    problems.raise_if_any(layout.root, dataset)
    listing = _ListingCache()
    for split in splits:
        _validate_split(layout, split, check_images, problems, listing)
    problems.raise_if_any(layout.root, dataset)

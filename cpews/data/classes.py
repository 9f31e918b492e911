"""Class names and superclass tables for VOC 2012, MS COCO 2014 and the synthetic dataset.

Label space (method.md §0): 0 = background, 1..C = foreground, 255 = ignore. Classifier channel ``c`` in
0..C-1 corresponds to label value ``c + 1``; every superclass table below is indexed by classifier channel.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "COCO_CLASSES",
    "COCO_SUPERCLASSES",
    "DATASET_NAMES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SUPERCLASSES",
    "VOC_CLASSES",
    "VOC_SUPERCLASSES",
    "ClassTable",
    "class_table",
]

# method.md §10.1.
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# method.md §6.4, one entry per classifier channel 0..19.
VOC_SUPERCLASSES: tuple[str, ...] = (
    "VEHICLE", "VEHICLE", "ANIMAL", "VEHICLE", "INDOOR",  # aeroplane bicycle bird boat bottle
    "VEHICLE", "VEHICLE", "ANIMAL", "INDOOR", "ANIMAL",  # bus car cat chair cow
    "INDOOR", "ANIMAL", "ANIMAL", "VEHICLE", "PERSON",  # diningtable dog horse motorbike person
    "INDOOR", "ANIMAL", "INDOOR", "VEHICLE", "INDOOR",  # pottedplant sheep sofa train tvmonitor
)  # fmt: skip

# method.md §10.2.
COCO_CLASSES: tuple[str, ...] = (
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# method.md §6.4: the 12 official COCO supercategories as (name, number of consecutive classifier channels).
_COCO_SUPERCATEGORY_RUNS: tuple[tuple[str, int], ...] = (
    ("person", 1),
    ("vehicle", 8),
    ("outdoor", 5),
    ("animal", 10),
    ("accessory", 5),
    ("sports", 10),
    ("kitchen", 7),
    ("food", 10),
    ("furniture", 6),
    ("electronic", 6),
    ("appliance", 5),
    ("indoor", 7),
)
COCO_SUPERCLASSES: tuple[str, ...] = tuple(
    name for name, size in _COCO_SUPERCATEGORY_RUNS for _ in range(size)
)

# Synthetic dataset (cpews.data.synthetic). "boat" (label value 3) is the confounded class: it usually sits on
# the "water" background texture. Superclasses: two groups with >= 2 members and one singleton.
SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "ball", "kite", "boat", "car", "bus", "house")
SYNTHETIC_SUPERCLASSES: tuple[str, ...] = ("TOY", "TOY", "VEHICLE", "VEHICLE", "VEHICLE", "BUILDING")


@dataclass(frozen=True)
class ClassTable:
    """Class names and the superclass of each foreground class of one dataset.

    Attributes:
        names: C + 1 names; index = label value, ``names[0]`` is the background.
        superclasses: C superclass names; index = classifier channel (label value - 1).
    """

    names: tuple[str, ...]
    superclasses: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names or self.names[0] != "background":
            raise ValueError(f"ClassTable.names must start with 'background', got {self.names[:1]}")
        if len(self.superclasses) != len(self.names) - 1:
            raise ValueError(
                f"ClassTable needs one superclass per foreground class: {len(self.names) - 1} classes, "
                f"{len(self.superclasses)} superclasses"
            )

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C (background excluded)."""
        return len(self.names) - 1

    @property
    def foreground_names(self) -> tuple[str, ...]:
        """The C foreground names, indexed by classifier channel."""
        return self.names[1:]


_TABLES: dict[str, ClassTable] = {
    "voc": ClassTable(VOC_CLASSES, VOC_SUPERCLASSES),
    "coco": ClassTable(COCO_CLASSES, COCO_SUPERCLASSES),
    "synthetic": ClassTable(SYNTHETIC_CLASSES, SYNTHETIC_SUPERCLASSES),
}
DATASET_NAMES: tuple[str, ...] = tuple(_TABLES)


def class_table(dataset: str) -> ClassTable:
    """Return the class table of ``dataset`` ("voc", "coco" or "synthetic").

    Raises:
        ValueError: unknown dataset name; the message lists the valid ones.
    """
    try:
        return _TABLES[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_NAMES)}") from None

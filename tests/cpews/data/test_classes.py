from __future__ import annotations

from collections import Counter

import pytest

from cpews.data.classes import (
    COCO_CLASSES,
    COCO_SUPERCLASSES,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    VOC_SUPERCLASSES,
    ClassTable,
    class_table,
)


def test_voc_table_matches_spec() -> None:
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[20] == "tvmonitor"
    # method.md §6.4 sizes: PERSON 1, ANIMAL 6, VEHICLE 7, INDOOR 6.
    assert Counter(VOC_SUPERCLASSES) == {"PERSON": 1, "ANIMAL": 6, "VEHICLE": 7, "INDOOR": 6}
    assert VOC_SUPERCLASSES[VOC_CLASSES.index("boat") - 1] == "VEHICLE"
    assert VOC_SUPERCLASSES[VOC_CLASSES.index("person") - 1] == "PERSON"


def test_coco_table_matches_spec() -> None:
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[1] == "person" and COCO_CLASSES[80] == "toothbrush"
    assert len(COCO_SUPERCLASSES) == 80 and len(set(COCO_SUPERCLASSES)) == 12
    # Spot checks against the §6.4 table (classifier index = label value - 1).
    assert COCO_SUPERCLASSES[8] == "vehicle"  # boat
    assert COCO_SUPERCLASSES[9] == "outdoor"  # traffic light
    assert COCO_SUPERCLASSES[COCO_CLASSES.index("toothbrush") - 1] == "indoor"
    assert COCO_SUPERCLASSES[COCO_CLASSES.index("dining table") - 1] == "furniture"
    assert Counter(COCO_SUPERCLASSES)["animal"] == 10


def test_synthetic_table_has_groups_and_singleton() -> None:
    table = class_table("synthetic")
    assert table.names == SYNTHETIC_CLASSES and table.names.index("boat") == 3
    sizes = sorted(Counter(table.superclasses).values())
    assert sizes[0] == 1 and sum(size >= 2 for size in sizes) >= 2


@pytest.mark.parametrize("dataset, num_classes", [("voc", 20), ("coco", 80), ("synthetic", 6)])
def test_num_classes(dataset: str, num_classes: int) -> None:
    assert class_table(dataset).num_classes == num_classes


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="'cityscapes'.*voc, coco, synthetic"):
        class_table("cityscapes")


def test_class_table_checks_lengths() -> None:
    with pytest.raises(ValueError, match="one superclass per foreground class"):
        ClassTable(("background", "a", "b"), ("X",))

"""K-fold splits of a training split, stratified for multi-label images, and their JSON files.

Pure numpy: no Ray, Optuna, MLflow (nor torch, except inside `split_folds`, which reads a dataset's labels).
The folds are computed once per sweep, deterministically from a seed, saved beside the experiment and logged.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FOLDS_FORMAT",
    "FoldSplit",
    "SavedFolds",
    "fold_balance",
    "fold_splits",
    "fold_std",
    "load_folds",
    "make_folds",
    "save_folds",
    "split_folds",
]

FOLDS_FORMAT = "cpews-folds/1"


class FoldSplit(NamedTuple):
    train_ids: list[str]
    val_ids: list[str]


class SavedFolds(NamedTuple):
    folds: list[list[str]]
    meta: dict[str, Any]


def make_folds(image_ids: Sequence[str], labels: np.ndarray, k: int, seed: int) -> list[list[str]]:
    """Cut images into `k` disjoint folds, each with about the same share of every class.

    Iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the Stratification of Multi-Label Data",
    ECML PKDD 2011, Algorithm 1; as in scikit-multilearn's `IterativeStratification`): repeatedly take the label
    with the fewest remaining examples (ties broken at random), and give each of its remaining examples to the
    fold that most desires that label, then the fold that most desires examples overall, then a random one.
    One addition keeps fold sizes within +-1: a fold that already holds its share (`N // k`, or `N // k + 1`
    for the first `N % k` folds to reach it) takes no more examples. Images with no label come last and go
    to the folds with the most room.

    Args:
        image_ids: N distinct ids.
        labels: (N, C) multi-hot (bool, or numbers where > 0.5 means present).
        k: number of folds, 2 <= k <= N.
        seed: seeds every random choice: the same inputs and seed give the same folds.

    Returns:
        k lists of ids; each list keeps the order of `image_ids`.

    Raises:
        ValueError: duplicate ids, a label matrix of the wrong shape, or k outside 2..N.
    """
    ids = [str(image_id) for image_id in image_ids]
    n = len(ids)
    y = np.asarray(labels)
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"labels must have shape (N, C) with N = {n} ids, got {y.shape}")
    if len(set(ids)) != n:
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"image ids must be distinct; {duplicate!r} appears more than once")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k={k!r}: need at least 2 folds")
    if k > n:
        raise ValueError(f"k={k} folds need at least {k} images, got {n}: every fold must hold one image")
    present = y > 0.5 if y.dtype != bool else y
    rng = np.random.default_rng(seed)
    num_classes = present.shape[1]

    base_size, extra = divmod(n, k)
    sizes = np.zeros(k, dtype=np.int64)
    wanted = np.full(k, n / k)  # c_j: examples fold j still desires
    label_totals = present.sum(axis=0)
    wanted_by_label = np.tile(label_totals / k, (k, 1))  # c_j^l
    remaining = label_totals.astype(np.int64)
    assignment = np.full(n, -1, dtype=np.int64)
    order = rng.permutation(n)  # examples of a label are visited in this order
    examples_of = [order[present[order, c]] for c in range(num_classes)]

    def open_folds() -> np.ndarray:
        big = int((sizes > base_size).sum())
        room = (sizes < base_size) | ((sizes == base_size) & (big < extra))
        return np.flatnonzero(room)

    def pick(candidates: np.ndarray, *scores: np.ndarray) -> int:
        for score in scores:
            if len(candidates) == 1:
                break
            values = score[candidates]
            candidates = candidates[values == values.max()]
        return int(candidates[0] if len(candidates) == 1 else rng.choice(candidates))

    def assign(index: int, fold: int) -> None:
        assignment[index] = fold
        sizes[fold] += 1
        wanted[fold] -= 1
        has = present[index]
        wanted_by_label[fold, has] -= 1
        remaining[has] -= 1

    while remaining.any():
        live = np.flatnonzero(remaining > 0)
        fewest = live[remaining[live] == remaining[live].min()]
        label = int(fewest[0] if len(fewest) == 1 else rng.choice(fewest))
        for index in examples_of[label]:
            if assignment[index] < 0:
                assign(int(index), pick(open_folds(), wanted_by_label[:, label], wanted))
    for index in order:
        if assignment[index] < 0:  # no label
            assign(int(index), pick(open_folds(), wanted))
    return [[ids[i] for i in np.flatnonzero(assignment == fold)] for fold in range(k)]


def fold_splits(folds: Sequence[Sequence[str]], i: int) -> FoldSplit:
    """Fold `i` as validation, the other folds (in fold order) as training."""
    if not 0 <= i < len(folds):
        raise IndexError(f"fold {i} of {len(folds)} folds")
    train = [image_id for j, fold in enumerate(folds) if j != i for image_id in fold]
    return FoldSplit(train, list(folds[i]))


def fold_balance(folds: Sequence[Sequence[str]], labels_by_id: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per-fold class frequencies and how far they stray from the whole set's (JSON-ready).

    Returns:
        k, sizes, overall_frequency (C,) = share of images with each class, fold_frequency (k, C),
        fold_label_counts (k, C), per_class_max_deviation (C,) = max over folds of |fold - overall| and
        max_deviation = its maximum.
    """
    all_ids = [image_id for fold in folds for image_id in fold]
    if not all_ids:
        raise ValueError("no images in the folds")
    matrix = np.stack([np.asarray(labels_by_id[i]) > 0.5 for i in all_ids])
    overall = matrix.mean(axis=0)
    counts, frequencies = [], []
    start = 0
    for fold in folds:
        block = matrix[start : start + len(fold)]
        start += len(fold)
        counts.append(block.sum(axis=0))
        frequencies.append(block.mean(axis=0) if len(fold) else np.zeros_like(overall))
    frequency = np.array(frequencies)
    deviation = np.abs(frequency - overall[None]).max(axis=0)
    return {
        "k": len(folds),
        "sizes": [len(fold) for fold in folds],
        "overall_frequency": overall.tolist(),
        "fold_frequency": frequency.tolist(),
        "fold_label_counts": np.array(counts, dtype=np.int64).tolist(),
        "per_class_max_deviation": deviation.tolist(),
        "max_deviation": float(deviation.max()) if deviation.size else 0.0,
    }


def save_folds(
    path: str | Path, folds: Sequence[Sequence[str]], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write folds and `meta` (JSON-serialisable: dataset, split, k, seed, ...) atomically (temp + os.replace)."""
    path = Path(path)
    payload = {
        "format": FOLDS_FORMAT,
        "k": len(folds),
        "sizes": [len(fold) for fold in folds],
        "meta": dict(meta or {}),
        "folds": [list(map(str, fold)) for fold in folds],
    }
    try:
        text = json.dumps(payload, indent=1)
    except TypeError as exc:
        raise ValueError(f"fold meta for {path} is not JSON-serialisable: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as file:
        temporary = file.name
        try:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        except BaseException:
            file.close()
            os.unlink(temporary)
            raise
    os.replace(temporary, path)
    return path


def load_folds(path: str | Path) -> SavedFolds:
    """Read a file written by `save_folds`.

    Raises:
        ValueError: not a folds file, or folds that overlap.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a folds file (invalid JSON: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FOLDS_FORMAT:
        raise ValueError(f"{path}: not a folds file (expected format {FOLDS_FORMAT!r})")
    folds = payload.get("folds")
    if not isinstance(folds, list) or not all(
        isinstance(f, list) and all(isinstance(i, str) for i in f) for f in folds
    ):
        raise ValueError(f"{path}: 'folds' must be a list of lists of ids")
    ids = [image_id for fold in folds for image_id in fold]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: folds overlap")
    return SavedFolds(folds, dict(payload.get("meta") or {}))


def split_folds(root: str | Path, dataset: str, split: str, k: int, seed: int) -> SavedFolds:
    """Folds of a dataset split from its masks' image labels, with meta (dataset, split, k, seed, balance).

    Reads the split list and image labels through `cpews.data` (imported here: it brings in torch).
    """
    from cpews.data.datasets import image_labels, read_split_ids

    ids = read_split_ids(root, dataset, split)
    labels_by_id = image_labels(root, dataset, split, ids)
    folds = make_folds(ids, np.stack([labels_by_id[i] for i in ids]), k, seed)
    meta = {
        "dataset": dataset,
        "split": split,
        "k": k,
        "seed": seed,
        "num_images": len(ids),
        "balance": fold_balance(folds, labels_by_id),
    }
    return SavedFolds(folds, meta)


def fold_std(scores: Sequence[float]) -> float:
    """The spread of a trial's fold scores: their sample standard deviation (ddof 1), the one convention of the
    leaderboard, the trial's `cv/miou_seg_std` and promotion; NaN with fewer than two finite scores."""
    finite = [float(s) for s in scores if s is not None and math.isfinite(float(s))]
    return statistics.stdev(finite) if len(finite) > 1 else math.nan

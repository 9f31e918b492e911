"""K-fold splits: determinism, disjoint coverage, size and class balance, errors, the JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestration.kfold import (
    FOLDS_FORMAT,
    fold_balance,
    fold_splits,
    load_folds,
    make_folds,
    save_folds,
    split_folds,
)


def skewed_set(n: int = 200, seed: int = 1) -> tuple[list[str], np.ndarray]:
    """n images, 6 classes: class 0 rare (exactly 10 images), the others common; 10 images have no label."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 6), dtype=np.float32)
    labels[rng.choice(n - 10, 10, replace=False), 0] = 1
    for c, p in zip(range(1, 6), (0.5, 0.3, 0.2, 0.15, 0.6)):
        labels[: n - 10, c] = rng.random(n - 10) < p
    labels[n - 10 :] = 0  # unlabelled
    ids = [f"img_{i:04d}" for i in range(n)]
    return ids, labels


def random_folds(ids: list[str], k: int, seed: int) -> list[list[str]]:
    order = np.random.default_rng(seed).permutation(len(ids))
    return [[ids[i] for i in sorted(order[j::k])] for j in range(k)]


def test_same_seed_same_folds_other_seed_other_folds():
    ids, labels = skewed_set()
    first = make_folds(ids, labels, 5, seed=0)
    assert make_folds(ids, labels, 5, seed=0) == first
    assert make_folds(list(ids), labels.astype(bool), 5, seed=0) == first  # bool or float labels
    assert make_folds(ids, labels, 5, seed=1) != first


@pytest.mark.parametrize("n,k", [(200, 5), (201, 5), (203, 4), (7, 7), (10, 3), (2, 2)])
def test_folds_are_disjoint_cover_everything_and_sizes_differ_by_at_most_one(n, k):
    ids, labels = skewed_set(max(n, 20))
    ids, labels = ids[:n], labels[:n]
    folds = make_folds(ids, labels, k, seed=3)
    assert len(folds) == k
    flat = [i for fold in folds for i in fold]
    assert sorted(flat) == sorted(ids) and len(set(flat)) == len(ids)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for fold in folds:  # each fold keeps the input order
        assert fold == sorted(fold, key=ids.index)


def test_rare_class_is_spread_evenly_and_balance_beats_random_splits():
    ids, labels = skewed_set()
    labels_by_id = dict(zip(ids, labels))
    folds = make_folds(ids, labels, 5, seed=0)
    balance = fold_balance(folds, labels_by_id)
    assert balance["sizes"] == [40] * 5
    assert [counts[0] for counts in balance["fold_label_counts"]] == [2, 2, 2, 2, 2]  # 10 rare images, k = 5
    random = [fold_balance(random_folds(ids, 5, s), labels_by_id)["max_deviation"] for s in range(20)]
    assert balance["max_deviation"] < 0.5 * min(random), (balance["max_deviation"], min(random))
    assert balance["max_deviation"] <= 0.03


def test_unlabelled_images_fill_the_folds_evenly():
    ids = [f"x{i}" for i in range(23)]
    labels = np.zeros((23, 3))
    labels[:3, 0] = 1  # three labelled images, twenty without a label
    folds = make_folds(ids, labels, 4, seed=0)
    assert sorted(len(f) for f in folds) == [5, 6, 6, 6]
    assert (
        sum(1 for f in folds if {"x0", "x1", "x2"} & set(f)) == 3
    )  # the labelled ones go to different folds


def test_fold_balance_reports_frequencies():
    labels = {"a": np.array([1, 0]), "b": np.array([1, 1]), "c": np.array([0, 1]), "d": np.array([0, 0])}
    balance = fold_balance([["a", "b"], ["c", "d"]], labels)
    # overall: class 0 in a, b (2/4); class 1 in b, c (2/4); fold 0: 2/2 and 1/2; fold 1: 0/2 and 1/2
    assert balance["overall_frequency"] == [0.5, 0.5]
    assert balance["fold_frequency"] == [[1.0, 0.5], [0.0, 0.5]]
    assert balance["fold_label_counts"] == [[2, 1], [0, 1]]
    assert balance["per_class_max_deviation"] == [0.5, 0.0] and balance["max_deviation"] == 0.5
    assert json.loads(json.dumps(balance)) == balance
    assert fold_splits([["a", "b"], ["c"], ["d"]], 1) == (["a", "b", "d"], ["c"])
    assert fold_splits([["a", "b"], ["c"], ["d"]], 0).val_ids == ["a", "b"]
    with pytest.raises(IndexError):
        fold_splits([["a"], ["b"]], 2)


def test_bad_inputs_are_clear_errors():
    ids, labels = skewed_set(20)
    with pytest.raises(ValueError, match=r"k=21 folds need at least 21 images, got 20"):
        make_folds(ids, labels, 21, seed=0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        make_folds(ids, labels, 1, seed=0)
    with pytest.raises(ValueError, match=r"shape \(N, C\) with N = 20"):
        make_folds(ids, labels[:19], 2, seed=0)
    with pytest.raises(ValueError, match="'img_0000' appears more than once"):
        make_folds(["img_0000", *ids[1:-1], "img_0000"], labels, 2, seed=0)


def test_save_and_load_round_trip_atomically(tmp_path):
    ids, labels = skewed_set()
    folds = make_folds(ids, labels, 3, seed=0)
    meta = {"dataset": "synthetic", "split": "train_aug", "k": 3, "seed": 0}
    path = save_folds(tmp_path / "sweep" / "folds.json", folds, meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["folds.json"]  # no temp file left
    loaded = load_folds(path)
    assert loaded.folds == folds and loaded.meta == meta
    assert json.loads(path.read_text())["format"] == FOLDS_FORMAT
    save_folds(path, folds[::-1], meta)  # replaces the file
    assert load_folds(path).folds == folds[::-1]
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_folds(path, folds, {"bad": object()})
    assert load_folds(path).folds == folds[::-1]  # the failed write left the file alone
    (tmp_path / "other.json").write_text('{"folds": []}')
    with pytest.raises(ValueError, match="not a folds file"):
        load_folds(tmp_path / "other.json")
    (tmp_path / "overlap.json").write_text(json.dumps({"format": FOLDS_FORMAT, "folds": [["a"], ["a"]]}))
    with pytest.raises(ValueError, match="overlap"):
        load_folds(tmp_path / "overlap.json")


def test_split_folds_of_the_synthetic_dataset(synthetic_data_dir):
    saved = split_folds(synthetic_data_dir, "synthetic", "train_aug", k=4, seed=0)
    assert saved.meta["num_images"] == sum(len(f) for f in saved.folds) == 32
    assert saved.meta["balance"]["sizes"] == [8, 8, 8, 8] and saved.meta["k"] == 4
    assert saved == split_folds(synthetic_data_dir, "synthetic", "train_aug", k=4, seed=0)

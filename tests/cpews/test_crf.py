from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from cpews.crf import (
    MIN_POOL_WORK,
    crf_executor,
    crf_pool_size,
    dense_crf,
    dense_crf_labels,
    start_dense_crf_labels,
)

pytest.importorskip("pydensecrf.densecrf")


def _two_colour_image(size: int = 32) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:, : size // 2] = (200, 30, 30)
    image[:, size // 2 :] = (30, 30, 200)
    return image


def test_shape_and_normalised():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), size=(12, 16)).transpose(2, 0, 1)
    out = dense_crf(image, probs)
    assert out.shape == (3, 12, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)


def test_confident_unary_stays():
    image = _two_colour_image(16)
    labels = np.zeros((16, 16), dtype=int)
    labels[:, 8:] = 1
    probs = np.where(np.arange(2)[:, None, None] == labels[None], 0.99, 0.01)
    out = dense_crf(image, probs)
    np.testing.assert_array_equal(out.argmax(0), labels)


def test_noisy_unary_gets_cleaner_on_two_colour_image():
    rng = np.random.default_rng(1)
    size = 32
    image = _two_colour_image(size)
    truth = np.zeros((size, size), dtype=int)
    truth[:, size // 2 :] = 1
    noisy = np.where(rng.random((size, size)) < 0.25, 1 - truth, truth)  # 25 % label flips
    probs = np.where(np.arange(2)[:, None, None] == noisy[None], 0.7, 0.3)
    refined = dense_crf(image, probs).argmax(0)
    errors_before = int((noisy != truth).sum())
    errors_after = int((refined != truth).sum())
    assert errors_after < errors_before // 4


def test_image_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dense_crf(np.zeros((4, 5, 3), dtype=np.uint8), np.full((2, 4, 4), 0.5))


# ------------------------------------------------------------------------------------------------------------
# Many images: in a process pool or in this process.
# ------------------------------------------------------------------------------------------------------------


def _random_pairs(sizes, labels=3, seed=2):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    probs = [rng.dirichlet(np.ones(labels), size=(h, w)).transpose(2, 0, 1).astype(np.float32) for h, w in sizes]
    return images, probs


def test_pool_gives_the_same_labels_in_the_same_order_as_in_process():
    sizes = [(12, 16), (20, 9), (12, 16), (7, 7), (16, 12)]
    images, probs = _random_pairs(sizes)
    params = {"iters": 5, "bilateral_sxy": 30.0}
    in_process = dense_crf_labels(images, probs, **params)
    assert [labels.shape for labels in in_process] == sizes
    for image, p, labels in zip(images, probs, in_process):
        np.testing.assert_array_equal(labels, dense_crf(image, p, **params).argmax(0))
    with crf_executor(2) as pool:
        assert pool is not None
        pooled = dense_crf_labels(images, probs, executor=pool, **params)
        finish = start_dense_crf_labels(images[::-1], probs[::-1], executor=pool, **params)
        reversed_order = finish()
    for a, b, c in zip(in_process, pooled, reversed_order[::-1]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert multiprocessing.active_children() == []  # the workers are joined when the block ends


def test_an_error_in_a_worker_reaches_the_caller_and_the_pool_is_shut_down():
    images, probs = _random_pairs([(6, 6), (6, 6)])
    images[1] = images[1][:4]  # does not match its probabilities
    with pytest.raises(ValueError, match="does not match probs"):
        with crf_executor(2) as pool:
            dense_crf_labels(images, probs, executor=pool)
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="2 images but 1 probability maps"):
        dense_crf_labels(images, probs[:1])


def test_one_worker_means_this_process():
    with crf_executor(1) as pool:
        assert pool is None


@pytest.mark.parametrize(("args", "workers"), [
    ((100, 64 * 64, 7, None), 1),  # 2.9 M pixel-labels: less than MIN_POOL_WORK, in this process
    ((5, 10, 2, 8), 5),  # a chosen number: at most one process per image, whatever the work
    ((100, 10, 2, 4), 4),
    ((100, 10, 2, 0), 1),
    ((0, 10, 2, 4), 1),
])
def test_pool_size(args, workers):
    assert crf_pool_size(*args) == workers


def test_pool_size_for_enough_work_is_one_per_cpu_up_to_one_per_image():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    voc_val = (1449, 500 * 375, 21)  # 5.7 G pixel-labels
    assert voc_val[0] * voc_val[1] * voc_val[2] >= MIN_POOL_WORK
    assert crf_pool_size(*voc_val) == min(cpus, 1449)
    assert crf_pool_size(1, 500 * 375 * 1000, 21) == 1

from __future__ import annotations

import numpy as np
import pytest

from cpews.crf import dense_crf

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

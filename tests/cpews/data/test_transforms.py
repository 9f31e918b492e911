from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cpews.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize, train_transform

BLACK = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)  # normalized RGB 0


def _pattern(height: int, width: int, seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)  # never pure black
    return Image.fromarray(rgb)


def _transform(image: Image.Image, seed: int, **overrides: object):
    kwargs = {
        "crop_size": 32,
        "scale_range": (1.0, 1.0),
        "hflip_prob": 0.0,
        "photometric": False,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    kwargs.update(overrides)
    return train_transform(image, rng=np.random.default_rng(seed), **kwargs)


def test_box_covers_crop_without_padding() -> None:
    for seed in range(5):
        sample = _transform(_pattern(50, 70), seed)
        assert sample.image.shape == (3, 32, 32) and sample.image.dtype == torch.float32
        assert sample.box.dtype == torch.int64 and sample.box.tolist() == [0, 32, 0, 32]


def test_padding_is_black_outside_box_and_image_inside() -> None:
    image = _pattern(20, 12)  # 20 rows, 12 columns, smaller than the 32 crop on both sides
    for seed in range(10):
        sample = _transform(image, seed)
        r0, r1, c0, c1 = sample.box.tolist()
        assert (r1 - r0, c1 - c0) == (20, 12)
        assert 0 <= r0 < r1 <= 32 and 0 <= c0 < c1 <= 32
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[r0:r1, c0:c1] = False
        expected_black = BLACK.expand(3, 32, 32)
        assert torch.equal(sample.image[:, outside], expected_black[:, outside])
        torch.testing.assert_close(
            sample.image[:, r0:r1, c0:c1], normalize(np.asarray(image), IMAGENET_MEAN, IMAGENET_STD)
        )


def test_partial_padding_one_side() -> None:
    sample = _transform(_pattern(10, 80), seed=3)  # rows padded, columns cropped
    r0, r1, c0, c1 = sample.box.tolist()
    assert r1 - r0 == 10 and (c0, c1) == (0, 32)


def test_hflip_mirrors_content_and_keeps_box_consistent() -> None:
    image = _pattern(20, 12)
    plain = _transform(image, seed=7, hflip_prob=0.0)
    flipped = _transform(image, seed=7, hflip_prob=1.0)
    assert torch.equal(plain.box, flipped.box)  # same rng stream -> same pad offsets
    r0, r1, c0, c1 = flipped.box.tolist()
    torch.testing.assert_close(flipped.image[:, r0:r1, c0:c1], plain.image[:, r0:r1, c0:c1].flip(-1))


def test_rescale_sets_box_size() -> None:
    sample = _transform(_pattern(20, 12), seed=0, scale_range=(0.5, 0.5))
    r0, r1, c0, c1 = sample.box.tolist()
    assert (r1 - r0, c1 - c0) == (10, 6)  # int(0.5 * 20), int(0.5 * 12)


def test_tiny_image_keeps_at_least_one_pixel() -> None:
    sample = _transform(_pattern(1, 2), seed=0, scale_range=(0.1, 0.1))
    r0, r1, c0, c1 = sample.box.tolist()
    assert (r1 - r0, c1 - c0) == (1, 1)


def test_photometric_is_deterministic_given_rng() -> None:
    image = _pattern(40, 40)
    first = _transform(image, seed=11, photometric=True, scale_range=(0.5, 2.0), hflip_prob=0.5)
    again = _transform(image, seed=11, photometric=True, scale_range=(0.5, 2.0), hflip_prob=0.5)
    other = _transform(image, seed=12, photometric=True, scale_range=(0.5, 2.0), hflip_prob=0.5)
    assert torch.equal(first.image, again.image) and torch.equal(first.box, again.box)
    assert not torch.equal(first.image, other.image)
    assert torch.isfinite(first.image).all()


def test_random_boxes_are_valid() -> None:
    image = _pattern(24, 40)
    for seed in range(30):
        sample = _transform(image, seed, scale_range=(0.5, 2.0), hflip_prob=0.5, photometric=True)
        r0, r1, c0, c1 = sample.box.tolist()
        assert 0 <= r0 < r1 <= 32 and 0 <= c0 < c1 <= 32


@pytest.mark.parametrize("resize, shape", [(None, (3, 20, 12)), (16, (3, 16, 16))])
def test_eval_transform(resize: int | None, shape: tuple[int, int, int]) -> None:
    output = eval_transform(_pattern(20, 12), mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=resize)
    assert output.shape == shape and output.dtype == torch.float32


def test_normalize_black_and_white() -> None:
    rgb = np.zeros((1, 2, 3), dtype=np.uint8)
    rgb[0, 1] = 255
    output = normalize(rgb, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (0 - .5) / .5 = -1, (1 - .5) / .5 = 1
    assert output[:, 0, 0].tolist() == [-1.0] * 3 and output[:, 0, 1].tolist() == [1.0] * 3

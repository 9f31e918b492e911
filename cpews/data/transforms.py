"""Training and evaluation image transforms (method.md §8.5 and §2.4).

Training pipeline: random rescale -> horizontal flip -> random crop with black padding (recording the valid
box) -> photometric augmentation -> normalize. All randomness comes from the ``numpy.random.Generator`` passed
in, so a transform is reproducible given the generator state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropResult",
    "PhotometricParams",
    "TrainSample",
    "eval_transform",
    "normalize",
    "photometric_augment",
    "random_crop_with_padding",
    "random_rescale",
    "to_rgb_uint8",
    "train_transform",
]

# method.md §8.5 step 5 (used by ToCo even for ViT weights trained with 0.5/0.5).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PhotometricParams:
    """Photometric augmentation of method.md §8.5 step 4 (defaults = ToCo).

    Attributes:
        brightness, contrast, saturation: jitter strength s; the factor is drawn from U(1 - s, 1 + s).
        hue: hue shift drawn from U(-hue, hue).
        jitter_prob: probability of applying the colour jitter (its four ops in random order).
        grayscale_prob: probability of converting to 3-channel grayscale.
        blur_prob: probability of a Gaussian blur.
        blur_radius: the blur radius is drawn from U(*blur_radius).
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_radius: tuple[float, float] = (0.1, 2.0)


class TrainSample(NamedTuple):
    """Output of ``train_transform``.

    Shapes:
        image: (3, crop, crop) float32, normalized.
        box: (4,) int64 ``(r0, r1, c0, c1)``, the half-open rectangle of real (non-padded) pixels in the crop.
    """

    image: Tensor
    box: Tensor


class CropResult(NamedTuple):
    """Output of ``random_crop_with_padding``.

    Shapes:
        image: (crop, crop, 3) uint8; padded pixels are 0.
        box: ``(r0, r1, c0, c1)`` half-open valid rectangle in crop coordinates.
    """

    image: np.ndarray
    box: tuple[int, int, int, int]


def to_rgb_uint8(image: Image.Image) -> Tensor:
    """Convert a PIL image (any mode) to an (H, W, 3) uint8 tensor."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True))


def normalize(rgb: np.ndarray | Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(H, W, 3) uint8 (array or RGB PIL image) -> (3, H, W) float32 ``(x / 255 - mean) / std``."""
    array = np.asarray(rgb, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"normalize expects an (H, W, 3) RGB image, got shape {array.shape}")
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy()).div_(255.0)
    mean_tensor = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_tensor) / std_tensor


def random_rescale(
    image: Image.Image, rng: np.random.Generator, scale_range: tuple[float, float]
) -> Image.Image:
    """Rescale by ``ratio ~ U(scale_range)``, PIL bilinear, to ``(int(ratio*w), int(ratio*h))`` (>= 1 px)."""
    ratio = rng.uniform(scale_range[0], scale_range[1])
    width, height = image.size
    size = (max(1, int(ratio * width)), max(1, int(ratio * height)))
    return image.resize(size, resample=Image.BILINEAR)


def random_crop_with_padding(rgb: np.ndarray, rng: np.random.Generator, crop_size: int) -> CropResult:
    """Random ``crop_size`` square crop; a side shorter than the crop is first zero-padded at a random offset.

    Args:
        rgb: (H, W, 3) uint8.
        rng: source of the pad offsets and the crop window.
        crop_size: side of the square output.
    """
    height, width = rgb.shape[:2]
    padded_height, padded_width = max(crop_size, height), max(crop_size, width)
    pad_top = int(rng.integers(padded_height - height + 1))
    pad_left = int(rng.integers(padded_width - width + 1))
    start_row = int(rng.integers(padded_height - crop_size + 1))
    start_col = int(rng.integers(padded_width - crop_size + 1))
    padded = np.zeros((padded_height, padded_width, 3), dtype=np.uint8)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = rgb
    crop = padded[start_row : start_row + crop_size, start_col : start_col + crop_size]
    box = (
        max(pad_top - start_row, 0),
        min(pad_top + height - start_row, crop_size),
        max(pad_left - start_col, 0),
        min(pad_left + width - start_col, crop_size),
    )
    return CropResult(np.ascontiguousarray(crop), box)


def photometric_augment(
    image: Image.Image, rng: np.random.Generator, params: PhotometricParams | None = None
) -> Image.Image:
    """Colour jitter (random op order), random grayscale and Gaussian blur, driven by ``rng``.

    ``params`` defaults to ``PhotometricParams()`` (method.md §8.5 step 4).
    """
    params = params or PhotometricParams()
    if rng.random() < params.jitter_prob:
        factors = {
            "brightness": rng.uniform(max(0.0, 1 - params.brightness), 1 + params.brightness),
            "contrast": rng.uniform(max(0.0, 1 - params.contrast), 1 + params.contrast),
            "saturation": rng.uniform(max(0.0, 1 - params.saturation), 1 + params.saturation),
            "hue": rng.uniform(-params.hue, params.hue),
        }
        operations = {
            "brightness": TF.adjust_brightness,
            "contrast": TF.adjust_contrast,
            "saturation": TF.adjust_saturation,
            "hue": TF.adjust_hue,
        }
        for name in np.array(list(operations))[rng.permutation(len(operations))]:
            image = operations[str(name)](image, factors[str(name)])
    if rng.random() < params.grayscale_prob:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < params.blur_prob:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*params.blur_radius)))
    return image


def train_transform(
    image: Image.Image,
    *,
    rng: np.random.Generator,
    crop_size: int,
    scale_range: tuple[float, float],
    hflip_prob: float,
    photometric: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    photometric_params: PhotometricParams | None = None,
) -> TrainSample:
    """The training pipeline of method.md §8.5 (without ToCo's second, box-breaking flip).

    Args:
        image: RGB PIL image of any size.
        rng: the only source of randomness.
        crop_size: side of the square output crop.
        scale_range: rescale ratio bounds, e.g. (0.5, 2.0).
        hflip_prob: probability of a horizontal flip (before cropping).
        photometric: apply ``photometric_augment`` to the crop (padding included, as in ToCo).
        mean, std: per-channel normalization.
        photometric_params: strengths and probabilities of the photometric ops (default:
            ``PhotometricParams()``).

    Returns:
        TrainSample(image (3, crop, crop) float32, box (4,) int64 ``(r0, r1, c0, c1)``).
    """
    image = random_rescale(image.convert("RGB"), rng, scale_range)
    if rng.random() < hflip_prob:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    crop = random_crop_with_padding(np.asarray(image, dtype=np.uint8), rng, crop_size)
    cropped = Image.fromarray(crop.image, mode="RGB")
    if photometric:
        cropped = photometric_augment(cropped, rng, photometric_params)
    return TrainSample(normalize(cropped, mean, std), torch.tensor(crop.box, dtype=torch.int64))


def eval_transform(
    image: Image.Image,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: int | None = None,
) -> Tensor:
    """Normalize an image for evaluation: (3, H, W) float32 at the original size, or (3, resize, resize).

    The optional square resize uses PIL bilinear.
    """
    image = image.convert("RGB")
    if resize is not None:
        image = image.resize((resize, resize), resample=Image.BILINEAR)
    return normalize(image, mean, std)

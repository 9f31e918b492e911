"""Dense CRF post-processing of segmentation probabilities (spec §9.4).

Wraps ``pydensecrf`` (PyPI ``pydensecrf2``), an optional dependency imported lazily.
"""

from __future__ import annotations

import numpy as np


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iters: int = 10,
    gauss_sxy: float = 1.0,
    gauss_compat: float = 1.0,
    bilateral_sxy: float = 121.0,
    bilateral_srgb: float = 5.0,
    bilateral_compat: float = 4.0,
    min_prob: float = 1e-5,
) -> np.ndarray:
    """Fully connected CRF mean-field inference on softmax probabilities (§9.4).

    The unary is ``-log(clip(probs, min_prob, 1))`` (``min_prob`` matches pydensecrf's
    ``unary_from_softmax``); the pairwise terms are a Gaussian smoothness kernel and a bilateral appearance
    kernel on the original RGB image. Take the argmax over K of the result for the label.

    Shapes:
        image: (H, W, 3) uint8 RGB.
        probs: (K, H, W) per-pixel class probabilities.
        returns: (K, H, W) float32 marginals; each pixel sums to 1.

    Raises:
        ImportError: if ``pydensecrf`` (``pip install pydensecrf2``) is missing.
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as error:  # optional dependency
        raise ImportError("dense_crf needs pydensecrf; install it with `pip install pydensecrf2`") from error

    num_labels, height, width = probs.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image shape {image.shape} does not match probs {probs.shape}; expected (H, W, 3)")
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)  # pydensecrf needs a writable buffer
    unary = -np.log(np.clip(probs, min_prob, 1.0)).astype(np.float32)
    unary = np.ascontiguousarray(unary.reshape(num_labels, height * width))

    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat)
    marginals = crf.inference(iters)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)

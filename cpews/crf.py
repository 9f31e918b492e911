"""Dense CRF post-processing of segmentation probabilities (spec §9.4), one image or many in a process pool.

Wraps ``pydensecrf`` (PyPI ``pydensecrf2``), an optional dependency imported lazily.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager

import numpy as np

# Below this much CRF work (images x pixels x labels) the CRF runs in this process when the number of workers is
# left to `crf_pool_size`: about 10 s of CRF on one core of a small CPU (1.2 us per pixel and label, measured on
# 64x64 images with 7 labels), against 1-3 s to start the worker processes (a fresh interpreter each).
MIN_POOL_WORK = 10_000_000


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


def _crf_labels(image: np.ndarray, probs: np.ndarray, params: Mapping[str, float]) -> np.ndarray:
    """The (H, W) int64 argmax of `dense_crf` (a module-level function, so a worker process can run it)."""
    return dense_crf(image, probs, **params).argmax(axis=0)


def dense_crf_labels(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    *,
    executor: Executor | None = None,
    **params: float,
) -> list[np.ndarray]:
    """`dense_crf` label maps of many images, in `executor`'s worker processes when given, else in this process.

    The result is the same either way and in the order of the inputs.

    Shapes:
        images[i]: (H_i, W_i, 3) uint8 RGB.
        probs[i]: (K, H_i, W_i) probabilities.
        returns: per image (H_i, W_i) int64 labels in 0..K-1.
    """
    return start_dense_crf_labels(images, probs, executor=executor, **params)()


def start_dense_crf_labels(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    *,
    executor: Executor | None = None,
    **params: float,
) -> Callable[[], list[np.ndarray]]:
    """Start `dense_crf_labels`; returns the function that waits for its result.

    With an executor the images are refined in its workers meanwhile (the caller can go on, e.g. with the next
    batch on the GPU); without one they are refined now, in this process.
    """
    if len(images) != len(probs):
        raise ValueError(f"{len(images)} images but {len(probs)} probability maps")
    if executor is None:
        labels = [_crf_labels(image, p, params) for image, p in zip(images, probs)]
        return lambda: labels
    futures = [executor.submit(_crf_labels, image, p, params) for image, p in zip(images, probs)]
    return lambda: [future.result() for future in futures]


def crf_pool_size(num_images: int, pixels_per_image: int, num_labels: int, workers: int | None = None) -> int:
    """How many processes to refine `num_images` images with (1 = in this process).

    Args:
        workers: the number to use, at most one per image; None = one per CPU this process may run on when the
            work, ``num_images * pixels_per_image * num_labels``, reaches `MIN_POOL_WORK`, else 1.
    """
    if workers is None:
        if num_images * pixels_per_image * num_labels < MIN_POOL_WORK:
            return 1
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(workers, num_images))


@contextmanager
def crf_executor(workers: int) -> Iterator[Executor | None]:
    """A pool of `workers` CRF processes for `dense_crf_labels` (None when `workers` <= 1), shut down on exit.

    The workers are started with "spawn" (a fresh interpreter), never forked from a process that may hold CUDA,
    OpenMP or Ray threads; like any spawned process they import the main script, so a script that evaluates
    with the CRF needs the usual ``if __name__ == "__main__":`` guard. They are joined when the block ends, also
    on an error (pending work is cancelled then).
    """
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

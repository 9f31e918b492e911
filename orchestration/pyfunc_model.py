"""The MLflow pyfunc of a promoted CPEWS model, logged as code (`mlflow.pyfunc.log_model(python_model=<this file>)`).

Nothing is unpickled when the model loads: MLflow runs this file, and the weights (a cpews checkpoint without
optimizer state) are read with `torch.load(weights_only=True)` only after their sha256 matches the value
recorded when the model was logged (`model_config["weights_sha256"]`).

    model = mlflow.pyfunc.load_model("models:/cpews@champion")
    labels = model.predict(["a.jpg", "b.png"])          # or an (H, W, 3) / (N, H, W, 3) uint8 array, or a list
    labels[0]                                            # (H, W) uint8 label map, 0 = background

Input: a path, an (H, W, 3) uint8 array, an (N, H, W, 3) array, a list or tuple of paths/arrays, or a pandas
DataFrame whose `image` column (else first column) holds them. Output: a list of (H, W) uint8 label maps, one
per image, in the §9.3 protocol (multi-scale + flip; dense CRF when the model was logged with `crf: true`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS_ARTIFACT = "weights"
# MLflow suggests type hints on `predict` at every load; inputs are checked by `as_images` instead.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class WeightsIntegrityError(ValueError):
    """The weights file of a model does not have the sha256 recorded when it was logged."""


def verify_weights(path: str | Path, expected: str | None) -> None:
    """Raise `WeightsIntegrityError` unless the file's sha256 equals `expected` (a missing value is refused)."""
    if not expected:
        raise WeightsIntegrityError(f"{path}: no weights sha256 recorded with the model; refusing to load it")
    from cpews.training.checkpoint import file_sha256

    actual = file_sha256(path)
    if actual != expected:
        raise WeightsIntegrityError(
            f"{path}: weights sha256 {actual} does not match the {expected} recorded when the model was "
            "logged; the file was changed, refusing to load it"
        )


def as_images(model_input: Any) -> list[np.ndarray]:
    """The images of a pyfunc input (see the module docstring) as (H, W, 3) uint8 arrays."""
    from cpews.evaluation.infer import read_rgb

    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):  # a pandas DataFrame
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        model_input = list(model_input[column])
    if isinstance(model_input, (str, Path)):
        model_input = [model_input]
    if isinstance(model_input, np.ndarray):
        if model_input.ndim == 3:
            model_input = [model_input]
        elif model_input.ndim == 4:
            model_input = list(model_input)
        else:
            raise ValueError(f"expected an (H, W, 3) or (N, H, W, 3) array, got shape {model_input.shape}")
    images = []
    for i, item in enumerate(model_input):
        if isinstance(item, (str, Path)):
            images.append(read_rgb(item))
            continue
        array = np.asarray(item)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"input {i}: expected an (H, W, 3) image, got shape {array.shape}")
        if array.dtype != np.uint8:
            raise ValueError(f"input {i}: expected uint8 pixels, got {array.dtype}")
        images.append(np.ascontiguousarray(array))
    return images


class CpewsSegmenter(PythonModel):
    """Segments images with a cpews checkpoint (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        import torch

        from cpews.evaluation.infer import load_model

        config = context.model_config or {}
        weights = Path(context.artifacts[WEIGHTS_ARTIFACT])
        verify_weights(weights, config.get("weights_sha256"))
        device = config.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_model(weights, device)
        self.crf = bool(config.get("crf", False))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        from cpews.evaluation.infer import segment_image

        return [segment_image(self.loaded, rgb, crf=self.crf) for rgb in as_images(model_input)]


mlflow.models.set_model(CpewsSegmenter())

"""The MLflow pyfunc of a promoted CPEWS model, logged as code (`mlflow.pyfunc.log_model(python_model=<this file>)`).

Nothing is unpickled when the model loads: MLflow runs this file, and the weights (a cpews checkpoint without
optimizer state) are read with `torch.load(weights_only=True)` only after their sha256 matches the value
recorded when the model was logged (`model_config["weights_sha256"]`).

    model = mlflow.pyfunc.load_model("models:/cpews@champion")
    labels = model.predict(["a.jpg", "b.png"])
    labels[0]                                            # (H, W) uint8 label map, 0 = background

Input: a list of image paths (`list[str]`; MLflow also turns a one-column pandas DataFrame of paths into that
list). Output: a list of (H, W) uint8 label maps, one per image, in the §9.3 protocol (multi-scale + flip; dense
CRF when the model was logged with `crf: true`). `predict`'s type hints give the model its signature (inputs: a
string per image, its path; outputs: any, since MLflow has no array type) and make MLflow check the input before
`predict` runs. To segment in-memory arrays, use `cpews.evaluation.segment_image` on the loaded model
(`model.unwrap_python_model().loaded`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS_ARTIFACT = "weights"


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


def as_images(paths: list[str]) -> list[np.ndarray]:
    """The images at `paths` as (H, W, 3) uint8 arrays; all are read before any is segmented, so a bad file
    fails with its name before any work is done."""
    from cpews.evaluation.infer import read_rgb

    return [read_rgb(path) for path in paths]


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

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[np.ndarray]:
        """Segment the images at the paths in `model_input`; one (H, W) uint8 label map per image."""
        from cpews.evaluation.infer import segment_image

        return [segment_image(self.loaded, rgb, crf=self.crf) for rgb in as_images(model_input)]


mlflow.models.set_model(CpewsSegmenter())

"""Evaluation (§9) and inference (§9.3-§9.4)."""

from __future__ import annotations

from cpews.evaluation.evaluate import EvalResult, evaluate, segmentation_probabilities
from cpews.evaluation.infer import LoadedModel, infer_files, load_model, segment_image

__all__ = [
    "EvalResult",
    "LoadedModel",
    "evaluate",
    "infer_files",
    "load_model",
    "segment_image",
    "segmentation_probabilities",
]

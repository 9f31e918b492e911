"""CPEWS: weakly supervised semantic segmentation with contextual prototypes (a ViT trained from image labels).

Importing `cpews` loads neither Ray, Optuna nor MLflow; the orchestration layer lives in `orchestration`.
"""

__version__ = "0.1.0"

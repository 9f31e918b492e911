"""Metric keys `"<split>/<name>"`, defined once; orchestration imports them (e.g. for TuneConfig(metric=...))."""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
TRAIN_LOSS_CLS = "train/loss_cls"
TRAIN_LOSS_ISM = "train/loss_ism"
TRAIN_LOSS_SEG = "train/loss_seg"
TRAIN_LOSS_PDL = "train/loss_pdl"
TRAIN_LOSS_SSL = "train/loss_ssl"
TRAIN_PDL_RMS_POS = "train/pdl_rms_pos"  # mean RMS distance of PDL region features to p̄_c (§13 choice 3)
TRAIN_PDL_RMS_NEG = "train/pdl_rms_neg"  # mean RMS distance to the closest negative prototype
TRAIN_PDL_PAIRS = "train/pdl_pairs"  # mean number of PDL (image, class) pairs per step
TRAIN_SSL_TOKENS = "train/ssl_tokens"  # mean number of SSL-suppressed tokens per step
TRAIN_F1 = "train/f1"
TRAIN_LR = "train/lr"
TRAIN_STEPS_PER_SEC = "train/steps_per_sec"
TRAIN_ITERATION = "train/iteration"

VAL_MIOU_CAM = "val/miou_cam"
VAL_MIOU_AUX_CAM = "val/miou_aux_cam"
VAL_MIOU_PSEUDO = "val/miou_pseudo"
VAL_MIOU_SEG = "val/miou_seg"
VAL_MIOU = VAL_MIOU_SEG  # the headline validation score
VAL_BASELINE_MIOU = "val/baseline_miou"  # mIoU of predicting background everywhere on the same images: the floor
VAL_F1 = "val/f1"
VAL_PSEUDO_IGNORED = "val/pseudo_ignored_fraction"
VAL_CONFOUNDER_FALSE_ACTIVATION = "val/confounder_false_activation"
VAL_CONFOUNDER_IMAGE_BIAS = "val/confounder_image_bias"
VAL_CONFOUNDED_IOU = "val/confounded_class_iou"


def stat_key(name: str) -> str:
    """`train/<name>` for a per-step diagnostic recorded in `StepContext.stats` (`pdl_rms_pos`, ...)."""
    return f"train/{name}"


def loss_key(term: str) -> str:
    """`train/loss_<term>` for a loss term name (`cls`, `ism`, `seg`, `pdl`, `ssl`, ...)."""
    return f"train/loss_{term}"

# K-fold cross-validation (written by the sweep's trial, orchestration/trial.py)
CV_MIOU_SEG_MEAN = "cv/miou_seg_mean"  # mean over the folds trained so far of val/miou_seg (the objective)
CV_MIOU_SEG_STD = "cv/miou_seg_std"  # their sample standard deviation (ddof 1; NaN before 2 folds)
CV_BASELINE_MIOU_MEAN = "cv/baseline_miou_mean"  # mean over the same folds of val/baseline_miou
CV_FOLDS_COMPLETED = "cv/folds_completed"
FOLD_MIOU_SEG = "fold/miou_seg"  # val/miou_seg of the fold just finished
# The keys of the trial's every report to Tune (orchestration.trial.cv_metrics): a sweep's objective is one of them
TRIAL_REPORT_KEYS = (CV_MIOU_SEG_MEAN, CV_MIOU_SEG_STD, CV_BASELINE_MIOU_MEAN, CV_FOLDS_COMPLETED)

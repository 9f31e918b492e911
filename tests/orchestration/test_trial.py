"""The trial's cross-validation summary (no Ray needed)."""

from __future__ import annotations

import math

import pytest

from cpews.training import keys
from orchestration.trial import TrialState, cv_metrics


def test_cv_metrics_carry_the_mean_all_background_miou_of_the_folds() -> None:
    summary = cv_metrics([0.2, 0.4], [0.12, 0.14])
    assert summary[keys.CV_MIOU_SEG_MEAN] == pytest.approx(0.3)
    assert summary[keys.CV_MIOU_SEG_STD] == pytest.approx(0.1)  # population std, as before
    assert summary[keys.CV_BASELINE_MIOU_MEAN] == pytest.approx(0.13)
    assert summary[keys.CV_FOLDS_COMPLETED] == 2.0
    before = cv_metrics([], [])
    assert math.isnan(before[keys.CV_MIOU_SEG_MEAN]) and math.isnan(before[keys.CV_BASELINE_MIOU_MEAN])
    # a state saved before the folds' baselines were recorded has none: NaN, not an error
    assert math.isnan(cv_metrics([0.2], [])[keys.CV_BASELINE_MIOU_MEAN])


def test_trial_state_keeps_the_fold_baselines_and_reads_older_states() -> None:
    state = TrialState(fold_scores=[0.3], fold_baselines=[0.12])
    assert TrialState.from_json(state.to_json()).fold_baselines == [0.12]
    assert TrialState.from_json('{"fold_scores": [0.3]}').fold_baselines == []

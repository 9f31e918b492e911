"""The trial's cross-validation summary and its restore from a Tune checkpoint (no Ray instance needed)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from cpews.training import keys
from orchestration.trial import (
    FOLD_CHECKPOINT_FILE,
    TRIAL_STATE_FILE,
    TrialState,
    cv_metrics,
    load_trial_state,
)


def test_cv_metrics_carry_the_mean_all_background_miou_of_the_folds() -> None:
    summary = cv_metrics([0.2, 0.4], [0.12, 0.14])
    assert summary[keys.CV_MIOU_SEG_MEAN] == pytest.approx(0.3)
    assert summary[keys.CV_MIOU_SEG_STD] == pytest.approx(0.1 * 2**0.5)  # sample std: sqrt(0.02 / 1)
    assert math.isnan(cv_metrics([0.2], [])[keys.CV_MIOU_SEG_STD])  # no spread from one fold
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


# ------------------------------------------------------------------------------------------------------------
# Restoring a trial: the furthest valid checkpoint of its fold, damaged files passed over (real files; Ray's
# Checkpoint, no Ray instance).
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fold_run(make_micro_config, tmp_path_factory) -> Path:
    """A fold's run folder as a trial leaves it: last.pt (step 6), iter_0000002.pt and iter_0000004.pt."""
    from cpews.training import train

    out = tmp_path_factory.mktemp("trial") / "fold_0"
    cfg = make_micro_config(
        "train.checkpoint_every=2", "train.keep_checkpoints=0", "eval.every=0", "train.log_every=6"
    )
    train(cfg, lambda metrics, checkpoint_dir: None, out_dir=out, progress=False)
    return out


@pytest.fixture
def trial(fold_run: Path, tmp_path: Path):
    """(Tune checkpoint, trial dir): the checkpoint was taken mid-fold at step 4 (fold 0 in progress)."""
    from ray.tune import Checkpoint

    trial_dir = tmp_path / "trials" / "t1"
    shutil.copytree(fold_run, trial_dir / "fold_0")
    saved = tmp_path / "ray_results" / "checkpoint_000001"
    saved.mkdir(parents=True)
    (saved / TRIAL_STATE_FILE).write_text(TrialState(fold_in_progress=0, fold_iteration=4).to_json())
    shutil.copyfile(fold_run / "iter_0000004.pt", saved / FOLD_CHECKPOINT_FILE)
    return Checkpoint.from_directory(saved), saved / FOLD_CHECKPOINT_FILE, trial_dir


def _restore(checkpoint, trial_dir: Path):
    return load_trial_state(checkpoint, trial_dir / "restore" / FOLD_CHECKPOINT_FILE,
                            fold_dir=lambda fold: trial_dir / f"fold_{fold}")


def test_a_valid_saved_checkpoint_is_restored_as_before(trial, fold_run: Path, capfd) -> None:
    """Nothing in the fold's folder is further on than the Tune checkpoint (step 4): its copy is used."""
    checkpoint, saved, trial_dir = trial
    (trial_dir / "fold_0" / "last.pt").unlink()  # the folder then ends at iter_0000004.pt, the same step
    state, resume, source = _restore(checkpoint, trial_dir)
    assert resume == trial_dir / "restore" / FOLD_CHECKPOINT_FILE
    assert resume.read_bytes() == saved.read_bytes() and state.fold_iteration == 4 and source is None
    assert "warning" not in capfd.readouterr().err


def test_a_newer_checkpoint_in_the_folds_folder_wins_over_the_tune_copy(trial, fold_run: Path, capfd) -> None:
    """The driver died before Tune's state held the fold's newer checkpoint: the fold continues from last.pt
    (step 6), not from the Tune checkpoint's step 4, and says so."""
    checkpoint, saved, trial_dir = trial
    state, resume, source = _restore(checkpoint, trial_dir)
    assert resume.read_bytes() == (fold_run / "last.pt").read_bytes()
    assert (state.fold_in_progress, state.fold_iteration) == (0, 6)
    assert source == f"{trial_dir / 'fold_0' / 'last.pt'}, further on than the Tune checkpoint's iteration 4"
    assert "warning" not in capfd.readouterr().err


def test_a_damaged_newer_checkpoint_leaves_the_tune_copy_and_is_named(trial, capfd) -> None:
    checkpoint, saved, trial_dir = trial
    (trial_dir / "fold_0" / "last.pt").write_bytes(b"not a checkpoint")
    state, resume, source = _restore(checkpoint, trial_dir)
    assert resume.read_bytes() == saved.read_bytes() and state.fold_iteration == 4 and source is None
    (warning,) = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert warning.startswith(f"cpews: warning: checkpoint {str(trial_dir / 'fold_0' / 'last.pt')!r}: ")
    assert f"resuming from the newest valid checkpoint {str(saved)!r} (step 4) instead" in warning


def test_a_fold_end_checkpoint_continues_the_next_fold_from_its_folder(fold_run: Path, tmp_path: Path) -> None:
    """Tune's state ends at fold 0's end, while fold 1 had trained (its folder holds last.pt at step 6): fold 1
    continues from there; the finished fold's score is kept."""
    from ray.tune import Checkpoint

    trial_dir = tmp_path / "trials" / "t2"
    shutil.copytree(fold_run, trial_dir / "fold_1")
    saved = tmp_path / "ray_results" / "checkpoint_000002"
    saved.mkdir(parents=True)
    (saved / TRIAL_STATE_FILE).write_text(TrialState(fold_scores=[0.25]).to_json())
    state, resume, source = _restore(Checkpoint.from_directory(saved), trial_dir)
    assert (state.fold_scores, state.fold_in_progress, state.fold_iteration) == ([0.25], 1, 6)
    assert resume.read_bytes() == (fold_run / "last.pt").read_bytes()
    assert source.endswith("further on than no Tune checkpoint of this fold")


def test_without_any_checkpoint_a_fresh_trial_starts_and_a_restarted_one_continues(fold_run, tmp_path) -> None:
    trial_dir = tmp_path / "trials" / "t3"
    state, resume, source = _restore(None, trial_dir)
    assert (state, resume, source) == (TrialState(), None, None)
    shutil.copytree(fold_run, trial_dir / "fold_0")
    state, resume, _ = _restore(None, trial_dir)
    assert (state.fold_scores, state.fold_in_progress, state.fold_iteration) == ([], 0, 6)
    assert resume.read_bytes() == (fold_run / "last.pt").read_bytes()


def test_a_damaged_saved_checkpoint_falls_back_to_the_folds_newest_valid_one(trial, fold_run: Path, capfd) -> None:
    """The saved copy is cut short and the fold's last.pt is garbage: iter_0000004.pt is used, and the warning
    names the damaged file in the Tune checkpoint (not the trial's copy of it)."""
    checkpoint, saved, trial_dir = trial
    saved.write_bytes(saved.read_bytes()[:1000])
    (trial_dir / "fold_0" / "last.pt").write_bytes(b"\x00" * 512)
    state, resume, _ = _restore(checkpoint, trial_dir)
    assert resume.read_bytes() == (fold_run / "iter_0000004.pt").read_bytes()
    assert (state.fold_in_progress, state.fold_iteration) == (0, 4)
    (warning,) = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert warning.startswith(f"cpews: warning: checkpoint {str(saved)!r}: truncated (1000 bytes"), warning
    assert f"{str(trial_dir / 'fold_0' / 'iter_0000004.pt')!r} (step 4)" in warning
    assert "restore" not in warning


def test_the_fold_iteration_follows_an_older_fallback(trial, capfd) -> None:
    checkpoint, saved, trial_dir = trial
    saved.write_bytes(bytes(range(256)) * 4)
    (trial_dir / "fold_0" / "last.pt").unlink()
    (trial_dir / "fold_0" / "iter_0000004.pt").write_bytes(b"")
    state, resume, _ = _restore(checkpoint, trial_dir)
    assert state.fold_iteration == 2 and resume.read_bytes() == (trial_dir / "fold_0" / "iter_0000002.pt").read_bytes()


def test_with_no_valid_checkpoint_the_error_names_the_damaged_file(trial) -> None:
    from cpews.training import CheckpointError

    checkpoint, saved, trial_dir = trial
    saved.write_bytes(saved.read_bytes()[:1000])
    shutil.rmtree(trial_dir / "fold_0")
    with pytest.raises(CheckpointError) as info:
        _restore(checkpoint, trial_dir)
    assert str(info.value) == f"checkpoint {str(saved)!r}: truncated (1000 bytes; the end of its zip archive is missing)"
    assert not (trial_dir / "restore").exists()  # no copy of the damaged file

"""Damaged checkpoint files (cut short, overwritten with garbage, holding objects): one-line errors that name the
file, and a resume that falls back to the newest valid checkpoint of the same run, naming the damaged one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cpews.training import CheckpointError, keys, load_checkpoint, train
from cpews.training.checkpoint import newest_valid_checkpoint, resume_candidates, run_checkpoints

# 6 steps: iter_2, iter_4, last.pt (6), all kept after the run (keep_checkpoints=0)
RUN = ("train.checkpoint_every=2", "train.keep_checkpoints=0", "eval.every=0", "train.log_every=1")


@pytest.fixture(scope="module")
def run_dir(make_micro_config, tmp_path_factory) -> Path:
    """A finished micro run (read-only: copy it before damaging files)."""
    out = tmp_path_factory.mktemp("checkpoints") / "run"
    train(make_micro_config(*RUN), lambda metrics, checkpoint_dir: None, out_dir=out, progress=False)
    return out


@pytest.fixture
def run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 16)


def test_the_run_lists_its_checkpoints_newest_first(run: Path) -> None:
    assert [p.name for p in run_checkpoints(run)] == ["last.pt", "iter_0000004.pt", "iter_0000002.pt"]
    assert [load_checkpoint(p).iteration for p in run_checkpoints(run)] == [6, 4, 2]
    assert [p.name for p in resume_candidates(run / "last.pt")] == ["last.pt", "iter_0000004.pt", "iter_0000002.pt"]
    assert [p.name for p in resume_candidates(run / "iter_0000004.pt")] == ["iter_0000004.pt", "iter_0000002.pt"]
    assert resume_candidates(run / "copy.pt") == [run / "copy.pt"]  # another name: no run to fall back in


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (truncate, "truncated ("),
        (garbage, "not a PyTorch file (neither a zip archive nor a pickle)"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_it(run: Path, damage, reason: str) -> None:
    damage(run / "last.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run / "last.pt")
    message = str(info.value)
    assert message.startswith(f"checkpoint {str(run / 'last.pt')!r}: {reason}"), message
    assert "\n" not in message and "weights_only" not in message


def test_a_checkpoint_holding_objects_is_refused_without_unsafe_advice(run: Path) -> None:
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["extra"] = Path("/tmp")  # an object, not a tensor
    torch.save(payload, run / "objects.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run / "objects.pt")
    assert str(info.value) == (
        f"checkpoint {str(run / 'objects.pt')!r}: contains objects other than tensors (pathlib.PosixPath); "
        "such files are never unpickled"
    )


def test_a_marked_checkpoint_without_its_weights_is_damaged(run: Path) -> None:
    payload = torch.load(run / "last.pt", weights_only=True)
    del payload["model"]
    torch.save(payload, run / "no_model.pt")
    with pytest.raises(CheckpointError, match=r"no_model.pt' is damaged: no model state dict of tensors"):
        load_checkpoint(run / "no_model.pt")


def test_resume_from_a_truncated_last_falls_back_to_the_newest_valid(make_micro_config, run: Path, tmp_path,
                                                                       capfd) -> None:
    """The trainer continues from iter_4 (steps 5 and 6 are trained again) and warns, naming last.pt."""
    truncate(run / "last.pt")
    reports: list = []
    result = train(make_micro_config(*RUN), lambda m, d: reports.append(dict(m)), out_dir=tmp_path / "resumed",
                   resume=run / "last.pt", progress=False)
    assert [m[keys.TRAIN_ITERATION] for m in reports if keys.TRAIN_LOSS in m] == [5.0, 6.0]
    assert result.iterations == 6
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"cpews: warning: checkpoint {str(run / 'last.pt')!r}: "
        f"truncated ({(run / 'last.pt').stat().st_size} bytes; the end of its zip archive is missing); resuming "
        f"from the newest valid checkpoint {str(run / 'iter_0000004.pt')!r} (step 4) instead"
    ]


def test_every_damaged_checkpoint_is_skipped_and_named(run: Path, capfd) -> None:
    truncate(run / "last.pt")
    garbage(run / "iter_0000004.pt")
    chosen = newest_valid_checkpoint(resume_candidates(run / "last.pt"))
    assert (chosen.path, chosen.checkpoint.iteration) == (run / "iter_0000002.pt", 2)
    (warning,) = capfd.readouterr().err.splitlines()
    assert warning.startswith(f"cpews: warning: checkpoint {str(run / 'last.pt')!r}: truncated")
    assert f"{str(run / 'iter_0000002.pt')!r} (step 2)" in warning
    assert f"also unusable: checkpoint {str(run / 'iter_0000004.pt')!r}: not a PyTorch file" in warning


def test_a_damaged_periodic_checkpoint_falls_back_to_an_older_one_only(run: Path) -> None:
    garbage(run / "iter_0000004.pt")
    chosen = newest_valid_checkpoint(resume_candidates(run / "iter_0000004.pt"))
    assert chosen.path == run / "iter_0000002.pt"  # not last.pt: it is newer than what was asked for


def test_a_valid_checkpoint_is_used_as_it_is(run: Path, capfd) -> None:
    garbage(run / "iter_0000004.pt")  # older files are not even read
    chosen = newest_valid_checkpoint(resume_candidates(run / "last.pt"))
    assert (chosen.path, chosen.checkpoint.iteration, chosen.damaged) == (run / "last.pt", 6, [])
    assert "warning" not in capfd.readouterr().err


def test_with_no_valid_checkpoint_the_error_names_the_damaged_file(make_micro_config, run: Path, tmp_path) -> None:
    for path in run_checkpoints(run):
        truncate(path)
    with pytest.raises(CheckpointError) as info:
        train(make_micro_config(*RUN), lambda m, d: None, out_dir=tmp_path / "resumed", resume=run / "last.pt",
              progress=False)
    message = str(info.value)
    assert message.startswith(f"checkpoint {str(run / 'last.pt')!r}: truncated ("), message
    assert message.endswith("; no valid older checkpoint either (2 tried)") and "\n" not in message
    assert not (tmp_path / "resumed").exists()  # nothing written


def test_a_missing_checkpoint_has_no_fallback(run: Path) -> None:
    (run / "last.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last.pt': no such file$"):
        newest_valid_checkpoint(resume_candidates(run / "last.pt"))

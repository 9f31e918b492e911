"""The `cpews` command line end to end (`python -m cpews ...` in a subprocess), on the micro preset.

Every subprocess inherits `CPEWS_DATA_DIR` from the session fixture, so training and evaluation read the
session's synthetic dataset.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpews.data import SYNTHETIC_CLASSES

REPO = Path(__file__).resolve().parents[2]
MICRO = ("--set", "data.synthetic_train=32", "--set", "data.synthetic_val=8", "--set", "train.device=cpu")
MIOU_KEYS = ("miou_cam", "miou_aux_cam", "miou_pseudo", "miou_seg")


def cpews(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cpews", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("cpews: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.fixture(scope="module")
def cli_run(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cpews train --config test_micro --out DIR` (6 iterations); returns DIR."""
    work = tmp_path_factory.mktemp("cli")
    out = work / "run"
    proc = cpews("train", "--config", "test_micro", *MICRO, "--out", out, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint {out / 'last.pt'}" in proc.stdout
    assert "val/miou_seg = " in proc.stdout
    return out


def test_train_writes_the_run_folder(cli_run: Path):
    assert {"config.yaml", "last.pt", "metrics.json"} <= {p.name for p in cli_run.iterdir()}
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert all(0.0 <= metrics[f"val/{k}"] <= 1.0 for k in MIOU_KEYS)


def test_eval_json_prints_one_object(cli_run: Path, tmp_path: Path):
    proc = cpews("eval", "--checkpoint", cli_run / "last.pt", "--device", "cpu", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    for key in MIOU_KEYS:
        assert 0.0 <= result[key] <= 1.0, key
    assert "miou_seg_crf" not in result
    assert result["images"] == 8 and result["split"] == "val"
    assert result["checkpoint"] == str(cli_run / "last.pt")
    assert [row["class"] for row in result["per_class"]] == list(SYNTHETIC_CLASSES)
    # CAMs and pseudo labels are scored exactly as in the trainer's final validation (same images, eval.size,
    # scales); only the segmentation switches to the final protocol (flip sum)
    trained = json.loads((cli_run / "metrics.json").read_text())
    for key in ("miou_cam", "miou_aux_cam", "miou_pseudo", "baseline_miou"):
        assert result[key] == pytest.approx(trained[f"val/{key}"], abs=1e-9), key


def test_eval_text_shows_the_all_background_miou(cli_run: Path, tmp_path: Path):
    proc = cpews("eval", "--checkpoint", cli_run / "last.pt", "--device", "cpu", "--max-images", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.split()[:1] == ["baseline_miou"]]
    assert 0.0 <= float(line.split()[-1]) <= 1.0, line


def test_eval_crf_json_on_the_first_images(cli_run: Path, tmp_path: Path):
    proc = cpews(
        "eval",
        "--checkpoint",
        cli_run / "last.pt",
        "--device",
        "cpu",
        "--crf",
        "--json",
        "--max-images",
        "4",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["images"] == 4
    for key in (*MIOU_KEYS, "miou_seg_crf"):
        assert 0.0 <= result[key] <= 1.0, key
    assert all("seg_crf" in row for row in result["per_class"])


def test_infer_writes_labels_and_overlays(cli_run: Path, synthetic_data_dir: Path, tmp_path: Path):
    images = sorted((synthetic_data_dir / "JPEGImages").glob("*.png"))[:2]
    out = tmp_path / "pred"
    proc = cpews(
        "infer", "--checkpoint", cli_run / "last.pt", "--device", "cpu", *images, "--out", out, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    expected = sorted(name for p in images for name in (f"{p.stem}.png", f"{p.stem}_overlay.png"))
    assert sorted(p.name for p in out.iterdir()) == expected
    assert len(proc.stdout.splitlines()) == 2


def test_infer_with_crf(cli_run: Path, synthetic_data_dir: Path, tmp_path: Path, capsys):
    from orchestration.cli import main

    image = min((synthetic_data_dir / "JPEGImages").glob("*.png"))
    rc = main(
        [
            "infer",
            "--checkpoint",
            str(cli_run / "last.pt"),
            "--device",
            "cpu",
            "--crf",
            str(image),
            "--out",
            str(tmp_path / "pred"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()


def test_train_resume_from_another_architecture_is_a_clean_error(cli_run: Path, tmp_path: Path, capsys):
    from orchestration.cli import main

    out = tmp_path / "resumed"
    rc = main(
        [
            "train",
            "--config",
            "test_micro",
            *MICRO,
            "--set",
            "model.depth=3",
            "--resume",
            str(cli_run / "last.pt"),
            "--out",
            str(out),
        ]
    )
    assert rc == 2
    assert str(cli_run / "last.pt") in capsys.readouterr().err


def test_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path):
    bogus = tmp_path / "not_a_checkpoint.pt"
    bogus.write_bytes(b"\x00\x01 definitely not a torch file" * 4)
    assert_clean_error(
        cpews("eval", "--checkpoint", bogus, "--json", cwd=tmp_path), str(bogus), "not a PyTorch file"
    )


@pytest.fixture(scope="module")
def cli_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_synthetic") / "synth"
    proc = cpews(
        "data", "synthetic", "--out", out, "--train", 20, "--val", 8, "--image-size", 32, cwd=out.parent
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    return out


def test_data_synthetic_writes_the_voc_layout(cli_synthetic: Path):
    for folder in ("JPEGImages", "SegmentationClassAug", "ConfounderMask"):
        assert len(list((cli_synthetic / folder).glob("*.png"))) == 28, folder
    lists = cli_synthetic / "ImageSets" / "Segmentation"
    counts = {
        split: len((lists / f"{split}.txt").read_text().split()) for split in ("train_aug", "train", "val")
    }
    assert counts == {"train_aug": 20, "train": 20, "val": 8}
    meta = json.loads((cli_synthetic / "meta.json").read_text())
    assert (
        meta["params"]["n_train"] == 20
        and meta["params"]["n_val"] == 8
        and meta["params"]["image_size"] == 32
    )


def test_data_validate_accepts_a_good_folder_and_names_the_problem_in_a_broken_one(cli_synthetic, tmp_path):
    ok = cpews("data", "validate", "--root", cli_synthetic, "--dataset", "synthetic", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "layout OK" in ok.stdout
    broken = tmp_path / "broken"
    shutil.copytree(cli_synthetic, broken)
    first_val = (broken / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    missing = broken / "JPEGImages" / f"{first_val}.png"
    missing.unlink()
    proc = cpews("data", "validate", "--root", broken, "--dataset", "synthetic", cwd=tmp_path)
    assert_clean_error(proc, str(broken / "JPEGImages" / first_val), "not found")


def test_infer_with_an_unreadable_image_is_a_clean_error(
    cli_run: Path, synthetic_data_dir: Path, tmp_path: Path, capsys
):
    from orchestration.cli import main

    good = min((synthetic_data_dir / "JPEGImages").glob("*.png"))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "pred"
    rc = main(
        [
            "infer",
            "--checkpoint",
            str(cli_run / "last.pt"),
            "--device",
            "cpu",
            str(good),
            str(bad),
            "--out",
            str(out),
        ]
    )
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"cpews: error: cannot read image {str(bad)!r}")
    assert not out.exists()


def test_config_show_json_is_the_flat_config(tmp_path: Path):
    from cpews.config import load_config

    proc = cpews(
        "config", "show", "--config", "test_micro", "--set", "optim.max_iters=7", "--json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == load_config("test_micro", ["optim.max_iters=7"]).to_flat_dict()


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["search.algoritm=tpe"], ["unknown key search.algoritm", "did you mean search.algorithm"]),
        (["space.loss.pdl_wieght={uniform: [0.1, 0.2]}"], ["loss.pdl_wieght"]),
        (["space.loss.pdl_weight={uniform: [0.3, 0.1]}"], ["space.loss.pdl_weight"]),
        (["space.proto.num_prototypes={uniform: [4, 8]}"], ["proto.num_prototypes", "int field"]),
        (["resources.cpu=512"], ["resources.cpu"]),
        (["fixed.data.dataset=voc", "fixed.data.root=/nonexistent/VOC2012"], ["data.root", "/nonexistent/VOC2012"]),
    ],
)
def test_sweep_run_refuses_a_bad_sweep_file_before_creating_anything(tmp_path: Path, overrides, needles):
    """Each mistake is an error naming the key (and the file); no run folder, no MLflow store is created."""
    args = [item for override in overrides for item in ("--set", override)]
    proc = cpews("sweep", "run", REPO / "search_spaces" / "demo.yaml", *args, "--run-dir", tmp_path / "runs",
                 cwd=tmp_path)
    assert_clean_error(proc, "demo.yaml", *needles)
    assert not (tmp_path / "runs").exists()


def test_sweep_resume_and_leaderboard_of_an_unknown_sweep_are_clean_errors(tmp_path: Path):
    for command in (["resume", "nope"], ["leaderboard", "nope", "--json"]):
        proc = cpews("sweep", *command, "--run-dir", tmp_path / "runs", cwd=tmp_path)
        assert_clean_error(proc, "no sweep 'nope'")


def test_pretrain_makes_the_backbone_once_and_copies_it(synthetic_data_dir: Path, tmp_path: Path):
    tiny = ("--set", "pretrain.images=16", "--set", "pretrain.val_images=8", "--set", "pretrain.iters=4",
            "--set", "pretrain.cls_iters=2", "--set", "pretrain.pool_iter=3", "--set", "pretrain.batch_size=8",
            "--set", f"pretrain.cache_dir={tmp_path / 'cache'}")
    first = cpews("pretrain", "--config", "test_micro", *MICRO, *tiny, "--out", tmp_path / "bb.pt", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "cache miss, pretraining" in first.stdout and "held-out pretraining images: miou_cam=" in first.stdout
    assert (tmp_path / "bb.pt").is_file() and f"model.weights={tmp_path / 'bb.pt'}" in first.stdout
    again = cpews("pretrain", "--config", "test_micro", *MICRO, *tiny, cwd=tmp_path)
    assert again.returncode == 0 and "cache hit" in again.stdout and "(cached)" in again.stdout
    # the copied file is a backbone state dict that `model.weights` loads for training
    run = cpews("train", "--config", "test_micro", *MICRO, "--set", f"model.weights={tmp_path / 'bb.pt'}",
                "--set", "optim.max_iters=1", "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr


def test_train_names_a_weights_file_of_another_architecture(synthetic_data_dir: Path, tmp_path: Path):
    import torch

    from cpews.model.backbone import ViTBackbone

    other = ViTBackbone("vit_base_patch16_224", ism_depth=1, img_size=64, patch_size=8, embed_dim=32, depth=2,
                        num_heads=2)
    torch.save(other.vit.state_dict(), tmp_path / "other.pt")
    proc = cpews("train", "--config", "test_micro", *MICRO, "--set", f"model.weights={tmp_path / 'other.pt'}",
                 "--out", tmp_path / "run", cwd=tmp_path)
    assert_clean_error(proc, str(tmp_path / "other.pt"), "patch_embed.proj.weight: file (32, 3, 8, 8) vs model (64, 3, 8, 8)")


@pytest.mark.parametrize(
    ("command", "run_dir", "needle"),
    [
        (["sweep", "run", "demo", "--smoke"], "afile", "--run-dir afile: is a file, not a folder"),
        (["sweep", "resume", "x"], "afile", "--run-dir afile: is a file, not a folder"),
        (["sweep", "leaderboard", "x"], "afile", "--run-dir afile: is a file, not a folder"),
        (["promote"], "afile", "--run-dir afile: is a file, not a folder"),
        (["promote", "x"], "afile/runs", "--run-dir afile/runs: afile is a file, not a folder"),
    ],
)
def test_a_run_dir_that_is_a_file_is_a_clean_error(tmp_path: Path, command, run_dir, needle):
    (tmp_path / "afile").write_text("not a folder")
    proc = cpews(*command, "--run-dir", run_dir, cwd=tmp_path)
    assert_clean_error(proc, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize(
    ("model", "tracking_uri", "needle"),
    [
        ("models:/cpews@champion", None, "there is no MLflow store at {tmp}/runs/mlflow/mlflow.db (the local store"),
        ("runs:/0123/model", "sqlite:///{tmp}/store/mlflow.db", "there is no MLflow store at {tmp}/store/mlflow.db "
         "(MLFLOW_TRACKING_URI)"),
        ("./exported/model", None, "{tmp}/exported/model does not exist"),
    ],
)
def test_infer_with_a_model_that_does_not_exist_creates_nothing(tmp_path: Path, model, tracking_uri, needle):
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri.format(tmp=tmp_path)
    proc = cpews("infer", "--model", model, "image.png", "--out", "pred", "--device", "cpu", cwd=tmp_path, env=env)
    assert_clean_error(proc, f"cannot load model {model!r}: ", needle.format(tmp=tmp_path))
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/mlflow, no store, no output folder


def fake_sweep(run_dir: Path, name: str, created: float, statuses: list[str]) -> None:
    """A finished sweep's folder as `promote` reads it: sweep.yaml, state.json and leaderboard.json (no Tune
    folder), its trials with `statuses`."""
    import yaml

    from orchestration.search_space import load_sweep, smoke

    root = run_dir / "sweeps" / name
    root.mkdir(parents=True)
    data = smoke(load_sweep("demo", check_paths=False)).to_dict()
    data.update(name=name, tracking={"experiment": name})
    (root / "sweep.yaml").write_text(yaml.safe_dump(data))
    state = {"name": name, "created": created, "workdir": str(run_dir.parent),
             "tracking_uri": f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}"}
    (root / "state.json").write_text(json.dumps(state))
    trials = [{"rank": i + 1, "trial": f"t{i}", "status": status, "params": {"loss.pdl_weight": 0.1 * (i + 1)},
               "fold_scores": [0.5, 0.6] if status == "completed" else [0.5],
               "cv_miou_mean": 0.55 if status == "completed" else None, "cv_miou_std": 0.07,
               "folds_completed": 2 if status == "completed" else 1}
              for i, status in enumerate(statuses)]
    (root / "leaderboard.json").write_text(json.dumps({"sweep": name, "trials": trials}))


def test_promote_without_a_name_says_which_sweep_it_picked(tmp_path: Path):
    run_dir = tmp_path / "runs"
    fake_sweep(run_dir, "newer", created=2000.0, statuses=["failed", "pruned"])
    fake_sweep(run_dir, "older", created=1000.0, statuses=["completed"])
    refused = cpews("promote", "--dry-run", "--run-dir", run_dir, cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    # (MLflow may log a line first: the leaderboard is read from the sweep's store when it can be)
    assert refused.stderr.splitlines()[-1].startswith(
        f"cpews: error: sweep newer (the latest in {run_dir / 'sweeps'}; no sweep named): the sweep has no "
        "completed trial"), refused.stderr
    assert refused.stdout == f"promote: no sweep named: the latest sweep in {run_dir / 'sweeps'} is newer\n"

    fake_sweep(run_dir, "newest", created=3000.0, statuses=["completed", "failed"])
    dry = cpews("promote", "--dry-run", "--run-dir", run_dir, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    lines = dry.stdout.splitlines()
    assert lines[0] == f"promote: no sweep named: the latest sweep in {run_dir / 'sweeps'} is newest"
    assert lines[1].startswith("sweep newest: promoting trial t0: ")


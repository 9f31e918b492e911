"""Promotion: selection and gate by hand, then for real against a `mlflow server` on 127.0.0.1 (a smoke sweep,
refits as Ray tasks, the registry, the `champion` alias, the pyfunc in a fresh process, a tampered file)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def row(trial: str, scores: list[float], status: str = "completed") -> dict:
    mean = sum(scores) / len(scores) if scores else None
    return {"trial": trial, "status": status, "fold_scores": scores, "cv_miou_mean": mean,
            "cv_miou_std": 0.0, "params": {"loss.pdl_weight": 0.1}}


def test_select_best_takes_the_best_mean_when_it_stands_clear() -> None:
    from orchestration.promote import select_best

    rows = [row("a", [0.50, 0.52, 0.54]), row("b", [0.40, 0.41, 0.42]), row("c", [0.9], status="pruned")]
    chosen = select_best(rows, 3)
    assert chosen.row["trial"] == "a"
    # s.e. of a: stdev([.50, .52, .54]) / sqrt(3) = 0.02 / 1.732 = 0.011547
    assert chosen.lower_bound == pytest.approx(0.52 - 0.02 / math.sqrt(3))
    assert {c["trial"] for c in chosen.candidates} == {"a", "b"}  # pruned trials are not eligible


def test_select_best_breaks_a_near_tie_by_the_lower_bound() -> None:
    """a: mean 0.52, s.e. 0.0462 (noisy folds); b: mean 0.51, s.e. 0.0058: b is within one s.e. of a and has the
    better lower bound (0.5042 vs 0.4738), so b is chosen rather than the single best mean."""
    from orchestration.promote import select_best

    chosen = select_best([row("a", [0.44, 0.52, 0.60]), row("b", [0.50, 0.51, 0.52])], 3)
    assert chosen.row["trial"] == "b"
    assert chosen.lower_bound == pytest.approx(0.51 - 0.01 / math.sqrt(3))
    assert "lower bound" in chosen.reason


def test_select_best_without_a_completed_trial_is_an_error() -> None:
    from orchestration.promote import PromotionError, select_best

    with pytest.raises(PromotionError, match="no completed trial"):
        select_best([row("a", [0.5], status="pruned"), row("b", [], status="failed")], 3)


def test_paired_gate_by_hand() -> None:
    """Differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.4641 on 2 d.f., one-sided
    p = 0.0371; against min_delta 0.2 the same differences give t = 0, p = 0.5."""
    from orchestration.promote import paired_gate

    champion = [0.3, 0.4, 0.5, math.nan]
    candidate = [0.4, 0.6, 0.8, 0.9]  # the NaN image is left out
    win = paired_gate(candidate, champion, min_delta=0.0, alpha=0.05)
    assert win.promote and win.images == 3
    assert win.mean_difference == pytest.approx(0.2)
    assert win.t_statistic == pytest.approx(0.2 / (0.1 / math.sqrt(3)))
    assert win.p_value == pytest.approx(0.03709, abs=1e-4)
    lose = paired_gate(candidate, champion, min_delta=0.2, alpha=0.05)
    assert not lose.promote and lose.t_statistic == pytest.approx(0.0) and lose.p_value == pytest.approx(0.5)
    assert "does not beat" in lose.reason
    same = paired_gate([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert not same.promote and same.p_value == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_gate([0.1], [0.1, 0.2])


def test_baseline_check_refuses_a_score_that_does_not_beat_the_all_background_miou() -> None:
    from orchestration.promote import baseline_check

    below = baseline_check(0.108, 0.129, metric="miou_seg_msf")
    assert not below.passed and (below.score, below.baseline, below.margin) == (0.108, 0.129, 0.0)
    assert "0.1080" in below.reason and "0.1290" in below.reason and "miou_seg_msf" in below.reason
    assert not baseline_check(0.129, 0.129, metric="miou_seg_msf").passed  # a tie does not beat it
    above = baseline_check(0.45, 0.129, metric="miou_seg_msf")
    assert above.passed and "beats" in above.reason
    # a margin: the score must exceed the baseline by more than it (negative: a little below passes)
    assert not baseline_check(0.2, 0.129, metric="miou_seg", margin=0.1).passed
    assert baseline_check(0.12, 0.129, metric="miou_seg", margin=-0.01).passed
    # no score (no labelled pixel): nothing shows that the model beats the floor
    assert not baseline_check(math.nan, math.nan, metric="miou_seg").passed


def test_cv_drop_warning_after_three_sample_stds() -> None:
    """Folds 0.50, 0.52, 0.54: mean 0.52, sample std (ddof 1) 0.02, so the line is 0.52 - 3 x 0.02 = 0.46."""
    from orchestration.promote import cv_drop_warning

    folds = [0.50, 0.52, 0.54]
    text = cv_drop_warning(0.44, folds, metric="miou_seg_msf")
    assert text is not None
    assert "0.4400" in text and "0.5200" in text and "0.0200" in text and "4.0 fold std" in text
    assert cv_drop_warning(0.47, folds, metric="miou_seg_msf") is None
    assert cv_drop_warning(0.60, folds, metric="miou_seg_msf") is None  # above the mean: no warning
    # one fold has no std: no warning; identical folds: any drop is more than 3 x 0
    assert cv_drop_warning(0.1, [0.5], metric="miou_seg") is None
    assert cv_drop_warning(0.49, [0.5, 0.5], metric="miou_seg") is not None
    assert cv_drop_warning(0.5, [0.5, 0.5], metric="miou_seg") is None
    assert cv_drop_warning(math.nan, folds, metric="miou_seg") is None


def test_scoring_progress_lines_without_a_terminal() -> None:
    """A line at most every 10 s (by the given clock), none for the finished protocol (its score line follows)."""
    from orchestration.promote import ScoringProgress

    times = iter([0.0, 4.0, 10.0, 15.0, 21.0, 40.0])
    lines: list[str] = []
    progress = ScoringProgress("candidate multi-scale + flip", lines.append, bar=False, clock=lambda: next(times))
    for done in (16, 32, 48, 64, 100):  # at 4, 10, 15, 21 and 40 s
        progress(done, 100)
    progress.close()
    assert lines == ["candidate multi-scale + flip: 32/100 images (10 s)",
                     "candidate multi-scale + flip: 64/100 images (21 s)"]


def test_scoring_progress_bar_on_a_terminal(capsys: pytest.CaptureFixture) -> None:
    from orchestration.promote import ScoringProgress

    times = iter([0.0, 3.0, 7.0])
    lines: list[str] = []
    progress = ScoringProgress("champion v1 single scale", lines.append, bar=True, clock=lambda: next(times))
    progress(50, 100)
    progress(100, 100)
    progress.close()
    err = capsys.readouterr().err
    assert lines == []  # the bar replaces the lines
    assert err.startswith("\r[" + "#" * 15 + "." * 15 + "] 50/100 champion v1 single scale (3 s)")
    assert "\r[" + "#" * 30 + "] 100/100 champion v1 single scale (7 s)" in err and err.endswith("\n")


SIGNATURE_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("always")
import mlflow
from mlflow.models import get_model_info
from orchestration.promote import _log_pyfunc
from cpews.training.checkpoint import file_sha256
weights, image, store = sys.argv[1:4]
mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
experiment = mlflow.create_experiment("signature", artifact_location=f"{store}/artifacts")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with mlflow.start_run(experiment_id=experiment):
        info = _log_pyfunc(weights, file_sha256(weights), ["background", "ball", "kite", "boat", "car", "bus",
                           "house"], "sweep", "t00")
    version = mlflow.register_model(info.model_uri, "cpews-signature")
    signature = get_model_info(f"models:/cpews-signature/{version.version}").signature
    model = mlflow.pyfunc.load_model(f"models:/cpews-signature/{version.version}")
    (labels,) = model.predict([image])
    try:
        model.predict(image)  # a bare path, not a list: refused by MLflow against the type hint
        refused = ""
    except mlflow.exceptions.MlflowException as exc:
        refused = exc.message
print(json.dumps({"inputs": signature.inputs.to_dict(), "outputs": signature.outputs.to_dict(),
                  "warnings": [str(w.message) for w in caught], "shape": list(labels.shape),
                  "dtype": str(labels.dtype), "refused": refused}))
"""


def test_the_registered_model_has_a_signature_and_no_type_hint_warning(make_micro_config, synthetic_data_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Log the pyfunc as `promote` does (an untrained micro model) into a SQLite store, register it, read its
    signature back and predict, in a fresh process: inputs strings (paths), outputs any, no MLflow warning
    about type hints (on stderr or as a Python warning)."""
    import torch

    from cpews.evaluation.infer import load_model, read_rgb, segment_image
    from cpews.model import build_model
    from cpews.training.checkpoint import save_checkpoint
    from cpews.training.data import class_names

    cfg = make_micro_config()
    names = class_names(cfg)
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "weights.pt", cfg=cfg, iteration=0, model=build_model(cfg, len(names) - 1),
                              optimizer=None, class_names=names)
    image = sorted((synthetic_data_dir / "JPEGImages").glob("*.png"))[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-c", SIGNATURE_SCRIPT, str(weights), str(image), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["inputs"] == [{"type": "string", "required": True}]  # one path per row
    assert report["outputs"] == [{"type": "any", "required": True}]
    assert not [w for w in report["warnings"] if "type hint" in w.lower()], report["warnings"]
    assert "type hint" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert "Expected list, but got str" in report["refused"]
    rgb = read_rgb(image)
    assert report["shape"] == list(rgb.shape[:2]) and report["dtype"] == "uint8"
    assert segment_image(load_model(weights), rgb).shape == rgb.shape[:2]


def cpews(*args, env: dict, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def promoted(synthetic_data_dir: Path, mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smoke sweep logged to the server, then promotions of it: the first (no champion), one that must beat
    the champion by a whole mIoU point (loses), one that must beat the all-background mIoU by a whole point
    (refused: nothing registered), and that one again with --force and a champion margin of -1 (wins).

    A smoke model's score sits near the all-background mIoU, on either side of it; the baseline margins make
    the check's outcome certain: -1 always passes, +1 never does."""
    mlflow_server.start()
    work = tmp_path_factory.mktemp("promote")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    run_dir = work / "runs"
    model = "cpews-test"
    sweep = cpews("sweep", "run", "demo", "--smoke", "--name", "promo", "--run-dir", run_dir, env=env)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    decisions, versions = [], []
    for margin, baseline_margin, extra in (("0", "-1", ()), ("1.0", "-1", ()), ("-1.0", "1", ()),
                                           ("-1.0", "1", ("--force",))):
        proc = cpews("promote", "promo", "--json", "--model-name", model, "--min-delta", margin,
                     "--baseline-margin", baseline_margin, *extra, "--run-dir", run_dir, env=env)
        refused = baseline_margin == "1" and not extra
        assert proc.returncode == (1 if refused else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
        decisions.append({**json.loads(proc.stdout), "stderr": proc.stderr})
        versions.append(len(MlflowClient(mlflow_server.uri).search_model_versions(f"name='{model}'")))
    return {"env": env, "run_dir": run_dir, "model": model, "decisions": decisions, "versions": versions,
            "uri": mlflow_server.uri, "work": work}


@pytest.mark.ray
def test_promotions_move_the_champion_only_through_the_gate(promoted: dict) -> None:
    from mlflow.tracking import MlflowClient

    first, lost, _refused, won = promoted["decisions"]
    assert (first["promoted"], first["version"], first["champion_version_before"]) == (True, "1", None)
    assert first["reason"] == "first promotion: no champion to beat"
    assert set(first["heldout"]) >= {"miou_seg", "miou_seg_msf", "miou_seg_crf"}
    assert (lost["promoted"], lost["version"], lost["champion_version_before"]) == (False, "2", "1")
    assert "does not beat" in lost["reason"] and lost["gate"]["min_delta"] == 1.0
    # the same configuration refit on the same data gives the same model (deterministic CPU training): every
    # per-image difference is 0, so the gate's t is -inf (JSON null) against a margin of +1 and +inf against -1
    assert lost["gate"]["mean_difference"] == 0.0 and lost["gate"]["std_difference"] == 0.0
    assert (lost["gate"]["t_statistic"], lost["gate"]["p_value"]) == (None, 1.0)
    assert (won["gate"]["mean_difference"], won["gate"]["p_value"]) == (0.0, 0.0)
    assert (won["promoted"], won["version"], won["champion_version_before"]) == (True, "3", "1")
    # the same configuration refit three times on the same data: the same held-out scores (deterministic CPU)
    assert lost["heldout"]["miou_seg_msf"] == pytest.approx(first["heldout"]["miou_seg_msf"])
    assert lost["champion_heldout"]["miou_seg_msf"] == pytest.approx(first["heldout"]["miou_seg_msf"])

    client = MlflowClient(promoted["uri"])
    assert client.get_model_version_by_alias(promoted["model"], "champion").version == "3"
    tags = {v: client.get_model_version(promoted["model"], v).tags for v in ("1", "2", "3")}
    assert [tags[v]["gate_verdict"] for v in ("1", "2", "3")] == ["promoted", "rejected", "promoted"]
    assert tags["2"]["champion_compared"] == "1" and tags["3"]["champion_compared"] == "1"
    for v in ("1", "2", "3"):
        assert tags[v]["source_sweep"] == "promo" and tags[v]["source_trial"] == first["candidate"]["trial"]
        assert len(tags[v]["weights_sha256"]) == 64
        baseline = float(tags[v]["heldout_baseline_miou_seg_msf"])  # a tag: 6 decimals
        assert baseline == pytest.approx(first["heldout"]["baseline_miou"], abs=1e-6)
    assert [tags[v]["baseline_check"] for v in ("1", "2", "3")] == ["passed", "passed", "forced"]
    import mlflow
    from mlflow.models import get_model_info

    mlflow.set_tracking_uri(promoted["uri"])
    signature = get_model_info(f"models:/{promoted['model']}@champion").signature  # from predict's type hints
    assert signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert signature.outputs.to_dict() == [{"type": "any", "required": True}]
    # scoring is announced, then reported per protocol (no silent minute); no MLflow type-hint warning
    assert "candidate: scoring " in first["stderr"] and "champion v1: scoring " in lost["stderr"]
    assert all("type hint" not in decision["stderr"].lower() for decision in promoted["decisions"])


@pytest.mark.ray
def test_promotion_reports_the_all_background_miou_of_the_held_out_images(promoted: dict) -> None:
    from cpews.metrics import all_background_confusion, segmentation_scores
    from cpews.training import load_checkpoint
    from cpews.training.data import class_names, eval_dataset, resolve_data_root

    first = promoted["decisions"][0]
    heldout = first["heldout"]
    # the floor depends on the held-out masks only: the same for every protocol, and recomputed here from the
    # masks of the refit's held-out split
    weights = sorted((promoted["run_dir"] / "sweeps" / "promo" / "promotions").glob("*/weights.pt"))[0]
    cfg = load_checkpoint(weights).cfg
    dataset = eval_dataset(cfg, resolve_data_root(cfg))
    assert len(dataset) == heldout["images"]
    confusion = sum(all_background_confusion(dataset[i]["mask"], len(class_names(cfg))) for i in range(len(dataset)))
    expected = segmentation_scores(confusion).miou
    for protocol in ("miou_seg", "miou_seg_msf", "miou_seg_crf"):
        assert heldout[f"baseline_{protocol}"] == pytest.approx(expected), protocol
    assert heldout["baseline_miou"] == pytest.approx(expected)
    assert first["baseline_check"]["baseline"] == pytest.approx(expected)
    assert first["baseline_check"]["score"] == pytest.approx(heldout["miou_seg_msf"])  # the gate's protocol
    assert (first["baseline_check"]["passed"], first["forced"]) == (True, False)
    assert isinstance(first["warnings"], list)
    assert first["candidate"]["baseline_miou"] is not None  # the mean over the trial's folds


@pytest.mark.ray
def test_a_candidate_below_the_baseline_is_refused_unless_forced(promoted: dict) -> None:
    first, _, refused, forced = promoted["decisions"]
    # refused: exit 1, a clear error line with both numbers, nothing registered, @champion untouched
    assert (refused["promoted"], refused["refused"], refused["version"]) == (False, True, None)
    assert promoted["versions"] == [1, 2, 2, 3]
    check = refused["baseline_check"]
    assert not check["passed"] and check["margin"] == 1.0
    error = [line for line in refused["stderr"].splitlines() if line.startswith("cpews promote: error: ")]
    assert len(error) == 1, refused["stderr"][-3000:]
    assert f"{check['score']:.4f}" in error[0] and f"{check['baseline']:.4f}" in error[0]
    assert "--force" in error[0] and "Traceback" not in refused["stderr"]
    assert refused["heldout"]["miou_seg_msf"] == pytest.approx(first["heldout"]["miou_seg_msf"])
    # --force: the same candidate goes on to the gate, and says that it was forced
    assert (forced["forced"], forced["refused"], forced["version"], forced["promoted"]) == (True, False, "3", True)
    assert not forced["baseline_check"]["passed"]
    assert "forced" in forced["stderr"]


@pytest.mark.ray
def test_champion_predicts_in_a_fresh_process_and_via_cpews_infer(promoted: dict, synthetic_data_dir: Path) -> None:
    from cpews.evaluation.infer import load_model, read_rgb, segment_image

    images = sorted((synthetic_data_dir / "JPEGImages").glob("*.png"))[:3]
    script = (
        "import json, sys, mlflow, numpy as np\n"
        f"m = mlflow.pyfunc.load_model('models:/{promoted['model']}@champion')\n"
        "out = m.predict(sys.argv[1:])\n"
        "np.save('labels.npy', np.stack(out))\n"
        "print(json.dumps([list(a.shape) for a in out]))\n"
    )
    work = promoted["work"]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, images)], cwd=work, env=promoted["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "type hint" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [list(read_rgb(p).shape[:2]) for p in images]
    labels = np.load(work / "labels.npy")
    weights = next((promoted["run_dir"] / "sweeps" / "promo" / "promotions").glob("*/weights.pt"))
    reference = load_model(weights)
    for image, got in zip(images, labels):
        np.testing.assert_array_equal(got, segment_image(reference, read_rgb(image)))

    out = work / "infer"
    proc = cpews("infer", "--model", f"models:/{promoted['model']}@champion", *images, "--out", out,
                 env=promoted["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "type hint" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert len(list(out.glob("*.png"))) == 2 * len(images)


@pytest.mark.ray
def test_a_tampered_weights_file_is_refused_at_load(promoted: dict, tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(promoted["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{promoted['model']}/1", dst_path=str(tmp_path)))
    weights = next(local.rglob("weights.pt"))
    assert mlflow.pyfunc.load_model(str(local)) is not None  # intact: loads
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    # (WeightsIntegrityError of the model's own copy of pyfunc_model.py, a ValueError)
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        mlflow.pyfunc.load_model(str(local))
    shutil.rmtree(local)

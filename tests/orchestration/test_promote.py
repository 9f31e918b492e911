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


def cpews(*args, env: dict, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def promoted(synthetic_data_dir: Path, mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smoke sweep logged to the server, then three promotions of it: the first (no champion), one that
    must beat the champion by a whole mIoU point (loses), one with a margin of -1 (wins over the champion)."""
    mlflow_server.start()
    work = tmp_path_factory.mktemp("promote")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    run_dir = work / "runs"
    model = "cpews-test"
    sweep = cpews("sweep", "run", "demo", "--smoke", "--name", "promo", "--run-dir", run_dir, env=env)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    decisions = []
    for margin in ("0", "1.0", "-1.0"):
        proc = cpews("promote", "promo", "--json", "--model-name", model, "--min-delta", margin,
                     "--run-dir", run_dir, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        decisions.append(json.loads(proc.stdout))
    return {"env": env, "run_dir": run_dir, "model": model, "decisions": decisions, "uri": mlflow_server.uri,
            "work": work}


@pytest.mark.ray
def test_promotions_move_the_champion_only_through_the_gate(promoted: dict) -> None:
    from mlflow.tracking import MlflowClient

    first, lost, won = promoted["decisions"]
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

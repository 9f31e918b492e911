"""Promotion: the best configuration of a sweep, refit on the whole training split, scored on the held-out
split, logged as an MLflow model, registered, and made `@champion` only when it beats the current champion.

Steps of `promote(sweep)`:
1. Select: among the sweep's completed trials, the best mean fold score; near-ties (within one standard error
   of the best) are broken by the lower confidence bound mean - z * std / sqrt(k) (`select_best`).
2. Refit: train that configuration on the whole training split, as a Ray task (its progress lines are
   forwarded to this process), into `runs/sweeps/<sweep>/promotions/<time>-<trial>/`.
3. Evaluate on the held-out split (the config's `data.val_split`, never seen by the search): single scale,
   multi-scale + flip (§9.3) and with the dense CRF, with per-image mIoU for the gate, beside the mIoU of
   predicting background everywhere on the same images (`baseline_miou`), with a progress bar on a terminal
   (`ScoringProgress`; a line every `PROGRESS_LINE_EVERY_S` otherwise). A candidate whose score (protocol
   `metric`) does not beat that floor is refused (`baseline_check`, `PromotionRefused`): nothing is logged or
   registered, unless `force`. A held-out score more than `CV_DROP_STDS` fold stds below the trial's CV mean
   is a warning (`cv_drop_warning`).
4. Log an MLflow run (under the sweep's run) with the scores and the model: a pyfunc logged as code
   (`orchestration/pyfunc_model.py`) holding the weights (sha256 checked at load), the flat config and the class
   names; register it as a new version of the registered model (default `cpews`).
5. Gate (`paired_gate`): the current champion is scored on the same images; the new version gets the alias
   `champion` only when its per-image mIoU beats the champion's by at least `min_delta` (paired one-sided t test
   at level `alpha`). The first promotion has no champion to beat. The decision is tagged on the version.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from orchestration.kfold import fold_std

__all__ = [
    "BASELINE_KEYS",
    "CHAMPION_ALIAS",
    "CV_DROP_STDS",
    "DEFAULT_MODEL_NAME",
    "GATE_METRICS",
    "BaselineCheck",
    "GateResult",
    "PromotionError",
    "PromotionRefused",
    "ScoringProgress",
    "Selection",
    "baseline_check",
    "cv_drop_warning",
    "latest_sweep",
    "paired_gate",
    "promote",
    "select_best",
]

DEFAULT_MODEL_NAME = "cpews"
CHAMPION_ALIAS = "champion"
# held-out protocols: single scale at eval.size, §9.3 multi-scale + flip, §9.3 + dense CRF
GATE_METRICS = {"seg": "miou_seg", "seg_msf": "miou_seg_msf", "seg_crf": "miou_seg_crf"}
# the all-background mIoU of the images each protocol scored: baseline_miou_seg, baseline_miou_seg_msf, ...
BASELINE_KEYS = {name: f"baseline_{key}" for name, key in GATE_METRICS.items()}
CV_DROP_STDS = 3.0  # warn when the held-out score falls more than this many fold stds below the CV mean
PROGRESS_LINE_EVERY_S = 10.0  # without a terminal, a scoring progress line at most this often
PROTOCOL_NAMES = {"seg": "single scale", "seg_msf": "multi-scale + flip", "seg_crf": "multi-scale + flip + CRF"}
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
Printer = Callable[[str], None]


class PromotionError(RuntimeError):
    """Nothing can be promoted (no completed trial, unknown sweep, ...)."""


class PromotionRefused(PromotionError):
    """The candidate does not beat the all-background mIoU of the held-out images; nothing was registered.

    Attributes:
        decision: the report so far (candidate, held-out scores, `baseline_check`), as `promote` returns it.
    """

    def __init__(self, message: str, decision: dict[str, Any]) -> None:
        super().__init__(message)
        self.decision = decision


class Selection(NamedTuple):
    row: dict[str, Any]  # the chosen leaderboard row
    lower_bound: float  # its mean - z * standard error
    reason: str
    candidates: list[dict[str, Any]]  # trial, mean, std, se, lower_bound of every completed trial


class GateResult(NamedTuple):
    promote: bool
    reason: str
    images: int
    mean_difference: float  # mean over images of candidate - champion per-image mIoU
    std_difference: float
    t_statistic: float  # of (mean_difference - min_delta), n - 1 degrees of freedom
    p_value: float  # one-sided: P(T >= t) under mean difference = min_delta
    min_delta: float
    alpha: float


class BaselineCheck(NamedTuple):
    passed: bool  # score - baseline > margin
    score: float  # the candidate's held-out mIoU (the gate's protocol)
    baseline: float  # the mIoU of predicting background everywhere on the same images
    margin: float
    reason: str


def baseline_check(score: float, baseline: float, *, metric: str, margin: float = 0.0) -> BaselineCheck:
    """Does the held-out `score` beat the all-background mIoU of the same images by more than `margin`?

    A tie does not beat it, and neither does a missing (NaN) score.
    """
    floor = "the all-background mIoU of the same images"
    plus = f" by more than {margin:+.4f}" if margin else ""
    if not (math.isfinite(score) and math.isfinite(baseline)):
        return BaselineCheck(False, score, baseline, margin,
                             f"no held-out {metric} to compare with {floor} (score {score}, baseline {baseline})")
    passed = score - baseline > margin
    verb = "beats" if passed else "does not beat"
    return BaselineCheck(passed, score, baseline, margin,
                         f"held-out {metric} {score:.4f} {verb} {floor} ({baseline:.4f}){plus}")


def cv_drop_warning(heldout: float, fold_scores: Sequence[float], *, metric: str,
                    max_stds: float = CV_DROP_STDS) -> str | None:
    """A warning when `heldout` falls more than `max_stds` fold standard deviations below the mean fold score.

    The std is `orchestration.kfold.fold_std` (sample, ddof 1) of `fold_scores`; with fewer than two finite
    fold scores there is none and no warning. Identical fold scores (std 0) make any drop a warning.
    """
    scores = [float(s) for s in fold_scores if s is not None and math.isfinite(float(s))]
    if len(scores) < 2 or not math.isfinite(heldout):
        return None
    mean, std = statistics.fmean(scores), fold_std(scores)
    if heldout >= mean - max_stds * std:
        return None
    drop = mean - heldout
    how_far = f"{drop / std:.1f} fold stds" if std > 0 else "the folds scored identically"
    return (f"held-out {metric} {heldout:.4f} is {drop:.4f} ({how_far}) below the trial's CV mean {mean:.4f} "
            f"(fold std {std:.4f} over {len(scores)} folds; the line is {max_stds:g} stds): the cross-validated "
            "score did not carry over to the held-out images")


def select_best(rows: Sequence[Mapping[str, Any]], k: int, *, mode: str = "max", z: float = 1.0) -> Selection:
    """The completed trial to promote (see the module docstring); rows as `leaderboard_rows` returns them.

    Raises:
        PromotionError: no completed trial with a score.
    """
    sign = 1.0 if mode == "max" else -1.0
    scored = []
    for row in rows:
        if row.get("status") != "completed" or row.get("cv_miou_mean") is None:
            continue
        scores = [float(s) for s in row.get("fold_scores") or []]
        std = fold_std(scores) if len(scores) > 1 else float(row.get("cv_miou_std") or 0.0)
        se = std / math.sqrt(max(1, len(scores) or k))
        mean = float(row["cv_miou_mean"])
        scored.append({"trial": row["trial"], "mean": mean, "std": std, "se": se,
                       "lower_bound": mean - sign * z * se, "row": row})
    if not scored:
        raise PromotionError("the sweep has no completed trial to promote (pruned and failed trials are not eligible)")
    best = max(scored, key=lambda c: sign * c["mean"])
    near = [c for c in scored if sign * (best["mean"] - c["mean"]) <= best["se"]]
    chosen = max(near, key=lambda c: (sign * c["lower_bound"], sign * c["mean"]))
    if len(near) == 1:
        reason = f"best mean fold score {chosen['mean']:.4f} (± {chosen['se']:.4f} s.e.)"
    else:
        others = ", ".join(c["trial"] for c in near if c is not chosen)
        reason = (f"{len(near)} trials within one standard error of the best mean ({best['mean']:.4f}); "
                  f"{chosen['trial']} has the best lower bound {chosen['lower_bound']:.4f} (vs {others})")
    candidates = [{k: v for k, v in c.items() if k != "row"} for c in scored]
    return Selection(dict(chosen["row"]), chosen["lower_bound"], reason, candidates)


def paired_gate(candidate: Sequence[float], champion: Sequence[float], *, min_delta: float = 0.0,
                alpha: float = 0.05) -> GateResult:
    """Does the candidate beat the champion by at least `min_delta` per image? (paired one-sided t test)

    Images where either score is NaN (no labelled pixel) are left out. The test's null hypothesis is a mean
    per-image difference of `min_delta`; the candidate wins when p < alpha (so its mean difference exceeds
    min_delta by more than chance explains).
    """
    from scipy import stats

    if len(candidate) != len(champion):
        raise ValueError(f"paired scores differ in length: {len(candidate)} vs {len(champion)}")
    diffs = [a - b for a, b in zip(candidate, champion) if math.isfinite(a) and math.isfinite(b)]
    n = len(diffs)
    if n < 2:
        return GateResult(False, f"only {n} image(s) with scores on both models: no comparison", n,
                          math.nan, math.nan, math.nan, math.nan, min_delta, alpha)
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    if std == 0.0:
        t = math.inf if mean > min_delta else (-math.inf if mean < min_delta else 0.0)
        p = 0.0 if mean > min_delta else 1.0
    else:
        t = (mean - min_delta) / (std / math.sqrt(n))
        p = float(stats.t.sf(t, df=n - 1))
    win = p < alpha
    if win:
        reason = (f"beats the champion: mean per-image mIoU difference {mean:+.4f} > min_delta {min_delta:+.4f} "
                  f"(paired t = {t:.2f}, p = {p:.3g} < {alpha}, n = {n})")
    else:
        reason = (f"does not beat the champion by min_delta {min_delta:+.4f}: mean per-image mIoU difference "
                  f"{mean:+.4f} (paired t = {t:.2f}, p = {p:.3g} >= {alpha}, n = {n})")
    return GateResult(win, reason, n, mean, std, t, p, min_delta, alpha)


def latest_sweep(run_dir: Path) -> str:
    """The most recently started sweep under `run_dir` (by its state file)."""
    sweeps = sorted((run_dir / "sweeps").glob("*/state.json"), key=lambda p: json.loads(p.read_text())["created"])
    if not sweeps:
        raise PromotionError(f"no sweep in {run_dir / 'sweeps'}; run one first (make sweep)")
    return sweeps[-1].parent.name


def _refit_task(flat: dict[str, Any], out_dir: str, threads: int) -> dict[str, Any]:
    """Ray task body: train the config on the whole training split (progress lines go to the driver)."""
    import torch

    from cpews.config import TrainConfig
    from cpews.training import train

    torch.set_num_threads(max(1, threads))
    cfg = TrainConfig.from_flat_dict(flat)
    print(f"refit: training {cfg.optim.max_iters} iterations on the whole {cfg.data.train_split} split", flush=True)
    result = train(cfg, out_dir=out_dir, progress=False)
    return {"checkpoint": str(result.checkpoint), "iterations": result.iterations, "wall_time": result.wall_time,
            "metrics": result.metrics}


class ScoringProgress:
    """`evaluate`'s `progress` callback while scoring held-out images: a bar on stderr when `bar` (a terminal,
    `cpews.training.progress.ProgressDisplay`), else a line through `out` at most every `every_s` seconds (the
    finished protocol is reported by its score line, not here)."""

    def __init__(self, title: str, out: Printer, *, bar: bool, every_s: float = PROGRESS_LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.title, self.out, self.bar, self.every_s, self.clock = title, out, bar, every_s, clock
        self.started = self.last = clock()
        self.display: Any = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.bar:
            if self.display is None:
                from cpews.training.progress import ProgressDisplay

                self.display = ProgressDisplay(total, True)
            self.display.update(done, f"{self.title} ({now - self.started:.0f} s)")
        elif done < total and now - self.last >= self.every_s:
            self.last = now
            self.out(f"{self.title}: {done}/{total} images ({now - self.started:.0f} s)")

    def close(self) -> None:
        """End the bar's line (nothing to do for lines)."""
        if self.display is not None:
            self.display.close()


def _evaluate_heldout(loaded: Any, cfg: Any, data_root: Path, split: str, out: Printer, label: str) -> dict[str, Any]:
    """Held-out scores of a loaded model: single scale, multi-scale + flip, + CRF; per-image mIoU of each."""
    import torch

    from cpews.evaluation import evaluate
    from cpews.training.data import eval_dataset

    dataset = eval_dataset(cfg, data_root, split=split)
    device = next(loaded.model.parameters()).device
    scores: dict[str, Any] = {"images": len(dataset), "split": split, "per_image": {}}
    protocols = {"seg": {"final_protocol": False}, "seg_msf": {"final_protocol": True, "cams": False},
                 "seg_crf": {"final_protocol": True, "crf": True, "cams": False}}  # CAM scores once, in "seg"
    out(f"{label}: scoring {len(dataset)} held-out {split} images, {len(protocols)} protocols "
        f"({', '.join(PROTOCOL_NAMES[name] for name in protocols)})")
    with torch.no_grad():
        for name, options in protocols.items():
            started = time.perf_counter()
            progress = ScoringProgress(f"{label} {PROTOCOL_NAMES[name]}", out, bar=sys.stderr.isatty())
            try:
                result = evaluate(loaded.model, dataset, loaded.cfg, class_names=loaded.class_names,
                                  device=device, data_root=data_root, per_image=True, progress=progress, **options)
            finally:
                progress.close()
            key = "miou_seg_crf" if name == "seg_crf" else "miou_seg"
            scores[GATE_METRICS[name]] = result.metrics[key]
            scores[BASELINE_KEYS[name]] = result.metrics["baseline_miou"]
            scores["per_image"][GATE_METRICS[name]] = result.per_image[key]
            scores["per_image"]["baseline_miou"] = result.per_image["baseline_miou"]
            scores["ids"] = result.per_image["ids"]
            if name == "seg":
                scores.update({k: result.metrics[k] for k in ("miou_cam", "miou_pseudo") if k in result.metrics})
            out(f"{label}: held-out {split} {GATE_METRICS[name]} = {scores[GATE_METRICS[name]]:.4f} "
                f"(all-background {scores[BASELINE_KEYS[name]]:.4f}; {time.perf_counter() - started:.1f} s)")
    return scores


def promote(
    sweep: str | None = None,
    *,
    run_dir: Path = Path("runs"),
    model_name: str = DEFAULT_MODEL_NAME,
    metric: str = "seg_msf",
    min_delta: float = 0.0,
    alpha: float = 0.05,
    baseline_margin: float = 0.0,
    force: bool = False,
    dry_run: bool = False,
    out: Printer = print,
    address: str | None = None,
) -> dict[str, Any]:
    """Promote the best configuration of `sweep` (default: the latest sweep); returns the decision.

    Args:
        baseline_margin: the held-out score (protocol `metric`) must beat the all-background mIoU of the same
            images by more than this.
        force: go on (and say so on the version) when it does not.

    Raises:
        PromotionRefused: the candidate does not beat the all-background mIoU and `force` is not set.
        PromotionError: unknown sweep, no completed trial, unknown metric.
    """
    from orchestration.sweep import SweepError, _read_spec, load_leaderboard, sweep_paths

    # MLflow's "Downloading artifacts" bar while it logs and registers the model is not this command's progress
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if metric not in GATE_METRICS:
        raise PromotionError(f"--metric {metric!r} is not one of {', '.join(GATE_METRICS)}")
    run_dir = Path(run_dir)
    named = f"sweep {sweep}"
    if sweep is None:  # say which one, here and in every refusal
        sweep = latest_sweep(run_dir)
        named = f"sweep {sweep} (the latest in {run_dir / 'sweeps'}; no sweep named)"
        out(f"promote: no sweep named: the latest sweep in {run_dir / 'sweeps'} is {sweep}")
    try:
        rows = load_leaderboard(sweep, run_dir=run_dir)
    except SweepError as exc:
        raise PromotionError(str(exc)) from None
    paths = sweep_paths(run_dir, sweep)
    spec = _read_spec(paths)
    state = json.loads(paths.state.read_text())
    try:
        selection = select_best(rows, spec.folds.k, mode=spec.objective.mode)
    except PromotionError as exc:
        raise PromotionError(f"{named}: {exc}") from None
    row = selection.row
    out(f"sweep {sweep}: promoting trial {row['trial']}: {selection.reason}")
    out(f"  params: {json.dumps(row['params'], sort_keys=True)}")
    if row.get("baseline_miou") is not None:
        out(f"  cv mIoU {row['cv_miou_mean']:.4f}; all-background mIoU of its folds' images "
            f"{row['baseline_miou']:.4f}")
    decision: dict[str, Any] = {
        "sweep": sweep, "model_name": model_name, "metric": GATE_METRICS[metric], "dry_run": dry_run,
        "candidate": {"trial": row["trial"], "params": row["params"], "cv_miou_mean": row["cv_miou_mean"],
                      "cv_miou_std": row["cv_miou_std"], "fold_scores": row["fold_scores"],
                      "baseline_miou": row.get("baseline_miou"),
                      "lower_bound": selection.lower_bound, "selection": selection.reason},
        "candidates": selection.candidates,
    }
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = state["tracking_uri"]
    mlflow.set_tracking_uri(uri)  # the sweep's store holds the registry too
    client = MlflowClient(uri)
    champion_version = _champion_version(client, model_name)
    decision["champion_version_before"] = champion_version.version if champion_version else None
    if dry_run:
        out(f"dry run: would refit trial {row['trial']} and compare it with "
            + (f"{model_name} version {champion_version.version} (@{CHAMPION_ALIAS})" if champion_version
               else "no champion (the first promotion)"))
        decision.update({"promoted": False, "version": None, "reason": "dry run: nothing trained or registered"})
        return decision

    from cpews.config import TrainConfig
    from cpews.evaluation import load_model
    from cpews.training import keys
    from cpews.training.checkpoint import file_sha256, save_checkpoint
    from orchestration.sweep import _ray_session

    cfg = spec.trial_config(row["params"])
    cfg = TrainConfig.from_flat_dict({"eval.every": 0, "proto.cache_dir": str(paths.pool_cache)}, base=cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = paths.root / "promotions" / f"{stamp}-{row['trial']}"
    if os.path.isdir(state["workdir"]):  # the config's relative paths are the sweep's
        os.chdir(state["workdir"])
    import ray

    with _ray_session(None, spec, address):
        task = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)(_refit_task)
        out(f"refit: a Ray task trains trial {row['trial']}'s configuration into {work}")
        refit = ray.get(task.remote(cfg.to_flat_dict(), str(work / "train"), max(1, round(spec.resources.cpu))))
    out(f"refit: done in {refit['wall_time']:.0f} s ({refit['iterations']} iterations)")

    loaded = load_model(refit["checkpoint"])
    weights = save_checkpoint(work / "weights.pt", cfg=loaded.cfg, iteration=loaded.iteration, model=loaded.model,
                              optimizer=None, class_names=loaded.class_names, metrics=refit["metrics"])
    sha = file_sha256(weights)
    from cpews.training.data import resolve_data_root

    data_root = resolve_data_root(cfg)
    split = cfg.data.val_split
    candidate_scores = _evaluate_heldout(loaded, cfg, data_root, split, out, "candidate")
    key = GATE_METRICS[metric]
    candidate_scores["baseline_miou"] = candidate_scores[BASELINE_KEYS[metric]]
    check = baseline_check(candidate_scores[key], candidate_scores["baseline_miou"], metric=key,
                           margin=baseline_margin)
    cv_warning = cv_drop_warning(candidate_scores[key], row["fold_scores"], metric=key)
    decision.update({"baseline_check": check._asdict(), "forced": False, "refused": False,
                     "warnings": [cv_warning] if cv_warning else [],
                     "heldout": {k: v for k, v in candidate_scores.items() if k not in ("per_image", "ids")}})
    out(f"baseline: {check.reason}")
    if cv_warning:
        out(f"warning: {cv_warning}")
    if not check.passed and not force:
        message = (f"refusing trial {row['trial']} of {named}: {check.reason}; nothing registered "
                   "(--force registers it anyway)")
        decision.update({"promoted": False, "refused": True, "version": None, "reason": message})
        report = {"candidate": candidate_scores, "decision": decision}
        (work / "evaluation.json").write_text(json.dumps(finite(report), indent=1, default=str))
        raise PromotionRefused(message, finite(decision))
    if not check.passed:
        decision["forced"] = True
        out(f"forced: {check.reason}; going on because of --force")
    champion_scores = None
    if champion_version is not None:
        champion = mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION_ALIAS}")  # verifies its sha256
        champion_scores = _evaluate_heldout(champion.unwrap_python_model().loaded, cfg, data_root, split, out,
                                            f"champion v{champion_version.version}")
        if champion_scores["ids"] != candidate_scores["ids"]:
            raise PromotionError("the champion and the candidate were not scored on the same images")
        gate = paired_gate(candidate_scores["per_image"][key], champion_scores["per_image"][key],
                           min_delta=min_delta, alpha=alpha)
    else:
        gate = GateResult(True, "first promotion: no champion to beat", candidate_scores["images"], math.nan,
                          math.nan, math.nan, math.nan, min_delta, alpha)
    out(f"gate: {gate.reason}")

    reported = (*GATE_METRICS.values(), *BASELINE_KEYS.values())
    heldout = {f"heldout/{name}": candidate_scores[name] for name in reported}
    cv = {keys.CV_MIOU_SEG_MEAN: row["cv_miou_mean"], keys.CV_MIOU_SEG_STD: row["cv_miou_std"] or 0.0}
    if row.get("baseline_miou") is not None:
        cv[keys.CV_BASELINE_MIOU_MEAN] = row["baseline_miou"]
    baseline_tag = "forced" if decision["forced"] else "passed"
    with mlflow.start_run(experiment_id=state["experiment_id"], run_name=f"promote {row['trial']}",
                          tags={"cpews.kind": "promotion", "cpews.sweep": sweep, "cpews.trial_id": row["trial"],
                                "mlflow.parentRunId": state["parent_run_id"], "cpews.baseline_check": baseline_tag,
                                **({"cpews.warning": cv_warning} if cv_warning else {})}) as run:
        mlflow.log_params(cfg.to_flat_dict())
        mlflow.log_metrics({**heldout, **cv})
        evaluation = {"candidate": candidate_scores, "champion": champion_scores, "gate": gate._asdict(),
                      "baseline_check": check._asdict(), "warnings": decision["warnings"]}
        (work / "evaluation.json").write_text(json.dumps(finite(evaluation), indent=1, default=str))
        mlflow.log_artifact(str(work / "evaluation.json"))
        info = _log_pyfunc(weights, sha, loaded.class_names, sweep, row["trial"])
        run_id = run.info.run_id
    version = mlflow.register_model(info.model_uri, model_name)
    tags = {
        "source_sweep": sweep, "source_trial": row["trial"], "source_run_id": run_id,
        "weights_sha256": sha, "cv_miou_mean": f"{row['cv_miou_mean']:.6f}",
        "cv_miou_std": f"{row['cv_miou_std'] or 0.0:.6f}", "gate_metric": GATE_METRICS[metric],
        "gate_verdict": "promoted" if gate.promote else "rejected", "gate_reason": gate.reason,
        "gate_t": f"{gate.t_statistic:.4f}", "gate_p": f"{gate.p_value:.4g}",
        "gate_mean_difference": f"{gate.mean_difference:.6f}", "gate_min_delta": f"{min_delta}",
        "champion_compared": champion_version.version if champion_version else "none",
        **{f"heldout_{GATE_METRICS[m]}": f"{candidate_scores[GATE_METRICS[m]]:.6f}" for m in GATE_METRICS},
        **{f"heldout_{BASELINE_KEYS[m]}": f"{candidate_scores[BASELINE_KEYS[m]]:.6f}" for m in GATE_METRICS},
        "baseline_check": baseline_tag, "baseline_reason": check.reason,
        "cv_drop_warning": cv_warning or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, str(value))
    if gate.promote:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
        out(f"{model_name} version {version.version} is now @{CHAMPION_ALIAS} (models:/{model_name}@{CHAMPION_ALIAS})")
    else:
        out(f"{model_name} version {version.version} registered; @{CHAMPION_ALIAS} stays on version "
            f"{champion_version.version if champion_version else '-'}")
    try:
        client.set_model_version_tag(model_name, version.version, "cpews.decided_at", stamp)
    except MlflowException:
        pass
    decision.update({
        "promoted": gate.promote, "version": version.version, "reason": gate.reason, "run_id": run_id,
        "model_uri": f"models:/{model_name}/{version.version}", "weights_sha256": sha,
        "heldout": {k: v for k, v in candidate_scores.items() if k not in ("per_image", "ids")},
        "champion_heldout": None if champion_scores is None else
        {k: v for k, v in champion_scores.items() if k not in ("per_image", "ids")},
        "gate": gate._asdict(),
    })
    return finite(decision)


def _log_pyfunc(weights: Path, sha: str, class_names: Sequence[str], sweep: str, trial: str) -> Any:
    """Log the pyfunc (as code) with the weights, their sha256 and the cpews source into the active run.

    The signature comes from `CpewsSegmenter.predict`'s type hints: inputs `list[str]` (a string per image),
    outputs `list[np.ndarray]`, which MLflow records as "any" (it has no array type) after an INFO line saying
    so; that line is dropped here, it would read as a failure.
    """
    import logging

    import mlflow

    signature_logger = logging.getLogger("mlflow.models.signature")
    output_note = _DropMessages("Failed to infer output type hint")
    signature_logger.addFilter(output_note)
    try:
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"weights": str(weights)},
            model_config={"weights_sha256": sha, "class_names": list(class_names), "crf": False,
                          "device": "auto", "sweep": sweep, "trial": trial},
            code_paths=[str(Path(__file__).resolve().parents[1] / "cpews")],
            pip_requirements=_requirements(),
        )
    finally:
        signature_logger.removeFilter(output_note)


class _DropMessages:
    """A logging filter that drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _champion_version(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _requirements() -> list[str]:
    from importlib.metadata import version

    packages = ["torch", "timm", "numpy", "pillow", "mlflow", "pydensecrf2"]
    out = []
    for package in packages:
        try:
            out.append(f"{package}=={version(package)}")
        except Exception:
            out.append(package)
    return out


def finite(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with NaN and infinities as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value

"""What a sweep's search learned, as files and in MLflow: `cpews sweep report NAME`, also made at the end of
every `cpews sweep run` / `resume`.

The report of sweep NAME is written to `<run_dir>/sweeps/NAME/report/` and logged to the sweep's MLflow run under
the artifact folder `report/`:

    importance.png            fANOVA parameter importance (Optuna's `FanovaImportanceEvaluator`) over the completed
                              trials; left out with fewer than `MIN_FANOVA_TRIALS` of them
    parallel_coordinates.png  the searched params of each trial against its objective
    history.png               best objective so far against compute (cumulative reserved CPU-seconds of the trials,
                              in the order their results arrived)
    fold_scores.png           each trial's fold scores, with the all-background mIoU of the same images as a line
    learning_curves.png       per fold: validation seg mIoU and training loss against iteration, for every trial
    report.html               one self-contained page: the figures (base64 data URIs), the importance table and a
                              table of the trials
    report.json               the same numbers for programs: importance, best trial, history

Inputs are the leaderboard rows (`orchestration.sweep.leaderboard_rows`) and what each trial reported to Tune
(`<sweep>/tune/trial_<id>/result.json`, one JSON object per report). The figures use matplotlib's object API with
the Agg canvas (no pyplot, no global backend); Optuna and MLflow are imported inside the functions that need them.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from cpews.training import keys
from orchestration.search_space import Distribution, SweepSpec
from orchestration.trial import (
    CV_BASELINE,
    CV_MEAN,
    CV_STD,
    FIRST_STEP_AT,
    FOLD_INDEX,
    FOLDS_COMPLETED,
)

__all__ = [
    "FIGURES",
    "MIN_FANOVA_TRIALS",
    "NOTE_TAG",
    "REPORT_DIR",
    "FoldCurves",
    "History",
    "Importance",
    "Report",
    "compute_history",
    "describe_experiment",
    "experiment_description",
    "fold_curves",
    "format_importance",
    "format_report",
    "log_report",
    "objective_value",
    "param_importance",
    "read_results",
    "write_report",
]

MIN_FANOVA_TRIALS = 8  # fANOVA's random forest on fewer completed trials ranks noise: below this, no importance
FANOVA_SEED = 0  # the evaluator's forest is random: a fixed seed gives the same table for the same trials
REPORT_DIR = "report"  # <sweep>/report/ on disk, and the artifact folder of the sweep's MLflow run
NOTE_TAG = "mlflow.note.content"  # MLflow's description of an experiment (or a run), shown in its UI
COLOURED_TRIALS = 10  # learning curves: the best trials get a colour and a legend entry, the others are grey
STRIP_TRIALS = 30  # fold scores: the best trials shown (a figure wide enough for more would not be read)
DPI = 110

FIGURES = {  # file -> caption (the HTML page and the artifact viewer show them in this order)
    "importance.png": "Parameter importance (fANOVA): the share of the objective's variance each searched "
                      "parameter explains, over the completed trials.",
    "parallel_coordinates.png": "Each trial's searched parameters and its objective (completed trials coloured "
                                "by it; pruned and other trials grey).",
    "history.png": "Best objective so far against compute: cumulative reserved CPU-seconds of the trials, in the "
                   "order their results arrived.",
    "fold_scores.png": "Fold scores (val/miou_seg) of each trial, best first, with the all-background mIoU of "
                       "the same images.",
    "learning_curves.png": "Learning curves per fold: validation seg mIoU and training loss against iteration, as "
                           "the trials reported them.",
}

# leaderboard row field of each key a trial reports (a sweep's objective is one of them)
_ROW_FIELDS = {CV_MEAN: "cv_miou_mean", CV_STD: "cv_miou_std", CV_BASELINE: "baseline_miou",
               FOLDS_COMPLETED: "folds_completed"}


class Importance(NamedTuple):
    """fANOVA parameter importance of a sweep."""

    values: dict[str, float]  # searched key -> share of the objective's variance (sums to 1), largest first
    trials: int  # the completed trials it rests on (or would have)
    note: str | None  # why it was not computed; None when `values` holds it


class FoldCurves(NamedTuple):
    """One fold of one trial, as the trial reported it to Tune (a repeated iteration keeps its last value)."""

    loss_iterations: list[float]  # (L,) iterations of the reports with `train/loss`
    losses: list[float]  # (L,) training loss (the weighted sum of the terms) at those iterations
    val_iterations: list[float]  # (V,) iterations of the reports with `val/miou_seg`
    val_mious: list[float]  # (V,) validation segmentation mIoU
    baseline: float | None  # val/baseline_miou of the fold's validation images (all-background prediction)


class History(NamedTuple):
    """The trials in the order their results arrived (`compute_history`); all lists are (T,)."""

    trials: list[str]
    statuses: list[str]
    cpu_seconds: list[float]  # cumulative reserved CPU-seconds of the trials up to and including this one
    scores: list[float | None]  # each trial's objective (a pruned trial's after the folds it finished)
    best_so_far: list[float | None]  # the best objective of the completed trials so far; None before the first


class Report(NamedTuple):
    folder: Path  # <sweep>/report
    html: Path
    figures: dict[str, Path]  # file name -> path, in `FIGURES` order (importance.png left out when not computed)
    importance: Importance
    best: dict[str, Any] | None  # the best completed trial's leaderboard row
    text: str  # what the command line prints (`format_report`)


# ------------------------------------------------------------------------------------------------- numbers


def objective_value(row: Mapping[str, Any], metric: str) -> float | None:
    """A leaderboard row's value of `metric` (a key the trials report, e.g. `cv/miou_seg_mean`); None if unknown
    or not finite."""
    value = row.get(_ROW_FIELDS.get(metric, ""))
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _usable_params(row: Mapping[str, Any], spec: SweepSpec) -> dict[str, Any] | None:
    """The row's searched params, None when one lies outside its distribution (Optuna would refuse it)."""
    params = {key: value for key, value in row.get("params", {}).items() if key in spec.searched_keys()}
    if not all(spec.distribution(key).contains(value) for key, value in params.items()):
        return None
    return params


def param_importance(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, *,
                     min_trials: int = MIN_FANOVA_TRIALS, seed: int = FANOVA_SEED) -> Importance:
    """fANOVA importance of the searched params for the sweep's objective, over its completed trials.

    The completed rows are told to a fresh in-memory Optuna study (`optuna.trial.create_trial` with the sweep's
    distributions); pruned and failed trials are left out (their scores rest on fewer folds). With fewer than
    `min_trials` completed trials nothing is computed and `note` says so.
    """
    metric = spec.objective.metric
    done = [(params, objective_value(row, metric)) for row in rows if row.get("status") == "completed"
            for params in [_usable_params(row, spec)]]
    done = [(params, value) for params, value in done if params and value is not None]
    if len(done) < min_trials:
        return Importance({}, len(done), f"{len(done)} completed trials (fANOVA needs at least {min_trials})")
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    from orchestration.search_space import optuna_distributions

    distributions = optuna_distributions(spec)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    try:
        study = optuna.create_study(direction="maximize" if spec.objective.mode == "max" else "minimize")
        study.add_trials([
            optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params},
                                      value=value)
            for params, value in done
        ])
        values = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. every trial scored the same
        return Importance({}, len(done), f"fANOVA failed on {len(done)} completed trials: {exc}")
    finally:
        optuna.logging.set_verbosity(verbosity)
    ordered = dict(sorted(((k, float(v)) for k, v in values.items()), key=lambda kv: -kv[1]))
    return Importance(ordered, len(done), None)


def read_results(result_file: Path) -> list[dict[str, Any]]:
    """The reports of one Tune trial, in order (`result.json`: one JSON object a line; a line cut short by a
    killed driver is skipped). Missing file: []."""
    records = []
    with contextlib.suppress(OSError):
        for line in result_file.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
    return records


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    with contextlib.suppress(TypeError, ValueError):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def fold_curves(records: Sequence[Mapping[str, Any]]) -> dict[int, FoldCurves]:
    """A trial's learning curves per fold from its Tune reports (`read_results`): fold -> FoldCurves.

    A retried or resumed trial repeats the reports after its checkpoint: for each (fold, iteration) the last
    value counts.
    """
    loss: dict[int, dict[float, float]] = {}
    val: dict[int, dict[float, float]] = {}
    baselines: dict[int, float] = {}
    for record in records:
        fold, iteration = _number(record.get(FOLD_INDEX)), _number(record.get(keys.TRAIN_ITERATION))
        if fold is None or iteration is None:
            continue
        fold = int(fold)
        for key, into in ((keys.TRAIN_LOSS, loss), (keys.VAL_MIOU_SEG, val)):
            value = _number(record.get(key))
            if value is not None:
                into.setdefault(fold, {})[iteration] = value
        baseline = _number(record.get(keys.VAL_BASELINE_MIOU))
        if baseline is not None:
            baselines[fold] = baseline
    out = {}
    for fold in sorted(set(loss) | set(val)):
        losses, vals = sorted(loss.get(fold, {}).items()), sorted(val.get(fold, {}).items())
        out[fold] = FoldCurves([i for i, _ in losses], [v for _, v in losses], [i for i, _ in vals],
                               [v for _, v in vals], baselines.get(fold))
    return out


def _ended_at(row: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> float | None:
    """When a trial's last result arrived (Unix s): its last Tune report, else its first step + wall time."""
    for record in reversed(records):
        stamp = _number(record.get("timestamp"))
        if stamp is not None:
            return stamp
    start, wall = _number(row.get("timings", {}).get(FIRST_STEP_AT)), _number(row.get("wall_time_s"))
    return start + wall if start is not None and wall is not None else None


def _wall_seconds(row: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> float:
    """A trial's wall time (s): Tune's `time_total_s` of its last report, else the row's."""
    for record in reversed(records):
        seconds = _number(record.get("time_total_s"))
        if seconds is not None:
            return seconds
    return _number(row.get("wall_time_s")) or 0.0


def compute_history(rows: Sequence[Mapping[str, Any]], results: Mapping[str, Sequence[Mapping[str, Any]]],
                    spec: SweepSpec) -> History:
    """The trials that ran, in the order their last result arrived, with the compute spent so far and the best
    objective so far.

    Compute is reserved CPU-seconds: a trial's wall time times `resources.cpu` (what it held, busy or not).
    Trials that never reported and have no timings (pending) are left out; trials without an arrival time come
    last, in leaderboard order. `best_so_far` takes completed trials only (a pruned trial's score rests on fewer
    folds).

    Args:
        results: trial id -> its Tune reports (`read_results`); a trial without any may be missing.
    """
    metric, maximise = spec.objective.metric, spec.objective.mode == "max"
    ran = []
    for order, row in enumerate(rows):
        records = results.get(row["trial"], [])
        seconds = _wall_seconds(row, records)
        if not records and not seconds:
            continue
        ended = _ended_at(row, records)
        ran.append((ended if ended is not None else math.inf, order, row, seconds))
    ran.sort(key=lambda item: (item[0], item[1]))
    history = History([], [], [], [], [])
    total, best = 0.0, None
    for _, _, row, seconds in ran:
        total += seconds * spec.resources.cpu
        score = objective_value(row, metric)
        if row["status"] == "completed" and score is not None:
            best = score if best is None else (max if maximise else min)(best, score)
        history.trials.append(row["trial"])
        history.statuses.append(row["status"])
        history.cpu_seconds.append(total)
        history.scores.append(score)
        history.best_so_far.append(best)
    return history


def _baseline(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The all-background mIoU to draw: the mean over the completed trials (every fold: the same images for all
    of them), else over the trials that have one."""
    found = [(r.get("status"), _number(r.get("baseline_miou"))) for r in rows]
    completed = [value for status, value in found if status == "completed" and value is not None]
    values = completed or [value for _, value in found if value is not None]
    return statistics.fmean(values) if values else None


# ------------------------------------------------------------------------------------------------- words


def _value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _distribution_text(dist: Distribution) -> str:
    """`loguniform [0.03, 0.3]`, `int [4, 16] step 4`, `categorical [5, 10, 15] when model.x=2`."""
    if dist.kind == "categorical":
        text = f"categorical [{', '.join(map(_value_text, dist.choices))}]"
    else:
        text = f"{dist.kind} [{_value_text(dist.low)}, {_value_text(dist.high)}]"
        if dist.step and dist.step != 1:
            text += f" step {dist.step}"
    for key, allowed in dist.when:
        text += f" when {key} in {{{', '.join(map(_value_text, allowed))}}}"
    return text


def _scheduler_text(spec: SweepSpec) -> str:
    if spec.scheduler.type == "asha":
        return (f"ASHA over folds (grace period {spec.scheduler.grace_period} fold(s), reduction factor "
                f"{spec.scheduler.reduction_factor:g})")
    return "FIFO (no early stopping)"


def experiment_description(spec: SweepSpec) -> str:
    """The MLflow experiment's description (markdown, the `mlflow.note.content` experiment tag): what sweep
    `spec` searched (each key with its distribution), how (sampler, trials, folds, scheduler) and for what."""
    search = spec.search
    lines = [f"**Sweep `{spec.name}`**" + (f": {spec.description}" if spec.description else ""), "",
             f"Searched ({len(spec.space)} keys; Optuna {search.algorithm.upper()}, seed {search.seed}, "
             f"{search.num_trials} trials, {search.max_concurrent} at a time):", ""]
    lines += [f"- `{dist.key}`: {_distribution_text(dist)}" for dist in spec.space]
    goal = "maximise" if spec.objective.mode == "max" else "minimise"
    lines += ["", f"Folds: {spec.folds.k}-fold cross-validation of `{spec.folds.split}` (seed {spec.folds.seed}). "
              f"Scheduler: {_scheduler_text(spec)}. Objective: {goal} `{spec.objective.metric}`."
              + (f" Time budget: {spec.time_budget_s:g} s." if spec.time_budget_s else ""),
              "", f"Base config `{spec.base_config}`; the sweep run holds the fixed settings as params and its "
              f"report under `{REPORT_DIR}/`."]
    return "\n".join(lines)


def format_importance(importance: Importance, metric: str) -> str:
    """The importance table (one line a param, with a bar), or the line that says why there is none."""
    if importance.note is not None:
        return f"parameter importance: not computed, {importance.note}"
    width = max(map(len, importance.values))
    lines = [f"parameter importance (Optuna fANOVA on {importance.trials} completed trials; share of the variance "
             f"of {metric}):"]
    for key, value in importance.values.items():
        lines.append(f"  {key:<{width}}  {value:5.3f}  {'#' * round(value * 40)}".rstrip())
    return "\n".join(lines)


def _best_text(best: Mapping[str, Any] | None, spec: SweepSpec) -> list[str]:
    if best is None:
        return ["best trial: none completed"]
    metric = spec.objective.metric
    std = best.get("cv_miou_std")
    score = objective_value(best, metric)
    text = (f"best trial: {best['trial']}, {metric} {'-' if score is None else f'{score:.4f}'}"
            + (f" ± {std:.4f}" if metric == CV_MEAN and std is not None else "")
            + f" over {best['folds_completed']}/{spec.folds.k} folds")
    if best.get("baseline_miou") is not None:
        text += f" (all-background mIoU {best['baseline_miou']:.4f})"
    if best.get("mlflow_run_id"):
        text += f", MLflow run {best['mlflow_run_id']}"
    params = "  ".join(f"{k}={_value_text(v)}" for k, v in best.get("params", {}).items())
    return [text] + ([f"  {params}"] if params else [])


def format_report(report: Report, spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> str:
    """What `cpews sweep report` prints: the trials counted, the importance table (or why there is none), the
    best trial, and where the files are."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [f"report of sweep {spec.name}: {len(rows)} trials ("
             + ", ".join(f"{n} {status}" for status, n in counts.items()) + ")",
             format_importance(report.importance, spec.objective.metric), *_best_text(report.best, spec),
             f"report: {report.html} (figures: {', '.join(report.figures)}, in {report.folder})"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, so no global backend and no figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, format="png", dpi=DPI)
    return path


def plot_importance(importance: Importance, metric: str, path: Path) -> Path:
    """Horizontal bars: each searched param's share of the variance of `metric` (fANOVA), largest on top."""
    names = list(importance.values)[::-1]
    figure = _figure(7.5, 1.2 + 0.4 * len(names))
    ax = figure.subplots()
    ax.barh(names, [importance.values[n] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        ax.text(importance.values[name], i, f" {importance.values[name]:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1e-9, *importance.values.values()) * 1.18)
    ax.set_xlabel(f"share of the variance of {metric}")
    ax.set_title(f"Parameter importance (Optuna fANOVA, {importance.trials} completed trials)")
    return _save(figure, path)


def _axis_position(dist: Distribution, value: Any) -> float:
    """Where `value` sits on its parallel-coordinates axis, 0 (low / first choice) .. 1; NaN when absent."""
    if value is None:
        return math.nan
    if dist.kind == "categorical":
        index = next((i for i, c in enumerate(dist.choices)
                      if c == value and isinstance(c, bool) == isinstance(value, bool)), None)
        if index is None:
            return math.nan
        return index / (len(dist.choices) - 1) if len(dist.choices) > 1 else 0.5
    low, high, value = float(dist.low), float(dist.high), float(value)
    if dist.log:
        low, high, value = math.log(low), math.log(high), math.log(max(value, 1e-300))
    return (value - low) / (high - low) if high > low else 0.5


def plot_parallel_coordinates(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, path: Path) -> Path:
    """One line per trial through an axis per searched param (its range, log for loguniform; categorical
    choices spread evenly) and a last axis for the objective; completed trials coloured by the objective."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    metric = spec.objective.metric
    dists = list(spec.space)
    scored = [(row, objective_value(row, metric)) for row in rows]
    values = [score for _, score in scored if score is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    span = high - low or 1.0
    completed = [s for r, s in scored if r["status"] == "completed" and s is not None]
    norm = Normalize(min(completed, default=0.0), max(max(completed, default=1.0), min(completed, default=0.0) + 1e-9))
    cmap = matplotlib.colormaps["viridis"]
    figure = _figure(max(7.0, 1.25 * (len(dists) + 1) + 2.0), 5.0)
    ax = figure.subplots()
    xs = list(range(len(dists) + 1))
    best = next((r["trial"] for r in rows if r["status"] == "completed"), None)
    drawn_other = False
    order = sorted(scored, key=lambda item: (item[0]["status"] == "completed",
                                             (item[1] or 0.0) * (1 if spec.objective.mode == "max" else -1)))
    for row, score in order:  # grey first, then the completed ones, the best last (on top)
        ys = [_axis_position(d, row.get("params", {}).get(d.key)) for d in dists]
        ys.append((score - low) / span if score is not None else math.nan)
        if row["status"] == "completed" and score is not None:
            width = 3.0 if row["trial"] == best else 1.6
            ax.plot(xs, ys, color=cmap(norm(score)), linewidth=width, alpha=0.95, zorder=3 if width > 2 else 2,
                    label=f"best trial {best} ({score:.4f})" if row["trial"] == best else None)
        else:
            ax.plot(xs, ys, color="0.65", linewidth=1.0, linestyle="--", alpha=0.8, zorder=1,
                    label=None if drawn_other else "pruned / other (score after fewer folds)")
            drawn_other = True
    for x, dist in enumerate(dists):
        ax.axvline(x, color="0.3", linewidth=0.8, zorder=0)
        if dist.kind == "categorical":
            for choice in dist.choices:
                ax.text(x + 0.04, _axis_position(dist, choice), _value_text(choice), fontsize=7, va="center",
                        zorder=5, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.8})
        else:
            ax.text(x + 0.04, -0.04, _value_text(dist.low), fontsize=7, va="top")
            ax.text(x + 0.04, 1.04, _value_text(dist.high) + (" (log)" if dist.log else ""), fontsize=7,
                    va="bottom")
    ax.axvline(len(dists), color="0.3", linewidth=0.8, zorder=0)
    ax.text(len(dists) + 0.04, -0.04, f"{low:.4f}", fontsize=7, va="top")
    ax.text(len(dists) + 0.04, 1.04, f"{high:.4f}", fontsize=7, va="bottom")
    ax.set_xticks(xs, [d.key for d in dists] + [metric], rotation=25, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.12)
    ax.set_xlim(-0.2, len(dists) + 0.5)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"Parallel coordinates: searched params against {metric} ({len(rows)} trials)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.28), fontsize=8, frameon=False, ncols=2)
    if completed:
        bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
        bar.set_label(f"{metric} (completed trials)")
    return _save(figure, path)


def plot_history(history: History, spec: SweepSpec, path: Path) -> Path:
    """Each trial's objective at the compute spent when its result arrived, and the best so far as a step line."""
    metric = spec.objective.metric
    figure = _figure(8.0, 4.6)
    ax = figure.subplots()
    groups = {"completed": ("o", "tab:blue", "completed trial"),
              "pruned": ("x", "0.45", f"pruned trial (score after fewer than {spec.folds.k} folds)")}
    for status, (marker, colour, label) in groups.items():
        points = [(x, y) for x, y, s in zip(history.cpu_seconds, history.scores, history.statuses)
                  if s == status and y is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=colour, label=label, zorder=3)
    others = [(x, y) for x, y, s in zip(history.cpu_seconds, history.scores, history.statuses)
              if s not in groups and y is not None]
    if others:
        ax.scatter(*zip(*others), marker="^", color="tab:orange", label="other trial (timeout, interrupted)")
    steps = [(x, y) for x, y in zip(history.cpu_seconds, history.best_so_far) if y is not None]
    if steps:
        xs, ys = zip(*steps)
        xs, ys = [*xs, history.cpu_seconds[-1]], [*ys, ys[-1]]
        ax.step(xs, ys, where="post", color="tab:red", linewidth=2, label="best completed so far", zorder=2)
    ax.set_xlabel(f"cumulative CPU-seconds of the trials (wall time × {spec.resources.cpu:g} reserved CPU), "
                  "in the order results arrived")
    ax.set_ylabel(metric)
    ax.set_title(f"Optimisation history ({len(history.trials)} trials)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")  # placed where it hides the fewest points
    return _save(figure, path)


def plot_fold_scores(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, path: Path) -> Path:
    """A strip plot: each trial's fold scores (one dot a fold, its mean as a bar), best trial first, and the
    all-background mIoU (`baseline_miou`) as a dashed line."""
    scored = [row for row in rows if row.get("fold_scores")]
    shown = scored[:STRIP_TRIALS]
    crowded = len(shown) > 12
    figure = _figure(max(6.5, (0.45 if crowded else 0.9) * len(shown) + 2.8), 5.2 if crowded else 4.8)
    ax = figure.subplots()
    for x, row in enumerate(shown):
        scores = row["fold_scores"]
        for fold, score in enumerate(scores):
            offset = (fold - (len(scores) - 1) / 2) * 0.08
            ax.scatter(x + offset, score, color=f"C{fold % 10}", s=28, zorder=3, label=f"fold {fold}")
        ax.hlines(statistics.fmean(scores), x - 0.25, x + 0.25, color="black", linewidth=1.5, zorder=2,
                  label="mean of the trial's folds" if x == 0 else None)
    baseline = _baseline(rows)
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", linestyle="--", linewidth=1.3,
                   label=f"all-background mIoU (baseline_miou) {baseline:.3f}")
    if crowded:
        ax.set_xticks(range(len(shown)), [f"#{r.get('rank', i + 1)} {r['trial']} {r['status']}"
                                          for i, r in enumerate(shown)], fontsize=7, rotation=60, ha="right")
    else:
        ax.set_xticks(range(len(shown)), [f"#{r.get('rank', i + 1)}\n{r['trial']}\n{r['status']}"
                                          for i, r in enumerate(shown)], fontsize=7)
    ax.set_xlim(-0.6, max(len(shown), 1) - 0.4)
    ax.set_ylabel(f"{keys.VAL_MIOU_SEG} of each fold")
    more = f"; the best {len(shown)} of {len(scored)} trials" if len(scored) > len(shown) else ""
    ax.set_title(f"Fold scores per trial ({spec.folds.k}-fold CV, best first{more})")
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(figure, path)


def plot_learning_curves(rows: Sequence[Mapping[str, Any]], curves: Mapping[str, Mapping[int, FoldCurves]],
                         spec: SweepSpec, path: Path) -> Path:
    """A column per fold: validation seg mIoU (top) and training loss (bottom) against iteration, a line per
    trial; the best `COLOURED_TRIALS` trials in colour with a legend entry, the others grey. The fold's
    all-background mIoU is a dashed line on the top row."""
    from matplotlib.lines import Line2D

    k = spec.folds.k
    figure = _figure(min(4.0 * k, 20.0) + 2.6, 6.2)
    axes = figure.subplots(2, k, squeeze=False, sharex="col")
    colours = {row["trial"]: f"C{i}" for i, row in enumerate(r for r in rows if r["trial"] in curves)
               if i < COLOURED_TRIALS}
    metric = spec.objective.metric
    baselines: dict[int, float] = {}
    legend: list[tuple[Any, str]] = []  # (handle, label) of the coloured trials, best first
    for row in reversed(rows):  # best drawn last, on top
        trial = row["trial"]
        colour = colours.get(trial, "0.75")
        score = objective_value(row, metric)
        label = f"#{row.get('rank', '?')} {trial} ({row['status']}" + (f", {score:.3f})" if score is not None else ")")
        for fold, curve in curves.get(trial, {}).items():
            if fold >= k:
                continue
            top, bottom = axes[0][fold], axes[1][fold]
            if curve.val_iterations:
                top.plot(curve.val_iterations, curve.val_mious, marker="o", markersize=4, color=colour,
                         linewidth=1.2)
            if curve.losses:
                bottom.plot(curve.loss_iterations, curve.losses, color=colour, linewidth=1.0, alpha=0.9)
            if curve.baseline is not None:
                baselines.setdefault(fold, curve.baseline)
        if trial in colours:
            legend.insert(0, (Line2D([], [], color=colour, marker="o", markersize=4), label))
    for fold in range(k):
        top, bottom = axes[0][fold], axes[1][fold]
        if fold in baselines:
            top.axhline(baselines[fold], color="tab:red", linestyle="--", linewidth=1.0)
        top.set_title(f"fold {fold}", fontsize=9)
        top.set_ylabel(f"validation seg mIoU\n({keys.VAL_MIOU_SEG})" if fold == 0 else "")
        bottom.set_ylabel(f"training loss\n({keys.TRAIN_LOSS})" if fold == 0 else "")
        bottom.set_xlabel("iteration")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    if baselines:
        legend.append((Line2D([], [], color="tab:red", linestyle="--"), "all-background mIoU of the fold"))
    if legend:
        figure.legend(*zip(*legend), loc="outside right center", fontsize=7)
    grey = len([r for r in rows if r["trial"] in curves]) > COLOURED_TRIALS
    figure.suptitle("Learning curves per fold" + (f" (best {COLOURED_TRIALS} trials in colour)" if grey else ""))
    if not curves:
        axes[0][0].text(0.5, 0.5, "no trial reported yet", transform=axes[0][0].transAxes, ha="center")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------- files


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return html.escape(f"{value:.4f}" if isinstance(value, float) else str(value))


def report_html(spec: SweepSpec, rows: Sequence[Mapping[str, Any]], importance: Importance,
                figures: Mapping[str, Path], *, best: Mapping[str, Any] | None, source: str | None) -> str:
    """The self-contained report page: description, best trial, importance table, figures (base64 data URIs,
    each `<img>` has the file name as `alt` and `data-file`) and a table of the trials."""
    metric = spec.objective.metric
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>Sweep {e(spec.name)}: report</title>",
           "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;"
           "font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#eee}"
           "td.l,th.l{text-align:left}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}"
           "figcaption{color:#444;font-size:13px}pre{background:#f6f6f6;padding:.6em}</style></head><body>",
           f"<h1>Sweep {e(spec.name)}</h1>"]
    if spec.description:
        out.append(f"<p>{e(spec.description)}</p>")
    out.append(f"<pre>{e(experiment_description(spec))}</pre>")
    if source:
        out.append(f"<p>Trials from {e(source)}.</p>")
    out.append("<h2>Best trial</h2><pre>" + e("\n".join(_best_text(best, spec))) + "</pre>")
    out.append("<h2 id='importance'>Parameter importance</h2>")
    if importance.note is not None:
        out.append(f"<p>Not computed: {e(importance.note)}.</p>")
    else:
        out.append(f"<p>Optuna's fANOVA on {importance.trials} completed trials: the share of the variance of "
                   f"<code>{e(metric)}</code> each parameter explains.</p>")
        out.append("<table><tr><th class='l'>parameter</th><th>importance</th></tr>")
        out += [f"<tr><td class='l'>{e(k)}</td><td>{v:.3f}</td></tr>" for k, v in importance.values.items()]
        out.append("</table>")
    out.append("<h2>Figures</h2>")
    for name, path in figures.items():
        out.append(f"<figure id='{e(Path(name).stem)}'><img alt='{e(name)}' data-file='{e(name)}' "
                   f"src='{_png_uri(path)}'><figcaption>{e(FIGURES.get(name, name))}</figcaption></figure>")
    keys_ = spec.searched_keys()
    out.append("<h2 id='trials'>Trials</h2><table><tr><th>rank</th><th class='l'>trial</th><th class='l'>status"
               f"</th><th>folds</th><th>{e(metric)}</th><th>std</th><th>all-bkg mIoU</th>"
               "<th class='l'>fold scores</th><th>wall s</th>"
               + "".join(f"<th>{e(k)}</th>" for k in keys_) + "<th class='l'>MLflow run</th></tr>")
    for row in rows:
        scores = ", ".join(f"{s:.4f}" for s in row.get("fold_scores") or [])
        out.append(
            f"<tr><td>{_cell(row.get('rank'))}</td><td class='l'>{e(str(row['trial']))}</td>"
            f"<td class='l'>{e(str(row['status']))}</td><td>{row.get('folds_completed', 0)}/{spec.folds.k}</td>"
            f"<td>{_cell(objective_value(row, metric))}</td><td>{_cell(row.get('cv_miou_std'))}</td>"
            f"<td>{_cell(row.get('baseline_miou'))}</td><td class='l'>{e(scores) or '-'}</td>"
            f"<td>{_cell(None if row.get('wall_time_s') is None else round(float(row['wall_time_s'])))}</td>"
            + "".join(f"<td>{e(_value_text(row.get('params', {}).get(k, '-')))}</td>" for k in keys_)
            + f"<td class='l'>{_cell(row.get('mlflow_run_id'))}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def write_report(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, *, tune_dir: Path, folder: Path,
                 source: str | None = None) -> Report:
    """Make the report of a sweep into `folder` (created; files of an earlier report replaced).

    Args:
        rows: the leaderboard, best first (`orchestration.sweep.leaderboard_rows` or `read_leaderboard`).
        tune_dir: the sweep's Tune experiment folder; `trial_<id>/result.json` holds each trial's reports.
        source: where the rows come from, in words (shown on the page).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = {row["trial"]: read_results(Path(tune_dir) / f"trial_{row['trial']}" / "result.json")
               for row in rows}
    curves = {trial: found for trial, records in results.items() if (found := fold_curves(records))}
    importance = param_importance(rows, spec)
    history = compute_history(rows, results, spec)
    best = next((dict(row) for row in rows if row["status"] == "completed"), None)
    figures: dict[str, Path] = {}
    stale = folder / "importance.png"
    stale.unlink(missing_ok=True)  # an earlier report's, with more or fewer trials
    if importance.note is None:
        figures["importance.png"] = plot_importance(importance, spec.objective.metric, stale)
    figures["parallel_coordinates.png"] = plot_parallel_coordinates(rows, spec, folder / "parallel_coordinates.png")
    figures["history.png"] = plot_history(history, spec, folder / "history.png")
    figures["fold_scores.png"] = plot_fold_scores(rows, spec, folder / "fold_scores.png")
    figures["learning_curves.png"] = plot_learning_curves(rows, curves, spec, folder / "learning_curves.png")
    page = folder / "report.html"
    page.write_text(report_html(spec, rows, importance, figures, best=best, source=source), encoding="utf-8")
    summary = {
        "sweep": spec.name, "objective": spec.objective.metric, "mode": spec.objective.mode,
        "importance": importance.values, "importance_trials": importance.trials, "importance_note": importance.note,
        "min_fanova_trials": MIN_FANOVA_TRIALS, "best": best, "history": history._asdict(),
        "figures": list(figures),
    }
    (folder / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    report = Report(folder, page, figures, importance, best, "")
    return report._replace(text=format_report(report, spec, rows))


# ------------------------------------------------------------------------------------------------- MLflow


def describe_experiment(client: Any, experiment_id: str, spec: SweepSpec) -> None:
    """Set the experiment's description (`mlflow.note.content`) to `experiment_description(spec)`."""
    client.set_experiment_tag(experiment_id, NOTE_TAG, experiment_description(spec))


def log_report(report: Report, spec: SweepSpec, state: Mapping[str, Any], *, timeout_s: float = 30.0) -> None:
    """Log a report to the sweep's MLflow run (state.json's `tracking_uri`, `experiment_id`, `parent_run_id`),
    directly (the run may have ended: its status and end time are left as they are): the files under `report/`,
    the experiment's description, and the best completed trial's objective under the objective's own key when
    the run lacks it.

    Raises:
        MlflowException, OSError, requests errors: MLflow refused or could not be reached.
    """
    from mlflow.tracking import MlflowClient

    from orchestration.tracking import _http_policy

    with _http_policy(timeout_s):
        client = MlflowClient(state["tracking_uri"])
        run_id = state["parent_run_id"]
        client.log_artifacts(run_id, str(report.folder), REPORT_DIR)
        describe_experiment(client, state["experiment_id"], spec)
        metric = spec.objective.metric
        value = objective_value(report.best, metric) if report.best else None
        if value is not None and metric not in client.get_run(run_id).data.metrics:
            client.log_metric(run_id, metric, value)

"""The sweep's trial: one sampled configuration trained and scored on every fold (a Ray Tune function trainable).

`cv_trial(config, context=...)` trains fold 0, 1, ... in turn (in its own process, or data parallel on the Ray
Train workers of `orchestration.ray_train` when the sweep's resources ask for more than one worker). It reports
to Tune during a fold (every `train.log_every` steps, with a checkpoint every `train.checkpoint_every` steps) and
once at the end of each fold, so that ASHA (time attribute `cv/folds_completed`) can stop a poor configuration
after its first folds and a retried or restored trial continues from its last checkpoint, mid-fold included.

What a Tune checkpoint of a trial holds (`TrialState`, `trial_state.json`, plus `fold_checkpoint.pt` while a fold
is in progress): the finished folds' scores, the MLflow run ids of the trial and its folds, the fold in progress
and the trainer's checkpoint of it, and the accumulated timings.

MLflow: one run per trial (nested under the sweep's run) and one per fold (nested under the trial's run), each
written through a `RunLogger` whose spool lives in the trial folder (`mlflow/trial`, `mlflow/fold_<i>`), named
`t03 8f5a7c13` and `t03 f1 8f5a7c13` (`run_name`; code finds runs by their `cpews.*` tags and ids, not names).
Per-step and `val/*` metrics go to the fold run; the trial run gets the fold scores (`fold/miou_seg` at step =
fold), their means (`cv/*`), pool-cache counts and timings (the first step's time as the tag
`cpews.first_step_at`). Every MLflow call of a fold happens before the Tune report that follows it: a trial that Tune stops is blocked inside
that report, so the driver can end its runs (`orchestration.tune_runner.TrialRunCloser`) without a second writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cpews.training import keys

TRIAL_STATE_FILE = "trial_state.json"
FOLD_CHECKPOINT_FILE = "fold_checkpoint.pt"
SPOOL_DIR = "mlflow"  # <trial dir>/mlflow/{trial,fold_0,...}: the MLflow spools of the trial's runs
TRIAL_SPOOL = "trial"
FAULT_MARKER = "fault_injected"
FOLDS_STARTED_LOG = "folds_started.log"
TRIAL_LOG = "trial.log"  # <trial dir>/trial.log: everything the trial prints (trainer, pool builds, tracebacks)

# Tune result keys: the cross-validation metrics of cpews.training.keys, and the trial's own bookkeeping
CV_MEAN = keys.CV_MIOU_SEG_MEAN
CV_STD = keys.CV_MIOU_SEG_STD
CV_BASELINE = keys.CV_BASELINE_MIOU_MEAN
FOLDS_COMPLETED = keys.CV_FOLDS_COMPLETED
FOLD_SCORE = keys.FOLD_MIOU_SEG
FOLD_INDEX = "cv/fold"  # the fold the result is about
FOLD_END = "cv/fold_end"  # 1.0 on the report that closes a fold, else 0.0
TIME_KEYS = ("time/setup_s", "time/steps_s", "time/eval_s", "time/report_s", "time/artifacts_s")
FIRST_STEP_AT = "time/first_step_epoch"  # Unix time at which the trial's first training step began (Tune only)

TAG_KIND = "cpews.kind"  # sweep | trial | fold
TAG_SWEEP = "cpews.sweep"
TAG_TRIAL = "cpews.trial_id"
TAG_FOLD = "cpews.fold"
TAG_STATUS = "cpews.status"  # trial: completed | pruned | failed | interrupted
TAG_POOL_CACHE = "cpews.pool_cache"  # fold: hit | miss | none
TAG_NODES = "cpews.nodes"  # trial: the Ray node ids it ran on
TAG_FIRST_STEP_AT = "cpews.first_step_at"  # trial: FIRST_STEP_AT as ISO 8601 UTC (a time, not a metric to chart)


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (passed once through `tune.with_parameters`).

    Attributes:
        sweep: `SweepSpec.to_dict()` (re-validated in the trial, without path checks).
        folds: the image ids of each fold of `split`.
        split: the split the folds are cut from (each fold is validated on its own images of that split).
        workdir: the driver's working directory; relative paths of the config resolve against it.
        tracking_uri / experiment_id / parent_run_id: the sweep's MLflow store, experiment and run.
        trials_dir: each trial's folder is `trials_dir/<trial id>` (fold outputs, MLflow spools); it outlives
            the trial's process and the driver, so a retried or restored trial finds it again.
        pool_cache_dir: `proto.cache_dir` for every trial (pools shared by content key).
        overlay_images: CAM / pseudo-label overlays logged per fold (the first ids of the fold, sorted).
        kill_at: fault injection for tests: `(fold, iteration)` at which the worker SIGKILLs itself, once.
        crash_after_fold: fault injection for tests: raise once after this fold's report.
    """

    sweep: dict[str, Any]
    folds: list[list[str]]
    split: str
    workdir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials_dir: str
    pool_cache_dir: str = ""
    overlay_images: int = 4
    kill_at: tuple[int, int] | None = None
    crash_after_fold: int | None = None


@dataclasses.dataclass
class TrialState:
    """The trial's progress, saved in each of its Tune checkpoints."""

    fold_scores: list[float] = dataclasses.field(default_factory=list)
    fold_baselines: list[float] = dataclasses.field(default_factory=list)  # val/baseline_miou of each fold
    trial_run_id: str | None = None
    fold_run_ids: dict[str, str] = dataclasses.field(default_factory=dict)
    fold_in_progress: int | None = None
    fold_iteration: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(TIME_KEYS, 0.0))
    pool_cache: dict[str, int] = dataclasses.field(default_factory=lambda: {"hit": 0, "miss": 0})
    nodes: list[str] = dataclasses.field(default_factory=list)  # Ray node ids the trial ran on, in order

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrialState:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def trial_name(trial: Any) -> str:
    """Tune's folder name of a trial: `trial_<id>` (instead of the function name and every param)."""
    return f"trial_{trial.trial_id}"


def trial_label(trial: Any) -> str:
    """Tune's display name of a trial and its MLflow run name: `t<number> <id>` (`t03 8f5a7c13`), the number
    being Tune's count of the trial (the start of its `experiment_tag`), so that a name cut short in a table
    still tells the trials apart; `trial_<id>` when the tag holds no number."""
    number = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return f"t{int(number):02d} {trial.trial_id}" if number.isdigit() else trial_name(trial)


def run_name(label: str, fold: int | None = None) -> str:
    """The MLflow run name of a trial (its `trial_label`) or of one of its folds: the fold right after the
    trial's number (`t03 f1 8f5a7c13`), then the id."""
    if fold is None:
        return label
    number, _, rest = label.partition(" ")
    return f"{number} f{fold} {rest}" if rest else f"{label} f{fold}"


def cv_metrics(scores: list[float], baselines: list[float]) -> dict[str, float]:
    """Mean and sample std (`orchestration.kfold.fold_std`, NaN before two folds) of the fold scores so far, and
    the mean all-background mIoU of those folds (`baselines`, one per fold; NaN when none was recorded); NaN
    means before the first fold ends."""
    baseline = statistics.fmean(baselines) if baselines else math.nan
    if not scores:
        return {CV_MEAN: math.nan, CV_STD: math.nan, CV_BASELINE: baseline, FOLDS_COMPLETED: 0.0}
    from orchestration.kfold import fold_std

    std = fold_std(scores)
    return {CV_MEAN: statistics.fmean(scores), CV_STD: std, CV_BASELINE: baseline,
            FOLDS_COMPLETED: float(len(scores))}


def iso_time(epoch_s: float) -> str:
    """A Unix time as ISO 8601 UTC to the millisecond (`2026-01-02T03:04:05.678+00:00`), for tags."""
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat(timespec="milliseconds")


def epoch_time(iso: str) -> float:
    """The Unix time of an `iso_time` text."""
    return datetime.datetime.fromisoformat(iso).timestamp()


def trial_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted config keys of a Tune trial config (Ray's OptunaSearch unflattens on "/" only, so the dotted
    keys arrive flat; nested mappings, e.g. a hand-written `param_space`, are flattened all the same)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(trial_params(value, f"{name}."))
        else:
            out[name] = value
    return out


class RestoredTrial(NamedTuple):
    """What a trial continues from (`load_trial_state`)."""

    state: TrialState
    resume: Path | None  # the trainer checkpoint of the fold in progress (a copy), None: the fold starts afresh
    source: str | None  # where `resume` came from, when not the Tune checkpoint's own copy (for the trial's log)


def load_trial_state(
    checkpoint: Any, restore_to: Path, fold_dir: Callable[[int], Path] | None = None
) -> RestoredTrial:
    """The state in a Tune checkpoint (a fresh one for None) and the trainer checkpoint to continue its current
    fold from (the fold in progress, else the first unfinished one), copied to `restore_to`.

    The candidates are the Tune checkpoint's copy (when a fold was in progress) and the checkpoints the fold's own
    run wrote (`fold_dir(fold)`: `last.pt`, `iter_XXXXXXX.pt`); the valid one with the most steps wins
    (`furthest_valid_checkpoint`; of equals, the Tune copy). The fold's folder can be further on than the Tune
    checkpoint: the trainer writes its checkpoint before the report that hands a copy to Tune, and Tune saves its
    experiment state (what `Tuner.restore` reads) only every few checkpoints, so a killed driver leaves it behind
    the folder. Starting later redoes no finished iteration, and is consistent with what was logged: the tracking
    layer drops metric steps at or below a run's last logged one. `state.fold_in_progress` and
    `state.fold_iteration` follow the checkpoint chosen. A damaged candidate is passed over with a warning that
    names it; when none is valid, the `CheckpointError` names the first (the Tune checkpoint's file, not a copy).
    """
    from cpews.training.checkpoint import furthest_valid_checkpoint, run_checkpoints

    with contextlib.ExitStack() as stack:
        state, saved = TrialState(), None
        if checkpoint is not None:
            folder = Path(stack.enter_context(checkpoint.as_directory()))
            state = TrialState.from_json((folder / TRIAL_STATE_FILE).read_text())
            if state.fold_in_progress is not None and (folder / FOLD_CHECKPOINT_FILE).is_file():
                saved = folder / FOLD_CHECKPOINT_FILE
        fold = state.fold_in_progress if state.fold_in_progress is not None else len(state.fold_scores)
        on_disk = run_checkpoints(fold_dir(fold)) if fold_dir is not None else []
        candidates = ([saved] if saved is not None else []) + on_disk
        if not candidates:
            return RestoredTrial(state, None, None)
        chosen = furthest_valid_checkpoint(candidates)
        restore_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen.path, restore_to)
    source = None
    if chosen.path != saved:
        behind = (f"the Tune checkpoint's iteration {state.fold_iteration}" if saved is not None
                  else "no Tune checkpoint of this fold")
        source = f"{chosen.path}, further on than {behind}"
    state.fold_in_progress, state.fold_iteration = fold, chosen.checkpoint.iteration
    return RestoredTrial(state, restore_to, source)


def _report(result: dict[str, float], state: TrialState, trainer_checkpoint: Path | None = None) -> None:
    """`tune.report(result)` with a checkpoint of `state` (and the fold's trainer checkpoint, if given)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="cpews-ckpt-") as directory:
        folder = Path(directory)
        (folder / TRIAL_STATE_FILE).write_text(state.to_json())
        if trainer_checkpoint is not None:
            shutil.copyfile(trainer_checkpoint, folder / FOLD_CHECKPOINT_FILE)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))


# Validation metrics that a fold's images may leave undefined (no pixel of the confounding texture, no image
# that shows it without its class): logged as NaN then, so that every fold run holds the same keys
OPTIONAL_VAL_KEYS = (keys.VAL_CONFOUNDER_FALSE_ACTIVATION, keys.VAL_CONFOUNDER_IMAGE_BIAS, keys.VAL_CONFOUNDED_IOU)


def same_metric_keys(values: Mapping[str, float]) -> dict[str, float]:
    """`values` with every `OPTIONAL_VAL_KEYS` key that it lacks set to NaN, when it is a validation report
    (holds `val/miou_seg`) of a dataset that has those metrics (it holds one of them); else `values` as they are.

    The trainer leaves out a metric that the fold's images do not define (e.g. `val/confounder_image_bias` when
    no image of the fold shows the texture without the class); NaN says "undefined" in MLflow, not "missing".
    """
    out = dict(values)
    if keys.VAL_MIOU_SEG in out and any(key in out for key in OPTIONAL_VAL_KEYS):
        for key in OPTIONAL_VAL_KEYS:
            out.setdefault(key, math.nan)
    return out


class FoldReporter:
    """The trainer's reporter inside a trial: MLflow (the fold run, at the fold's step; per-step and per-fold
    metrics go to fold runs only, the trial run gets the fold scores and their means) and Tune (every call; with
    a checkpoint when the trainer has just written one, except the last)."""

    def __init__(
        self,
        *,
        fold: int,
        state: TrialState,
        fold_run: Any,
        max_iters: int,
        on_iteration: Callable[[int], None] | None = None,
    ) -> None:
        self.fold, self.state, self.fold_run = fold, state, fold_run
        self.max_iters, self.on_iteration = max_iters, on_iteration

    def __call__(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        it = int(metrics.get(keys.TRAIN_ITERATION, 0))
        values = same_metric_keys({k: float(v) for k, v in metrics.items() if k != keys.TRAIN_ITERATION})
        self.fold_run.log_metrics(values, step=it)
        result = {
            **values,
            keys.TRAIN_ITERATION: float(it),
            **cv_metrics(self.state.fold_scores, self.state.fold_baselines),
            FOLD_INDEX: float(self.fold),
            FOLD_END: 0.0,
        }
        if checkpoint_dir is not None and it < self.max_iters and (Path(checkpoint_dir) / "last.pt").is_file():
            self.state.fold_in_progress, self.state.fold_iteration = self.fold, it
            _report(result, self.state, Path(checkpoint_dir) / "last.pt")
        else:
            from ray import tune

            tune.report(result)
        if self.on_iteration is not None:
            self.on_iteration(it)


def _fault_kill(trial_dir: Path, kill_at: tuple[int, int] | None, fold: int) -> Callable[[int], None] | None:
    """Tests: a callback that SIGKILLs this worker once when `fold` reaches the iteration in `kill_at`."""
    if kill_at is None or int(kill_at[0]) != fold:
        return None
    marker = trial_dir / FAULT_MARKER

    def maybe_kill(iteration: int) -> None:
        if iteration >= int(kill_at[1]) and not marker.exists():
            marker.write_text(f"SIGKILL at fold {fold} iteration {iteration}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_kill


def _log_fold_artifacts(fold_run: Any, cfg: Any, out_dir: Path, result: Any, data_root: Path, ids: list[str],
                        split: str) -> None:
    """Pool files (+ metadata and picture), overlays of `ids`, the fold's checkpoint, config and metrics."""
    import torch

    from cpews.evaluation.infer import load_model
    from cpews.evaluation.overlays import write_overlays
    from cpews.training.data import eval_dataset
    from cpews.training.prototype_hooks import POOL_DIR

    pool_dir = out_dir / POOL_DIR
    if pool_dir.is_dir():
        fold_run.log_artifacts(pool_dir, "pool")
    if ids:
        loaded = load_model(result.checkpoint)
        dataset = eval_dataset(cfg, data_root, split=split, ids=ids, resize=None)
        overlays = out_dir / "overlays"
        with torch.no_grad():
            write_overlays(loaded.model, dataset, cfg, indices=range(len(dataset)), out_dir=overlays)
        fold_run.log_artifacts(overlays, "overlays")
    fold_run.log_artifact(result.checkpoint, "checkpoint")
    for name in ("config.yaml", "metrics.json"):
        if (out_dir / name).is_file():
            fold_run.log_artifact(out_dir / name)


def _start_runs(context: TrialContext, state: TrialState, trial_dir: Path, trial_name: str, trial_id: str,
                cfg: Any, searched: list[str]) -> Any:
    from orchestration.tracking import RunLogger

    fresh = state.trial_run_id is None and not (trial_dir / SPOOL_DIR / TRIAL_SPOOL / "run.json").exists()
    run = RunLogger.start(
        context.tracking_uri,
        context.experiment_id,
        run_name=trial_name,
        spool_dir=trial_dir / SPOOL_DIR / TRIAL_SPOOL,
        parent_run_id=context.parent_run_id,
        run_id=state.trial_run_id,
        tags={
            TAG_KIND: "trial",
            TAG_SWEEP: context.sweep["name"],
            TAG_TRIAL: trial_id,
            "cpews.searched": ",".join(searched),
            "cpews.trial_dir": str(trial_dir),
        },
    )
    state.trial_run_id = run.run_id
    if fresh:
        run.log_params(cfg.to_flat_dict())
    return run


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


@contextlib.contextmanager
def output_to(path: Path) -> Any:
    """Send this process's `sys.stdout`, `sys.stderr` and the logging handlers that write to them (Ray's own
    included, e.g. its checkpoint messages) to the file `path` (appended to), until the block ends."""
    streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict))]
    handlers = {id(h): h for lg in loggers for h in lg.handlers
                if type(h) is logging.StreamHandler and id(h.stream) in streams}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log:
        previous = {key: handler.setStream(log) for key, handler in handlers.items()}
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            for key, handler in handlers.items():
                handler.setStream(previous[key])


def train_fold(cfg: Any, reporter: Any, *, class_names: Any, progress: Callable[[str], None], **train_args: Any
               ) -> tuple[Any, str]:
    """Train one fold with the prototype module's hooks (none when `proto.n_builds` is 0), in this process (or as
    one data-parallel worker); returns the `TrainResult` and where the fold's last pool came from (hit, miss or
    none). `train_args` go to `cpews.training.train`."""
    from cpews.training import train
    from cpews.training.prototype_hooks import PrototypeModule
    from cpews.training.trainer import TrainHooks

    module = PrototypeModule(cfg, class_names=class_names, progress=progress)
    hooks = module.hooks() if cfg.proto.n_builds > 0 else TrainHooks()
    result = train(cfg, reporter, hooks=hooks, progress=False, **train_args)
    cache = (module.last_pool.meta.get("cache") if module.last_pool is not None else None) or "none"
    return result, cache


def cv_trial(config: dict, *, context: TrialContext) -> None:
    """Ray Tune function trainable: `run_trial`, with everything it prints in the trial's `TRIAL_LOG` (the driver
    prints one line per trial event instead, `orchestration.tune_runner.TrialEvents`); an exception's traceback
    is written there too before it reaches Tune."""
    from ray import tune

    base = Path(context.workdir) if os.path.isdir(context.workdir) else Path()  # as `run_trial` resolves it
    trial_dir = base / context.trials_dir / tune.get_context().get_trial_id()
    with output_to(trial_dir / TRIAL_LOG):
        try:
            run_trial(config, context=context)
        except BaseException:
            traceback.print_exc()
            raise


def run_trial(config: dict, *, context: TrialContext) -> None:
    """Train the sampled `config` on each fold in turn (see the module docstring).

    `config` holds only the sampled params (dotted config keys); everything else comes from `context`.
    """
    import torch
    from ray import tune

    from cpews.config import TrainConfig
    from cpews.training.data import class_names, resolve_data_root
    from orchestration.kfold import fold_splits
    from orchestration.ray_train import train_with_workers, worker_layout
    from orchestration.search_space import validate_sweep
    from orchestration.tracking import RunLogger

    started = time.perf_counter()
    if os.path.isdir(context.workdir):  # Tune starts trials in their own folder; the config's paths are the driver's
        os.chdir(context.workdir)
    spec = validate_sweep(context.sweep, check_paths=False)
    layout = worker_layout(spec.resources)  # more than one worker: each fold trains on Ray Train workers
    torch.set_num_threads(max(1, round(spec.resources.cpu)) if layout.workers == 1 else 1)
    params = trial_params(config)
    cfg = spec.trial_config(params)
    if context.pool_cache_dir and not cfg.proto.cache_dir:
        cfg = TrainConfig.from_flat_dict({"proto.cache_dir": context.pool_cache_dir}, base=cfg)
    tune_context = tune.get_context()
    trial_id, label = tune_context.get_trial_id(), tune_context.get_trial_name()  # label: `trial_label`
    trial_name = f"trial_{trial_id}"  # the trial's folder in tune/, as its log lines name it
    trial_dir = Path(context.trials_dir) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    state, resume, resumed_from = load_trial_state(tune.get_checkpoint(), trial_dir / "restore" / FOLD_CHECKPOINT_FILE,
                                                   fold_dir=lambda fold: trial_dir / f"fold_{fold}")
    trial_run = _start_runs(context, state, trial_dir, run_name(label), trial_id, cfg, spec.searched_keys())
    node = _node_id()
    if node not in state.nodes:  # where each attempt ran (a retry may land on another node)
        state.nodes.append(node)
    trial_run.set_tags({TAG_NODES: ",".join(state.nodes)})
    data_root = resolve_data_root(cfg)
    names = class_names(cfg)
    k = len(context.folds)
    state.timings["time/setup_s"] += time.perf_counter() - started

    def say(fold: int, text: str) -> None:
        print(f"[{trial_name} fold {fold}] {text}", flush=True)

    if len(state.fold_scores) >= k:  # a retry that found every fold done
        trial_run.set_tags({TAG_STATUS: "completed"})
        trial_run.end("FINISHED")
        return
    for fold in range(len(state.fold_scores), k):
        fold_started = time.perf_counter()
        train_ids, val_ids = fold_splits(context.folds, fold)
        fold_run = RunLogger.start(
            context.tracking_uri,
            context.experiment_id,
            run_name=run_name(label, fold),
            spool_dir=trial_dir / SPOOL_DIR / f"fold_{fold}",
            parent_run_id=trial_run.run_id,
            run_id=state.fold_run_ids.get(str(fold)),
            tags={TAG_KIND: "fold", TAG_SWEEP: spec.name, TAG_TRIAL: trial_id, TAG_FOLD: fold},
        )
        if str(fold) not in state.fold_run_ids:
            fold_run.log_params({**cfg.to_flat_dict(), "cv.fold": fold, "cv.k": k})
        state.fold_run_ids[str(fold)] = fold_run.run_id
        fold_resume = resume if state.fold_in_progress == fold else None
        start_iteration = state.fold_iteration if fold_resume is not None else 0
        if fold_resume is not None:
            say(fold, f"resuming from the checkpoint at iteration {start_iteration}"
                + (f" ({resumed_from})" if resumed_from else ""))
        with open(trial_dir / FOLDS_STARTED_LOG, "a") as log:  # "<fold> <iteration>" per start
            log.write(f"{fold} {start_iteration}\n")
        reporter = FoldReporter(
            fold=fold, state=state, fold_run=fold_run, max_iters=cfg.optim.max_iters,
            on_iteration=_fault_kill(trial_dir, context.kill_at, fold),
        )
        state.timings["time/setup_s"] += time.perf_counter() - fold_started
        if layout.workers > 1:
            outcome = train_with_workers(
                cfg, reporter, layout=layout, out_dir=trial_dir / f"fold_{fold}", resume=fold_resume,
                train_ids=train_ids, val_ids=val_ids, val_split=context.split, class_names=names,
                log_path=trial_dir / TRIAL_LOG, label=f"[{trial_name} fold {fold}]",
                storage_path=trial_dir / "ray_train",
            )
            result, cache = outcome.result, outcome.pool_cache
        else:
            result, cache = train_fold(
                cfg, reporter, class_names=names, progress=lambda text, f=fold: say(f, text),
                out_dir=trial_dir / f"fold_{fold}", resume=fold_resume, train_ids=train_ids, val_ids=val_ids,
                val_split=context.split,
            )
        timings = dict(result.timings or {})
        if FIRST_STEP_AT not in state.timings and "loop_start_epoch" in timings:
            state.timings[FIRST_STEP_AT] = timings["loop_start_epoch"]
            trial_run.set_tags({TAG_FIRST_STEP_AT: iso_time(state.timings[FIRST_STEP_AT])})
        timings.pop("loop_start_epoch", None)
        for name, seconds in timings.items():
            state.timings[f"time/{name}"] = state.timings.get(f"time/{name}", 0.0) + seconds
        score = float(result.metrics[keys.VAL_MIOU_SEG])
        if not math.isfinite(score):
            raise RuntimeError(f"fold {fold}: non-finite {keys.VAL_MIOU_SEG}={score}")
        artifacts_started = time.perf_counter()
        if cache in state.pool_cache:
            state.pool_cache[cache] += 1
        _log_fold_artifacts(
            fold_run, cfg, trial_dir / f"fold_{fold}", result, data_root,
            sorted(val_ids)[: context.overlay_images], context.split,
        )
        fold_run.set_tags({TAG_POOL_CACHE: cache})
        fold_run.end("FINISHED")
        state.fold_scores.append(score)
        state.fold_baselines.append(float(result.metrics.get(keys.VAL_BASELINE_MIOU, math.nan)))
        state.fold_in_progress, state.fold_iteration = None, 0
        state.timings["time/artifacts_s"] += time.perf_counter() - artifacts_started
        summary = cv_metrics(state.fold_scores, state.fold_baselines)
        trial_run.log_metrics({FOLD_SCORE: score}, step=fold)
        trial_run.log_metrics(
            {**{k: v for k, v in summary.items() if math.isfinite(v)},  # no std from one fold
             **{k: v for k, v in state.timings.items() if k != FIRST_STEP_AT},  # that one is a tag
             "pool/cache_hits": state.pool_cache["hit"],
             "pool/cache_misses": state.pool_cache["miss"]},
            step=len(state.fold_scores),
        )
        if len(state.fold_scores) == k:
            trial_run.set_tags({TAG_STATUS: "completed"})
            trial_run.end("FINISHED")
        say(fold, f"{FOLD_SCORE}={score:.4f}  {CV_MEAN}={summary[CV_MEAN]:.4f} after {len(state.fold_scores)}/{k} folds")
        _report(
            {**summary, **state.timings, FOLD_SCORE: score, keys.VAL_BASELINE_MIOU: state.fold_baselines[-1],
             FOLD_INDEX: float(fold), FOLD_END: 1.0,
             keys.TRAIN_ITERATION: float(result.iterations)},
            state,
        )
        if context.crash_after_fold == fold and not (trial_dir / FAULT_MARKER).exists():
            (trial_dir / FAULT_MARKER).write_text(f"crash after fold {fold}\n")
            raise RuntimeError(f"injected crash after fold {fold}")

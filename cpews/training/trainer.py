"""The CPEWS training loop (method.md §8): iteration-based, with an injected reporter and injected hooks.

`train_loop(cfg, out_dir=..., hooks=...)` owns the model, the optimizer, autocast, validation and checkpoint
files. Progress leaves through `reporter(metrics, checkpoint_dir)`, so a sweep can receive metrics without this
module importing anything from the orchestration layer. The prototype module's hooks come in through `hooks`:
the public `cpews.training.train` (`cpews.training.default_hooks`) composes them, so this module does not
import `cpews.training.prototype_hooks` (their types live in `cpews.training.hooks`).

Under an initialised `torch.distributed` process group the loop runs data parallel (`cpews.training.distributed`):
each process trains on its slice of every global batch of `train.batch_size` images, the loss terms are shares
of the global batch's means and the gradients are summed, so the steps equal one process's on the whole batch;
only rank 0 validates, writes `out_dir` and calls the reporter.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from cpews.config import TrainConfig, config_to_yaml
from cpews.evaluation.evaluate import EvalResult, evaluate
from cpews.metrics import multilabel_f1
from cpews.model import CpewsNet, build_model
from cpews.training import keys
from cpews.training.checkpoint import (
    checkpoint_step,
    config_differences,
    newest_valid_checkpoint,
    resume_candidates,
    run_checkpoints,
    save_checkpoint,
    set_rng_state,
    write_atomically,
)
from cpews.training.data import class_names, eval_dataset, resolve_data_root, train_loader
from cpews.training.device import autocast_factory, select_device
from cpews.training.distributed import (
    WHOLE_BATCH,
    BatchSplit,
    all_reduce_gradients,
    barrier,
    broadcast_module,
    current_world,
    gather_rows,
    main_first,
    per_process_batch_size,
    process_device,
    rank_loader,
)
from cpews.training.hooks import NO_HOOKS, TrainHooks, TrainState
from cpews.training.optim import PolyWarmupAdamW, build_optimizer
from cpews.training.pretrain import resolve_weights
from cpews.training.progress import ProgressDisplay
from cpews.training.step import compute_losses


class Reporter(Protocol):
    def __call__(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainResult(NamedTuple):
    checkpoint: Path  # out_dir / "last.pt"
    iterations: int  # optimizer steps taken in total
    metrics: dict[str, float]  # the last validation metrics (val/...)
    wall_time: float  # seconds spent in this call
    timings: dict[str, float] | None = None  # seconds: setup, steps, eval, report; loop start (see `train_loop`)


def print_reporter(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    """Default reporter: validation lines to stdout (train lines are printed by the progress display)."""
    if any(k.startswith("val/") for k in metrics):
        text = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/"))
        print(f"[val] it={int(metrics.get(keys.TRAIN_ITERATION, 0))}  {text}", flush=True)


def _no_report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    """The reporter of the processes other than rank 0 (data parallel): rank 0 reports for all."""


def window_means(window: dict[str, list[torch.Tensor]], split: BatchSplit) -> dict[str, float]:
    """The mean over the logged steps of each loss term (`window`: name -> one 0-dim value per step in which
    the term was computed), each step's value summed over the processes first (data parallel: the values are
    the processes' shares), in one all-reduce."""
    names = sorted(window)
    values = split.sum(torch.cat([torch.stack(window[name]).float() for name in names]))
    means, offset = {}, 0
    for name in names:
        count = len(window[name])
        means[name] = float(values[offset : offset + count].mean())
        offset += count
    return means


def validation_metrics(result: EvalResult) -> dict[str, float]:
    """The `val/...` keys the trainer reports (see `cpews.training.keys`)."""
    m = result.metrics
    out = {
        keys.VAL_MIOU_CAM: m["miou_cam"],
        keys.VAL_MIOU_AUX_CAM: m["miou_aux_cam"],
        keys.VAL_MIOU_PSEUDO: m["miou_pseudo"],
        keys.VAL_MIOU_SEG: m["miou_seg"],
        keys.VAL_BASELINE_MIOU: m["baseline_miou"],
        keys.VAL_PSEUDO_IGNORED: m["pseudo_ignored_fraction"],
    }
    if "f1" in m:
        out[keys.VAL_F1] = m["f1"]
    if "confounder_false_activation" in m:
        out[keys.VAL_CONFOUNDER_FALSE_ACTIVATION] = m["confounder_false_activation"]
    if "confounder_image_bias" in m:
        out[keys.VAL_CONFOUNDER_IMAGE_BIAS] = m["confounder_image_bias"]
    if "confounded_class_iou_cam" in m:
        out[keys.VAL_CONFOUNDED_IOU] = m["confounded_class_iou_cam"]
    return out


def copy_atomically(source: Path, target: Path) -> Path:
    """Copy `source` to `target` through a temporary file beside `target` and `os.replace`, so that `target` is
    never half-written (a crash leaves the old file or none, and at most a hidden `.NAME.*.tmp`)."""
    return write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))


def periodic_checkpoints(out_dir: Path) -> list[Path]:
    """The periodic `iter_XXXXXXX.pt` checkpoints in `out_dir`, newest first (`run_checkpoints` less last.pt)."""
    return [p for p in run_checkpoints(out_dir) if checkpoint_step(p) is not None]


def prune_periodic_checkpoints(out_dir: Path, step: int, keep: int) -> list[Path]:
    """Delete the periodic checkpoints of at most `step` steps but the `keep` newest; returns the deleted files.

    What a resume needs stays: the newest (`step`'s) and `keep - 1` older ones to fall back to when it is
    damaged (every one was written atomically, so each is complete). Files of more steps, left in `out_dir` by an
    earlier attempt of a resumed run, are left alone (the run rewrites or ends them). `keep == 0` keeps all.
    """
    if keep == 0:
        return []
    older = [p for p in periodic_checkpoints(out_dir) if (checkpoint_step(p) or 0) <= step][keep:]
    for path in older:
        path.unlink(missing_ok=True)
    return older


def end_periodic_checkpoints(out_dir: Path, keep: int) -> list[Path]:
    """Delete every periodic checkpoint of a run that has finished (`last.pt` holds its end), unless `keep == 0`.

    Nothing reads them after a run: a sweep resumes an unfinished fold from its Tune checkpoint or the fold's
    `last.pt` (`orchestration.trial.load_trial_state`); `keep == 0` keeps them for analyses of a past step
    (`benchmarks/pool_confounder.py`).
    """
    if keep == 0:
        return []
    ended = periodic_checkpoints(out_dir)
    for path in ended:
        path.unlink(missing_ok=True)
    return ended


def restore_checkpoint(path: str | Path, cfg: TrainConfig, model: CpewsNet, optimizer: PolyWarmupAdamW) -> int:
    """Load model, optimizer, schedule position and RNG state; returns the iteration to continue from.

    A damaged `path` (truncated, garbage, ...) falls back to the newest valid older checkpoint of the same run
    (`last.pt` to the `iter_XXXXXXX.pt` beside it; see `resume_candidates`), with a warning naming the damaged file.

    Raises:
        CheckpointError: `path` is missing, or damaged with no valid older checkpoint (the message names `path`).
        ValueError: the checkpoint's model settings differ from `cfg` (a resume must keep the architecture).
    """
    path, checkpoint, _ = newest_valid_checkpoint(resume_candidates(path))
    differences = config_differences(checkpoint.cfg, cfg, ("proto.num_prototypes",))
    if differences:
        raise ValueError(f"cannot resume from {str(path)!r}: the model differs from the checkpoint's ({', '.join(differences)})")
    model.load_state_dict(checkpoint.model)
    if checkpoint.optimizer is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
    set_rng_state(checkpoint.rng)
    return checkpoint.iteration


def train_loop(
    cfg: TrainConfig,
    reporter: Reporter | None = None,
    *,
    out_dir: str | Path,
    resume: str | Path | None = None,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
    val_split: str | None = None,
    hooks: TrainHooks = NO_HOOKS,
    progress: bool | None = None,
) -> TrainResult:
    """Train CPEWS for `cfg.optim.max_iters` optimizer steps with exactly `hooks` (none by default).

    The arguments are those of the public `cpews.training.train`, which passes the prototype module's hooks
    when given none. Every `train.checkpoint_every` steps `last.pt` is copied to `iter_XXXXXXX.pt` and the
    periodic checkpoints but the newest `train.keep_checkpoints` are deleted; a run that finishes deletes them
    all (`last.pt` holds its end), unless `train.keep_checkpoints` is 0.

    Data parallel (a process group is initialised; see the module docstring), every process calls this with the
    same arguments; `resume` must be readable by each. Rank 0 returns the result, the others return theirs with
    no validation metrics, once rank 0 has written its files.

    `TrainResult.timings` splits the wall time: `setup_s` (model, data, resume), `steps_s` (batches, forward,
    backward, hooks such as pool builds, checkpoint writes), `eval_s` (validation) and `report_s` (time inside
    `reporter`, e.g. a sweep's tracking and Tune reports); `loop_start_epoch` is the wall-clock time (Unix
    seconds) at which the first step began.
    """
    started = time.perf_counter()
    world = current_world()
    per_process_batch_size(cfg.train.batch_size, world)  # a global batch that does not split is refused here
    split = BatchSplit(world) if world.distributed else WHOLE_BATCH
    reporter = (reporter or print_reporter) if world.is_main else _no_report
    out_dir = Path(out_dir)
    device = process_device(select_device(cfg.train.device), world)
    data_root = main_first(world, lambda: resolve_data_root(cfg))
    names = class_names(cfg)
    # a resumed run takes every weight from its checkpoint: the backbone file is neither read nor made
    say = (lambda text: print(text, flush=True)) if world.is_main else None
    weights = "" if resume else main_first(world, lambda: resolve_weights(cfg, progress=say))
    torch.manual_seed(cfg.train.seed)  # after a pretraining made on first use, which draws from the same generator
    model = build_model(cfg, num_classes=len(names) - 1, weights=weights).to(device)
    optimizer = build_optimizer(cfg, model)
    start_iter = 0
    if resume:
        start_iter = restore_checkpoint(resume, cfg, model, optimizer)
    loader = rank_loader(train_loader(cfg, data_root, ids=train_ids, start_batch=start_iter), world)
    val_data = eval_dataset(cfg, data_root, split=val_split, ids=val_ids, resize=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    autocast = autocast_factory(cfg, device)
    state_args = dict(cfg=cfg, model=model, data_root=data_root, train_ids=train_ids, out_dir=out_dir)
    if start_iter == 0:
        for hook in hooks.before_training:  # e.g. the prototype pool from proto.checkpoint (method.md §6.1)
            hook(TrainState(iteration=0, **state_args))
    broadcast_module(model, world)  # every process starts from rank 0's model (and a before_training hook's pool)
    max_iters = cfg.optim.max_iters
    display = ProgressDisplay(max_iters, sys.stderr.isatty() if progress is None else progress)
    if not world.is_main:  # rank 0 shows the progress of all
        display = ProgressDisplay(max_iters, False, emit=lambda line: None)
    last_val: dict[str, float] = {}
    window: dict[str, list[torch.Tensor]] = {}
    stats_window: dict[str, list[torch.Tensor]] = {}
    f1_logits: list[torch.Tensor] = []
    f1_labels: list[torch.Tensor] = []
    window_start, window_iters = time.perf_counter(), 0
    timings = {"setup_s": time.perf_counter() - started, "steps_s": 0.0, "eval_s": 0.0, "report_s": 0.0,
               "loop_start_epoch": time.time()}
    outer_reporter = reporter

    def reporter(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        begin = time.perf_counter()
        outer_reporter(metrics, checkpoint_dir)
        timings["report_s"] += time.perf_counter() - begin

    model.train()

    def save(it: int) -> Path:
        return save_checkpoint(
            out_dir / "last.pt", cfg=cfg, iteration=it, model=model, optimizer=optimizer,
            class_names=names, metrics=last_val,
        )

    def validate(it: int) -> None:
        nonlocal last_val
        begin = time.perf_counter()
        result = evaluate(
            model, val_data, cfg, class_names=names, device=device,
            max_images=cfg.eval.max_images, data_root=data_root,
        )
        last_val = validation_metrics(result)
        timings["eval_s"] += time.perf_counter() - begin

    for it, batch in zip(range(start_iter, max_iters), loader):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        losses = compute_losses(
            model, batch, cfg, it, extra_terms=hooks.extra_terms, autocast=autocast, split=split)
        check_now = (it + 1) % max(1, cfg.train.check_finite_every) == 0 or it == start_iter
        if check_now and not torch.isfinite(split.sum(losses.total)):  # the global batch's: every process stops
            values = {name: float(value.detach()) for name, value in losses.terms.items()}
            raise NonFiniteLossError(
                f"non-finite loss at iteration {it}: total={float(losses.total.detach())} terms={values}"
            )
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        all_reduce_gradients(model.parameters(), world)
        optimizer.step()
        for name, value in {**losses.terms, "total": losses.total}.items():
            window.setdefault(name, []).append(value.detach())  # synced only when logged
        for name, value in losses.stats.items():
            stats_window.setdefault(name, []).append(value.detach().float())
        f1_logits.append(losses.output.logits.detach().float())
        f1_labels.append(batch["labels"])
        window_iters += 1
        step_count = it + 1
        for hook in hooks.after_step:
            hook(TrainState(iteration=step_count, **state_args))
        if step_count % cfg.train.log_every == 0 or step_count == max_iters:
            elapsed = time.perf_counter() - window_start
            means = window_means(window, split)
            metrics = {keys.loss_key(n): v for n, v in means.items() if n != "total"}
            metrics[keys.TRAIN_LOSS] = means["total"]
            metrics[keys.TRAIN_F1] = multilabel_f1(
                gather_rows(torch.cat(f1_logits), world), gather_rows(torch.cat(f1_labels), world))
            metrics[keys.TRAIN_LR] = optimizer.param_groups[0]["lr"]
            metrics[keys.TRAIN_STEPS_PER_SEC] = window_iters / elapsed if elapsed > 0 else math.inf
            metrics[keys.TRAIN_ITERATION] = float(step_count)
            for name, values in stats_window.items():
                value = float(torch.stack(values).nanmean())  # NaN entries: steps where it was undefined
                if math.isfinite(value):
                    metrics[keys.stat_key(name)] = value
            if not math.isfinite(metrics[keys.TRAIN_LOSS]):
                raise NonFiniteLossError(f"non-finite loss at iteration {it}: {metrics}")
            display.update(step_count, f"loss={metrics[keys.TRAIN_LOSS]:.4f} f1={metrics[keys.TRAIN_F1]:.3f} "
                           f"{metrics[keys.TRAIN_STEPS_PER_SEC]:.1f} it/s")
            reporter(metrics, None)
            window, stats_window, f1_logits, f1_labels = {}, {}, [], []
            window_start, window_iters = time.perf_counter(), 0
        final = step_count == max_iters
        validate_now = final or (cfg.eval.every and step_count % cfg.eval.every == 0)
        periodic = bool(cfg.train.checkpoint_every) and step_count % cfg.train.checkpoint_every == 0
        if not world.is_main:  # rank 0 validates and writes; the others wait for it at the next collective
            continue
        if validate_now:
            validate(step_count)
        if validate_now or periodic:
            last = save(step_count)
            if periodic and not final:
                copy_atomically(last, out_dir / f"iter_{step_count:07d}.pt")
                prune_periodic_checkpoints(out_dir, step_count, cfg.train.keep_checkpoints)
            reported = {**last_val, keys.TRAIN_ITERATION: float(step_count)} if validate_now else {
                keys.TRAIN_ITERATION: float(step_count)}
            reporter(reported, out_dir)
    display.close()
    final_iter = max(start_iter, max_iters)
    if world.is_main:
        if start_iter >= max_iters:  # nothing left to train: score the checkpoint as it is
            validate(final_iter)
            save(final_iter)
            reporter({**last_val, keys.TRAIN_ITERATION: float(final_iter)}, out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(last_val, indent=2, sort_keys=True))
        end_periodic_checkpoints(out_dir, cfg.train.keep_checkpoints)
    barrier(world)  # no process returns before rank 0's files are written
    wall = time.perf_counter() - started
    loop_s = wall - timings["setup_s"]
    timings["steps_s"] = max(0.0, loop_s - timings["eval_s"] - timings["report_s"])
    return TrainResult(out_dir / "last.pt", final_iter, last_val, wall, timings)

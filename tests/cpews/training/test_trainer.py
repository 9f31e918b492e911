"""The training loop on the micro preset (CPU, synthetic data): files, reported metrics, loss schedule,
checkpoints, resume, extension hooks and the errors raised before or during training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cpews.config import load_config
from cpews.data import SYNTHETIC_CLASSES, DatasetError
from cpews.training import (
    CheckpointError,
    LossTerm,
    NonFiniteLossError,
    TrainHooks,
    keys,
    load_checkpoint,
    train,
)
from cpews.training.default_hooks import default_hooks

TRAIN_KEYS = {keys.TRAIN_LOSS, keys.TRAIN_LOSS_CLS, keys.TRAIN_LOSS_ISM, keys.TRAIN_LR, keys.TRAIN_F1}
VAL_MIOU_KEYS = (keys.VAL_MIOU_CAM, keys.VAL_MIOU_AUX_CAM, keys.VAL_MIOU_PSEUDO, keys.VAL_MIOU_SEG)


def _train_reports(reports: list) -> list[dict]:
    return [m for m, _ in reports if keys.TRAIN_LOSS in m]


def _val_reports(reports: list) -> list[tuple[dict, Path | None]]:
    return [(m, d) for m, d in reports if keys.VAL_MIOU_SEG in m]


def _recorder(store: list) -> list:
    return lambda metrics, checkpoint_dir: store.append((dict(metrics), checkpoint_dir))


def _fingerprint_term(store: list) -> LossTerm:
    """A zero-valued term (changes neither the total nor the gradients) that records each step's batch."""

    def compute(ctx) -> torch.Tensor:
        store.append((ctx.iteration, float(ctx.images.double().sum()), ctx.labels.tolist()))
        return torch.zeros(())

    return LossTerm("fingerprint", lambda cfg, it: 1.0, compute)


# ------------------------------------------------------------------------------------------------------------
# One ordinary run (session fixture `trained_run`: 6 iterations, log every 2, seg warm-up 2).
# ------------------------------------------------------------------------------------------------------------


def test_run_writes_config_checkpoint_and_metrics(trained_run):
    out = trained_run.out_dir
    assert {"config.yaml", "last.pt", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert trained_run.result.checkpoint == out / "last.pt"
    assert trained_run.result.iterations == 6
    # config.yaml is the full resolved config: loading it back gives the same config
    assert load_config(out / "config.yaml") == trained_run.cfg
    # metrics.json holds the last validation metrics, as returned
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(trained_run.result.metrics)


def test_reporter_gets_train_metrics_at_every_log_interval(trained_run):
    train_reports = _train_reports(trained_run.reports)
    assert [m[keys.TRAIN_ITERATION] for m in train_reports] == [2.0, 4.0, 6.0]
    for metrics in train_reports:
        assert TRAIN_KEYS <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics[keys.TRAIN_F1] <= 1.0
    # seg_warmup_iters=2: L_seg is off for it = 0, 1, 2 (0-based) and on from it = 3, i.e. in the windows
    # that end at steps 4 and 6 but not in the one ending at step 2
    assert [keys.TRAIN_LOSS_SEG in m for m in train_reports] == [False, True, True]
    # train/lr is the backbone lr of the window's last step s = step - 1, by hand for lr=1e-3, warm-up 2,
    # max 6, power 0.9: s=1 -> 1 - (1 - 1/2)(1 - 1e-6); s=3 -> (1 - 3/6)^0.9; s=5 -> (1/6)^0.9
    expected_lr = [1e-3 * (1 - 0.5 * (1 - 1e-6)), 1e-3 * 0.5**0.9, 1e-3 * (1 / 6) ** 0.9]
    assert [m[keys.TRAIN_LR] for m in train_reports] == pytest.approx(expected_lr, rel=1e-9)


def test_reporter_gets_validation_metrics_with_checkpoint_dir_at_the_end(trained_run):
    val_reports = _val_reports(trained_run.reports)
    assert len(val_reports) == 1  # eval.every=0: only the final validation
    metrics, checkpoint_dir = val_reports[0]
    assert trained_run.reports[-1] == val_reports[0]
    assert checkpoint_dir == trained_run.out_dir
    assert metrics[keys.TRAIN_ITERATION] == 6.0
    for key in VAL_MIOU_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert {k: v for k, v in metrics.items() if k.startswith("val/")} == trained_run.result.metrics
    # beside the scores, the all-background mIoU of the same validation images (their masks alone decide it)
    from cpews.metrics import all_background_confusion, segmentation_scores
    from cpews.training.data import eval_dataset, resolve_data_root

    cfg = trained_run.cfg
    val = eval_dataset(cfg, resolve_data_root(cfg))
    count = min(cfg.eval.max_images, len(val)) if cfg.eval.max_images > 0 else len(val)
    confusion = sum(all_background_confusion(val[i]["mask"], len(SYNTHETIC_CLASSES)) for i in range(count))
    assert metrics[keys.VAL_BASELINE_MIOU] == pytest.approx(segmentation_scores(confusion).miou)
    # train reports never carry a checkpoint dir
    assert all(d is None for m, d in trained_run.reports if keys.TRAIN_LOSS in m)


def test_checkpoint_round_trips_with_weights_only_load(trained_run):
    cfg, path = trained_run.cfg, trained_run.out_dir / "last.pt"
    ckpt = load_checkpoint(path)
    assert ckpt.iteration == 6
    assert ckpt.cfg == cfg
    assert ckpt.class_names == list(SYNTHETIC_CLASSES)
    assert ckpt.metrics == pytest.approx(trained_run.result.metrics)
    assert ckpt.optimizer["global_step"] == 6
    assert isinstance(ckpt.rng["torch"], torch.Tensor) and ckpt.rng["torch"].dtype == torch.uint8
    # the raw file holds the flat config exactly, and loads without pickle (weights_only)
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == cfg.to_flat_dict()
    # the saved weights are the trained model's
    state = trained_run.model.state_dict()
    assert ckpt.model.keys() == state.keys()
    assert all(torch.equal(ckpt.model[k], state[k].cpu()) for k in state)


def test_foreign_files_are_refused_with_their_path(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "iteration": 3}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------------------
# Loss schedule and extra terms (one run with a report per iteration).
# ------------------------------------------------------------------------------------------------------------

CONST_VALUE, CONST_WEIGHT, CONST_FROM = 2.5, 0.4, 2


@pytest.fixture(scope="module")
def per_step_reports(make_micro_config, tmp_path_factory) -> tuple[object, list[dict], list[int]]:
    cfg = make_micro_config(
        "optim.max_iters=4", "train.log_every=1", "loss.seg_warmup_iters=1", "loss.ism_warmup_iters=10"
    )
    weight_calls: list[int] = []

    def const_weight(c, it: int) -> float:
        weight_calls.append(it)
        return CONST_WEIGHT if it >= CONST_FROM else 0.0

    term = LossTerm("const", const_weight, lambda ctx: torch.tensor(CONST_VALUE))
    reports: list = []
    train(
        cfg,
        _recorder(reports),
        out_dir=tmp_path_factory.mktemp("per_step"),
        hooks=TrainHooks(extra_terms=(term,)),
        progress=False,
    )
    return cfg, _train_reports(reports), weight_calls


def test_seg_term_only_after_its_warmup_and_ism_off_during_its_warmup(per_step_reports):
    _, reports, _ = per_step_reports
    assert [m[keys.TRAIN_ITERATION] for m in reports] == [1.0, 2.0, 3.0, 4.0]
    # the report of step s covers iteration it = s - 1; seg_warmup_iters=1: off while it <= 1
    assert [keys.TRAIN_LOSS_SEG in m for m in reports] == [False, False, True, True]
    # ism_warmup_iters=10 > max_iters: never computed
    assert not any(keys.TRAIN_LOSS_ISM in m for m in reports)


def test_extra_term_is_reported_and_weighted(per_step_reports):
    cfg, reports, weight_calls = per_step_reports
    assert weight_calls == [0, 1, 2, 3]  # the weight callable sees the 0-based iteration
    const_key = keys.loss_key("const")
    assert [const_key in m for m in reports] == [False, False, True, True]  # weight 0 = not computed
    for m in reports:
        # train/loss is the weighted sum of the reported unweighted terms (one iteration per report)
        expected = (
            cfg.loss.cls_weight * m[keys.TRAIN_LOSS_CLS] + cfg.loss.aux_cls_weight * m["train/loss_cls_aux"]
        )
        expected += cfg.loss.seg_weight * m.get(keys.TRAIN_LOSS_SEG, 0.0)
        if const_key in m:
            assert m[const_key] == CONST_VALUE
            expected += CONST_WEIGHT * CONST_VALUE  # 0.4 * 2.5 = 1.0 added to the total
        assert m[keys.TRAIN_LOSS] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Resume.
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_runs(make_micro_config, tmp_path_factory):
    """6 iterations in one go (checkpoint at 3, kept after the run) and the same config resumed from it."""
    cfg = make_micro_config(
        "train.log_every=1", "eval.every=3", "train.checkpoint_every=3", "train.keep_checkpoints=0"
    )
    root = tmp_path_factory.mktemp("resume")
    full_batches, full_reports = [], []
    train(
        cfg,
        _recorder(full_reports),
        out_dir=root / "full",
        hooks=TrainHooks(extra_terms=(_fingerprint_term(full_batches),)),
        progress=False,
    )
    middle = root / "full" / "iter_0000003.pt"
    resumed_batches, resumed_reports = [], []
    result = train(
        cfg,
        _recorder(resumed_reports),
        out_dir=root / "resumed",
        resume=middle,
        hooks=TrainHooks(extra_terms=(_fingerprint_term(resumed_batches),)),
        progress=False,
    )
    return {
        "cfg": cfg,
        "root": root,
        "middle": middle,
        "result": result,
        "full": (full_batches, _train_reports(full_reports)),
        "resumed": (resumed_batches, _train_reports(resumed_reports)),
    }


def test_periodic_checkpoint_holds_the_middle_of_the_run(resumed_runs):
    ckpt = load_checkpoint(resumed_runs["middle"])
    assert ckpt.iteration == 3 and ckpt.optimizer["global_step"] == 3
    # the mid-run validation was reported with the checkpoint dir
    assert (resumed_runs["root"] / "full" / "last.pt").is_file()


def test_resume_continues_at_the_checkpoint_iteration(resumed_runs):
    _, full_reports = resumed_runs["full"]
    resumed_batches, resumed_reports = resumed_runs["resumed"]
    assert [it for it, *_ in resumed_batches] == [3, 4, 5]  # 0-based iterations computed after resuming
    assert [m[keys.TRAIN_ITERATION] for m in resumed_reports] == [4.0, 5.0, 6.0]
    assert resumed_runs["result"].iterations == 6
    final = load_checkpoint(resumed_runs["root"] / "resumed" / "last.pt")
    assert final.iteration == 6 and final.optimizer["global_step"] == 6
    # same schedule position: identical learning rates at the same steps
    assert [m[keys.TRAIN_LR] for m in resumed_reports] == [m[keys.TRAIN_LR] for m in full_reports[3:]]


def test_resumed_run_sees_the_same_batches_and_ends_with_the_same_weights(resumed_runs):
    full_batches, _ = resumed_runs["full"]
    resumed_batches, _ = resumed_runs["resumed"]
    assert resumed_batches == full_batches[3:]
    full = load_checkpoint(resumed_runs["root"] / "full" / "last.pt").model
    resumed = load_checkpoint(resumed_runs["root"] / "resumed" / "last.pt").model
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_periodic_checkpoints_follow_checkpoint_every_without_validation(make_micro_config, tmp_path):
    cfg = make_micro_config(
        "eval.every=0", "train.checkpoint_every=2", "train.log_every=6", "train.keep_checkpoints=0"
    )
    train(cfg, _recorder([]), out_dir=tmp_path, progress=False)
    for it in (2, 4):  # keep_checkpoints=0: all kept, also after the run
        path = tmp_path / f"iter_{it:07d}.pt"
        assert path.is_file(), sorted(p.name for p in tmp_path.iterdir())
        assert load_checkpoint(path).iteration == it


# ------------------------------------------------------------------------------------------------------------
# Hooks: the public `train` composes the prototype module's (cpews.training.default_hooks).
# ------------------------------------------------------------------------------------------------------------


def test_default_hooks_are_the_prototype_modules_unless_no_builds(make_micro_config):
    assert default_hooks(make_micro_config("proto.n_builds=0")) == TrainHooks()
    hooks = default_hooks(make_micro_config())
    assert [term.name for term in hooks.extra_terms] == ["pdl", "ssl"]
    assert (len(hooks.after_step), len(hooks.before_training)) == (1, 1)


def test_train_without_hooks_builds_the_pool_and_with_empty_hooks_does_not(make_micro_config, tmp_path):
    cfg = make_micro_config(
        "optim.max_iters=2", "proto.build_iter=1", "proto.resize=64", "proto.num_prototypes=3"
    )
    train(cfg, _recorder([]), out_dir=tmp_path / "default", progress=False)
    assert (tmp_path / "default" / "pool" / "pool_it0000001.pt").is_file()
    train(cfg, _recorder([]), out_dir=tmp_path / "none", hooks=TrainHooks(), progress=False)
    assert not (tmp_path / "none" / "pool").exists()


# ------------------------------------------------------------------------------------------------------------
# Periodic checkpoints kept: what a resume needs while the run goes on, none after (last.pt stays).
# ------------------------------------------------------------------------------------------------------------

EVERY_STEP = ("optim.max_iters=5", "train.checkpoint_every=1", "eval.every=0", "train.log_every=5")


def _folder_at_checkpoints(store: list):
    """A reporter that records, at each report with a checkpoint, (step, the checkpoint files in the folder and
    the step each holds)."""

    def record(metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            files = {p.name: load_checkpoint(p).iteration for p in sorted(checkpoint_dir.glob("*.pt"))}
            store.append((int(metrics[keys.TRAIN_ITERATION]), files))

    return record


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("keep", "kept"),
    [
        # the newest and one older: 1 | 1 2 | 2 3 | 3 4 | 3 4 (step 5 is the last: last.pt only)
        (2, [[1], [1, 2], [2, 3], [3, 4], [3, 4]]),
        (1, [[1], [2], [3], [4], [4]]),
    ],
)
def test_a_run_keeps_the_newest_periodic_checkpoints_and_none_after(make_micro_config, tmp_path, keep, kept):
    cfg = make_micro_config(*EVERY_STEP, f"train.keep_checkpoints={keep}")
    seen: list = []
    train(cfg, _folder_at_checkpoints(seen), out_dir=tmp_path, hooks=TrainHooks(), progress=False)
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5]
    for (step, files), steps in zip(seen, kept):
        assert files == {"last.pt": step, **{f"iter_{s:07d}.pt": s for s in steps}}, step
    assert _names(tmp_path) == ["config.yaml", "last.pt", "metrics.json"]  # no iter_*.pt, no temporary file
    assert load_checkpoint(tmp_path / "last.pt").iteration == 5


def test_a_crashed_run_resumes_from_the_older_kept_checkpoint(make_micro_config, tmp_path, capfd):
    """Stopped at step 4, the folder holds last.pt, iter_3 and iter_4; with last.pt and iter_4 damaged the resume
    falls back to iter_3, trains steps 4 and 5, and ends with last.pt alone."""
    cfg = make_micro_config(*EVERY_STEP)  # keep_checkpoints: the default 2

    class Crash(Exception):
        pass

    def crash_at_step_4(metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None and metrics[keys.TRAIN_ITERATION] == 4:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, crash_at_step_4, out_dir=tmp_path, hooks=TrainHooks(), progress=False)
    assert _names(tmp_path) == ["config.yaml", "iter_0000003.pt", "iter_0000004.pt", "last.pt"]
    for damaged in ("last.pt", "iter_0000004.pt"):
        (tmp_path / damaged).write_bytes(bytes(range(256)) * 16)
    batches: list = []
    result = train(
        cfg,
        _recorder([]),
        out_dir=tmp_path,
        resume=tmp_path / "last.pt",
        hooks=TrainHooks(extra_terms=(_fingerprint_term(batches),)),
        progress=False,
    )
    assert f"resuming from the newest valid checkpoint {str(tmp_path / 'iter_0000003.pt')!r} (step 3)" in (
        capfd.readouterr().err
    )
    assert [it for it, *_ in batches] == [3, 4] and result.iterations == 5
    assert _names(tmp_path) == ["config.yaml", "last.pt", "metrics.json"]
    assert load_checkpoint(tmp_path / "last.pt").iteration == 5


def test_resume_with_a_longer_schedule_uses_the_new_config(make_micro_config, tmp_path):
    short = make_micro_config("optim.max_iters=3", "train.log_every=1")
    train(short, _recorder([]), out_dir=tmp_path / "short", progress=False)
    assert load_checkpoint(tmp_path / "short" / "last.pt").cfg.optim.max_iters == 3
    longer = make_micro_config("optim.max_iters=6", "train.log_every=1")
    reports: list = []
    result = train(
        longer,
        _recorder(reports),
        out_dir=tmp_path / "longer",
        resume=tmp_path / "short" / "last.pt",
        progress=False,
    )
    train_reports = _train_reports(reports)
    assert result.iterations == 6
    assert [m[keys.TRAIN_ITERATION] for m in train_reports] == [4.0, 5.0, 6.0]
    # the lr follows the new schedule (max_iters=6) from s=3 on: (1 - s/6)^0.9, not the checkpoint's max_iters=3
    assert [m[keys.TRAIN_LR] for m in train_reports] == pytest.approx(
        [1e-3 * (1 - s / 6) ** 0.9 for s in (3, 4, 5)], rel=1e-9
    )
    assert load_checkpoint(tmp_path / "longer" / "last.pt").cfg == longer
    assert load_config(tmp_path / "longer" / "config.yaml") == longer


# ------------------------------------------------------------------------------------------------------------
# Failures.
# ------------------------------------------------------------------------------------------------------------


def test_nan_loss_term_raises_with_the_terms_named(make_micro_config, tmp_path):
    cfg = make_micro_config("optim.max_iters=3")
    nan_term = LossTerm("broken", lambda c, it: 1.0, lambda ctx: ctx.output.logits.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, _recorder([]), out_dir=tmp_path, hooks=TrainHooks(extra_terms=(nan_term,)), progress=False)
    message = str(info.value)
    assert "iteration 0" in message  # the first iteration is always checked
    assert "'broken': nan" in message and "'cls':" in message and "'ism':" in message
    assert not (tmp_path / "last.pt").exists()


def test_nan_between_finite_checks_is_caught_at_the_next_log(make_micro_config, tmp_path):
    # non-finite checks only every 100 iterations (and at the first); the log at step 4 must still catch a
    # NaN that first appears at it = 2 (its gradient poisons the weights, so it stays NaN)
    cfg = make_micro_config("optim.max_iters=6", "train.log_every=4", "train.check_finite_every=100")
    nan_term = LossTerm(
        "broken", lambda c, it: 1.0 if it == 2 else 0.0, lambda ctx: ctx.output.logits.sum() * float("nan")
    )
    reports: list = []
    with pytest.raises(NonFiniteLossError, match="train/loss_broken"):
        train(
            cfg,
            _recorder(reports),
            out_dir=tmp_path,
            hooks=TrainHooks(extra_terms=(nan_term,)),
            progress=False,
        )
    assert reports == []  # the non-finite window was not reported


def test_missing_dataset_folder_fails_before_anything_is_written(make_micro_config, tmp_path):
    root = tmp_path / "VOC2012"
    (root / "SegmentationClassAug").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    cfg = make_micro_config("data.dataset=voc", f"data.root={root}")
    out_dir = tmp_path / "out"
    with pytest.raises(DatasetError, match=str(root / "JPEGImages")):
        train(cfg, _recorder([]), out_dir=out_dir, progress=False)
    assert not out_dir.exists()


def test_batch_larger_than_the_training_set_is_a_clear_error(make_micro_config, tmp_path):
    cfg = make_micro_config("train.batch_size=33")  # the training set has 32 images
    with pytest.raises(
        ValueError, match=r"train\.batch_size=33 is larger than the training set \(32 images\)"
    ):
        train(cfg, _recorder([]), out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_train_ids_that_are_not_in_the_split_are_refused(make_micro_config, tmp_path):
    cfg = make_micro_config()
    with pytest.raises(DatasetError, match="not_an_id"):
        train(cfg, _recorder([]), out_dir=tmp_path, train_ids=["not_an_id"] * 8, progress=False)


# ------------------------------------------------------------------------------------------------------------
# Learning.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_micro_model_learns_the_synthetic_classes(make_micro_config, tmp_path):
    """250 iterations of `test_micro` (96 + 24 images, ~30 s on a CPU): the classification loss falls, the
    image-level F1 rises, and the validation CAM mIoU doubles over the untrained model's.

    Measured on this preset (seed 0): train F1 0.28 -> 0.40, val CAM mIoU 0.10 (untrained) -> 0.22. The tiny
    from-scratch ViT learns slowly; F1 > 0.75 / CAM mIoU > 0.35 need far more than 250 iterations.
    """
    sizes = ("data.synthetic_train=96", "data.synthetic_val=24", "eval.max_images=0")
    untrained = train(
        make_micro_config(*sizes, "optim.max_iters=0"),
        _recorder([]),
        out_dir=tmp_path / "untrained",
        progress=False,
    )
    cfg = make_micro_config(*sizes, "optim.max_iters=250", "train.log_every=50")
    reports: list = []
    result = train(cfg, _recorder(reports), out_dir=tmp_path / "trained", progress=False)
    windows = _train_reports(reports)
    assert [m[keys.TRAIN_ITERATION] for m in windows] == [50.0, 100.0, 150.0, 200.0, 250.0]
    cls_losses = [m[keys.TRAIN_LOSS_CLS] for m in windows]
    f1s = [m[keys.TRAIN_F1] for m in windows]
    assert cls_losses[-1] < 0.85 * cls_losses[0], cls_losses
    assert f1s[-1] > f1s[0] + 0.08, f1s
    assert untrained.metrics[keys.VAL_MIOU_CAM] < 0.15, untrained.metrics
    assert result.metrics[keys.VAL_MIOU_CAM] > 0.18, result.metrics
    assert result.metrics[keys.VAL_MIOU_CAM] > 1.5 * untrained.metrics[keys.VAL_MIOU_CAM]

"""Trainer hooks of the Contextual Prototype Module (method.md §6.1, §7, §8.1-§8.2).

`prototype_hooks(cfg)` returns the `TrainHooks` that add CPM to `train(...)`:

* two loss terms, `pdl` (§7.2) and `ssl` (§7.3), whose weights are `loss.pdl_weight` / `loss.ssl_weight` once
  the pool exists and 0 before (so they are not computed);
* an `after_step` hook that builds the pool (§6) from the current model at the scheduled step counts, installs
  it in the model's buffers and writes `out_dir/pool/pool_itXXXXXXX.{pt,json,png}` plus `pool.{pt,json,png}`
  (the latest);
* a `before_training` hook for the builds at step 0: `proto.source=checkpoint` (load the checkpoint's weights,
  then build from them, FPR-style) or `proto.source=warmup` with `proto.build_iter=0`.

Iteration conventions: `LossTerm.weight(cfg, it)` receives the 0-based iteration about to run; `after_step`
receives the number of optimizer steps taken. A pool built after step `b` (`state.iteration == b`) is used from
iteration index `b` on, so the terms are active for `it >= pool_build_iterations(cfg)[0]`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cpews.cam import token_boxes, valid_token_mask
from cpews.config import TrainConfig
from cpews.data import class_table
from cpews.data.remote import download_if_exists, is_s3, local_cache_dir, upload
from cpews.model import CpewsNet
from cpews.prototype_losses import pdl_loss, ssl_loss
from cpews.prototypes import (
    Pool,
    PoolError,
    build_pool,
    dataset_content_key,
    load_cached_pool,
    plot_pool,
    pool_params,
    save_pool,
)
from cpews.training.checkpoint import config_differences, load_checkpoint, warn
from cpews.training.data import eval_dataset
from cpews.training.device import autocast_factory
from cpews.training.distributed import broadcast_tensors, current_world
from cpews.training.hooks import TrainHooks, TrainState
from cpews.training.step import LossTerm, StepContext

BUILD_BATCH_SIZE = (
    16  # images per forward of the pool build (6 views each); memory only, no effect on results [I]
)
POOL_DIR = "pool"

# Per-step diagnostics (detached 0-dim tensors), logged as train/<name> (method.md §13 choice 3).
STAT_PDL_RMS_POS = "pdl_rms_pos"  # mean RMS distance δ of the region features to p̄_c over the PDL pairs
STAT_PDL_RMS_NEG = "pdl_rms_neg"  # mean RMS distance to the closest negative over the PDL pairs
STAT_PDL_PAIRS = "pdl_pairs"  # |𝒥|
STAT_SSL_TOKENS = "ssl_tokens"  # number of suppressed (b, c, i)


def pool_build_iterations(cfg: TrainConfig) -> list[int]:
    """Step counts after which the pool is (re)built (§6.1, Table 3 / §13 choice 19).

    With `n = proto.n_builds`, `start = proto.build_iter` (source "warmup") or 0 (source "checkpoint": the first
    build happens before training) and `T = optim.max_iters`, build `k = 0..n-1` happens after step
        start + k * ((T - start) // n).
    `n = 0` gives [] (CPM off). Builds at or after `T` would never be used and are dropped, and coinciding builds
    (when `(T - start) // n == 0`) are merged, so the list is strictly increasing.
    """
    p = cfg.proto
    if p.n_builds < 0:
        raise ValueError(f"proto.n_builds={p.n_builds} must be >= 0")
    if p.n_builds == 0:
        return []
    start = p.build_iter if p.source == "warmup" else 0
    if start < 0:
        raise ValueError(f"proto.build_iter={p.build_iter} must be >= 0")
    max_iters = cfg.optim.max_iters
    spacing = max(0, max_iters - start) // p.n_builds
    return sorted({start + k * spacing for k in range(p.n_builds) if start + k * spacing < max_iters})


def pool_active(cfg: TrainConfig, iteration: int) -> bool:
    """Whether the pool exists at the 0-based iteration `iteration` (it is built after step `builds[0]`)."""
    builds = pool_build_iterations(cfg)
    return bool(builds) and iteration >= builds[0]


def pdl_weight(cfg: TrainConfig, iteration: int) -> float:
    return cfg.loss.pdl_weight if pool_active(cfg, iteration) else 0.0


def ssl_weight(cfg: TrainConfig, iteration: int) -> float:
    return cfg.loss.ssl_weight if pool_active(cfg, iteration) else 0.0


def valid_tokens(ctx: StepContext) -> Tensor:
    """(B, h, w) bool: tokens whose patch centre lies in the crop's valid box (§2.4(b)-(c))."""
    grid = tuple(ctx.output.tokens.shape[-2:])
    return valid_token_mask(token_boxes(ctx.boxes, ctx.model.patch_size, grid, mode="token"), grid)


def _foreground(class_names: Sequence[str] | None, cfg: TrainConfig) -> list[str]:
    names = list(class_names) if class_names is not None else list(class_table(cfg.data.dataset).names)
    return names[1:] if names and names[0] == "background" else names


def write_pool_files(pool: Pool, folder: Path, name: str, *, latest: str | None = "pool") -> Path:
    """Write `folder/name.pt`, `.json` and `.png`; copy them to `folder/latest.*` too (atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = save_pool(folder / f"{name}.pt", pool)
    plot_pool(pool, folder / f"{name}.png")
    if latest:
        for suffix in (".pt", ".json", ".png"):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{latest}{suffix}.", suffix=".tmp")
            os.close(fd)
            try:
                shutil.copyfile(folder / f"{name}{suffix}", tmp)
                os.replace(tmp, folder / f"{latest}{suffix}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return path


def build_model_pool(
    cfg: TrainConfig,
    model: CpewsNet,
    *,
    data_root: Path,
    train_ids: Sequence[str] | None,
    out_dir: Path | None,
    iteration: int,
    class_names: Sequence[str] | None = None,
    superclasses: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = print,
) -> Pool:
    """Build the pool from `model` on the training split (the `train_ids` subset when given), install it in
    the model's buffers, and write `out_dir/pool/pool_it{iteration:07d}.*` and `pool.*` (unless out_dir is None).

    With `proto.cache_dir`, a pool cached under the content key of the images, the model and the settings is
    used instead of a build, once its stored key and its shapes are checked (`cached_pool`); a built pool is
    stored there.
    """
    p = cfg.proto
    names = _foreground(class_names, cfg)
    supers = (
        list(superclasses) if superclasses is not None else list(class_table(cfg.data.dataset).superclasses)
    )
    dataset = eval_dataset(cfg, Path(data_root), split=cfg.data.train_split, ids=train_ids, resize=p.resize)
    device = next(model.parameters()).device
    params = pool_params(
        num_prototypes=p.num_prototypes,
        region_threshold=p.region_threshold,
        scales=p.scales,
        resize=getattr(dataset, "resize", None),
        superclasses=supers,
        exclude_singleton_superclass=p.ssl_exclude_singleton_superclass,
        kmeans_n_init=p.kmeans_n_init,
        kmeans_max_iter=p.kmeans_max_iter,
        kmeans_seed=p.kmeans_seed,
    )
    key = dataset_content_key(model, dataset, params) if p.cache_dir else None
    remote = f"{p.cache_dir.rstrip('/')}/{key}.pt" if key and is_s3(p.cache_dir) else None
    cached = None
    if key:
        cached = local_cache_dir() / "pools" / f"{key}.pt" if remote else Path(p.cache_dir) / f"{key}.pt"
    shapes = {name: tuple(buffer.shape) for name, buffer in model.pool().items()}  # what set_pool accepts
    pool = cached_pool(cached, remote, key, shapes) if cached is not None and key else None
    if pool is not None:
        pool = Pool(pool.tensors, {**pool.meta, "iteration": iteration, "cache": "hit", **(meta or {})})
        if progress:
            progress(f"pool cache: hit {remote or cached}")
    else:
        pool = _build(cfg, model, dataset, supers, names, device, iteration, meta, progress)
        if cached is not None:
            pool = Pool(pool.tensors, {**pool.meta, "content_key": key, "cache": "miss"})
            save_pool(cached, pool)
            if remote is not None:
                upload(cached, remote)
            if progress:
                progress(f"pool cache: miss, stored {remote or cached}")
    model.set_pool({key: value.to(device) for key, value in pool.tensors.items()})
    if out_dir is not None:
        path = write_pool_files(pool, Path(out_dir) / POOL_DIR, f"pool_it{iteration:07d}")
        if progress:
            progress(f"pool build: wrote {path} (+ .json, .png) and {path.parent / 'pool.pt'}")
    return pool


def cached_pool(
    cached: Path, remote: str | None, content_key: str, shapes: dict[str, tuple[int, ...]]
) -> Pool | None:
    """The pool of `content_key` from the cache (`cached`, fetched from `remote` first when that is an s3:// URI),
    or None when the cache holds none.

    An entry that does not load, holds another content key or tensors of other `shapes` is reported (one warning
    line naming the file and what is wrong), moved aside to `<name>.bad-<time>` and treated as absent, so the
    caller builds the pool again and stores it in its place (replacing the remote copy too). A bad local copy of
    a remote entry is fetched once more before that (the local copy may be the damaged one).
    """
    fetched = False
    if not cached.is_file():
        if remote is None or not download_if_exists(remote, cached):
            return None
        fetched = True
    while True:
        stamp = _file_stamp(cached)
        try:
            return load_cached_pool(cached, content_key=content_key, shapes=shapes)
        except PoolError as exc:
            aside = move_aside(cached, stamp)
            source = f" (a copy of {remote})" if remote else ""
            again = "fetching it again" if remote is not None and not fetched else "building the pool again"
            warn(f"pool cache: {exc}{source}; {aside}, {again}")
        if remote is None or fetched or not download_if_exists(remote, cached):
            return None
        fetched = True


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of `path`; None when it is gone."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def move_aside(path: Path, stamp: tuple[int, int, int] | None = None) -> str:
    """Rename a bad cache entry (and its `.json` meta) to `<name>.bad-<YYYYmmdd-HHMMSS>`; says what was done.

    With `stamp` (`_file_stamp` when it was read), a file replaced since (another trial rebuilt it) stays put.
    """
    if stamp is not None and _file_stamp(path) != stamp:
        return "it was replaced meanwhile (left in place)"
    suffix = f".bad-{time.strftime('%Y%m%d-%H%M%S')}"
    target = path.with_name(path.name + suffix)
    count = 1
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}{suffix}-{count}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return "another process moved it aside"
    except OSError as exc:
        return f"could not move it aside ({exc.strerror or exc})"
    meta = path.with_suffix(".json")
    if meta.is_file():
        with contextlib.suppress(OSError):
            os.replace(meta, meta.with_name(meta.name + target.name[len(path.name):]))
    return f"moved aside to {target.name!r}"


def _build(
    cfg: TrainConfig,
    model: CpewsNet,
    dataset: Any,
    supers: Sequence[str],
    names: Sequence[str],
    device: Any,
    iteration: int,
    meta: dict[str, Any] | None,
    progress: Callable[[str], None] | None,
) -> Pool:
    p = cfg.proto
    return build_pool(
        model,
        dataset,
        num_classes=model.num_classes,
        num_prototypes=p.num_prototypes,
        region_threshold=p.region_threshold,
        scales=p.scales,
        superclasses=supers,
        exclude_singleton_superclass=p.ssl_exclude_singleton_superclass,
        kmeans_n_init=p.kmeans_n_init,
        kmeans_max_iter=p.kmeans_max_iter,
        kmeans_seed=p.kmeans_seed,
        patch_size=model.patch_size,
        batch_size=BUILD_BATCH_SIZE,
        num_workers=cfg.data.num_workers,
        device=device,
        class_names=names,
        meta={"backbone": cfg.model.backbone, "source": p.source, "iteration": iteration, **(meta or {})},
        autocast=autocast_factory(cfg, device),
        progress=progress,
    )


def pool_from_checkpoint(
    cfg: TrainConfig,
    model: CpewsNet,
    *,
    data_root: Path,
    train_ids: Sequence[str] | None = None,
    out_dir: Path | None = None,
    class_names: Sequence[str] | None = None,
    superclasses: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = print,
) -> Pool:
    """`proto.source=checkpoint` (§6.1, FPR-style): load `proto.checkpoint`'s weights into `model`, then build
    the pool from them and install it (the network starts from the checkpoint, as the prototypes live in its
    feature space). The checkpoint's own pool buffers are not loaded.

    Raises:
        ValueError: no `proto.checkpoint`, or its model settings or dataset differ from `cfg`.
        cpews.training.CheckpointError: the file is missing or not a cpews checkpoint.
    """
    path = cfg.proto.checkpoint
    if not path:
        raise ValueError(
            "proto.source=checkpoint needs proto.checkpoint (the checkpoint to build the pool from)"
        )
    checkpoint = load_checkpoint(path)
    differences = config_differences(checkpoint.cfg, cfg, ("data.dataset",))
    if differences:
        raise ValueError(
            f"proto.checkpoint {str(path)!r} does not match this run's model ({', '.join(differences)})"
        )
    weights = {k: v for k, v in checkpoint.model.items() if not k.rsplit(".", 1)[-1].startswith("pool_")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.rsplit(".", 1)[-1].startswith("pool_")]
    if missing or unexpected:
        raise ValueError(
            f"proto.checkpoint {str(path)!r} does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    if progress:
        progress(f"pool build: loaded weights of {path} (iteration {checkpoint.iteration})")
    return build_model_pool(
        cfg,
        model,
        data_root=data_root,
        train_ids=train_ids,
        out_dir=out_dir,
        iteration=0,
        class_names=class_names,
        superclasses=superclasses,
        meta={"checkpoint": str(path), "checkpoint_iteration": checkpoint.iteration},
        progress=progress,
    )


class PrototypeModule:
    """The CPM state across a run: the build schedule, the loss terms and the last step's diagnostics.

    `last_stats` holds the detached diagnostics of the last computed terms (`STAT_*` names); they are also
    written to `ctx.stats` when the `StepContext` has that field.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        class_names: Sequence[str] | None = None,
        superclasses: Sequence[str] | None = None,
        progress: Callable[[str], None] | None = print,
    ) -> None:
        if cfg.proto.n_builds > 0 and cfg.proto.source == "checkpoint" and not cfg.proto.checkpoint:
            raise ValueError(
                "proto.source=checkpoint needs proto.checkpoint (the checkpoint to build the pool from)"
            )
        self.cfg = cfg
        self.class_names = _foreground(class_names, cfg)
        self.superclasses = (
            list(superclasses)
            if superclasses is not None
            else list(class_table(cfg.data.dataset).superclasses)
        )
        self.progress = progress
        self.builds = pool_build_iterations(cfg)
        self.last_stats: dict[str, Tensor] = {}
        self.last_pool: Pool | None = None
        self._ready_models: weakref.WeakSet = weakref.WeakSet()  # models whose pool_ready was checked

    # -- loss terms --------------------------------------------------------------------------------------

    def _pool(self, ctx: StepContext) -> dict[str, Tensor]:
        model = ctx.model
        if model not in self._ready_models:  # one device sync per model, then trusted
            if not bool(model.pool_ready):
                raise RuntimeError(
                    f"the prototype losses are active at iteration {ctx.iteration} (pool builds after steps "
                    f"{self.builds}) but the model has no pool; a build at step 0 needs the before_training hook"
                )
            self._ready_models.add(model)
        return model.pool()

    def _record(self, ctx: StepContext, stats: dict[str, Tensor]) -> None:
        self.last_stats.update(stats)
        ctx.stats.update(stats)

    def pdl_term(self, ctx: StepContext) -> Tensor:
        pool = self._pool(ctx)
        out = pdl_loss(
            ctx.output.tokens,
            ctx.output.cams,
            ctx.labels,
            valid_tokens(ctx),
            pool["pos"],
            pool["pos_n"],
            pool["neg"],
            pool["neg_n"],
            region_threshold=ctx.cfg.proto.region_threshold,
            temperature=ctx.cfg.proto.temperature,
        )
        pairs, rms_pos, rms_neg = out.pairs.float(), out.rms_pos, out.rms_neg
        if ctx.split.size > 1:  # the global batch's pairs and mean distances (rms_* are NaN without pairs)
            sums = ctx.split.sum(torch.stack([pairs, torch.nan_to_num(rms_pos * pairs), torch.nan_to_num(rms_neg * pairs)]))
            pairs, rms_pos, rms_neg = sums[0], sums[1] / sums[0], sums[2] / sums[0]
        self._record(ctx, {STAT_PDL_RMS_POS: rms_pos, STAT_PDL_RMS_NEG: rms_neg, STAT_PDL_PAIRS: pairs})
        return ctx.split.share(out.loss, out.pairs)  # a mean over the pairs 𝒥 of the global batch

    def ssl_term(self, ctx: StepContext) -> Tensor:
        pool = self._pool(ctx)
        out = ssl_loss(
            ctx.output.tokens,
            ctx.output.cams,
            ctx.labels,
            valid_tokens(ctx),
            pool["pos"],
            pool["pos_n"],
            pool["neg_ss"],
            pool["neg_ss_n"],
            region_threshold=ctx.cfg.proto.region_threshold,
        )
        self._record(ctx, {STAT_SSL_TOKENS: ctx.split.sum(out.tokens_suppressed.float())})
        return ctx.split.share(out.loss, out.tokens_suppressed)  # a mean over the global batch's selected tokens

    # -- pool builds ---------------------------------------------------------------------------------------

    def _build(self, state: TrainState, *, broadcast: bool = True) -> None:
        """Build the pool on rank 0 (files, cache and all) and, with `broadcast`, copy its buffers to the other
        processes (every process must call this then)."""
        world = current_world()
        if world.is_main:
            self.last_pool = build_model_pool(
                state.cfg,
                state.model,
                data_root=state.data_root,
                train_ids=state.train_ids,
                out_dir=state.out_dir,
                iteration=state.iteration,
                class_names=self.class_names,
                superclasses=self.superclasses,
                progress=self.progress,
            )
        if broadcast:
            broadcast_tensors([*state.model.pool().values(), state.model.pool_ready], world)

    def after_step(self, state: TrainState) -> None:
        """Build the pool when `state.iteration` (steps taken) is a scheduled build > 0 (§8.2 step 4).

        Data parallel, every process calls this at the same step: rank 0 builds, the others receive the pool.
        """
        if state.iteration > 0 and state.iteration in self.builds:
            if self.progress and current_world().is_main:
                self.progress(f"pool build: after step {state.iteration} (schedule {self.builds})")
            self._build(state)

    def before_training(self, state: TrainState) -> None:
        """The build at step 0, if scheduled. Call only on a fresh start (a resumed model has its pool).

        Data parallel, rank 0 loads `proto.checkpoint` and builds; the trainer then copies rank 0's model (weights
        and pool) to the other processes (`cpews.training.distributed.broadcast_module`).
        """
        if not self.builds or self.builds[0] != 0:
            return
        if not current_world().is_main:
            return
        if state.cfg.proto.source == "checkpoint":
            self.last_pool = pool_from_checkpoint(
                state.cfg,
                state.model,
                data_root=state.data_root,
                train_ids=state.train_ids,
                out_dir=state.out_dir,
                class_names=self.class_names,
                superclasses=self.superclasses,
                progress=self.progress,
            )
        else:
            self._build(state, broadcast=False)

    def hooks(self) -> TrainHooks:
        fields: dict[str, Any] = {
            "extra_terms": (
                LossTerm("pdl", pdl_weight, self.pdl_term),
                LossTerm("ssl", ssl_weight, self.ssl_term),
            ),
            "after_step": (self.after_step,),
        }
        if (
            "before_training" in TrainHooks._fields
        ):  # once the trainer offers the hook (see the module docstring)
            fields["before_training"] = (self.before_training,)
        return TrainHooks(**fields)


def prototype_hooks(
    cfg: TrainConfig,
    *,
    class_names: Sequence[str] | None = None,
    superclasses: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = print,
) -> TrainHooks:
    """The `TrainHooks` that add CPM (PDL + SSL and the pool builds) to `train(cfg, hooks=...)`; none when
    `proto.n_builds` is 0 (CPM off).

    Args:
        class_names: the dataset's class names, with or without the leading "background" (default: the
            table of `cfg.data.dataset`).
        superclasses: one superclass name per foreground class (default: the table of `cfg.data.dataset`).
        progress: receives the pool build's progress lines; None for silence.
    """
    if cfg.proto.n_builds == 0:
        return TrainHooks()
    return PrototypeModule(cfg, class_names=class_names, superclasses=superclasses, progress=progress).hooks()


__all__ = [
    "BUILD_BATCH_SIZE",
    "STAT_PDL_PAIRS",
    "STAT_PDL_RMS_NEG",
    "STAT_PDL_RMS_POS",
    "STAT_SSL_TOKENS",
    "PrototypeModule",
    "build_model_pool",
    "cached_pool",
    "move_aside",
    "pdl_weight",
    "pool_active",
    "pool_build_iterations",
    "pool_from_checkpoint",
    "prototype_hooks",
    "ssl_weight",
    "valid_tokens",
    "write_pool_files",
]

"""Backbone pretraining for the synthetic world (`model.weights=synthetic`), as ImageNet is for VOC.

The backbone is trained on a synthetic set of its own (`pretrain.seed`, never `data.synthetic_seed`, so no image
of the demo's splits reaches it) from image-level labels only: `pretrain.cls_iters` steps of the two
classification losses, then the ISM and segmentation losses of §8.2 on the same model's pseudo labels (built
from the image labels through CAMs and PAR; no pixel label is read for training), and from `pretrain.pool_iter` on
the Contextual Prototype Module's PDL and SSL terms (§6-§7: a pool built once from the model's own CAMs, with the
recipe's loss weights). The held-out images of that set are scored once at the end (CAM mIoU, F1) for the record.

The result is a timm state dict of the ViT alone (no head, no decoder), the same kind of file as an ImageNet
checkpoint, and `model.weights` loads it through the same code path (`cpews.model.backbone`). It is kept under
`pretrain.cache_dir` by content key: the pretraining config (generator settings, the model architecture, the
schedule) and the code's version. A second run with the same settings finds the file; a changed setting misses.
Concurrent callers on one machine wait for one pretraining (a file lock); an `s3://` cache dir shares the file
across machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

import cpews
from cpews.config import SYNTHETIC_WEIGHTS, ConfigError, TrainConfig, load_config
from cpews.data.remote import download_if_exists, is_s3, local_cache_dir, upload
from cpews.data.synthetic import FORMAT_VERSION as SYNTHETIC_FORMAT_VERSION
from cpews.evaluation.evaluate import evaluate
from cpews.model import CpewsNet, build_model
from cpews.training.data import DATA_DIR_ENV, class_names, eval_dataset, resolve_data_root, train_loader
from cpews.training.device import autocast_factory, select_device
from cpews.training.hooks import TrainState
from cpews.training.optim import build_optimizer
from cpews.training.progress import ProgressDisplay
from cpews.training.prototype_hooks import prototype_hooks
from cpews.training.step import compute_losses

__all__ = [
    "SYNTHETIC_WEIGHTS",
    "PretrainedBackbone",
    "backbone_state_dict",
    "content_key",
    "ensure_pretrained",
    "pretrain_config",
    "resolve_weights",
]

PRETRAIN_FORMAT = 3  # bump when the pretraining procedure changes: every cached file then misses
# (3: PAR's two-pass std changed the float rounding, so the same settings no longer give the same weights)
RECIPE_PRESET = "synthetic_demo"  # CAM thresholds, PAR, augmentation and loss weights of the pretraining
ARCHITECTURE_KEYS = (  # what the pretraining takes from the model being trained
    "model.backbone", "model.img_size", "model.patch_size", "model.embed_dim", "model.depth", "model.num_heads",
    "model.freeze_pos_embed", "model.decoder_channels", "model.decoder_dilation",
)
RUNTIME_KEYS = (  # settings that do not change what is learned: left out of the content key
    "train.device", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.check_finite_every",
    "data.num_workers", "data.root", "pretrain.cache_dir", "eval.every",
)
Progress = Callable[[str], None]


class PretrainedBackbone(NamedTuple):
    path: Path  # local file: a timm state dict of the backbone
    key: str  # content key (file stem)
    meta: dict[str, Any]  # settings, metrics and timings of the pretraining that made it
    cached: bool  # True when found in the cache, False when pretrained by this call


def pretrain_config(cfg: TrainConfig) -> TrainConfig:
    """The TrainConfig the pretraining runs with: the demo recipe, `cfg`'s architecture, the `pretrain.*` set.

    Raises:
        ConfigError: `pretrain.seed` equals `data.synthetic_seed` of a synthetic run (the pretraining set would
            be the demo's own images).
    """
    p, flat = cfg.pretrain, cfg.to_flat_dict()
    if cfg.data.dataset == "synthetic" and p.seed == cfg.data.synthetic_seed:
        raise ConfigError(
            f"pretrain.seed={p.seed} equals data.synthetic_seed: the pretraining set would hold the images the "
            "model is trained and scored on; pick another pretrain.seed"
        )
    if p.pool_iter >= p.iters:
        raise ConfigError(
            f"pretrain.pool_iter={p.pool_iter} must be below pretrain.iters={p.iters} (a pool built at the end is "
            "never used); 0 pretrains without the prototype module"
        )
    depth = cfg.model.depth
    overrides = {key: flat[key] for key in ARCHITECTURE_KEYS}
    overrides.update({
        # the ISM block of the pretraining: the one before the last (model.ism_depth stays free to search)
        "model.ism_depth": max(1, depth - 1) if depth else cfg.model.ism_depth,
        "model.weights": "",
        "data.dataset": "synthetic",
        "data.root": "",
        "data.synthetic_seed": p.seed,
        "data.synthetic_train": p.images,
        "data.synthetic_val": p.val_images,
        "data.synthetic_image_size": p.image_size,
        "data.crop_size": p.image_size,
        "data.confounder_strength": p.confounder_strength,
        "data.confounder_leak": p.confounder_leak,
        "data.num_workers": cfg.data.num_workers,
        "loss.ism_warmup_iters": p.cls_iters,
        "loss.seg_warmup_iters": p.cls_iters,
        "proto.n_builds": 1 if p.pool_iter > 0 else 0,
        "proto.source": "warmup",
        "proto.build_iter": p.pool_iter,
        "optim.lr": p.lr,
        "optim.warmup_iters": p.warmup_iters,
        "optim.max_iters": p.iters,
        "train.batch_size": p.batch_size,
        "train.seed": p.seed,
        "train.device": cfg.train.device,
        "train.amp": cfg.train.amp,
        "train.checkpoint_every": 0,
        "eval.every": 0,
        "eval.max_images": p.val_images,
        "eval.size": p.image_size,
    })
    overrides.update({k: v for k, v in flat.items() if k.startswith("pretrain.")})
    return TrainConfig.from_flat_dict(overrides, base=load_config(RECIPE_PRESET), source="pretraining")


def content_key(cfg: TrainConfig) -> str:
    """The cache key of `cfg`'s pretrained backbone: sha256 (24 hex) of the pretraining settings and code version.

    The evaluation settings only score the result, so `eval.*` stays out of the key (as do the `RUNTIME_KEYS`).
    """
    settings = key_settings(pretrain_config(cfg))
    payload = {"format": PRETRAIN_FORMAT, "cpews": cpews.__version__, "synthetic_format": SYNTHETIC_FORMAT_VERSION,
               "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def key_settings(pcfg: TrainConfig) -> dict[str, Any]:
    """The flat settings of a pretraining config that decide what it learns (what `content_key` hashes)."""
    return {k: v for k, v in pcfg.to_flat_dict().items()
            if k not in RUNTIME_KEYS and not k.startswith("eval.")}


def cache_dir(cfg: TrainConfig) -> tuple[Path, str | None]:
    """(local folder, remote s3:// prefix or None) of the pretrained-backbone cache."""
    location = cfg.pretrain.cache_dir
    if is_s3(location):
        return local_cache_dir() / "pretrained", location.rstrip("/")
    if location:
        return Path(location), None
    return Path(os.environ.get(DATA_DIR_ENV, "runs/data")) / "pretrained", None


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm ViT's own keys (`blocks.0.attn.qkv.weight`, ...) from a CpewsNet state dict (heads, decoder and
    prototype pool dropped): the layout of a timm ImageNet file."""
    prefix = "backbone.vit."
    return {k[len(prefix):]: v.detach().cpu().clone() for k, v in model_state.items() if k.startswith(prefix)}


def resolve_weights(cfg: TrainConfig, progress: Progress | None = None) -> str:
    """`model.weights` as a loadable location: the pretrained file for "synthetic" (made on first use)."""
    if cfg.model.weights != SYNTHETIC_WEIGHTS:
        return cfg.model.weights
    return str(ensure_pretrained(cfg, progress=progress).path)


def ensure_pretrained(cfg: TrainConfig, *, progress: Progress | None = None, force: bool = False) -> PretrainedBackbone:
    """The pretrained backbone for `cfg`'s architecture and `pretrain.*` settings: from the cache, or trained now.

    Args:
        progress: receives one line per event (cache hit or miss, training progress, where the file went).
        force: train again even when the cache holds the file (it is replaced).
    """
    say = progress or (lambda text: None)
    key = content_key(cfg)
    folder, remote = cache_dir(cfg)
    path = folder / f"{key}.pt"
    remote_path = f"{remote}/{key}.pt" if remote else None
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f".{key}.lock"):
        if not force and (path.is_file() or (remote_path and _fetch(remote_path, path))):
            say(f"pretrained backbone: cache hit {remote_path or path}")
            return PretrainedBackbone(path, key, _read_meta(path), True)
        say(f"pretrained backbone: cache miss, pretraining (key {key}; stored in {remote or folder})")
        meta = _pretrain_into(cfg, path, key, say)
        if remote_path:
            upload(path.with_suffix(".json"), f"{remote}/{key}.json")
            upload(path, remote_path)
        say(f"pretrained backbone: stored {remote_path or path}")
        return PretrainedBackbone(path, key, meta, False)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fetch(remote_path: str, path: Path) -> bool:
    if not download_if_exists(remote_path, path):
        return False
    download_if_exists(remote_path[: -len(".pt")] + ".json", path.with_suffix(".json"))
    return True


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def _pretrain_into(cfg: TrainConfig, path: Path, key: str, say: Progress) -> dict[str, Any]:
    """Run the pretraining and write `path` (state dict) and its `.json` (meta) atomically."""
    pcfg = pretrain_config(cfg)
    started = time.perf_counter()
    model, metrics = run_pretraining(pcfg, say)
    meta = {
        "key": key,
        "format": PRETRAIN_FORMAT,
        "cpews": cpews.__version__,
        "settings": key_settings(pcfg),
        "metrics": metrics,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    _atomic_write(path, lambda f: torch.save(backbone_state_dict(model.state_dict()), f))
    return meta


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_pretraining(pcfg: TrainConfig, say: Progress) -> tuple[CpewsNet, dict[str, float]]:
    """Train a fresh model with the pretraining config `pcfg`; returns it and its held-out scores.

    Only the image-level labels of each batch enter the losses (`compute_losses`, and the prototype module's
    terms once its pool is built from the model's CAMs); the held-out split's masks are read after training, to
    score it.
    """
    device = select_device(pcfg.train.device)
    root = resolve_data_root(pcfg)  # the pretraining set, generated on first use
    names = class_names(pcfg)
    torch.manual_seed(pcfg.train.seed)
    model = build_model(pcfg, num_classes=len(names) - 1).to(device).train()
    optimizer = build_optimizer(pcfg, model)
    autocast = autocast_factory(pcfg, device)
    hooks = prototype_hooks(pcfg, class_names=names, progress=None)  # none with pretrain.pool_iter=0
    total, every = pcfg.optim.max_iters, max(1, pcfg.optim.max_iters // 10)
    display = ProgressDisplay(total, sys.stderr.isatty(), label="pretrain", emit=say)
    window, started = [], time.perf_counter()
    for it, batch in zip(range(total), train_loader(pcfg, root)):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        losses = compute_losses(model, batch, pcfg, it, extra_terms=hooks.extra_terms, autocast=autocast)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        for hook in hooks.after_step:  # the pool build after step `pretrain.pool_iter` (no files written)
            hook(TrainState(pcfg, model, it + 1, root, None, None))
        window.append(losses.total.detach())
        if (it + 1) % every == 0 or it + 1 == total:
            loss = float(torch.stack(window).mean())
            if not math.isfinite(loss):
                raise RuntimeError(f"pretraining: non-finite loss at iteration {it + 1}")
            display.update(it + 1, f"loss={loss:.3f} {(it + 1) / (time.perf_counter() - started):.1f} it/s")
            window = []
    display.close()
    result = evaluate(model, eval_dataset(pcfg, root), pcfg, class_names=names, device=device,
                      max_images=pcfg.eval.max_images, data_root=root)
    m = result.metrics
    metrics = {name: round(float(m[name]), 4) for name in ("miou_cam", "miou_pseudo", "miou_seg", "f1", "baseline_miou")
               if name in m}
    metrics["steps_per_sec"] = round(total / (time.perf_counter() - started), 2)
    say("pretraining done: held-out " + "  ".join(f"{k}={v}" for k, v in metrics.items()))
    return model.cpu(), metrics

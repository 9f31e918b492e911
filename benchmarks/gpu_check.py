"""The GPU check of issue 14: the training step, the pool build, k-means, evaluation and a GPU-sharing sweep.

Usage: benchmarks/gpu_check.sh [--dry-run] [--device cuda|cpu] [--budget-s 420] [--no-compile] [--no-sweep]
                               [--sweep-cpu] [--repeats N] [--warmup N] [--json-out FILE] [--set KEY=VALUE ...]

On a CUDA machine (about 5-8 minutes on one GPU) it measures, with the `voc` preset (ViT-B/16, 20 classes) at
crop 448, batch 4, bf16 autocast and randomly initialised weights on random images (the speed does not depend
on them):

* the full CPEWS training step (`cpews.training.step.compute_losses` with every term active: multi-scale CAM,
  PAR, ISM, seg, and PDL/SSL against a full random prototype pool; backward; the PolyWarmupAdamW step) in
  images/s and peak memory (`torch.cuda.max_memory_allocated`), against a plain timm ViT classification step
  on the same batch (forward, multilabel soft-margin loss, backward, AdamW); variants: fused AdamW, SDPA off,
  and `torch.compile` of the transformer blocks (regional compilation: one compiled block serves all twelve);
* the host-device synchronisations of one CPEWS step (`torch.cuda.set_sync_debug_mode`), by source line;
* the prototype pool build (`cpews.prototypes.build_pool`, 3 scales x 2 flips at `proto.resize`) on a sample of
  images, extrapolated to VOC's 10,582 train_aug images, and `cpews.prototypes.kmeans` on the GPU against
  scikit-learn's KMeans on all CPU cores (one 10,582 x 768 set; a VOC-like pool of 20 classes);
* the evaluation protocols (`cpews.evaluation.evaluate`) in images/s on random VOC-size images (500 x 375 and
  375 x 500): in-training (`eval.size`, single scale), final (multi-scale + flip), final + dense CRF;
* a 2-trial sweep through `cpews sweep run` on a generated sweep file with `resources: {gpu: 0.5}` each and
  both trials at once (the synthetic dataset, a tiny model, a few iterations).

It prints a table, then the same figures as one JSON line (the last line of stdout), and checks the targets
(>= 30 images/s for the CPEWS step; the CPEWS step within 4x the plain step). Without CUDA it says so and runs
the same code with tiny sizes on the CPU (a tiny ViT, crop 48, 2 timed steps, a small pool, a validated but
not started sweep file), so CI can run it; those figures are no measurement. Sections that would overrun
`--budget-s` are skipped and listed. The exit code is 1 when a section failed, else 0 (targets missed or not).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))
from timing import median_seconds  # noqa: E402

from cpews.config import ConfigError, TrainConfig, load_config  # noqa: E402
from cpews.data import class_table  # noqa: E402
from cpews.model import build_model  # noqa: E402
from cpews.training.device import autocast_factory  # noqa: E402
from cpews.training.optim import build_optimizer  # noqa: E402
from cpews.training.prototype_hooks import BUILD_BATCH_SIZE, PrototypeModule, pool_build_iterations  # noqa: E402
from cpews.training.step import compute_losses  # noqa: E402

VOC_TRAIN_AUG_IMAGES = 10_582  # the pool is built over VOC's train_aug split
VOC_IMAGE_SIZES = ((375, 500), (500, 375))  # (H, W) of most VOC images
TARGET_IMAGES_PER_S = 30.0  # issue 14: 10x ToCo's 3.0 images/s per A100
TARGET_RATIO = 4.0  # issue 14: the CPEWS step within 4x a plain ViT step
# Tiny settings of the dry run (and of any --dry-run): the voc preset shrunk to a 2-block dim-32 ViT at crop 48.
DRY_OVERRIDES = (
    "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.ism_depth=1",
    "model.img_size=48", "model.decoder_channels=16", "model.decoder_dilation=2", "data.crop_size=48",
    "train.batch_size=2", "proto.resize=48", "proto.num_prototypes=4", "eval.size=48",
)
FULL_OVERRIDES = ("train.batch_size=4", "data.crop_size=448", "train.amp=bf16")


class Plan(NamedTuple):
    """The sizes of one run: the full GPU check or the tiny dry run."""

    dry: bool
    device: torch.device
    cfg: TrainConfig
    warmup: int  # untimed steps before each timed series
    repeats: int  # timed steps (the median is reported)
    pool_images: int  # images of the sampled pool build
    kmeans_points: int  # the single k-means set (VOC: one candidate per train_aug image)
    kmeans_dim: int
    kmeans_classes: int  # the VOC-like pool: classes of 500-3000 candidates (scaled down in the dry run)
    kmeans_class_sizes: tuple[int, int]
    eval_images: int
    eval_sizes: tuple[tuple[int, int], ...]
    compile: bool
    sweep: bool


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan for `args`: full sizes on CUDA unless --dry-run, tiny sizes otherwise."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dry = args.dry_run or device.type != "cuda"
    overrides = [*(DRY_OVERRIDES if dry else FULL_OVERRIDES), "model.weights=", *args.overrides]
    cfg = load_config("voc", overrides)
    if dry:
        plan = Plan(True, device, cfg, warmup=1, repeats=2, pool_images=8, kmeans_points=300, kmeans_dim=32,
                    kmeans_classes=3, kmeans_class_sizes=(50, 100), eval_images=4, eval_sizes=((40, 48), (48, 40)),
                    compile=not args.no_compile, sweep=False)
    else:
        plan = Plan(False, device, cfg, warmup=5, repeats=20, pool_images=256, kmeans_points=VOC_TRAIN_AUG_IMAGES,
                    kmeans_dim=768, kmeans_classes=20, kmeans_class_sizes=(500, 3000), eval_images=32,
                    eval_sizes=VOC_IMAGE_SIZES, compile=not args.no_compile, sweep=not args.no_sweep)
    if args.sweep_cpu:
        plan = plan._replace(sweep=True)
    if args.repeats is not None:
        plan = plan._replace(repeats=args.repeats)
    if args.warmup is not None:
        plan = plan._replace(warmup=args.warmup)
    return plan


class Budget:
    """A wall-clock budget: sections ask before they start and are skipped when they would overrun it."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        """Whether a section estimated at `estimate_s` seconds still fits."""
        return self.elapsed() + estimate_s <= self.seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the previous measurement left, so that the next peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def counted_syncs(device: torch.device) -> Iterator[Counter]:
    """Count the synchronising CUDA calls made inside, by the `file:line` of the Python call (CUDA only)."""
    found: Counter = Counter()
    if device.type != "cuda":
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchroniz" in str(warning.message):
            path = Path(warning.filename)
            name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
            found[f"{name}:{warning.lineno}"] += 1


# ------------------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------------------


def random_batch(cfg: TrainConfig, num_classes: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A (B, 3, S, S) batch of normalised random images with 1-3 random labels each and whole-crop boxes."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, size = cfg.train.batch_size, cfg.data.crop_size
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.zeros(batch_size, num_classes)
    for row in range(batch_size):
        count = int(torch.randint(1, 4, (1,), generator=generator))
        labels[row, torch.randperm(num_classes, generator=generator)[:count]] = 1
    boxes = torch.tensor([[0, size, 0, size]] * batch_size)
    return {"image": images.to(device), "labels": labels.to(device), "box": boxes.to(device)}


def install_random_pool(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every class's prototype slots (the most work for PDL and SSL) with random unit-scale features."""
    generator = torch.Generator().manual_seed(seed)
    pool = {}
    for key, buffer in model.pool().items():
        if buffer.dtype.is_floating_point:
            pool[key] = torch.randn(buffer.shape, generator=generator)
        elif key == "neg_img":
            pool[key] = torch.arange(buffer.numel()).reshape(buffer.shape)
        else:  # the counts: every slot used
            pool[key] = torch.full(buffer.shape, model.pool()["pos"].shape[1], dtype=buffer.dtype)
    model.set_pool(pool)


def all_terms_iteration(cfg: TrainConfig) -> int:
    """An iteration at which every loss term is active (ISM, seg, PDL, SSL)."""
    builds = pool_build_iterations(cfg) or [0]
    return max(cfg.loss.seg_warmup_iters, cfg.loss.ism_warmup_iters, cfg.loss.seg_aux_label_iters, builds[0]) + 1


def compile_blocks(blocks: torch.nn.ModuleList) -> None:
    """Regional `torch.compile`: each transformer block compiled in place (they share one compiled graph)."""
    for block in blocks:
        block.compile()


class StepVariant(NamedTuple):
    name: str
    fused_adamw: bool = False
    sdpa: bool = True
    compiled: bool = False


def cpews_step(plan: Plan, variant: StepVariant) -> Callable[[], None]:
    """One full CPEWS training step of a fresh model, as `cpews.training.trainer.train_loop` takes it."""
    cfg, device = plan.cfg, plan.device
    names = list(class_table(cfg.data.dataset).names)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(names) - 1, weights="").to(device).train()
    install_random_pool(model)
    blocks = model.backbone.vit.blocks
    for block in blocks:
        block.attn.fused_attn = variant.sdpa
    if variant.compiled:
        compile_blocks(blocks)
    optimizer = build_optimizer(cfg, model)
    if variant.fused_adamw:  # what `fused=True` at construction sets; read by AdamW.step from the groups
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = True, False
    terms = PrototypeModule(cfg, class_names=names, progress=None).hooks().extra_terms
    batch = random_batch(cfg, len(names) - 1, device)
    iteration = all_terms_iteration(cfg)
    autocast = autocast_factory(cfg, device)

    def step() -> None:
        losses = compute_losses(model, batch, cfg, iteration, extra_terms=terms, autocast=autocast)
        missing = {"ism", "seg", "pdl", "ssl"} - set(losses.terms)
        if missing:
            raise RuntimeError(f"terms {sorted(missing)} were not active at iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()

    return step


def plain_step(plan: Plan, variant: StepVariant) -> Callable[[], None]:
    """A plain timm ViT classification step of the same backbone and batch: forward, BCE, backward, AdamW."""
    cfg, device = plan.cfg, plan.device
    m = cfg.model
    sizes = {"patch_size": m.patch_size, "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads}
    num_classes = len(class_table(cfg.data.dataset).names) - 1
    torch.manual_seed(0)
    model = timm.create_model(m.backbone, num_classes=num_classes, img_size=m.img_size, dynamic_img_size=True,
                              **{k: v for k, v in sizes.items() if v}).to(device).train()
    for block in model.blocks:
        block.attn.fused_attn = variant.sdpa
    if variant.compiled:
        compile_blocks(model.blocks)
    fused = {"fused": True} if variant.fused_adamw else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **fused)
    batch = random_batch(cfg, num_classes, device)
    autocast = autocast_factory(cfg, device)

    def step() -> None:
        with autocast():
            logits = model(batch["image"])
        loss = F.multilabel_soft_margin_loss(logits.float(), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_step(plan: Plan, kind: str, variant: StepVariant, warmup: int) -> dict[str, Any]:
    """images/s, step time and peak memory of one step variant (`kind`: "cpews" or "plain")."""
    release(plan.device)
    reset_peak_memory(plan.device)
    started = time.perf_counter()
    step = (cpews_step if kind == "cpews" else plain_step)(plan, variant)
    for _ in range(warmup):
        step()
    synchronize(plan.device)
    warm_s = time.perf_counter() - started
    seconds, _ = median_seconds(step, plan.repeats, sync=lambda: synchronize(plan.device))
    row = {"step_ms": seconds * 1000, "images_per_s": plan.cfg.train.batch_size / seconds,
           "peak_mem_gib": peak_memory_gib(plan.device), "warmup_s": warm_s}
    del step
    release(plan.device)
    return row


def step_syncs(plan: Plan) -> dict[str, int]:
    """The synchronising CUDA calls of one warm CPEWS step, by source line (empty on the CPU)."""
    step = cpews_step(plan, StepVariant("cpews"))
    step()
    with counted_syncs(plan.device) as found:
        step()
    del step
    release(plan.device)
    return dict(found.most_common())


def bench_steps(plan: Plan, budget: Budget, results: dict[str, Any]) -> None:
    """The step table: CPEWS and plain, eager variants, then the compiled ones."""
    steps: dict[str, Any] = {}
    results["steps"] = steps
    eager = [
        ("cpews", StepVariant("cpews")),
        ("plain", StepVariant("plain")),
        ("cpews", StepVariant("cpews fused AdamW", fused_adamw=True)),
        ("plain", StepVariant("plain fused AdamW", fused_adamw=True)),
        ("cpews", StepVariant("cpews SDPA off", sdpa=False)),
    ]
    compiled = [("plain", StepVariant("plain compiled", compiled=True)),
                ("cpews", StepVariant("cpews compiled", compiled=True))]
    if not plan.compile:
        results["skipped"].append("torch.compile (--no-compile)")
        compiled = []
    for kind, variant in [*eager, *compiled]:
        if variant.compiled and not budget.allows(90 if not plan.dry else 30):
            results["skipped"].append(f"{variant.name} (time budget)")
            continue
        # compiled: 3 warm-up steps at least, in which the graphs of every input size are made
        warmup = max(3, plan.warmup) if variant.compiled else plan.warmup
        run_section(f"training step: {variant.name}",
                    lambda kind=kind, variant=variant, warmup=warmup: steps.update(
                        {variant.name: measure_step(plan, kind, variant, warmup)}),
                    results, quiet=True)
    if "cpews" in steps and "plain" in steps:
        results["ratio_cpews_to_plain"] = steps["cpews"]["step_ms"] / steps["plain"]["step_ms"]
    if "cpews compiled" in steps and "plain compiled" in steps:
        results["ratio_compiled"] = steps["cpews compiled"]["step_ms"] / steps["plain compiled"]["step_ms"]
    results["sdpa_default"] = bool(timm.layers.use_fused_attn())
    results["syncs_per_step"] = None  # the CPU has no device to wait for
    if plan.device.type == "cuda":
        run_section("training step: host-device syncs",
                    lambda: results.update(syncs_per_step=step_syncs(plan)), results, quiet=True)


# ------------------------------------------------------------------------------------------------------------
# The prototype pool and k-means
# ------------------------------------------------------------------------------------------------------------


class RandomImages(torch.utils.data.Dataset):
    """`n` items of (3, S, S) normalised random images with random labels, cycling over 16 distinct ones."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        distinct = min(n, 16)
        self.images = torch.randn(distinct, 3, size, size, generator=generator)
        self.labels = (torch.rand(distinct, num_classes, generator=generator) < 0.15).float()
        self.labels[torch.arange(distinct), torch.randint(num_classes, (distinct,), generator=generator)] = 1
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index % len(self.images)], "labels": self.labels[index % len(self.labels)]}


def bench_pool(plan: Plan, results: dict[str, Any]) -> None:
    """The pool build on `plan.pool_images` random images, its forward pass extrapolated to 10,582 images."""
    from cpews.prototypes import build_pool

    cfg, device, p = plan.cfg, plan.device, plan.cfg.proto
    table = class_table(cfg.data.dataset)
    names = list(table.names)[1:]
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(names), weights="").to(device)
    dataset = RandomImages(plan.pool_images, p.resize, len(names))
    autocast = autocast_factory(cfg, device)
    kwargs = dict(num_classes=len(names), num_prototypes=p.num_prototypes, region_threshold=p.region_threshold,
                  scales=p.scales, superclasses=list(table.superclasses),
                  exclude_singleton_superclass=p.ssl_exclude_singleton_superclass, kmeans_n_init=p.kmeans_n_init,
                  kmeans_max_iter=p.kmeans_max_iter, kmeans_seed=p.kmeans_seed, patch_size=model.patch_size,
                  batch_size=BUILD_BATCH_SIZE, device=device, class_names=names, autocast=autocast, progress=None)
    build_pool(model, RandomImages(min(BUILD_BATCH_SIZE, plan.pool_images), p.resize, len(names)), **kwargs)  # warm
    synchronize(device)
    pool = build_pool(model, dataset, **kwargs)
    meta = pool.meta
    per_image = meta["forward_seconds"] / plan.pool_images
    results["pool"] = {
        "images": plan.pool_images, "resize": p.resize, "views": 2 * len(p.scales),
        "forward_s": meta["forward_seconds"], "build_s": meta["build_seconds"],
        "forward_images_per_s": 1 / per_image,
        "forward_s_for_10582": per_image * VOC_TRAIN_AUG_IMAGES,
    }
    del model
    release(device)


def bench_kmeans(plan: Plan, budget: Budget, results: dict[str, Any]) -> None:
    """`cpews.prototypes.kmeans` on the device against scikit-learn on every CPU core (§6.3's k, n_init, max_iter)."""
    from kmeans_pool import clustered_features
    from sklearn.cluster import KMeans

    from cpews.prototypes import kmeans

    p, device = plan.cfg.proto, plan.device
    k, n_init, max_iter, seed = p.num_prototypes, p.kmeans_n_init, p.kmeans_max_iter, p.kmeans_seed

    def ours(sets: list[torch.Tensor]) -> list[float]:
        return [kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=seed).inertia for x in sets]

    def sklearn(sets: list[Any]) -> list[float]:
        return [KMeans(n_clusters=k, random_state=seed, n_init=n_init, max_iter=max_iter).fit(x).inertia_ for x in sets]

    generator = torch.Generator().manual_seed(2)
    low, high = plan.kmeans_class_sizes
    sizes = torch.randint(low, high + 1, (plan.kmeans_classes,), generator=generator).tolist()
    cases = {
        f"one set {plan.kmeans_points}x{plan.kmeans_dim}": [clustered_features(plan.kmeans_points, plan.kmeans_dim, 20, 1)],
        f"VOC-like pool: {len(sizes)} classes, {sum(sizes)} candidates": [
            clustered_features(n, plan.kmeans_dim, 8, 100 + c) for c, n in enumerate(sizes)
        ],
    }
    rows = {}
    for name, sets in cases.items():
        if not budget.allows(60 if not plan.dry else 5):
            results["skipped"].append(f"k-means {name} (time budget)")
            continue
        on_device = [x.double().to(device) for x in sets]
        ours(on_device[:1])  # warm-up (allocator, kernels)
        t_ours, _ = median_seconds(lambda on_device=on_device: ours(on_device), 1 if plan.dry else 3,
                                   sync=lambda: synchronize(device))
        inertia_ours = ours(on_device)
        as_numpy = [x.double().numpy() for x in sets]
        start = time.perf_counter()
        inertia_sklearn = sklearn(as_numpy)
        t_sklearn = time.perf_counter() - start
        ratios = [a / b for a, b in zip(inertia_ours, inertia_sklearn)]
        rows[name] = {"ours_s": t_ours, "sklearn_s": t_sklearn, "speedup": t_sklearn / t_ours,
                      "inertia_ratio_mean": statistics.mean(ratios)}
    results["kmeans"] = {"device": str(device), "sklearn_threads": os.cpu_count(), **rows}
    pool = results.get("pool")
    voc_like = next((row for name, row in rows.items() if name.startswith("VOC-like")), None)
    if pool and voc_like:
        pool["estimate_s_for_10582"] = pool["forward_s_for_10582"] + voc_like["ours_s"]


# ------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------


def random_eval_items(n: int, sizes: tuple[tuple[int, int], ...], num_classes: int, cfg: TrainConfig) -> list[dict]:
    """`n` EvalDataset-like items on random images of the given (H, W) sizes, in turn: normalised image, labels,
    a random label mask with ignored pixels, and the uint8 image the CRF reads."""
    generator = torch.Generator().manual_seed(3)
    mean = torch.tensor(cfg.data.norm_mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.norm_std).view(3, 1, 1)
    items = []
    for index in range(n):
        height, width = sizes[index % len(sizes)]
        rgb = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        image = (rgb.permute(2, 0, 1).float() / 255 - mean) / std
        labels = torch.zeros(num_classes)
        present = torch.randperm(num_classes, generator=generator)[:2]
        labels[present] = 1
        mask = torch.zeros(height, width, dtype=torch.long)
        mask[: height // 2, : width // 2] = int(present[0]) + 1
        mask[height // 2 :, width // 2 :] = int(present[1]) + 1
        mask[height // 2, :] = 255
        items.append({"image": image, "labels": labels, "mask": mask, "rgb": rgb, "name": f"random_{index}"})
    return items


def bench_eval(plan: Plan, budget: Budget, results: dict[str, Any]) -> None:
    """images/s of the three evaluation protocols on random VOC-size images (untrained model: speed only)."""
    from cpews.evaluation.evaluate import evaluate

    cfg, device = plan.cfg, plan.device
    names = list(class_table(cfg.data.dataset).names)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(names) - 1, weights="").to(device)
    items = random_eval_items(plan.eval_images, plan.eval_sizes, len(names) - 1, cfg)
    protocols = {"in-training (eval.size, 1 scale)": {}, "final (multi-scale + flip)": {"final_protocol": True},
                 "final + dense CRF": {"final_protocol": True, "crf": True}}
    rows = {}
    for name, options in protocols.items():
        if not budget.allows(60 if not plan.dry else 5):
            results["skipped"].append(f"evaluation {name} (time budget)")
            continue
        evaluate(model, items[:2], cfg, class_names=names, device=device, **options)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        evaluate(model, items, cfg, class_names=names, device=device, **options)
        synchronize(device)
        seconds = time.perf_counter() - start
        rows[name] = {"images": len(items), "seconds": seconds, "images_per_s": len(items) / seconds}
    results["eval"] = {"image_sizes": [list(s) for s in plan.eval_sizes], **rows}
    del model
    release(device)


# ------------------------------------------------------------------------------------------------------------
# A sweep of two trials sharing one GPU
# ------------------------------------------------------------------------------------------------------------

SWEEP_FILE = """\
# Written by benchmarks/gpu_check.py: 2 trials at once (half a GPU each on CUDA), on the synthetic dataset.
name: {name}
description: gpu_check - two trials sharing one GPU (resources.gpu 0.5)
base_config: synthetic_demo
fixed:
  train.device: {device}
  model.weights: ""            # random init: no pretraining in a speed check
  train.batch_size: 8
  data.synthetic_train: 64
  data.synthetic_val: 16
  data.num_workers: 0
  optim.max_iters: 20
  optim.warmup_iters: 2
  proto.build_iter: 10
  loss.seg_warmup_iters: 2
  eval.every: 0
  eval.max_images: 16
  train.log_every: 5
  train.checkpoint_every: 0
space:
  loss.pdl_weight: {{loguniform: [0.03, 0.3]}}
search: {{algorithm: random, seed: 0, num_trials: 2, max_concurrent: 2}}
folds: {{k: 2, seed: 0}}
scheduler: {{type: fifo}}
resources: {{cpu: 1, gpu: {gpu}}}
objective: {{metric: cv/miou_seg_mean, mode: max}}
time_budget_s: {time_budget_s}
"""


def write_sweep_file(folder: Path, device: str, time_budget_s: int) -> Path:
    """The sweep file of two concurrent trials: `resources.gpu: 0.5` on "cuda", 0 on "cpu"."""
    path = folder / f"gpu_check_sweep_{device}.yaml"
    gpu = 0.5 if device == "cuda" else 0
    path.write_text(SWEEP_FILE.format(name="gpu-check", device=device, gpu=gpu, time_budget_s=time_budget_s))
    return path


def bench_sweep(plan: Plan, budget: Budget, results: dict[str, Any]) -> None:
    """`cpews sweep run` of the generated file on CUDA (or, with --sweep-cpu, its CPU twin); the dry run only
    validates the CUDA file."""
    from orchestration.search_space import load_sweep

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        folder = Path(tmp)
        time_budget_s = int(min(240, max(60, budget.seconds - budget.elapsed() - 45)))  # Tune stops trials then
        path = write_sweep_file(folder, "cuda", time_budget_s)
        spec = load_sweep(path, available=None, check_paths=False)
        row: dict[str, Any] = {"file_valid": True, "trials": spec.search.num_trials,
                               "gpu_per_trial": spec.resources.gpu, "max_concurrent": spec.search.max_concurrent}
        results["sweep"] = row
        if not plan.sweep:
            results["skipped"].append("sweep run (dry run: the file is validated only)" if plan.dry else
                                      "sweep run (--no-sweep)")
            return
        if plan.device.type != "cuda":
            path = write_sweep_file(folder, "cpu", time_budget_s)
            row.update(device="cpu", gpu_per_trial=0)
        if not budget.allows(150):
            results["skipped"].append("sweep run (time budget)")
            return
        command = [sys.executable, "-c", "import sys; from orchestration.cli import main; sys.exit(main())",
                   "sweep", "run", str(path), "--run-dir", str(folder / "runs"), "--name", "gpu-check"]
        environment = {**os.environ, "CPEWS_DATA_DIR": str(folder / "data")}  # the synthetic set: made there
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                              timeout=time_budget_s + 45)
        row["seconds"] = time.perf_counter() - start
        row["exit_code"] = done.returncode
        boards = list((folder / "runs").rglob("leaderboard.json"))
        trials = json.loads(boards[0].read_text())["trials"] if boards else []
        row["statuses"] = [t.get("status") for t in trials]
        if done.returncode != 0 or row["statuses"].count("completed") != 2:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"the sweep ended with exit code {done.returncode}, trials {row['statuses']}:\n  "
                               + "\n  ".join(tail))


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def print_table(results: dict[str, Any]) -> None:
    """The human-readable report."""
    print(f"\ngpu_check on {results['device_name']} ({'dry run, tiny sizes: no measurement' if results['dry_run'] else 'full sizes'})")
    print(f"  {results['setting']}")
    steps = results.get("steps", {})
    if steps:
        print(f"\n  {'training step':<24} {'ms/step':>9} {'images/s':>9} {'peak GiB':>9} {'warm-up s':>10}")
        for name, row in steps.items():
            print(f"  {name:<24} {_fmt(row['step_ms']):>9} {_fmt(row['images_per_s']):>9} "
                  f"{_fmt(row['peak_mem_gib'], 2):>9} {_fmt(row['warmup_s']):>10}")
        print(f"  ratio CPEWS / plain step: {_fmt(results.get('ratio_cpews_to_plain'), 2)}x"
              + (f" (compiled: {results['ratio_compiled']:.2f}x)" if "ratio_compiled" in results else "")
              + f"; SDPA attention by default: {results['sdpa_default']}")
        syncs = results.get("syncs_per_step")
        if syncs is None:
            print("  host-device syncs per CPEWS step: n/a (CPU)")
        else:
            print(f"  host-device syncs per CPEWS step: {sum(syncs.values())}"
                  + "".join(f"\n    {count:3d}  {where}" for where, count in syncs.items()))
    pool = results.get("pool")
    if pool:
        print(f"\n  pool build: {pool['images']} images at {pool['resize']} px x {pool['views']} views: forward "
              f"{pool['forward_s']:.2f} s ({pool['forward_images_per_s']:.1f} images/s), whole build {pool['build_s']:.2f} s")
        estimate = pool.get("estimate_s_for_10582")
        print(f"  pool build for {VOC_TRAIN_AUG_IMAGES} images (extrapolated): forward {pool['forward_s_for_10582']:.1f} s"
              + (f" + k-means of the VOC-like pool = {estimate:.1f} s" if estimate is not None else ""))
    kmeans = results.get("kmeans")
    if kmeans:
        print(f"\n  k-means on {kmeans['device']} vs scikit-learn ({kmeans['sklearn_threads']} CPU threads):")
        for name, row in kmeans.items():
            if isinstance(row, dict):
                print(f"    {name:<44} ours {row['ours_s']:7.3f} s  sklearn {row['sklearn_s']:7.3f} s  "
                      f"speed-up {row['speedup']:6.1f}x  inertia ours/sklearn {row['inertia_ratio_mean']:.4f}")
    evaluation = results.get("eval")
    if evaluation:
        sizes = ", ".join(f"{h}x{w}" for h, w in evaluation["image_sizes"])
        print(f"\n  evaluation on random images of {sizes} (an untrained model: speed only):")
        for name, row in evaluation.items():
            if isinstance(row, dict):
                print(f"    {name:<36} {row['images']:4d} images {row['seconds']:7.2f} s {row['images_per_s']:8.2f} images/s")
    sweep = results.get("sweep")
    if sweep:
        ran = f", ran in {sweep['seconds']:.0f} s: exit {sweep['exit_code']}, trials {sweep['statuses']}" if "seconds" in sweep else ""
        print(f"\n  sweep: {sweep['trials']} trials x gpu {sweep['gpu_per_trial']:g}, {sweep['max_concurrent']} at once{ran}")
    targets = results.get("targets")
    if targets:
        print("\n  targets:")
        for name, row in targets.items():
            print(f"    {name:<44} {_fmt(row['value'], 2):>8}  {row['verdict']}")
    for line in results["skipped"]:
        print(f"  skipped: {line}")
    for name, message in results["errors"].items():
        print(f"  FAILED: {name}: {message.splitlines()[0]}")
    print(f"  wall time {results['wall_s']:.0f} s")


def check_targets(results: dict[str, Any]) -> None:
    """The issue's targets, judged on full-size CUDA runs only."""
    steps = results.get("steps", {})
    if "ratio_cpews_to_plain" not in results:
        return
    judged = not results["dry_run"]

    def verdict(ok: bool) -> str:
        return ("met" if ok else "MISSED") if judged else "n/a (dry run)"

    best = max(row["images_per_s"] for name, row in steps.items() if name.startswith("cpews"))
    results["targets"] = {
        f"CPEWS step images/s >= {TARGET_IMAGES_PER_S:g} (best variant)": {
            "value": best, "verdict": verdict(best >= TARGET_IMAGES_PER_S)},
        f"CPEWS step / plain step <= {TARGET_RATIO:g}x": {
            "value": results["ratio_cpews_to_plain"], "verdict": verdict(results["ratio_cpews_to_plain"] <= TARGET_RATIO)},
    }


def run_section(name: str, fn: Callable[[], None], results: dict[str, Any], *, quiet: bool = False) -> None:
    """Run one section (or part of one); a failure is recorded and printed at once, and the next one runs."""
    start = time.perf_counter()
    if not quiet:
        print(f"gpu_check: {name} ...", flush=True)
    try:
        fn()
    except Exception as exc:
        results["errors"][name] = f"{type(exc).__name__}: {exc}"
        print(f"gpu_check: error: {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if not quiet:
        results["section_s"][name] = time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget; sections that would overrun it are skipped (default 420)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-sweep", action="store_true", help="skip the 2-trial sweep")
    parser.add_argument("--sweep-cpu", action="store_true",
                        help="without CUDA: run the 2-trial sweep on the CPU (resources.gpu 0) instead of validating it")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 20; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 5; dry run 1)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides on top of the voc preset (and of the dry run's tiny sizes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        plan = make_plan(args)
    except ConfigError as exc:  # a --set key or value the config tree refuses
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if plan.device.type != "cuda":
        reason = "--device cpu" if torch.cuda.is_available() else "CUDA is not available"
        print(f"gpu_check: {reason}: a CPU dry run of the same code with tiny sizes (its figures are no measurement)",
              flush=True)
    budget = Budget(args.budget_s)
    cfg = plan.cfg
    device_name = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else platform.processor() or "CPU"
    results: dict[str, Any] = {
        "dry_run": plan.dry, "device": str(plan.device), "device_name": device_name, "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "setting": (f"{cfg.model.backbone} (dim {cfg.model.embed_dim or 'own'}, depth {cfg.model.depth or 'own'}) "
                    f"crop {cfg.data.crop_size} batch {cfg.train.batch_size} amp {cfg.train.amp if plan.device.type == 'cuda' else 'off (CPU)'}; "
                    f"{plan.repeats} timed steps after {plan.warmup} (medians); random weights and images"),
        "skipped": [], "errors": {}, "section_s": {},
    }
    run_section("training step", lambda: bench_steps(plan, budget, results), results)
    run_section("pool build", lambda: bench_pool(plan, results), results)
    run_section("k-means", lambda: bench_kmeans(plan, budget, results), results)
    run_section("evaluation", lambda: bench_eval(plan, budget, results), results)
    run_section("sweep", lambda: bench_sweep(plan, budget, results), results)
    check_targets(results)
    results["wall_s"] = budget.elapsed()
    print_table(results)
    text = json.dumps(results, sort_keys=True)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text, flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

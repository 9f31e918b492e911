"""Train one configuration's cross-validation folds as a sweep trial trains them, outside Ray and MLflow.

Usage: python benchmarks/demo_folds.py [--sweep search_spaces/demo.yaml] [--params JSON] [--set k=v ...]
       [--folds 0 1 2] [--workers 2] [--out runs/bench/demo_folds] [--json FILE]

The configuration is the sweep's `trial_config` of `--params` (searched keys and values as JSON; default: the base
point, the base config's own value of every searched key), then the `--set` overrides (any config key: a longer
fold, another CAM scale set, another learning rate). The folds are the sweep's (`folds.k`, `folds.seed`, on the
config's training split) and each fold trains exactly as `orchestration.trial.run_trial` trains it (the same
`train_fold`, prototype hooks included), one process per fold, `--workers` at a time with one thread each (the
demo sweep runs two one-CPU trials at a time). Printed per fold: seg mIoU, the all-background mIoU of the same
images, CAM and pseudo-label mIoU, the water false activation of the CAM and the boat IoU (synthetic data), and
the wall time; then the mean ± std of the fold scores. This is how docs/results.md measures fold-regime variants
(what a change would do to a sweep's scores) without running a sweep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = (  # (metric of the fold's validation, column title)
    ("val/miou_seg", "seg"),
    ("val/baseline_miou", "all-bkg"),
    ("val/miou_cam", "CAM"),
    ("val/miou_pseudo", "pseudo"),
    ("val/confounder_false_activation", "water FA"),
    ("val/confounded_class_iou", "boat IoU"),
)


def fold_config(spec: Any, params: dict[str, Any], overrides: list[str]) -> Any:
    """The TrainConfig a trial of the sweep `spec` with `params` trains, with `overrides` (`key=value`) after it."""
    return spec.trial_config(params if params else spec.base_point()).with_overrides(overrides)


def train_one_fold(sweep: str, params: dict[str, Any], overrides: list[str], fold: int, out: str) -> dict[str, Any]:
    """Train fold `fold` in this process (one thread); returns its validation metrics and wall time."""
    import torch

    from cpews.training.data import class_names, resolve_data_root
    from orchestration.kfold import fold_splits, split_folds
    from orchestration.search_space import load_sweep
    from orchestration.trial import train_fold

    torch.set_num_threads(1)
    spec = load_sweep(sweep, check_paths=False)
    cfg = fold_config(spec, params, overrides)
    root = resolve_data_root(cfg)
    split = spec.folds.split or cfg.data.train_split
    folds = split_folds(root, cfg.data.dataset, split, spec.folds.k, spec.folds.seed).folds
    train_ids, val_ids = fold_splits(folds, fold)
    started = time.perf_counter()
    result, _ = train_fold(cfg, lambda metrics, checkpoint_dir=None: None, class_names=class_names(cfg),
                           progress=lambda text: None, out_dir=Path(out) / f"fold_{fold}", train_ids=train_ids,
                           val_ids=val_ids, val_split=split)
    metrics = {key: float(value) for key, value in result.metrics.items() if key.startswith("val/")}
    return {"fold": fold, "seconds": round(time.perf_counter() - started, 1), "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="search_spaces/demo.yaml")
    parser.add_argument("--params", default="{}", help="searched keys and values, JSON (default: the base point)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value after the trial's")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="default: every fold of the sweep")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/demo_folds")
    parser.add_argument("--json", default=None, help="also write the fold results to this file")
    args = parser.parse_args()
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as error:
        parser.error(f"--params is not JSON: {error}")
    from cpews.config import SYNTHETIC_WEIGHTS
    from cpews.training.data import resolve_data_root
    from cpews.training.pretrain import ensure_pretrained
    from orchestration.search_space import load_sweep

    spec = load_sweep(args.sweep, check_paths=False)
    cfg = fold_config(spec, params, args.overrides)  # bad keys or values fail here, before any training
    resolve_data_root(cfg)  # the data and the backbone made once, not by each fold's process
    if cfg.model.weights == SYNTHETIC_WEIGHTS:
        ensure_pretrained(cfg, progress=print)
    folds = args.folds if args.folds is not None else list(range(spec.folds.k))
    print(f"{args.sweep}: params {json.dumps(params) if params else 'the base point'}; "
          f"overrides {args.overrides or 'none'}; folds {folds}", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(train_one_fold, args.sweep, params, args.overrides, fold, args.out) for fold in folds]
        results = [future.result() for future in futures]
    print("fold  " + "  ".join(f"{title:>8}" for _, title in COLUMNS) + "   seconds")
    for row in results:
        cells = [row["metrics"].get(key, float("nan")) for key, _ in COLUMNS]
        print(f"{row['fold']:>4}  " + "  ".join(f"{value:8.4f}" for value in cells) + f"   {row['seconds']:7.1f}")
    scores = [row["metrics"]["val/miou_seg"] for row in results]
    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
    baselines = [row["metrics"].get("val/baseline_miou", float("nan")) for row in results]
    print(f"mean seg mIoU {statistics.fmean(scores):.4f} ± {spread:.4f} over {len(scores)} folds "
          f"(all-background {statistics.fmean(baselines):.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "overrides": args.overrides, "folds": results},
                                              indent=2))


if __name__ == "__main__":
    main()

"""Train the CPU demo config on the synthetic data for a fixed number of iterations and print the figures.

Usage: python benchmarks/train_synthetic.py [--config synthetic_demo] [--set k=v ...] [--out runs/bench] [--crf]

Prints steps/s, wall time (data generation excluded), and the val mIoU of CAM, aux CAM, pseudo label and
segmentation with a per-class table, the false-activation rate of the confounded class on its background
texture and its image-level bias; with --crf also the segmentation after dense CRF.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cpews.config import load_config
from cpews.evaluation import evaluate, load_model
from cpews.training import train
from cpews.training.data import eval_dataset, resolve_data_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synthetic_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="runs/bench/train_synthetic")
    parser.add_argument("--crf", action="store_true", help="also score the segmentation after dense CRF")
    parser.add_argument("--json", action="store_true", help="print the final metrics as one JSON object too")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    root = resolve_data_root(cfg)
    data_time = time.perf_counter() - started
    steps: list[float] = []

    def reporter(metrics: dict[str, float], checkpoint_dir) -> None:
        if "train/steps_per_sec" in metrics:
            steps.append(metrics["train/steps_per_sec"])
        if any(k.startswith("val/") for k in metrics):
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/miou")}
            print(f"  it={int(metrics['train/iteration'])} {shown}", flush=True)

    result = train(cfg, reporter, out_dir=args.out, progress=False)
    loaded = load_model(result.checkpoint, "cpu")
    with torch.no_grad():
        final = evaluate(
            loaded.model, eval_dataset(cfg, root), cfg, class_names=loaded.class_names,
            crf=args.crf, data_root=root,
        )
    m = final.metrics
    print(f"\nconfig={args.config} iterations={result.iterations} batch={cfg.train.batch_size} "
          f"threads={torch.get_num_threads()}")
    print(f"data generation/check {data_time:.1f}s; training wall time {result.wall_time:.1f}s "
          f"(validation included); median steps/s {sorted(steps)[len(steps) // 2]:.2f}")
    keys = ["miou_cam", "miou_aux_cam", "miou_pseudo", "miou_seg", "miou_seg_crf", "pseudo_ignored_fraction", "f1",
            "confounder_false_activation_cam", "confounder_false_activation_seg", "confounder_image_bias",
            "confounded_class_iou_cam"]
    for key in keys:
        if key in m:
            print(f"  {key:<34} {m[key]:.4f}")
    columns = [c for c in ("cam", "aux_cam", "pseudo", "seg", "seg_crf") if c in final.per_class[0]]
    print(f"  {'class':<14}" + "".join(f"{c:>9}" for c in columns))
    for row in final.per_class:
        print(f"  {row['class']:<14}" + "".join(
            f"{'-' if row[c] is None else format(row[c], '.3f'):>9}" for c in columns))
    if args.json:
        print(json.dumps({**m, "wall_time": result.wall_time, "iterations": result.iterations}))


if __name__ == "__main__":
    main()

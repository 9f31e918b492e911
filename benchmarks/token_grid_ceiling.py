"""The best mIoU a segmentation predicted on a ViT's token grid can reach (the ground truth seen through the grid).

Usage: python benchmarks/token_grid_ceiling.py [--grids 8 16 32] [--images 300] [--seed 0]

A segmentation head on ViT tokens predicts one score vector per patch and is upsampled bilinearly to the image,
so its mIoU is bounded by that of the ideal token-level prediction: each class's area fraction in each patch
(the ground truth average-pooled to the grid), upsampled bilinearly and arg-maxed. For the synthetic demo
(64-pixel images) a patch-8 ViT has an 8x8 grid, patch 4 a 16x16 grid. Prints the ceiling per grid and class
beside the all-background mIoU of the same images, scored by `cpews.metrics`. The images are the `val` split of
the synthetic generator's settings (rendered in memory, nothing written).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from cpews.data.classes import SYNTHETIC_CLASSES
from cpews.data.synthetic import SyntheticParams, render_image
from cpews.metrics import all_background_confusion, confusion_matrix, segmentation_scores


def token_grid_prediction(mask: torch.Tensor, grid: int, num_classes: int) -> torch.Tensor:
    """The ideal prediction on a `grid` x `grid` token grid, upsampled back to the mask's size.

    Shapes: mask (H, W) int64 labels in 0..num_classes-1 -> (H, W) int64.
    """
    one_hot = F.one_hot(mask, num_classes).permute(2, 0, 1).float()[None]  # (1, C, H, W)
    fractions = F.adaptive_avg_pool2d(one_hot, grid)  # (1, C, grid, grid): class area per patch
    upsampled = F.interpolate(fractions, size=tuple(mask.shape), mode="bilinear", align_corners=False)
    return upsampled.argmax(dim=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--images", type=int, default=300, help="val images of the synthetic set")
    parser.add_argument("--seed", type=int, default=0, help="data.synthetic_seed")
    parser.add_argument("--train-images", type=int, default=2000, help="data.synthetic_train (val follows it)")
    args = parser.parse_args()
    params = SyntheticParams(seed=args.seed, n_train=args.train_images, n_val=args.images)
    num_classes = len(SYNTHETIC_CLASSES)
    masks = [torch.from_numpy(render_image(params, args.train_images + i).mask.astype("int64"))
             for i in range(args.images)]
    background = sum(all_background_confusion(m, num_classes) for m in masks)
    report = {"images": args.images, "baseline_miou": segmentation_scores(background).miou, "grids": {}}
    print(f"{args.images} synthetic val images (seed {args.seed}); all-background mIoU {report['baseline_miou']:.3f}")
    print(f"{'grid':<7}{'mIoU':>6}  " + " ".join(f"{name:>10}" for name in SYNTHETIC_CLASSES))
    for grid in args.grids:
        confusion = sum(confusion_matrix(token_grid_prediction(m, grid, num_classes), m, num_classes) for m in masks)
        scores = segmentation_scores(confusion)
        per_class = [float(v) for v in scores.iou]
        report["grids"][grid] = {"miou": scores.miou, "per_class": dict(zip(SYNTHETIC_CLASSES, per_class))}
        print(f"{f'{grid}x{grid}':<7}{scores.miou:>6.3f}  " + " ".join(f"{v:>10.3f}" for v in per_class))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Does tuning pay? The sweep's best configuration against its base configuration, refit and scored held out.

Usage: python benchmarks/tuning_gain.py [SWEEP] [--run-dir runs] [--seeds 0 1 2] [--out runs/bench/tuning_gain]
       [--threads 2] [--json]

Both configurations (the best completed trial's, chosen as `cpews promote` chooses it, and the sweep's base:
base config + fixed settings, no searched override) are trained on the whole training split with each seed
(`train.seed`), as the promotion's refit does, and scored on the held-out split (`data.val_split`, never seen
by the search) with the multi-scale + flip protocol (§9.3), per image. Printed: each configuration's held-out
mIoU per seed and mean ± std, the all-background mIoU of the same images, and a paired t test over images of
the per-image mIoU averaged over seeds (best - base; two-sided p, and the one-sided p of "best > base").
Runs already in `--out` with the same config are reused, so the command can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpews.config import TrainConfig
from cpews.evaluation import evaluate, load_model
from cpews.training import train
from cpews.training.checkpoint import load_checkpoint
from cpews.training.data import eval_dataset, resolve_data_root
from orchestration.promote import latest_sweep, select_best
from orchestration.sweep import existing_sweep, load_leaderboard


def refit(cfg: TrainConfig, out_dir: Path) -> Path:
    """Train `cfg` into `out_dir` unless a finished run of the same config is there; returns its checkpoint."""
    checkpoint = out_dir / "last.pt"
    if checkpoint.is_file():
        saved = load_checkpoint(checkpoint)
        if saved.cfg == cfg and saved.iteration == cfg.optim.max_iters:
            print(f"  reusing {checkpoint}", flush=True)
            return checkpoint
    return train(cfg, lambda metrics, checkpoint_dir: None, out_dir=out_dir, progress=False).checkpoint


def heldout_per_image(checkpoint: Path) -> dict[str, list[float]]:
    """Per-image held-out mIoU (multi-scale + flip) and the all-background mIoU of each image."""
    loaded = load_model(checkpoint)
    root = resolve_data_root(loaded.cfg)
    dataset = eval_dataset(loaded.cfg, root)
    with torch.no_grad():
        result = evaluate(loaded.model, dataset, loaded.cfg, class_names=loaded.class_names, data_root=root,
                          final_protocol=True, per_image=True)
    return {"miou": result.per_image["miou_seg"], "baseline": result.per_image["baseline_miou"],
            "dataset_miou": result.metrics["miou_seg"], "dataset_baseline": result.metrics["baseline_miou"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default=None, help="sweep name (default: the latest in --run-dir)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tuning_gain"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = args.sweep or latest_sweep(args.run_dir)
    paths = existing_sweep(args.run_dir, name)
    from orchestration.search_space import load_sweep

    spec = load_sweep(str(paths.spec), check_paths=False)
    rows = load_leaderboard(name, run_dir=args.run_dir)
    chosen = select_best(rows, spec.folds.k, mode=spec.objective.mode)
    configs = {"best": spec.trial_config(chosen.row["params"]), "base": spec.base_train_config()}
    print(f"sweep {name}: best trial {chosen.row['trial']} ({chosen.reason}); params {chosen.row['params']}")
    if configs["best"] == configs["base"]:  # e.g. `search.start_points: [base]` won
        print(f"sweep {name}: its pick is the base configuration itself (every searched key at the base config's "
              "value): the search gained nothing over it on this sweep, and there is nothing to compare")
        return 0
    scores: dict[str, dict[int, dict]] = {"best": {}, "base": {}}
    for label, cfg in configs.items():
        for seed in args.seeds:
            seeded = TrainConfig.from_flat_dict({"train.seed": seed, "train.checkpoint_every": 0}, base=cfg)
            print(f"{label} seed {seed}: training {seeded.optim.max_iters} iterations", flush=True)
            checkpoint = refit(seeded, args.out / name / f"{label}_seed{seed}")
            scores[label][seed] = heldout_per_image(checkpoint)
            print(f"  held-out mIoU (msf) {scores[label][seed]['dataset_miou']:.4f} "
                  f"(all-background {scores[label][seed]['dataset_baseline']:.4f})", flush=True)
    per_image = {label: np.nanmean([s["miou"] for s in scores[label].values()], axis=0) for label in scores}
    diffs = per_image["best"] - per_image["base"]
    diffs = diffs[np.isfinite(diffs)]
    t, p_two = stats.ttest_1samp(diffs, 0.0)
    p_one = float(stats.t.sf(t, df=len(diffs) - 1))
    summary = {
        "sweep": name, "best_trial": chosen.row["trial"], "best_params": chosen.row["params"], "seeds": args.seeds,
        "heldout_miou": {label: [scores[label][s]["dataset_miou"] for s in args.seeds] for label in scores},
        "baseline_miou": scores["base"][args.seeds[0]]["dataset_baseline"],
        "paired": {"images": len(diffs), "mean_difference": float(diffs.mean()), "t": float(t),
                   "p_two_sided": float(p_two), "p_best_greater": p_one},
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    for label in ("best", "base"):
        values = summary["heldout_miou"][label]
        spread = statistics.stdev(values) if len(values) > 1 else math.nan
        print(f"{label}: held-out mIoU (msf) {statistics.fmean(values):.4f} ± {spread:.4f} over seeds "
              f"{args.seeds}: {', '.join(f'{v:.4f}' for v in values)}")
    print(f"all-background mIoU of the same images: {summary['baseline_miou']:.4f}")
    pr = summary["paired"]
    print(f"paired t test over {pr['images']} images (per-image mIoU, mean over seeds), best - base: "
          f"{pr['mean_difference']:+.4f}, t = {pr['t']:.2f}, p = {pr['p_two_sided']:.3g} (two-sided), "
          f"p = {pr['p_best_greater']:.3g} (best > base)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

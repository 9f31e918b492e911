"""Ablation of CPEWS on the synthetic dataset (its boat-on-water confounder exists for this).

Usage:
    python benchmarks/ablation_synthetic.py [--seeds 0 1 2] [--rows ...] [--set k=v ...] [--workers 2]
        [--markdown docs/ablation.md]

Rows: classification only; + ISM; + ISM + seg (ToCo-like); full CPEWS (+ PDL + SSL, pool built once);
CPEWS with the pool re-built 2 and 5 times (Table 3). Columns: CAM, pseudo-label and segmentation mIoU, IoU
of the confounded class (boat), its false-activation rate on water (pixels of visible water labelled boat by
the CAM) and its image-level bias (share of images with water but no boat whose boat logit is > 0), and the
mIoU of the other classes; mean ± std over seeds, plus a paired t-test (over seeds) between the ToCo-like row
and full CPEWS. Runs go to `--out`, one process per run (`--workers` at a time, one thread each); a run
whose `ablation.json` exists there with the same config is reused, so an interrupted ablation continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROWS: dict[str, list[str]] = {
    "cls_only": ["loss.ism_weight=0", "loss.seg_weight=0", "proto.n_builds=0"],
    "ism": ["loss.seg_weight=0", "proto.n_builds=0"],
    "toco": ["proto.n_builds=0"],
    # the FPR settings (τ = 13, SSL weight 1.5e-4; the synthetic_demo preset's own SSL weight is 0.01)
    "cpews": ["proto.n_builds=1", "loss.ssl_weight=1.5e-4"],
    "cpews_builds2": ["proto.n_builds=2", "loss.ssl_weight=1.5e-4"],
    "cpews_builds5": ["proto.n_builds=5", "loss.ssl_weight=1.5e-4"],
    # Investigation row (method.md §13 choice 3): the RMS distances δ of this small model are ~0.6-0.7, so
    # δ/τ with the FPR temperature τ = 13 is ~0.05 and PDL is nearly constant; FPR's SSL weight is tuned for
    # ResNet CAM logits. This row sets τ to about the median δ and the SSL weight to the top of §8.1's range.
    "cpews_tau": ["proto.n_builds=1", "proto.temperature=0.7", "loss.ssl_weight=0.01"],
    # The two changes of the investigation row apart: τ near the median δ (0.57 in the demo sweep's fold runs from
    # the pretrained backbone) with the default SSL weight, and the FPR τ with the SSL weight 0.01.
    "cpews_tau_only": ["proto.n_builds=1", "proto.temperature=0.6", "loss.ssl_weight=1.5e-4"],
    "cpews_ssl_only": ["proto.n_builds=1", "loss.ssl_weight=0.01"],
}
LABELS = {
    "cls_only": "classification only",
    "ism": "+ ISM",
    "toco": "+ ISM + seg (ToCo-like)",
    "cpews": "full CPEWS (+ PDL + SSL), pool built once (FPR settings)",
    "cpews_builds2": "CPEWS, n_builds = 2",
    "cpews_builds5": "CPEWS, n_builds = 5",
    "cpews_tau": "CPEWS, τ = 0.7 and SSL weight 0.01 (investigation)",
    "cpews_tau_only": "CPEWS, τ = 0.6 (FPR SSL weight 1.5e-4)",
    "cpews_ssl_only": "CPEWS, τ = 13 and SSL weight 0.01",
}
COLUMNS = [
    ("miou_cam", "CAM mIoU"),
    ("miou_pseudo", "pseudo mIoU"),
    ("miou_seg", "seg mIoU"),
    ("confounded_class_iou_cam", "boat IoU (CAM)"),
    ("confounded_class_iou_seg", "boat IoU (seg)"),
    ("confounder_false_activation_cam", "water FA (CAM)"),
    ("confounder_image_bias", "image bias"),
    ("other_miou_cam", "other mIoU (CAM)"),
    ("other_miou_seg", "other mIoU (seg)"),
]


def run_one(row: str, seed: int, base: str, overrides: list[str], out: str) -> dict[str, float]:
    """Train and evaluate one (row, seed); returns the final val metrics and the last PDL distances."""
    import torch

    torch.set_num_threads(1)
    from cpews.config import load_config
    from cpews.evaluation import evaluate, load_model
    from cpews.training import train
    from cpews.training.data import eval_dataset, resolve_data_root

    cfg = load_config(base, [*overrides, *ROWS[row], f"train.seed={seed}"])
    run_dir = Path(out) / f"{row}_seed{seed}"
    done = run_dir / "ablation.json"
    if done.is_file() and json.loads(done.read_text()).get("config") == cfg.to_flat_dict():
        return json.loads(done.read_text())  # finished earlier with the same config: reuse it
    stats: dict[str, float] = {}

    def reporter(metrics: dict[str, float], checkpoint_dir) -> None:
        for key in ("train/pdl_rms_pos", "train/pdl_rms_neg", "train/pdl_pairs", "train/ssl_tokens"):
            if key in metrics:
                stats[key.split("/")[1]] = metrics[key]

    started = time.perf_counter()
    result = train(cfg, reporter, out_dir=run_dir, progress=False)
    loaded = load_model(result.checkpoint, "cpu")
    root = resolve_data_root(cfg)
    with torch.no_grad():
        final = evaluate(loaded.model, eval_dataset(cfg, root), cfg, class_names=loaded.class_names, data_root=root)
    metrics = dict(final.metrics)
    boat = loaded.class_names.index("boat")
    for score in ("cam", "seg"):
        others = [r[score] for i, r in enumerate(final.per_class) if i != boat and r[score] is not None]
        metrics[f"other_miou_{score}"] = sum(others) / len(others)
    metrics.update(stats)
    metrics["wall_time"] = time.perf_counter() - started
    done.write_text(json.dumps({**metrics, "config": cfg.to_flat_dict()}, indent=2))
    return metrics


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired_test(a: list[float], b: list[float]) -> str:
    """Paired t-test over seeds of b - a; returns 'mean diff, t, p'."""
    from scipy import stats

    diffs = [y - x for x, y in zip(a, b)]
    if len(diffs) < 2:
        return f"diff {diffs[0]:+.3f} (one seed: no test)" if diffs else "-"
    t, p = stats.ttest_rel(b, a)
    return f"diff {statistics.mean(diffs):+.3f}, t = {t:.2f}, p = {p:.3f}"


def render(results: dict[str, dict[int, dict[str, float]]], seeds: list[int], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| row | " + " | ".join(name for _, name in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row, by_seed in results.items():
        cells = [mean_std([by_seed[s].get(key) for s in seeds if s in by_seed]) for key, _ in COLUMNS]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    if "toco" in results and "cpews" in results:
        common = [s for s in seeds if s in results["toco"] and s in results["cpews"]]
        lines += ["", f"Paired test over seeds {common}, full CPEWS minus ToCo-like:", ""]
        for key, name in COLUMNS:
            a = [results["toco"][s][key] for s in common]
            b = [results["cpews"][s][key] for s in common]
            lines.append(f"- {name}: {paired_test(a, b)}")
    distances = [
        f"- {LABELS[row]}: PDL RMS distance to the positive mean {mean_std([r.get('pdl_rms_pos') for r in by_seed.values()])}, "
        f"to the nearest negative {mean_std([r.get('pdl_rms_neg') for r in by_seed.values()])}, "
        f"SSL tokens per step {mean_std([r.get('ssl_tokens') for r in by_seed.values()])}"
        for row, by_seed in results.items()
        if any("pdl_rms_pos" in r for r in by_seed.values())
    ]
    if distances:
        lines += ["", "Prototype distances in the last log window (τ is `proto.temperature`):", "", *distances]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synthetic_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=[r for r in ROWS if r != "cpews_tau"], choices=list(ROWS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cpews.config import load_config
    from cpews.training.data import resolve_data_root
    from cpews.training.pretrain import resolve_weights

    base_cfg = load_config(args.config, args.overrides)
    resolve_data_root(base_cfg)  # generate the data (and the pretrained backbone) once, before the workers
    resolve_weights(base_cfg, progress=print)
    jobs = [(row, seed) for seed in args.seeds for row in args.rows]
    results: dict[str, dict[int, dict[str, float]]] = {row: {} for row in args.rows}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            pool.submit(run_one, row, seed, args.config, args.overrides, args.out): (row, seed) for row, seed in jobs
        }
        for future in futures:
            row, seed = futures[future]
            results[row][seed] = future.result()
            m = results[row][seed]
            print(f"{row} seed={seed}: cam={m['miou_cam']:.3f} seg={m['miou_seg']:.3f} "
                  f"boat={m.get('confounded_class_iou_cam', float('nan')):.3f} "
                  f"water_fa={m.get('confounder_false_activation_cam', float('nan')):.3f} "
                  f"({m['wall_time']:.0f}s)", flush=True)
    command = "python benchmarks/ablation_synthetic.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--rows {' '.join(args.rows)}"]
        + [f"--set {o}" for o in args.overrides]
    )
    table = render(results, args.seeds, command)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()

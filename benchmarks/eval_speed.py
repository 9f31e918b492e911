"""Time held-out scoring per protocol: single scale, multi-scale + flip, multi-scale + flip + dense CRF.

Usage: python benchmarks/eval_speed.py [--config synthetic_demo] [--set k=v ...] [--checkpoint PATH]
                                      [--images 100] [--repeats 3] [--batch-size 16] [--device cpu|cuda]
                                      [--threads N] [--protocols seg,seg_msf,seg_crf] [--all-scores]
                                      [--crf-workers N] [--json]

Scores the first `--images` images of the held-out split the way `cpews promote` does (`cpews.evaluation.evaluate`
with `per_image=True` and the dataset root, once per protocol; the CAMs and pseudo labels only in the first,
`--all-scores` in each) and prints, per protocol, the median wall time over `--repeats` runs (after one warm-up
run), images/s and the mIoU it scored, then one JSON line. Timings depend on the torch threads (`--threads`) and
on whatever else runs on the machine: tiny models on a busy 2-core machine are several times slower with 2
threads than with 1.

The model is the config's network with random initialisation (`model.weights` is set to none, so nothing is
pretrained or downloaded), or a trained checkpoint with `--checkpoint` (its own config; `--set` then changes
the scoring settings, e.g. `eval.test_scales`, not the network). Without a checkpoint the synthetic dataset is the demo sweep's
(`data.synthetic_train=600`, `data.synthetic_val=max(100, --images)`, generated on first use under
$CPEWS_DATA_DIR, default runs/data); `--set` overrides come after these.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds

# The options `cpews promote` scores each protocol with (the CAM scores only in the first).
PROTOCOLS: dict[str, dict[str, bool]] = {
    "seg": {"final_protocol": False},
    "seg_msf": {"final_protocol": True, "cams": False},
    "seg_crf": {"final_protocol": True, "crf": True, "cams": False},
}
SCORE_KEYS = {"seg": "miou_seg", "seg_msf": "miou_seg", "seg_crf": "miou_seg_crf"}
PROTOCOL_NAMES = {"seg": "single scale", "seg_msf": "multi-scale + flip", "seg_crf": "multi-scale + flip + CRF"}


def build(args: argparse.Namespace, device: torch.device):
    """(model in eval mode on `device`, cfg, class names, data root, held-out dataset)."""
    from cpews.config import TrainConfig, load_config
    from cpews.data import class_table
    from cpews.evaluation import load_model
    from cpews.model import build_model
    from cpews.training.data import eval_dataset, resolve_data_root

    if args.checkpoint:
        loaded = load_model(args.checkpoint, device)
        cfg = loaded.cfg.with_overrides(args.overrides)
        model, names = loaded.model, loaded.class_names
    else:
        sizes = ["data.synthetic_train=600", f"data.synthetic_val={max(100, args.images)}"]
        cfg = load_config(args.config, [*sizes, *args.overrides])
        cfg = TrainConfig.from_flat_dict({"model.weights": ""}, base=cfg)
        names = list(class_table(cfg.data.dataset).names)
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=len(names) - 1).to(device).eval()
    root = resolve_data_root(cfg)
    return model, cfg, names, root, eval_dataset(cfg, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synthetic_demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of the protocols")
    parser.add_argument("--all-scores", action="store_true", help="score the CAMs and pseudo labels in each protocol")
    parser.add_argument("--crf-workers", type=int, default=None, help="CRF processes (default: evaluate's choice)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        parser.error(f"unknown protocol(s) {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from cpews.evaluation import evaluate

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, cfg, names, root, dataset = build(args, device)
    count = min(args.images, len(dataset))
    say = (lambda *_: None) if args.json else print
    say(f"eval speed: {count} {cfg.data.dataset}/{cfg.data.val_split} images from {root}, device {device}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch_size}, test scales {list(cfg.eval.test_scales)}, "
        f"median of {args.repeats} after a warm-up")
    figures: dict[str, dict[str, float]] = {}
    for name in protocols:
        options = {**PROTOCOLS[name], "crf_workers": args.crf_workers} | ({"cams": True} if args.all_scores else {})

        def run(options=options):
            return evaluate(model, dataset, cfg, class_names=names, device=device, max_images=count, data_root=root,
                            batch_size=args.batch_size, per_image=True, **options)

        seconds, result = median_seconds(run, args.repeats, sync=sync, warmup=1)
        figures[name] = {"seconds": round(seconds, 4), "images_per_s": round(count / seconds, 2),
                         "miou": round(result.metrics[SCORE_KEYS[name]], 6)}
        say(f"  {PROTOCOL_NAMES[name]:<26} {seconds:8.2f} s  {count / seconds:8.1f} images/s  "
            f"mIoU {figures[name]['miou']:.4f}")
    total = sum(f["seconds"] for f in figures.values())
    say(f"  {'all protocols':<26} {total:8.2f} s")
    print(json.dumps({"images": count, "device": str(device), "threads": torch.get_num_threads(),
                      "repeats": args.repeats, "batch_size": args.batch_size, "all_scores": args.all_scores,
                      "protocols": figures,
                      "total_seconds": round(total, 4)}))


if __name__ == "__main__":
    main()

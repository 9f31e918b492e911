"""Where the confounded class's prototypes sit: boat or water? (the pool of a run on the synthetic data)

Usage: python benchmarks/pool_confounder.py RUN_DIR [--iteration 250] [--neighbours 20] [--max-images 300]

RUN_DIR is a `cpews train` output folder holding `pool/pool_itXXXXXXX.pt` and the checkpoint of the same
iteration (`iter_XXXXXXX.pt`, written when `train.checkpoint_every` divides it), so the prototypes are compared
with the features of the model that built them. On the run's validation images the final tokens (multi-scale +
flip view averages, as the pool build takes them) are grouped by the ground truth of their patch: "boat" (at
least half boat), "water" (at least half visible water, no boat), "other". For each positive and negative
prototype of the confounded class (and each superclass-filtered negative, the ones SSL compares against) it prints
the RMS distance (PDL's δ) to each group's mean feature and the groups of its nearest tokens: a positive prototype
whose neighbours are water describes water, not boat. Last, the share of each group's tokens that lie nearer an
SSL negative than every positive (§7.3's d+ > d-): the tokens SSL pushes down wherever the boat CAM is active.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cpews.evaluation import load_model
from cpews.prototypes import load_pool, view_averages
from cpews.training.data import eval_dataset, resolve_data_root

GROUPS = ("boat", "water", "other")


def token_groups(mask: np.ndarray, water: np.ndarray, label: int, grid: tuple[int, int]) -> np.ndarray:
    """Group index per token (0 boat, 1 water, 2 other) from the pixel masks. Shapes: (H, W) -> (h, w)."""
    h, w = grid
    boat = F.adaptive_avg_pool2d(torch.from_numpy((mask == label).astype(np.float32))[None, None], grid)[0, 0]
    wet = F.adaptive_avg_pool2d(torch.from_numpy((water > 0).astype(np.float32))[None, None], grid)[0, 0]
    groups = np.full((h, w), 2)
    groups[(wet >= 0.5).numpy() & (boat == 0).numpy()] = 1
    groups[(boat >= 0.5).numpy()] = 0
    return groups


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS distance between rows. Shapes: (n, D), (m, D) -> (n, m)."""
    return torch.cdist(a, b) / a.shape[1] ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iteration", type=int, default=None, help="pool build iteration (default: the first)")
    parser.add_argument("--neighbours", type=int, default=20)
    parser.add_argument("--max-images", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pools = sorted((args.run_dir / "pool").glob("pool_it*.pt"))
    if args.iteration is not None:
        pools = [p for p in pools if p.stem == f"pool_it{args.iteration:07d}"]
    if not pools:
        raise SystemExit(f"pool_confounder: error: no pool file in {args.run_dir / 'pool'}")
    pool_path = pools[0]
    iteration = int(pool_path.stem[len("pool_it"):])
    checkpoint = args.run_dir / f"iter_{iteration:07d}.pt"
    if not checkpoint.is_file():
        raise SystemExit(f"pool_confounder: error: {checkpoint} missing (train with train.checkpoint_every={iteration} train.keep_checkpoints=0)")
    loaded = load_model(checkpoint)
    cfg, names = loaded.cfg, loaded.class_names
    label = names.index("boat")
    channel = label - 1
    pool = load_pool(pool_path).tensors
    positives = pool["pos"][channel][: int(pool["pos_n"][channel])]
    negatives = pool["neg"][channel][: int(pool["neg_n"][channel])]
    ssl_negatives = pool["neg_ss"][channel][: int(pool["neg_ss_n"][channel])]  # superclass-filtered: what SSL uses
    root = resolve_data_root(cfg)
    dataset = eval_dataset(cfg, root)
    features, groups = [], []
    count = min(args.max_images, len(dataset))
    for index in range(count):
        item = dataset[index]
        if not item["labels"][channel] and "confounder_mask" in item and not item["confounder_mask"].any():
            continue  # neither boat nor water: not informative here
        averages = view_averages(loaded.model, item["image"][None], cfg.proto.scales)
        tokens = averages.tokens[0]  # (D, h, w)
        grid = tuple(tokens.shape[-2:])
        water = item["confounder_mask"].numpy() if "confounder_mask" in item else np.zeros_like(item["mask"].numpy())
        groups.append(token_groups(item["mask"].numpy(), water, label, grid).reshape(-1))
        features.append(tokens.flatten(1).T)
    feats, group = torch.cat(features), torch.from_numpy(np.concatenate(groups))
    means = torch.stack([feats[group == g].mean(0) for g in range(len(GROUPS))])
    report: dict = {"pool": str(pool_path), "iteration": iteration, "tokens": {g: int((group == i).sum())
                                                                              for i, g in enumerate(GROUPS)}}
    to_tokens: dict[str, torch.Tensor] = {}  # each kind's RMS distances to every validation token
    for kind, protos in (("positive", positives), ("negative", negatives), ("ssl_negative", ssl_negatives)):
        if not protos.shape[0]:
            report[kind] = {"count": 0}
            continue
        to_means = rms(protos, means)  # (K, 3)
        to_tokens[kind] = rms(protos, feats)  # (K, N)
        nearest = to_tokens[kind].topk(args.neighbours, largest=False).indices  # (K, n)
        majority = [Counter(group[row].tolist()).most_common(1)[0][0] for row in nearest]
        shares = (group[nearest].reshape(-1)[:, None] == torch.arange(len(GROUPS))).float().mean(0)
        report[kind] = {
            "count": int(protos.shape[0]),
            "rms_to_group_mean": {g: round(float(to_means[:, i].mean()), 4) for i, g in enumerate(GROUPS)},
            "closest_group_mean": dict(Counter(GROUPS[int(i)] for i in to_means.argmin(1))),
            "neighbour_majority": dict(Counter(GROUPS[m] for m in majority)),
            "neighbour_share": {g: round(float(shares[i]), 3) for i, g in enumerate(GROUPS)},
        }
    if "positive" in to_tokens and "ssl_negative" in to_tokens:  # §7.3: d+ > d- marks a token SSL suppresses
        nearer_negative = to_tokens["ssl_negative"].amin(0) < to_tokens["positive"].amin(0)
        report["ssl_marked_share"] = {g: round(float(nearer_negative[group == i].float().mean()), 3)
                                      for i, g in enumerate(GROUPS)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"pool {pool_path} (iteration {iteration}); validation tokens: {report['tokens']}")
    for kind in ("positive", "negative", "ssl_negative"):
        r = report[kind]
        if not r["count"]:
            print(f"boat {kind.replace('_', ' ')} prototypes: none")
            continue
        print(f"boat {kind.replace('_', ' ')} prototypes ({r['count']}): RMS distance to the mean token of "
              + ", ".join(f"{g} {v:.3f}" for g, v in r["rms_to_group_mean"].items())
              + f"; closest mean: {r['closest_group_mean']}; their {args.neighbours} nearest tokens: "
              + ", ".join(f"{g} {v:.0%}" for g, v in r["neighbour_share"].items()))
    if "ssl_marked_share" in report:
        print("tokens nearer an SSL negative than every positive (SSL pushes their boat CAM down where it is "
              "active): " + ", ".join(f"{g} {v:.0%}" for g, v in report["ssl_marked_share"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

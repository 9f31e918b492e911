"""Does a sweep tell its configurations apart? Scores of a finished sweep against their floor, and a two-way ANOVA.

Usage: python benchmarks/sweep_anova.py runs/sweeps/demo/leaderboard.json [--json]
       (or the output of `cpews sweep leaderboard NAME --json` saved to a file)

For the completed trials (every fold scored) it prints each trial's mean fold mIoU beside the all-background
mIoU of the same images (`baseline_miou`) and their ratio, then a two-way ANOVA without replication on the
trials x folds table of fold scores (the additive model score = mean + trial + fold + residual): F and p for the
trial effect (do configurations differ beyond the fold-to-fold noise?) and for the fold effect.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats


def two_way_anova(table: np.ndarray) -> dict[str, float]:
    """Two-way ANOVA without replication on a (trials, folds) table of scores.

    Shapes: table (T, K) with T >= 2 and K >= 2. Returns F and p of the row (trial) and column (fold) effects,
    their degrees of freedom and the sums of squares.
    """
    t, k = table.shape
    grand = table.mean()
    ss_trials = k * ((table.mean(axis=1) - grand) ** 2).sum()
    ss_folds = t * ((table.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((table - grand) ** 2).sum()
    ss_residual = ss_total - ss_trials - ss_folds
    df_trials, df_folds, df_residual = t - 1, k - 1, (t - 1) * (k - 1)
    ms_residual = ss_residual / df_residual
    f_trials = (ss_trials / df_trials) / ms_residual if ms_residual > 0 else float("inf")
    f_folds = (ss_folds / df_folds) / ms_residual if ms_residual > 0 else float("inf")
    return {
        "f_trials": float(f_trials), "p_trials": float(stats.f.sf(f_trials, df_trials, df_residual)),
        "f_folds": float(f_folds), "p_folds": float(stats.f.sf(f_folds, df_folds, df_residual)),
        "df_trials": df_trials, "df_folds": df_folds, "df_residual": df_residual,
        "ss_trials": float(ss_trials), "ss_folds": float(ss_folds), "ss_residual": float(ss_residual),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("leaderboard", type=Path, help="leaderboard.json of a sweep (or `sweep leaderboard --json`)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    try:
        data = json.loads(args.leaderboard.read_text())
    except (OSError, ValueError) as exc:
        print(f"sweep_anova: error: {args.leaderboard}: {exc}", file=sys.stderr)
        return 2
    rows = data["trials"] if isinstance(data, dict) else data
    completed = [r for r in rows if r.get("status") == "completed"]
    k = max((len(r.get("fold_scores") or []) for r in completed), default=0)
    completed = [r for r in completed if len(r["fold_scores"]) == k]
    if len(completed) < 2 or k < 2:
        print(f"sweep_anova: error: {args.leaderboard}: needs 2 completed trials with 2+ folds "
              f"(has {len(completed)} with {k})", file=sys.stderr)
        return 2
    table = np.array([r["fold_scores"] for r in completed], dtype=float)
    anova = two_way_anova(table)
    trials = [
        {"trial": r["trial"], "cv_miou_mean": float(np.mean(r["fold_scores"])),
         "fold_scores": r["fold_scores"], "baseline_miou": r.get("baseline_miou"),
         "ratio": float(np.mean(r["fold_scores"]) / r["baseline_miou"]) if r.get("baseline_miou") else None}
        for r in completed
    ]
    summary = {
        "sweep": data.get("sweep") if isinstance(data, dict) else None,
        "trials": trials,
        "completed": len(completed), "all_trials": len(rows), "folds": k,
        "best_cv_miou": max(t["cv_miou_mean"] for t in trials),
        "min_ratio_to_baseline": min((t["ratio"] for t in trials if t["ratio"] is not None), default=None),
        "anova": anova,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"sweep {summary['sweep']}: {len(completed)} completed of {len(rows)} trials, {k} folds")
    print(f"{'trial':10} {'cv mIoU':>8} {'bkg mIoU':>9} {'ratio':>6}  fold scores")
    for t in sorted(trials, key=lambda t: -t["cv_miou_mean"]):
        ratio = f"{t['ratio']:.2f}" if t["ratio"] is not None else "-"
        base = f"{t['baseline_miou']:.4f}" if t["baseline_miou"] is not None else "-"
        folds = " ".join(f"{s:.4f}" for s in t["fold_scores"])
        print(f"{t['trial']:10} {t['cv_miou_mean']:8.4f} {base:>9} {ratio:>6}  {folds}")
    a = anova
    print(f"two-way ANOVA (trials x folds, no replication): trials F({a['df_trials']}, {a['df_residual']}) = "
          f"{a['f_trials']:.2f}, p = {a['p_trials']:.3g}; folds F({a['df_folds']}, {a['df_residual']}) = "
          f"{a['f_folds']:.2f}, p = {a['p_folds']:.3g}")
    print(f"best cv mIoU {summary['best_cv_miou']:.4f}; every completed trial >= "
          f"{summary['min_ratio_to_baseline']:.2f}x its all-background mIoU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

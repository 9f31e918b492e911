"""A recorded benchmark of a sweep's space: a fixed sample of configurations, each trained on every fold.

Usage: python benchmarks/search_space_table.py [SPACE] [--configs 48] [--seed 0] [--eval-every 100]
       [--run-dir runs] [--out benchmarks/data/demo_space_table.jsonl] [--extract-only]

The sample is drawn and trained by the real sweep machinery: the sweep file SPACE (default
search_spaces/demo.yaml) as a FIFO sweep (no pruning, no time budget) named `<name>-table`, with Optuna's
RandomSampler (seed `--seed`) for `--configs` configurations, the first of which is the base configuration (the
base config + fixed settings, every searched key at its base value: `search.start_points`). Every fold trains with
the sweep's full budget and validates every `--eval-every` iterations (learning curves). The sweep is resumable:
run the command again after an interruption and `cpews sweep resume` carries on (hours on 2 cores).

Written to `--out` (JSON lines): a first line `{"meta": ...}` (the command, the code version, the machine, the
sweep's settings), then one line per configuration whose folds all finished:
`{"trial", "params", "base", "cv_mean", "folds": [{"fold", "score", "baseline", "curve": [[iteration, miou], ...],
"seconds", "cpu_seconds"}]}`. `seconds` is the fold's wall time in its trial (training, validations, artefacts);
`cpu_seconds` multiplies it by the CPUs the trial reserves (`resources.cpu`), the compute that a scheduler saves
when it stops the trial.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpews.training import keys
from orchestration.search_space import load_sweep, validate_sweep
from orchestration.sweep import SweepError, existing_sweep, resume_sweep, run_sweep
from orchestration.trial import FOLD_END, FOLD_INDEX, FOLD_SCORE

DEFAULT_OUT = Path("benchmarks/data/demo_space_table.jsonl")


def table_sweep(space_file: str, *, configs: int, seed: int, eval_every: int) -> Any:
    """The sweep that records the table: `space_file` as FIFO, random sampler, the base point first."""
    spec = load_sweep(space_file)
    base = spec.base_train_config().to_flat_dict()
    data = spec.to_dict()
    data["name"] = f"{spec.name}-table"
    data["fixed"] = {**data["fixed"], "eval.every": eval_every}
    data["search"] = {**data["search"], "algorithm": "random", "seed": seed, "num_trials": configs,
                      "start_points": [{key: base[key] for key in spec.searched_keys()}]}
    data["scheduler"] = {**data["scheduler"], "type": "fifo"}
    data["tracking"] = {"experiment": f"{spec.name}-table"}
    data["time_budget_s"] = None
    return validate_sweep(data, check_paths=False)


def _results(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_row(trial_dir: Path, k: int, cpus: float, base_point: dict[str, Any]) -> dict[str, Any] | None:
    """One configuration's row from its Tune trial folder, or None when a fold is unfinished."""
    results = _results(trial_dir)
    ends = {int(r[FOLD_INDEX]): r for r in results if r.get(FOLD_END) == 1.0}
    if len(ends) < k:
        return None
    params = json.loads((trial_dir / "params.json").read_text())
    folds, previous_total = [], 0.0
    for fold in range(k):
        curve = sorted({int(r[keys.TRAIN_ITERATION]): float(r[keys.VAL_MIOU_SEG]) for r in results
                        if r.get(FOLD_END) == 0.0 and int(r.get(FOLD_INDEX, -1)) == fold
                        and keys.VAL_MIOU_SEG in r and math.isfinite(float(r[keys.VAL_MIOU_SEG]))}.items())
        end = ends[fold]
        seconds = float(end["time_total_s"]) - previous_total
        previous_total = float(end["time_total_s"])
        folds.append({"fold": fold, "score": float(end[FOLD_SCORE]),
                      "baseline": float(end[keys.VAL_BASELINE_MIOU]), "curve": [[i, m] for i, m in curve],
                      "seconds": round(seconds, 2), "cpu_seconds": round(seconds * cpus, 2)})
    scores = [f["score"] for f in folds]
    return {"trial": trial_dir.name.removeprefix("trial_"), "params": params,
            "base": all(params.get(key) == value for key, value in base_point.items()),
            "cv_mean": sum(scores) / len(scores), "folds": folds}


def _code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit


def extract(spec: Any, run_dir: Path, out: Path, command: str) -> int:
    """Write the table of sweep `spec` (under `run_dir`) to `out`; returns the rows written."""
    paths = existing_sweep(run_dir, spec.name)
    trial_dirs = sorted(d for d in paths.tune.iterdir() if d.is_dir() and d.name.startswith("trial_"))
    base_point = spec.search.start_points[0]
    rows = [row for d in trial_dirs if (row := trial_row(d, spec.folds.k, spec.resources.cpu, base_point))]
    started = min((float(r["timestamp"]) for d in trial_dirs for r in _results(d)[:1]), default=time.time())
    meta = {
        "command": command, "code_version": _code_version(), "sweep": spec.name, "space_file": spec.source,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "recorded": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "folds": spec.folds.k, "max_iters": spec.base_train_config().optim.max_iters,
        "eval_every": spec.base_train_config().eval.every, "trial_cpus": spec.resources.cpu,
        "objective": spec.objective.metric, "space": {d.key: d.to_dict() for d in spec.space},
        "configs": len(rows), "configs_planned": spec.search.num_trials,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    partial.replace(out)
    return len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("space", nargs="?", default="search_spaces/demo.yaml", help="the sweep file sampled")
    parser.add_argument("--configs", type=int, default=48, help="configurations (the base one included)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    parser.add_argument("--eval-every", type=int, default=100, help="validation every N iterations of a fold")
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--extract-only", action="store_true", help="write the table of what has finished")
    args = parser.parse_args()
    command = "python benchmarks/search_space_table.py " + " ".join(sys.argv[1:])
    spec = table_sweep(args.space, configs=args.configs, seed=args.seed, eval_every=args.eval_every)
    if not args.extract_only:
        try:
            existing_sweep(args.run_dir, spec.name)
        except SweepError:
            run_sweep(spec, run_dir=args.run_dir)
        else:
            print(f"search_space_table: sweep {spec.name} exists under {args.run_dir}: resuming it", flush=True)
            resume_sweep(spec.name, run_dir=args.run_dir)
    try:
        rows = extract(spec, args.run_dir, args.out, command)
    except SweepError as exc:
        print(f"search_space_table: error: {exc}", file=sys.stderr)
        return 2
    print(f"search_space_table: {rows} of {spec.search.num_trials} configurations written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

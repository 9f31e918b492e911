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
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpews.training import keys
from orchestration.search_space import load_sweep, sample_params, validate_sweep
from orchestration.sweep import SweepError, _code_version, existing_sweep, resume_sweep, run_sweep
from orchestration.trial import CV_MEAN, FOLD_END, FOLD_INDEX, FOLD_SCORE

DEFAULT_OUT = Path("benchmarks/data/demo_space_table.jsonl")


def sample_points(space_file: str | Path, *, configs: int, seed: int) -> list[dict[str, Any]]:
    """The table's configurations: the base one (every searched key at its base value), then `configs - 1` drawn
    by Optuna's RandomSampler(seed) through the space's own sampler (`sample_params`): the same sequence a random
    sweep with the base point enqueued first would try."""
    import optuna

    spec = load_sweep(space_file)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    study.enqueue_trial(spec.base_point())
    return [sample_params(spec, study.ask()) for _ in range(configs)]


def table_sweep(space_file: str | Path, points: list[dict[str, Any]], *, eval_every: int) -> Any:
    """The sweep that records `points` of `space_file`: FIFO (no pruning, no time budget), each point a trial
    (`search.start_points`), validating every `eval_every` iterations; named `<name>-table`."""
    spec = load_sweep(space_file)
    data = spec.to_dict()
    data["name"] = f"{spec.name}-table"
    data["fixed"] = {**data["fixed"], "eval.every": eval_every}
    data["search"] = {**data["search"], "algorithm": "random", "num_trials": len(points), "start_points": points}
    data["scheduler"] = {**data["scheduler"], "type": "fifo"}
    data["tracking"] = {"experiment": f"{spec.name}-table"}
    data["time_budget_s"] = None
    return validate_sweep(data, check_paths=False)


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


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
    return {"trial": trial_dir.name.removeprefix("trial_"), "params": params,
            "base": all(params.get(key) == value for key, value in base_point.items()),
            "cv_mean": float(ends[k - 1][CV_MEAN]), "folds": folds}  # what the trial reported


def read_rows(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The meta and rows of a table file, or (None, []) when there is none."""
    if not path.is_file():
        return None, []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records or "meta" not in records[0]:
        raise ValueError(f"{path}: not a space table (no meta line); move it away or pass another --out")
    return records[0]["meta"], records[1:]


def sweep_rows(spec: Any, run_dir: Path) -> list[dict[str, Any]]:
    """The finished rows of every table sweep of `spec`'s name under `run_dir` (`<name>-table`, `-table-2`, ...)."""
    rows = []
    sweeps = Path(run_dir) / "sweeps"
    for folder in sorted(sweeps.glob(f"{spec.name}*")) if sweeps.is_dir() else []:
        tune = folder / "tune"
        if not tune.is_dir() or not (folder.name == spec.name or folder.name.startswith(f"{spec.name}-")):
            continue
        for trial_dir in sorted(d for d in tune.iterdir() if d.is_dir() and d.name.startswith("trial_")):
            row = trial_row(trial_dir, spec.folds.k, spec.resources.cpu, spec.search.start_points[0])
            if row is not None:
                rows.append(row)
    return rows


def table_settings(spec: Any) -> dict[str, Any]:
    """What the table's scores depend on: rows recorded under other settings cannot join it (`comparable`)."""
    return {"folds": spec.folds.k, "fold_seed": spec.folds.seed, "space": {d.key: d.to_dict() for d in spec.space},
            "fixed": dict(spec.fixed)}


def table_meta(spec: Any, command: str, space_file: str | Path, rows: int) -> dict[str, Any]:
    cfg = spec.base_train_config()
    return {
        "command": command, "code_version": _code_version().get("mlflow.source.git.commit", "unknown"),
        "sweep": spec.name, "space_file": str(space_file),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
        "max_iters": cfg.optim.max_iters, "eval_every": cfg.eval.every, "trial_cpus": spec.resources.cpu,
        "objective": spec.objective.metric, **table_settings(spec),
        "configs": rows, "configs_planned": spec.search.num_trials,
    }


def comparable(meta: dict[str, Any], spec: Any) -> list[str]:
    """Why rows recorded under `meta` cannot join a table of `spec` (empty: they can)."""
    return [f"{key}: {meta.get(key)!r} there, {value!r} here" for key, value in table_settings(spec).items()
            if meta.get(key) != value]


def write_table(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write the table atomically (a `.partial` file renamed over `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    partial.replace(path)


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
    points = sample_points(args.space, configs=args.configs, seed=args.seed)
    spec = table_sweep(args.space, points, eval_every=args.eval_every)
    try:
        meta, kept = read_rows(args.out)
    except (OSError, ValueError) as exc:
        print(f"search_space_table: error: {exc}", file=sys.stderr)
        return 2
    if meta is not None and (problems := comparable(meta, spec)):
        print(f"search_space_table: error: {args.out} was recorded with other settings ({'; '.join(problems)}); "
              "move it away or pass another --out", file=sys.stderr)
        return 2
    recorded = {point_key(row["params"]) for row in kept}
    missing = [p for p in points if point_key(p) not in recorded]
    if not args.extract_only and missing:
        try:
            existing_sweep(args.run_dir, spec.name)
        except SweepError:  # a new machine: only the configurations that the table file lacks
            print(f"search_space_table: {len(points) - len(missing)} of {len(points)} configurations recorded in "
                  f"{args.out}; training the other {len(missing)}", flush=True)
            run_sweep(table_sweep(args.space, missing, eval_every=args.eval_every), run_dir=args.run_dir)
        else:
            print(f"search_space_table: sweep {spec.name} exists under {args.run_dir}: resuming it", flush=True)
            resume_sweep(spec.name, run_dir=args.run_dir)
    found = {point_key(row["params"]): row for row in [*kept, *sweep_rows(spec, args.run_dir)]}
    rows = [found[point_key(p)] for p in points if point_key(p) in found]
    if meta is not None and rows == kept:  # nothing new: the recorded table (its command, version, date) stays
        print(f"search_space_table: {len(rows)} of {len(points)} configurations, all already in {args.out}")
        return 0
    write_table(args.out, table_meta(spec, command, args.space, len(rows)), rows)
    print(f"search_space_table: {len(rows)} of {len(points)} configurations written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Search strategies replayed on a recorded space table: how much compute each needs to find a good configuration.

Usage: python benchmarks/search_efficiency.py [TABLE] [--seeds 20] [--trials 48] [--strategies ...]
       [--time-scale 0.001] [--json OUT] [--merge JSON ...]

TABLE (default benchmarks/data/demo_space_table.jsonl) is what benchmarks/search_space_table.py recorded: a fixed
sample of configurations of a sweep's space, each trained on every fold, with its learning curves and compute.
Each strategy is a real Ray Tune sweep with the project's real searcher (`PruningOptunaSearch` with Optuna's
TPESampler or RandomSampler) and scheduler (FIFO; `FoldASHAScheduler`, ASHA over folds as in `make sweep`; Tune's
ASHAScheduler over the iterations within folds), at the demo's concurrency (`search.max_concurrent`), driven by a
trainable that reads the table instead of training: a proposed configuration is answered by the nearest recorded
one in normalised parameter space (uniform keys scaled to [0, 1], log-uniform keys in log space, categorical keys
0 or 1 apart), whose learning curves and fold scores are reported in order, each report after a sleep of its
recorded compute times `--time-scale` (so that concurrent trials finish in the order they would have).

Strategies: random (RandomSampler + FIFO), tpe (TPE + FIFO), tpe_asha_folds (TPE + ASHA over folds: the demo's
default before this benchmark), tpe_asha_iters (TPE + ASHA over iterations within folds, rungs at 100, 200, 400, 800 iterations; the
objective of its rungs is the running CV estimate: finished folds' scores and the current fold's last validation),
and tpe_base_first / tpe_asha_folds_base_first (tpe / tpe_asha_folds whose first trial is the table's base
configuration, the sweep's base config with no searched override, through `search.start_points: [base]`;
tpe_base_first is search_spaces/demo.yaml's strategy).
Not here: Tune's BOHB (`HyperBandForBOHB`) works with its own searcher (TuneBOHB, ConfigSpace), not Optuna's; Tune's
synchronous `HyperBandScheduler` pauses trials at its milestones and resumes them from checkpoints, and a replayed
fold (a tenth of a second) ends before a pause lands, so its replay would be TPE + FIFO under another name.

Compute is counted in CPU-seconds of the table's median fold (a fold stopped within is counted up to its last
report; `--measured-compute`: each fold's own recorded time instead, which also carries the machine's load while
the table was recorded). Printed per strategy, over seeds: the compute spent until a trial whose CV mean lies within 0.01 of the table's best finished (median and
quartiles; seeds that never got there within `--trials` trials are counted), the best CV mean finished at 25, 50
and 100 % of random search's median budget and at `make sweep`'s budget (`--demo-folds`), how often a scheduler
stopped the best configuration its replay proposed, and how far proposals fell from their answers (normalised
distance, median and 90th percentile).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpews.training import keys
from orchestration.search_space import Distribution, validate_sweep
from orchestration.trial import CV_MEAN, FOLD_END, FOLD_INDEX, FOLD_SCORE, FOLDS_COMPLETED, cv_metrics

DEFAULT_TABLE = Path("benchmarks/data/demo_space_table.jsonl")
STRATEGIES = ("random", "tpe", "tpe_asha_folds", "tpe_asha_iters", "tpe_base_first", "tpe_asha_folds_base_first")
BASE_FIRST = "_base_first"  # suffix: the sweep's first trial is the base configuration (`search.start_points`)
WITHIN = 0.01  # "reached": a finished trial within this of the table's best CV mean
COMPUTE = "replay/compute_s"  # CPU-seconds of the table spent since the trial's previous report
ITERATIONS = "replay/iterations"  # iterations trained by the trial so far, over all its folds
RUNNING = "replay/running_miou"  # finished folds' scores and the current fold's last validation, averaged
ROW = "replay/row"  # the index of the table row that answered the trial
DISTANCE = "replay/distance"  # normalised distance from the proposal to its answer
ITER_RUNGS = dict(grace_period=100, reduction_factor=2)
# as in a sweep (`orchestration.sweep._ray_session`): no result loggers, no configuration boxes, no snapshot warnings
QUIET_TUNE = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0",
              "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


class Table(NamedTuple):
    """A recorded space table: its meta line and its rows (one per configuration)."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def best(self) -> float:
        return max(row["cv_mean"] for row in self.rows)

    @property
    def fold_cost(self) -> float:
        """The median CPU-seconds of a recorded fold: the unit of compute of a replay (see `replay_reports`)."""
        return float(np.median([fold["cpu_seconds"] for row in self.rows for fold in row["folds"]]))


def load_table(path: str | Path) -> Table:
    """Read a table written by benchmarks/search_space_table.py.

    Raises:
        ValueError: not such a table (names the file and the line).
    """
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty; record it with benchmarks/search_space_table.py")
    try:
        records = [json.loads(line) for line in lines]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.doc and lines.index(exc.doc) + 1}: not JSON ({exc.msg})") from None
    if "meta" not in records[0]:
        raise ValueError(f"{path}: line 1: no meta record")
    rows = records[1:]
    if not rows:
        raise ValueError(f"{path}: no configuration recorded yet")
    return Table(records[0]["meta"], rows)


def table_space(table: Table) -> list[Distribution]:
    """The searched distributions the table was sampled from (its meta's `space`, in the sweep-file form)."""
    out = []
    for key, entry in table.meta["space"].items():
        kind = next(k for k in ("uniform", "loguniform", "int", "categorical") if k in entry)
        values = entry[kind]
        if kind == "categorical":
            out.append(Distribution(key=key, kind=kind, choices=tuple(values)))
        else:
            out.append(Distribution(key=key, kind=kind, low=values[0], high=values[1], step=entry.get("step")))
    return out


def normalised(space: Sequence[Distribution], params: Mapping[str, Any]) -> np.ndarray:
    """A point in normalised parameter space: uniform/int keys in [0, 1], log-uniform keys in log space scaled to
    [0, 1], a categorical key one-hot over its choices scaled by 1/sqrt(2) (two different choices are 1 apart).

    Shapes: returns (D,) with D = the numeric keys + the categorical choices.
    """
    coords: list[float] = []
    for dist in space:
        value = params[dist.key]
        if dist.kind == "categorical":
            coords.extend((1.0 if value == choice else 0.0) / math.sqrt(2) for choice in dist.choices)
        elif dist.kind == "loguniform":
            coords.append((math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low)))
        else:
            coords.append((float(value) - dist.low) / (dist.high - dist.low))
    return np.asarray(coords, dtype=np.float64)


class NearestRow:
    """Answers a proposal with the nearest recorded configuration (Euclidean, normalised space)."""

    def __init__(self, table: Table) -> None:
        self.space = table_space(table)
        self.points = np.stack([normalised(self.space, row["params"]) for row in table.rows])

    def __call__(self, params: Mapping[str, Any]) -> tuple[int, float]:
        """(row index, distance) of the nearest recorded configuration to `params`."""
        distances = np.linalg.norm(self.points - normalised(self.space, params), axis=1)
        index = int(np.argmin(distances))
        return index, float(distances[index])


def replay_reports(row: Mapping[str, Any], max_iters: int, *, curves: bool = True,
                   fold_cost: float | None = None) -> list[dict[str, float]]:
    """The reports a trial of `row` makes, in order: each fold's validations within the fold (when `curves`),
    then its end, with the keys and CV figures of a real trial's reports (`orchestration.trial.cv_metrics`), the
    compute each report adds and the running estimate.

    A fold's compute is spread over its iterations; the fold end adds the rest (final validation, artefacts).
    With `fold_cost`, every fold costs that many CPU-seconds (the table's median fold: the configurations train the
    same model for the same iterations, and a fold's recorded wall time says more about the machine's load at the
    time than about the configuration); without it, each fold costs what was recorded for it.
    Without `curves` (schedulers that act at fold ends only) a fold is one report: the same decisions, fewer
    events for Tune to process.
    """
    reports: list[dict[str, float]] = []
    scores: list[float] = []
    baselines: list[float] = []
    for fold in row["folds"]:
        spent, index = 0.0, int(fold["fold"])
        cost = float(fold["cpu_seconds"]) if fold_cost is None else fold_cost
        for iteration, miou in fold["curve"] if curves else ():
            if iteration >= max_iters:
                continue  # the last validation is the fold's score, reported at its end
            compute = cost * iteration / max_iters - spent
            spent += compute
            reports.append({
                **cv_metrics(scores, baselines), keys.TRAIN_ITERATION: float(iteration),
                keys.VAL_MIOU_SEG: float(miou), FOLD_INDEX: float(index), FOLD_END: 0.0,
                ITERATIONS: float(len(scores) * max_iters + iteration),
                RUNNING: (sum(scores) + miou) / (len(scores) + 1), COMPUTE: compute,
            })
        scores.append(float(fold["score"]))
        baselines.append(float(fold["baseline"]))
        summary = cv_metrics(scores, baselines)
        reports.append({
            **summary, keys.TRAIN_ITERATION: float(max_iters), FOLD_SCORE: float(fold["score"]),
            keys.VAL_BASELINE_MIOU: float(fold["baseline"]), FOLD_INDEX: float(index), FOLD_END: 1.0,
            ITERATIONS: float(len(scores) * max_iters), RUNNING: summary[CV_MEAN],
            COMPUTE: cost - spent,
        })
    return reports


def replay_trainable(config: dict, *, table: Table, time_scale: float, curves: bool = True,
                     measured_compute: bool = False) -> None:
    """Ray Tune function trainable: answer `config` with the nearest table row and report that row's run."""
    from ray import tune

    index, distance = NearestRow(table)(config)
    fold_cost = None if measured_compute else table.fold_cost
    for report in replay_reports(table.rows[index], int(table.meta["max_iters"]), curves=curves,
                                 fold_cost=fold_cost):
        if time_scale > 0:
            time.sleep(report[COMPUTE] * time_scale)
        tune.report({**report, ROW: float(index), DISTANCE: distance})


def base_params(table: Table) -> dict[str, Any]:
    """The searched params of the table's base configuration (its row marked `base`).

    Raises:
        ValueError: the table has no base row.
    """
    row = next((row for row in table.rows if row.get("base")), None)
    if row is None:
        raise ValueError("the table has no base configuration (a row with \"base\": true) to start from")
    return dict(row["params"])


def replay_spec(table: Table, *, strategy: str, seed: int, trials: int, max_concurrent: int) -> Any:
    """A sweep spec with the table's space, folds and objective, and the strategy's search settings."""
    meta = table.meta
    asha_folds = strategy.removesuffix(BASE_FIRST) == "tpe_asha_folds"
    start_points = [base_params(table)] if strategy.endswith(BASE_FIRST) else []
    data = {
        "name": f"replay-{strategy}-{seed}",
        "base_config": "synthetic_demo",
        "space": meta["space"],
        "search": {"algorithm": "random" if strategy == "random" else "tpe", "seed": seed, "num_trials": trials,
                   "max_concurrent": max_concurrent, "start_points": start_points},
        "folds": {"k": int(meta["folds"]), "seed": 0},
        "scheduler": {"type": "asha" if asha_folds else "fifo", "grace_period": 1,
                      "reduction_factor": 2},
        "objective": {"metric": meta.get("objective", CV_MEAN), "mode": "max"},
    }
    return validate_sweep(data, check_paths=False)


class Events:
    """What a replayed sweep's driver saw, in the order it saw it (a Tune callback)."""

    def __init__(self) -> None:
        self.results: list[tuple[str, dict[str, float]]] = []
        self.ended: dict[str, str] = {}

    def callback(self) -> Any:
        from ray.tune import Callback

        events = self

        class _Recorder(Callback):
            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                events.results.append((trial.trial_id, {k: v for k, v in result.items()
                                                        if isinstance(v, (int, float))}))

        return _Recorder()


def make_scheduler(strategy: str, spec: Any, max_iters: int) -> Any:
    """The strategy's Tune scheduler (the project's own for ASHA over folds)."""
    from ray.tune.schedulers import ASHAScheduler

    from orchestration.tune_runner import make_scheduler as project_scheduler

    if strategy == "tpe_asha_iters":
        return ASHAScheduler(time_attr=ITERATIONS, metric=RUNNING, mode="max", max_t=spec.folds.k * max_iters,
                             **ITER_RUNGS)
    scheduler = project_scheduler(spec)
    if spec.scheduler.type == "asha":  # TuneConfig carries no metric here: the searcher and scheduler have their own
        scheduler.set_search_properties(spec.objective.metric, spec.objective.mode)
    return scheduler


def replay_sweep(table: Table, *, strategy: str, seed: int, trials: int, max_concurrent: int = 2,
                 time_scale: float = 0.001, storage: Path, measured_compute: bool = False) -> dict[str, Any]:
    """One replayed sweep in the running Ray instance; returns its events summarised (`summarise`)."""
    from ray import cloudpickle, tune
    from ray.tune import RunConfig
    from ray.tune.search import ConcurrencyLimiter

    from orchestration.tune_runner import make_searcher

    # this file is not a package module that Ray's workers could import: its functions travel by value
    if __name__ != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spec = replay_spec(table, strategy=strategy, seed=seed, trials=trials, max_concurrent=max_concurrent)
    events = Events()
    searcher = make_searcher(spec)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(replay_trainable, table=table, time_scale=time_scale,
                                                  curves=strategy == "tpe_asha_iters",
                                                  measured_compute=measured_compute), {"cpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
            scheduler=make_scheduler(strategy, spec, int(table.meta["max_iters"])),
            num_samples=trials, reuse_actors=True,
        ),
        run_config=RunConfig(storage_path=str(storage.resolve()), name=spec.name, callbacks=[events.callback()],
                             verbose=0),
    )
    tuner.fit()
    return summarise(table, events, k=spec.folds.k)


def summarise(table: Table, events: Events, *, k: int) -> dict[str, Any]:
    """From a replay's events: compute spent when each trial finished (in order), which rows were answered and
    how far from their proposals, which trials were stopped early, and the leaderboard of finished trials."""
    spent = 0.0
    finished: list[dict[str, Any]] = []  # {"trial", "row", "cv_mean", "compute"} in the order trials finished
    last: dict[str, dict[str, float]] = {}
    for trial_id, result in events.results:
        spent += float(result.get(COMPUTE, 0.0))
        last[trial_id] = result
        if result.get(FOLD_END) == 1.0 and int(result[FOLDS_COMPLETED]) == k:
            finished.append({"trial": trial_id, "row": int(result[ROW]), "cv_mean": float(result[CV_MEAN]),
                             "compute": spent})
    done = {f["trial"] for f in finished}
    stopped = [{"trial": t, "row": int(r[ROW]), "folds": int(r[FOLDS_COMPLETED])}
               for t, r in last.items() if t not in done]
    proposed = {int(r[ROW]) for r in last.values()}
    best_proposed = max(proposed, key=lambda i: table.rows[i]["cv_mean"]) if proposed else None
    return {
        "finished": finished, "stopped": stopped, "total_compute": spent,
        "distances": [float(r[DISTANCE]) for r in last.values()],
        "best_proposed_row": best_proposed,
        "best_proposed_stopped": best_proposed is not None and all(
            f["row"] != best_proposed for f in finished),
    }


def compute_to_reach(summary: Mapping[str, Any], target: float) -> float:
    """Compute spent when the first trial with CV mean >= `target` finished (inf when none did)."""
    return next((f["compute"] for f in summary["finished"] if f["cv_mean"] >= target), math.inf)


def best_within(summary: Mapping[str, Any], budget: float) -> float:
    """The best CV mean among trials finished within `budget` compute (nan when none)."""
    scores = [f["cv_mean"] for f in summary["finished"] if f["compute"] <= budget]
    return max(scores) if scores else math.nan


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles, inf-aware (a never-reached replay counts as inf)."""
    if not values:
        return (math.nan, math.nan, math.nan)
    low, mid, high = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75], method="nearest")
    return float(low), float(mid), float(high)


def _median_finite(values: Sequence[float]) -> float:
    """The median of the finite values (a replay with no trial finished within a budget has none); nan if none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def figures(table: Table, runs: Mapping[str, list[dict[str, Any]]], *, demo_folds: float = 18) -> dict[str, Any]:
    """The benchmark's figures from every replay of every strategy; `demo_folds`: the folds `make sweep`'s time
    budget affords (600 s x 2 trials at about 75 s a fold), in units of the table's median fold."""
    target = table.best - WITHIN
    demo_budget = demo_folds * table.fold_cost
    random_budget = float(np.median([s["total_compute"] for s in runs["random"]])) if "random" in runs else math.nan
    out: dict[str, Any] = {"table_best": table.best, "target": target, "random_budget_cpu_s": random_budget,
                           "demo_budget_cpu_s": demo_budget, "fold_cost_cpu_s": table.fold_cost,
                           "rows_within": sum(row["cv_mean"] >= target for row in table.rows),
                           "strategies": {}}
    for strategy, summaries in runs.items():
        reach = [compute_to_reach(s, target) for s in summaries]
        distances = [d for s in summaries for d in s["distances"]]
        entry = {
            "seeds": len(summaries),
            "compute_to_reach_q25_q50_q75": quartiles(reach),
            "never_reached": sum(math.isinf(r) for r in reach),
            "best_at_budget": {f"{int(f * 100)}%": _median_finite([best_within(s, f * random_budget)
                                                                    for s in summaries])
                               for f in (0.25, 0.5, 1.0)},
            "best_at_demo_budget": _median_finite([best_within(s, demo_budget) for s in summaries]),
            "total_compute_median": float(np.median([s["total_compute"] for s in summaries])),
            "distance_median_p90": (float(np.median(distances)), float(np.percentile(distances, 90))),
        }
        if strategy not in ("random", "tpe"):  # a scheduler that stops trials early
            entry["best_proposed_stopped"] = sum(s["best_proposed_stopped"] for s in summaries)
        out["strategies"][strategy] = entry
    if "random" in out["strategies"]:
        random_reach = out["strategies"]["random"]["compute_to_reach_q25_q50_q75"][1]
        for entry in out["strategies"].values():
            entry["reach_vs_random"] = entry["compute_to_reach_q25_q50_q75"][1] / random_reach
    return out


def _fmt(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:,.0f}"


def report(fig: Mapping[str, Any]) -> str:
    width = max([16, *(len(name) for name in fig["strategies"])])
    lines = [f"table best CV mean {fig['table_best']:.4f}; target (within {WITHIN}) {fig['target']:.4f}, "
             f"{fig['rows_within']} recorded configurations reach it; random search's median budget "
             f"{fig['random_budget_cpu_s']:,.0f} CPU-s; the demo's budget {fig['demo_budget_cpu_s']:,.0f} CPU-s "
             f"(a fold: {fig['fold_cost_cpu_s']:,.0f} CPU-s)",
             f"{'strategy':<{width}} {'seeds':>5} {'CPU-s to target q25/q50/q75':>30} {'never':>5} {'vs random':>9} "
             f"{'best@25%':>8} {'@50%':>6} {'@100%':>6} {'@demo':>6} {'cut best':>8} {'dist med/p90':>12}"]
    for name, e in fig["strategies"].items():
        q = e["compute_to_reach_q25_q50_q75"]
        b = e["best_at_budget"]
        lines.append(
            f"{name:<{width}} {e['seeds']:>5} {' / '.join(_fmt(v) for v in q):>30} {e['never_reached']:>5} "
            f"{e.get('reach_vs_random', math.nan):>9.2f} {b['25%']:>8.4f} {b['50%']:>6.4f} {b['100%']:>6.4f} "
            f"{e['best_at_demo_budget']:>6.4f} {e.get('best_proposed_stopped', '-')!s:>8} "
            f"{e['distance_median_p90'][0]:>5.2f}/{e['distance_median_p90'][1]:.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", nargs="?", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=48, help="trials of each replayed sweep")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--max-concurrent", type=int, default=2, help="the demo's search.max_concurrent")
    parser.add_argument("--time-scale", type=float, default=0.001, help="replay seconds per recorded CPU-second")
    parser.add_argument("--storage", type=Path, default=Path("runs/bench/search_efficiency"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures and replays here")
    parser.add_argument("--measured-compute", action="store_true",
                        help="each fold costs its own recorded CPU-seconds (default: the table's median fold)")
    parser.add_argument("--demo-folds", type=float, default=18,
                        help="folds make sweep trains (6 trials x 3 folds within its 570 s budget)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="replay nothing: the figures of the replays in these --json files (e.g. strategies "
                             "replayed by separate processes)")
    args = parser.parse_args()
    try:
        table = load_table(args.table)
    except (OSError, ValueError) as exc:
        print(f"search_efficiency: error: {exc}", file=sys.stderr)
        return 2
    if args.merge:
        runs = {}
        for path in args.merge:
            try:
                runs.update(json.loads(path.read_text())["replays"])
            except (OSError, ValueError, KeyError) as exc:
                print(f"search_efficiency: error: {path}: not a --json output of this script ({exc})",
                      file=sys.stderr)
                return 2
    else:
        runs = replay_all(table, args)
    fig = figures(table, runs, demo_folds=args.demo_folds)
    print(report(fig))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": fig, "replays": runs}, indent=1))
    return 0


def replay_all(table: Table, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every strategy's replays (`args.seeds` each) in one local Ray instance."""
    for name, value in QUIET_TUNE.items():
        os.environ.setdefault(name, value)
    import ray

    ray.init(num_cpus=args.max_concurrent, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    runs: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    try:
        for strategy in args.strategies:
            runs[strategy] = [
                replay_sweep(table, strategy=strategy, seed=seed, trials=args.trials,
                             max_concurrent=args.max_concurrent, time_scale=args.time_scale,
                             storage=args.storage, measured_compute=args.measured_compute)
                for seed in range(args.seeds)
            ]
            print(f"  {strategy}: {args.seeds} replays, {time.perf_counter() - started:.0f} s so far", flush=True)
    finally:
        ray.shutdown()
    return runs


if __name__ == "__main__":
    sys.exit(main())

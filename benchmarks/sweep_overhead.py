"""Where a sweep's time goes: total wall time, time to the first training step, and the share of the trial
slots' time spent in training and evaluation steps (the rest: Ray, Optuna, MLflow, start-up, idle slots).

    python benchmarks/sweep_overhead.py                      # the demo sweep, as `make sweep` runs it
    python benchmarks/sweep_overhead.py --smoke              # a quick look
    python benchmarks/sweep_overhead.py --space FILE --set search.num_trials=4

It runs the sweep in this process exactly as `cpews sweep run` does (a new sweep folder under --run-dir) and
reads the trials' timings from their last Tune results (`time/...`, accumulated over their folds by the trial):
  steps_s   training steps (batches, forward, backward, pool builds, checkpoint writes), from the trainer
  eval_s    validation at the end of each fold (and every eval.every steps)
  setup_s   per fold: model and data set-up; per trial: imports, config, MLflow runs
  report_s  inside the trainer's reporter: MLflow logging and Tune reports
  artifacts_s  per fold: overlays and MLflow artifact logging
Slot time = wall time x trials that can run at once (search.max_concurrent); the step share is
(sum of steps_s + eval_s over trials) / slot time, measured from the start of this script (set-up included)
and from the first training step (the environment set up).
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="search_spaces/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)

    from orchestration.search_space import load_sweep, smoke
    from orchestration.sweep import next_free_name, run_sweep

    spec = load_sweep(args.space, args.overrides)
    if args.smoke:
        spec = smoke(spec)
    spec = next_free_name(spec, Path(args.run_dir))
    outcome = run_sweep(spec, run_dir=Path(args.run_dir))
    ended = time.time()

    rows = outcome.rows
    timing = {key: sum(row["timings"].get(f"time/{key}", 0.0) for row in rows)
              for key in ("steps_s", "eval_s", "setup_s", "report_s", "artifacts_s")}
    first_steps = [row["timings"]["time/first_step_epoch"] for row in rows if "time/first_step_epoch" in row["timings"]]
    first_step = min(first_steps) if first_steps else float("nan")
    trial_time = sum(row["wall_time_s"] or 0.0 for row in rows)
    slots = spec.search.max_concurrent
    in_steps = timing["steps_s"] + timing["eval_s"]
    wall = ended - STARTED
    after_setup = ended - first_step
    folds = [row["folds_completed"] for row in rows]
    figures = {
        "sweep": outcome.name,
        "trials": len(rows),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in ("completed", "pruned", "failed")},
        "folds_trained": sum(folds),
        "slots": slots,
        "wall_s": wall,
        "first_step_s": first_step - STARTED,
        "in_steps_s": in_steps,
        **{f"sum_{k}": v for k, v in timing.items()},
        "sum_trial_time_s": trial_time,
        "share_of_slot_time": in_steps / (wall * slots),
        "share_of_slot_time_after_first_step": in_steps / (after_setup * slots),
        "share_of_trial_time": in_steps / trial_time if trial_time else float("nan"),
        "median_fold_steps_s": statistics.median(
            [r["timings"].get("time/steps_s", 0.0) / max(1, r["folds_completed"]) for r in rows]) if rows else 0.0,
    }
    print()
    print(f"sweep {figures['sweep']}: {figures['trials']} trials ({figures['statuses']}), "
          f"{figures['folds_trained']} folds trained, {slots} slot(s)")
    print(f"  total wall time                      {wall:8.1f} s")
    print(f"  time to the first training step      {figures['first_step_s']:8.1f} s")
    print(f"  in training + evaluation steps       {in_steps:8.1f} s  (steps {timing['steps_s']:.1f}, eval {timing['eval_s']:.1f})")
    print(f"  trial set-up / reporting / artifacts {timing['setup_s']:8.1f} / {timing['report_s']:.1f} / {timing['artifacts_s']:.1f} s")
    print(f"  trials' own time (Tune time_total_s) {trial_time:8.1f} s")
    print(f"  share of slot time in steps          {100 * figures['share_of_slot_time']:8.1f} %  (from the start)")
    print(f"  share of slot time in steps          {100 * figures['share_of_slot_time_after_first_step']:8.1f} %  (from the first step)")
    print(f"  share of trial time in steps         {100 * figures['share_of_trial_time']:8.1f} %")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

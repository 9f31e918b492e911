"""Warm start of a sweep from an earlier one (`cpews sweep run FILE --warm-start SWEEP`).

The earlier sweep's finished trials are added to the new sweep's Optuna study before its first trial, so that
a widened or refined search does not start from zero. Both sweeps must score trials the same way
(`warm_start_problems`): the same searched keys, each with the same kind of distribution (the ranges and the
categorical choices may differ), the same objective (metric and mode), the same config outside the searched
keys (base config and fixed settings) and the same folds (k, seed, split). Then (`seed_trials`):

- a completed trial (every fold scored) becomes a COMPLETE trial with its objective value, and the objective
  after each of its folds as intermediate values (step = folds completed, as `PruningOptunaSearch` reports
  them while a sweep runs);
- a pruned trial becomes a PRUNED trial with its intermediate values (Optuna takes the last one as its value);
- a trial whose params the new space cannot produce (a value outside its range or choices, or a conditional
  key active in one space and not in the other) is skipped and counted;
- failed, timed out, interrupted and pending trials are left out and counted.

The new sweep keeps what it was given in its folder (`WARM_START_FILE`), so a resume that has to start the
search again seeds the same trials; a resume that restores Tune's experiment gets its Optuna study back with
them in it. Each seeded Optuna trial carries the user attribute `WARM_START_ATTR` = `<earlier sweep>/<trial>`,
and a study that holds a trial of that name is not given it again (`add_seed_trials`).

Imports neither Ray nor MLflow; `optuna_trials` and `add_seed_trials` work with Optuna objects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from cpews.config import Scalar
from orchestration.search_space import SweepSpec, optuna_distributions, sample_params
from orchestration.trial import CV_BASELINE, CV_MEAN, CV_STD, FOLDS_COMPLETED, cv_metrics

__all__ = [
    "BOOKKEEPING_KEYS",
    "WARM_START_ATTR",
    "WARM_START_FILE",
    "SeedTrial",
    "WarmStart",
    "add_seed_trials",
    "load_warm_start",
    "optuna_trials",
    "outside_reason",
    "read_warm_start",
    "seed_trials",
    "warm_start_problems",
    "write_warm_start",
]

WARM_START_FILE = "warm_start.json"  # in the new sweep's folder: the trials it was seeded with
WARM_START_FORMAT = "cpews-warm-start/1"
WARM_START_ATTR = "cpews.warm_start"  # user attribute of a seeded Optuna trial: "<earlier sweep>/<trial id>"
# Config keys that say how a trial is run and logged, not what it scores: they may differ between the sweeps.
BOOKKEEPING_KEYS = frozenset(
    {
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.check_finite_every",
        # validations within a fold leave its training alone: the demo's trials and the space table's (which
        # validate every 100 iterations) give the same fold scores to the last bit (docs/results.md)
        "eval.every",
        "proto.cache_dir",
        "pretrain.cache_dir",
    }
)
_CONFIG_PROBLEMS_SHOWN = 5  # differing config keys named in a refusal; the rest are counted
# The leaderboard row's value of each objective a trial can report (`cpews.training.keys.TRIAL_REPORT_KEYS`).
_ROW_VALUES = {
    CV_MEAN: "cv_miou_mean",
    CV_STD: "cv_miou_std",
    CV_BASELINE: "baseline_miou",
    FOLDS_COMPLETED: "folds_completed",
}


class SeedTrial(NamedTuple):
    """One earlier trial as the new study gets it."""

    trial: str  # the earlier sweep's trial id
    state: Literal["completed", "pruned"]
    params: dict[str, Scalar]  # the searched keys, in the new space's types
    value: float | None  # the objective of a completed trial; a pruned one's is its last intermediate value
    intermediate_values: dict[int, float]  # folds completed -> the objective after that fold


class WarmStart(NamedTuple):
    """What a new sweep takes from an earlier one: the trials to seed and what was left out."""

    sweep: str  # the earlier sweep's name
    trials: tuple[SeedTrial, ...]
    outside: int  # finished trials skipped: the new space cannot produce their params
    ignored: int  # trials left out: failed, timed out, interrupted, pending, or without a score

    @property
    def completed(self) -> int:
        return sum(seed.state == "completed" for seed in self.trials)

    @property
    def pruned(self) -> int:
        return sum(seed.state == "pruned" for seed in self.trials)

    def describe(self) -> str:
        """The line the sweep's driver prints."""
        return (
            f"warm start from {self.sweep}: {self.completed} completed + {self.pruned} pruned trials seeded, "
            f"{self.outside} outside the new space skipped"
        )

    def counts(self) -> dict[str, int]:
        """`{"completed", "pruned", "outside", "ignored"}`: the counts, for the sweep's state and MLflow run."""
        return {
            "completed": self.completed,
            "pruned": self.pruned,
            "outside": self.outside,
            "ignored": self.ignored,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON data (`WARM_START_FILE`); `from_dict` reads it back."""
        trials = [
            {**seed._asdict(), "intermediate_values": sorted(seed.intermediate_values.items())}
            for seed in self.trials
        ]
        return {"format": WARM_START_FORMAT, "sweep": self.sweep, **self.counts(), "trials": trials}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WarmStart:
        if data.get("format") != WARM_START_FORMAT:
            raise ValueError(f"not a warm start record (no format {WARM_START_FORMAT!r})")
        trials = tuple(
            SeedTrial(
                str(t["trial"]),
                t["state"],
                dict(t["params"]),
                t["value"],
                {int(step): float(value) for step, value in t["intermediate_values"]},
            )
            for t in data["trials"]
        )
        return cls(str(data["sweep"]), trials, int(data["outside"]), int(data["ignored"]))


# ------------------------------------------------------------------------------------------------------------
# Whether two sweeps score the same way.
# ------------------------------------------------------------------------------------------------------------


def warm_start_problems(old: SweepSpec, new: SweepSpec) -> list[str]:
    """Why the trials of sweep `old` cannot seed sweep `new` (empty: they can), one reason per item, written
    from the new sweep's side ("its" = the earlier sweep's): different searched keys, a key searched with
    another kind of distribution, another objective, other folds, or another config outside the searched keys
    (`BOOKKEEPING_KEYS` aside). Ranges, choices and `when` conditions may differ: trials outside the new space
    are skipped one by one (`outside_reason`)."""
    problems: list[str] = []
    old_keys, new_keys = old.searched_keys(), new.searched_keys()
    problems += [f"its space searches {key}, this one does not" for key in old_keys if key not in new_keys]
    problems += [f"this space searches {key}, its space does not" for key in new_keys if key not in old_keys]
    for key in (k for k in new_keys if k in old_keys):
        old_kind, new_kind = old.distribution(key).kind, new.distribution(key).kind
        if old_kind != new_kind:
            problems.append(f"its space searches {key} as {old_kind}, this one as {new_kind}")
    if old.objective != new.objective:
        problems.append(
            f"its objective is {old.objective.metric} ({old.objective.mode}), this one's is "
            f"{new.objective.metric} ({new.objective.mode})"
        )
    old_folds, new_folds = _folds(old), _folds(new)
    if old_folds != new_folds:
        problems.append(f"its folds are {old_folds}, this one's are {new_folds}")
    problems += _config_problems(old, new)
    return problems


def _folds(spec: SweepSpec) -> str:
    split = spec.folds.split or spec.base_train_config().data.train_split
    return f"k={spec.folds.k} seed={spec.folds.seed} split={split}"


def _config_problems(old: SweepSpec, new: SweepSpec) -> list[str]:
    """The config keys, other than the searched ones, whose value differs between the sweeps' trials. A key
    that both spaces search under a condition counts: its base/fixed value applies where neither samples it."""
    conditional = {d.key for d in old.space if d.when} & {d.key for d in new.space if d.when}
    searched = (set(old.searched_keys()) | set(new.searched_keys())) - conditional
    old_cfg, new_cfg = old.base_train_config().to_flat_dict(), new.base_train_config().to_flat_dict()
    differing = [
        key
        for key in old_cfg
        if key not in searched and key not in BOOKKEEPING_KEYS and old_cfg[key] != new_cfg[key]
    ]

    def source(spec: SweepSpec, key: str) -> str:
        return "fixed" if key in spec.fixed else f"base config {spec.base_config}"

    problems = [
        f"{key} is {old_cfg[key]!r} in its trials ({source(old, key)}), {new_cfg[key]!r} in this one's "
        f"({source(new, key)})"
        for key in differing[:_CONFIG_PROBLEMS_SHOWN]
    ]
    if len(differing) > _CONFIG_PROBLEMS_SHOWN:
        problems.append(f"{len(differing) - _CONFIG_PROBLEMS_SHOWN} more config keys differ")
    return problems


# ------------------------------------------------------------------------------------------------------------
# The earlier trials as seeds.
# ------------------------------------------------------------------------------------------------------------


class _Replay:
    """A `SuggestTrial` that answers with an earlier trial's values (KeyError: the trial has no such key)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> Any:
        return self.params[name]

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1) -> Any:
        return self.params[name]

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.params[name]


def outside_reason(spec: SweepSpec, params: Mapping[str, Any]) -> str | None:
    """Why `spec`'s space cannot produce the sampled `params` of another sweep's trial (None: it can): a key it
    does not search, a value outside a range or the choices (`Distribution.contains`), a conditional key given
    although its condition does not hold here, or one missing although it does."""
    searched = spec.searched_keys()
    for key, value in params.items():
        if key not in searched:
            return f"{key} is not searched"
        if not spec.distribution(key).contains(value):
            return f"{key}={value!r} is outside {spec.distribution(key).to_dict()}"
    try:
        replayed = sample_params(
            spec, _Replay(params)
        )  # the keys this space would sample, given these values
    except KeyError as exc:
        return f"{exc.args[0]} is sampled here but absent from the trial"
    inactive = sorted(set(params) - set(replayed))
    return f"{', '.join(inactive)} not sampled here (its condition does not hold)" if inactive else None


def _in_space(spec: SweepSpec, params: Mapping[str, Any]) -> dict[str, Scalar]:
    """`params` (inside `spec`'s space) in the types Optuna's distributions of the space take: a choice as the
    choice itself, an int as int, a float clamped into its range (`contains` allows a rounding error)."""
    out: dict[str, Scalar] = {}
    for key, value in params.items():
        dist = spec.distribution(key)
        if dist.kind == "categorical":
            out[key] = next(
                c for c in dist.choices if c == value and isinstance(c, bool) == isinstance(value, bool)
            )
        elif dist.kind == "int":
            out[key] = int(value)
        else:
            out[key] = min(max(float(value), float(dist.low)), float(dist.high))
    return out


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fold_values(metric: str, row: Mapping[str, Any]) -> dict[int, float]:
    """The objective after each finished fold of a leaderboard row (step = folds completed), as the trial
    reported it at each fold end (`orchestration.trial.cv_metrics` of the fold scores so far); the row's own
    value at its last step when its fold scores do not reach it."""
    scores = [float(s) for s in row.get("fold_scores") or []]
    values: dict[int, float] = {}
    for step in range(1, len(scores) + 1):
        value = _finite(cv_metrics(scores[:step], []).get(metric))
        if value is not None:
            values[step] = value
    done, last = int(row.get("folds_completed") or 0), _finite(row.get(_ROW_VALUES.get(metric, "")))
    if done > 0 and done not in values and last is not None:
        values[done] = last
    return values


def seed_trials(spec: SweepSpec, rows: Iterable[Mapping[str, Any]], sweep: str) -> WarmStart:
    """The trials of sweep `sweep` (its leaderboard rows: `orchestration.sweep.leaderboard_rows`) that seed
    sweep `spec`, whose objective and folds are the earlier sweep's (`warm_start_problems` is empty).

    A completed row with no finite objective value is left out, like the rows that did not finish.
    """
    metric = spec.objective.metric
    seeds: list[SeedTrial] = []
    outside = ignored = 0
    for row in rows:
        if row.get("status") not in ("completed", "pruned"):
            ignored += 1
            continue
        params = dict(row.get("params") or {})
        if outside_reason(spec, params) is not None:
            outside += 1
            continue
        steps = _fold_values(metric, row)
        if row["status"] == "completed":
            value = _finite(row.get(_ROW_VALUES.get(metric, "")))
            scores = row.get("fold_scores") or []
            if value is None and scores:
                value = _finite(cv_metrics([float(s) for s in scores], []).get(metric))
            if value is None:
                ignored += 1
                continue
        else:
            value = steps[max(steps)] if steps else None
        seeds.append(SeedTrial(str(row.get("trial")), row["status"], _in_space(spec, params), value, steps))
    return WarmStart(sweep, tuple(seeds), outside, ignored)


def load_warm_start(name: str, spec: SweepSpec, *, run_dir: Path = Path("runs")) -> WarmStart:
    """The seeds that sweep `name` under `run_dir` gives sweep `spec` (its leaderboard: `read_leaderboard`).

    Raises:
        SweepError: there is no such sweep, its sweep file cannot be read, or it scores trials another way
            (`warm_start_problems`); the one-line message begins with `--warm-start <name>:`.
    """
    from orchestration.sweep import SweepError, _read_spec, existing_sweep, read_leaderboard

    try:
        old = _read_spec(existing_sweep(run_dir, name))
    except SweepError as exc:
        raise SweepError(f"--warm-start {name}: {exc}") from None
    problems = warm_start_problems(old, spec)
    if problems:
        raise SweepError(f"--warm-start {name}: {'; '.join(problems)}")
    return seed_trials(spec, read_leaderboard(name, run_dir=run_dir).rows, name)


def write_warm_start(path: str | Path, warm: WarmStart) -> None:
    from orchestration.tracking import write_json_atomically

    write_json_atomically(path, warm.to_dict())


def read_warm_start(path: str | Path) -> WarmStart | None:
    """The warm start saved at `path` (None when there is no such file).

    Raises:
        ValueError: the file is not a warm start record (the message names it).
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return WarmStart.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------------------------------------------
# Into an Optuna study.
# ------------------------------------------------------------------------------------------------------------


def optuna_trials(spec: SweepSpec, warm: WarmStart) -> list[Any]:
    """The seeds as finished Optuna trials (`optuna.trial.FrozenTrial`) over `spec`'s distributions, COMPLETE
    or PRUNED, each named by its user attribute `WARM_START_ATTR`. Imports Optuna."""
    import optuna

    state = {"completed": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
    return [
        optuna.trial.create_trial(
            state=state[seed.state],
            value=seed.value,
            params=dict(seed.params),
            distributions=optuna_distributions(spec, list(seed.params)),
            intermediate_values=dict(seed.intermediate_values),
            user_attrs={WARM_START_ATTR: f"{warm.sweep}/{seed.trial}"},
        )
        for seed in warm.trials
    ]


def add_seed_trials(study: Any, trials: Iterable[Any]) -> int:
    """Add the seed `trials` (`optuna_trials`) to the Optuna `study`, but not one it holds already (by its
    `WARM_START_ATTR`); returns how many were added."""
    held = {t.user_attrs.get(WARM_START_ATTR) for t in study.get_trials(deepcopy=False)} - {None}
    added = 0
    for trial in trials:
        if trial.user_attrs.get(WARM_START_ATTR) not in held:
            study.add_trial(trial)
            added += 1
    return added

"""Sweep files: their schema, validation, `--set` overrides and the sampling of one trial's parameters.

A sweep file (YAML, documented with an example in `search_spaces/README.md`) names a base config, fixed
overrides of the config tree, a search space over dotted config keys, and how to search it (algorithm,
trials, concurrency, folds, scheduler, per-trial resources, objective, time budget, MLflow experiment).
`load_sweep` parses and validates it completely before any trial starts: every error is a `SweepFileError`
whose message begins with the file path and names the offending key path (`search.algoritm`,
`space.loss.pdl_weight.loguniform`) and value.

Validation also checks, before any trial starts, what would otherwise fail in every trial: values outside
their config field's range (fixed values, categorical choices, the bounds of a searched range), an objective
that the trials never report, folds smaller than a batch (the synthetic set, or the split list of a dataset on
disk), and a `model.weights` file that does not load into the model's backbone.

This module imports neither Ray, Optuna nor MLflow. `sample_params` works with any object that has Optuna's
define-by-run methods (`suggest_float`, `suggest_int`, `suggest_categorical`), e.g. an `optuna.Trial`, an
`optuna.trial.FixedTrial` or a test double; `optuna_distributions` imports Optuna inside. Validation imports
torch inside (`cpews.training.keys`, and `cpews.model` / `cpews.data` for the checks of files on disk).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_origin

import yaml

from cpews.config import (
    SYNTHETIC_WEIGHTS,
    ConfigError,
    Scalar,
    TrainConfig,
    check_range,
    coerce_value,
    field_annotation,
    field_range,
    load_config,
)

__all__ = [
    "DEFAULT_BASE_CONFIG",
    "DEFAULT_OBJECTIVE_METRIC",
    "DISTRIBUTION_KINDS",
    "SEARCH_SPACES_DIR",
    "DefineByRun",
    "Distribution",
    "FoldSettings",
    "ObjectiveSettings",
    "ResourceSettings",
    "SchedulerSettings",
    "SearchSettings",
    "SuggestTrial",
    "SweepFileError",
    "SweepSpec",
    "TrackingSettings",
    "apply_overrides",
    "flat_params",
    "load_sweep",
    "optuna_define_by_run",
    "optuna_distributions",
    "resolve_sweep_path",
    "sample_params",
    "smoke",
    "validate_sweep",
]

DEFAULT_BASE_CONFIG = "synthetic_demo"
# The mean over folds of `val/miou_seg` (cpews.training.keys.VAL_MIOU_SEG). The `cv/*` keys are written by the
# K-fold trainable; kept here as a literal so that this module does not import `cpews.training` (torch).
DEFAULT_OBJECTIVE_METRIC = "cv/miou_seg_mean"
DISTRIBUTION_KINDS: tuple[str, ...] = ("uniform", "loguniform", "int", "categorical")
SEARCH_SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"

_TOP_LEVEL_KEYS = (
    "name",
    "description",
    "base_config",
    "fixed",
    "space",
    "search",
    "folds",
    "scheduler",
    "resources",
    "objective",
    "time_budget_s",
    "tracking",
)
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Smoke settings (see `smoke`): a few iterations, the pool still built half-way, a tiny synthetic set.
_SMOKE_MAX_ITERS = 8
_SMOKE_SYNTHETIC_VAL = 8
_SMOKE_MIN_SYNTHETIC_TRAIN = 32
_SMOKE_EVAL_IMAGES = 8


class SweepFileError(ValueError):
    """A sweep file (or its overrides) is invalid; the message begins with the file path when known and names
    the key path and the value."""


# ------------------------------------------------------------------------------------------------------------
# The spec.
# ------------------------------------------------------------------------------------------------------------


class SuggestTrial(Protocol):
    """The part of Optuna's define-by-run trial API that `sample_params` uses."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class Distribution:
    """How one config key is searched.

    `low`/`high` are inclusive bounds (floats for `uniform`/`loguniform`, ints for `int`); `choices` are the
    categorical values in their flat-config form (tuple fields as comma-separated strings). `when` holds
    conditions `(other_key, allowed_values)`: the key is sampled only when every other key was sampled and took
    one of its allowed values; otherwise the base/fixed value applies.
    """

    key: str
    kind: Literal["uniform", "loguniform", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    choices: tuple[Scalar, ...] = ()
    when: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.when)

    def is_active(self, params: Mapping[str, Any]) -> bool:
        """Whether the `when` conditions hold for the parameters sampled so far."""
        return all(key in params and params[key] in allowed for key, allowed in self.when)

    def contains(self, value: Any) -> bool:
        """Whether `value` is a value this distribution can produce."""
        if self.kind == "categorical":
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int":
            if float(value) != int(value):
                return False
            return self.low <= value <= self.high and (int(value) - self.low) % (self.step or 1) == 0
        tolerance = 1e-12 * max(abs(self.low), abs(self.high))
        return self.low - tolerance <= value <= self.high + tolerance

    def suggest(self, trial: SuggestTrial) -> Scalar:
        """Ask `trial` for a value of this key (the Optuna parameter name is the dotted config key)."""
        if self.kind in ("uniform", "loguniform"):
            return float(trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log))
        if self.kind == "int":
            return int(trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))

    def to_dict(self) -> dict[str, Any]:
        """The sweep-file form (`{"loguniform": [0.05, 0.3]}`, `{"int": [4, 16], "step": 4}`, ...)."""
        out: dict[str, Any] = {}
        if self.kind == "categorical":
            out["categorical"] = list(self.choices)
        else:
            out[self.kind] = [self.low, self.high]
        if self.step is not None:
            out["step"] = self.step
        if self.when:
            out["when"] = {key: list(values) if len(values) > 1 else values[0] for key, values in self.when}
        return out


@dataclass(frozen=True)
class SearchSettings:
    algorithm: Literal["tpe", "random"] = "tpe"  # Optuna TPESampler or RandomSampler
    seed: int = 0  # sampler seed
    num_trials: int = 10
    max_concurrent: int = 1  # trials running at the same time


@dataclass(frozen=True)
class FoldSettings:
    k: int = 3
    seed: int = 0
    split: str = ""  # the split that is cut into folds; validation fills in the config's data.train_split


@dataclass(frozen=True)
class SchedulerSettings:
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # in reports (Tune's training_iteration), not in training iterations
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class ResourceSettings:
    cpu: float = 1.0  # per trial
    gpu: float = 0.0  # per trial; fractions below 1 share a GPU (no memory isolation)


@dataclass(frozen=True)
class ObjectiveSettings:
    metric: str = DEFAULT_OBJECTIVE_METRIC
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class TrackingSettings:
    experiment: str = ""  # MLflow experiment; validation fills in the sweep name


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file. Build it with `load_sweep` or `validate_sweep`, not directly.

    `base` is the resolved base config (`base_config` loaded), `fixed` the overrides applied to every trial in
    flat-config form, `space` the searched keys in file order. Treat `fixed` as read-only.
    """

    name: str
    base_config: str
    base: TrainConfig = field(repr=False)
    fixed: dict[str, Scalar] = field(hash=False)
    space: tuple[Distribution, ...]
    search: SearchSettings
    folds: FoldSettings
    scheduler: SchedulerSettings
    resources: ResourceSettings
    objective: ObjectiveSettings
    tracking: TrackingSettings
    description: str = ""
    time_budget_s: float | None = None
    source: str | None = field(default=None, compare=False)  # the sweep file, when loaded from one

    def searched_keys(self) -> list[str]:
        """The searched config keys, in file order."""
        return [d.key for d in self.space]

    def distribution(self, key: str) -> Distribution:
        for dist in self.space:
            if dist.key == key:
                return dist
        raise KeyError(
            f"{key!r} is not searched in sweep {self.name!r}; searched: {', '.join(self.searched_keys())}"
        )

    def base_train_config(self) -> TrainConfig:
        """The base config with the fixed overrides: what every trial starts from."""
        return TrainConfig.from_flat_dict(self.fixed, base=self.base, source=f"sweep {self.name!r} fixed")

    def trial_config(self, params: Mapping[str, Any]) -> TrainConfig:
        """Base + fixed + the sampled `params` (`{config key: value}` as `sample_params` returns them).

        Raises:
            SweepFileError: a key is not searched, a value lies outside its distribution, or a conditional key
                is given although its `when` condition does not hold.
        """
        where = f"sweep {self.name!r} trial params"
        for key, value in params.items():
            try:
                dist = self.distribution(key)
            except KeyError as exc:
                raise SweepFileError(f"{where}: {exc.args[0]}") from None
            if not dist.contains(value):
                raise SweepFileError(f"{where}: {key}={value!r} is outside its distribution {dist.to_dict()}")
            if not dist.is_active(params):
                raise SweepFileError(
                    f"{where}: {key}={value!r} is given but its condition when={dist.to_dict()['when']} does not hold"
                )
        try:
            return TrainConfig.from_flat_dict(params, base=self.base_train_config(), source=where)
        except ConfigError as exc:
            raise SweepFileError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The sweep-file form of this spec (defaults filled in); `validate_sweep` of it gives an equal spec."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["base_config"] = self.base_config
        out["fixed"] = dict(self.fixed)
        out["space"] = {d.key: d.to_dict() for d in self.space}
        out["search"] = dataclasses.asdict(self.search)
        out["folds"] = dataclasses.asdict(self.folds)
        out["scheduler"] = dataclasses.asdict(self.scheduler)
        out["resources"] = dataclasses.asdict(self.resources)
        out["objective"] = dataclasses.asdict(self.objective)
        if self.time_budget_s is not None:
            out["time_budget_s"] = self.time_budget_s
        out["tracking"] = dataclasses.asdict(self.tracking)
        return out

    def to_yaml(self) -> str:
        """`to_dict` as YAML (for logging the resolved sweep as an artifact)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------------------------
# Loading and overrides.
# ------------------------------------------------------------------------------------------------------------


def resolve_sweep_path(path_or_name: str | Path) -> Path:
    """A sweep file path as given, or the name of a file in `search_spaces/` (`demo` -> search_spaces/demo.yaml).

    Raises:
        SweepFileError: neither exists.
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    named = SEARCH_SPACES_DIR / f"{path_or_name}.yaml"
    if not path.suffix and named.is_file():
        return named
    shipped = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml")) if SEARCH_SPACES_DIR.is_dir() else []
    raise SweepFileError(f"{path}: sweep file not found (shipped sweeps: {', '.join(shipped) or 'none'})")


def load_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    available: Mapping[str, float] | None = None,
    check_paths: bool = True,
) -> SweepSpec:
    """Read a sweep file, apply `key=value` overrides to it, and validate it. Nothing is written anywhere.

    Args:
        path: the YAML file, or the name of one in `search_spaces/` (`demo`).
        overrides: `--set` strings with a dotted path into the YAML and a YAML value: `search.num_trials=4`,
            `fixed.loss.ism_weight=0.3` (everything after `fixed.` is the config key),
            `space.loss.pdl_weight={loguniform: [0.05, 0.2]}`. A value of `null` removes a `fixed`/`space`
            entry or resets an optional setting to its default.
        available: `{"cpu": n, "gpu": m}` the largest machine offers; a per-trial request above it is an error.
        check_paths: check that the dataset folder (and local weight/checkpoint files) exist.

    Raises:
        SweepFileError: the file is missing, not YAML, or invalid; the message begins with its path.
    """
    path = resolve_sweep_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SweepFileError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SweepFileError(
            f"{path}: not a text (UTF-8) file: byte {exc.object[exc.start]:#04x} at offset {exc.start}"
        ) from None
    except OSError as exc:
        raise SweepFileError(f"{path}: cannot be read: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SweepFileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides, source=str(path))
    return validate_sweep(
        data, source=str(path), default_name=path.stem, available=available, check_paths=check_paths
    )


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str], *, source: str | None = None
) -> dict[str, Any]:
    """Return a copy of the raw sweep mapping with `key=value` overrides applied (see `load_sweep`)."""
    out = copy.deepcopy(dict(data))
    prefix = f"{source}: " if source else ""
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepFileError(f"{prefix}override {item!r} is not of the form key=value")
        value = _parse_scalar(raw)
        head, _, rest = key.partition(".")
        if head in ("fixed", "space") and rest:
            _override_entry(out, head, rest, value, prefix, item)
            continue
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise SweepFileError(f"{prefix}override {item!r}: {where} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def _override_entry(out: dict, head: str, rest: str, value: Any, prefix: str, item: str) -> None:
    """`fixed.<section.field>=v` / `space.<section.field>[.<path inside the entry>]=v`."""
    section = out.get(head)
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise SweepFileError(f"{prefix}override {item!r}: {head} is {section!r}, not a mapping")
    section = _flatten_fixed(section) if head == "fixed" else dict(section)
    parts = rest.split(".")
    config_key, inner = (rest, []) if head == "fixed" else (".".join(parts[:2]), parts[2:])
    if not inner:
        if value is None:
            section.pop(config_key, None)
        else:
            section[config_key] = value
    else:
        entry = section.get(config_key)
        entry = dict(entry) if isinstance(entry, Mapping) else {}
        node = entry
        for part in inner[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        if value is None:
            node.pop(inner[-1], None)
        else:
            node[inner[-1]] = value
        section[config_key] = entry
    out[head] = section


def _parse_scalar(raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _flatten_fixed(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{loss: {ism_weight: 0.3}}` and `{loss.ism_weight: 0.3}` both give `{"loss.ism_weight": 0.3}`."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten_fixed(value, dotted))
        else:
            flat[dotted] = value
    return flat


# ------------------------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------------------------


def validate_sweep(
    data: Mapping[str, Any],
    *,
    source: str | Path | None = None,
    default_name: str | None = None,
    available: Mapping[str, float] | None = None,
    check_paths: bool = True,
) -> SweepSpec:
    """Validate a raw sweep mapping (parsed YAML) into a `SweepSpec`.

    Args:
        data: the sweep file's content.
        source: the file it came from; error messages begin with it.
        default_name: the name when `data` has none (`load_sweep` passes the file stem).
        available: `{"cpu": n, "gpu": m}` (per machine); a per-trial request above it is an error.
        check_paths: check that `data.root` (for a non-synthetic dataset or an explicit root) is a folder and
            that a local `model.weights` / `proto.checkpoint` file exists.

    Raises:
        SweepFileError: naming the key path and the value.
    """
    return _Validator(str(source) if source is not None else None).run(
        data, default_name=default_name, available=available, check_paths=check_paths
    )


def _hint(word: str, candidates: Sequence[str], prefix: str = "") -> str:
    word = str(word)
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close and len(word) >= 3:
        close = [c for c in candidates if c.startswith(word) or word.startswith(c)][:1]
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_kind(annotation: Any) -> str:
    """'float', 'int' or 'other' (str, bool, Literal and tuple fields: categorical only)."""
    if annotation is float:
        return "float"
    if annotation is int:
        return "int"
    return "other"


def _describe_annotation(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "a choice field"
    if get_origin(annotation) is tuple:
        return "a list field"
    name = getattr(annotation, "__name__", str(annotation))
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name} field"


_ALL_CONFIG_KEYS: tuple[str, ...] = tuple(TrainConfig().to_flat_dict())


class _Validator:
    def __init__(self, source: str | None) -> None:
        self.source = source

    # -- errors and primitive checks ---------------------------------------------------------------------

    def error(self, message: str) -> SweepFileError:
        return SweepFileError(f"{self.source}: {message}" if self.source else message)

    def mapping(self, path: str, value: Any) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(f"{path}: expected a mapping, got {value!r}")
        return value

    def keys(self, path: str, mapping: Mapping[str, Any], allowed: Sequence[str]) -> None:
        for key in mapping:
            if key not in allowed:
                full = f"{path}.{key}" if path else str(key)
                hint = _hint(str(key), allowed, f"{path}." if path else "")
                raise self.error(f"unknown key {full}{hint}; allowed here: {', '.join(allowed)}")

    def integer(self, path: str, value: Any, minimum: int | None = None) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise self.error(f"{path}: expected an integer{bound}, got {value!r}")
        return int(value)

    def number(
        self, path: str, value: Any, *, above: float | None = None, at_least: float | None = None
    ) -> float:
        number: float | None = None
        if _is_number(value):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise self.error(f"{path}: expected a number, got {value!r}")
        if above is not None and not number > above:
            raise self.error(f"{path}: must be > {above:g}, got {value!r}")
        if at_least is not None and not number >= at_least:
            raise self.error(f"{path}: must be >= {at_least:g}, got {value!r}")
        return number

    def string(self, path: str, value: Any, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.error(f"{path}: expected a{'' if allow_empty else ' non-empty'} string, got {value!r}")
        return value

    def choice(self, path: str, value: Any, choices: Sequence[str]) -> str:
        if value not in choices:
            hint = _hint(str(value), choices) if isinstance(value, str) else ""
            raise self.error(f"{path}: {value!r} is not one of {', '.join(choices)}{hint}")
        return value

    def config_key(self, path: str, key: Any) -> Any:
        """The annotation of config key `key` (found at `path`); an error with a hint otherwise."""
        try:
            return field_annotation(str(key))
        except ConfigError:
            hint = _hint(str(key), _ALL_CONFIG_KEYS)
            raise self.error(
                f"{path}: {key!r} is not a config field{hint} (keys are dotted config fields, e.g. loss.ism_weight; "
                "see `cpews config show`)"
            ) from None

    def coerce(self, path: str, annotation: Any, value: Any, key: str | None = None) -> Any:
        """`value` checked against the field's type and, with the config `key`, its valid range."""
        source = self.source or "sweep"
        try:
            value = coerce_value(path, annotation, value, source=source)
            return check_range(path, value, field_range(key), source) if key is not None else value
        except ConfigError as exc:
            raise SweepFileError(str(exc)) from None

    # -- the whole file ------------------------------------------------------------------------------------

    def run(
        self,
        data: Mapping[str, Any],
        *,
        default_name: str | None,
        available: Mapping[str, float] | None,
        check_paths: bool,
    ) -> SweepSpec:
        if not isinstance(data, Mapping):
            raise self.error(f"expected a mapping at the top level, got {type(data).__name__}")
        self.keys("", data, _TOP_LEVEL_KEYS)

        name = data.get("name") if data.get("name") is not None else default_name
        if name is None:
            raise self.error("name: missing (a sweep read from a mapping needs a name)")
        name = self.string("name", name)
        if not _NAME_PATTERN.match(name):
            raise self.error(
                f"name: {name!r} may only contain letters, digits, '.', '_' and '-' (it names the experiment folder)"
            )
        description = self.string("description", data.get("description") or "", allow_empty=True)

        base_config = self.string("base_config", data.get("base_config") or DEFAULT_BASE_CONFIG)
        try:
            base = load_config(base_config)
        except ConfigError as exc:
            raise self.error(f"base_config: {base_config!r}: {exc}") from None

        fixed, fixed_cfg = self.fixed(data.get("fixed"), base)
        space = self.space(data.get("space"), fixed, fixed_cfg)
        search = self.search(self.mapping("search", data.get("search")))
        if not space and search.num_trials > 1:
            raise self.error(
                f"space: empty, so all {search.num_trials} trials would train the same config; add keys to space "
                "or set search.num_trials: 1"
            )
        folds = self.folds(self.mapping("folds", data.get("folds")), fixed_cfg)
        scheduler = self.scheduler(self.mapping("scheduler", data.get("scheduler")))
        resources = self.resources(
            self.mapping("resources", data.get("resources")), available, fixed_cfg, fixed
        )
        objective = self.objective(self.mapping("objective", data.get("objective")))
        time_budget = data.get("time_budget_s")
        time_budget_s = None if time_budget is None else self.number("time_budget_s", time_budget, above=0)
        tracking = self.tracking(self.mapping("tracking", data.get("tracking")), name)

        spec = SweepSpec(
            name=name,
            base_config=base_config,
            base=base,
            fixed=fixed,
            space=space,
            search=search,
            folds=folds,
            scheduler=scheduler,
            resources=resources,
            objective=objective,
            tracking=tracking,
            description=description,
            time_budget_s=time_budget_s,
            source=self.source,
        )
        self.consistency(spec, fixed_cfg)
        if check_paths:
            self.paths(spec, fixed_cfg)
        return spec

    # -- sections ----------------------------------------------------------------------------------------

    def fixed(self, raw: Any, base: TrainConfig) -> tuple[dict[str, Scalar], TrainConfig]:
        raw = self.mapping("fixed", raw)
        flat: dict[str, Any] = {}
        for key, value in _flatten_fixed(raw).items():
            if key in flat:
                raise self.error(f"fixed.{key}: given twice (nested and dotted)")
            annotation = self.config_key(f"fixed.{key}", key)
            flat[key] = self.coerce(f"fixed.{key}", annotation, value, key)
        cfg = TrainConfig.from_flat_dict(flat, base=base)
        canonical = cfg.to_flat_dict()
        return {key: canonical[key] for key in flat}, cfg

    def space(self, raw: Any, fixed: Mapping[str, Any], fixed_cfg: TrainConfig) -> tuple[Distribution, ...]:
        raw = self.mapping("space", raw)
        entries: dict[str, Mapping[str, Any]] = {}
        annotations: dict[str, Any] = {}
        for key, entry in raw.items():
            key = str(key)
            path = f"space.{key}"
            if isinstance(entry, Mapping) and key in {f.name for f in dataclasses.fields(TrainConfig)}:
                raise self.error(
                    f"{path}: space keys are dotted config keys (space: {{{key}.<field>: {{...}}}}), not nested sections"
                )
            annotations[key] = self.config_key(path, key)
            if key in fixed:
                raise self.error(
                    f"{path}: {key} is both fixed and searched; remove it from one of fixed and space"
                )
            if not isinstance(entry, Mapping):
                raise self.error(
                    f"{path}: expected a distribution such as {{uniform: [low, high]}}, "
                    f"{{loguniform: [low, high]}}, {{int: [low, high]}} or {{categorical: [...]}}, got {entry!r}"
                )
            entries[key] = entry
        space: dict[str, Distribution] = {}
        for key, entry in entries.items():
            space[key] = self.distribution(key, annotations[key], entry, fixed_cfg)
        # `when` conditions: after every distribution is known (a condition may name a later key).
        for key, entry in entries.items():
            if entry.get("when") is not None:
                when = self.when(key, entry["when"], space, annotations)
                space[key] = dataclasses.replace(space[key], when=when)
        self.no_cycles(space)
        return tuple(space.values())

    def distribution(
        self, key: str, annotation: Any, entry: Mapping[str, Any], cfg: TrainConfig
    ) -> Distribution:
        path = f"space.{key}"
        allowed = (*DISTRIBUTION_KINDS, "step", "when")
        self.keys(path, entry, allowed)
        kinds = [kind for kind in DISTRIBUTION_KINDS if kind in entry]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise self.error(f"{path}: needs exactly one of {', '.join(DISTRIBUTION_KINDS)} (found {found})")
        kind = kinds[0]
        value = entry[kind]
        field_kind = _field_kind(annotation)
        if "step" in entry and kind != "int":
            raise self.error(f"{path}.step: only an int distribution takes a step")
        if kind == "categorical":
            return self.categorical(key, annotation, value)
        kpath = f"{path}.{kind}"
        fits = {"uniform": "float", "loguniform": "float", "int": "int"}[kind]
        if field_kind != fits:
            use = (
                "{int: [low, high]} or {categorical: [...]}"
                if field_kind == "int"
                else (
                    "{uniform: [low, high]} or {loguniform: [low, high]}"
                    if field_kind == "float"
                    else "{categorical: [...]}"
                )
            )
            raise self.error(
                f"{kpath}: {kind} does not fit {key}, {_describe_annotation(annotation)} "
                f"(currently {cfg.to_flat_dict()[key]!r}); use {use}"
            )
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise self.error(f"{kpath}: expected [low, high], got {value!r}")
        if kind == "int":
            low = self.integer(f"{kpath}[0]", value[0])
            high = self.integer(f"{kpath}[1]", value[1])
        else:
            low = self.number(f"{kpath}[0]", value[0])
            high = self.number(f"{kpath}[1]", value[1])
        if not low < high:
            raise self.error(f"{kpath}: empty range {list(value)!r}: low must be < high")
        if kind == "loguniform" and not low > 0:
            raise self.error(f"{kpath}: loguniform needs low > 0, got {list(value)!r}")
        valid = field_range(key)
        if valid is not None and not (low in valid and high in valid):
            raise self.error(f"{kpath}: {list(value)!r} reaches outside the valid range {valid} of {key}")
        step = None
        if kind == "int" and entry.get("step") is not None:
            step = self.integer(f"{path}.step", entry["step"], minimum=1)
            if (high - low) % step:
                raise self.error(f"{path}.step: high - low = {high - low} is not a multiple of step {step}")
        return Distribution(key=key, kind=kind, low=low, high=high, step=step)

    def categorical(self, key: str, annotation: Any, value: Any) -> Distribution:
        kpath = f"space.{key}.categorical"
        if not isinstance(value, (list, tuple)) or not value:
            raise self.error(f"{kpath}: expected a non-empty list of values, got {value!r}")
        choices: list[Scalar] = []
        for index, item in enumerate(value):
            if isinstance(item, (Mapping, list, tuple)) and get_origin(annotation) is not tuple:
                raise self.error(f"{kpath}[{index}]: expected a scalar value, got {item!r}")
            canonical = self.canonical(key, self.coerce(f"{kpath}[{index}]", annotation, item, key))
            if canonical in choices:
                raise self.error(f"{kpath}[{index}]: duplicate value {item!r}")
            choices.append(canonical)
        return Distribution(key=key, kind="categorical", choices=tuple(choices))

    def canonical(self, key: str, value: Any) -> Scalar:
        """The flat-config form of a coerced value (tuples -> comma-separated strings)."""
        return TrainConfig.from_flat_dict({key: value}).to_flat_dict()[key]

    def when(
        self, key: str, raw: Any, space: Mapping[str, Distribution], annotations: Mapping[str, Any]
    ) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
        path = f"space.{key}.when"
        raw = self.mapping(path, raw)
        if not raw:
            raise self.error(f"{path}: expected at least one condition {{other.key: value_or_list}}")
        conditions = []
        for parent, values in raw.items():
            parent = str(parent)
            cpath = f"{path}.{parent}"
            if parent == key:
                raise self.error(f"{cpath}: a key cannot be conditional on itself")
            if parent not in space:
                hint = _hint(parent, list(space))
                raise self.error(
                    f"{cpath}: {parent!r} is not a searched key{hint}; when may only refer to other keys in space"
                )
            dist = space[parent]
            if dist.kind not in ("categorical", "int"):
                raise self.error(
                    f"{cpath}: {parent} is searched with {dist.kind}; when may only refer to a categorical or int key"
                )
            items = list(values) if isinstance(values, (list, tuple)) else [values]
            if not items:
                raise self.error(f"{cpath}: expected a value or a non-empty list of values")
            allowed: list[Scalar] = []
            for index, item in enumerate(items):
                ipath = f"{cpath}[{index}]" if isinstance(values, (list, tuple)) else cpath
                canonical = self.canonical(parent, self.coerce(ipath, annotations[parent], item))
                if not dist.contains(canonical):
                    raise self.error(f"{ipath}: {item!r} is never sampled for {parent} ({dist.to_dict()})")
                if canonical not in allowed:
                    allowed.append(canonical)
            conditions.append((parent, tuple(allowed)))
        return tuple(conditions)

    def no_cycles(self, space: Mapping[str, Distribution]) -> None:
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done

        def visit(key: str, chain: list[str]) -> None:
            if state.get(key) == 2:
                return
            if state.get(key) == 1:
                cycle = " -> ".join([*chain[chain.index(key) :], key])
                raise self.error(f"space.{chain[-1]}.when: conditions form a cycle: {cycle}")
            state[key] = 1
            for parent in space[key].parents:
                visit(parent, [*chain, key])
            state[key] = 2

        for key in space:
            visit(key, [])

    def search(self, raw: Mapping[str, Any]) -> SearchSettings:
        self.keys("search", raw, [f.name for f in dataclasses.fields(SearchSettings)])
        d = SearchSettings()
        return SearchSettings(
            algorithm=self.choice("search.algorithm", raw.get("algorithm") or d.algorithm, ("tpe", "random")),
            seed=self.integer("search.seed", _or(raw.get("seed"), d.seed)),
            num_trials=self.integer("search.num_trials", _or(raw.get("num_trials"), d.num_trials), minimum=1),
            max_concurrent=self.integer(
                "search.max_concurrent", _or(raw.get("max_concurrent"), d.max_concurrent), minimum=1
            ),
        )

    def folds(self, raw: Mapping[str, Any], cfg: TrainConfig) -> FoldSettings:
        self.keys("folds", raw, [f.name for f in dataclasses.fields(FoldSettings)])
        d = FoldSettings()
        return FoldSettings(
            k=self.integer("folds.k", _or(raw.get("k"), d.k), minimum=2),
            seed=self.integer("folds.seed", _or(raw.get("seed"), d.seed)),
            split=self.string("folds.split", _or(raw.get("split"), cfg.data.train_split)),
        )

    def scheduler(self, raw: Mapping[str, Any]) -> SchedulerSettings:
        self.keys("scheduler", raw, [f.name for f in dataclasses.fields(SchedulerSettings)])
        d = SchedulerSettings()
        return SchedulerSettings(
            type=self.choice("scheduler.type", _or(raw.get("type"), d.type), ("asha", "fifo")),
            grace_period=self.integer(
                "scheduler.grace_period", _or(raw.get("grace_period"), d.grace_period), minimum=1
            ),
            reduction_factor=self.number(
                "scheduler.reduction_factor", _or(raw.get("reduction_factor"), d.reduction_factor), above=1
            ),
        )

    def resources(
        self,
        raw: Mapping[str, Any],
        available: Mapping[str, float] | None,
        cfg: TrainConfig,
        fixed: Mapping[str, Any],
    ) -> ResourceSettings:
        self.keys("resources", raw, [f.name for f in dataclasses.fields(ResourceSettings)])
        d = ResourceSettings()
        cpu = self.number("resources.cpu", _or(raw.get("cpu"), d.cpu), above=0)
        gpu = self.number("resources.gpu", _or(raw.get("gpu"), d.gpu), at_least=0)
        if gpu > 1 and not float(gpu).is_integer():
            raise self.error(
                f"resources.gpu: {raw.get('gpu')!r}: a trial may take a fraction of one GPU (e.g. 0.5) or whole GPUs, "
                "not a fraction above 1"
            )
        if available is not None:
            offered = {str(k).lower(): v for k, v in available.items()}
            for name, wanted in (("cpu", cpu), ("gpu", gpu)):
                have = offered.get(name)
                if have is not None and wanted > float(have):
                    raise self.error(
                        f"resources.{name}: a trial asks for {wanted:g} {name.upper()}(s) but at most {float(have):g} "
                        "are available on one machine, so no trial could ever start"
                    )
        device = cfg.train.device
        origin = "fixed.train.device" if "train.device" in fixed else "train.device (from base_config)"
        if gpu == 0 and device.startswith("cuda"):
            raise self.error(
                f"resources.gpu: 0 but {origin} is {device!r}; give each trial a GPU (e.g. resources.gpu: 1 or 0.5)"
            )
        if gpu > 0 and device == "cpu":
            raise self.error(
                f"resources.gpu: {gpu:g} but {origin} is 'cpu': the trials would hold a GPU they never use"
            )
        return ResourceSettings(cpu=cpu, gpu=gpu)

    def objective(self, raw: Mapping[str, Any]) -> ObjectiveSettings:
        self.keys("objective", raw, [f.name for f in dataclasses.fields(ObjectiveSettings)])
        d = ObjectiveSettings()
        metric = self.string("objective.metric", _or(raw.get("metric"), d.metric))
        reported = _trial_report_keys()
        if metric not in reported:
            raise self.error(
                f"objective.metric: {metric!r} is not reported by the sweep's trials; valid: {', '.join(reported)}"
            )
        return ObjectiveSettings(
            metric=metric, mode=self.choice("objective.mode", _or(raw.get("mode"), d.mode), ("max", "min"))
        )

    def tracking(self, raw: Mapping[str, Any], name: str) -> TrackingSettings:
        self.keys("tracking", raw, [f.name for f in dataclasses.fields(TrackingSettings)])
        return TrackingSettings(
            experiment=self.string("tracking.experiment", _or(raw.get("experiment"), name))
        )

    # -- cross-field checks --------------------------------------------------------------------------------

    def consistency(self, spec: SweepSpec, cfg: TrainConfig) -> None:
        """Settings that would make every (or some) trial fail or silently skip a stage."""

        def span(key: str) -> tuple[float, float]:
            return _span(spec, cfg, key)

        def where(key: str) -> str:
            return _where(spec, key)

        def name(key: str) -> str:
            place = where(key)
            return place if place != "base_config" else f"{key} (from base_config)"

        low, high = span("cam.low_threshold"), span("cam.high_threshold")
        if low[1] >= high[0]:
            raise self.error(
                f"{where('cam.low_threshold')}: cam.low_threshold can reach {low[1]:g}, not below cam.high_threshold's "
                f"lowest value {high[0]:g} ({name('cam.high_threshold')}); the ignore band would be empty or inverted"
            )
        depth = span("model.depth")
        ism = span("model.ism_depth")
        if depth[0] > 0 and (ism[0] < 1 or ism[1] > depth[0]):
            raise self.error(
                f"{where('model.ism_depth')}: model.ism_depth reaches {ism[1]:g} but must lie in 1..model.depth "
                f"(model.depth can be {depth[0]:g}, {name('model.depth')})"
            )
        if cfg.proto.source == "warmup" and span("proto.n_builds")[1] > 0:
            build, iters = span("proto.build_iter"), span("optim.max_iters")
            if build[1] >= iters[0]:
                raise self.error(
                    f"{where('proto.build_iter')}: proto.build_iter can reach {build[1]:g}, not below optim.max_iters "
                    f"({iters[0]:g}, {name('optim.max_iters')}): the prototype pool would never be built"
                )
        if (
            cfg.data.dataset == "synthetic"
            and spec.folds.split == cfg.data.train_split
            and "data.synthetic_train" not in spec.searched_keys()
        ):
            self.fold_sizes(spec, cfg, cfg.data.synthetic_train, "synthetic images, data.synthetic_train")

    def fold_sizes(self, spec: SweepSpec, cfg: TrainConfig, images: int, what: str) -> None:
        """Each of the k folds of `images` images (described by `what`) gets an image, and the images a fold
        trains on (all but the largest fold) fill the largest batch size a trial can take."""
        if spec.folds.k > images:
            raise self.error(f"folds.k: {spec.folds.k} folds of {images} images ({what}): every fold needs an image")
        fold_train = images - math.ceil(images / spec.folds.k)
        batch = _span(spec, cfg, "train.batch_size")
        if batch[1] > fold_train:
            raise self.error(
                f"{_where(spec, 'train.batch_size')}: train.batch_size reaches {batch[1]:g} but a fold trains on "
                f"{fold_train} images ({images} {what}, folds.k={spec.folds.k})"
            )

    def split_on_disk(self, spec: SweepSpec, cfg: TrainConfig) -> None:
        """The fold split of a dataset read from disk: its ids can be read and its folds hold a batch."""
        from cpews.data.datasets import DatasetLayout, read_split_ids

        split, root = spec.folds.split, cfg.data.root
        try:
            ids = read_split_ids(root, cfg.data.dataset, split)
        except (ValueError, OSError) as exc:
            raise self.error(f"folds.split: {split!r} of the {cfg.data.dataset} dataset cannot be read: {exc}") from None
        listed = DatasetLayout(Path(root), cfg.data.dataset).list_path(split)
        source = str(listed) if listed.is_file() else f"split {split!r} of {root}"
        self.fold_sizes(spec, cfg, len(ids), f"ids in {source}")

    def weights(self, spec: SweepSpec, cfg: TrainConfig) -> None:
        """Each local `model.weights` file (fixed, or each searched choice) loads into the model's backbone."""
        if "model.weights" in spec.searched_keys():
            choices = spec.distribution("model.weights").choices
            candidates = [(f"space.model.weights.categorical[{i}]", str(v)) for i, v in enumerate(choices)]
        else:
            candidates = [(_where(spec, "model.weights"), cfg.model.weights)]
        for place, weights in candidates:
            if not weights or weights in ("hub", SYNTHETIC_WEIGHTS):  # downloaded / made before the first trial
                continue
            if not Path(weights).is_file():
                raise self.error(f"{place}: model.weights file {weights!r} does not exist")
            problem = _weights_problem(cfg, weights)
            if problem:
                raise self.error(f"{place}: {problem}")

    def paths(self, spec: SweepSpec, cfg: TrainConfig) -> None:
        def where(key: str) -> str:
            return f"fixed.{key}" if key in spec.fixed else "base_config"

        root = cfg.data.root
        if cfg.data.dataset != "synthetic" or root:
            if not root:
                raise self.error(
                    f"{where('data.root')}: the {cfg.data.dataset} dataset needs data.root (set fixed.data.root)"
                )
            if not root.startswith("s3://") and not Path(root).is_dir():  # s3:// is checked where it is read
                raise self.error(
                    f"{where('data.root')}: the {cfg.data.dataset} dataset folder {root!r} does not exist "
                    f"(relative to {os.getcwd()}); set fixed.data.root or --set fixed.data.root=PATH"
                )
            if cfg.data.dataset != "synthetic" and not root.startswith("s3://"):
                self.split_on_disk(spec, cfg)
        weights = cfg.model.weights
        if weights == SYNTHETIC_WEIGHTS and cfg.data.dataset == "synthetic" and cfg.pretrain.seed == cfg.data.synthetic_seed:
            raise self.error(
                f"{where('pretrain.seed')}: pretrain.seed={cfg.pretrain.seed} equals data.synthetic_seed: the "
                "pretraining set would hold the images the trials train and score on"
            )
        self.weights(spec, cfg)
        if cfg.proto.source == "checkpoint" and not Path(cfg.proto.checkpoint).is_file():
            raise self.error(
                f"{where('proto.checkpoint')}: proto.checkpoint file {cfg.proto.checkpoint!r} does not exist"
            )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _span(spec: SweepSpec, cfg: TrainConfig, key: str) -> tuple[float, float]:
    """The lowest and highest value numeric config `key` takes in the sweep's trials."""
    for dist in spec.space:
        if dist.key == key:
            if dist.kind == "categorical":
                values = [float(v) for v in dist.choices]
                return min(values), max(values)
            return float(dist.low), float(dist.high)
    value = float(cfg.to_flat_dict()[key])
    return value, value


def _where(spec: SweepSpec, key: str) -> str:
    """Where the sweep's value of config `key` comes from: `space.<key>`, `fixed.<key>` or `base_config`."""
    if key in spec.searched_keys():
        return f"space.{key}"
    return f"fixed.{key}" if key in spec.fixed else "base_config"


def _weights_problem(cfg: TrainConfig, weights: str) -> str | None:
    """Why the state dict in file `weights` does not load into the backbone of `cfg`'s model (None: it does).

    The model is built on the meta device (shapes only, no memory, no init) and the file goes through the
    trainer's own loader, `cpews.model.backbone.load_backbone_weights`. Imports torch.
    """
    import warnings

    import torch

    from cpews.model import build_model
    from cpews.model.backbone import load_backbone_weights

    try:
        with torch.device("meta"):
            vit = build_model(cfg, num_classes=1, weights="").backbone.vit  # the classes do not touch the backbone
    except ValueError as exc:
        return f"the model cannot be built to check model.weights against it: {exc}"
    try:
        with warnings.catch_warnings():  # copying into meta tensors is a no-op, which torch warns about
            warnings.simplefilter("ignore")
            load_backbone_weights(vit, weights)
    except (ValueError, OSError) as exc:
        return str(exc)
    return None


def _trial_report_keys() -> tuple[str, ...]:
    """The metric keys of every report a sweep's trial makes (`cpews.training.keys.TRIAL_REPORT_KEYS`): the
    objective must be one of them (Tune's scheduler and searcher need it in each result). Imports torch."""
    from cpews.training.keys import TRIAL_REPORT_KEYS

    return TRIAL_REPORT_KEYS


# ------------------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------------------


def _sampling_order(space: Sequence[Distribution]) -> list[Distribution]:
    """Parents before children, otherwise file order."""
    done: set[str] = set()
    order: list[Distribution] = []
    pending = list(space)
    while pending:
        ready = [d for d in pending if all(p in done for p in d.parents)]
        if not ready:  # pragma: no cover - validation rejects cycles
            raise SweepFileError(f"conditions form a cycle among {', '.join(d.key for d in pending)}")
        for dist in ready:
            order.append(dist)
            done.add(dist.key)
        pending = [d for d in pending if d.key not in done]
    return order


def sample_params(spec: SweepSpec, trial: SuggestTrial) -> dict[str, Scalar]:
    """Sample one trial's parameters with Optuna's define-by-run API (parents before conditional children).

    Returns:
        `{config key: value}` for the active keys; an inactive conditional key is absent (its base/fixed value
        applies). Categorical values are in flat-config form.
    """
    params: dict[str, Scalar] = {}
    for dist in _sampling_order(spec.space):
        if dist.is_active(params):
            params[dist.key] = dist.suggest(trial)
    return params


class DefineByRun:
    """A define-by-run function for `OptunaSearch(space=...)` or `study.optimize`: samples `spec`'s space.

    The trial's params (`trial.params`) are then the `sample_params` dict; nothing is returned (no constants).
    Picklable (Ray Tune pickles its searcher into the experiment state): it keeps the sweep in dict form.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.spec_dict = spec.to_dict()
        self._spec: SweepSpec | None = spec

    def __call__(self, trial: Any) -> None:
        if self._spec is None:
            self._spec = validate_sweep(self.spec_dict, check_paths=False)
        sample_params(self._spec, trial)

    def __getstate__(self) -> dict:
        return {"spec_dict": self.spec_dict, "_spec": None}


def optuna_define_by_run(spec: SweepSpec) -> DefineByRun:
    """`DefineByRun(spec)`: the define-by-run sampler of `spec`'s space."""
    return DefineByRun(spec)


def optuna_distributions(spec: SweepSpec, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Optuna distribution objects of the searched keys (all, or `keys`), e.g. for `optuna.trial.create_trial`
    when telling a study about a trial it did not sample itself. Imports Optuna."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    wanted = spec.searched_keys() if keys is None else list(keys)
    out: dict[str, Any] = {}
    for key in wanted:
        dist = spec.distribution(key)
        if dist.kind == "categorical":
            out[key] = CategoricalDistribution(list(dist.choices))
        elif dist.kind == "int":
            out[key] = IntDistribution(int(dist.low), int(dist.high), step=dist.step or 1)
        else:
            out[key] = FloatDistribution(float(dist.low), float(dist.high), log=dist.log)
    return out


def flat_params(spec: SweepSpec, params: Mapping[str, Any]) -> dict[str, Scalar]:
    """The full flat config of a trial: the same keys for every trial (MLflow's compare view lines them up)."""
    return spec.trial_config(params).to_flat_dict()


# ------------------------------------------------------------------------------------------------------------
# Smoke version.
# ------------------------------------------------------------------------------------------------------------


def smoke(spec: SweepSpec) -> SweepSpec:
    """The same sweep shrunk to a quick end-to-end check of the whole pipeline.

    2 trials, 2 folds, one at a time, ASHA grace period 1, and fixed settings that train for a few iterations
    while every stage still runs (warm-up, the prototype pool build half-way, the segmentation loss, one final
    validation of a few images); on the synthetic dataset a small generated set. Keys that the space searches
    are left to it. The name and MLflow experiment get a `-smoke` suffix so smoke runs stay apart.
    """
    cfg = spec.base_train_config()
    searched = set(spec.searched_keys())
    settings: dict[str, Scalar] = {
        "optim.max_iters": _SMOKE_MAX_ITERS,
        "optim.warmup_iters": 2,
        "proto.build_iter": _SMOKE_MAX_ITERS // 2,
        "loss.seg_warmup_iters": 2,
        "eval.every": 0,
        "eval.max_images": _SMOKE_EVAL_IMAGES,
        "train.log_every": 2,
        "train.checkpoint_every": _SMOKE_MAX_ITERS // 2,  # one mid-fold checkpoint: retries resume from it
        "data.num_workers": 0,
    }
    if cfg.loss.ism_warmup_iters >= 0:
        settings["loss.ism_warmup_iters"] = 2
    if cfg.loss.seg_aux_label_iters >= 0:
        settings["loss.seg_aux_label_iters"] = _SMOKE_MAX_ITERS // 2
    if cfg.model.weights == SYNTHETIC_WEIGHTS:  # a tiny pretraining: the path still runs, in seconds
        settings.update({"pretrain.images": _SMOKE_MIN_SYNTHETIC_TRAIN, "pretrain.val_images": _SMOKE_SYNTHETIC_VAL,
                         "pretrain.iters": _SMOKE_MAX_ITERS, "pretrain.cls_iters": _SMOKE_MAX_ITERS // 2,
                         "pretrain.batch_size": 8, "pretrain.warmup_iters": 2})
    if cfg.data.dataset == "synthetic":
        batch = max(
            [cfg.train.batch_size]
            + [int(v) for d in spec.space if d.key == "train.batch_size" for v in (d.choices or (d.high,))]
        )
        settings["data.synthetic_train"] = max(_SMOKE_MIN_SYNTHETIC_TRAIN, 2 * batch)
        settings["data.synthetic_val"] = _SMOKE_SYNTHETIC_VAL
    data = spec.to_dict()
    data["name"] = f"{spec.name}-smoke"
    data["fixed"] = {**spec.fixed, **{k: v for k, v in settings.items() if k not in searched}}
    data["search"] = {**data["search"], "num_trials": 2, "max_concurrent": 1}
    data["folds"] = {**data["folds"], "k": 2}
    data["scheduler"] = {**data["scheduler"], "grace_period": 1}
    data["tracking"] = {"experiment": f"{spec.tracking.experiment}-smoke"}
    return _Validator(spec.source).run(data, default_name=None, available=None, check_paths=False)

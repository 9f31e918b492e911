"""Sweep files: their schema, validation, `--set` overrides and the sampling of one trial's parameters.

A sweep file (YAML, documented with an example in `search_spaces/README.md`) names a base config, fixed
overrides of the config tree, a search space over dotted config keys, and how to search it (algorithm,
trials, concurrency, folds, scheduler, per-trial resources, objective, time budget, MLflow experiment).
`load_sweep` parses its structure into pydantic models (`SweepFile`; their JSON Schema, `json_schema`, is
search_spaces/schema.json for editors), then validates it against the config tree, before any trial starts:
every error is a `SweepFileError` whose lines begin with the file path and name the key path and value.

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
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from cpews.config import (
    SYNTHETIC_WEIGHTS,
    ConfigError,
    Range,
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
    "SpaceEntry",
    "SuggestTrial",
    "SweepFile",
    "SweepFileError",
    "SweepSpec",
    "TrackingSettings",
    "apply_overrides",
    "flat_params",
    "json_schema",
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

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_ALL_CONFIG_KEYS: tuple[str, ...] = tuple(TrainConfig().to_flat_dict())

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
        values = list(self.choices) if self.kind == "categorical" else [self.low, self.high]
        when = {key: list(allowed) if len(allowed) > 1 else allowed[0] for key, allowed in self.when}
        out = {self.kind: values, "step": self.step, "when": when}
        return {key: value for key, value in out.items() if value not in (None, {})}


# ------------------------------------------------------------------------------------------------------------
# The file's structure (sections, keys, types, bounds, defaults): pydantic models, which also give its JSON Schema.
# ------------------------------------------------------------------------------------------------------------


def _not_bool(value: Any) -> Any:
    """YAML's true/false are not numbers (pydantic's lax float would read them as 1.0/0.0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


# A finite number; also a YAML 1.1 string such as "1e-3" (YAML 1.1 reads an exponent without a dot as a string).
# Bounds go inside the BeforeValidator, where the JSON Schema sees them.
_Number = Annotated[float, BeforeValidator(_not_bool)]
_Positive = Annotated[float, Field(gt=0), BeforeValidator(_not_bool)]
_Count = Annotated[StrictInt, Field(ge=1)]
_NonEmpty = Annotated[str, Field(min_length=1)]
_Bounds = Annotated[list[_Number], Field(min_length=2, max_length=2, description="[low, high]")]
_IntBounds = Annotated[list[StrictInt], Field(min_length=2, max_length=2, description="[low, high]")]


class _FileModel(BaseModel):
    """A part of a sweep file: an unknown key is an error; `null` (`--set search.seed=null`) means the default."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, Mapping) else data


class SearchSettings(_FileModel):
    """How the space is searched (Optuna)."""

    algorithm: Literal["tpe", "random"] = Field("tpe", description="Optuna's TPESampler or RandomSampler")
    seed: StrictInt = Field(0, description="the sampler's seed")
    num_trials: _Count = Field(10, description="configurations tried")
    max_concurrent: _Count = Field(1, description="trials running at the same time")
    start_points: list[dict[str, Any] | Literal["base"]] = Field(
        [], description="configurations tried first, in order ({searched key: value}; a key left out is sampled; "
        "`base`: the base config's own values of the searched keys, those outside their range left out)"
    )

    def __hash__(self) -> int:  # frozen, but its points are lists of mappings: hashed by their JSON form
        return hash(json.dumps(self.model_dump(), sort_keys=True))


class FoldSettings(_FileModel):
    """The K-fold cross-validation of each trial: it trains k times and is scored by the mean fold score."""

    k: Annotated[StrictInt, Field(ge=2)] = 3
    seed: StrictInt = Field(0, description="seed of the (multi-label stratified) fold assignment")
    split: _NonEmpty | None = Field(None, description="the split cut into folds; default data.train_split")


class SchedulerSettings(_FileModel):
    """Early stopping of poor trials: ASHA (keeps 1/reduction_factor of the trials at each rung; its time unit
    is the finished fold), or FIFO (none)."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: _Count = Field(1, description="finished folds a trial reports before ASHA may stop it")
    reduction_factor: Annotated[float, Field(gt=1), BeforeValidator(_not_bool)] = 2.0


class ResourceSettings(_FileModel):
    """What each trial reserves: CPUs, and a fraction of one GPU (0.5: two trials share it) or whole GPUs.

    A trial with N > 1 whole GPUs trains each fold data parallel on N Ray Train workers, one per GPU (NCCL);
    `workers: N` does the same on CPUs (gloo). The trial's CPUs are split evenly over its workers, and
    `train.batch_size` is the global batch, split evenly too (`orchestration.ray_train`).
    """

    cpu: _Positive = Field(1.0, description="CPUs of the trial (split over its workers)")
    gpu: Annotated[float, Field(ge=0), BeforeValidator(_not_bool)] = Field(
        0.0, description="a fraction of one GPU (one process), or N whole GPUs (N data-parallel workers)"
    )
    workers: _Count | None = Field(
        None, description="data-parallel training processes of a trial; default: gpu when it is >= 1, else 1"
    )

    @property
    def num_workers(self) -> int:
        """The trial's training processes: `workers`, else one per whole GPU, else 1."""
        if self.workers is not None:
            return self.workers
        return int(self.gpu) if self.gpu >= 1 else 1


class ObjectiveSettings(_FileModel):
    """The score the search optimises: a key that every trial report holds."""

    metric: _NonEmpty = DEFAULT_OBJECTIVE_METRIC
    mode: Literal["max", "min"] = "max"


class TrackingSettings(_FileModel):
    """Where MLflow records the sweep."""

    experiment: _NonEmpty | None = Field(None, description="the MLflow experiment; default the sweep name")


class SpaceEntry(_FileModel):
    """How one config key is searched: exactly one of uniform, loguniform (low > 0), int and categorical."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": [k]} for k in DISTRIBUTION_KINDS],
            "dependentRequired": {"step": ["int"]},
        }
    )
    uniform: _Bounds | None = None
    loguniform: _Bounds | None = None
    int_: _IntBounds | None = Field(None, alias="int")
    categorical: Annotated[list[Any], Field(min_length=1)] | None = None  # checked against the field
    step: _Count | None = Field(None, description="of an int distribution; high - low a multiple of it")
    when: Annotated[dict[str, Any], Field(min_length=1)] | None = Field(
        None, description="{other.key: value or list}: sampled only when each named key takes one of them"
    )

    def given(self) -> dict[str, Any]:
        """The distributions the entry gives, `{kind: [low, high] or choices}`."""
        values = (self.uniform, self.loguniform, self.int_, self.categorical)
        return {kind: value for kind, value in zip(DISTRIBUTION_KINDS, values) if value is not None}

    @field_validator("step")
    @classmethod
    def _step_of_an_int(cls, step: int, info: ValidationInfo) -> int:
        if any(info.data.get(kind) is not None for kind in ("uniform", "loguniform", "categorical")):
            raise PydanticCustomError("step_of_int", "only an int distribution takes a step")
        return step

    @model_validator(mode="after")
    def _one_distribution(self) -> SpaceEntry:
        if len(self.given()) != 1:
            found = ", ".join(self.given()) or "none"
            message = f"needs exactly one of {', '.join(DISTRIBUTION_KINDS)} (found {found})"
            raise PydanticCustomError("one_distribution", message)
        return self


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _value_schema(annotation: Any, valid: Range | None) -> dict[str, Any]:
    """The JSON Schema of the values a config field of type `annotation` and range `valid` takes in a sweep file."""
    if get_origin(annotation) is Literal:
        return {"enum": list(get_args(annotation))}
    if get_origin(annotation) is tuple:  # a list, a comma-separated string or a single number
        item = _value_schema(get_args(annotation)[0], valid)
        return {"anyOf": [{"type": "array", "items": item, "minItems": 1}, {"type": "string"}, item]}
    schema: dict[str, Any] = {"type": _JSON_TYPES[annotation]}
    if valid is not None and valid.low is not None:
        schema["exclusiveMinimum" if valid.low_open else "minimum"] = valid.low
    if valid is not None and valid.high is not None:
        schema["exclusiveMaximum" if valid.high_open else "maximum"] = valid.high
    return schema


def _fixed_schema(schema: dict[str, Any]) -> None:
    """`fixed`: every config key, dotted (`loss.ism_weight: 0.3`) or in its section (`loss: {ism_weight: 0.3}`)."""
    sections: dict[str, dict[str, Any]] = {}
    properties: dict[str, Any] = {}
    for key in _ALL_CONFIG_KEYS:
        section, _, name = key.partition(".")
        value = _value_schema(field_annotation(key), field_range(key))
        properties[key] = sections.setdefault(section, {})[name] = value
    for section, fields in sections.items():
        properties[section] = {"type": "object", "properties": fields, "additionalProperties": False}
    schema.update(properties=properties, additionalProperties=False)


class SweepFile(_FileModel):
    """A sweep file (search_spaces/README.md): the config trials start from, what is fixed, searched and how."""

    name: Annotated[str, Field(pattern=_NAME_PATTERN)] | None = Field(None, description="default: file name")
    description: str = ""
    base_config: _NonEmpty = Field(DEFAULT_BASE_CONFIG, description="a preset or a config YAML path")
    fixed: dict[str, Any] = Field(default_factory=dict, json_schema_extra=_fixed_schema)
    space: dict[str, SpaceEntry] = Field(  # every config key (dotted) -> a distribution
        default_factory=dict,
        json_schema_extra=lambda s: s.update(
            properties=dict.fromkeys(_ALL_CONFIG_KEYS, s["additionalProperties"]), additionalProperties=False
        ),
    )
    search: SearchSettings = SearchSettings()
    folds: FoldSettings = FoldSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    resources: ResourceSettings = ResourceSettings()
    objective: ObjectiveSettings = ObjectiveSettings()
    time_budget_s: _Positive | None = Field(None, description="then unfinished trials end as timeout")
    tracking: TrackingSettings = TrackingSettings()


class _FileSchema(GenerateJsonSchema):
    """`null` is the default, that is a key left out: the schema of a key that may be null is its value's."""

    def nullable_schema(self, schema: Any) -> dict[str, Any]:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: Any) -> dict[str, Any]:  # a section's defaults show on its keys
        out = super().default_schema(schema)
        return {k: v for k, v in out.items() if k != "default" or not (v is None or isinstance(v, dict))}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a sweep file, published as search_spaces/schema.json (`make schema`) for editors."""
    schema = SweepFile.model_json_schema(schema_generator=_FileSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


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

    def start_point_params(self) -> list[dict[str, Scalar]]:
        """`search.start_points` as `{searched key: value}` points, in order: `base` becomes the base config's
        values of the searched keys, a key whose base value lies outside its distribution left out (sampled)."""
        return [self.base_point() if point == "base" else dict(point) for point in self.search.start_points]

    def base_point(self) -> dict[str, Scalar]:
        """The base config's values of the searched keys, in file order, those outside their distribution (or
        whose `when` condition the point does not meet) left out."""
        base = self.base_train_config().to_flat_dict()
        point: dict[str, Scalar] = {}
        for dist in self.space:  # file order: a condition names keys listed before it
            if dist.contains(base[dist.key]) and dist.is_active(point):
                point[dist.key] = base[dist.key]
        return point

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
        out = {"name": self.name, "description": self.description, "base_config": self.base_config}
        out.update(fixed=dict(self.fixed), space={d.key: d.to_dict() for d in self.space})
        for section in ("search", "folds", "scheduler", "resources", "objective", "tracking"):
            out[section] = getattr(self, section).model_dump()
        return {**out, "time_budget_s": self.time_budget_s}

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
        SweepFileError: naming the key path and the value (one line per problem the parse finds).
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


_FITTING = {  # a config field's type (or its origin) -> what it is, and the distributions that fit it
    float: ("a float field", "{uniform: [low, high]} or {loguniform: [low, high]}"),
    int: ("an int field", "{int: [low, high]} or {categorical: [...]}"),
    Literal: ("a choice field", "{categorical: [...]}"),
    tuple: ("a list field", "{categorical: [...]}"),
}


def _dotted(loc: Sequence[str | int]) -> str:
    """`("space", "loss.pdl_weight", "uniform", 1)` -> `space.loss.pdl_weight.uniform[1]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model of the part of a sweep file at `loc` (the file, a section, a space entry), if any."""
    if len(loc) == 2 and loc[0] == "space":
        return SpaceEntry
    field = SweepFile.model_fields.get(str(loc[0])) if len(loc) == 1 else None
    node = field.annotation if field is not None else None if loc else SweepFile
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _problem(error: Mapping[str, Any]) -> str:
    """One pydantic error as `<dotted location>: <reason>` (an unknown key: `unknown key <location> ...`)."""
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    reason, hint = str(error["msg"])[:1].lower() + str(error["msg"])[1:], ""
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1]) or SweepFile
        allowed = [field.alias or name for name, field in model.model_fields.items()]
        hint = _hint(str(loc[-1]), allowed, f"{_dotted(loc[:-1])}." if len(loc) > 1 else "")
        return f"unknown key {_dotted(loc)}{hint}; allowed here: {', '.join(allowed)}"
    if kind == "model_type":
        forms = "a distribution such as {uniform: [low, high]}, {int: [low, high]} or {categorical: [...]}"
        reason = f"expected {forms if _model_at(loc) is SpaceEntry else 'a mapping'}"
    elif kind == "literal_error":  # "Input should be 'tpe' or 'random'"
        hint = _hint(str(value), re.findall(r"'([^']*)'", error["ctx"]["expected"]))
    elif kind in ("too_short", "too_long") and loc[-1] in ("uniform", "loguniform", "int"):
        reason = "expected [low, high]"
    got = "" if isinstance(value, Mapping) else f", got {value!r}"  # not the whole section or entry again
    return f"{_dotted(loc)}: {reason}{got}{hint}" if loc else f"{reason}{got}"


class _Validator:
    def __init__(self, source: str | None) -> None:
        self.source = source

    # -- errors and config values --------------------------------------------------------------------------

    def error(self, *messages: str) -> SweepFileError:
        """One line per message, each beginning with the file."""
        return SweepFileError("\n".join(f"{self.source}: {m}" if self.source else m for m in messages))

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

    def parse(self, data: Any, default_name: str | None) -> SweepFile:
        """The file's structure (`SweepFile`); every problem pydantic finds is a line of the error."""
        if not isinstance(data, Mapping):
            raise self.error(f"expected a mapping at the top level, got {type(data).__name__}")
        if data.get("name") is None and default_name is not None:
            data = {**data, "name": default_name}
        self.space_keys(data.get("space"))
        try:
            return SweepFile.model_validate(data)
        except ValidationError as exc:
            raise self.error(*map(_problem, exc.errors())) from None

    def run(
        self,
        data: Mapping[str, Any],
        *,
        default_name: str | None,
        available: Mapping[str, float] | None,
        check_paths: bool,
    ) -> SweepSpec:
        file = self.parse(data, default_name)
        if file.name is None:
            raise self.error("name: missing (a sweep read from a mapping needs a name)")
        try:
            base = load_config(file.base_config)
        except ConfigError as exc:
            raise self.error(f"base_config: {file.base_config!r}: {exc}") from None
        fixed, fixed_cfg = self.fixed(file.fixed, base)
        space = self.space(file.space, fixed, fixed_cfg)
        if not space and file.search.num_trials > 1:
            raise self.error(
                f"space: empty, so all {file.search.num_trials} trials would train the same config; add keys to "
                "space or set search.num_trials: 1"
            )
        metric, reported = file.objective.metric, _trial_report_keys()
        if metric not in reported:
            raise self.error(
                f"objective.metric: {metric!r} is not reported by the sweep's trials; valid: {', '.join(reported)}"
            )
        spec = SweepSpec(
            name=file.name,
            base_config=file.base_config,
            base=base,
            fixed=fixed,
            space=space,
            search=file.search,
            folds=file.folds.model_copy(update={"split": file.folds.split or fixed_cfg.data.train_split}),
            scheduler=file.scheduler,
            resources=file.resources,
            objective=file.objective,
            tracking=file.tracking.model_copy(update={"experiment": file.tracking.experiment or file.name}),
            description=file.description,
            time_budget_s=file.time_budget_s,
            source=self.source,
        )
        spec = dataclasses.replace(spec, search=file.search.model_copy(
            update={"start_points": self.start_points(file.search, space)}))
        self.resources(spec, fixed_cfg, available)
        self.consistency(spec, fixed_cfg)
        if check_paths:
            self.paths(spec, fixed_cfg)
        return spec

    # -- sections ----------------------------------------------------------------------------------------

    def fixed(self, raw: Mapping[str, Any], base: TrainConfig) -> tuple[dict[str, Scalar], TrainConfig]:
        flat: dict[str, Any] = {}
        for key, value in _flatten_fixed(raw).items():
            if key in flat:
                raise self.error(f"fixed.{key}: given twice (nested and dotted)")
            annotation = self.config_key(f"fixed.{key}", key)
            flat[key] = self.coerce(f"fixed.{key}", annotation, value, key)
        cfg = TrainConfig.from_flat_dict(flat, base=base)
        canonical = cfg.to_flat_dict()
        return {key: canonical[key] for key in flat}, cfg

    def start_points(self, search: SearchSettings, space: Sequence[Distribution]) -> list[dict[str, Scalar] | str]:
        """`search.start_points` in flat-config form: searched keys only, each value inside its distribution,
        no more points than trials; `base` stays `base` (`SweepSpec.start_point_params` resolves it)."""
        points = search.start_points
        if len(points) > search.num_trials:
            raise self.error(f"search.start_points: {len(points)} points but search.num_trials is "
                             f"{search.num_trials}; the points past the last trial would never run")
        dists = {d.key: d for d in space}
        out: list[dict[str, Scalar] | str] = []
        for index, point in enumerate(points):
            where = f"search.start_points[{index}]"
            if point == "base":  # kept as written: resolved against the space it runs with (`start_point_params`)
                out.append(point)
                continue
            params: dict[str, Scalar] = {}
            for key, value in point.items():
                if key not in dists:
                    raise self.error(f"{where}.{key}: not a searched key{_hint(key, list(dists))}; "
                                     f"searched: {', '.join(dists) or 'none'}")
                canonical = self.canonical(key, self.coerce(f"{where}.{key}", field_annotation(key), value, key))
                if not dists[key].contains(canonical):
                    raise self.error(f"{where}.{key}: {value!r} lies outside its distribution {dists[key].to_dict()}")
                params[key] = canonical
            out.append(params)
        return out

    def space_keys(self, raw: Any) -> None:
        """Space keys are dotted config keys (before the parse, which would read `loss: {...}` as a distribution)."""
        if not isinstance(raw, Mapping):
            return
        sections = {f.name for f in dataclasses.fields(TrainConfig)}
        for key, entry in raw.items():
            if isinstance(entry, Mapping) and key in sections:
                raise self.error(
                    f"space.{key}: space keys are dotted config keys (space: {{{key}.<field>: {{...}}}}), not nested sections"
                )
            self.config_key(f"space.{key}", key)

    def space(
        self, entries: dict[str, SpaceEntry], fixed: dict[str, Scalar], cfg: TrainConfig
    ) -> tuple[Distribution, ...]:
        space: dict[str, Distribution] = {}
        for key, entry in entries.items():
            if key in fixed:
                raise self.error(
                    f"space.{key}: {key} is both fixed and searched; remove it from one of fixed and space"
                )
            space[key] = self.distribution(key, field_annotation(key), entry, cfg)  # keys: `space_keys`
        # `when` conditions: after every distribution is known (a condition may name a later key).
        for key, entry in entries.items():
            if entry.when is not None:
                space[key] = dataclasses.replace(space[key], when=self.when(key, entry.when, space))
        self.no_cycles(space)
        return tuple(space.values())

    def distribution(self, key: str, annotation: Any, entry: SpaceEntry, cfg: TrainConfig) -> Distribution:
        ((kind, value),) = entry.given().items()
        if kind == "categorical":
            return self.categorical(key, annotation, value)
        kpath = f"space.{key}.{kind}"
        if annotation is not {"uniform": float, "loguniform": float, "int": int}[kind]:
            other = (f"a {getattr(annotation, '__name__', '')} field", "{categorical: [...]}")  # str, bool
            what, use = _FITTING.get(get_origin(annotation) or annotation, other)
            raise self.error(
                f"{kpath}: {kind} does not fit {key}, {what} (currently {cfg.to_flat_dict()[key]!r}); use {use}"
            )
        low, high = value
        if not low < high:
            raise self.error(f"{kpath}: empty range {value!r}: low must be < high")
        if kind == "loguniform" and not low > 0:
            raise self.error(f"{kpath}: loguniform needs low > 0, got {value!r}")
        valid = field_range(key)
        if valid is not None and not (low in valid and high in valid):
            raise self.error(f"{kpath}: {value!r} reaches outside the valid range {valid} of {key}")
        if entry.step is not None and (high - low) % entry.step:
            raise self.error(
                f"space.{key}.step: high - low = {high - low} is not a multiple of step {entry.step}"
            )
        return Distribution(key=key, kind=kind, low=low, high=high, step=entry.step)

    def categorical(self, key: str, annotation: Any, value: Sequence[Any]) -> Distribution:
        kpath = f"space.{key}.categorical"
        choices: list[Scalar] = []
        for index, item in enumerate(value):
            canonical = self.canonical(key, self.coerce(f"{kpath}[{index}]", annotation, item, key))
            if canonical in choices:
                raise self.error(f"{kpath}[{index}]: duplicate value {item!r}")
            choices.append(canonical)
        return Distribution(key=key, kind="categorical", choices=tuple(choices))

    def canonical(self, key: str, value: Any) -> Scalar:
        """The flat-config form of a coerced value (tuples -> comma-separated strings)."""
        return TrainConfig.from_flat_dict({key: value}).to_flat_dict()[key]

    def when(
        self, key: str, raw: dict[str, Any], space: Mapping[str, Distribution]
    ) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
        path = f"space.{key}.when"
        conditions = []
        for parent, values in raw.items():
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
                canonical = self.canonical(parent, self.coerce(ipath, field_annotation(parent), item))
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

    def resources(self, spec: SweepSpec, cfg: TrainConfig, available: Mapping[str, float] | None) -> None:
        cpu, gpu = spec.resources.cpu, spec.resources.gpu
        if gpu > 1 and not float(gpu).is_integer():
            raise self.error(
                f"resources.gpu: {gpu:g}: a trial may take a fraction of one GPU (e.g. 0.5) or whole GPUs, "
                "not a fraction above 1"
            )
        self.workers(spec, cfg)
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
        origin = "fixed.train.device" if "train.device" in spec.fixed else "train.device (from base_config)"
        if gpu == 0 and device.startswith("cuda"):
            raise self.error(
                f"resources.gpu: 0 but {origin} is {device!r}; give each trial a GPU (e.g. resources.gpu: 1 or 0.5)"
            )
        if gpu > 0 and device == "cpu":
            raise self.error(
                f"resources.gpu: {gpu:g} but {origin} is 'cpu': the trials would hold a GPU they never use"
            )

    def workers(self, spec: SweepSpec, cfg: TrainConfig) -> None:
        """Data-parallel trials: one worker per whole GPU, a global batch that splits evenly over the workers
        (each worker gets `cpu / workers` CPUs, a fraction when the trial has fewer CPUs than workers)."""
        resources, workers = spec.resources, spec.resources.num_workers
        gpu = resources.gpu
        if resources.workers is not None and gpu > 0 and workers != (int(gpu) if gpu >= 1 else 1):
            want = f"{int(gpu)} (one per GPU)" if gpu >= 1 else "1 (a fraction of a GPU holds one process)"
            raise self.error(f"resources.workers: {workers} with resources.gpu: {gpu:g}; it must be {want}")
        if workers == 1:
            return
        where = _where(spec, "train.batch_size")
        for batch in _values(spec, cfg, "train.batch_size"):
            if batch % workers:
                raise self.error(
                    f"{where}: train.batch_size {batch} cannot be split over {workers} workers; the global batch is "
                    f"split evenly, so every value must be a multiple of {workers}"
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
            return _where(spec, key)

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


def _values(spec: SweepSpec, cfg: TrainConfig, key: str) -> list[int]:
    """Every value integer config `key` can take in the sweep's trials (its choices, its int range by step, or
    the one fixed / base value)."""
    for dist in spec.space:
        if dist.key == key:
            if dist.kind == "categorical":
                return [int(v) for v in dist.choices]
            return list(range(int(dist.low), int(dist.high) + 1, dist.step or 1))
    return [int(cfg.to_flat_dict()[key])]


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
                         "pretrain.pool_iter": _SMOKE_MAX_ITERS - 1,
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


if __name__ == "__main__":  # `make schema`
    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m orchestration.search_space --schema  (prints the JSON Schema)")
    print(json.dumps(json_schema(), indent=2))

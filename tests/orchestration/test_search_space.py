"""Sweep files: schema validation, the published JSON Schema, overrides, sampling (a fake trial and real in-memory
Optuna), smoke version.

No Ray, no MLflow, no server; Optuna is imported only inside the tests that use it.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpews.config import TrainConfig
from orchestration.search_space import (
    DEFAULT_OBJECTIVE_METRIC,
    SEARCH_SPACES_DIR,
    SweepFileError,
    SweepSpec,
    apply_overrides,
    flat_params,
    json_schema,
    load_sweep,
    optuna_define_by_run,
    optuna_distributions,
    sample_params,
    smoke,
    validate_sweep,
)

SHIPPED = tuple(sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml")))


def test_the_three_sweeps_are_shipped():
    assert {"demo", "voc_paper", "coco"} <= set(SHIPPED)


def minimal() -> dict:
    """A valid sweep on the synthetic preset (no dataset folder needed)."""
    return {
        "base_config": "synthetic_demo",
        "space": {
            "loss.ism_weight": {"uniform": [0.1, 0.5]},
            "proto.num_prototypes": {"categorical": [5, 10]},
        },
        "search": {"num_trials": 2},
    }


def write(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(tmp_path: Path, data: dict, *needles: str, **kwargs) -> str:
    path = write(tmp_path, data)
    with pytest.raises(SweepFileError) as info:
        load_sweep(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


class FakeTrial:
    """Optuna's define-by-run API, answering from a table (or the low end / first choice) and logging calls."""

    def __init__(self, answers: dict | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple] = []

    def suggest_float(self, name, low, high, *, log=False):
        self.calls.append(("float", name, low, high, log))
        return self.answers.get(name, low)

    def suggest_int(self, name, low, high, *, step=1):
        self.calls.append(("int", name, low, high, step))
        return self.answers.get(name, low)

    def suggest_categorical(self, name, choices):
        self.calls.append(("categorical", name, tuple(choices)))
        return self.answers.get(name, choices[0])


def corner_params(spec: SweepSpec) -> list[dict]:
    """Two param sets per spec: every range at its low end / first choice, and at its high end / last choice."""
    out = []
    for pick in (0, -1):
        answers = {
            d.key: (d.choices[pick] if d.kind == "categorical" else (d.low, d.high)[pick]) for d in spec.space
        }
        out.append(sample_params(spec, FakeTrial(answers)))
    return out


# ------------------------------------------------------------------------------------------------------------
# The shipped sweep files.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_validate_and_every_key_round_trips(name):
    spec = load_sweep(SEARCH_SPACES_DIR / f"{name}.yaml", check_paths=False)
    assert spec.name == name and spec.space and spec.search.num_trials >= 1
    # every fixed and searched key is a config key whose value survives the flat round trip
    assert TrainConfig.from_flat_dict(spec.fixed, base=spec.base) == spec.base_train_config()
    for params in corner_params(spec):
        cfg = spec.trial_config(params)
        flat = flat_params(spec, params)
        assert TrainConfig.from_flat_dict(flat) == cfg
        for key, value in {**spec.fixed, **params}.items():
            assert flat[key] == value, key
    # the resolved sweep is itself a valid sweep file that gives the same spec
    assert validate_sweep(yaml.safe_load(spec.to_yaml()), check_paths=False) == spec


def test_demo_sweep_is_the_cpu_setting():
    spec = load_sweep("demo")  # synthetic: no folder to check
    cfg = spec.base_train_config()
    assert cfg.data.dataset == "synthetic" and cfg.train.device == "cpu"
    assert 500 >= cfg.optim.max_iters >= 200 and 0 < cfg.proto.build_iter < cfg.optim.max_iters // 2
    assert cfg.model.weights == "synthetic" and cfg.pretrain.seed != cfg.data.synthetic_seed  # pretrained backbone
    assert cfg.eval.every == 0 and 0 < cfg.eval.max_images <= 100
    assert (spec.search.algorithm, spec.search.seed, spec.search.num_trials, spec.search.max_concurrent) == (
        "tpe",
        0,
        6,
        2,
    )
    assert (spec.folds.k, spec.folds.seed, spec.folds.split) == (3, 0, "train_aug")
    assert spec.scheduler.type == "fifo"  # every trial trains every fold (docs/results.md: ASHA saved nothing here)
    assert (spec.resources.cpu, spec.resources.gpu) == (1.0, 0.0)
    assert (spec.objective.metric, spec.objective.mode) == ("cv/miou_seg_mean", "max")
    assert spec.time_budget_s is not None and spec.time_budget_s < 600 and spec.tracking.experiment == "demo"
    assert {
        "proto.num_prototypes",
        "loss.pdl_weight",
        "loss.ssl_weight",
        "loss.ism_weight",
        "cam.high_threshold",
        "cam.low_threshold",
    } <= set(spec.searched_keys())
    assert spec.distribution("loss.pdl_weight").log and spec.distribution("loss.ssl_weight").log


def test_voc_paper_space_matches_the_paper():
    spec = load_sweep("voc_paper", check_paths=False)
    d = spec.distribution
    assert d("proto.num_prototypes").choices == (5, 10, 15, 20)
    assert (d("loss.pdl_weight").kind, d("loss.pdl_weight").low, d("loss.pdl_weight").high) == (
        "loguniform",
        0.05,
        0.3,
    )
    assert d("loss.ssl_weight").choices == (1.5e-4, 1e-3, 1e-2)
    assert (d("loss.ism_weight").low, d("loss.ism_weight").high) == (0.1, 0.5)
    assert (d("loss.seg_weight").low, d("loss.seg_weight").high) == (0.05, 0.2)
    assert (d("cam.high_threshold").low, d("cam.high_threshold").high) == (0.6, 0.8)
    assert (d("cam.low_threshold").low, d("cam.low_threshold").high) == (0.2, 0.35)
    assert d("train.batch_size").choices == (4, 8) and d("model.ism_depth").choices == (8, 10, 12)
    assert d("proto.temperature").kind == "loguniform" and (
        d("proto.temperature").low,
        d("proto.temperature").high,
    ) == (5, 20)
    assert spec.resources.gpu in (0.5, 1.0) and spec.folds.k == 3 and spec.search.num_trials == 40
    assert spec.base_train_config().data.dataset == "voc"
    assert load_sweep("coco", check_paths=False).base_train_config().data.dataset == "coco"


def test_readme_example_is_a_valid_sweep(tmp_path):
    text = (SEARCH_SPACES_DIR / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    spec = load_sweep(write(tmp_path, yaml.safe_load(block), "my_sweep.yaml"))
    assert spec.distribution("proto.num_prototypes").when == (("proto.n_builds", (1,)),)
    assert [e.message for e in schema_validator().iter_errors(yaml.safe_load(block))] == []


# ------------------------------------------------------------------------------------------------------------
# The published JSON Schema (search_spaces/schema.json), which editors read.
# ------------------------------------------------------------------------------------------------------------


def schema_validator():
    """A validator of the committed search_spaces/schema.json (itself checked against the JSON Schema spec)."""
    import jsonschema

    schema = json.loads((SEARCH_SPACES_DIR / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_published_schema_is_the_generated_one():
    command = [sys.executable, "-m", "orchestration.search_space", "--schema"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json_schema()
    assert (SEARCH_SPACES_DIR / "schema.json").read_text() == out, (
        "search_spaces/schema.json is stale: make schema"
    )
    usage = subprocess.run(command[:-1], capture_output=True, text=True)
    assert usage.returncode == 1 and "--schema" in usage.stderr and not usage.stdout


@pytest.mark.parametrize("name", SHIPPED)
def test_schema_validates_every_shipped_sweep_which_names_it(name):
    text = (SEARCH_SPACES_DIR / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=./schema.json"
    assert [e.message for e in schema_validator().iter_errors(yaml.safe_load(text))] == []


@pytest.mark.parametrize(
    "path, value, where, schema_says, loader_says",
    [
        ("search/algoritm", "tpe", ["search"], "'algoritm' was unexpected", "unknown key search.algoritm"),
        (
            "search/num_trials",
            "8",
            ["search", "num_trials"],
            "'8' is not of type 'integer'",
            "search.num_trials",
        ),
        (
            "space/loss.ism_wieght",
            {"uniform": [0.1, 0.5]},
            ["space"],
            "'loss.ism_wieght' was unexpected",
            "space.loss.ism_wieght: 'loss.ism_wieght' is not a config field",
        ),
        (
            "space/loss.pdl_weight",
            {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]},
            ["space", "loss.pdl_weight"],
            "is valid under each of",
            "space.loss.pdl_weight: needs exactly one of",
        ),
        (
            "space/loss.pdl_weight",
            {"uniform": [0.1]},
            ["space", "loss.pdl_weight", "uniform"],
            "[0.1] is too short",
            "space.loss.pdl_weight.uniform: expected [low, high], got [0.1]",
        ),
        (
            "space/loss.pdl_weight",
            {"uniform": [0.1, 0.2], "step": 2},
            ["space", "loss.pdl_weight"],
            "'int' is a dependency of 'step'",
            "space.loss.pdl_weight.step: only an int distribution takes a step",
        ),
        (
            "resources/cpu",
            0,
            ["resources", "cpu"],
            "0 is less than or equal to the minimum of 0",
            "resources.cpu: input should be greater than 0, got 0",
        ),
        (
            "scheduler/type",
            "hyperband",
            ["scheduler", "type"],
            "'hyperband' is not one of ['asha', 'fifo']",
            "scheduler.type: input should be 'asha' or 'fifo', got 'hyperband'",
        ),
        (
            "fixed/optim.max_iters",
            40.5,
            ["fixed", "optim.max_iters"],
            "40.5 is not of type 'integer'",
            "fixed.optim.max_iters=40.5 must be an integer",
        ),
        (
            "fixed/cam.high_threshold",
            1.5,
            ["fixed", "cam.high_threshold"],
            "1.5 is greater than the maximum of 1",
            "fixed.cam.high_threshold=1.5 is outside the valid range [0, 1]",
        ),
        (
            "fixed/loss",
            {"ism_wieght": 0.3},
            ["fixed", "loss"],
            "'ism_wieght' was unexpected",
            "fixed.loss.ism_wieght: 'loss.ism_wieght' is not a config field (did you mean loss.ism_weight?)",
        ),
    ],
)
def test_schema_rejects_a_broken_sweep_as_the_loader_does(
    tmp_path, path, value, where, schema_says, loader_says
):
    broken = _set(copy.deepcopy(yaml.safe_load((SEARCH_SPACES_DIR / "demo.yaml").read_text())), path, value)
    errors = list(schema_validator().iter_errors(broken))
    assert [(list(e.absolute_path), schema_says in e.message) for e in errors] == [(where, True)], errors
    load_error(tmp_path, broken, loader_says)


def test_every_problem_of_the_structure_is_a_line_naming_the_file_and_key(tmp_path):
    data = _set(
        _set(_set(minimal(), "search/num_trials", "six"), "search/algoritm", "tpe"), "resources/cpu", 0
    )
    path = tmp_path / "sweep.yaml"
    assert load_error(tmp_path, data).splitlines() == [
        f"{path}: search.num_trials: input should be a valid integer, got 'six'",
        f"{path}: unknown key search.algoritm (did you mean search.algorithm?); allowed here: algorithm, seed, "
        "num_trials, max_concurrent, start_points",
        f"{path}: resources.cpu: input should be greater than 0, got 0",
    ]


def test_null_means_the_default(tmp_path):
    data = _set(_set(minimal(), "search/seed", 7), "folds", {"k": 5})
    spec = load_sweep(write(tmp_path, data), ["search.seed=null", "folds=null", "time_budget_s=null"])
    assert (spec.search.seed, spec.search.num_trials, spec.folds.k, spec.time_budget_s) == (0, 2, 3, None)


# ------------------------------------------------------------------------------------------------------------
# Defaults and the spec API.
# ------------------------------------------------------------------------------------------------------------


def test_defaults_are_filled_in(tmp_path):
    spec = load_sweep(write(tmp_path, {"space": {"loss.ism_weight": {"uniform": [0.1, 0.5]}}}, "tiny.yaml"))
    assert spec.name == "tiny" and spec.base_config == "synthetic_demo" and spec.tracking.experiment == "tiny"
    assert (
        spec.objective.metric == DEFAULT_OBJECTIVE_METRIC == "cv/miou_seg_mean"
        and spec.objective.mode == "max"
    )
    assert spec.folds.split == "train_aug" and spec.folds.k == 3
    assert spec.scheduler.type == "asha" and spec.time_budget_s is None and spec.fixed == {}
    assert spec.base_train_config() == spec.base


def test_fixed_accepts_nested_sections_and_converts_types(tmp_path):
    data = {**minimal(), "fixed": {"loss": {"seg_weight": 1}, "cam.scales": [1.0, 0.5], "optim.lr": "3e-4"}}
    spec = load_sweep(write(tmp_path, data))
    assert spec.fixed == {"loss.seg_weight": 1.0, "cam.scales": "1.0,0.5", "optim.lr": 3e-4}
    cfg = spec.base_train_config()
    assert cfg.loss.seg_weight == 1.0 and cfg.cam.scales == (1.0, 0.5) and cfg.optim.lr == 3e-4


def test_trial_config_applies_base_fixed_and_params(tmp_path):
    data = {**minimal(), "fixed": {"optim.max_iters": 50, "proto.build_iter": 20}}
    spec = load_sweep(write(tmp_path, data))
    cfg = spec.trial_config({"loss.ism_weight": 0.3, "proto.num_prototypes": 10})
    assert cfg.loss.ism_weight == 0.3 and cfg.proto.num_prototypes == 10 and cfg.optim.max_iters == 50
    assert cfg.model.embed_dim == spec.base.model.embed_dim  # from the preset
    with pytest.raises(SweepFileError, match="loss.pdl_weight.*not searched"):
        spec.trial_config({"loss.pdl_weight": 0.1})
    with pytest.raises(SweepFileError, match=r"loss.ism_weight=0.9 is outside"):
        spec.trial_config({"loss.ism_weight": 0.9})
    with pytest.raises(SweepFileError, match=r"proto.num_prototypes=7 is outside"):
        spec.trial_config({"proto.num_prototypes": 7})


def test_flat_params_have_the_same_keys_for_every_trial(tmp_path):
    data = minimal()
    data["space"]["proto.temperature"] = {"loguniform": [5, 20], "when": {"proto.num_prototypes": 10}}
    spec = load_sweep(write(tmp_path, data))
    first = flat_params(spec, {"loss.ism_weight": 0.2, "proto.num_prototypes": 5})
    second = flat_params(spec, {"loss.ism_weight": 0.4, "proto.num_prototypes": 10, "proto.temperature": 7.5})
    assert list(first) == list(second) == list(TrainConfig().to_flat_dict())
    assert all(isinstance(v, (int, float, str, bool)) for v in first.values())
    assert first["proto.temperature"] == spec.base.proto.temperature and second["proto.temperature"] == 7.5


def test_spec_is_immutable_hashable_and_picklable(tmp_path):
    import pickle

    spec = load_sweep(write(tmp_path, minimal()))
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(spec) == hash(pickle.loads(pickle.dumps(spec)))


# ------------------------------------------------------------------------------------------------------------
# Validation errors: each names the key path and the value.
# ------------------------------------------------------------------------------------------------------------


def _set(data: dict, path: str, value) -> dict:
    node = data
    parts = path.split("/")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


BAD_CASES = {
    "unknown top-level key": ("serach", {"num_trials": 2}, ["unknown key serach", "did you mean search?"]),
    "unknown nested key": (
        "search/algoritm",
        "tpe",
        ["unknown key search.algoritm", "did you mean search.algorithm?"],
    ),
    "unknown scheduler key": (
        "scheduler/grace",
        1,
        ["scheduler.grace", "did you mean scheduler.grace_period?"],
    ),
    "space key not a config field": (
        "space/loss.ism_wieght",
        {"uniform": [0.1, 0.2]},
        ["space.loss.ism_wieght", "not a config field", "did you mean loss.ism_weight?"],
    ),
    "space key without a section": (
        "space/ism_weight",
        {"uniform": [0.1, 0.2]},
        ["space.ism_weight", "not a config field"],
    ),
    "nested space section": (
        "space/loss",
        {"pdl_weight": {"uniform": [0.1, 0.2]}},
        ["space.loss", "dotted config keys"],
    ),
    "empty range": (
        "space/loss.pdl_weight",
        {"uniform": [0.2, 0.2]},
        ["space.loss.pdl_weight.uniform", "empty range", "[0.2, 0.2]"],
    ),
    "inverted range": (
        "space/loss.pdl_weight",
        {"loguniform": [0.3, 0.05]},
        ["space.loss.pdl_weight.loguniform", "empty range"],
    ),
    "inverted int range": (
        "space/train.batch_size",
        {"int": [8, 4]},
        ["space.train.batch_size.int", "empty range"],
    ),
    "range of one value": (
        "space/loss.pdl_weight",
        {"uniform": [0.1]},
        ["space.loss.pdl_weight.uniform", "[low, high]"],
    ),
    "loguniform low 0": (
        "space/loss.pdl_weight",
        {"loguniform": [0, 0.3]},
        ["space.loss.pdl_weight.loguniform", "low > 0"],
    ),
    "loguniform negative": ("space/loss.pdl_weight", {"loguniform": [-1, 0.3]}, ["loguniform needs low > 0"]),
    "int on a float field": (
        "space/loss.pdl_weight",
        {"int": [1, 3]},
        ["space.loss.pdl_weight.int", "a float field", "uniform"],
    ),
    "uniform on an int field": (
        "space/train.batch_size",
        {"uniform": [4, 8]},
        ["space.train.batch_size.uniform", "an int field"],
    ),
    "loguniform on an int field": (
        "space/proto.num_prototypes",
        {"loguniform": [4, 8]},
        ["space.proto.num_prototypes.loguniform"],
    ),
    "uniform on a str field": (
        "space/model.backbone",
        {"uniform": [0, 1]},
        ["space.model.backbone.uniform", "categorical"],
    ),
    "uniform on a choice field": (
        "space/cam.ism_box_mode",
        {"uniform": [0, 1]},
        ["space.cam.ism_box_mode.uniform"],
    ),
    "categorical wrong type": (
        "space/train.batch_size",
        {"categorical": [4, "eight"]},
        ["space.train.batch_size.categorical[1]", "'eight'", "integer"],
    ),
    "categorical float for int": (
        "space/train.batch_size",
        {"categorical": [4, 8.5]},
        ["categorical[1]", "8.5"],
    ),
    "categorical bad choice": (
        "space/cam.ism_box_mode",
        {"categorical": ["token", "box"]},
        ["categorical[1]", "'box'", "not one of"],
    ),
    "categorical bool field": (
        "space/data.photometric",
        {"categorical": [True, "yes"]},
        ["categorical[1]", "true or false"],
    ),
    "categorical empty": (
        "space/train.batch_size",
        {"categorical": []},
        ["space.train.batch_size.categorical", "at least 1 item", "got []"],
    ),
    "categorical duplicate": (
        "space/train.batch_size",
        {"categorical": [4, 4.0]},
        ["categorical[1]", "duplicate"],
    ),
    "two distributions": (
        "space/loss.pdl_weight",
        {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]},
        ["exactly one"],
    ),
    "no distribution": (
        "space/loss.pdl_weight",
        {"when": {"proto.num_prototypes": 5}},
        ["space.loss.pdl_weight", "exactly one"],
    ),
    "distribution not a mapping": (
        "space/loss.pdl_weight",
        [0.1, 0.2],
        ["space.loss.pdl_weight", "expected a distribution"],
    ),
    "unknown distribution key": (
        "space/loss.pdl_weight",
        {"uniform": [0.1, 0.2], "lg": True},
        ["space.loss.pdl_weight.lg"],
    ),
    "step on a float": (
        "space/loss.pdl_weight",
        {"uniform": [0.1, 0.2], "step": 1},
        ["space.loss.pdl_weight.step"],
    ),
    "step not dividing": (
        "space/train.batch_size",
        {"int": [4, 10], "step": 4},
        ["space.train.batch_size.step", "multiple"],
    ),
    "when on a missing key": (
        "space/loss.pdl_weight",
        {"uniform": [0.1, 0.2], "when": {"proto.n_builds": 1}},
        ["space.loss.pdl_weight.when.proto.n_builds", "not a searched key"],
    ),
    "when on itself": (
        "space/loss.pdl_weight",
        {"uniform": [0.1, 0.2], "when": {"loss.pdl_weight": 0.1}},
        ["itself"],
    ),
    "when on a float key": (
        "space/proto.temperature",
        {"uniform": [5, 10], "when": {"loss.ism_weight": 0.2}},
        ["space.proto.temperature.when.loss.ism_weight", "categorical or int"],
    ),
    "when value never sampled": (
        "space/proto.temperature",
        {"uniform": [5, 10], "when": {"proto.num_prototypes": 7}},
        ["space.proto.temperature.when.proto.num_prototypes", "never sampled"],
    ),
    "when value of the wrong type": (
        "space/proto.temperature",
        {"uniform": [5, 10], "when": {"proto.num_prototypes": "ten"}},
        ["proto.num_prototypes", "'ten'"],
    ),
    "fixed not a config field": (
        "fixed/loss.ism_wieght",
        0.3,
        ["fixed.loss.ism_wieght", "not a config field", "did you mean"],
    ),
    "fixed wrong type": ("fixed/optim.max_iters", "many", ["fixed.optim.max_iters", "'many'", "integer"]),
    "fixed and searched": (
        "fixed/loss.ism_weight",
        0.3,
        ["space.loss.ism_weight", "both fixed and searched"],
    ),
    "num_trials wrong type": ("search/num_trials", "six", ["search.num_trials", "'six'", "integer"]),
    "num_trials zero": ("search/num_trials", 0, ["search.num_trials", "greater than or equal to 1", "got 0"]),
    "num_trials bool": ("search/num_trials", True, ["search.num_trials", "True"]),
    "max_concurrent zero": ("search/max_concurrent", 0, ["search.max_concurrent"]),
    "bad algorithm": ("search/algorithm", "tpee", ["search.algorithm", "'tpee'", "did you mean tpe?"]),
    "k one": ("folds/k", 1, ["folds.k", "greater than or equal to 2", "got 1"]),
    "k larger than the synthetic set": ("folds/k", 5000, ["folds.k", "5000", "data.synthetic_train"]),
    "bad scheduler": ("scheduler/type", "hyperband", ["scheduler.type", "'hyperband'"]),
    "grace zero": ("scheduler/grace_period", 0, ["scheduler.grace_period"]),
    "reduction one": ("scheduler/reduction_factor", 1, ["scheduler.reduction_factor", "greater than 1"]),
    "negative gpu": ("resources/gpu", -1, ["resources.gpu", "greater than or equal to 0", "-1"]),
    "gpu 1.5": ("resources/gpu", 1.5, ["resources.gpu", "1.5", "whole"]),
    "cpu zero": ("resources/cpu", 0, ["resources.cpu", "greater than 0"]),
    "cpu not a number": ("resources/cpu", "all", ["resources.cpu", "'all'"]),
    "bad mode": ("objective/mode", "maximise", ["objective.mode", "'maximise'"]),
    "metric without split": ("objective/metric", "miou", ["objective.metric", "'miou'"]),
    "time budget zero": ("time_budget_s", 0, ["time_budget_s", "greater than 0"]),
    "bad name": ("name", "my sweep/1", ["name", "'my sweep/1'"]),
    "unknown tracking key": (
        "tracking/experiement",
        "x",
        ["tracking.experiement", "did you mean tracking.experiment?"],
    ),
    "missing preset": ("base_config", "vocc", ["base_config", "'vocc'", "not found"]),
    "search not a mapping": ("search", 6, ["search", "expected a mapping", "6"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sweep_is_a_clear_error_naming_the_key(tmp_path, case):
    path, value, needles = BAD_CASES[case]
    load_error(tmp_path, _set(minimal(), path, value), *needles)


def test_when_cycle_is_an_error(tmp_path):
    data = minimal()
    data["space"] = {
        "proto.num_prototypes": {"categorical": [5, 10], "when": {"train.batch_size": 8}},
        "train.batch_size": {"categorical": [4, 8], "when": {"proto.num_prototypes": 10}},
    }
    load_error(tmp_path, data, "cycle", "proto.num_prototypes", "train.batch_size")


def test_empty_space_needs_a_single_trial(tmp_path):
    load_error(tmp_path, {"search": {"num_trials": 3}}, "space", "num_trials: 1")
    assert load_sweep(write(tmp_path, {"search": {"num_trials": 1}})).space == ()


def test_settings_that_would_break_every_trial_are_refused(tmp_path):
    data = _set(minimal(), "space/cam.low_threshold", {"uniform": [0.05, 0.35]})  # preset high 0.3
    load_error(tmp_path, data, "space.cam.low_threshold", "cam.high_threshold")
    load_error(
        tmp_path,
        _set(minimal(), "space/model.ism_depth", {"categorical": [2, 6]}),
        "space.model.ism_depth",
        "model.depth",
    )
    load_error(
        tmp_path,
        _set(minimal(), "fixed/optim.max_iters", 100),  # preset proto.build_iter 1000
        "proto.build_iter",
        "optim.max_iters",
        "fixed.optim.max_iters",
    )
    data = _set(
        _set(minimal(), "fixed/data.synthetic_train", 30), "space/train.batch_size", {"categorical": [8, 32]}
    )
    load_error(tmp_path, data, "space.train.batch_size", "32")
    load_error(
        tmp_path,
        _set(minimal(), "fixed/train.device", "cuda"),
        "resources.gpu",
        "fixed.train.device",
        "'cuda'",
    )
    data = _set(_set(minimal(), "resources/gpu", 1), "fixed/train.device", "cpu")
    load_error(tmp_path, data, "resources.gpu", "fixed.train.device", "'cpu'")


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("space:\n  loss.ssl_weight: {loguniform: [1e-5, 1e-2]}\nsearch: {num_trials: 2}\n")
    dist = load_sweep(path).distribution("loss.ssl_weight")
    assert (dist.low, dist.high) == (1e-5, 1e-2)


def test_resources_against_what_is_available(tmp_path):
    data = _set(minimal(), "resources/cpu", 4)
    assert load_sweep(write(tmp_path, data)).resources.cpu == 4  # no `available`: not checked
    load_error(tmp_path, data, "resources.cpu", "4", "2", available={"cpu": 2, "gpu": 0})
    assert load_sweep(write(tmp_path, data), available={"CPU": 8, "GPU": 0}).resources.cpu == 4
    data = _set(_set(minimal(), "resources/gpu", 2), "fixed/train.device", "cuda")
    load_error(tmp_path, data, "resources.gpu", available={"cpu": 16, "gpu": 1})
    assert load_sweep(write(tmp_path, data), available={"cpu": 16, "gpu": 2}).resources.gpu == 2
    half = _set(_set(minimal(), "resources/gpu", 0.5), "fixed/train.device", "auto")
    assert load_sweep(write(tmp_path, half)).resources.gpu == 0.5


def test_missing_dataset_folder_is_an_error_naming_the_key_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    voc = {
        "base_config": "voc",
        "space": {"loss.ism_weight": {"uniform": [0.1, 0.5]}},
        "search": {"num_trials": 2},
        "resources": {"gpu": 1},
    }
    load_error(tmp_path, voc, "base_config", "data/VOCdevkit/VOC2012", "does not exist")
    missing = str(tmp_path / "nowhere")
    load_error(tmp_path, {**voc, "fixed": {"data.root": missing}}, "fixed.data.root", missing)
    voc_split_list(tmp_path / "VOC2012", "train_aug", 12)
    spec = load_sweep(write(tmp_path, {**voc, "fixed": {"data.root": str(tmp_path / "VOC2012")}}))
    assert spec.base_train_config().data.root == str(tmp_path / "VOC2012")
    assert load_sweep(write(tmp_path, voc), check_paths=False).base_train_config().data.dataset == "voc"
    load_error(
        tmp_path,
        {**voc, "fixed": {"data.root": str(tmp_path / "VOC2012"), "model.weights": "w.pth"}},
        "fixed.model.weights",
        "w.pth",
    )


def voc_split_list(root: Path, split: str, images: int) -> Path:
    """A VOC folder whose split list names `images` ids (only the list: validation reads nothing else)."""
    listed = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    listed.parent.mkdir(parents=True, exist_ok=True)
    listed.write_text("".join(f"2007_{i:06d}\n" for i in range(images)))
    return listed


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SweepFileError, match="nope.yaml: sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {loss.ism_weight: [\n")
    with pytest.raises(SweepFileError, match=f"^{re.escape(str(bad))}: not valid YAML"):
        load_sweep(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(SweepFileError, match="expected a mapping at the top level"):
        load_sweep(bad)


def test_binary_sweep_file_is_an_error_naming_the_file(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x80\x81\xff")
    with pytest.raises(SweepFileError) as info:
        load_sweep(binary)
    assert str(info.value) == f"{binary}: not a text (UTF-8) file: byte 0x80 at offset 0"


# ------------------------------------------------------------------------------------------------------------
# Overrides.
# ------------------------------------------------------------------------------------------------------------


def test_overrides_edit_the_sweep_file(tmp_path):
    data = {**minimal(), "fixed": {"loss": {"seg_weight": 0.2}}}
    path = write(tmp_path, data)
    spec = load_sweep(
        path, ["search.num_trials=3", "fixed.loss.pdl_weight=0.3", "folds.k=4", "time_budget_s=90"]
    )
    assert spec.search.num_trials == 3 and spec.folds.k == 4 and spec.time_budget_s == 90
    assert spec.fixed == {"loss.seg_weight": 0.2, "loss.pdl_weight": 0.3}
    assert spec.base_train_config().loss.pdl_weight == 0.3
    spec = load_sweep(
        path,
        [
            "space.loss.ism_weight=null",
            "fixed.loss.ism_weight=0.3",
            "space.loss.pdl_weight={loguniform: [0.05, 0.2]}",
            "space.proto.num_prototypes.categorical=[5, 10, 20]",
        ],
    )
    assert spec.searched_keys() == ["proto.num_prototypes", "loss.pdl_weight"]
    assert spec.fixed["loss.ism_weight"] == 0.3 and spec.distribution("loss.pdl_weight").log
    assert spec.distribution("proto.num_prototypes").choices == (5, 10, 20)
    assert load_sweep(path, ["fixed.loss.seg_weight=null"]).fixed == {}


def test_bad_overrides_are_errors(tmp_path):
    path = write(tmp_path, minimal())
    with pytest.raises(SweepFileError, match="not of the form key=value"):
        load_sweep(path, ["search.num_trials"])
    with pytest.raises(SweepFileError, match="unknown key search.num_trail .*did you mean search.num_trials"):
        load_sweep(path, ["search.num_trail=3"])
    with pytest.raises(SweepFileError, match="search.num_trials: input should be a valid integer, got 'six'"):
        load_sweep(path, ["search.num_trials=six"])
    with pytest.raises(
        SweepFileError, match="space.loss.ism_weight: loss.ism_weight is both fixed and searched"
    ):
        load_sweep(path, ["fixed.loss.ism_weight=0.3"])  # also searched
    with pytest.raises(SweepFileError, match="name.*not a mapping"):
        load_sweep(path, ["name=x", "name.sub=1"])


def test_apply_overrides_does_not_touch_its_input():
    data = minimal()
    out = apply_overrides(data, ["search.num_trials=9", "fixed.optim.lr=0.1"])
    assert data == minimal() and out["search"]["num_trials"] == 9 and out["fixed"] == {"optim.lr": 0.1}


def test_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, minimal())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    spec = load_sweep(path, ["search.num_trials=3", "fixed.loss.pdl_weight=0.3"])
    spec.trial_config(sample_params(spec, FakeTrial()))
    smoke(spec)
    for name in SHIPPED:
        load_sweep(name, check_paths=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------------------


def conditional_spec(tmp_path) -> SweepSpec:
    data: dict = {}
    data["space"] = {  # children listed before their parents: sampling still asks the parents first
        "loss.pdl_weight": {"loguniform": [0.03, 0.3], "when": {"proto.kmeans_n_init": [5, 10]}},
        "proto.temperature": {"uniform": [5, 20], "when": {"proto.kmeans_n_init": 10, "train.batch_size": 8}},
        "proto.kmeans_n_init": {"categorical": [1, 5, 10]},
        "train.batch_size": {"int": [4, 16], "step": 4},
        "loss.ism_weight": {"uniform": [0.1, 0.5]},
    }
    data["search"] = {"num_trials": 4}
    return load_sweep(write(tmp_path, data))


def test_sample_params_with_a_fake_trial(tmp_path):
    spec = conditional_spec(tmp_path)
    trial = FakeTrial({"proto.kmeans_n_init": 10, "train.batch_size": 8, "loss.pdl_weight": 0.1})
    params = sample_params(spec, trial)
    assert params == {
        "proto.kmeans_n_init": 10,
        "train.batch_size": 8,
        "loss.ism_weight": 0.1,
        "loss.pdl_weight": 0.1,
        "proto.temperature": 5.0,
    }
    order = [call[1] for call in trial.calls]
    assert order.index("proto.kmeans_n_init") < order.index("loss.pdl_weight")
    assert order.index("train.batch_size") < order.index("proto.temperature")
    assert ("float", "loss.pdl_weight", 0.03, 0.3, True) in trial.calls
    assert ("int", "train.batch_size", 4, 16, 4) in trial.calls
    assert ("categorical", "proto.kmeans_n_init", (1, 5, 10)) in trial.calls
    # parent outside the condition: the children are not sampled and keep the base value
    trial = FakeTrial({"proto.kmeans_n_init": 1, "train.batch_size": 8})
    params = sample_params(spec, trial)
    assert set(params) == {"proto.kmeans_n_init", "train.batch_size", "loss.ism_weight"}
    assert spec.trial_config(params).proto.temperature == spec.base.proto.temperature
    # one condition of two fails
    params = sample_params(spec, FakeTrial({"proto.kmeans_n_init": 10, "train.batch_size": 12}))
    assert "loss.pdl_weight" in params and "proto.temperature" not in params
    with pytest.raises(SweepFileError, match="proto.temperature.*condition"):
        spec.trial_config({**params, "proto.temperature": 6.0})


def test_sample_params_with_optuna_fixed_trial(tmp_path):
    optuna = pytest.importorskip("optuna")
    spec = conditional_spec(tmp_path)
    wanted = {
        "proto.kmeans_n_init": 5,
        "train.batch_size": 12,
        "loss.ism_weight": 0.25,
        "loss.pdl_weight": 0.07,
    }
    assert sample_params(spec, optuna.trial.FixedTrial(wanted)) == wanted
    with pytest.raises(
        ValueError, match="not in"
    ):  # FixedTrial refuses a categorical value outside the choices
        sample_params(spec, optuna.trial.FixedTrial({**wanted, "proto.kmeans_n_init": 7}))
    with pytest.warns(UserWarning, match="out of the range"):  # and only warns about a range
        params = sample_params(spec, optuna.trial.FixedTrial({**wanted, "train.batch_size": 13}))
    with pytest.raises(SweepFileError, match="train.batch_size=13 is outside"):  # which trial_config refuses
        spec.trial_config(params)


def test_sample_params_with_an_in_memory_tpe_study(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = conditional_spec(tmp_path)

    def run(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        seen = []

        def objective(trial):
            params = sample_params(spec, trial)
            assert params == trial.params
            cfg = spec.trial_config(params)
            seen.append(params)
            return cfg.loss.ism_weight - abs(cfg.train.batch_size - 8) / 100

        study.optimize(objective, n_trials=6)
        assert len(study.trials) == 6
        return seen

    first = run(0)
    assert first == run(0) and first != run(1)
    assert any("proto.temperature" not in p for p in first) or any("loss.pdl_weight" not in p for p in first)
    for params in first:
        assert spec.distribution("train.batch_size").contains(params["train.batch_size"])
        assert 0.1 <= params["loss.ism_weight"] <= 0.5


def test_define_by_run_and_distributions_drive_optuna(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_sweep("demo")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = optuna_define_by_run(spec)
    trial = study.ask()
    assert define(trial) is None and set(trial.params) == set(spec.searched_keys())
    spec.trial_config(trial.params)
    distributions = optuna_distributions(spec)
    assert distributions["loss.pdl_weight"] == optuna.distributions.FloatDistribution(0.03, 0.3, log=True)
    assert distributions["proto.num_prototypes"] == optuna.distributions.CategoricalDistribution([5, 10, 15])
    assert trial.distributions == distributions
    # a trial the study did not sample itself (e.g. stopped early elsewhere) can be told as pruned
    frozen = optuna.trial.create_trial(
        params=trial.params, distributions=distributions, state=optuna.trial.TrialState.PRUNED
    )
    study.add_trial(frozen)
    assert study.trials[-1].state == optuna.trial.TrialState.PRUNED


# ------------------------------------------------------------------------------------------------------------
# Smoke version.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_smoke_shrinks_the_sweep(name):
    spec = load_sweep(name, check_paths=False)
    small = smoke(spec)
    assert small.name == f"{name}-smoke" and small.tracking.experiment == f"{spec.tracking.experiment}-smoke"
    assert (small.search.num_trials, small.search.max_concurrent, small.folds.k) == (2, 1, 2)
    assert small.scheduler.grace_period == 1 and small.space == spec.space
    cfg = small.base_train_config()
    assert cfg.optim.max_iters <= 10 and cfg.optim.warmup_iters < cfg.optim.max_iters
    assert cfg.proto.build_iter == cfg.optim.max_iters // 2 and cfg.eval.every == 0
    assert cfg.loss.seg_warmup_iters < cfg.optim.max_iters and 0 < cfg.eval.max_images <= 8
    assert cfg.loss.ism_warmup_iters < cfg.optim.max_iters
    if cfg.data.dataset == "synthetic":
        assert cfg.data.synthetic_train <= 64 and cfg.data.synthetic_val <= 8
        assert cfg.data.synthetic_train // 2 >= cfg.train.batch_size
    for key, value in spec.fixed.items():  # the rest of the fixed settings stay
        if key not in small.fixed or small.fixed[key] == value:
            continue
        assert key in {
            "data.num_workers",
            "train.log_every",
            "train.checkpoint_every",
            "optim.max_iters",
            "optim.warmup_iters",
            "proto.build_iter",
            "loss.seg_warmup_iters",
            "eval.max_images",
            "data.synthetic_train",
            "data.synthetic_val",
            "eval.every",
        }, key
    for params in corner_params(small):
        small.trial_config(params)


def test_smoke_leaves_searched_keys_to_the_space(tmp_path):
    data = _set(minimal(), "space/eval.max_images", {"categorical": [4, 16]})
    small = smoke(load_sweep(write(tmp_path, data)))
    assert "eval.max_images" not in small.fixed and "eval.max_images" in small.searched_keys()


# ------------------------------------------------------------------------------------------------------------
# Layering.
# ------------------------------------------------------------------------------------------------------------


def test_modules_import_without_ray_optuna_mlflow():
    code = (
        "import sys, orchestration.search_space, orchestration.kfold\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'optuna', 'mlflow', 'torch'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_distribution_contains_respects_kind(tmp_path):
    spec = conditional_spec(tmp_path)
    assert spec.distribution("train.batch_size").contains(8) and not spec.distribution(
        "train.batch_size"
    ).contains(9)
    assert not spec.distribution("train.batch_size").contains(True)
    assert spec.distribution("proto.kmeans_n_init").contains(5) and not spec.distribution(
        "proto.kmeans_n_init"
    ).contains(2)
    assert spec.distribution("loss.pdl_weight").contains(0.3) and not spec.distribution(
        "loss.pdl_weight"
    ).contains(0.31)
    assert not spec.distribution("loss.pdl_weight").contains("0.1")


# ------------------------------------------------------------------------------------------------------------
# Value ranges and the pre-flight checks: what would otherwise fail in every trial.
# ------------------------------------------------------------------------------------------------------------


def test_fixed_value_outside_its_range_names_the_key_value_and_range(tmp_path):
    path = write(tmp_path, minimal())
    with pytest.raises(SweepFileError) as info:
        load_sweep(path, ["fixed.optim.max_iters=-5"])
    assert str(info.value) == f"{path}: fixed.optim.max_iters=-5 is outside the valid range >= 0"
    message = load_error(tmp_path, _set(minimal(), "fixed/cam", {"scales": [1.0, 0.0]}))
    assert message.endswith("fixed.cam.scales[1]=0.0 is outside the valid range > 0"), message


@pytest.mark.parametrize(
    "key, entry, message",
    [
        (
            "cam.high_threshold",
            {"uniform": [0.5, 1.5]},
            "space.cam.high_threshold.uniform: [0.5, 1.5] reaches outside the valid range [0, 1] of cam.high_threshold",
        ),
        (
            "train.batch_size",
            {"int": [0, 8]},
            "space.train.batch_size.int: [0, 8] reaches outside the valid range >= 1 of train.batch_size",
        ),
        (
            "optim.beta2",
            {"uniform": [0.9, 1.0]},
            "space.optim.beta2.uniform: [0.9, 1.0] reaches outside the valid range [0, 1) of optim.beta2",
        ),
        (
            "proto.num_prototypes",
            {"categorical": [5, 0]},
            "space.proto.num_prototypes.categorical[1]=0 is outside the valid range >= 1",
        ),
    ],
)
def test_searched_range_must_lie_inside_the_fields_range(tmp_path, key, entry, message):
    data = minimal()
    data["space"] = {"loss.ism_weight": {"uniform": [0.1, 0.5]}, key: entry}
    path = write(tmp_path, data)
    with pytest.raises(SweepFileError) as info:
        load_sweep(path)
    assert str(info.value) == f"{path}: {message}"


def test_searched_range_may_reach_the_fields_bounds(tmp_path):
    data = minimal()
    data["space"]["cam.high_threshold"] = {"uniform": [0.5, 1.0]}
    data["space"]["train.batch_size"] = {"int": [1, 8]}
    spec = load_sweep(write(tmp_path, data))
    assert spec.distribution("cam.high_threshold").high == 1.0 and spec.distribution("train.batch_size").low == 1


def test_objective_must_be_a_key_every_trial_report_holds(tmp_path):
    from cpews.training import keys
    from orchestration.trial import cv_metrics

    # the keys are those of the trial's every report (before any fold ends and after one)
    assert set(cv_metrics([], [])) == set(cv_metrics([0.5, 0.7], [0.1, 0.1])) == set(keys.TRIAL_REPORT_KEYS)
    assert DEFAULT_OBJECTIVE_METRIC in keys.TRIAL_REPORT_KEYS
    message = load_error(tmp_path, _set(minimal(), "objective/metric", "val/miou_seg"))
    assert message.endswith(
        "objective.metric: 'val/miou_seg' is not reported by the sweep's trials; valid: cv/miou_seg_mean, "
        "cv/miou_seg_std, cv/baseline_miou_mean, cv/folds_completed"
    ), message
    spec = load_sweep(write(tmp_path, _set(_set(minimal(), "objective/metric", "cv/miou_seg_std"), "objective/mode", "min")))
    assert spec.objective.metric == keys.CV_MIOU_SEG_STD


def _voc(tmp_path: Path, **fixed) -> dict:
    return {
        "base_config": "voc",
        "fixed": {"data.root": str(tmp_path / "VOC2012"), **fixed},
        "space": {"loss.ism_weight": {"uniform": [0.1, 0.5]}},
        "search": {"num_trials": 2},
        "resources": {"gpu": 1},
    }


def test_voc_folds_smaller_than_the_batch_are_an_error(tmp_path):
    root = tmp_path / "VOC2012"
    listed = voc_split_list(root, "train_aug", 5)  # 3 folds of 2, 2, 1 ids: a fold trains on 5 - 2 = 3 images
    message = load_error(tmp_path, _voc(tmp_path))  # the voc preset's batch of 4
    assert message.endswith(
        f"base_config: train.batch_size reaches 4 but a fold trains on 3 images (5 ids in {listed}, folds.k=3)"
    ), message
    assert load_sweep(write(tmp_path, _voc(tmp_path, **{"train.batch_size": 3}))).folds.k == 3
    data = _voc(tmp_path)
    data["space"]["train.batch_size"] = {"categorical": [2, 8]}
    load_error(tmp_path, data, "space.train.batch_size", "reaches 8", "trains on 3 images")
    voc_split_list(root, "train_aug", 2)
    load_error(tmp_path, _voc(tmp_path), "folds.k: 3 folds of 2 images", str(listed))
    voc_split_list(root, "train_aug", 6)  # 6 - 2 = 4 images per fold: the batch of 4 fits
    assert load_sweep(write(tmp_path, _voc(tmp_path))).base_train_config().train.batch_size == 4
    assert load_sweep(write(tmp_path, _voc(tmp_path)), check_paths=False)  # nothing on disk is read then


def test_voc_fold_split_that_cannot_be_read_is_an_error(tmp_path):
    voc_split_list(tmp_path / "VOC2012", "train_aug", 12)
    data = _set(_voc(tmp_path), "folds/split", "trainval")
    missing = tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "trainval.txt"
    load_error(tmp_path, data, "folds.split: 'trainval'", str(missing), "not found")


def _backbone_state_dict(*overrides: str) -> dict:
    """The backbone weights of the `synthetic_demo` model (with `overrides`), as a pretraining would save them."""
    from cpews.config import load_config
    from cpews.model import build_model

    cfg = load_config("synthetic_demo", ["model.weights=", *overrides])
    return build_model(cfg, num_classes=3).backbone.vit.state_dict()


def test_model_weights_must_load_into_the_models_backbone(tmp_path):
    import torch

    good, narrow, garbage = tmp_path / "good.pt", tmp_path / "narrow.pt", tmp_path / "garbage.pt"
    torch.save(_backbone_state_dict(), good)
    torch.save(_backbone_state_dict("model.embed_dim=32"), narrow)  # another architecture
    garbage.write_bytes(b"\x80\x81\xff not a checkpoint")
    spec = load_sweep(write(tmp_path, _set(minimal(), "fixed/model.weights", str(good))))
    assert spec.base_train_config().model.weights == str(good)
    message = load_error(tmp_path, _set(minimal(), "fixed/model.weights", str(narrow)))
    assert f"fixed.model.weights: model.weights={str(narrow)!r}: the file does not fit the backbone" in message
    assert "cls_token: file (1, 1, 32) vs model (1, 1, 64)" in message
    message = load_error(tmp_path, _set(minimal(), "fixed/model.weights", str(garbage)))
    assert f"fixed.model.weights: model.weights={str(garbage)!r}: not a loadable state dict" in message
    data = minimal()
    data["space"]["model.weights"] = {"categorical": [str(good), str(narrow)]}
    load_error(tmp_path, data, "space.model.weights.categorical[1]", str(narrow), "does not fit")
    # `synthetic` (the default of the preset) is made before the first trial, and `hub` is downloaded: exempt
    assert load_sweep(write(tmp_path, minimal())).base_train_config().model.weights == "synthetic"
    assert load_sweep(write(tmp_path, _set(minimal(), "fixed/model.weights", str(narrow))), check_paths=False)


# -- search.start_points ---------------------------------------------------------------------------------------------


def _with_points(points: list, num_trials: int = 4) -> dict:
    data = {**minimal(), "name": "points"}
    data["search"] = {**data.get("search", {}), "num_trials": num_trials, "start_points": points}
    return data


def test_start_points_are_kept_in_flat_config_form_and_enqueued_first_in_order() -> None:
    from orchestration.tune_runner import make_searcher

    data = _with_points([{"proto.num_prototypes": 10}, {"proto.num_prototypes": 5, "loss.ism_weight": 0.1}])
    spec = validate_sweep(data, check_paths=False)
    assert spec.search.start_points == [{"proto.num_prototypes": 10}, {"proto.num_prototypes": 5, "loss.ism_weight": 0.1}]
    assert validate_sweep(yaml.safe_load(spec.to_yaml()), check_paths=False) == spec  # survives sweep.yaml
    searcher = make_searcher(spec)
    searcher.set_search_properties(spec.objective.metric, spec.objective.mode, {})
    first, second, third = (searcher.suggest(f"t{i}") for i in range(3))
    assert first["proto.num_prototypes"] == 10  # the keys a point leaves out are sampled
    assert second == {"proto.num_prototypes": 5, "loss.ism_weight": 0.1}
    assert set(third) == set(spec.searched_keys())


def test_base_start_point_is_the_base_configs_values_of_the_searched_keys() -> None:
    from cpews.config import load_config
    from orchestration.tune_runner import make_searcher

    spec = validate_sweep(_with_points(["base", {"proto.num_prototypes": 5}]), check_paths=False)
    preset = load_config("synthetic_demo")
    assert spec.search.start_points == ["base", {"proto.num_prototypes": 5}]  # `base` kept as written
    assert spec.start_point_params() == [
        {"loss.ism_weight": preset.loss.ism_weight, "proto.num_prototypes": preset.proto.num_prototypes},
        {"proto.num_prototypes": 5},
    ]
    assert validate_sweep(yaml.safe_load(spec.to_yaml()), check_paths=False) == spec  # survives sweep.yaml
    searcher = make_searcher(spec)
    searcher.set_search_properties(spec.objective.metric, spec.objective.mode, {})
    assert searcher.suggest("t0") == spec.start_point_params()[0]  # the first trial is the base configuration
    # resolved against the space it runs with: a base value outside its range (the preset's ism_weight 0.2) is
    # left out and sampled, as a key a point leaves out
    data = _with_points(["base"])
    data["space"]["loss.ism_weight"] = {"uniform": [0.3, 0.5]}
    narrowed = validate_sweep(data, check_paths=False)
    assert narrowed.start_point_params() == [{"proto.num_prototypes": preset.proto.num_prototypes}]
    # a conditional key whose condition the base point does not meet is left out too
    data = _with_points(["base"])
    data["space"]["loss.ism_weight"] = {"uniform": [0.1, 0.5], "when": {"proto.num_prototypes": 5}}
    assert validate_sweep(data, check_paths=False).start_point_params() == [
        {"proto.num_prototypes": preset.proto.num_prototypes}]


@pytest.mark.parametrize(
    ("points", "num_trials", "message"),
    [
        ([{"proto.num_prototype": 4}], 4, r"search\.start_points\[0\]\.proto\.num_prototype: not a searched key "
                                          r"\(did you mean proto\.num_prototypes\?\)"),
        ([{}, {"loss.ism_weight": 5.0}], 4, r"search\.start_points\[1\]\.loss\.ism_weight: 5\.0 lies outside its "
                                            r"distribution"),
        ([{"loss.pdl_weight": 0.1}], 4, r"search\.start_points\[0\]\.loss\.pdl_weight: not a searched key"),
        ([{}, {}, {}], 2, r"search\.start_points: 3 points but search\.num_trials is 2"),
    ],
)
def test_start_points_outside_the_space_are_refused_with_the_key(points: list, num_trials: int, message: str) -> None:
    with pytest.raises(SweepFileError, match=message):
        validate_sweep(_with_points(points, num_trials), check_paths=False)

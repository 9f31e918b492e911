from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import get_args, get_origin

import pytest

from cpews.config import (
    ConfigError,
    Range,
    TrainConfig,
    config_to_yaml,
    field_annotation,
    field_range,
    load_config,
    preset_names,
)


def test_defaults_are_the_voc_setting_of_section_12():
    cfg = TrainConfig()
    assert cfg.model.backbone == "vit_base_patch16_224" and cfg.model.ism_depth == 10
    assert cfg.data.crop_size == 448 and cfg.cam.scales == (1.0, 0.5, 1.5)
    assert (cfg.cam.bkg_threshold, cfg.cam.high_threshold, cfg.cam.low_threshold) == (0.5, 0.7, 0.25)
    assert cfg.refine.dilations == (1, 2, 4, 8, 12, 24) and cfg.refine.iters == 10
    assert (cfg.loss.ism_weight, cfg.loss.seg_weight, cfg.loss.seg_warmup_iters) == (0.2, 0.1, 2000)
    assert (cfg.loss.pdl_weight, cfg.loss.ssl_weight) == (0.12, 1.5e-4)
    assert (cfg.proto.num_prototypes, cfg.proto.temperature, cfg.proto.build_iter) == (10, 13.0, 4000)
    assert (cfg.optim.lr, cfg.optim.max_iters, cfg.train.batch_size) == (6e-5, 20000, 4)


def test_flat_round_trip_is_exact_and_scalar_only():
    cfg = load_config("synthetic_demo", ["loss.ism_weight=0.3", "cam.scales=1.0,0.75"])
    flat = cfg.to_flat_dict()
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flat["cam.scales"] == "1.0,0.75"
    assert TrainConfig.from_flat_dict(flat) == cfg
    assert TrainConfig.from_flat_dict(json.loads(json.dumps(flat))) == cfg


def test_every_field_has_a_provenance_comment():
    import inspect

    import cpews.config as module

    source = inspect.getsource(module)
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(field_annotation_section(section.name)):
            line = next(l for l in source.splitlines() if l.strip().startswith(f"{f.name}:"))
            assert "#" in line and "[" in line.split("#", 1)[1], f"{section.name}.{f.name} lacks provenance"


def field_annotation_section(name):
    return type(getattr(TrainConfig(), name))


def test_overrides_are_typed_and_int_widens_to_float():
    cfg = TrainConfig().with_overrides(["optim.lr=1", "train.batch_size=8", "proto.source=checkpoint"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 8 and cfg.proto.source == "checkpoint"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("loss.ism_wieght=0.3", "loss.ism_wieght"),
        ("nosection.x=1", "nosection"),
        ("loss.ism_weight=abc", "loss.ism_weight"),
        ("train.batch_size=2.5", "train.batch_size"),
        ("model.freeze_pos_embed=3", "model.freeze_pos_embed"),
        ("cam.ism_box_mode=pixel", "cam.ism_box_mode"),
        ("cam.scales=a,b", "cam.scales"),
        ("noequals", "noequals"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        TrainConfig().with_overrides([override])


def test_yaml_file_nested_flat_and_base(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: test_micro\nloss:\n  ism_weight: 0.5\noptim.max_iters: 9\n")
    cfg = load_config(str(path))
    assert cfg.loss.ism_weight == 0.5 and cfg.optim.max_iters == 9
    assert cfg.model.depth == 2  # from the test_micro preset
    assert cfg.model.patch_size == 8  # from synthetic_demo, the base of test_micro


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*loss\.nope"):
        load_config(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


def test_presets_load_and_yaml_dump_reloads(tmp_path):
    assert {"voc", "coco", "synthetic_demo", "test_micro"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        dumped = tmp_path / f"{name}.yaml"
        dumped.write_text(config_to_yaml(cfg))
        assert load_config(str(dumped)) == cfg
    coco = load_config("coco")
    assert coco.cam.bkg_threshold == 0.45 and coco.optim.max_iters == 80000 and coco.proto.build_iter == 16000


def test_field_annotation():
    assert field_annotation("loss.ism_weight") is float
    with pytest.raises(ConfigError, match="loss.bogus"):
        field_annotation("loss.bogus")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().loss.ism_weight = 1.0  # type: ignore[misc]


def test_cli_config_show_json_and_error():
    out = subprocess.run(
        [sys.executable, "-m", "cpews", "config", "show", "--json", "--set", "loss.ism_weight=0.3"],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(out.stdout)["loss.ism_weight"] == 0.3
    bad = subprocess.run(
        [sys.executable, "-m", "cpews", "config", "show", "--set", "loss.bogus=1"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "loss.bogus" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------------------------
# Value ranges.
# ------------------------------------------------------------------------------------------------------------


def _is_numeric(annotation) -> bool:
    if get_origin(annotation) is tuple:
        annotation = get_args(annotation)[0]
    return annotation in (int, float)


def test_every_numeric_field_has_a_range_and_its_default_lies_in_it():
    for key, value in TrainConfig().to_flat_dict().items():
        valid = field_range(key)
        if not _is_numeric(field_annotation(key)):
            assert valid is None, key
            continue
        assert isinstance(valid, Range), f"{key} has no valid range"
        items = [float(v) for v in str(value).split(",")] if isinstance(value, str) else [value]
        assert all(item in valid for item in items), (key, value, str(valid))


@pytest.mark.parametrize(
    "valid, text, inside, outside",
    [
        (Range(low=0), ">= 0", [0, 7, 0.5], [-1, -1e-9]),
        (Range(low=-1), ">= -1", [-1, 0, 12000], [-2]),
        (Range(low=0, low_open=True), "> 0", [1e-8, 3], [0, -0.1]),
        (Range(low=0, high=1), "[0, 1]", [0, 0.25, 1], [-0.01, 1.01]),
        (Range(low=0, high=1, high_open=True), "[0, 1)", [0, 0.999], [1, 1.5]),
        (Range(low=0, high=2**32 - 1), "[0, 4294967295]", [0, 2**32 - 1], [2**32, -1]),
    ],
)
def test_range_membership_and_text(valid, text, inside, outside):
    assert str(valid) == text
    assert all(value in valid for value in inside)
    assert not any(value in valid for value in outside)
    assert float("nan") not in valid and True not in valid and "1" not in valid


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.max_iters=-5", "--set: optim.max_iters=-5 is outside the valid range >= 0"),
        ("train.batch_size=0", "--set: train.batch_size=0 is outside the valid range >= 1"),
        ("optim.lr=0", "--set: optim.lr=0.0 is outside the valid range > 0"),
        ("optim.lr=.inf", "--set: optim.lr=inf is outside the valid range > 0"),
        ("optim.beta2=1", "--set: optim.beta2=1.0 is outside the valid range [0, 1)"),
        ("cam.high_threshold=1.5", "--set: cam.high_threshold=1.5 is outside the valid range [0, 1]"),
        ("loss.pdl_weight=-0.1", "--set: loss.pdl_weight=-0.1 is outside the valid range >= 0"),
        ("loss.ism_warmup_iters=-2", "--set: loss.ism_warmup_iters=-2 is outside the valid range >= -1"),
        ("cam.scales=1.0,-0.5", "--set: cam.scales[1]=-0.5 is outside the valid range > 0"),
        ("refine.dilations=1,0", "--set: refine.dilations[1]=0 is outside the valid range >= 1"),
        ("data.synthetic_image_size=16", "--set: data.synthetic_image_size=16 is outside the valid range >= 32"),
    ],
)
def test_out_of_range_overrides_name_the_key_the_value_and_the_range(override, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig().with_overrides([override])
    assert str(info.value) == message


def test_range_bounds_themselves_are_accepted():
    cfg = TrainConfig().with_overrides(
        ["optim.max_iters=0", "loss.ism_warmup_iters=-1", "cam.high_threshold=1", "cam.low_threshold=0",
         "optim.beta1=0", "proto.n_builds=0", "train.seed=4294967295"]
    )
    assert (cfg.optim.max_iters, cfg.loss.ism_warmup_iters, cfg.cam.high_threshold) == (0, -1, 1.0)


def test_out_of_range_values_in_a_file_or_a_flat_dict_name_their_source(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("base: test_micro\noptim:\n  max_iters: -5\n")
    with pytest.raises(ConfigError, match=r"^.*nested\.yaml: optim\.max_iters=-5 is outside the valid range >= 0$"):
        load_config(str(nested))
    flat = tmp_path / "flat.yaml"
    flat.write_text("proto.region_threshold: 2.0\n")
    with pytest.raises(ConfigError, match=r"flat\.yaml: proto\.region_threshold=2\.0 is outside .* \[0, 1\]"):
        load_config(str(flat))
    with pytest.raises(ConfigError, match=r"^checkpoint: eval\.size=0 is outside the valid range >= 1$"):
        TrainConfig.from_flat_dict({"eval.size": 0}, source="checkpoint")


def test_every_preset_lies_in_the_ranges():
    for name in preset_names():  # loading checks every value; a dump of the whole tree reloads
        flat = load_config(name).to_flat_dict()
        assert TrainConfig.from_flat_dict(flat).to_flat_dict() == flat


def test_binary_config_file_is_an_error_naming_the_file(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x80\x81\xff")
    with pytest.raises(ConfigError) as info:
        load_config(str(binary))
    assert str(info.value) == f"{binary}: not a text (UTF-8) file: byte 0x80 at offset 0"
    based = tmp_path / "based.yaml"
    based.write_text(f"base: {binary}\n")  # also as the base of another file
    with pytest.raises(ConfigError, match=f"^{binary}: not a text"):
        load_config(str(based))


def test_cli_refuses_out_of_range_and_binary_configs_before_writing(tmp_path):
    out = tmp_path / "train_out"
    bad = subprocess.run(
        [sys.executable, "-m", "cpews", "train", "--config", "test_micro", "--set", "optim.max_iters=-5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "cpews: error: --set: optim.max_iters=-5 is outside the valid range >= 0"
    )
    assert not out.exists()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x80\x81\xff")
    shown = subprocess.run(
        [sys.executable, "-m", "cpews", "config", "show", "--config", str(binary)],
        capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert shown.stderr.strip() == f"cpews: error: {binary}: not a text (UTF-8) file: byte 0x80 at offset 0"

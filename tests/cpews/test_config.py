from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from cpews.config import (
    ConfigError,
    TrainConfig,
    config_to_yaml,
    field_annotation,
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

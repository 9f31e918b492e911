"""One frozen config tree: every hyperparameter of CPEWS exactly once, with its default and provenance.

Provenance tags follow method.md: [P] paper, [T] ToCo, [F] FPR, [A] AFA, [D] a decision of the spec,
[I] a decision of this implementation. Defaults are the VOC setting of method.md §12; the presets in
`cpews/presets/*.yaml` (COCO, the synthetic CPU demo, the unit-test micro model) override some of them.

The tree flattens to `{"section.field": scalar}` (tuples become comma-separated strings) and back, so the
same names serve the trainer, YAML files, `--set` overrides, search spaces, MLflow params and checkpoints.

Every numeric field declares its valid range beside its default (`ranged(default, Range)`); a value outside it
is a `ConfigError` wherever it enters (a YAML file, `--set`, a flat dict, a sweep's fixed values and searched
ranges), naming the key, the value and the range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

Scalar = Union[int, float, str, bool]  # noqa: UP007 - a runtime alias, also for Python 3.10

PRESETS_DIR = Path(__file__).parent / "presets"
SYNTHETIC_WEIGHTS = "synthetic"  # model.weights: the backbone pretrained on the synthetic world (pretrain.*)


class ConfigError(ValueError):
    """A config file, override or flat dict names an unknown key or holds a badly typed or out-of-range value."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (of each item, for a tuple field): finite numbers from `low` to
    `high` (None = unbounded), each bound included unless `low_open` / `high_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return "any finite number"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


AT_LEAST_0 = Range(low=0)  # counts, sizes and weights; 0 often means "off" or "the backbone's own"
AT_LEAST_1 = Range(low=1)
AT_LEAST_MINUS_1 = Range(low=-1)  # iteration thresholds where -1 means "from the start"
POSITIVE = Range(low=0, low_open=True)  # learning rates, scales, temperatures, kernel widths
UNIT = Range(low=0, high=1)  # probabilities, thresholds, ratios
BETA = Range(low=0, high=1, high_open=True)  # Adam's moment decay rates
SEED = Range(low=0, high=2**32 - 1)  # what numpy and scikit-learn accept
SYNTHETIC_IMAGE_SIZE = Range(low=32)  # the synthetic generator's smallest image (cpews.data.synthetic)

_RANGE = "range"  # the dataclass field metadata key of a field's Range


def ranged(default: Any, valid: Range) -> Any:
    """A dataclass field with `default` whose values (each item, for a tuple) must lie in `valid`."""
    return field(default=default, metadata={_RANGE: valid})


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vit_base_patch16_224"  # any timm ViT name [P][T]; deit_base_patch16_224 for Fig. 3
    weights: str = ""  # "" random init; "hub" timm's pretrained tag; "synthetic" the pretrain.* backbone; else a path [T][D][I]
    img_size: int = ranged(224, AT_LEAST_1)  # grid of the learned positional embedding (interpolated per forward) [T]
    patch_size: int = ranged(0, AT_LEAST_0)  # 0 = the backbone's own; set for micro configs [D]
    embed_dim: int = ranged(0, AT_LEAST_0)  # 0 = the backbone's own (768 for ViT-B) [D]
    depth: int = ranged(0, AT_LEAST_0)  # 0 = the backbone's own (12 for ViT-B) [D]
    num_heads: int = ranged(0, AT_LEAST_0)  # 0 = the backbone's own [D]
    ism_depth: int = ranged(10, AT_LEAST_1)  # 1-based block feeding the ISM/aux head, ToCo aux_layer=-3 [T]; Table 5: 8/10/12 [P]
    freeze_pos_embed: bool = True  # [T]
    decoder_channels: int = ranged(512, AT_LEAST_1)  # LargeFOV width [T]
    decoder_dilation: int = ranged(5, AT_LEAST_1)  # LargeFOV dilation [T]


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["voc", "coco", "synthetic"] = "voc"  # [P] VOC and COCO; [I] the synthetic CPU set
    root: str = ""  # dataset folder; "" = runs/data/synthetic for the synthetic dataset [I]
    train_split: str = "train_aug"  # [T]
    val_split: str = "val"  # [T]
    crop_size: int = ranged(448, AT_LEAST_1)  # [T]
    scale_min: float = ranged(0.5, POSITIVE)  # random rescale range [T]
    scale_max: float = ranged(2.0, POSITIVE)  # [T]
    hflip_prob: float = ranged(0.5, UNIT)  # [T]
    photometric: bool = True  # ColorJitter/RandomGrayscale/GaussianBlur [T]
    norm_mean: tuple[float, ...] = ranged((0.485, 0.456, 0.406), UNIT)  # ImageNet mean, as ToCo [T]
    norm_std: tuple[float, ...] = ranged((0.229, 0.224, 0.225), POSITIVE)  # [T]
    num_workers: int = ranged(2, AT_LEAST_0)  # data loader workers [I]
    synthetic_image_size: int = ranged(64, SYNTHETIC_IMAGE_SIZE)  # synthetic dataset generator settings [I]
    synthetic_train: int = ranged(2000, AT_LEAST_1)  # [I]
    synthetic_val: int = ranged(300, AT_LEAST_1)  # [I]
    synthetic_seed: int = ranged(0, SEED)  # [I]
    confounder_strength: float = ranged(0.9, UNIT)  # P(water band | boat image) [I]
    confounder_leak: float = ranged(0.02, UNIT)  # P(water band | image without a boat) [I]


@dataclass(frozen=True)
class CamConfig:
    scales: tuple[float, ...] = ranged((1.0, 0.5, 1.5), POSITIVE)  # multi-scale CAM for pseudo labels [T]
    bkg_threshold: float = ranged(0.50, UNIT)  # plain mode, CAM evaluation; COCO 0.45 [T]
    high_threshold: float = ranged(0.70, UNIT)  # ignore-band upper threshold; COCO 0.65 [T]
    low_threshold: float = ranged(0.25, UNIT)  # ignore-band lower threshold [T]
    ism_box_mode: Literal["token", "toco"] = "token"  # valid box on the token grid [D]


@dataclass(frozen=True)
class RefineConfig:
    iters: int = ranged(10, AT_LEAST_0)  # PAR iterations [A]
    dilations: tuple[int, ...] = ranged((1, 2, 4, 8, 12, 24), AT_LEAST_1)  # [A]
    w1: float = ranged(0.3, POSITIVE)  # colour/position kernel width [A]
    w2: float = ranged(0.01, AT_LEAST_0)  # weight of the position term [A]
    downscale: int = ranged(2, AT_LEAST_1)  # PAR runs at half resolution [T]


@dataclass(frozen=True)
class LossConfig:
    cls_weight: float = ranged(1.0, AT_LEAST_0)  # final classifier [T]
    aux_cls_weight: float = ranged(1.0, AT_LEAST_0)  # auxiliary (ISM) classifier [T][D]
    ism_weight: float = ranged(0.2, AT_LEAST_0)  # ToCo w_ptc [T]
    ism_warmup_iters: int = ranged(-1, AT_LEAST_MINUS_1)  # L_ISM off while it <= this; -1 = on from the start; COCO 12000 [T]
    seg_weight: float = ranged(0.1, AT_LEAST_0)  # [T]
    seg_warmup_iters: int = ranged(2000, AT_LEAST_MINUS_1)  # L_seg off while it <= this; COCO 8000 [T]
    seg_aux_label_iters: int = ranged(-1, AT_LEAST_MINUS_1)  # seg labels from the aux CAM while it <= this; COCO 12000 [T]
    pdl_weight: float = ranged(0.12, AT_LEAST_0)  # FPR RC_weight [F]
    ssl_weight: float = ranged(1.5e-4, AT_LEAST_0)  # FPR PR_weight [F]


@dataclass(frozen=True)
class ProtoConfig:
    source: Literal["warmup", "checkpoint"] = "warmup"  # where the pool comes from [D]
    checkpoint: str = ""  # for source=checkpoint: the checkpoint to build from and start from [F]
    build_iter: int = ranged(4000, AT_LEAST_0)  # it_pool; COCO 16000 [D]
    n_builds: int = ranged(1, AT_LEAST_0)  # 0 = CPM off; >1 rebuilds evenly spaced after build_iter (Table 3) [P][D]
    num_prototypes: int = ranged(10, AT_LEAST_1)  # K [F]
    region_threshold: float = ranged(0.1, UNIT)  # theta_r [F]
    temperature: float = ranged(13.0, POSITIVE)  # tau [F]
    kmeans_n_init: int = ranged(10, AT_LEAST_1)  # [F]
    kmeans_max_iter: int = ranged(10, AT_LEAST_1)  # [F]
    kmeans_seed: int = ranged(0, SEED)  # [F]
    scales: tuple[float, ...] = ranged((1.0, 0.5, 1.5), POSITIVE)  # views for the pool build, each with its flip [D]
    resize: int = ranged(448, AT_LEAST_1)  # images resized to this square for the pool build [D]
    ssl_exclude_singleton_superclass: bool = True  # [F]
    cache_dir: str = ""  # pools stored by content key and reused when images, model and settings match; "" = off [I]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = ranged(6e-5, POSITIVE)  # backbone base lr [T]
    head_lr_mult: float = ranged(10.0, POSITIVE)  # classifiers and decoder [T]
    weight_decay: float = ranged(0.01, AT_LEAST_0)  # all groups [T]
    beta1: float = ranged(0.9, BETA)  # [T]
    beta2: float = ranged(0.999, BETA)  # [T]
    eps: float = ranged(1e-8, POSITIVE)  # [T]
    warmup_iters: int = ranged(1500, AT_LEAST_0)  # [T]
    warmup_ratio: float = ranged(1e-6, UNIT)  # a ratio of the base lr [T]
    power: float = ranged(0.9, AT_LEAST_0)  # poly decay [T]
    max_iters: int = ranged(20000, AT_LEAST_0)  # 0 = no step: the untrained model is validated [P]


@dataclass(frozen=True)
class EvalConfig:
    every: int = ranged(2000, AT_LEAST_0)  # validation interval in iterations; 0 = at the end only [T]
    max_images: int = ranged(0, AT_LEAST_0)  # 0 = the whole validation split [I]
    size: int = ranged(448, AT_LEAST_1)  # validation images are fed at this square size during training [T]
    test_scales: tuple[float, ...] = ranged((1.0, 1.25, 1.5), POSITIVE)  # final inference scales [T]
    crf_iters: int = ranged(10, AT_LEAST_0)  # mean-field steps [T]
    crf_gauss_sxy: float = ranged(1.0, POSITIVE)  # [T]
    crf_gauss_compat: float = ranged(1.0, AT_LEAST_0)  # [T]
    crf_bilateral_sxy: float = ranged(121.0, POSITIVE)  # [T]
    crf_bilateral_srgb: float = ranged(5.0, POSITIVE)  # [T]
    crf_bilateral_compat: float = ranged(4.0, AT_LEAST_0)  # [T]


@dataclass(frozen=True)
class TrainLoopConfig:
    batch_size: int = ranged(4, AT_LEAST_1)  # [P]
    seed: int = ranged(0, SEED)  # [T]
    device: str = "auto"  # auto = cuda when available, else cpu [I]
    amp: Literal["off", "bf16"] = "bf16"  # bf16 autocast, applied on CUDA only [D]
    log_every: int = ranged(50, AT_LEAST_1)  # [I]
    checkpoint_every: int = ranged(2000, AT_LEAST_0)  # periodic checkpoints besides last.pt; 0 = none [I]
    keep_checkpoints: int = ranged(2, AT_LEAST_0)  # newest periodic ones kept while running (resume's fallbacks), none after; 0 = all [I]
    check_finite_every: int = ranged(10, AT_LEAST_1)  # non-finite loss check interval (a device sync) [I]


@dataclass(frozen=True)
class PretrainConfig:
    """The backbone pretraining behind `model.weights=synthetic` (cpews.training.pretrain): image labels only, on
    a synthetic set of its own seed, as ImageNet is for VOC. Every field enters the cached file's content key."""

    seed: int = ranged(1000, SEED)  # generator seed of the pretraining set; must differ from data.synthetic_seed [I]
    images: int = ranged(4000, AT_LEAST_1)  # pretraining images (train_aug of that set) [I]
    val_images: int = ranged(200, AT_LEAST_1)  # held-out images of that set, scored once at the end (CAM mIoU, F1) [I]
    image_size: int = ranged(64, SYNTHETIC_IMAGE_SIZE)  # [I]
    confounder_strength: float = ranged(0.9, UNIT)  # P(water band | boat image) in the pretraining set [I]
    confounder_leak: float = ranged(0.02, UNIT)  # P(water band | image without a boat) in the pretraining set [I]
    iters: int = ranged(3500, AT_LEAST_1)  # optimizer steps [I]
    cls_iters: int = ranged(2000, AT_LEAST_0)  # steps of classification alone; ISM and seg losses join after them [I]
    pool_iter: int = ranged(2500, AT_LEAST_0)  # prototype pool built after this step, PDL + SSL act from then on; 0: none [I]
    batch_size: int = ranged(16, AT_LEAST_1)  # [I]
    lr: float = ranged(1e-3, POSITIVE)  # backbone lr (heads x optim.head_lr_mult) [I]
    warmup_iters: int = ranged(100, AT_LEAST_0)  # [I]
    cache_dir: str = ""  # where pretrained backbones are kept by content key; "" = <data dir>/pretrained; s3:// shared [I]


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    proto: ProtoConfig = field(default_factory=ProtoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_flat_dict(self) -> dict[str, Scalar]:
        """`{"section.field": scalar}`; tuples become comma-separated strings."""
        flat: dict[str, Scalar] = {}
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                flat[f"{section.name}.{f.name}"] = _tuple_to_str(value) if isinstance(value, tuple) else value
        return flat

    @classmethod
    def from_flat_dict(
        cls, flat: Mapping[str, Any], base: TrainConfig | None = None, source: str = "config"
    ) -> TrainConfig:
        """Build a config from dotted keys, starting from `base` (default: the VOC defaults).

        Raises:
            ConfigError: a key is not a config field, or a value does not fit the field's type.
        """
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section, _, name = str(key).partition(".")
            nested.setdefault(section, {})[name] = value
        return (base or cls()).replace_nested(nested, source=source)

    def replace_nested(self, nested: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Return a copy with `{section: {field: value}}` applied; values are validated and coerced."""
        if not isinstance(nested, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(nested).__name__}")
        sections = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for section_name, values in nested.items():
            if section_name not in sections:
                raise ConfigError(
                    f"{source}: unknown config section {section_name!r}; valid sections: {', '.join(sections)}"
                )
            if not isinstance(values, Mapping):
                raise ConfigError(f"{source}: section {section_name!r} must be a mapping, got {values!r}")
            sub = getattr(self, section_name)
            changes[section_name] = _replace_section(sub, section_name, values, source)
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Iterable[str]) -> TrainConfig:
        """Apply `key=value` strings (`loss.ism_weight=0.3`); values are parsed as YAML scalars."""
        flat: dict[str, Any] = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} is not of the form section.field=value")
            flat[key.strip()] = _parse_scalar(raw)
        return self.from_flat_dict(flat, base=self, source="--set")


def _tuple_to_str(values: tuple) -> str:
    return ",".join(repr(v) if isinstance(v, float) else str(v) for v in values)


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _replace_section(sub: Any, section_name: str, values: Mapping[str, Any], source: str) -> Any:
    hints = get_type_hints(type(sub))
    fields = {f.name: f for f in dataclasses.fields(sub)}
    coerced = {}
    for name, value in values.items():
        key = f"{section_name}.{name}"
        if name not in fields:
            close = [f"{section_name}.{n}" for n in sorted(fields) if n.startswith(str(name)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
        value = coerce_value(key, hints[name], value, source)
        coerced[name] = check_range(key, value, fields[name].metadata.get(_RANGE), source)
    return dataclasses.replace(sub, **coerced)


def check_range(key: str, value: Any, valid: Range | None, source: str = "config") -> Any:
    """Return `value` (already coerced to its field's type) when it, or each item of a tuple, lies in `valid`.

    Raises:
        ConfigError: naming `source`, the key (and item), the value and the valid range.
    """
    if valid is None:
        return value
    items = value if isinstance(value, tuple) else (value,)
    for index, item in enumerate(items):
        if item not in valid:
            where = f"{key}[{index}]" if isinstance(value, tuple) else key
            raise ConfigError(f"{source}: {where}={item!r} is outside the valid range {valid}")
    return value


def coerce_value(key: str, annotation: Any, value: Any, source: str = "config") -> Any:
    """Check `value` against a field annotation and convert lossless cases (int -> float, "1,2" -> tuple)."""
    origin = get_origin(annotation)
    where = f"{source}: {key}"
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        item_type = get_args(annotation)[0]
        items = value
        if isinstance(value, str):
            items = [_parse_scalar(v) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"{where}={value!r} must be a non-empty list of {item_type.__name__}")
        return tuple(coerce_value(f"{key}[{i}]", item_type, v, source) for i, v in enumerate(items))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r} must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}={value!r} must be a string")
    raise ConfigError(f"{where}: unsupported field type {annotation!r}")  # pragma: no cover


def field_annotation(dotted_key: str) -> Any:
    """The type annotation of a dotted config key (used by search-space validation).

    Raises:
        ConfigError: the key is not a config field.
    """
    section_type, name = _section_field(dotted_key)
    return get_type_hints(section_type)[name]


def field_range(dotted_key: str) -> Range | None:
    """The valid range of a dotted config key (of each item, for a tuple field); None for a non-numeric field.

    Raises:
        ConfigError: the key is not a config field.
    """
    section_type, name = _section_field(dotted_key)
    return next(f for f in dataclasses.fields(section_type) if f.name == name).metadata.get(_RANGE)


def _section_field(dotted_key: str) -> tuple[type, str]:
    """The section dataclass and the field name of a dotted config key."""
    section, _, name = dotted_key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if section not in sections:
        raise ConfigError(f"unknown config key {dotted_key!r}: no section {section!r}")
    section_type = get_type_hints(TrainConfig)[section]
    if name not in {f.name for f in dataclasses.fields(section_type)}:
        raise ConfigError(f"unknown config key {dotted_key!r}")
    return section_type, name


def load_config(path_or_preset: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Load a YAML config file (or a preset name from `cpews/presets`), then apply `key=value` overrides.

    A YAML file is nested (`loss: {ism_weight: 0.3}`) or flat (`loss.ism_weight: 0.3`). It may name a
    preset to start from with a top-level `base: <preset>` key.
    """
    cfg = TrainConfig()
    if path_or_preset:
        cfg = _load_yaml(resolve_config_path(path_or_preset), set())
    return cfg.with_overrides(overrides)


def resolve_config_path(path_or_preset: str | Path) -> Path:
    path = Path(path_or_preset)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{path_or_preset}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"config file {str(path)!r} not found (and no preset of that name; presets: {', '.join(preset_names())})")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _load_yaml(path: Path, seen: set[Path]) -> TrainConfig:
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    seen.add(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text (UTF-8) file: byte {exc.object[exc.start]:#04x} at offset {exc.start}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    base_name = data.pop("base", None)
    cfg = _load_yaml(resolve_config_path(base_name), seen) if base_name else TrainConfig()
    flat = {k: v for k, v in data.items() if "." in str(k)}
    nested = {k: v for k, v in data.items() if "." not in str(k)}
    cfg = cfg.replace_nested(nested, source=str(path))
    if flat:
        cfg = TrainConfig.from_flat_dict(flat, base=cfg, source=str(path))
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    """Nested YAML of the full resolved config (tuples as lists)."""
    nested = {
        section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        for section, values in dataclasses.asdict(cfg).items()
    }
    return yaml.safe_dump(nested, sort_keys=False)


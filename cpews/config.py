"""One frozen config tree: every hyperparameter of CPEWS exactly once, with its default and provenance.

Provenance tags follow method.md: [P] paper, [T] ToCo, [F] FPR, [A] AFA, [D] a decision of the spec,
[I] a decision of this implementation. Defaults are the VOC setting of method.md §12; the presets in
`cpews/presets/*.yaml` (COCO, the synthetic CPU demo, the unit-test micro model) override some of them.

The tree flattens to `{"section.field": scalar}` (tuples become comma-separated strings) and back, so the
same names serve the trainer, YAML files, `--set` overrides, search spaces, MLflow params and checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

Scalar = Union[int, float, str, bool]  # noqa: UP007 - a runtime alias, also for Python 3.10

PRESETS_DIR = Path(__file__).parent / "presets"
SYNTHETIC_WEIGHTS = "synthetic"  # model.weights: the backbone pretrained on the synthetic world (pretrain.*)


class ConfigError(ValueError):
    """A config file, override or flat dict names an unknown key or holds a badly typed value."""


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vit_base_patch16_224"  # any timm ViT name [P][T]; deit_base_patch16_224 for Fig. 3
    weights: str = ""  # "" random init; "hub" timm's pretrained tag; "synthetic" the pretrain.* backbone; else a path [T][D][I]
    img_size: int = 224  # grid of the learned positional embedding (interpolated per forward) [T]
    patch_size: int = 0  # 0 = the backbone's own; set for micro configs [D]
    embed_dim: int = 0  # 0 = the backbone's own (768 for ViT-B) [D]
    depth: int = 0  # 0 = the backbone's own (12 for ViT-B) [D]
    num_heads: int = 0  # 0 = the backbone's own [D]
    ism_depth: int = 10  # 1-based block feeding the ISM/aux head, ToCo aux_layer=-3 [T]; Table 5: 8/10/12 [P]
    freeze_pos_embed: bool = True  # [T]
    decoder_channels: int = 512  # LargeFOV width [T]
    decoder_dilation: int = 5  # LargeFOV dilation [T]


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["voc", "coco", "synthetic"] = "voc"  # [P] VOC and COCO; [I] the synthetic CPU set
    root: str = ""  # dataset folder; "" = runs/data/synthetic for the synthetic dataset [I]
    train_split: str = "train_aug"  # [T]
    val_split: str = "val"  # [T]
    crop_size: int = 448  # [T]
    scale_min: float = 0.5  # random rescale range [T]
    scale_max: float = 2.0  # [T]
    hflip_prob: float = 0.5  # [T]
    photometric: bool = True  # ColorJitter/RandomGrayscale/GaussianBlur [T]
    norm_mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet mean, as ToCo [T]
    norm_std: tuple[float, ...] = (0.229, 0.224, 0.225)  # [T]
    num_workers: int = 2  # data loader workers [I]
    synthetic_image_size: int = 64  # synthetic dataset generator settings [I]
    synthetic_train: int = 2000  # [I]
    synthetic_val: int = 300  # [I]
    synthetic_seed: int = 0  # [I]
    confounder_strength: float = 0.9  # P(water band | boat image) [I]


@dataclass(frozen=True)
class CamConfig:
    scales: tuple[float, ...] = (1.0, 0.5, 1.5)  # multi-scale CAM for pseudo labels [T]
    bkg_threshold: float = 0.50  # plain mode, CAM evaluation; COCO 0.45 [T]
    high_threshold: float = 0.70  # ignore-band upper threshold; COCO 0.65 [T]
    low_threshold: float = 0.25  # ignore-band lower threshold [T]
    ism_box_mode: Literal["token", "toco"] = "token"  # valid box on the token grid [D]


@dataclass(frozen=True)
class RefineConfig:
    iters: int = 10  # PAR iterations [A]
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)  # [A]
    w1: float = 0.3  # colour/position kernel width [A]
    w2: float = 0.01  # weight of the position term [A]
    downscale: int = 2  # PAR runs at half resolution [T]


@dataclass(frozen=True)
class LossConfig:
    cls_weight: float = 1.0  # final classifier [T]
    aux_cls_weight: float = 1.0  # auxiliary (ISM) classifier [T][D]
    ism_weight: float = 0.2  # ToCo w_ptc [T]
    ism_warmup_iters: int = -1  # L_ISM off while it <= this; -1 = on from the start; COCO 12000 [T]
    seg_weight: float = 0.1  # [T]
    seg_warmup_iters: int = 2000  # L_seg off while it <= this; COCO 8000 [T]
    seg_aux_label_iters: int = -1  # seg labels from the aux CAM while it <= this; COCO 12000 [T]
    pdl_weight: float = 0.12  # FPR RC_weight [F]
    ssl_weight: float = 1.5e-4  # FPR PR_weight [F]


@dataclass(frozen=True)
class ProtoConfig:
    source: Literal["warmup", "checkpoint"] = "warmup"  # where the pool comes from [D]
    checkpoint: str = ""  # for source=checkpoint: the checkpoint to build from and start from [F]
    build_iter: int = 4000  # it_pool; COCO 16000 [D]
    n_builds: int = 1  # 0 = CPM off; >1 rebuilds evenly spaced after build_iter (Table 3) [P][D]
    num_prototypes: int = 10  # K [F]
    region_threshold: float = 0.1  # theta_r [F]
    temperature: float = 13.0  # tau [F]
    kmeans_n_init: int = 10  # [F]
    kmeans_max_iter: int = 10  # [F]
    kmeans_seed: int = 0  # [F]
    scales: tuple[float, ...] = (1.0, 0.5, 1.5)  # views for the pool build, each with its flip [D]
    resize: int = 448  # images resized to this square for the pool build [D]
    ssl_exclude_singleton_superclass: bool = True  # [F]
    cache_dir: str = ""  # pools stored by content key and reused when images, model and settings match; "" = off [I]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-5  # backbone base lr [T]
    head_lr_mult: float = 10.0  # classifiers and decoder [T]
    weight_decay: float = 0.01  # all groups [T]
    beta1: float = 0.9  # [T]
    beta2: float = 0.999  # [T]
    eps: float = 1e-8  # [T]
    warmup_iters: int = 1500  # [T]
    warmup_ratio: float = 1e-6  # a ratio of the base lr [T]
    power: float = 0.9  # poly decay [T]
    max_iters: int = 20000  # [P]


@dataclass(frozen=True)
class EvalConfig:
    every: int = 2000  # validation interval in iterations [T]
    max_images: int = 0  # 0 = the whole validation split [I]
    size: int = 448  # validation images are fed at this square size during training [T]
    test_scales: tuple[float, ...] = (1.0, 1.25, 1.5)  # final inference scales [T]
    crf_iters: int = 10  # [T]
    crf_gauss_sxy: float = 1.0  # [T]
    crf_gauss_compat: float = 1.0  # [T]
    crf_bilateral_sxy: float = 121.0  # [T]
    crf_bilateral_srgb: float = 5.0  # [T]
    crf_bilateral_compat: float = 4.0  # [T]


@dataclass(frozen=True)
class TrainLoopConfig:
    batch_size: int = 4  # [P]
    seed: int = 0  # [T]
    device: str = "auto"  # auto = cuda when available, else cpu [I]
    amp: Literal["off", "bf16"] = "bf16"  # bf16 autocast, applied on CUDA only [D]
    log_every: int = 50  # [I]
    checkpoint_every: int = 2000  # periodic checkpoints besides last.pt [I]
    check_finite_every: int = 10  # non-finite loss check interval (a device sync) [I]


@dataclass(frozen=True)
class PretrainConfig:
    """The backbone pretraining behind `model.weights=synthetic` (cpews.training.pretrain): image labels only, on
    a synthetic set of its own seed, as ImageNet is for VOC. Every field enters the cached file's content key."""

    seed: int = 1000  # generator seed of the pretraining set; must differ from data.synthetic_seed [I]
    images: int = 4000  # pretraining images (train_aug of that set) [I]
    val_images: int = 200  # held-out images of that set, scored once at the end (CAM mIoU, F1) [I]
    image_size: int = 64  # [I]
    confounder_strength: float = 0.9  # P(water band | boat image) in the pretraining set [I]
    iters: int = 3000  # optimizer steps [I]
    cls_iters: int = 2500  # steps of classification alone; ISM and seg losses join after them [I]
    batch_size: int = 16  # [I]
    lr: float = 1e-3  # backbone lr (heads x optim.head_lr_mult) [I]
    warmup_iters: int = 100  # [I]
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
    names = {f.name for f in dataclasses.fields(sub)}
    coerced = {}
    for name, value in values.items():
        key = f"{section_name}.{name}"
        if name not in names:
            close = [f"{section_name}.{n}" for n in sorted(names) if n.startswith(str(name)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
        coerced[name] = coerce_value(key, hints[name], value, source)
    return dataclasses.replace(sub, **coerced)


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
    section, _, name = dotted_key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if section not in sections:
        raise ConfigError(f"unknown config key {dotted_key!r}: no section {section!r}")
    section_type = get_type_hints(TrainConfig)[section]
    hints = get_type_hints(section_type)
    if name not in hints:
        raise ConfigError(f"unknown config key {dotted_key!r}")
    return hints[name]


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
        data = yaml.safe_load(path.read_text()) or {}
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


"""Dataset resolution and loaders for the trainer (maps cfg.data to the `cpews.data` readers)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cpews.config import TrainConfig
from cpews.data import EvalDataset, TrainDataset, class_table, ensure_synthetic_dataset, validate_dataset

DATA_DIR_ENV = "CPEWS_DATA_DIR"


def synthetic_root(cfg: TrainConfig) -> Path:
    """Where the synthetic dataset of these generator settings lives (one folder per setting)."""
    d = cfg.data
    base = Path(os.environ.get(DATA_DIR_ENV, "runs/data"))
    name = (
        f"synthetic-{d.synthetic_image_size}px-{d.synthetic_train}x{d.synthetic_val}"
        f"-seed{d.synthetic_seed}-conf{d.confounder_strength:g}"
    )
    return base / name


def resolve_data_root(cfg: TrainConfig, *, validate: bool = True) -> Path:
    """The dataset folder of `cfg`; the synthetic dataset is generated on first use.

    Raises:
        cpews.data.DatasetError: the folder is missing or malformed (checked before training starts).
    """
    d = cfg.data
    if d.dataset == "synthetic" and not d.root:
        root = synthetic_root(cfg)
        ensure_synthetic_dataset(
            root,
            seed=d.synthetic_seed,
            image_size=d.synthetic_image_size,
            n_train=d.synthetic_train,
            n_val=d.synthetic_val,
            confounder_strength=d.confounder_strength,
        )
        return root
    root = Path(d.root)
    if validate:
        validate_dataset(root, d.dataset, [d.train_split, d.val_split], check_images=64)
    return root


def train_loader(
    cfg: TrainConfig, root: Path, *, ids: Sequence[str] | None = None, generator: torch.Generator | None = None
) -> DataLoader:
    d = cfg.data
    dataset = TrainDataset(
        root,
        d.dataset,
        d.train_split,
        crop_size=d.crop_size,
        scale_range=(d.scale_min, d.scale_max),
        hflip_prob=d.hflip_prob,
        photometric=d.photometric,
        mean=d.norm_mean,
        std=d.norm_std,
        ids=ids,
        seed=cfg.train.seed,
    )
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set ({len(dataset)} images)"
        )
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def eval_dataset(
    cfg: TrainConfig, root: Path, *, split: str | None = None, ids: Sequence[str] | None = None, resize: int | None = None
) -> EvalDataset:
    d = cfg.data
    return EvalDataset(root, d.dataset, split or d.val_split, mean=d.norm_mean, std=d.norm_std, ids=ids, resize=resize)


def infinite_batches(loader: DataLoader) -> Iterator[dict]:
    """Restart the loader whenever it is exhausted (§8.5)."""
    while True:
        yield from loader


def class_names(cfg: TrainConfig) -> list[str]:
    return list(class_table(cfg.data.dataset).names)

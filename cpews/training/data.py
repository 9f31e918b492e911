"""Dataset resolution and loaders for the trainer (maps cfg.data to the `cpews.data` readers)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from cpews.config import DataConfig, TrainConfig
from cpews.data import EvalDataset, TrainDataset, class_table, ensure_synthetic_dataset, validate_dataset
from cpews.data.remote import is_s3, sync_prefix

DATA_DIR_ENV = "CPEWS_DATA_DIR"
DEFAULT_CONFOUNDER_LEAK = DataConfig.confounder_leak


def synthetic_root(cfg: TrainConfig) -> Path:
    """Where the synthetic dataset of these generator settings lives (one folder per setting)."""
    d = cfg.data
    base = Path(os.environ.get(DATA_DIR_ENV, "runs/data"))
    name = (
        f"synthetic-{d.synthetic_image_size}px-{d.synthetic_train}x{d.synthetic_val}"
        f"-seed{d.synthetic_seed}-conf{d.confounder_strength:g}"
    )
    if d.confounder_leak != DEFAULT_CONFOUNDER_LEAK:  # the folders of the default leak keep their earlier names
        name += f"-leak{d.confounder_leak:g}"
    return base / name


def resolve_data_root(cfg: TrainConfig, *, validate: bool = True) -> Path:
    """The dataset folder of `cfg`; the synthetic dataset is generated on first use, an `s3://` root is copied
    to this machine once (`cpews.data.remote.sync_prefix`).

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
            confounder_leak=d.confounder_leak,
        )
        return root
    root = sync_prefix(d.root).path if is_s3(d.root) else Path(d.root)  # s3://: a local copy, once per machine
    if validate:
        validate_dataset(root, d.dataset, [d.train_split, d.val_split], check_images=64)
    return root


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless shuffled batches (drop last, reshuffle each epoch) that can start at any batch number.

    Epoch `e` is a permutation seeded by `(seed, e)`, and every item carries its own augmentation seed
    drawn from the same generator, so batch number `k` is the same whether the run started at 0 or resumed
    at `k`, and whatever the number of loader workers.

    Yields: lists of `(index, augmentation_seed)` of length `batch_size`.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, start_batch: int = 0) -> None:
        if num_items < batch_size:
            raise ValueError(f"train.batch_size={batch_size} is larger than the training set ({num_items} images)")
        self.num_items, self.batch_size, self.seed, self.start_batch = num_items, batch_size, seed, start_batch
        self.batches_per_epoch = num_items // batch_size

    def epoch_items(self, epoch: int) -> tuple[list[int], list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        draws = torch.randint(0, 2**31 - 1, (self.num_items,), generator=generator).tolist()
        return order, draws

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order, draws = self.epoch_items(epoch)
            for b in range(offset, self.batches_per_epoch):
                chunk = range(b * self.batch_size, (b + 1) * self.batch_size)
                yield [(order[i], draws[order[i]]) for i in chunk]
            epoch, offset = epoch + 1, 0


def train_loader(
    cfg: TrainConfig, root: Path, *, ids: Sequence[str] | None = None, start_batch: int = 0
) -> DataLoader:
    """An endless loader of augmented batches (§8.5) that starts at batch number `start_batch`."""
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
    sampler = ResumableBatchSampler(len(dataset), cfg.train.batch_size, seed=cfg.train.seed, start_batch=start_batch)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=d.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def eval_dataset(
    cfg: TrainConfig, root: Path, *, split: str | None = None, ids: Sequence[str] | None = None, resize: int | None = None
) -> EvalDataset:
    d = cfg.data
    return EvalDataset(root, d.dataset, split or d.val_split, mean=d.norm_mean, std=d.norm_std, ids=ids, resize=resize)


def class_names(cfg: TrainConfig) -> list[str]:
    return list(class_table(cfg.data.dataset).names)
